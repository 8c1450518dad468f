"""The optimizer and its learning-rate schedule, both megatron-core's (as lingua's `optim.py`).

AdamW with decoupled weight decay, gradient clipping by global norm, the distributed optimizer as an
option, and cosine (or linear) decay after a linear warmup (`OptimizerParamScheduler`).

Weight decay: none on biases and on parameters with fewer than 2 dimensions (norms, layer-scale, the
class/position/query tokens and the 0-D `logit_scale`, as open_clip). megatron-core's default rule
(`len(shape) == 1`) would decay the 0-D temperature, so the rule is given as an override.

With `parallel.overlap_param_gather` the step updates this rank's shard only; the other shards reach
the model in the next forward pass (DDP's forward pre-hooks). `sync_params` gathers them at once,
for whatever reads the weights outside a forward pass (saving a checkpoint).
"""

import math

import torch
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride

from megatron_lcl.config import OptimizerConfig, ParallelConfig, PrecisionConfig, TrainConfig


def no_weight_decay_overrides() -> dict:
    key = ParamKey(name="*.bias", predicate=ParamPredicate(name="ndim_lt_2", fn=lambda p: p.dim() < 2))
    return {key: ParamGroupOverride(wd_mult=0.0)}


def build_optimizer(ddp_model, cfg: OptimizerConfig, parallel: ParallelConfig, precision: PrecisionConfig):
    """`get_megatron_optimizer` over the DDP-wrapped model, with the weight-decay rule above."""
    bf16 = precision.params_dtype == "bf16"
    mcore_cfg = McoreOptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, decoupled_weight_decay=True,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_param_gather=parallel.overlap_param_gather,  # as DDP's (megatron-core wants both)
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    return get_megatron_optimizer(mcore_cfg, [ddp_model], config_overrides=no_weight_decay_overrides())


def sync_params(ddp_model) -> None:
    """Finish the parameter all-gather that `overlap_param_gather` defers to the next forward pass, so
    every rank holds the updated weights now. A no-op without it (the step gathered them already)."""
    if ddp_model.ddp_config.overlap_param_gather:
        ddp_model.start_param_sync(force_sync=True)


def build_scheduler(optimizer, cfg: OptimizerConfig, train: TrainConfig) -> OptimizerParamScheduler:
    """Linear warmup 0 -> lr over `warmup_steps`, then decay to `min_lr` by `decay_steps` (one call per step)."""
    decay_steps = cfg.decay_steps or train.train_steps
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=min(cfg.warmup_steps, decay_steps - 1) if decay_steps > 1 else 0,
        lr_decay_steps=decay_steps, lr_decay_style=cfg.decay_style,
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=decay_steps,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=not cfg.override_scheduler,
        override_opt_param_scheduler=cfg.override_scheduler)  # checkpoint.resume refuses a silent mismatch


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def clamp_logit_scale(model, max_scale: float) -> None:
    """Keep the learnable temperature s = exp(logit_scale) <= max_scale (CLIP's clamp, after each step).

    The clamp must change the value the optimizer keeps. With bf16 parameters megatron-core's
    mixed-precision and distributed optimizers keep an fp32 `main_param` copy (the distributed one on
    the data-parallel rank whose shard holds the parameter; None elsewhere) and copy it over the
    parameter after every step: clamping the parameter alone lasts until the next step. So both are
    clamped. (Keeping `logit_scale` fp32 instead, its own master, trips megatron-core 0.16.1's
    mixed-precision optimizer checkpoint, which maps state to parameters by counting bf16 ones only.)
    """
    head = getattr(model, "text_head", None)
    if head is None:
        return
    with torch.no_grad():
        for value in (head.logit_scale, getattr(head.logit_scale, "main_param", None)):
            if value is not None:
                value.clamp_(max=math.log(max_scale))


def drop_path_rate_at(step: int, max_rate: float, ramp_steps: int) -> float:
    """Stochastic-depth rate at `step`: linear ramp 0 -> max_rate over `ramp_steps` (0: constant)."""
    if ramp_steps <= 0:
        return max_rate
    return max_rate * min(1.0, step / ramp_steps)
