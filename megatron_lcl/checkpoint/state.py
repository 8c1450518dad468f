"""Training checkpoints with megatron-core dist-checkpointing: atomic, keep-last-K, resumable at another TP/PP.

Layout of `run_dir/checkpoints/` (names in `run_dir.py`)::

    step_00000100/      one checkpoint: dist-checkpointing files + meta.json
    step_00000200/
    latest              text file naming the newest complete checkpoint ("step_00000200")

A checkpoint holds the model (`sharded_state_dict`, so it reshards on load to another TP/PP), the
optimizer (its sharded state, built from the model's), the LR scheduler, RNG states (one per rank:
DP ranks draw different amounts, e.g. drop-path masks for different image counts), the data-loader
state of every data-parallel rank and the training progress (step,
consumed samples/images/tokens, skipped-step count) in `meta.json`.

Atomicity: all ranks write into `step_N.tmp/`; once every rank's files are written (in the rank, or
by its background writer: `CheckpointSaver`), rank 0 renames it to `step_N/` and only then rewrites
`latest` (write-to-temp + `os.replace`). A crash at any point leaves `latest` naming the previous
complete checkpoint; stale `*.tmp` folders are removed on the next save.
"""

import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_lcl.checkpoint.run_dir import (CheckpointError, agree_on_error, begin_atomic_save,
                                             check_checkpoint_files, checkpoint_name, complete_checkpoints,
                                             finish_atomic_save, prune, quarantine, read_meta, remove_stale_tmp,
                                             removing_tmp_on_failure, save_atomically, write_and_finish_atomic_save,
                                             write_latest)
from megatron_lcl.checkpoint.writer import (StagingArea, StagingUnavailable, WriterDied, background_writer, host_copies,
                                            request_buckets, write_staged_now)
from megatron_lcl.runtime import mcore_compat
from megatron_lcl.runtime.device import device
from megatron_lcl.runtime.distributed import get_rng_state, rng_device, rng_state_fits, set_rng_state
from megatron_lcl.runtime.layout import ParallelLayout
from megatron_lcl.runtime.mcore_compat import write_results_queue

RNG_KEY = "rng_state_per_rank"  # checkpoints before it kept "rng_state" per (pp, tp): re-seeded on load


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
    if with_rng:  # one per rank: DP replicas start from one seed but draw different amounts
        state["rng"] = ShardedObject(
            RNG_KEY, None if is_loading else get_rng_state(),
            (layout.pp_size, layout.tp_size, layout.dp_size),
            (pp, tp, dp), replica_id=0)
    if with_data and loader is not None:  # TP ranks and the last stage hold copies of stage 0's loader
        state["data"] = ShardedObject(
            "data_loader", None if is_loading else loader.state_dict(),
            (layout.dp_size,), (dp,), replica_id=(tp, pp))
    return state


def _uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in mcore_compat.chained_optimizers(optimizer))


# ------------------------------------------------------------------------------------------ save

