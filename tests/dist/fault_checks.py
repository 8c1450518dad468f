"""Checkpoint faults on 2 gloo ranks (DP=2), run by tests/test_checkpoint_faults.py.

Interval saves are written in the background (checkpoint.async_save, on by default here: Linux);
the final save of a run at once.

`--phase kill`: rank 1 SIGKILLs itself while its background writer writes its step-4 files (the
writer dies with it): torchrun then ends the job. `--phase checks` (the launch that must pass):

- rng:       40 steps straight == 10 steps, exit, resume for 30 (drop-path 0.2), bitwise; the same
             resume with the RNG states re-seeded differs over 5 steps (the comparison sees the RNG).
- killed:    the run killed in phase `kill` resumes from step 2 and finishes like the straight run.
- truncated: for each of a .distcp, .metadata, common.pt and meta.json truncated in the newest
             checkpoint (step 6): the run resumes from step 4, renames step 6 to step_00000006.broken.
- dangling:  `latest` naming a deleted folder: resumes from the newest complete one.
- enospc:    "no space left on device" while writing each file of the step-8 save in turn (data files
             on rank 1 and on rank 0, by the background writer and, with async_save=false, by the rank;
             rank 0's index .metadata, common.pt, metadata.json, meta.json,
             latest): every rank stops with the same CheckpointError naming the rank and the file,
             within seconds (before: a .metadata error hung all ranks for the gloo timeout), no
             step_00000008(.tmp) is left, `latest` and older checkpoints are intact, and the relaunch
             resumes from step 6.
- stop:      a stop signal (rank 1) at step 5 while the step-4 save is still being written: the run
             finishes that save, then saves step 5; both complete, `latest` at step 5.
- writer_killed: rank 1's background writer SIGKILLed while idle before the step-4 save, and (another
             run) during its step-4 write: each run finishes (a new writer; the save written at once
             from the staged copies), one line says so, and a resume from its step 4 finishes.
Each fault's resumed steps are compared with the straight run's (bitwise). Results: OUT/fault_checks.json.
"""

import argparse
import contextlib
import errno
import functools
import io
import json
import os
import shutil
import signal
import sys
import time

import torch.distributed as dist

from common import mark_done, save_json_rank0, tiny_run_config
from megatron_lcl.checkpoint import CheckpointError, writer
from megatron_lcl.runtime.mcore_compat import RANK0_FILES
from megatron_lcl.training.trainer import Trainer

real_write_buckets = writer.write_buckets  # also in the background writer, which imports this script

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


def slow_write(buckets, results_queue) -> None:
    """A background write that takes a second (so the run is sure to be in the middle of it)."""
    time.sleep(1.0)
    real_write_buckets(buckets, results_queue)


def phase_kill(out: str) -> None:
    """Rank 1 dies (SIGKILL) while its background writer writes its step-4 files."""
    real_submit = writer.BackgroundWriter.submit

    def submit_then_die(self, staged):
        real_submit(self, staged)
        if dist.get_rank() == 1 and "step_00000004.tmp" in staged.specs[0][0]:
            with open(os.path.join(out, "killed_writer.pid"), "w") as f:
                f.write(str(self.process.pid))
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGKILL)

    writer.BackgroundWriter.submit = submit_then_die
    writer.write_buckets = slow_write
    Trainer(config(out, "killed")).setup().train()


def check_rng(out: str) -> dict:
    straight = config(out, "rng_straight", "train.train_steps=40", "checkpoint.save_interval=null")
    run(straight)
    resumed = config(out, "rng_resumed", "train.train_steps=40", "checkpoint.save_interval=null")
    first = run(config(out, "rng_resumed", "train.train_steps=40", "checkpoint.save_interval=null",
                       "train.exit_after_steps=10"))
    reseeded = config(out, "rng_reseeded", "train.train_steps=40", "checkpoint.save_interval=null",
                      "train.exit_after_steps=5")
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
    for kind in ("__1_0.distcp", ".metadata", *COMMON, "meta.json"):
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


