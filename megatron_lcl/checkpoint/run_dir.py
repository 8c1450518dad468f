"""What a run directory holds, and the one place its file names are spelled:

    RUN_DIR/
      config.yaml        the resolved config (every field)          megatron_lcl.config.save_config
      launches.jsonl     one row per launch (start step, world, git commit)
      metrics.jsonl      one JSON object per logged step             read_metrics()
      tensorboard/       the same scalars for TensorBoard
      checkpoints/       step_00000100/ ... and `latest`             megatron_lcl.checkpoint
      tokenizer.model    the run's sentencepiece model (a copy)      keep_tokenizer(), checkpoint_tokenizer()
      run.lock           held (flock) by the launch that runs here   lock_run_dir()

A checkpoint folder holds dist-checkpointing files and `meta.json` (step, parallel layout, config,
train state); `latest` names the newest complete one. Writes are atomic: into `NAME.tmp/`, then
renamed (`save_atomically`), so a crash never leaves a half-written checkpoint under its final name.
A failure on any rank (e.g. no space left on the device) fails the save on every rank with one
message (`agree_on_error`), and the partial `NAME.tmp/` is removed. A checkpoint whose files turn
out unreadable or truncated at load (`check_checkpoint_files`) is renamed `NAME.broken/`: kept for
inspection, never counted as complete, never pruned.

One launch at a time: rank 0 holds an exclusive `flock` on `run.lock` for the life of the run
(`lock_run_dir`); the kernel releases it when the process ends, however it ends (a SIGKILLed job never
blocks its requeue). A second launch on the directory gets `RunDirInUse` naming the holder (host, pid,
slurm job), which `run.lock` records. flock works across the nodes of NFS (v4) and Lustre mounted with
`-o flock`; on a file system without it, the lock holds per node only.
"""

import fcntl
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from typing import Callable, List, NamedTuple, Optional

CONFIG = "config.yaml"
LAUNCHES = "launches.jsonl"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
LOCK = "run.lock"
TOKENIZER = "tokenizer.model"
TMP_SUFFIX = ".tmp"
BROKEN_SUFFIX = ".broken"
_STEP_DIR = re.compile(r"step_\d+$")  # not step_N.tmp (partial) or step_N.broken (failed to load)


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; raised on every rank with the same message.
    `reason`: the first failing rank's error alone."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class RunDirInUse(RuntimeError):
    """Another launch holds the run directory's lock (the message names the directory and the holder)."""


def run_dir_write_error(run_dir: str) -> Optional[str]:
    """Why this process cannot create files in `run_dir` (and its checkpoints/), else None. Creates
    `run_dir` when missing; checks by creating and removing a file (permission bits say nothing
    about read-only mounts, and nothing at all to root)."""
    for folder in (run_dir, checkpoints_dir(run_dir)):
        try:
            if folder == run_dir:
                os.makedirs(folder, exist_ok=True)
            elif not os.path.isdir(folder):
                continue
            with tempfile.TemporaryFile(dir=folder, prefix=".write-test-"):
                pass
        except OSError as e:
            return f"run_dir {run_dir}: cannot write in {folder} ({e.strerror or e})"
    return None


_held_locks = set()  # file descriptors of the run-directory locks this process holds


def _close_held_locks_in_child() -> None:
    """In a forked child (DataLoader worker, checkpoint writer): close the inherited lock descriptors,
    so an orphaned child never keeps a dead run's lock (closing does not unlock: the parent's remains)."""
    for fd in _held_locks:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_locks.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


