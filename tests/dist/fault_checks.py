"""Checkpoint faults on 2 gloo ranks (DP=2), run by tests/test_checkpoint_faults.py.

`--phase kill`: rank 1 SIGKILLs itself in the middle of the step-4 save (its shards written, the
folder not yet renamed): torchrun then ends the job. `--phase checks` (the launch that must pass):

- rng:       40 steps straight == 10 steps, exit, resume for 30 (drop-path 0.2), bitwise; the same
             resume with the RNG states re-seeded differs over 5 steps (the comparison sees the RNG).
- killed:    the run killed in phase `kill` resumes from step 2 and finishes like the straight run.
- truncated: for each of a .distcp, .metadata, common.pt and meta.json truncated in the newest
             checkpoint (step 6): the run resumes from step 4, renames step 6 to step_00000006.broken.
- dangling:  `latest` naming a deleted folder: resumes from the newest complete one.
- enospc:    "no space left on device" on rank 1 while writing the step-8 save: both ranks stop
             with one CheckpointError, step_00000008.tmp is gone, `latest` and older checkpoints are
             intact, and the relaunch resumes from step 6.
Each fault's resumed steps are compared with the straight run's (bitwise). Results: OUT/fault_checks.json.
"""

import argparse
import contextlib
import errno
import io
import json
import os
import shutil
import signal
import sys

import torch.distributed as dist

from common import mark_done, save_json_rank0, tiny_run_config
from megatron_lcl.checkpoint import CheckpointError
from megatron_lcl.training.trainer import Trainer

TIMING_KEYS = {"step_time_s", "tokens_per_s", "images_per_s", "model_flops_per_s", "mfu"}


def config(out: str, run: str, *overrides: str):
    return tiny_run_config(out, run, "train.train_steps=10", "model.vision.drop_path_rate=0.2",
                           "checkpoint.save_interval=2", "checkpoint.keep_last=3", *overrides)


def run(cfg) -> dict:
    """Set up (resume), train; what it resumed from, what it printed, how it ended."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer = Trainer(cfg).setup()
        resumed_step = trainer.state.step
        try:
            status = trainer.train()
        except CheckpointError as e:
            status = f"CheckpointError: {e}"
        finally:
            trainer.close()
    return {"resumed_step": resumed_step, "status": status, "log": printed.getvalue(),
            "checkpoints": listing(cfg)}


def listing(cfg) -> list:
    dist.barrier()
    return sorted(os.listdir(os.path.join(cfg.run_dir, "checkpoints")))


def rows(cfg) -> list:
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def copy_run(src, dst) -> None:
    if dist.get_rank() == 0:
        shutil.copytree(src.run_dir, dst.run_dir)
    dist.barrier()


def phase_kill(out: str) -> None:
    """Rank 1 dies (SIGKILL) right after writing its step-4 shards."""
    from megatron.core import dist_checkpointing

    real_save = dist_checkpointing.save

    def save_then_die(state, directory, *args, **kwargs):
        real_save(state, directory, *args, **kwargs)
        if dist.get_rank() == 1 and directory.endswith("step_00000004.tmp"):
            os.kill(os.getpid(), signal.SIGKILL)

    dist_checkpointing.save = save_then_die
    Trainer(config(out, "killed")).setup().train()


def check_rng(out: str) -> dict:
    straight = config(out, "rng_straight", "train.train_steps=40", "checkpoint.save_interval=null")
    run(straight)
    resumed = config(out, "rng_resumed", "train.train_steps=40", "checkpoint.save_interval=null")
    first = run(config(out, "rng_resumed", "train.train_steps=40", "checkpoint.save_interval=null",
                       "train.exit_after_steps=10"))
    reseeded = config(out, "rng_reseeded", "train.train_steps=15", "checkpoint.save_interval=null")
    copy_run(resumed, reseeded)
    if dist.get_rank() == 0:  # as if saved by the older format: the RNG states are not restored
        meta_path = os.path.join(reseeded.run_dir, "checkpoints", "step_00000010", "meta.json")
        with open(meta_path) as f:
            meta = json.load(f)
        meta.pop("rng")
        with open(meta_path, "w") as f:
            json.dump(meta, f)
    dist.barrier()
    second = run(resumed)
    third = run(reseeded)
    return {"first": first, "second": second, "reseeded": third, "straight": rows(straight),
            "resumed": rows(resumed), "reseeded_rows": rows(reseeded)}


def truncate(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def check_truncated(out: str, base) -> dict:
    results = {}
    for kind in ("__1_0.distcp", ".metadata", "common.pt", "meta.json"):
        cfg = config(out, f"truncated_{kind.strip('._')}")
        copy_run(base, cfg)
        if dist.get_rank() == 0:
            truncate(os.path.join(cfg.run_dir, "checkpoints", "step_00000006", kind))
        dist.barrier()
        results[kind] = {**run(cfg), "rows": rows(cfg)}
    return results


def check_dangling(out: str, base) -> dict:
    cfg = config(out, "dangling")
    copy_run(base, cfg)
    if dist.get_rank() == 0:
        with open(os.path.join(cfg.run_dir, "checkpoints", "latest"), "w") as f:
            f.write("step_00000099\n")
    dist.barrier()
    return {**run(cfg), "rows": rows(cfg)}


def check_enospc(out: str, base) -> dict:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    cfg = config(out, "enospc")
    copy_run(base, cfg)
    real_write = filesystem_async._write_item

    def disk_full(*args, **kwargs):  # runs in the writer processes (forked)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if dist.get_rank() == 1:
        filesystem_async._write_item = disk_full
    try:
        failed = run(cfg)
    finally:
        filesystem_async._write_item = real_write
    with open(os.path.join(cfg.run_dir, "checkpoints", "latest")) as f:
        latest_after_failure = f.read().strip()
    relaunched = run(cfg)
    return {"failed": failed, "latest_after_failure": latest_after_failure, "relaunched": relaunched,
            "rows": rows(cfg)}


def phase_checks(out: str) -> dict:
    results = {"rng": check_rng(out)}
    straight = config(out, "straight")
    run(straight)
    results["straight"] = rows(straight)
    killed = config(out, "killed")
    results["killed"] = {"before": listing(killed), **run(killed), "rows": rows(killed)}
    # Stopped at step 6 of the same 10-step schedule as `straight` (its LR schedule is the same).
    base = config(out, "base", "train.exit_after_steps=6")
    run(base)
    results["truncated"] = check_truncated(out, base)
    results["dangling"] = check_dangling(out, base)
    results["enospc"] = check_enospc(out, base)
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--phase", choices=("kill", "checks"), default="checks")
    args = parser.parse_args()
    if args.phase == "kill":
        phase_kill(args.out)
        sys.exit("phase kill: rank 1 should have been killed during the step-4 save")
    results = phase_checks(args.out)
    save_json_rank0(results, args.out, "fault_checks.json")
    mark_done(args.out)


if __name__ == "__main__":
    main()