# common.pt: megatron-core < 0.19 only (0.19 keeps the common state in rank 0's data file)
COMMON = [name for name in RANK0_FILES if name == "common.pt"]


# Every file a save writes, and the rank that writes it: (name the failing write starts with, rank).
# Rank 0 alone writes the index `.metadata`, common.pt, metadata.json, meta.json and `latest`; every
# rank writes its data files (`__R_0.distcp`, in megatron-core's forked writer processes).
# The data files are written by the background writer, and by the rank itself with async_save=false.
WRITE_FAULTS = [("__1_", 1, True), ("__0_", 0, True), ("__1_", 1, False), ("__0_", 0, False), (".metadata", 0, True),
                *[(name, 0, True) for name in COMMON], ("metadata.json", 0, True), ("meta.json", 0, True),
                ("latest", 0, True)]


@contextlib.contextmanager
def disk_full_for(prefix: str, rank: int):
    """On `rank`: opening a file whose name starts with `prefix` for writing fails with ENOSPC, as on a
    full disk, in the rank and in its background writer (which runs `write_on_full_disk` instead)."""
    if dist.get_rank() != rank:
        yield
        return
    writer.write_buckets = functools.partial(write_on_full_disk, prefix)
    try:
        with full_disk(prefix):
            yield
    finally:
        writer.write_buckets = real_write_buckets


def write_on_full_disk(prefix: str, buckets, results_queue) -> None:
    with full_disk(prefix):
        real_write_buckets(buckets, results_queue)


@contextlib.contextmanager
def full_disk(prefix: str):
    """In this process: builtins.open and io.open (which pathlib uses) and torch.save (which opens its
    file in C++) fail with ENOSPC for a file whose name starts with `prefix`, opened for writing."""
    import builtins
    import torch

    real_open, real_save = builtins.open, torch.save

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def hits(path, mode) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.basename(os.fspath(path)).startswith(prefix) \
            and any(c in mode for c in "wax+")

    def failing_open(file, mode="r", *args, **kwargs):
        if hits(file, mode):
            full(file)
        return real_open(file, mode, *args, **kwargs)

    def failing_save(obj, f, *args, **kwargs):
        if hits(f, "w"):
            full(f)
        return real_save(obj, f, *args, **kwargs)

    builtins.open = io.open = failing_open
    torch.save = failing_save
    try:
        yield
    finally:
        builtins.open = io.open = real_open
        torch.save = real_save


def check_write_errors(out: str, base) -> dict:
    """A write error in each file of the step-8 save, one launch each on one run directory: every rank
    stops with the same CheckpointError (no hang: timed), no step_00000008(.tmp) is left, `latest` stays
    at step 6, so each next launch resumes from step 6; the last one, without a fault, finishes."""
    cfg = config(out, "enospc")
    copy_run(base, cfg)
    results = {}
    for prefix, rank, background in WRITE_FAULTS:
        started = time.time()
        cfg.checkpoint.async_save = background
        with disk_full_for(prefix, rank):
            failed = run(cfg)
        statuses = [None] * dist.get_world_size()
        dist.all_gather_object(statuses, failed["status"])
        with open(os.path.join(cfg.run_dir, "checkpoints", "latest")) as f:
            latest = f.read().strip()
        results[f"{prefix}@{rank}" + ("" if background else "/sync")] = {**failed, "statuses": statuses, "latest": latest,
                                      "seconds": time.time() - started}
    cfg.checkpoint.async_save = None
    return {"faults": results, "relaunched": run(cfg), "rows": rows(cfg)}


