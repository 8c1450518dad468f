"""Checkpoint faults at DP=2: each ends with the run resuming from the newest COMPLETE checkpoint,
with one message naming what was skipped and why, and the older checkpoints intact.

Two torchrun launches of tests/dist/fault_checks.py (2 gloo ranks): `--phase kill` (rank 1 is
SIGKILLed while its background writer writes its files, so the launch fails by design), then
`--phase checks`, which resumes that run and covers the other faults; see the script's docstring. Also here: resume == uninterrupted bitwise
at DP=2 with drop-path 0.2 over 30 steps after the resume (per-rank RNG states).
"""

import json
import os
import subprocess
import sys

import pytest

from megatron_lcl.runtime.distributed import free_port
from megatron_lcl.runtime.mcore_compat import RANK0_FILES
from multirank import DIST_DIR, process_running, run_torchrun
from test_async_checkpoint import assert_identical, checkpoint_tensors
from test_training import build_corpus

CKPT = ["step_00000002", "step_00000004", "step_00000006"]
# common.pt: megatron-core < 0.19 only (0.19 keeps the common state in rank 0's data file)
COMMON = [name for name in RANK0_FILES if name == "common.pt"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    build_corpus(out)
    log = out / "kill_phase.log"  # a file, not a pipe: an orphaned helper of the killed job may hold it open
    with open(log, "w") as f:
        kill = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               f"--master_port={free_port()}", str(DIST_DIR / "fault_checks.py"), "--out",
                               str(out), "--phase", "kill"], stdout=f, stderr=subprocess.STDOUT, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert kill.returncode != 0 and "SIGKILL" in log.read_text(), log.read_text()[-3000:]
    killed_writer = int((out / "killed_writer.pid").read_text())
    run_torchrun("fault_checks.py", 2, out, timeout_s=600)
    return {**json.loads((out / "fault_checks.json").read_text()), "killed_writer": killed_writer, "out": out}


def test_resume_is_bitwise_at_dp2_with_drop_path(results):
    r = results["rng"]
    assert r["first"]["status"] == "exit_after_steps" and r["second"]["resumed_step"] == 10
    assert [row["step"] for row in r["resumed"]] == list(range(1, 41))
    assert r["resumed"] == r["straight"]  # every metric of all 40 steps, 30 after the resume
    # Control: the same resume with the RNG states re-seeded draws other drop-path masks.
    assert "re-seeded" in r["reseeded"]["log"]
    assert r["reseeded_rows"][:10] == r["straight"][:10]
    assert r["reseeded_rows"][10:15] != r["straight"][10:15]


def test_sigkill_during_a_background_write_resumes_from_the_last_complete_checkpoint(results):
    r = results["killed"]
    assert r["before"] == ["latest", "step_00000002", "step_00000004.tmp"]
    assert not process_running(results["killed_writer"])  # the writer died with its rank
    assert r["resumed_step"] == 2 and r["status"] == "completed"
    assert r["rows"] == results["straight"]
    assert r["checkpoints"] == ["latest", "step_00000006", "step_00000008", "step_00000010"]


@pytest.mark.parametrize("kind", ["__1_0.distcp", ".metadata", *COMMON, "meta.json"])
def test_a_truncated_file_in_the_newest_checkpoint_falls_back_to_the_previous(results, kind):
    r = results["truncated"][kind]
    assert r["resumed_step"] == 4 and r["status"] == "completed"
    skipped = [line for line in r["log"].splitlines() if line.startswith("skipped checkpoint")]
    assert len(skipped) == 1, r["log"]
    assert "step_00000006" in skipped[0] and kind in skipped[0]
    assert "renamed to step_00000006.broken; next: step_00000004" in skipped[0]
    assert "step_00000006.broken" in r["checkpoints"]  # kept for inspection, never pruned
    assert [row["step"] for row in r["rows"]] == list(range(1, 11))
    assert r["rows"] == results["straight"]


def test_latest_naming_a_deleted_folder_falls_back(results):
    r = results["dangling"]
    assert "names 'step_00000099', which is missing or incomplete: skipped; using the newest complete " \
           "checkpoint, step_00000006" in r["log"]
    assert r["resumed_step"] == 6 and r["rows"] == results["straight"]


