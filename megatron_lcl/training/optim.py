"""Optimizer and learning-rate schedule, both megatron-core's.

AdamW (decoupled weight decay; no decay on biases and parameters with < 2 dims, see
`megatron_lcl.training.optimizer`), gradient
clipping by global norm, the distributed optimizer as an option, cosine (or linear) decay after a
linear warmup (`OptimizerParamScheduler`).
"""

import math

import torch
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_lcl.config import ParallelConfig, PrecisionConfig
from megatron_lcl.training.config import OptimizerConfig, TrainConfig
from megatron_lcl.training.optimizer import build_optimizer as build_megatron_optimizer


def build_optimizer(ddp_model, cfg: OptimizerConfig, parallel: ParallelConfig, precision: PrecisionConfig):
    bf16 = precision.params_dtype == "bf16"
    mcore_cfg = McoreOptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, decoupled_weight_decay=True,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    return build_megatron_optimizer(mcore_cfg, [ddp_model])


def build_scheduler(optimizer, cfg: OptimizerConfig, train: TrainConfig) -> OptimizerParamScheduler:
    """Linear warmup 0 -> lr over `warmup_steps`, then decay to `min_lr` by `decay_steps` (one call per step)."""
    decay_steps = cfg.decay_steps or train.train_steps
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=min(cfg.warmup_steps, decay_steps - 1) if decay_steps > 1 else 0,
        lr_decay_steps=decay_steps, lr_decay_style=cfg.decay_style,
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=decay_steps,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False)


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def clamp_logit_scale(model, max_scale: float) -> None:
    """Keep the learnable temperature s = exp(logit_scale) <= max_scale (CLIP's clamp, after each step)."""
    head = getattr(model, "text_head", None)
    if head is not None:
        with torch.no_grad():
            head.logit_scale.clamp_(max=math.log(max_scale))


def drop_path_rate_at(step: int, max_rate: float, ramp_steps: int) -> float:
    """Stochastic-depth rate at `step`: linear ramp 0 -> max_rate over `ramp_steps` (0: constant)."""
    if ramp_steps <= 0:
        return max_rate
    return max_rate * min(1.0, step / ramp_steps)