class CheckpointSaver:
    """Saves training checkpoints as `root/step_N` (atomic, `latest`, keep the newest `keep_last`),
    synchronously or in the background.

    A background save (`asynchronous`) plans the save with every rank, copies this rank's tensors
    into host staging buffers and hands them to the rank's writer process (`checkpoint.writer`,
    started here, at set-up); training goes on. Once every rank's writer is done, `finish` (all
    ranks) runs megatron-core's finalize, renames the folder and moves `latest`: a checkpoint is
    complete only when all ranks wrote their files and agreed. At most one save is in flight: the
    next save, `wait` and a blocking save finish it first. A rank killed meanwhile leaves `NAME.tmp/`
    (removed by the next save) and `latest` at the previous checkpoint.

    A writer process that dies does not end the run: found dead at a save, it is replaced (and when no
    new one starts, every rank writes that save and the later ones at once); dead during its write,
    the rank writes the files itself from the staged copies. Either way the rank makes the same
    collective calls as the others, and rank 0 logs one line naming the rank.
    """

    def __init__(self, root: str, keep_last: int, layout: ParallelLayout, optimizer_format: str = "auto",
                 asynchronous: bool = False, log=print):
        self.root, self.keep_last, self.layout, self.log = root, keep_last, layout, log
        self.optimizer_format = mcore_compat.resolve_optimizer_format(optimizer_format)
        self.writer = background_writer() if asynchronous else None
        self._staging = StagingArea(host_copies(device().type)) if asynchronous else None
        self._pending: Optional[tuple] = None  # (AtomicSave, name, Staged or None) written in the background

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def writing(self) -> bool:
        """Whether this rank's background write is still going (local: the trainer sums it over ranks)."""
        return self._pending is not None and self.writer.busy()

    def save(self, step: int, model, optimizer, scheduler, loader, meta: dict, blocking: bool = True) -> Optional[str]:
        """Save step `step` (all ranks). Blocking (or without a writer): written and complete on return,
        its path returned. Otherwise the files are written in the background and None is returned;
        `finish` completes it. A save in flight is finished first."""
        self.finish()
        name = checkpoint_name(step)
        agree_on_error(lambda: dist.get_rank() == 0 and _prepare_root(self.root), f"saving {self.root}/{name}")
        state = _sharded_state(model, optimizer, scheduler, loader, self.layout, is_loading=False,
                               optimizer_format=self.optimizer_format)
        meta = dict(meta, step=step, parallel=self.layout.sizes(), optimizer_format=self.optimizer_format, rng=RNG_KEY,
                    rng_device=rng_device())
        final = os.path.join(self.root, name)
        if blocking or self.writer is None:
            self._complete(save_atomically(final, state, meta), name)
            return final
        save = begin_atomic_save(final, state, meta)
        staged, why = self._stage(request_buckets(save.request))
        if why is not None:  # on some rank: every rank writes this save, and the later ones, at once
            self.log(f"checkpoint.async_save: {why}; this save and the later ones are written at once")
            self.writer = None
            return self._complete(write_and_finish_atomic_save(save), name)
        if staged is not None:
            self.writer.submit(staged)
        self._pending = (save, name, staged)
        return None

    def _stage(self, buckets: Optional[list]) -> tuple:
        """(this rank's staged buckets, None), or (None, why) on every rank when some rank cannot save in
        the background: its copies do not fit in its shared memory, or its writer had died and no new
        one starts (the first such rank's reason). A writer found dead is replaced first; the notices
        travel with the reasons, so rank 0 says what happened on any rank."""
        notice, why = self._replace_dead_writer()
        staged = None
        if why is None and buckets is not None:
            try:
                staged = self._staging.stage(buckets)
            except StagingUnavailable as e:
                why = f"rank {dist.get_rank()}: {e}"
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (notice, why))
        for other_notice, _ in gathered:
            if other_notice is not None:
                self.log(other_notice)
        why = next((w for _, w in gathered if w is not None), None)
        return (None, why) if why is not None else (staged, None)

    def _replace_dead_writer(self) -> tuple:
        """(notice, None) when this rank's writer has ended since its last save (killed: the OOM killer
        may pick it, as it maps the staging buffers) and a new one is started; (None, None) while it is
        alive; (None, why) when no new one starts."""
        if self.writer.process.is_alive():
            return None, None
        ended = f"rank {dist.get_rank()}: {self.writer.ended('while idle')}"
        try:
            self.writer = background_writer()
        except Exception as e:  # noqa: BLE001 - every rank then writes at once, said with the reason
            return None, f"{ended}, and a new one did not start ({type(e).__name__}: {e})"
        return f"{ended}; a new one (pid {self.writer.process.pid}) writes this save", None

    def finish(self) -> Optional[str]:
        """All ranks: complete the save in flight (each rank waits for its writer; without waiting once
        no rank is `writing()`); its path, None when there was none. A write that failed on any rank
        raises CheckpointError on every rank."""
        if self._pending is None:
            return None
        save, name, staged = self._pending
        self._pending = None
        notice = []

        def handover():  # this rank's write results, to where megatron-core's finalize reads them
            if staged is not None:
                write_results_queue().put(self._write_results(staged, notice))

        removing_tmp_on_failure(save.tmp, lambda: agree_on_error(handover, f"saving {save.final}"))
        self._say_on_rank0(notice[0] if notice else None)
        return self._complete(finish_atomic_save(save), name)

    def _write_results(self, staged, notice: list):
        """The writer's results for `staged`; when it died during the write, the files written at once
        from the staged copies (still in this rank's shared memory) and a new writer started for the next
        save, said in `notice`. The rank's collectives are the same either way: the ranks stay in step."""
        try:
            return self.writer.result()
        except WriterDied as e:
            died = f"rank {dist.get_rank()}: {e}"
        results = write_staged_now(staged)
        try:
            self.writer = background_writer()
            then = f"a new writer (pid {self.writer.process.pid}) takes the next save"
        except Exception as e:  # noqa: BLE001 - the next save tries again (and is written at once if it fails)
            then = f"no new writer started ({type(e).__name__}: {e})"
        notice.append(f"{died}: its files were written at once from the staged copies; {then}")
        return results

    def _say_on_rank0(self, notice: Optional[str]) -> None:
        """All ranks: log every rank's `notice` (self.log prints on rank 0)."""
        notices = [None] * dist.get_world_size()
        dist.all_gather_object(notices, notice)
        for n in notices:
            if n is not None:
                self.log(n)

    def _complete(self, final: str, name: str) -> str:
        try:
            agree_on_error(lambda: dist.get_rank() == 0 and write_latest(self.root, name),
                           f"pointing {self.root}/latest at {name}")
        except CheckpointError:  # `latest` still names the previous checkpoint: the new one leaves no trace
            if dist.get_rank() == 0:
                shutil.rmtree(final, ignore_errors=True)
            raise
        if dist.get_rank() == 0:
            prune(self.root, self.keep_last)
        return final


