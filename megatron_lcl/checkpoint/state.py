"""Checkpoints with megatron-core dist-checkpointing: atomic, keep-last-K, resumable at another TP/PP.

Layout of `run_dir/checkpoints/`::

    step_00000100/      one checkpoint: dist-checkpointing files + meta.json
    step_00000200/
    latest              text file naming the newest complete checkpoint ("step_00000200")

A checkpoint holds the model (`sharded_state_dict`, so it reshards on load to another TP/PP), the
optimizer (its sharded state, built from the model's), the LR scheduler, RNG states (per pipeline x
tensor rank), the data-loader state of every data-parallel rank and the training progress (step,
consumed samples/images/tokens, skipped-step count) in `meta.json`.

Atomicity: all ranks write into `step_N.tmp/`; after a barrier rank 0 renames it to `step_N/` and
only then rewrites `latest` (write-to-temp + `os.replace`). A crash at any point leaves `latest`
naming the previous complete checkpoint; stale `*.tmp` folders are removed on the next save.
"""

import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject

LATEST = "latest"
META = "meta.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def parallel_layout() -> dict:
    return {"tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
            "data_parallel_size": ps.get_data_parallel_world_size()}


# ------------------------------------------------------------------------------------------ state

def _rng_state() -> dict:
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model, optimizer, scheduler, loader, *, is_loading: bool, with_optimizer: bool = True,
                   with_rng: bool = True, with_data: bool = True,
                   optimizer_format: str = "fully_reshardable") -> dict:
    """The dict handed to dist_checkpointing (ShardedTensors/Objects are split; the rest goes to rank 0).

    `optimizer_format` only matters for the distributed optimizer: `fully_reshardable` (gathers each
    parameter's state on DP rank 0 while saving; loads at any TP/PP/DP) or `dp_reshardable` (cheaper
    to save; loads at the same TP/PP only). The non-distributed optimizer's state follows the model's
    sharding and always reshards.
    """
    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    dp = ps.get_data_parallel_rank()
    state = {"model": model.sharded_state_dict()}
    if with_optimizer and is_loading:
        _materialise_optimizer_state(optimizer)
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"], is_loading=is_loading, metadata={"distrib_optim_sharding_type": optimizer_format})
        state["scheduler"] = scheduler.state_dict()
    if with_rng:  # DP replicas share RNG streams (seeded by pipeline rank): one copy per (pp, tp)
        state["rng"] = ShardedObject(
            "rng_state", None if is_loading else _rng_state(),
            (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
            (pp, tp), replica_id=dp)
    if with_data and loader is not None:  # TP ranks and the last stage hold copies of stage 0's loader
        state["data"] = ShardedObject(
            "data_loader", None if is_loading else loader.state_dict(),
            (ps.get_data_parallel_world_size(),), (dp,), replica_id=(tp, pp))
    return state


def resolve_optimizer_format(name: str) -> str:
    """`auto` -> fully_reshardable where megatron-core can load it, else dp_reshardable.

    megatron-core 0.16 cannot load a fully_reshardable distributed-optimizer state into torch's AdamW
    (the optimizer used without Apex/Transformer Engine, e.g. on CPU): it trips over AdamW's `step`.
    """
    if name != "auto":
        return name
    from megatron.core.optimizer import distrib_optimizer

    return "fully_reshardable" if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", False) else "dp_reshardable"


def _uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def _materialise_optimizer_state(optimizer) -> None:
    """megatron-core (0.16) DistributedOptimizer.state_dict() reads Adam's `step`, which a fresh torch
    AdamW (no Apex/TE, e.g. on CPU) does not have yet: give it megatron-core's own dummy state, which
    the load then overwrites (the model weights are loaded after it)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """Fix up torch AdamW's per-parameter `step` after megatron-core (0.16) loaded a distributed
    optimizer without Apex/TE: it gives every parameter the SAME step tensor (AdamW increments it in
    place, once per parameter) and the sharded-state load then overwrites it with the template's
    value. The true step is in each param group (`group["step"]`): give every parameter its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            for p in group["params"]:
                state = inner.state.get(p, {})
                if "step" in group and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
                elif torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()


# ------------------------------------------------------------------------------------------ save

def save_checkpoint(root: str, step: int, model, optimizer, scheduler, loader, meta: dict,
                    keep_last: int, optimizer_format: str = "auto") -> str:
    """Save atomically as `root/step_N`, point `latest` at it, keep the newest `keep_last`."""
    optimizer_format = resolve_optimizer_format(optimizer_format)
    name = checkpoint_name(step)
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        _remove_stale_tmp(root)
        os.makedirs(tmp)
    dist.barrier()
    state = _sharded_state(model, optimizer, scheduler, loader, is_loading=False,
                           optimizer_format=optimizer_format)
    dist_checkpointing.save(state, tmp)
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        meta = dict(meta, step=step, parallel=parallel_layout(), optimizer_format=optimizer_format)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(final):  # saved again at the same step: the newer one wins
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_latest(root, name)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))


