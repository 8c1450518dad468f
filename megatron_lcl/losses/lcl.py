"""L = L_gen + lambda * L_con, normalised so data parallelism is exact.

Per micro-batch, L_gen is the mean over the text targets of the micro-batch on ALL data-parallel
ranks. Each rank returns its local sum times `dp_size / global_count`; megatron-core's DDP averages
gradients over the data-parallel group (x 1/dp_size), so the optimised objective is exactly the global
mean, whatever the per-rank token and image counts. The pipeline schedule then averages over
micro-batches.

L_con takes the images with context only (`contrastive_mask`, the rule of `megatron_lcl.data.sample_builder`).
Its negatives (`loss.contrastive_batch`):
- micro_batch: the images of the micro-batch on all DP ranks; L_con is their mean, per micro-batch.
- step: the images of ALL micro-batches of the step on all DP ranks (the paper's). The pipeline first
  collects every micro-batch's features without gradients, `step_contrastive` computes the step's
  L_con and its gradients with respect to every feature once, and each micro-batch's loss then carries
  the surrogate `n_mb * (<g_v, v> + <g_t, t>) + <g_s, s>`, whose gradient is exactly the step L_con's
  (`n_mb` undoes the schedule's division by the number of micro-batches; `<g_s, s>` is added in every
  micro-batch, so after that division the scale gets g_s once).
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_lcl.config import LossConfig
from megatron_lcl.losses.contrastive import contrastive_loss_sum
from megatron_lcl.losses.generation import generation_loss_sum


@dataclass
class LossTerms:
    total: torch.Tensor  # this rank's share of the objective, with gradient
    loss: torch.Tensor  # global L_gen + lambda * L_con of the micro-batch (detached, same on all DP ranks)
    lm_loss: torch.Tensor  # global L_gen (detached)
    con_loss: torch.Tensor  # global L_con (detached): of the micro-batch, or of the step
    con_top1: torch.Tensor  # fraction of L_con images whose positive is top-1 in both directions
    num_text_tokens: torch.Tensor  # targets in L_gen over all DP ranks
    num_images: torch.Tensor  # images in L_con over all DP ranks (this micro-batch's)
    con_excluded: torch.Tensor  # images of the micro-batch left out of L_con (no context), all DP ranks
    con_batch: torch.Tensor  # images each InfoNCE row is scored against (the contrastive batch)

    def metrics(self) -> dict:
        return {"loss": self.loss, "lm_loss": self.lm_loss, "con_loss": self.con_loss,
                "con_top1": self.con_top1, "num_text_tokens": self.num_text_tokens,
                "num_images": self.num_images, "con_excluded": self.con_excluded, "con_batch": self.con_batch}


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


class LCLLoss:
    """Combines the two terms. `dp_group` is the data-parallel group (negatives are gathered over it)."""

    def __init__(self, cfg: LossConfig, dp_group: Optional[dist.ProcessGroup] = None):
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.gen_weight = 0.0 if cfg.mode == "con" else 1.0
        self.con_weight = {"lcl": cfg.con_weight, "con": 1.0, "gen": 0.0}[cfg.mode]
        self.step_negatives = cfg.contrastive_batch == "step" and self.con_weight > 0

    @property
    def needs_logits(self) -> bool:
        return self.gen_weight > 0

    def __call__(self, logits, image_features, text_features, logit_scale, labels, loss_mask,
                 contrastive_mask, feature_grads: Optional[FeatureGrads] = None) -> LossTerms:
        """logits `[s, b, v/tp]` (may be None when mode=con); features `[n, e]` of all n images and
        `contrastive_mask` `[n]` (those entering L_con); labels/loss_mask `[b, s]`. With
        `feature_grads` (contrastive_batch=step) L_con enters as the surrogate of the module docstring."""
        v, t = image_features[contrastive_mask].float(), text_features[contrastive_mask].float()  # [n_con, e]
        zero = loss_mask.new_zeros((), dtype=torch.float32)
        gen_sum, gen_count = zero, loss_mask.sum().float()
        if self.gen_weight:
            gen_sum, gen_count = generation_loss_sum(logits, labels, loss_mask)
        con_sum, con_correct = zero, zero
        if self.con_weight and feature_grads is None:
            con_sum, _, con_correct = contrastive_loss_sum(v, t, logit_scale.float(), self.dp_group)  # fp32
        # One all-reduce gives the global denominators and the logged global values.
        stats = torch.stack([gen_sum.detach().float(), gen_count.detach().float(), con_sum.detach().float(),
                             con_correct.float(), zero + v.shape[0],
                             zero + int(contrastive_mask.numel() - contrastive_mask.sum())]).double()
        if self.dp_size > 1:
            dist.all_reduce(stats, group=self.dp_group)
        g_gen_sum, g_tokens, g_con_sum, g_correct, g_images, g_excluded = stats.float().clamp(min=0).unbind()
        tokens, images = g_tokens.clamp(min=1), g_images.clamp(min=1)
        lm_loss = g_gen_sum / tokens
        gen_share = self.gen_weight * gen_sum * (self.dp_size / tokens)
        if feature_grads is None:
            total = gen_share + self.con_weight * con_sum * (self.dp_size / images)
            con_loss, con_top1, con_batch = g_con_sum / images, g_correct / images, g_images
        else:
            total = gen_share + _surrogate(feature_grads, v, t, logit_scale.float())
            con_loss, con_top1, con_batch = feature_grads.con_loss, feature_grads.con_top1, feature_grads.con_batch
        return LossTerms(total=total, loss=self.gen_weight * lm_loss + self.con_weight * con_loss,
                         lm_loss=lm_loss, con_loss=con_loss, con_top1=con_top1, num_text_tokens=g_tokens,
                         num_images=g_images, con_excluded=g_excluded, con_batch=con_batch)

    def step_contrastive(self, image_features: Sequence[torch.Tensor], text_features: Sequence[torch.Tensor],
                         logit_scale: torch.Tensor) -> List[FeatureGrads]:
        """The step's L_con over all micro-batches' L_con features (`[n_k, e]` each, no gradient) on all
        DP ranks, local rows against gathered columns; returns each micro-batch's `FeatureGrads`."""
        counts = [f.shape[0] for f in image_features]
        v = torch.cat([f.detach().float() for f in image_features]).requires_grad_()  # [n, e]
        t = torch.cat([f.detach().float() for f in text_features]).requires_grad_()
        s = logit_scale.detach().float().requires_grad_()
        loss_sum, num_global, correct = contrastive_loss_sum(v, t, s, self.dp_group)
        stats = torch.stack([loss_sum.detach(), correct.float()]).double()
        if self.dp_size > 1:
            dist.all_reduce(stats, group=self.dp_group)
        images = max(num_global, 1)
        share = self.con_weight * loss_sum * (self.dp_size / images)  # as in the micro-batch path
        grads = torch.autograd.grad(share, [v, t, s], allow_unused=True)
        g_v, g_t, g_s = (torch.zeros_like(x) if g is None else g for g, x in zip(grads, (v, t, s)))
        con_loss, con_top1 = (stats.float() / images).unbind()
        num = torch.tensor(float(num_global))
        return [FeatureGrads(gv, gt, g_s, len(counts), con_loss, con_top1, num)
                for gv, gt in zip(g_v.split(counts), g_t.split(counts))]


def _surrogate(grads: FeatureGrads, v: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient (after the schedule's 1/num_microbatches) is the step L_con's."""
    k = grads.num_microbatches
    return k * ((grads.image * v).sum() + (grads.text * t).sum()) + grads.logit_scale * scale