def lock_run_dir(run_dir: str) -> int:
    """Take the exclusive lock of `run_dir` for this process (until `unlock_run_dir` or exit) and
    record the holder in it; raise RunDirInUse naming the holder when another process has it.
    Returns the lock's file descriptor."""
    os.makedirs(run_dir, exist_ok=True)
    fd = os.open(run_path(run_dir, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "holder unknown"
        os.close(fd)
        raise RunDirInUse(f"run directory {run_dir} is in use by another launch ({holder}); wait for it to "
                          f"end or stop it, or give this run another run_dir") from None
    job = os.environ.get("SLURM_JOB_ID")
    holder = (f"host {socket.gethostname()}, pid {os.getpid()}, slurm job {job or 'none'}, since "
              f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder + "\n").encode(), 0)
    _held_locks.add(fd)
    return fd


def unlock_run_dir(fd: int) -> None:
    _held_locks.discard(fd)
    os.close(fd)  # releases the flock


def run_path(run_dir: str, name: str) -> str:
    """`run_path(run_dir, METRICS)` etc."""
    return os.path.join(run_dir, name)


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def read_metrics(run_dir: str, missing_ok: bool = False) -> List[dict]:
    """The rows of `run_dir/metrics.jsonl` (one per logged step), oldest first; with `missing_ok`,
    [] for a run that has not logged yet."""
    path = run_path(run_dir, METRICS)
    if missing_ok and not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def complete_checkpoints(root: str) -> List[str]:
    """The complete `step_*` checkpoints under `root` (those with meta.json), oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(d for d in os.listdir(root) if _STEP_DIR.match(d))
    return [os.path.join(root, d) for d in names if os.path.exists(os.path.join(root, d, META))]


def resolve_checkpoint(path: str, log=None) -> Optional[str]:
    """A checkpoint folder from `path`: a run directory, a `checkpoints/` root (its `latest`) or one
    `step_*` folder. Returns None when `path` holds no complete checkpoint yet. When `latest` names a
    folder that is missing or incomplete, the newest complete checkpoint is used and `log` told why."""
    if os.path.exists(os.path.join(path, META)):
        return path
    if os.path.isdir(checkpoints_dir(path)) and not os.path.exists(os.path.join(path, LATEST)):
        path = checkpoints_dir(path)  # a run directory
    latest = os.path.join(path, LATEST)
    if os.path.exists(latest):
        with open(latest) as f:
            name = f.read().strip()
        found = os.path.join(path, name)
        if os.path.exists(os.path.join(found, META)):
            return found
        fallback = complete_checkpoints(path)
        if not fallback:
            raise FileNotFoundError(f"{latest} names {name!r}, which is not a complete checkpoint, and "
                                    f"{path} holds no other complete checkpoint")
        if log is not None:
            log(f"{latest} names {name!r}, which is missing or incomplete: skipped; using the newest "
                f"complete checkpoint, {os.path.basename(fallback[-1])}")
        return fallback[-1]
    if os.path.isdir(path) or not os.path.exists(path):
        return None
    raise FileNotFoundError(f"{path} is neither a checkpoint (no {META}) nor a checkpoints folder")


def checkpoint_for_flag(flag: str, path: str,
                        none: str = "no complete checkpoint there (a run directory, its checkpoints/ or one "
                                    "step_* folder)") -> str:
    """`resolve_checkpoint` for a command's `flag` (e.g. --load): the checkpoint folder, or a
    FileNotFoundError whose one-line message names the flag, the path and why there is none (`none`
    when the path holds no checkpoint at all)."""
    try:
        found = resolve_checkpoint(path)
    except FileNotFoundError as e:  # `latest` names an incomplete checkpoint and there is no other
        raise FileNotFoundError(f"{flag} {path}: {e}") from None
    if found is None:
        raise FileNotFoundError(f"{flag} {path}: {none}")
    return found


def keep_tokenizer(run_dir: str, tokenizer: str) -> str:
    """Copy the run's sentencepiece model to `RUN_DIR/tokenizer.model` (atomically; left as it is when
    it holds the same bytes) and return the copy's absolute path, which the run then reads and records
    as `data.tokenizer`: export, eval and resume read it there (`checkpoint_tokenizer`), wherever the
    data folder has gone. A different tokenizer already kept there raises ValueError naming both (the
    run's checkpoints hold that one's token ids)."""
    kept = os.path.abspath(run_path(run_dir, TOKENIZER))
    with open(tokenizer, "rb") as f:
        wanted = f.read()
    if os.path.exists(kept):
        with open(kept, "rb") as f:
            if f.read() == wanted:
                return kept
        raise ValueError(f"data.tokenizer ({tokenizer}) is not the tokenizer this run was trained with ({kept}): "
                         f"its checkpoints hold that one's token ids; give data.tokenizer={kept}, or another run_dir")
    os.makedirs(run_dir, exist_ok=True)
    tmp = kept + TMP_SUFFIX
    with open(tmp, "wb") as f:
        f.write(wanted)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, kept)
    return kept


def absolute_paths(paths):
    """`data.path` (one path or a list) with its paths made absolute, a blend's weights left as they are:
    what config.yaml and meta.json record, so a rerun or a tool works from any folder."""
    from megatron_lcl.config.run import path_weight

    if paths is None:
        return None
    if isinstance(paths, (str, os.PathLike)):
        return os.path.abspath(paths)
    return [p if path_weight(p) is not None else os.path.abspath(p) for p in paths]


def checkpoint_tokenizer(ckpt: str, recorded: Optional[str]) -> Optional[str]:
    """The sentencepiece model checkpoint `ckpt` was trained with: its run directory's copy
    (`tokenizer.model` beside the `checkpoints/` folder holding `ckpt`, wherever the run directory is
    now), else the recorded `data.tokenizer` where that file exists (absolute since runs keep their
    tokenizer; runs before that recorded it as given, relative to where training ran). None otherwise."""
    root = os.path.dirname(os.path.abspath(ckpt))
    if os.path.basename(root) == CHECKPOINTS:
        kept = run_path(os.path.dirname(root), TOKENIZER)
        if os.path.isfile(kept):
            return kept
    return recorded if recorded and os.path.isfile(recorded) else None


def read_meta(ckpt: str) -> dict:
    with open(os.path.join(ckpt, META)) as f:
        return json.load(f)


class AtomicSave(NamedTuple):
    """A save planned by `begin_atomic_save`: its data files still to write (`request`, megatron-core's
    AsyncRequest), then `finish_atomic_save`."""
    final: str
    tmp: str
    request: object
    meta: dict


def save_atomically(final: str, state: dict, meta: dict) -> str:
    """All ranks: write `state` with dist-checkpointing into `final.tmp/`, then rank 0 adds `meta.json`
    (`meta`) and renames the folder to `final`. `final` may only replace a checkpoint or an empty
    folder. A failure on any rank raises CheckpointError on every rank, after rank 0 removed
    `final.tmp/` (it may be what filled the disk); `final`, `latest` and older checkpoints are untouched."""
    return write_and_finish_atomic_save(begin_atomic_save(final, state, meta))


def write_and_finish_atomic_save(save: "AtomicSave") -> str:
    """All ranks: write a planned save's data files in this process, then `finish_atomic_save`."""
    from megatron_lcl.checkpoint.writer import write_now
    from megatron_lcl.runtime.mcore_compat import write_results_queue

    removing_tmp_on_failure(save.tmp, lambda: agree_on_error(
        lambda: write_now(save.request, write_results_queue()), f"saving {save.final}"))
    return finish_atomic_save(save)