def save_checkpoint(root: str, step: int, model, optimizer, scheduler, loader, meta: dict, keep_last: int,
                    layout: ParallelLayout, optimizer_format: str = "auto") -> str:
    """Save atomically as `root/step_N` now, point `latest` at it, keep the newest `keep_last`."""
    return CheckpointSaver(root, keep_last, layout, optimizer_format).save(step, model, optimizer, scheduler,
                                                                         loader, meta)


def _prepare_root(root: str) -> None:
    os.makedirs(root, exist_ok=True)
    remove_stale_tmp(root)


# ------------------------------------------------------------------------------------------ load

def load_newest_loadable(found: str, model, optimizer, scheduler, loader, layout: ParallelLayout, *,
                         fall_back: bool, own_root: bool, log=print, check_meta=None, **load_kwargs) -> tuple:
    """Load `found`, or, when its files are unreadable or truncated and `fall_back`, the newest older
    complete checkpoint beside it whose files are intact. Returns (checkpoint loaded, its meta.json).

    Every rank checks the files and the ranks agree (one may see a bad file the others do not). A
    skipped checkpoint is logged once with the file and the reason; in the run's own checkpoints
    folder (`own_root`) it is renamed `NAME.broken` (kept, never pruned, never counted as complete)
    and `latest` is pointed at the checkpoint loaded. Errors of the load itself (e.g. a config that
    does not match the checkpoint) are not the checkpoint's fault: they raise, nothing is renamed.
    `check_meta(path, meta)` runs on every rank before a checkpoint is loaded (its errors raise as they are).
    """
    root, rank0 = os.path.dirname(found), dist.get_rank() == 0
    older = [c for c in reversed(complete_checkpoints(root)) if os.path.basename(c) < os.path.basename(found)]
    candidates = [found] + (older if fall_back else [])
    for i, candidate in enumerate(candidates):
        try:
            agree_on_error(lambda: check_checkpoint_files(candidate), f"checking {candidate}")
        except CheckpointError as e:
            if not fall_back:
                raise
            renamed = agree_on_error(lambda: quarantine(candidate) if rank0 and own_root else None,
                                     f"renaming {candidate}")
            kept = _from_rank0(renamed)
            nxt = os.path.basename(candidates[i + 1]) if i + 1 < len(candidates) else "none left"
            log(f"skipped checkpoint {candidate}: {e.reason}; "
                + (f"renamed to {os.path.basename(kept)}" if kept else "left in place") + f"; next: {nxt}")
            continue
        if check_meta is not None:  # the same files and config on every rank: the same outcome
            check_meta(candidate, read_meta(candidate))
        meta = agree_on_error(lambda: load_checkpoint(candidate, model, optimizer, scheduler, loader, layout,
                                                      log=log, **load_kwargs), f"loading {candidate}")
        if candidate != found and own_root:
            agree_on_error(lambda: rank0 and write_latest(root, os.path.basename(candidate)),
                           f"pointing {root}/latest at {candidate}")
        return candidate, meta
    raise CheckpointError(f"no checkpoint in {root} could be loaded (each skipped one is named above); "
                          "set checkpoint.auto_resume=false to start afresh")


def _from_rank0(obj):
    objs = [obj]
    dist.broadcast_object_list(objs, src=0)
    return objs[0]


