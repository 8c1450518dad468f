"""L_con: symmetric InfoNCE between image features v and <BoI> text features t, and the collapse
monitor of those features (`singular_value_stats`).

Negatives are all images of the micro-batch on every data-parallel rank: each rank scores its
local rows against the gathered global columns (as open_clip's `local_loss=True`). Ranks may hold
different numbers of images (also none); the gather pads to the largest count and trims.

The per-rank counts of the gather: in training they are passed in (`counts`), known on the CPU before
the step (`megatron_lcl.losses.StepCounts`), so the gather reads no size from the device. Without them
(evaluation, the collapse monitor) the counts are all-gathered first and read back (a host sync).
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherRows(torch.autograd.Function):
    """All-gather `[n_r, e]` row blocks of ragged size; backward sums the gradient over ranks.

    The backward all-reduce makes rank r's feature gradient include the terms from every rank's
    loss, i.e. the gradient of the sum of all ranks' losses (what data-parallel training optimises).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, counts: List[int], group) -> torch.Tensor:
        rank = dist.get_rank(group)
        ctx.group, ctx.start, ctx.count = group, sum(counts[:rank]), counts[rank]
        padded = rows.new_zeros((max(counts), rows.shape[1]))
        padded[: rows.shape[0]] = rows
        blocks = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(blocks, padded.contiguous(), group=group)
        return torch.cat([block[:c] for block, c in zip(blocks, counts)])  # [N, e]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.start: ctx.start + ctx.count], None, None


def gather_rows(rows: torch.Tensor, group, counts: Optional[Sequence[int]] = None
                ) -> Tuple[torch.Tensor, int, List[int]]:
    """-> (global rows `[N, e]` with gradient, this rank's first row in them, per-rank counts).

    `counts`: the rows of every rank of `group` (Python ints), when known; else exchanged here."""
    if group is None or dist.get_world_size(group) == 1:
        return rows, 0, [rows.shape[0]]
    if counts is None:
        counts = _exchange_count(rows, group)
    counts = list(counts)
    rank = dist.get_rank(group)
    assert len(counts) == dist.get_world_size(group) and counts[rank] == rows.shape[0], \
        f"gather counts {counts} do not fit this rank's {rows.shape[0]} rows (rank {rank} of the group)"
    if sum(counts) == 0:
        return rows, 0, counts
    return _GatherRows.apply(rows, counts, group), sum(counts[:rank]), counts


def _exchange_count(rows: torch.Tensor, group) -> List[int]:
    """Every rank's row count, all-gathered on the rows' device and read back (syncs a GPU)."""
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, count, group=group)
    return torch.cat(counts).tolist()


def contrastive_loss_sum(image_features: torch.Tensor, text_features: torch.Tensor,
                         logit_scale: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                         counts: Optional[Sequence[int]] = None):
    """Local rows of the symmetric InfoNCE against global columns.

    image_features, text_features: `[n, e]`, L2-normalised, row i of both from the same image.
    `counts`: every rank's n (Python ints) when known on the CPU (training); None: exchanged here.
    Returns `(loss_sum, num_global, num_correct)`: the sum over local rows of
    (CE(image->text) + CE(text->image)) / 2, the number of images over the group (the mean's
    denominator), and how many local rows have their positive as top-1 in both directions.
    """
    all_images, start, counts = gather_rows(image_features, group, counts)
    all_texts, _, _ = gather_rows(text_features, group, counts)
    num_global = sum(counts)
    n = image_features.shape[0]
    if n == 0:  # keep the gathered tensors in the graph: every rank must join the backward all-reduce
        zero = (all_images.sum() + all_texts.sum()) * 0.0 + logit_scale * 0.0
        return zero, num_global, torch.zeros((), dtype=torch.long, device=zero.device)
    labels = torch.arange(start, start + n, device=image_features.device)
    logits_per_image = logit_scale * image_features @ all_texts.t()  # [n, N]
    logits_per_text = logit_scale * text_features @ all_images.t()  # [n, N]
    loss_sum = (F.cross_entropy(logits_per_image, labels, reduction="sum") +
                F.cross_entropy(logits_per_text, labels, reduction="sum")) / 2
    with torch.no_grad():
        correct = ((logits_per_image.argmax(-1) == labels) & (logits_per_text.argmax(-1) == labels)).sum()
    return loss_sum, num_global, correct


def singular_value_stats(features: torch.Tensor) -> dict:
    """Collapse monitor for features `[n, e]` (the normalised v_i of a global batch).

    With p_k = sigma_k / sum(sigma), `sv_entropy` = -sum p_k log p_k and `effective_rank` = exp(entropy)
    (Roy & Vetterli 2007): 1.0 when every v_i points the same way (collapse), up to min(n, e) when
    they spread over all directions. `effective_rank_frac` divides by that maximum.
    """
    n, e = features.shape
    if n < 2:
        return {}
    sigma = torch.linalg.svdvals(features.double())
    p = sigma / sigma.sum().clamp(min=1e-30)
    entropy = float(-(p * torch.log(p.clamp(min=1e-30))).sum())
    return {"sv_entropy": entropy, "effective_rank": math.exp(entropy),
            "effective_rank_frac": math.exp(entropy) / min(n, e)}