def begin_atomic_save(final: str, state: dict, meta: dict) -> AtomicSave:
    """All ranks: a fresh `final.tmp/`, and megatron-core's plan of the save into it (rank 0 writes
    `common.pt` now); the data files are written next (`writer.write_now`, or in the background)."""
    from megatron_lcl.runtime.mcore_compat import (deferred_rank0_write_errors, plan_async_save,
                                                   write_results_queue)

    tmp, rank0 = final + TMP_SUFFIX, dist_rank() == 0
    write_results_queue()  # before the plan: its writer reports there

    def plan():
        with deferred_rank0_write_errors():  # rank 0's common.pt: see there
            return plan_async_save(state, tmp)

    def begin():
        agree_on_error(lambda: rank0 and _fresh_folder(final, tmp), f"saving {final}")
        return AtomicSave(final, tmp, agree_on_error(plan, f"saving {final}"), meta)

    return removing_tmp_on_failure(tmp, begin)


def finish_atomic_save(save: AtomicSave) -> str:
    """All ranks, once every rank's data files are written: megatron-core's finalize (it gathers the
    write results; rank 0 writes the index `.metadata` and `metadata.json`), then rank 0 adds
    `meta.json` and renames `NAME.tmp/` to `NAME/`."""
    from megatron_lcl.runtime.mcore_compat import deferred_rank0_write_errors

    def finalize():
        with deferred_rank0_write_errors():  # rank 0's .metadata / metadata.json: see there
            for fn in save.request.finalize_fns:
                fn()

    def finish():
        agree_on_error(finalize, f"saving {save.final}")
        agree_on_error(lambda: dist_rank() == 0 and _finish(save.tmp, save.final, save.meta), f"saving {save.final}")
        return save.final

    return removing_tmp_on_failure(save.tmp, finish)


def removing_tmp_on_failure(tmp: str, fn: Callable):
    """`fn()`; when it raises CheckpointError, rank 0 first removes the partial `tmp` folder."""
    try:
        return fn()
    except CheckpointError:
        if dist_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def _fresh_folder(final: str, tmp: str) -> None:
    _check_replaceable(final)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)


