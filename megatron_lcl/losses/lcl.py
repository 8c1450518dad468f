"""L = L_gen + lambda * L_con, normalised over the step, so that neither data parallelism nor the number
of micro-batches a step is split into changes the objective.

The objective of a step (all its micro-batches on all data-parallel ranks):
- L_gen: the mean over the step's text targets (megatron-core's per-token normalisation): sum of the
  per-token cross-entropies / T, T the step's targets on all DP ranks.
- L_con, `loss.contrastive_batch`:
  - step (the paper's): ONE InfoNCE over the images of all micro-batches of the step on all DP ranks.
    The pipeline first collects every micro-batch's features without gradients, `step_contrastive`
    computes the step's L_con and its gradients with respect to every feature once, and each
    micro-batch's loss then carries the surrogate `n_mb * (<g_v, v> + <g_t, t>) + <g_s, s>`, whose
    gradient is exactly the step L_con's (`n_mb` undoes the schedule's division by the number of
    micro-batches; `<g_s, s>` is added in every micro-batch, so after that division the scale gets g_s
    once).
  - micro_batch: each image is scored against the images of its own micro-batch on all DP ranks (the
    global micro-batch, micro_batch_size x DP samples); L_con is the mean of those per-image losses over
    the step's images (sum / N, N the step's L_con images), so every image weighs the same as in `step`.
    The negatives are the global micro-batch's: runs that split a step into global micro-batches of
    another size optimise another L_con (the loss compare keeps the global micro-batch for this mode).
Only images with context enter L_con (`LCLBatch.con_index`, the rule of `megatron_lcl.data.sample_builder`).
`loss.contrastive_loss` picks the objective over that batch: the symmetric InfoNCE (`contrastive_loss_sum`)
or SigLIP's pairwise sigmoid loss on a ring over the DP ranks (`sigmoid_loss_sum`, with the learnable bias
b); both return a sum over this rank's images, normalised here by the same image counts.

How the sums get their denominators without a device sync: T, N and every rank's L_con image count per
micro-batch are Python ints known at collate time (`LCLBatch.num_text_targets`, `con_index`), exchanged
once per step over the DP group on the CPU (`LCLLoss.step_counts` -> `StepCounts`, gloo). Each
micro-batch on each rank returns its local sum x `n_mb * dp_size / T` (or `/ N`): megatron-core's
schedule divides by n_mb and its DDP averages gradients over the DP group (x 1/dp_size), so the
optimised gradient is exactly that of the step objective above, whatever the per-rank and
per-micro-batch counts. The logged values are reduced per step by `LCLLoss.step_metrics`.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_lcl.config import LossConfig
from megatron_lcl.losses.contrastive import contrastive_loss_sum
from megatron_lcl.losses.generation import generation_loss_sum
from megatron_lcl.losses.sigmoid import sigmoid_loss_sum


@dataclass(frozen=True)
class MicroBatchCounts:
    """One micro-batch's sizes and its step's, over the DP group (Python ints: no device read)."""

    text_targets: int  # L_gen targets of the micro-batch, all DP ranks
    con_images: Tuple[int, ...]  # L_con images of the micro-batch on each DP rank (the gather's sizes)
    excluded: int  # images of the micro-batch left out of L_con (no context), all DP ranks
    step_text_targets: int  # T: L_gen targets of the step, all DP ranks
    step_con_images: int  # N: L_con images of the step, all DP ranks
    num_microbatches: int


@dataclass(frozen=True)
class StepCounts:
    """`per_rank[r][k]` = (L_gen targets, L_con images, images without context) of micro-batch k on DP
    rank r: read from the batches' collate-time fields and exchanged once per step (`LCLLoss.step_counts`)."""

    per_rank: Tuple[Tuple[Tuple[int, int, int], ...], ...]  # [dp][n_mb][3]
    rank: int  # this rank's row

    @property
    def num_microbatches(self) -> int:
        return len(self.per_rank[0])

    def con_images_per_rank(self) -> List[int]:
        """The step's L_con images on each DP rank (the sizes of the step-wide gather)."""
        return [sum(mb[1] for mb in rank) for rank in self.per_rank]

    def micro_batch(self, k: int) -> MicroBatchCounts:
        column = [rank[k] for rank in self.per_rank]  # micro-batch k on every DP rank
        total = [sum(mb[i] for rank in self.per_rank for mb in rank) for i in range(3)]
        return MicroBatchCounts(text_targets=sum(c[0] for c in column), con_images=tuple(c[1] for c in column),
                                excluded=sum(c[2] for c in column), step_text_targets=total[0],
                                step_con_images=total[1], num_microbatches=self.num_microbatches)


