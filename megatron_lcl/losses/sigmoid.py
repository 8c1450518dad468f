"""L_con as SigLIP's pairwise sigmoid loss (Zhai et al. 2023), computed on a ring over the data-parallel
ranks so that no rank ever holds more than its own image block and one text block.

For the images i and `<BoI>` features j of the contrastive batch (all DP ranks):

    loss_sum(rank r) = sum_{i on r} sum_{j in batch} -log sigmoid(z_ij (s v_i . t_j + b)),
    z_ij = +1 if j is i's own text, else -1

and L_con = sum_r loss_sum(r) / N, N the batch's images: the same per-image normalisation as the InfoNCE
(`contrastive_loss_sum`), so DP=k equals DP=1 on the same global batch.

The ring (big_vision's `chunked` sigmoid loss). Every rank keeps its image block `[n_r, e]`; text blocks
travel rank r -> r+1 around the group, so at ring step k rank r scores its images against the texts of
rank r-k: one `[n_r, n_{r-k}]` logit block at a time. The blocks are padded to max(counts) rows (the
counts are Python ints known at collate time: no size is read from the device). After P-1 steps a block
is one hop short of home; the P-th hop brings it back, carrying what was accumulated on the way:
- forward: the column maximum of each text's negative logits (for the contrastive top-1);
- backward (recomputed from v and t, nothing is kept but them): the gradient of every rank's loss with
  respect to that text block, summed as it travels, so rank r ends with d(sum of all ranks' losses)/d t_r,
  as `_GatherRows`' backward all-reduce gives the InfoNCE.
Memory per rank: O(max_r n_r x (e + max_r n_r)), whatever the number of DP ranks.
"""

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lcl.losses.contrastive import _exchange_count, gather_rows