def _finish(tmp: str, final: str, meta: dict) -> None:
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=1)
    fsync_tree(tmp)  # on disk before the rename makes the checkpoint visible
    if os.path.exists(final):  # saved again (e.g. at the same step): the newer one wins
        shutil.rmtree(final)
    os.rename(tmp, final)


def agree_on_error(fn: Callable, what: str):
    """Run `fn` on every rank, then agree: when it raised on any rank, raise CheckpointError on every
    rank naming `what`, the first failing rank and its error, rather than leave the others waiting in
    the next collective. Returns `fn`'s result."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        result, error = fn(), None
    except (Exception, CheckpointException) as e:
        result, error = None, _rank_error(e)
        if dist.get_world_size() > 1 and error[0]:  # said at once: if `fn` was collective, the others may wait in it
            print(f"{what} failed on {error[1]}", file=sys.stderr, flush=True)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e is not None]
    if failed:
        first = sorted(failed, key=lambda e: not e[0])[0][1]  # a rank's own error before "failed elsewhere"
        firsthand = sum(1 for e in failed if e[0])
        more = f" (and {firsthand - 1} more rank(s))" if firsthand > 1 else ""
        raise CheckpointError(f"{what} failed on {first}{more}", reason=first.split(": ", 1)[1])
    return result


def _rank_error(e: BaseException) -> tuple:
    """(firsthand, "rank R: Error: message") for an error raised on this rank. torch's
    CheckpointException carries the failing ranks' errors (keyed by rank) on the rank that gathered
    them; elsewhere it carries none: not firsthand, another rank has the details."""
    import torch.distributed as dist

    failures = getattr(e, "failures", None)
    if failures:
        rank = min(failures)
        return True, f"rank {rank}: {_describe(failures[rank][0])}"
    return failures is None, f"rank {dist.get_rank()}: {_describe(e)}"


def _describe(e: BaseException) -> str:
    """One line for an error (its first line, whole: it may name a file or a shard)."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    if isinstance(e, CheckpointError):
        return str(e)
    return (f"{type(e).__name__}: {e}".splitlines() or [type(e).__name__])[0]


def check_checkpoint_files(ckpt: str) -> None:
    """Raise CheckpointError naming the file when a file of `ckpt` is unreadable or shorter than the
    checkpoint's own index (`.metadata`) says: a truncated copy or a disk that filled up under it."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_lcl.runtime.mcore_compat import common_state_in_common_pt

    def read(name, fn):
        try:
            return fn(os.path.join(ckpt, name))
        except Exception as e:
            raise CheckpointError(f"{name} is unreadable ({_describe(e)})") from None

    def read_json(path):
        with open(path) as f:
            return json.load(f)

    read(META, read_json)
    read("metadata.json", read_json)  # dist-checkpointing's own (backend, version)
    index = read(".metadata", lambda _: FileSystemReader(ckpt).read_metadata())
    if common_state_in_common_pt(index):  # megatron-core < 0.19 (0.19: in rank 0's data file)
        read("common.pt", lambda p: torch.load(p, map_location="cpu", weights_only=False))
    needed = {}
    for info in index.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        have = read(name, os.path.getsize)
        if have < size:
            raise CheckpointError(f"{name} is truncated ({have} bytes; its index, .metadata, says {size})")


def quarantine(ckpt: str) -> str:
    """Rename a checkpoint that failed to load to `NAME.broken` (`.broken2`, ... if taken); returns the new path."""
    target, n = ckpt + BROKEN_SUFFIX, 1
    while os.path.exists(target):
        n += 1
        target = f"{ckpt}{BROKEN_SUFFIX}{n}"
    os.rename(ckpt, target)
    return target


def fsync_tree(folder: str) -> None:
    """Flush every file and folder under `folder` to disk (before a rename makes it visible)."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_replaceable(final: str) -> None:
    if os.path.isdir(final) and os.listdir(final) and not os.path.exists(os.path.join(final, META)):
        raise FileExistsError(f"{final} exists and is not a megatron_lcl checkpoint; refusing to replace it")


def write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, LATEST + TMP_SUFFIX)
    try:
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(root, LATEST))
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def prune(root: str, keep_last: int) -> None:
    """Keep the newest `keep_last` complete `step_*` checkpoints under `root`."""
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_tmp(root: str) -> None:
    for d in os.listdir(root):
        if d.endswith(TMP_SUFFIX) and os.path.isdir(os.path.join(root, d)):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
