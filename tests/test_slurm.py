"""examples/pretrain_lcl.sh under a real single-node slurm (tests/slurm/cluster.py; one cluster per
module, stopped by PID at the end).

One job of the tiny model (2 ranks, DataLoader workers on, a save every 10 steps) goes through
every way a job is stopped; slurm delivers step signals to EVERY process of the step (agent, ranks,
DataLoader worker, megatron-core's checkpoint-writer processes). Each time the run must save the
step it was at, and a requeue must resume from exactly that step:

  scancel --batch --signal=USR1 JOB   (what --signal=B:USR1@120 does)  -> save, the script requeues
  scancel --signal=TERM JOB           (the step only, not the batch shell) -> save, the script requeues
  scontrol requeue JOB                (everything gets SIGTERM)        -> save, slurm requeues
  scancel JOB                                                          -> save, CANCELLED, no requeue

Failures end FAILED with the driver's exit status (a crash: 1; a config error's 2 takes the same path,
tested through the launcher in tests/test_preemption.py).
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from megatron_lcl.checkpoint import read_metrics
from megatron_lcl.runtime.distributed import free_port
from slurm.cluster import Cluster, missing
from test_training import build_corpus

ROOT = Path(__file__).resolve().parent.parent
SCRIPT, TINY = "examples/pretrain_lcl.sh", "examples/configs/tiny_cpu.yaml"
HANG_GUARD_S = 600  # the longest wait for a job's next state: a hang guard, never a pass criterion
pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # KillWait (slurm's wait between SIGTERM and SIGKILL of a cancelled or requeued job) as a hang guard:
    # how long a save takes depends on the machine's load, a cluster's 30-120 s is no pass criterion.
    c = Cluster(tmp_path_factory.mktemp("slurm"), kill_wait_s=300)
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm_data")
    build_corpus(root)
    return root


def submit(cluster: Cluster, out_dir: Path, *overrides: str, **env) -> int:
    job_env = dict(cluster.env, OMP_NUM_THREADS="1", NPROC="2", PYTHON=sys.executable,
                   MASTER_PORT=str(free_port()))
    job_env.update(env)
    proc = cluster.run("sbatch", "--parsable", f"--output={out_dir}/job-%j.out", SCRIPT, TINY, *overrides,
                       cwd=ROOT, env=job_env, check=True)
    return int(proc.stdout.strip().split(";")[0])


def overrides(data_root: Path, run_dir: Path) -> list:
    return [f"run_dir={run_dir}", f"data.path={data_root / 'shards'}",
            f"data.tokenizer={data_root / 'tokenizer' / 'lcl.model'}", "data.seq_length=64",
            "data.micro_batch_size=2", "data.num_workers=1", "data.shuffle_buffer=8",
            "train.global_batch_size=4", "train.train_steps=2000", "optimizer.warmup_steps=2",
            "logging.log_interval=1", "checkpoint.save_interval=10", "checkpoint.keep_last=2"]


def launches(run_dir: Path) -> list:
    path = run_dir / "launches.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def last_step(run_dir: Path) -> int:
    rows = read_metrics(str(run_dir), missing_ok=True)
    return rows[-1]["step"] if rows else 0


def wait_for(what: str, ready, cluster: Cluster, job_id: int, log: Path, timeout_s: float = HANG_GUARD_S):
    deadline = time.time() + timeout_s
    while not ready():
        if time.time() > deadline:
            pytest.fail(f"{what}: not within {timeout_s} s; job {cluster.job(job_id)}\n"
                        f"{log.read_text()[-4000:] if log.exists() else '(no job output)'}")
        time.sleep(0.3)


def start_now_if_pending(cluster: Cluster, job_id: int) -> None:
    """Slurm holds a requeued job for ~120 s (Reason=BeginTime); the test does not wait for that, but
    does wait for the node to be idle (the previous launch's step gone), or the launch fails."""
    if cluster.job(job_id).get("Reason") == "BeginTime" and cluster.node_idle():
        time.sleep(3)  # slurmd refuses a job whose credential was revoked in the same second
        cluster.scontrol("update", f"JobId={job_id}", "StartTime=now")


def stop_and_check(cluster, job_id, run_dir, log, launch: int, command: list, requeued: bool) -> int:
    """Wait until launch number `launch` has trained 5 steps, run `command`; returns the step saved
    (not before the step the run was at; when `requeued`, where the next launch starts)."""
    wait_for(f"launch {launch} training", lambda: len(launches(run_dir)) == launch and
             last_step(run_dir) >= launches(run_dir)[-1]["start_step"] + 5, cluster, job_id, log)
    at = last_step(run_dir)
    cluster.run(*command, str(job_id), check=True)
    if requeued:
        wait_for(f"relaunch after {command}", lambda: start_now_if_pending(cluster, job_id) or
                 len(launches(run_dir)) == launch + 1, cluster, job_id, log)
        saved = launches(run_dir)[-1]["start_step"]
        assert launches(run_dir)[-1]["slurm_job_id"] in (job_id, str(job_id))
    else:
        wait_for("the job to end", lambda: cluster.job(job_id).get("JobState") not in ("RUNNING", "COMPLETING"),
                 cluster, job_id, log)
        saved = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert saved >= at, f"{command}: signalled at step {at}, saved step {saved}"
    assert f"received: saved step {saved}," in log.read_text(), log.read_text()[-4000:]
    assert (run_dir / "checkpoints" / f"step_{saved:08d}" / "meta.json").exists()
    return saved


def test_every_stop_saves_and_requeues_where_it_should(cluster, data_root, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submit(cluster, tmp_path, *overrides(data_root, run_dir))
    log = tmp_path / f"job-{job_id}.out"
    saved = [stop_and_check(cluster, job_id, run_dir, log, 1, ["scancel", "--batch", "--signal=USR1"], True),
             stop_and_check(cluster, job_id, run_dir, log, 2, ["scancel", "--signal=TERM"], True),
             stop_and_check(cluster, job_id, run_dir, log, 3, ["scontrol", "requeue"], True),
             stop_and_check(cluster, job_id, run_dir, log, 4, ["scancel"], False)]
    job = cluster.job(job_id)
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "3", job
    assert [launch["start_step"] for launch in launches(run_dir)] == [0] + saved[:3]
    # Every step trained exactly once over the four launches: no step lost, none redone.
    assert [row["step"] for row in read_metrics(str(run_dir))] == list(range(1, saved[-1] + 1))
    text = log.read_text()
    assert text.count("stopped by a signal after saving; requeueing") == 2, text[-4000:]
    assert "not requeued by this script" in text.split("stopped by a signal after saving")[-1]
    for bad in ("BrokenPipeError", "DataLoader worker", "CheckpointError"):  # torchrun prints a traceback
        assert bad not in text, text[-4000:]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


# (who gets the signal, signal, seconds after the batch script (batch) or step 0 (step) started). In order:
# three on a run directory without a checkpoint (a clean exit; the first while the script still probes
# the node's GPUs with `import torch`, NPROC unset: before the launch; the second while torchrun's agent
# starts; the third while the ranks start), then one that lands in training (it saves a checkpoint),
# then one with a resume load in its start-up (a requeued job; SIGTERM, the others are USR1). Each case
# is a job of its own (about 20 s on an idle 2-core machine): one per way a stop reaches a start-up, no
# more (a second resume case, USR1 at 8 s, was the same path and went).
STARTUP_STOPS = [("batch", "USR1", "probe"), ("batch", "USR1", 0.3), ("step", "USR1", 0.5),
                 ("step", "USR1", "training"), ("step", "TERM", 4)]


def signal_job(cluster: Cluster, job_id: int, who: str, sig: str, deadline: float) -> None:
    """scancel --batch (the batch shell) or the step 0 processes (retried until the step exists)."""
    command = ["scancel", "--batch", f"--signal={sig}", str(job_id)] if who == "batch" else \
        ["scancel", f"--signal={sig}", f"{job_id}.0"]
    while cluster.run(*command).returncode != 0:  # the batch step or step 0 not there yet
        assert time.time() < deadline, f"{command} never succeeded"
        time.sleep(0.05)


def test_a_stop_signal_at_any_moment_of_the_start_up_ends_as_a_requeue(cluster, data_root, tmp_path):
    """A stop signal in the first seconds of a job (before: FAILED 138:0 or 1:0, or one rank dead and
    the other hung for torchrun's 600 s shutdown timeout): the batch shell, torchrun's agent and the
    ranks catch it from their first line, and the job is requeued every time, never FAILED, in bounded
    time. Each requeued job is then cancelled (the test does not wait for slurm's 2-minute hold)."""
    run_dir = tmp_path / "run"
    seen = []
    for who, sig, delay in STARTUP_STOPS:
        job_id = submit(cluster, tmp_path, *overrides(data_root, run_dir), **({"NPROC": ""} if delay == "probe" else {}))
        log = tmp_path / f"job-{job_id}.out"
        wait_for("the job to start", lambda: cluster.job(job_id).get("JobState") == "RUNNING", cluster, job_id, log)
        if who == "batch":  # slurm drops a batch signal sent before the batch step exists (RUNNING comes first)
            wait_for("the batch script to start", log.exists, cluster, job_id, log)
        started = time.time()
        if delay == "probe":
            time.sleep(0.3)
        elif delay == "training":
            wait_for("training", lambda: last_step(run_dir) >= 2, cluster, job_id, log)
        else:
            while who == "step" and not cluster.step_running(job_id):
                assert time.time() < started + HANG_GUARD_S, "step 0 never started"
                time.sleep(0.02)
            time.sleep(max(0.0, started + delay - time.time()) if who == "batch" else delay)
        at = time.time() - started
        signal_job(cluster, job_id, who, sig, started + HANG_GUARD_S)
        wait_for(f"the job to end after {who} SIG{sig} at {at:.1f} s",
                 lambda: cluster.job(job_id).get("JobState") not in ("RUNNING", "COMPLETING"), cluster, job_id, log)
        job = cluster.job(job_id)
        ended = time.time() - started
        cluster.run("scancel", str(job_id))  # requeued and held: not needed again
        text = log.read_text()
        seen.append((who, sig, round(at, 1), job["JobState"], job["Restarts"], round(ended, 1)))
        assert (job["JobState"], job["Restarts"]) == ("PENDING", "1"), (seen, text[-4000:])
        assert "stopped by a signal after saving; requeueing" in text or "before the launch" in text, text[-4000:]
        assert "requeueing job" in text and "Traceback" not in text, text[-4000:]
        if delay == "probe":
            assert "stopped by SIGUSR1 before the launch: nothing started" in text, text[-4000:]
        wait_for("the node to be idle", cluster.node_idle, cluster, job_id, log)
    print("start-up stops (who, signal, at s, state, restarts, ended after s):", seen)
    saved = [line for line in (tmp_path.glob("job-*.out")) if "saved step" in line.read_text()]
    assert saved, "the 'training' stop saved a checkpoint, which the later start-ups loaded"
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


# A crash (exit 1) is the case slurm must see as FAILED with the driver's status; the launcher passes
# every status the same way (a config error's 2: tests/test_preemption.py, through the launcher).
@pytest.mark.parametrize("override, exit_code", [("data.tokenizer=BROKEN", "1:0")])
def test_failures_end_failed_with_the_driver_status(cluster, data_root, tmp_path, override, exit_code):
    broken = tmp_path / "broken.model"
    broken.write_text("not a sentencepiece model")
    args = overrides(data_root, tmp_path / "run") + [override.replace("BROKEN", str(broken))]
    job_id = submit(cluster, tmp_path, *args)
    log = tmp_path / f"job-{job_id}.out"
    wait_for("the job to end", lambda: cluster.job(job_id).get("JobState") in ("FAILED", "COMPLETED"),
             cluster, job_id, log)
    job = cluster.job(job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", exit_code, "0"), log.read_text()[-3000:]
    assert f"training failed: exit status {exit_code.split(':')[0]}" in log.read_text()
    assert not os.path.exists(ROOT / "logs" / f"exit-status-{job_id}")