@dataclass
class LossTerms:
    """One micro-batch's terms. `total` carries the gradient; the rest are detached values over all DP
    ranks, of this micro-batch (the step's values: `LCLLoss.step_metrics`)."""

    total: torch.Tensor  # this rank's share of the step objective (module docstring), with gradient
    loss: torch.Tensor  # L_gen + lambda * L_con of the micro-batch
    lm_loss: torch.Tensor  # the micro-batch's L_gen: mean over its targets
    con_loss: torch.Tensor  # L_con: the micro-batch's InfoNCE mean, or the step's (contrastive_batch=step)
    con_top1: torch.Tensor  # fraction of L_con images whose positive is top-1 in both directions
    num_text_tokens: torch.Tensor  # targets in L_gen over all DP ranks
    num_images: torch.Tensor  # images in L_con over all DP ranks (this micro-batch's)
    con_excluded: torch.Tensor  # images of the micro-batch left out of L_con (no context), all DP ranks
    con_batch: torch.Tensor  # images each InfoNCE row is scored against (the contrastive batch)
    lm_loss_sum: torch.Tensor  # sum of the micro-batch's per-token cross-entropies
    con_loss_sum: torch.Tensor  # sum of its per-image InfoNCE losses (micro-batch negatives; 0 with step's)
    con_correct: torch.Tensor  # its images counted in con_top1 (micro-batch negatives)

    def metrics(self) -> dict:
        return {"loss": self.loss, "lm_loss": self.lm_loss, "con_loss": self.con_loss,
                "con_top1": self.con_top1, "num_text_tokens": self.num_text_tokens,
                "num_images": self.num_images, "con_excluded": self.con_excluded, "con_batch": self.con_batch,
                "lm_loss_sum": self.lm_loss_sum, "con_loss_sum": self.con_loss_sum, "con_correct": self.con_correct}


@dataclass
class FeatureGrads:
    """One micro-batch's share of the step's L_con (`contrastive_batch=step`): lambda x the gradients of
    this rank's share of the step L_con with respect to the micro-batch's L_con features, and the
    step's values to log."""

    image: torch.Tensor  # [n_mb, e]
    text: torch.Tensor  # [n_mb, e]
    logit_scale: torch.Tensor  # scalar: gradient with respect to s = exp(logit_scale)
    num_microbatches: int
    con_loss: torch.Tensor  # global step L_con (detached)
    con_top1: torch.Tensor
    con_batch: torch.Tensor  # images in the step's L_con over all DP ranks
    logit_bias: Optional[torch.Tensor] = None  # scalar: gradient with respect to b (sigmoid loss)


STEP_SUMS = ("lm_loss_sum", "con_loss_sum", "con_correct", "num_text_tokens", "num_images", "con_excluded")