# FILE@RANK; "/sync": data files written by the rank itself (checkpoint.async_save=false), else by its
# background writer.
WRITE_FAULTS = ["__1_@1", "__0_@0", "__1_@1/sync", "__0_@0/sync", ".metadata@0", *[f"{n}@0" for n in COMMON],
                "metadata.json@0", "meta.json@0", "latest@0"]


@pytest.mark.parametrize("fault", WRITE_FAULTS)
def test_a_write_error_in_any_file_of_a_save_stops_every_rank_with_one_error(results, fault):
    """ENOSPC opening FILE@RANK: one CheckpointError, the same on both ranks, naming the failing rank and
    the file; no rank waits for the gloo timeout; nothing of the failed save left; `latest` untouched."""
    r = results["enospc"]["faults"][fault]
    name, rank = fault.split("/")[0].split("@")
    status = r["status"]
    assert status.startswith("CheckpointError: saving ") or status.startswith("CheckpointError: pointing"), status
    assert f"step_00000008 failed on rank {rank}: " in status, status
    assert "[Errno 28] No space left on device" in status, status  # data files: "RuntimeError: Worker failure: ..."
    assert f"/{name}" in status, status  # the file
    assert r["statuses"] == [status, status]
    # No hang: the same error on both ranks (a rank left in a collective would end with gloo's timeout
    # error instead), before the process-group timeout (10 min) -- a hang guard, not a speed criterion.
    assert r["seconds"] < 570, r["seconds"]
    assert r["resumed_step"] == 6 and r["checkpoints"] == ["latest", *CKPT] and r["latest"] == "step_00000006"


def test_the_relaunch_after_failed_saves_resumes_from_the_last_complete_checkpoint(results):
    r = results["enospc"]
    print("failed saves, seconds from launch to the CheckpointError on both ranks:",
          {fault: round(f["seconds"], 1) for fault, f in r["faults"].items()})
    assert r["relaunched"]["resumed_step"] == 6 and r["relaunched"]["status"] == "completed"
    assert r["rows"] == results["straight"]


def test_a_stop_signal_during_a_background_save_finishes_it_then_saves_the_step(results):
    r = results["stop"]
    assert r["status"] == "preempted", r["log"][-2000:]
    assert "saving step 4 in the background" in r["log"]
    assert r["complete"] == ["step_00000004", "step_00000005"] and r["latest"] == "step_00000005"
    assert r["checkpoints"] == ["latest", "step_00000004", "step_00000005"]  # no .tmp left



WRITER_DEATH_NOTICES = {
    "idle": "rank 1: its checkpoint writer process (pid {pid}) ended with exit code -9 while idle; a new one (pid ",
    "writing": "rank 1: its checkpoint writer process (pid {pid}) ended with exit code -9 during the save: its files "
               "were written at once from the staged copies; a new writer (pid ",
}


@pytest.mark.parametrize("moment", ["idle", "writing"])
def test_a_run_whose_writer_is_killed_finishes_with_one_line_and_resumable_checkpoints(results, moment, tmp_path):
    """Rank 1's writer SIGKILLed (as the OOM killer may pick it) while idle before the step-4 save, or
    during its step-4 write: the run finishes as if nothing happened (same metrics, the same later
    checkpoints tensor for tensor), rank 0 says what happened in one line, and a resume from the step-4
    checkpoint (written by a new writer, or at once from the staged copies) finishes like the straight run."""
    r = results["writer_killed"][moment]
    assert r["status"] == "completed", r["log"][-2000:]
    assert r["killed"][0] == [] and len(r["killed"][1]) == 1
    pid = r["killed"][1][0]
    assert not process_running(pid)
    notices = [line for line in r["log"].splitlines() if "ended with exit code" in line]
    assert len(notices) == 1 and notices[0].startswith(WRITER_DEATH_NOTICES[moment].format(pid=pid)), r["log"]
    assert r["rows"] == results["straight"]
    assert r["checkpoints"] == ["latest"] + [f"step_{step:08d}" for step in (2, 4, 6, 8, 10)]
    out = results["out"]
    for name in ("step_00000006", "step_00000008", "step_00000010"):
        assert_identical(checkpoint_tensors(out / f"writer_killed_{moment}" / "checkpoints" / name, tmp_path),
                         checkpoint_tensors(out / "straight" / "checkpoints" / name, tmp_path), name)
    resumed = r["resumed"]
    assert resumed["resumed_step"] == 4 and resumed["status"] == "completed"
    assert resumed["rows"] == results["straight"]
