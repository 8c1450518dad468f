"""Helpers for tests and benchmarks: valid random batches, a measured matmul peak. Not used in training."""

import time
from typing import Optional, Sequence

import torch

from megatron_lcl.data.batch import LCLBatch

# Token ids used by random batches (a real run takes them from the tokenizer).
PAD, BOS, EOS, BOI, EOI, IMG = 0, 1, 2, 3, 4, 5
FIRST_TEXT_ID = 6


def spread_image_positions(seq_length: int, num_image_tokens: int, count: int) -> list:
    """`count` `<BoI>` positions spread over a sequence, text before each (every image enters L_con)."""
    stride = (seq_length - 4) // count
    assert stride >= num_image_tokens + 3, (
        f"{count} images of {num_image_tokens} positions do not fit seq_length {seq_length}")
    return [4 + i * stride for i in range(count)]


def random_batch(images_per_sample: Sequence[Sequence[int]], seq_length: int, num_image_tokens: int,
                 image_size: int, vocab_size: int, seed: int = 0,
                 pad_from: Optional[Sequence[int]] = None) -> LCLBatch:
    """A batch whose sample b holds images with `<BoI>` at each position in `images_per_sample[b]`.

    Text fills the other positions; `pad_from[b]` (optional) starts padding there. All text belongs to
    one document, so every image but one at position 0 has context (enters L_con).
    """
    g = torch.Generator().manual_seed(seed)
    b = len(images_per_sample)
    # Build seq_length + 1 tokens then shift, like the data pipeline.
    full = torch.randint(FIRST_TEXT_ID, vocab_size, (b, seq_length + 1), generator=g)
    sample_index, bois = [], []
    for i, positions in enumerate(images_per_sample):
        for p in positions:
            assert p + num_image_tokens + 1 < seq_length, (
                f"random_batch: sample {i}'s image at <BoI> position {p} needs positions {p}-{p + num_image_tokens + 1} "
                f"(<BoI>, {num_image_tokens} image positions, <EoI>) and a target after them: it does not fit "
                f"seq_length {seq_length} (spread_image_positions places images that fit)")
            full[i, p] = BOI
            full[i, p + 1: p + 1 + num_image_tokens] = IMG
            full[i, p + 1 + num_image_tokens] = EOI
            sample_index.append(i)
            bois.append(p)
        if pad_from is not None and pad_from[i] is not None:
            full[i, pad_from[i]:] = PAD
    tokens, labels = full[:, :-1].contiguous(), full[:, 1:].contiguous()
    loss_mask = ((labels != IMG) & (labels != EOI) & (labels != PAD)).float()
    n = len(bois)
    return LCLBatch(
        tokens=tokens, labels=labels, loss_mask=loss_mask,
        position_ids=torch.arange(seq_length).expand(b, seq_length).contiguous(),
        images=torch.randn(n, 3, image_size, image_size, generator=g),
        image_sample_index=torch.tensor(sample_index, dtype=torch.long),
        boi_positions=torch.tensor(bois, dtype=torch.long),
        image_has_context=torch.tensor(bois, dtype=torch.long) > 0)


def slice_batch(batch: LCLBatch, samples: slice) -> LCLBatch:
    """The sub-batch of samples `samples` (images re-indexed), e.g. one data-parallel rank's share."""
    idx = torch.arange(batch.tokens.shape[0])[samples]
    keep = (batch.image_sample_index >= idx[0]) & (batch.image_sample_index <= idx[-1])
    return LCLBatch(
        tokens=batch.tokens[samples], labels=batch.labels[samples], loss_mask=batch.loss_mask[samples],
        position_ids=batch.position_ids[samples], images=batch.images[keep],
        image_sample_index=batch.image_sample_index[keep] - int(idx[0]),
        boi_positions=batch.boi_positions[keep], image_has_context=batch.image_has_context[keep],
        image_labels=None if batch.image_labels is None else batch.image_labels[keep])


def measure_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device` (this process's threads). The benchmarks
    print it beside MFU; MFU itself is over the spec-sheet peak (`models.flops.PEAK_FLOPS_PER_S`)."""
    n, iters = (8192, 20) if device.type == "cuda" else (1024, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _synchronize(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
