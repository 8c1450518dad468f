"""Adaptations to the megatron-core versions this project supports (0.16.1, the Python 3.11 pin, and
0.19.2, what Python 3.12 resolves), kept together so an upgrade is one reviewable diff. Its siblings:
`cpu.py` (the CPU adaptation, CUDA calls mapped to CPU) and `megatron_lcl/known_warnings.py` (the
warnings filtered before megatron-core is imported).

Each entry names the version it was written for and what to check when upgrading; where versions
differ, the switch is on `MCORE_VERSION` (the versions between, 0.17 and 0.18, were read from their
wheels, not run). `install()` applies the process-wide ones; `runtime.distributed.initialize_distributed`
calls it (and `cpu.enable_cpu_runtime` without CUDA), so no other module patches megatron-core. The
rest are functions the checkpoint code calls on the objects they adapt.
"""

import functools
import queue
from contextlib import contextmanager

import torch
from megatron.core import dist_checkpointing
from megatron.core import optimizer as mcore_optimizers
from megatron.core import utils
from megatron.core.dist_checkpointing import serialization
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.fusions import fused_layer_norm
from megatron.core.optimizer import clip_grads, distrib_optimizer
from megatron.core.optimizer import optimizer as mcore_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.package_info import __version__ as _mcore_version
from megatron.core.transformer.spec_utils import ModuleSpec
from packaging.version import Version

MCORE_VERSION = Version(_mcore_version)
TESTED_VERSIONS = ("0.16.1", "0.19.2")  # the CPU suite runs on both (README "Upgrading megatron-core")
# 0.17 moved dist-checkpointing's async save to NVIDIA's resiliency extension by default (see
# `plan_async_save`) and the write of `common.pt` from `TorchCommonSaveStrategy` to a function; 0.18
# calls a layer's submodules directly (see `submodule`); 0.19 writes the common state into rank 0's
# data file instead of `common.pt` (see `RANK0_FILES`).
_MCORE_0_17 = MCORE_VERSION >= Version("0.17")
_MCORE_0_18 = MCORE_VERSION >= Version("0.18")
_MCORE_0_19 = MCORE_VERSION >= Version("0.19")


def install() -> None:
    """The process-wide adaptations (idempotent): the foreach multi-tensor ops, the in-process
    checkpoint write-results queue and the async-save strategy's deprecation line below."""
    use_foreach_multi_tensor_ops()
    write_results_queue()
    quiet_async_strategy_deprecation()


# megatron-core 0.18+ (transformer/attention.py, mlp.py, transformer_layer.py): a layer builds its
# linears, norms and MLP by calling what the spec holds (`submodules.linear_proj(in, out, config=...)`),
# where 0.16.1 passed each through `build_module`, which also takes a `ModuleSpec(module, params)`.
# A layer spec's `mlp` is then a builder, `functools.partial(MLP.as_mlp_submodule,
# submodules=MLPSubmodules(...))`, where 0.16.1 has `ModuleSpec(module=MLP, submodules=...)`.
# Upgrade check: `get_gpt_layer_local_spec().submodules.mlp` still has this form.
def submodule(module: type, **params):
    """A layer's submodule `module` built with the extra keyword arguments `params`, in the form this
    megatron-core builds it from: a callable (0.18+) or a ModuleSpec (0.16.1)."""
    return functools.partial(module, **params) if _MCORE_0_18 else ModuleSpec(module=module, params=params)


def mlp_submodules(layer_spec: ModuleSpec):
    """The `MLPSubmodules` (linear_fc1, linear_fc2) of a dense layer spec, to read or replace in place."""
    mlp = layer_spec.submodules.mlp
    return mlp.keywords["submodules"] if _MCORE_0_18 else mlp.submodules


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
# 0.17 and 0.18: `common.pt` is written by the function `save_common`, which `serialization` imports.
# 0.19: no `common.pt`; the common state is a ShardedObject in rank 0's data file (its errors come back
# through the save's own gather, as every data file's do).
# Upgrade check: `save` still writes these files on rank 0 only, by these names.
if _MCORE_0_19:
    RANK0_FILES = (".metadata", "metadata.json")
    _RANK0_WRITES = ((FileSystemWriterAsync, "finish"), (serialization, "save_config"))