def load_checkpoint(ckpt: str, model, optimizer, scheduler, loader, layout: ParallelLayout, *,
                    load_optimizer: bool = True, load_data_state: bool = True, log=print) -> dict:
    """Load `ckpt` into this rank's model/optimizer/scheduler/loader; returns its meta.json.

    The model (and optimizer) reshard to the current TP/PP/DP. RNG states are restored only at the
    same TP/PP/DP and on the same device type (each rank its own; otherwise the ranks keep their fresh
    seeds, logged: a CPU generator's state does not fit a CUDA generator, nor the reverse). The
    data-loader state is per logical reader: at the same DP size each rank loads its own, at another
    every rank reads all old ranks' states and takes the readers it now runs (`loader.merge_states`),
    so the data continues exactly. A distributed-optimizer state in the dp_reshardable format loads
    at another DP size but not at another TP/PP (a clear error).
    """
    mcore_compat.check_loadable(ckpt)
    meta = read_meta(ckpt)
    if meta.get("weights_only"):  # written by save_weights / convert_from_hf: model alone
        log(f"{ckpt} holds weights only: fresh optimizer, schedule, RNG and data stream")
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)
        model.load_state_dict(state["model"])
        return meta
    saved, now = meta["parallel"], layout.sizes()
    same_mp = all(saved[k] == now[k] for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size"))
    same_dp = saved["data_parallel_size"] == now["data_parallel_size"]
    same_rng = same_mp and same_dp and meta.get("rng") == RNG_KEY
    if not same_mp or not same_dp:
        log(f"checkpoint {ckpt} was saved at {saved}; resharding to {now} (RNG states re-seeded)")
    elif not same_rng:
        log(f"checkpoint {ckpt} holds no per-rank RNG states (an older format): RNG states re-seeded")
    elif meta.get("rng_device", rng_device()) != rng_device():
        log(f"checkpoint {ckpt} holds the RNG states of {meta['rng_device']} generators and this run draws on "
            f"{rng_device()}: RNG states re-seeded")
        same_rng = False
    fmt = meta["optimizer_format"]
    if load_optimizer and not same_mp and fmt == "dp_reshardable" and _uses_distributed_optimizer(optimizer):
        raise ValueError(
            f"{ckpt} holds a distributed-optimizer state in the dp_reshardable format, which loads only "
            f"at the TP/PP it was saved at ({saved}); set checkpoint.load_optimizer=false to load the "
            "model alone (fresh optimizer), or save with checkpoint.optimizer_format=fully_reshardable (GPU)")
    state = _sharded_state(model, optimizer, scheduler, loader, layout, is_loading=True,
                           with_optimizer=load_optimizer, with_rng=same_rng,
                           with_data=load_data_state and same_dp, optimizer_format=fmt)
    if load_data_state and not same_dp and loader is not None:  # every old DP rank's loader state
        log(f"data-parallel size changed ({saved['data_parallel_size']} -> {now['data_parallel_size']}): "
            "the data loaders continue exactly where the old ranks' readers stopped")
        old_dp = saved["data_parallel_size"]
        # Every rank reads every old loader state; one of them (rank (0, 0, 0)) is the main replica.
        here = (layout.tp_rank, layout.pp_rank, layout.dp_rank)
        state["data_old"] = {str(i): ShardedObject("data_loader", None, (old_dp,), (i,), replica_id=here)
                             for i in range(old_dp)}
    state = dist_checkpointing.load(state, ckpt)
    model.load_state_dict(state["model"])
    if load_optimizer:
        with torch.no_grad():  # the distributed optimizer copies into views of the (leaf) parameters
            optimizer.load_state_dict(state["optimizer"])
        mcore_compat.restore_adam_steps(optimizer)
        scheduler.load_state_dict(state["scheduler"])
    if "rng" in state and rng_state_fits(state["rng"]):
        set_rng_state(state["rng"])
    elif "rng" in state:  # saved before checkpoints recorded `rng_device`, on the other device
        log(f"checkpoint {ckpt} holds RNG states of another device's generators (their sizes differ from "
            f"this run's on {rng_device()}): RNG states re-seeded")
    saved_data = [state["data"]] if "data" in state else [state["data_old"][str(i)] for i in
                                                          range(len(state.get("data_old", {})))]
    try:
        if saved_data and loader is not None:
            from megatron_lcl.data.loader import merge_states

            loader.load_state_dict(saved_data[0] if "data" in state else merge_states(saved_data))
    except (ValueError, KeyError) as e:
        raise ValueError(_data_state_mismatch(e, saved_data, loader)) from None
    return meta


def _data_state_mismatch(error: Exception, saved_states: list, loader) -> str:
    """One line: which shards of the saved data position are missing now (or the loader's own reason),
    and how to go on without that position."""
    try:
        saved = {s for state in saved_states for s in state["config"]["shards"]}
        now = set(loader.cfg.fingerprint()["shards"])
    except (KeyError, TypeError, AttributeError):
        saved = now = set()
    missing, added = sorted(saved - now), sorted(now - saved)
    if missing or added:
        reason = "; ".join(f"{what}: {_some(names)}" for what, names in
                           (("shard(s) of the saved position missing now", missing), ("new shard(s)", added)) if names)
    else:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
    return (f"the checkpoint's data-loader position does not fit this data ({reason}); "
            "checkpoint.load_data_state=false continues without it (the loaders start a fresh stream)")


def _some(names: list, shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