class LCLLoss:
    """Combines the two terms. `dp_group` is the data-parallel group (negatives are gathered over it);
    the step's counts are exchanged over the same ranks on the CPU (`count_group`, module docstring)."""

    def __init__(self, cfg: LossConfig, dp_group: Optional[dist.ProcessGroup] = None, count_group=None):
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.count_group = count_group if count_group is not None else _cpu_twin(dp_group)
        self.gen_weight = 0.0 if cfg.mode == "con" else 1.0
        self.con_weight = {"lcl": cfg.con_weight, "con": 1.0, "gen": 0.0}[cfg.mode]
        self.step_negatives = cfg.contrastive_batch == "step" and self.con_weight > 0
        self.sigmoid = cfg.contrastive_loss == "sigmoid"

    @property
    def needs_logits(self) -> bool:
        return self.gen_weight > 0

    def step_counts(self, batches: Sequence) -> StepCounts:
        """This rank's micro-batches (`LCLBatch`es) -> the step's counts on every DP rank: one all-gather
        of a CPU tensor over the DP group, once per step (collective: every DP rank calls it)."""
        local = torch.tensor([[b.num_text_targets, b.num_con_images, b.num_images - b.num_con_images]
                              for b in batches], dtype=torch.long)  # [n_mb, 3], CPU
        if self.dp_size == 1:
            return StepCounts((tuple(map(tuple, local.tolist())),), 0)
        gathered = [torch.empty_like(local) for _ in range(self.dp_size)]
        dist.all_gather(gathered, local, group=self.count_group)
        table = torch.stack(gathered).tolist()  # [dp, n_mb, 3]: a CPU tensor read once per step
        return StepCounts(tuple(tuple(map(tuple, rank)) for rank in table), dist.get_rank(self.dp_group))

    def __call__(self, logits, image_features, text_features, logit_scale, labels, loss_mask, con_index,
                 counts: MicroBatchCounts, feature_grads: Optional[FeatureGrads] = None,
                 logit_bias: Optional[torch.Tensor] = None) -> LossTerms:
        """logits `[s, b, v/tp]` (may be None when mode=con); features `[n, e]` of all n images and
        `con_index` `[n_con]` (those entering L_con); labels/loss_mask `[b, s]`; `logit_bias` b (the
        sigmoid loss). With `feature_grads` (contrastive_batch=step) L_con enters as the surrogate of the
        module docstring."""
        v = image_features.index_select(0, con_index).float()  # [n_con, e]: an index, not a mask (no sync)
        t = text_features.index_select(0, con_index).float()
        zero = loss_mask.new_zeros((), dtype=torch.float32)
        gen_sum = generation_loss_sum(logits, labels, loss_mask)[0] if self.gen_weight else zero
        con_sum, con_correct = zero, zero
        if self.con_weight and feature_grads is None:
            con_sum, _, con_correct = self.con_loss_sum(v, t, logit_scale, logit_bias, counts.con_images)
        # One all-reduce gives the logged global values (the denominators are known: `counts`).
        stats = torch.stack([gen_sum.detach().float(), con_sum.detach().float(), con_correct.float()]).double()
        if self.dp_size > 1:
            dist.all_reduce(stats, group=self.dp_group)
        g_gen_sum, g_con_sum, g_correct = stats.float().unbind()
        # x n_mb: the schedule divides by the micro-batch count; x dp_size: DDP averages over DP ranks.
        scale = counts.num_microbatches * self.dp_size
        total = self.gen_weight * gen_sum * (scale / max(counts.step_text_targets, 1))
        images = max(sum(counts.con_images), 1)
        count = zero.double()  # Python counts as tensors (added, not copied to the device)
        lm_loss = g_gen_sum / max(counts.text_targets, 1)
        if feature_grads is None:
            total = total + self.con_weight * con_sum * (scale / max(counts.step_con_images, 1))
            con_loss, con_top1, con_batch = g_con_sum / images, g_correct / images, count + sum(counts.con_images)
        else:
            total = total + _surrogate(feature_grads, v, t, logit_scale.float(), logit_bias)
            con_loss, con_top1, con_batch = feature_grads.con_loss, feature_grads.con_top1, feature_grads.con_batch
        return LossTerms(total=total, loss=self.gen_weight * lm_loss + self.con_weight * con_loss,
                         lm_loss=lm_loss, con_loss=con_loss, con_top1=con_top1,
                         num_text_tokens=count + counts.text_targets, num_images=count + sum(counts.con_images),
                         con_excluded=count + counts.excluded, con_batch=con_batch, lm_loss_sum=g_gen_sum,
                         con_loss_sum=g_con_sum, con_correct=g_correct)

    def step_metrics(self, per_micro: Sequence[dict]) -> dict:
        """The step's logged values (floats) from its micro-batches' `LossTerms.metrics()`: L_gen over
        the step's targets, L_con over its images (module docstring). One device read for all of them,
        once per step; {} where no loss was computed (not the last pipeline stage)."""
        if not per_micro:
            return {}
        keys = STEP_SUMS + ("con_loss", "con_top1", "con_batch", "loss")
        rows = [dict(zip(keys, row)) for row in
                torch.stack([torch.stack([m[k].double() for k in keys]) for m in per_micro]).tolist()]
        step = {k: sum(r[k] for r in rows) for k in STEP_SUMS}
        lm_loss = step["lm_loss_sum"] / max(step["num_text_tokens"], 1)
        if self.step_negatives:  # every micro-batch carries the step's L_con
            con_loss, con_top1, con_batch = rows[0]["con_loss"], rows[0]["con_top1"], rows[0]["con_batch"]
        else:
            images = max(step["num_images"], 1)
            con_loss, con_top1 = step["con_loss_sum"] / images, step["con_correct"] / images
            con_batch = sum(r["con_batch"] for r in rows) / len(rows)
        loss = self.gen_weight * lm_loss + self.con_weight * con_loss
        if not all(math.isfinite(r["loss"]) for r in rows):  # a non-finite micro-batch makes the step so
            loss = math.nan
        return {"loss": loss, "lm_loss": lm_loss,
                "con_loss": con_loss, "con_top1": con_top1, "num_text_tokens": step["num_text_tokens"],
                "num_images": step["num_images"], "con_excluded": step["con_excluded"], "con_batch": con_batch}

    def con_loss_sum(self, v, t, logit_scale, logit_bias, counts: Sequence[int]):
        """`loss.contrastive_loss` over this rank's L_con rows `[n, e]` and the group's (fp32):
        (loss sum over the rows, images of the group, rows counted top-1)."""
        if self.sigmoid:
            assert logit_bias is not None, "the sigmoid loss needs the model's logit bias (model.heads.logit_bias_init)"
            return sigmoid_loss_sum(v, t, logit_scale.float(), logit_bias.float(), self.dp_group, counts)
        return contrastive_loss_sum(v, t, logit_scale.float(), self.dp_group, counts)

    def step_contrastive(self, image_features: Sequence[torch.Tensor], text_features: Sequence[torch.Tensor],
                         logit_scale: torch.Tensor, counts: StepCounts,
                         logit_bias: Optional[torch.Tensor] = None) -> List[FeatureGrads]:
        """The step's L_con over all micro-batches' L_con features (`[n_k, e]` each, no gradient) on all
        DP ranks, local rows against the group's columns; returns each micro-batch's `FeatureGrads`."""
        sizes = [f.shape[0] for f in image_features]
        v = torch.cat([f.detach().float() for f in image_features]).requires_grad_()  # [n, e]
        t = torch.cat([f.detach().float() for f in text_features]).requires_grad_()
        s = logit_scale.detach().float().requires_grad_()
        b = None if logit_bias is None else logit_bias.detach().float().requires_grad_()
        loss_sum, num_global, correct = self.con_loss_sum(v, t, s, b, counts.con_images_per_rank())
        stats = torch.stack([loss_sum.detach(), correct.float()]).double()
        if self.dp_size > 1:
            dist.all_reduce(stats, group=self.dp_group)
        images = max(num_global, 1)
        share = self.con_weight * loss_sum * (self.dp_size / images)  # as in the micro-batch path
        inputs = [v, t, s] + ([] if b is None else [b])
        grads = torch.autograd.grad(share, inputs, allow_unused=True)
        g_v, g_t, g_s, *g_b = (torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))
        con_loss, con_top1 = (stats.float() / images).unbind()
        num = stats.new_zeros(()) + num_global  # [] float64, no host-to-device copy
        return [FeatureGrads(gv, gt, g_s, len(sizes), con_loss, con_top1, num, g_b[0] if g_b else None)
                for gv, gt in zip(g_v.split(sizes), g_t.split(sizes))]


def _cpu_twin(group: Optional[dist.ProcessGroup]):
    """A group of `group`'s ranks that takes CPU tensors: itself under gloo, else megatron-core's gloo
    data-parallel group (checked to hold the same ranks)."""
    if group is None or dist.get_backend(group) == dist.Backend.GLOO:
        return group
    twin = parallel_state.get_data_parallel_group_gloo()
    assert dist.get_process_group_ranks(twin) == dist.get_process_group_ranks(group), \
        "the loss's data-parallel group is not megatron-core's: pass LCLLoss a gloo count_group of its ranks"
    return twin


def _surrogate(grads: FeatureGrads, v: torch.Tensor, t: torch.Tensor, scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A scalar whose gradient (after the schedule's 1/num_microbatches) is the step L_con's
    (`<g_b, b>` as `<g_s, s>`, with the sigmoid loss's bias)."""
    k = grads.num_microbatches
    total = k * ((grads.image * v).sum() + (grads.text * t).sum()) + grads.logit_scale * scale
    return total if grads.logit_bias is None else total + grads.logit_bias * bias.float()