class _Ring:
    """Sends a block to the next rank of `group` and receives the previous rank's (P2P, both at once)."""

    def __init__(self, group, rows: int):
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self.rows = rows  # every block is padded to this many rows
        if self.size > 1:
            self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
            self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def source(self, step: int) -> int:
        """The group rank whose text block this rank holds at ring step `step`."""
        return (self.rank - step) % self.size

    def pad(self, *blocks: torch.Tensor) -> torch.Tensor:
        """`[n, c_k]` blocks -> one `[rows, sum c_k]` buffer, zero padded."""
        block = torch.cat(blocks, dim=1)
        return torch.cat([block, block.new_zeros(self.rows - block.shape[0], block.shape[1])])

    def shift(self, buffer: torch.Tensor) -> torch.Tensor:
        """One hop: send `buffer` on, return the previous rank's."""
        if self.size == 1:
            return buffer
        received = torch.empty_like(buffer)
        ops = [dist.P2POp(dist.isend, buffer.contiguous(), self.next, self.group),
               dist.P2POp(dist.irecv, received, self.prev, self.group)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        return received


def _block_logits(v, t, scale, bias, diagonal: bool):
    """v `[n, e]`, t `[c, e]` -> logits `[n, c]` and labels z (+1 on the diagonal of the own block)."""
    logits = scale * (v @ t.t()) + bias
    labels = -torch.ones_like(logits)
    if diagonal:
        labels.diagonal().fill_(1.0)
    return logits, labels


class _RingSigmoid(torch.autograd.Function):
    """(v, t, scale, bias) of this rank -> (this rank's loss_sum, its images whose positive is top-1 in
    both directions). Backward returns d(sum over ranks of grad_r x loss_sum_r) for this rank's inputs."""

    @staticmethod
    def forward(ctx, v, t, scale, bias, counts: List[int], group):
        ring = _Ring(group, max(max(counts), 1))
        n = v.shape[0]
        buffer = ring.pad(t, t.new_full((n, 1), -float("inf")))  # [rows, e + 1]: text | column max
        loss = v.new_zeros(())
        positive = scale * (v * t).sum(-1) + bias  # [n]
        row_max = v.new_full((n,), -float("inf"))  # the best negative of each image
        for step in range(ring.size):
            if step:
                buffer = ring.shift(buffer)
            c = counts[ring.source(step)]
            if n and c:
                logits, labels = _block_logits(v, buffer[:c, :-1], scale, bias, diagonal=step == 0)
                loss = loss - F.logsigmoid(labels * logits).sum()
                negatives = logits.masked_fill(labels > 0, -float("inf"))
                row_max = torch.maximum(row_max, negatives.max(1).values)
                buffer[:c, -1] = torch.maximum(buffer[:c, -1], negatives.max(0).values)
        buffer = ring.shift(buffer)  # home: the column max over every rank's images
        correct = ((positive > row_max) & (positive > buffer[:n, -1])).sum()
        ctx.save_for_backward(v, t, scale, bias)
        ctx.counts, ctx.group = counts, group
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        v, t, scale, bias = ctx.saved_tensors
        ring = _Ring(ctx.group, max(max(ctx.counts), 1))
        n, e = t.shape
        buffer = ring.pad(t, torch.zeros_like(t))  # [rows, 2e]: text | its gradient so far
        grad_v, grad_scale, grad_bias = torch.zeros_like(v), v.new_zeros(()), v.new_zeros(())
        for step in range(ring.size):
            if step:
                buffer = ring.shift(buffer)
            c = ctx.counts[ring.source(step)]
            if n and c:
                text = buffer[:c, :e]
                logits, labels = _block_logits(v, text, scale, bias, diagonal=step == 0)
                # d/dx -log sigmoid(z x) = -z sigmoid(-z x)
                grad_logits = -labels * torch.sigmoid(-labels * logits) * grad_loss  # [n, c]
                grad_v += scale * (grad_logits @ text)
                buffer[:c, e:] += scale * (grad_logits.t() @ v)
                grad_scale += (grad_logits * (v @ text.t())).sum()
                grad_bias += grad_logits.sum()
        buffer = ring.shift(buffer)  # home: every rank's contribution to this rank's texts
        return grad_v, buffer[:n, e:].clone(), grad_scale.view_as(scale), grad_bias.view_as(bias), None, None


def sigmoid_loss_sum(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                     counts: Optional[Sequence[int]] = None):
    """This rank's rows of the pairwise sigmoid loss against every text of the group (module docstring).

    image_features, text_features: `[n, e]`, L2-normalised, row i of both from the same image;
    logit_scale: s (already exp'd and clamped), logit_bias: b, both scalars. `counts`: every rank's n
    (Python ints) when known (training); None: exchanged here (a host sync). Every rank of `group` must
    call it, also with n = 0. Returns `(loss_sum, num_global, num_correct)` as `contrastive_loss_sum`:
    top-1 = the positive logit beats every negative of its row (image -> texts) and of its column
    (text -> images).
    """
    size = 1 if group is None else dist.get_world_size(group)
    if counts is None:
        counts = [image_features.shape[0]] if size == 1 else _exchange_count(image_features, group)
    counts = list(counts)
    rank = 0 if group is None else dist.get_rank(group)
    assert len(counts) == size and counts[rank] == image_features.shape[0], \
        f"ring counts {counts} do not fit this rank's {image_features.shape[0]} rows (rank {rank} of the group)"
    loss, correct = _RingSigmoid.apply(image_features, text_features, logit_scale, logit_bias, counts,
                                       group if size > 1 else None)
    return loss, sum(counts), correct


def gathered_sigmoid_loss_sum(image_features, text_features, logit_scale, logit_bias, group=None, counts=None):
    """The same loss as `sigmoid_loss_sum` by all-gathering every text of the group first (open_clip's
    way: memory grows with the group). Kept as the benchmark's baseline (tools/bench_contrastive.py)."""
    all_texts, start, counts = gather_rows(text_features, group, counts)
    logits = logit_scale * image_features @ all_texts.t() + logit_bias  # [n, N]
    labels = -torch.ones_like(logits)
    labels[:, start: start + image_features.shape[0]].diagonal().fill_(1.0)
    return -F.logsigmoid(labels * logits).sum(), sum(counts)
