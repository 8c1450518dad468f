"""The temperature clamp under megatron-core's optimizers with bf16 parameters, on 2 gloo ranks (DP=2).

`temperature_run` drives s = exp(logit_scale) up past the bound and then down again (loss = +-s, Adam,
lr 0.5) and records, after each step and the clamp, logit_scale as the model holds it and as the
optimizer keeps it. tests/training/test_precision.py calls it in process (DP=1); run under torchrun
(DP=2) this writes OUT/precision.pt (rank 0) with every rank's records, for

    distributed    the distributed optimizer: the fp32 copy lives on the rank whose shard holds it
    mixed          the mixed-precision optimizer: every rank keeps a copy
    parameter_only the distributed optimizer with the clamp of the bf16 parameter alone (the control)
"""

import math

import torch
import torch.distributed as dist

from common import mark_done, parse_out_dir, save_rank0, tiny_model_config
from megatron_lcl.config import OptimizerConfig, ParallelConfig, PrecisionConfig
from megatron_lcl.models.factory import build_model
from megatron_lcl.runtime import initialize_distributed, set_seed
from megatron_lcl.training.optim import build_optimizer, clamp_logit_scale
from megatron_lcl.training.pipeline import wrap_ddp

MAX_SCALE = 100.0
BOUND = float(torch.tensor(math.log(MAX_SCALE)))  # ln(100) as an fp32 tensor holds it
PUSHES = [-1.0] * 8 + [1.0] * 12  # sign of the loss s: 8 steps drive s up (lr 0.5: past ln 100), 12 down


def kept_tensor(optimizer, param: torch.Tensor):
    """The fp32 tensor megatron-core's optimizer updates for `param` on this rank: its `main_param` copy
    (a bf16 parameter; the distributed optimizer sets it to None on ranks whose shard lacks it), else
    the parameter itself or a view of it (an fp32 parameter), else None."""
    if hasattr(param, "main_param"):
        return param.main_param
    held = [p for group in optimizer.optimizer.param_groups for p in group["params"]
            if p.data_ptr() == param.data_ptr()]
    return held[0] if held else None


def clamp_parameter_only(model, max_scale: float) -> None:
    """The clamp before the fix: the model parameter alone."""
    with torch.no_grad():
        model.text_head.logit_scale.clamp_(max=math.log(max_scale))


def temperature_run(params_dtype: str, distributed: bool, clamp=clamp_logit_scale) -> dict:
    """{"kept": [...] (None where this rank keeps no copy), "model": [...], "main_copy": bool} over PUSHES."""
    set_seed(0)
    precision = PrecisionConfig(params_dtype=params_dtype)
    parallel = ParallelConfig(use_distributed_optimizer=distributed)
    model = build_model(tiny_model_config(), parallel, precision)
    logit_scale = model.text_head.logit_scale
    ddp = wrap_ddp(model, parallel)
    optimizer = build_optimizer(ddp, OptimizerConfig(lr=0.5), parallel, precision)
    run = {"kept": [], "model": [], "main_copy": getattr(logit_scale, "main_param", None) is not None}
    for sign in PUSHES:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        (sign * model.text_head.scale()).backward()
        ddp.finish_grad_sync()
        optimizer.step()
        clamp(model, MAX_SCALE)
        kept = kept_tensor(optimizer, logit_scale)
        run["kept"].append(None if kept is None else kept.item())
        run["model"].append(logit_scale.item())
    return run


def main() -> None:
    out = parse_out_dir()
    initialize_distributed(ParallelConfig(), seed=1234)
    results = {}
    for name, distributed, clamp in (("distributed", True, clamp_logit_scale), ("mixed", False, clamp_logit_scale),
                                     ("parameter_only", True, clamp_parameter_only)):
        run = temperature_run("bf16", distributed, clamp)
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, run)
        results[name] = ranks
    save_rank0(results, out, "precision.pt")
    mark_done(out)


if __name__ == "__main__":
    main()