elif _MCORE_0_17:
    RANK0_FILES = ("common.pt", ".metadata", "metadata.json")
    _RANK0_WRITES = ((serialization, "save_common"), (FileSystemWriterAsync, "finish"),
                     (serialization, "save_config"))
else:
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy

    RANK0_FILES = ("common.pt", ".metadata", "metadata.json")
    _RANK0_WRITES = ((TorchCommonSaveStrategy, "save_common"), (FileSystemWriterAsync, "finish"),
                     (serialization, "save_config"))


@contextmanager
def deferred_rank0_write_errors():
    """Inside, the rank-0 writes of `dist_checkpointing.save` (`RANK0_FILES`) record their error instead
    of raising, so every rank runs the save's collectives to the end; the first error is raised on
    leaving (the caller agrees on it with the other ranks). Data files need nothing: their writers
    report errors through the save's own gather, and every rank raises."""
    errors = []

    def deferring(fn):
        @functools.wraps(fn)
        def write(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any write error, raised after the collectives
                errors.append(e)
        return write

    originals = [(owner, name, vars(owner)[name]) for owner, name in _RANK0_WRITES]
    for owner, name, fn in originals:
        setattr(owner, name, deferring(fn))
    try:
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    if errors:
        raise errors[0]


def common_state_in_common_pt(index) -> bool:
    """Whether the checkpoint whose dist-checkpointing index (`.metadata`, torch's Metadata) is `index`
    keeps its common state in `common.pt` (written by megatron-core < 0.19) rather than in rank 0's data
    file (0.19: the ShardedObject `common_state`). 0.19 loads both; 0.16.1 only the first."""
    return not any(key.startswith("common_state/") for key in index.state_dict_metadata)


def check_loadable(ckpt: str) -> None:
    """Raise ValueError (one line, naming both versions) when this megatron-core cannot read `ckpt`:
    before 0.19 it cannot load a checkpoint 0.19 wrote (it looks for `common.pt` only)."""
    if _MCORE_0_19:
        return
    from torch.distributed.checkpoint import FileSystemReader

    if not common_state_in_common_pt(FileSystemReader(ckpt).read_metadata()):
        raise ValueError(f"{ckpt} was written by megatron-core >= 0.19 and cannot be loaded by megatron-core "
                         f"{MCORE_VERSION}: install megatron-core>=0.19 (Python >= 3.12)")


# megatron-core 0.17+: `dist_checkpointing.save(..., async_sharded_save=True)` plans the save for
# NVIDIA's resiliency extension (`async_strategy="nvrx"`, a package this project does not install) and
# fails without it; megatron-core's own strategy ("mcore", 0.16.1's only one) hands back the
# AsyncRequest whose write buckets `checkpoint.writer` writes. 0.18+ logs on every rank's first save
# that "mcore" is deprecated; known, so `install` marks it as said (as KNOWN_WARNINGS does for warnings).
# Upgrade check: "mcore" is still accepted, and its request still has `async_fn_args[1]` = the buckets.
_ASYNC_SAVE_KWARGS = {"async_strategy": "mcore"} if _MCORE_0_17 else {}


def quiet_async_strategy_deprecation() -> None:
    """megatron-core 0.18+: its once-per-process log line that the "mcore" async save is deprecated."""
    if _MCORE_0_18:
        from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

        torch_strategy._logged_mcore_async_deprecation = True


def plan_async_save(state: dict, checkpoint_dir: str):
    """All ranks: megatron-core's plan of a save of `state` into `checkpoint_dir` (an AsyncRequest whose
    data files are still to be written; rank 0 may write `common.pt` now, see `RANK0_FILES`)."""
    return dist_checkpointing.save(state, checkpoint_dir, async_sharded_save=True, **_ASYNC_SAVE_KWARGS)
