"""megatron-core optimizer with LCL's weight-decay rule.

No weight decay on biases, norms, layer-scale, the class/position/query tokens' 1-D params and the
0-D `logit_scale` (as open_clip): everything with fewer than 2 dimensions, plus `*.bias`.
megatron-core's standard rule (`len(shape) == 1`) would decay the 0-D temperature.
"""

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.optimizer_param_scheduler import ParamGroupOverride


def no_weight_decay_overrides() -> dict:
    key = ParamKey(name="*.bias", predicate=ParamPredicate(name="ndim_lt_2", fn=lambda p: p.dim() < 2))
    return {key: ParamGroupOverride(wd_mult=0.0)}


def build_optimizer(config: OptimizerConfig, ddp_models: list):
    """`get_megatron_optimizer` over the DDP-wrapped model chunks, with the rule above."""
    return get_megatron_optimizer(config, ddp_models, config_overrides=no_weight_decay_overrides())
