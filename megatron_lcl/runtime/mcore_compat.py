"""Adaptations to the megatron-core version this project pins (0.16.1), kept together so an upgrade
is one reviewable diff. Its siblings: `cpu.py` (the CPU adaptation, CUDA calls mapped to CPU) and
`megatron_lcl/known_warnings.py` (the warnings filtered before megatron-core is imported).

Each entry names the version it was written for and what to check when upgrading. `install()` applies
the process-wide ones; `runtime.distributed.initialize_distributed` calls it (and `cpu.enable_cpu_runtime`
without CUDA), so no other module patches megatron-core. The rest are functions the checkpoint code calls
on the objects they adapt.
"""

import functools
import queue
from contextlib import contextmanager

import torch
from megatron.core import optimizer as mcore_optimizers
from megatron.core import utils
from megatron.core.dist_checkpointing import serialization
from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.fusions import fused_layer_norm
from megatron.core.optimizer import clip_grads, distrib_optimizer
from megatron.core.optimizer import optimizer as mcore_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

MCORE_VERSION = "0.16.1"


def install() -> None:
    """The process-wide adaptations (idempotent): the foreach multi-tensor ops and the in-process
    checkpoint write-results queue below."""
    use_foreach_multi_tensor_ops()
    write_results_queue()


def apex_report() -> str:
    """One line for the run log: whether megatron-core found NVIDIA Apex, and what it takes from it.

    megatron-core 0.16.1 looks for Apex at its import: FusedLayerNorm (`fusions.fused_layer_norm`, the
    layer norm of its local layer specs) and, where Transformer Engine is absent, FusedAdam and the
    `amp_C` multi-tensor kernels (gradient norm and clipping, mixed-precision copies). See docs/gpu.md.
    """
    if not fused_layer_norm.HAVE_FUSED_LAYER_NORM:  # PyPI's unrelated `apex` has no fused layer norm
        return ("NVIDIA Apex: not found (megatron-core uses Transformer Engine's kernels where present, "
                "else its torch fallbacks; docs/gpu.md)")
    uses = ["fused layer norm"]
    if clip_grads.multi_tensor_applier.__module__.startswith("apex"):
        uses.append("multi-tensor l2norm/scale")
    if mcore_optimizers.Adam.__module__.startswith("apex"):
        uses.append("FusedAdam")
    return f"NVIDIA Apex: found ({', '.join(uses)})"


def resolve_optimizer_format(name: str) -> str:
    """`auto` -> fully_reshardable where megatron-core can load it, else dp_reshardable.

    megatron-core 0.16 cannot load a fully_reshardable distributed-optimizer state into torch's AdamW
    (the optimizer used without Apex/Transformer Engine, e.g. on CPU): it trips over AdamW's `step`.
    """
    if name != "auto":
        return name
    return "fully_reshardable" if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", False) else "dp_reshardable"


def chained_optimizers(optimizer) -> list:
    """The optimizers inside a megatron-core optimizer: a ChainedOptimizer's parts, else itself."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def materialise_optimizer_state(optimizer) -> None:
    """megatron-core 0.16: DistributedOptimizer.state_dict() reads Adam's `step`, which a fresh torch
    AdamW (no Apex/TE, e.g. on CPU) does not have yet: give it megatron-core's own dummy state (a
    private method in 0.16), which the load then overwrites (the model weights are loaded after it)."""
    for opt in chained_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def restore_adam_steps(optimizer) -> None:
    """megatron-core 0.16, distributed optimizer without Apex/TE: after a load every parameter shares
    the SAME `step` tensor (AdamW increments it in place, once per parameter) and the sharded-state
    load overwrites it with the template's value. The true step is in each param group
    (`group["step"]`): give every parameter its own copy."""
    for opt in chained_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            for p in group["params"]:
                state = inner.state.get(p, {})
                if "step" in group and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
                elif torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()


# megatron-core 0.16.1 without Transformer Engine or Apex (CPU, or a GPU node without them) falls back
# to `utils.local_multi_tensor_l2_norm` / `local_multi_tensor_scale` for gradient clipping and the
# mixed-precision copies: a Python loop over the tensors, and the norm turns every per-tensor norm into
# a Python float (on a GPU, one host sync per parameter, each step). These drop-ins compute the same
# values with torch's foreach ops (one host sync in all, where megatron-core reads the total norm).
# Upgrade check: the two modules still choose `l2_norm_impl` / `multi_tensor_scale_impl` at import.
def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for `amp_C.multi_tensor_l2norm` (per_tensor=False): `([norm of all tensors], None)`."""
    assert not per_tensor, "megatron-core 0.16.1 asks for the total norm only"
    norms = torch._foreach_norm(tensor_lists[0], 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for `amp_C.multi_tensor_scale`: dst = src * scale, for each pair."""
    src, dst = tensor_lists
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:  # the mixed-precision optimizer's fp32 main params -> bf16 model params, each step
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def use_foreach_multi_tensor_ops() -> None:
    """Where megatron-core fell back to its local multi-tensor ops, use the foreach ones above (idempotent)."""
    if clip_grads.multi_tensor_applier is utils.local_multi_tensor_applier:
        clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl = _foreach_l2_norm, _foreach_scale
    if mcore_optimizer.multi_tensor_applier is utils.local_multi_tensor_applier:
        mcore_optimizer.multi_tensor_scale_impl = _foreach_scale


# megatron-core 0.16.1 (dist_checkpointing/strategies/filesystem_async.py): its writer processes report
# through a queue of a `multiprocessing.Manager` it spawns at the first save (seconds, inside the save)
# and keeps for the life of the process. Here the write results come back to the rank itself
# (`checkpoint.writer`: written in the rank, or by its background writer and handed over), so the queue
# is a plain in-process one and no Manager is ever started. Upgrade check: the module still has
# `_results_queue`, read by `FileSystemWriterAsync.prepare_write_data` through `_get_write_results_queue`.
def write_results_queue() -> queue.Queue:
    """The queue megatron-core's finalize reads this rank's write results from (created once)."""
    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()
    return filesystem_async._results_queue


# megatron-core 0.16.1 (dist_checkpointing/serialization.py `save`): rank 0 alone writes three files
# between the save's collectives: `common.pt` (TorchCommonSaveStrategy.save_common, before the
# planning collectives), the index `.metadata` (FileSystemWriterAsync.finish, in
# save_state_dict_async_finalize before the broadcast of the write status) and `metadata.json`
# (save_config, before the closing barrier). A write error there (no space left) raises on rank 0
# only, and the other ranks wait in the next collective until the process group times out (~10 min).
# Upgrade check: `save` still writes these three on rank 0 only, by these names.
@contextmanager
def deferred_rank0_write_errors():
    """Inside, the three rank-0 writes of `dist_checkpointing.save` record their error instead of
    raising, so every rank runs the save's collectives to the end; the first error is raised on leaving
    (the caller agrees on it with the other ranks). Data files need nothing: their writers report
    errors through the save's own gather, and every rank raises."""
    errors = []

    def deferring(fn):
        @functools.wraps(fn)
        def write(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any write error, raised after the collectives
                errors.append(e)
        return write

    targets = [(TorchCommonSaveStrategy, "save_common"), (FileSystemWriterAsync, "finish"),
               (serialization, "save_config")]
    originals = [(owner, name, owner.__dict__[name]) for owner, name in targets]
    for owner, name, fn in originals:
        setattr(owner, name, deferring(fn))
    try:
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    if errors:
        raise errors[0]
