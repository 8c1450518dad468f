"""L = L_gen + lambda * L_con, normalised so data parallelism is exact.

Per micro-batch, L_gen is the mean over the text targets of the micro-batch on ALL data-parallel
ranks and L_con the mean over its images on all ranks (negatives = those images). Each rank returns
its local sum times `dp_size / global_count`; megatron-core's DDP averages gradients over the
data-parallel group (x 1/dp_size), so the optimised objective is exactly the global mean, whatever
the per-rank token and image counts. The pipeline schedule then averages over micro-batches.
"""

from dataclasses import dataclass
from typing import Optional

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
    con_loss: torch.Tensor  # global L_con (detached)
    con_top1: torch.Tensor  # fraction of images whose positive is top-1 in both directions
    num_text_tokens: torch.Tensor  # targets in L_gen over all DP ranks
    num_images: torch.Tensor  # images in L_con over all DP ranks

    def metrics(self) -> dict:
        return {"loss": self.loss, "lm_loss": self.lm_loss, "con_loss": self.con_loss,
                "con_top1": self.con_top1, "num_text_tokens": self.num_text_tokens,
                "num_images": self.num_images}


class LCLLoss:
    """Combines the two terms. `dp_group` is the data-parallel group (negatives are gathered over it).
    `cfg.mode` is one of `megatron_lcl.config.validate.LOSS_MODES` (checked there)."""

    def __init__(self, cfg: LossConfig, dp_group: Optional[dist.ProcessGroup] = None):
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.gen_weight = 0.0 if cfg.mode == "con" else 1.0
        self.con_weight = {"lcl": cfg.con_weight, "con": 1.0, "gen": 0.0}[cfg.mode]

    @property
    def needs_logits(self) -> bool:
        return self.gen_weight > 0

    def __call__(self, logits, image_features, text_features, logit_scale, labels, loss_mask) -> LossTerms:
        """logits `[s, b, v/tp]` (may be None when mode=con); features `[n, e]`; labels/loss_mask `[b, s]`."""
        zero = loss_mask.new_zeros((), dtype=torch.float32)
        gen_sum, gen_count = zero, loss_mask.sum().float()
        if self.gen_weight:
            gen_sum, gen_count = generation_loss_sum(logits, labels, loss_mask)
        con_sum, con_correct = zero, zero
        if self.con_weight:
            con_sum, _, con_correct = contrastive_loss_sum(  # in fp32 also under bf16
                image_features.float(), text_features.float(), logit_scale.float(), self.dp_group)
        # One all-reduce gives the global denominators and the logged global values.
        stats = torch.stack([gen_sum.detach().float(), gen_count.detach().float(),
                             con_sum.detach().float(), con_correct.float(),
                             zero + image_features.shape[0]]).double()
        if self.dp_size > 1:
            dist.all_reduce(stats, group=self.dp_group)
        g_gen_sum, g_tokens, g_con_sum, g_correct, g_images = stats.float().clamp(min=0).unbind()
        tokens, images = g_tokens.clamp(min=1), g_images.clamp(min=1)
        total = (self.gen_weight * gen_sum * (self.dp_size / tokens) +
                 self.con_weight * con_sum * (self.dp_size / images))
        lm_loss, con_loss = g_gen_sum / tokens, g_con_sum / images
        return LossTerms(total=total, loss=self.gen_weight * lm_loss + self.con_weight * con_loss,
                         lm_loss=lm_loss, con_loss=con_loss, con_top1=g_correct / images,
                         num_text_tokens=g_tokens, num_images=g_images)