def _prune(root: str, keep_last: int) -> None:
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def _remove_stale_tmp(root: str) -> None:
    for d in os.listdir(root):
        if d.endswith(".tmp") and os.path.isdir(os.path.join(root, d)):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


# ------------------------------------------------------------------------------------------ load

def resolve_checkpoint(path: str) -> Optional[str]:
    """A checkpoint folder from `path`: a `checkpoints/` root (its `latest`) or one `step_*` folder.

    Returns None when `path` is a root with no complete checkpoint yet.
    """
    if os.path.exists(os.path.join(path, META)):
        return path
    latest = os.path.join(path, LATEST)
    if os.path.exists(latest):
        with open(latest) as f:
            name = f.read().strip()
        found = os.path.join(path, name)
        if not os.path.exists(os.path.join(found, META)):
            raise FileNotFoundError(f"{latest} names {name}, which is not a complete checkpoint")
        return found
    if os.path.isdir(path) or not os.path.exists(path):
        return None
    raise FileNotFoundError(f"{path} is neither a checkpoint (no {META}) nor a checkpoints folder")


def read_meta(ckpt: str) -> dict:
    with open(os.path.join(ckpt, META)) as f:
        return json.load(f)


def load_checkpoint(ckpt: str, model, optimizer, scheduler, loader, *, load_optimizer: bool = True,
                    load_data_state: bool = True, log=print) -> dict:
    """Load `ckpt` into this rank's model/optimizer/scheduler/loader; returns its meta.json.

    The model (and optimizer) reshard to the current TP/PP. RNG states are restored only at the
    same TP/PP and the data-loader state only at the same DP size (else a fresh stream, logged).
    """
    meta = read_meta(ckpt)
    if meta.get("weights_only"):  # written by save_model_checkpoint / convert_from_hf: model alone
        log(f"{ckpt} holds weights only: fresh optimizer, schedule, RNG and data stream")
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)
        model.load_state_dict(state["model"])
        return meta
    saved, now = meta["parallel"], parallel_layout()
    same_mp = all(saved[k] == now[k] for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size"))
    same_dp = saved["data_parallel_size"] == now["data_parallel_size"]
    if not same_mp:
        log(f"checkpoint {ckpt} was saved at {saved}; resharding to {now} (RNG states re-seeded)")
    fmt = meta["optimizer_format"]
    if load_optimizer and not same_mp and fmt == "dp_reshardable" and _uses_distributed_optimizer(optimizer):
        raise ValueError(
            f"{ckpt} holds a distributed-optimizer state in the dp_reshardable format, which loads only "
            f"at the TP/PP it was saved at ({saved}); set checkpoint.load_optimizer=false to load the "
            "model alone (fresh optimizer), or save with checkpoint.optimizer_format=fully_reshardable (GPU)")
    if load_data_state and not same_dp:
        log(f"data-parallel size changed ({saved['data_parallel_size']} -> {now['data_parallel_size']}): "
            "the data loader starts a fresh stream")
    state = _sharded_state(model, optimizer, scheduler, loader, is_loading=True,
                           with_optimizer=load_optimizer, with_rng=same_mp,
                           with_data=load_data_state and same_dp, optimizer_format=fmt)
    state = dist_checkpointing.load(state, ckpt)
    model.load_state_dict(state["model"])
    if load_optimizer:
        with torch.no_grad():  # the distributed optimizer copies into views of the (leaf) parameters
            optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer)
        scheduler.load_state_dict(state["scheduler"])
    if "rng" in state:
        _set_rng_state(state["rng"])
    if "data" in state and loader is not None:
        loader.load_state_dict(state["data"])
    return meta