def check_stop_during_save(out: str) -> dict:
    """A stop signal (to rank 1) during step 5, while the step-4 save is being written (slowly): the
    run finishes that save, then saves step 5 at once."""
    cfg = config(out, "stop_during_save", "checkpoint.save_interval=4")
    real_next = Trainer.next_batches

    def next_batches(self):
        if self.state.step == 4 and dist.get_rank() == 1:
            assert self.saver.in_flight
            os.kill(os.getpid(), signal.SIGTERM)
        return real_next(self)

    Trainer.next_batches, writer.write_buckets = next_batches, slow_write
    try:
        result = run(cfg)
    finally:
        Trainer.next_batches, writer.write_buckets = real_next, real_write_buckets
    with open(os.path.join(cfg.run_dir, "checkpoints", "latest")) as f:
        latest = f.read().strip()
    complete = [d for d in result["checkpoints"]
                if os.path.exists(os.path.join(cfg.run_dir, "checkpoints", d, "meta.json"))]
    return {**result, "latest": latest, "complete": complete}


def write_part_then_wait(started: str, buckets, results_queue) -> None:
    """A background write that opens its first file, writes part of it, says so in the file `started`,
    then waits to be killed (a generous hang guard: it is killed within seconds)."""
    with open(buckets[0][0], "wb") as f:
        f.write(b"part of a checkpoint file")
    with open(started, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def wait_for(path: str) -> None:
    deadline = time.time() + 300  # hang guard only
    while not os.path.exists(path):
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def kill(process) -> int:
    os.kill(process.pid, signal.SIGKILL)  # as the OOM killer does
    process.join()
    return process.pid


def check_writer_killed(out: str, during_write: bool) -> dict:
    """Rank 1's background writer SIGKILLed before the step-4 save (while idle: the step-2 save
    complete), or during its step-4 write (its data file half written): the run goes on and finishes,
    its step-4 save written by a new writer, or at once from the staged copies."""
    name = "writer_killed_" + ("writing" if during_write else "idle")
    cfg = config(out, name, "checkpoint.keep_last=5")
    started, killed = os.path.join(out, name + ".started"), []
    real_next = Trainer.next_batches

    def next_batches(self):
        if self.state.step == 3 and not during_write:
            self.finish_save()  # all ranks: the step-2 save completes, the writers are idle
            if dist.get_rank() == 1:
                killed.append(kill(self.saver.writer.process))
        if self.state.step == 3 and during_write and dist.get_rank() == 1:
            writer.write_buckets = functools.partial(write_part_then_wait, started)  # the step-4 save's
        if self.state.step == 4 and during_write and dist.get_rank() == 1:
            assert self.saver.writing()
            wait_for(started)
            writer.write_buckets = real_write_buckets  # the rank's own writes are real
            killed.append(kill(self.saver.writer.process))
        return real_next(self)

    Trainer.next_batches = next_batches
    try:
        result = run(cfg)
    finally:
        Trainer.next_batches, writer.write_buckets = real_next, real_write_buckets
    killed_pids = [None] * dist.get_world_size()
    dist.all_gather_object(killed_pids, killed)
    return {**result, "rows": rows(cfg), "killed": killed_pids, "resumed": resume_from_step_4(out, cfg, name)}


def resume_from_step_4(out: str, src, name: str) -> dict:
    """A copy of run `src` resumed from its step-4 checkpoint (later ones removed)."""
    cfg = config(out, name + "_resumed")
    copy_run(src, cfg)
    if dist.get_rank() == 0:
        for step in (6, 8, 10):
            shutil.rmtree(os.path.join(cfg.run_dir, "checkpoints", f"step_{step:08d}"))
        with open(os.path.join(cfg.run_dir, "checkpoints", "latest"), "w") as f:
            f.write("step_00000004\n")
    dist.barrier()
    return {**run(cfg), "rows": rows(cfg)}


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
    results["enospc"] = check_write_errors(out, base)
    results["stop"] = check_stop_during_save(out)
    results["writer_killed"] = {"idle": check_writer_killed(out, during_write=False),
                                "writing": check_writer_killed(out, during_write=True)}
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
