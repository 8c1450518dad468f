"""The batch contract between the data pipeline and the model.

One `LCLBatch` is one micro-batch on one data-parallel rank. Layouts are batch-first `[b, s]`
(the model transposes to megatron-core's `[s, b, h]` itself).

Sequence layout of one sample (M = `num_image_tokens`, fixed by the vision config)::

    text ... <BoI> <img> x M <EoI> text ... <BoI> <img> x M <EoI> ... <pad> ...

`tokens[b, p]` is the input at position p, `labels[b, p]` the token to predict there (the input
shifted left by one). `loss_mask[b, p]` is 1 where `labels[b, p]` is a text target: targets that
are image placeholders, `<EoI>` or padding are 0; predicting `<BoI>` is allowed.

Images are flattened over the micro-batch in (sample, position) order: image j belongs to sample
`image_sample_index[j]`, its `<BoI>` sits at `boi_positions[j]` and its M latents fill positions
`boi_positions[j] + 1 ... boi_positions[j] + M`. `image_has_context[j]` says whether text of image j's
own document precedes it in its sample (the context rule of `megatron_lcl.data.sample_builder`): only those
images enter L_con.

What the loss needs to know about sizes is computed once, on the CPU, when the batch is built (collate
time): `con_index` (which images enter L_con, as an index tensor, so selecting them on a GPU needs no
boolean mask, i.e. no device-to-host sync) and `num_text_targets` (a Python int). The step's counts over
the data-parallel group are exchanged from these before the step (`megatron_lcl.losses.StepCounts`).

A labels-only batch (the last pipeline stage's, PP > 1: it never runs the ViT) has `images=None` and
everything else of the full batch, image metadata included.
"""

from dataclasses import dataclass, fields
from typing import Optional

import torch


@dataclass
class LCLBatch:
    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64
    loss_mask: torch.Tensor  # [b, s] float32
    position_ids: torch.Tensor  # [b, s] int64
    images: Optional[torch.Tensor]  # [n, 3, H, W] float32, normalised; n may be 0; None: labels only
    image_sample_index: torch.Tensor  # [n] int64, sample of each image
    boi_positions: torch.Tensor  # [n] int64, position of each image's <BoI> in its sample
    image_has_context: torch.Tensor  # [n] bool, own-document text precedes the image (enters L_con)
    image_labels: Optional[torch.Tensor] = None  # [n] int64 class labels (synthetic/eval only)
    con_index: Optional[torch.Tensor] = None  # [n_con] int64: the images with context, ascending (from the mask)
    num_text_targets: Optional[int] = None  # targets of L_gen in this batch (loss_mask.sum())

    def __post_init__(self):
        """Fill the derived sizes from the masks: at construction, i.e. on the CPU (collate time)."""
        if self.con_index is None:
            self.con_index = self.image_has_context.nonzero().view(-1)  # [n_con]
        if self.num_text_targets is None:
            self.num_text_targets = int(self.loss_mask.sum())

    @property
    def num_images(self) -> int:
        return int(self.image_sample_index.shape[0])

    @property
    def num_con_images(self) -> int:
        """Images entering L_con."""
        return int(self.con_index.shape[0])

    def to(self, device, non_blocking: bool = False) -> "LCLBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "LCLBatch":
        """Called by torch's DataLoader (`pin_memory=True`) so host-to-GPU copies can be asynchronous."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> "LCLBatch":
        return LCLBatch(**{f.name: (fn(v) if isinstance(v, torch.Tensor) else v)
                           for f in fields(self) for v in [getattr(self, f.name)]})

    def validate(self, num_image_tokens: int) -> None:
        """Assert the invariants the model relies on (cheap; call in tests and on load)."""
        b, s = self.tokens.shape
        for name in ("labels", "loss_mask", "position_ids"):
            assert getattr(self, name).shape == (b, s), f"{name} must be [b, s]=({b}, {s})"
        n = self.num_images
        assert self.image_sample_index.shape == self.boi_positions.shape == self.image_has_context.shape == (n,)
        assert self.images is None or self.images.shape[0] == n, f"images must be [n={n}, 3, H, W]"
        assert self.con_index.tolist() == self.image_has_context.nonzero().view(-1).tolist(), \
            "con_index must list the images with context"
        assert self.num_text_targets == int(self.loss_mask.sum()), "num_text_targets must be loss_mask.sum()"
        assert not bool((self.image_has_context & (self.boi_positions == 0)).any()), \
            "an image at position 0 has no context"
        if n:
            assert int(self.image_sample_index.max()) < b, "image_sample_index out of range"
            last = int((self.boi_positions + num_image_tokens).max())
            assert last < s, f"an image's latents end at {last}, past seq_length {s}"
