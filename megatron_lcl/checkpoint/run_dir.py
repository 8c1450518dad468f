"""What a run directory holds, and the one place its file names are spelled:

    RUN_DIR/
      config.yaml        the resolved config (every field)          megatron_lcl.config.save_config
      launches.jsonl     one row per launch (start step, world, git commit)
      metrics.jsonl      one JSON object per logged step             read_metrics()
      tensorboard/       the same scalars for TensorBoard
      checkpoints/       step_00000100/ ... and `latest`             megatron_lcl.checkpoint

A checkpoint folder holds dist-checkpointing files and `meta.json` (step, parallel layout, config,
train state); `latest` names the newest complete one. Writes are atomic: into `NAME.tmp/`, then
renamed (`save_atomically`), so a crash never leaves a half-written checkpoint under its final name.
"""

import json
import os
import shutil
from typing import List, Optional

CONFIG = "config.yaml"
LAUNCHES = "launches.jsonl"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
TMP_SUFFIX = ".tmp"


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
    names = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(TMP_SUFFIX))
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


def read_meta(ckpt: str) -> dict:
    with open(os.path.join(ckpt, META)) as f:
        return json.load(f)


def save_atomically(final: str, state: dict, meta_fn) -> str:
    """All ranks: write `state` with dist-checkpointing into `final.tmp/`; then rank 0 adds `meta.json`
    (`meta_fn()`) and renames the folder to `final`. `final` may only replace a checkpoint or an
    empty folder."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    tmp, rank0 = final + TMP_SUFFIX, dist.get_rank() == 0
    if rank0:
        _check_replaceable(final)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dist_checkpointing.save(state, tmp)
    dist.barrier()  # every rank's shards are written
    if rank0:
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta_fn(), f, indent=1)
        _fsync_tree(tmp)  # on disk before the rename makes the checkpoint visible
        if os.path.exists(final):  # saved again (e.g. at the same step): the newer one wins
            shutil.rmtree(final)
        os.rename(tmp, final)
    dist.barrier()
    return final


def _fsync_tree(folder: str) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
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
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))


def prune(root: str, keep_last: int) -> None:
    """Keep the newest `keep_last` complete `step_*` checkpoints under `root`."""
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_tmp(root: str) -> None:
    for d in os.listdir(root):
        if d.endswith(TMP_SUFFIX) and os.path.isdir(os.path.join(root, d)):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
