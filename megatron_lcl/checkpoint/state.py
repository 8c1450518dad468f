"""Training checkpoints with megatron-core dist-checkpointing: atomic, keep-last-K, resumable at another TP/PP.

Layout of `run_dir/checkpoints/` (names in `run_dir.py`)::

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

import os

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_lcl.checkpoint.run_dir import (checkpoint_name, prune, read_meta, remove_stale_tmp, save_atomically,
                                             write_latest)
from megatron_lcl.runtime import mcore_compat
from megatron_lcl.runtime.distributed import get_rng_state, set_rng_state
from megatron_lcl.runtime.layout import ParallelLayout


# ------------------------------------------------------------------------------------------ state

def _sharded_state(model, optimizer, scheduler, loader, layout: ParallelLayout, *, is_loading: bool,
                   with_optimizer: bool = True,
                   with_rng: bool = True, with_data: bool = True,
                   optimizer_format: str = "fully_reshardable") -> dict:
    """The dict handed to dist_checkpointing (ShardedTensors/Objects are split; the rest goes to rank 0).

    `optimizer_format` only matters for the distributed optimizer: `fully_reshardable` (gathers each
    parameter's state on DP rank 0 while saving; loads at any TP/PP/DP) or `dp_reshardable` (cheaper
    to save; loads at the same TP/PP only). The non-distributed optimizer's state follows the model's
    sharding and always reshards.
    """
    pp, tp, dp = layout.pp_rank, layout.tp_rank, layout.dp_rank
    state = {"model": model.sharded_state_dict()}
    if with_optimizer and is_loading:
        mcore_compat.materialise_optimizer_state(optimizer)
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"], is_loading=is_loading, metadata={"distrib_optim_sharding_type": optimizer_format})
        state["scheduler"] = scheduler.state_dict()
    if with_rng:  # DP replicas share RNG streams (seeded by pipeline rank): one copy per (pp, tp)
        state["rng"] = ShardedObject(
            "rng_state", None if is_loading else get_rng_state(),
            (layout.pp_size, layout.tp_size),
            (pp, tp), replica_id=dp)
    if with_data and loader is not None:  # TP ranks and the last stage hold copies of stage 0's loader
        state["data"] = ShardedObject(
            "data_loader", None if is_loading else loader.state_dict(),
            (layout.dp_size,), (dp,), replica_id=(tp, pp))
    return state


def _uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


# ------------------------------------------------------------------------------------------ save

def save_checkpoint(root: str, step: int, model, optimizer, scheduler, loader, meta: dict, keep_last: int,
                    layout: ParallelLayout, optimizer_format: str = "auto") -> str:
    """Save atomically as `root/step_N`, point `latest` at it, keep the newest `keep_last`."""
    optimizer_format = mcore_compat.resolve_optimizer_format(optimizer_format)
    name = checkpoint_name(step)
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        remove_stale_tmp(root)
    state = _sharded_state(model, optimizer, scheduler, loader, layout, is_loading=False,
                           optimizer_format=optimizer_format)
    final = save_atomically(os.path.join(root, name), state, lambda: dict(
        meta, step=step, parallel=layout.sizes(), optimizer_format=optimizer_format))
    if dist.get_rank() == 0:
        write_latest(root, name)
        prune(root, keep_last)
    dist.barrier()
    return final


# ------------------------------------------------------------------------------------------ load

def load_checkpoint(ckpt: str, model, optimizer, scheduler, loader, layout: ParallelLayout, *,
                    load_optimizer: bool = True, load_data_state: bool = True, log=print) -> dict:
    """Load `ckpt` into this rank's model/optimizer/scheduler/loader; returns its meta.json.

    The model (and optimizer) reshard to the current TP/PP. RNG states are restored only at the
    same TP/PP and the data-loader state only at the same DP size (else a fresh stream, logged).
    """
    meta = read_meta(ckpt)
    if meta.get("weights_only"):  # written by save_weights / convert_from_hf: model alone
        log(f"{ckpt} holds weights only: fresh optimizer, schedule, RNG and data stream")
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)
        model.load_state_dict(state["model"])
        return meta
    saved, now = meta["parallel"], layout.sizes()
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
    state = _sharded_state(model, optimizer, scheduler, loader, layout, is_loading=True,
                           with_optimizer=load_optimizer, with_rng=same_mp,
                           with_data=load_data_state and same_dp, optimizer_format=fmt)
    state = dist_checkpointing.load(state, ckpt)
    model.load_state_dict(state["model"])
    if load_optimizer:
        with torch.no_grad():  # the distributed optimizer copies into views of the (leaf) parameters
            optimizer.load_state_dict(state["optimizer"])
        mcore_compat.restore_adam_steps(optimizer)
        scheduler.load_state_dict(state["scheduler"])
    if "rng" in state:
        set_rng_state(state["rng"])
    if "data" in state and loader is not None:
        loader.load_state_dict(state["data"])
    return meta
