"""Preemption as a user or a scheduler does it: the stop signal goes to the torchrun AGENT, which
signals each rank's whole process group (rank, DataLoader worker, the rank's background checkpoint
writer). The run must still finish its step, save it, keep the older checkpoints and resume from
it; and the launcher reports the driver's exit status (0 after a preemption save, 2 for a config
error) although torchrun's agent exits 1 in both cases.

Two 2-rank launches of the tiny model (DataLoader workers on, a background save every 20 steps):
plain torchrun + SIGTERM to the agent at step 3, before the first interval save, while two other
CPU-bound jobs run on the machine's 2 cores; then examples/pretrain_lcl.sh on the same run_dir
(resumes) + SIGUSR1 to its torchrun agent 25 steps later, with background saves behind it. While
the second runs, a third launch on its run directory is refused (the run directory's lock).

The busy jobs run in sessions of their own, as other jobs on a node do: the kernel shares the CPU
between sessions (autogroup: on in these machines' kernel and in many distributions'), so loops
started in pytest's session would slow torchrun's agent, not the ranks (each rank is its own session).
The agent gets a generous --shutdown-timeout (a hang guard): how long the stop takes depends on
the machine's load, torch's default 30 s is not a pass criterion (times in docs/training.md,
tools/bench_checkpoint.py).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_lcl.checkpoint import read_metrics
from megatron_lcl.runtime.distributed import free_port
from multirank import process_running
from test_training import build_corpus

ROOT = Path(__file__).resolve().parent.parent
SAVE_INTERVAL = 20
KEEP_LAST = 3
HANG_GUARD_S = 600  # the longest wait for a launch or a step: a hang guard, never a pass criterion
SHUTDOWN_GUARD_S = 300  # torchrun's --shutdown-timeout in the busy-machine launch (its default 30 s: see above)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preempt_data")
    build_corpus(root)
    return root


def overrides(data_root: Path, run_dir: Path) -> list:
    return [f"run_dir={run_dir}", f"data.path={data_root / 'shards'}",
            f"data.tokenizer={data_root / 'tokenizer' / 'lcl.model'}", "data.seq_length=64",
            "data.micro_batch_size=2", "data.num_workers=1", "data.shuffle_buffer=8",
            "train.global_batch_size=4", "train.train_steps=400", "optimizer.warmup_steps=2",
            "logging.log_interval=1", f"checkpoint.save_interval={SAVE_INTERVAL}",
            f"checkpoint.keep_last={KEEP_LAST}"]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)


def last_step(run_dir: Path) -> int:
    rows = read_metrics(str(run_dir), missing_ok=True)
    return rows[-1]["step"] if rows else 0


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout_s=HANG_GUARD_S) -> None:
    deadline = time.time() + timeout_s
    while last_step(run_dir) < step:
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before step {step}:\n{proc.stdout.read()}"
        assert time.time() < deadline, f"step {step} not reached in {timeout_s} s"
        time.sleep(0.1)


def signal_at_step(proc: subprocess.Popen, pid: int, sig: int, run_dir: Path, step: int,
                   timeout_s=HANG_GUARD_S) -> str:
    """Send `sig` to `pid` once run_dir has logged `step`; returns the launch's output after it exits."""
    wait_for_step(proc, run_dir, step, timeout_s)
    os.kill(pid, sig)
    output, _ = proc.communicate(timeout=timeout_s)
    return output


def torchrun_agent_of(script_pid: int) -> int:
    """The torchrun agent (`python -m megatron_lcl.torchrun`) examples/pretrain_lcl.sh started."""
    for _ in range(100):
        for child in Path(f"/proc/{script_pid}/task/{script_pid}/children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                if b"megatron_lcl.torchrun" in cmdline and not cmdline.startswith(b"env\0"):  # python, not env
                    return int(child)
            except FileNotFoundError:  # a short-lived child (mkdir) already gone
                pass
        time.sleep(0.1)
    raise AssertionError("examples/pretrain_lcl.sh started no torchrun")


def checkpoints(run_dir: Path) -> list:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))


def kept_checkpoints(last: int, *signal_saves: int) -> list:
    """What the run directory holds after training to `last`: a save every SAVE_INTERVAL steps and at
    each stop signal (`signal_saves`, and `last`), the newest KEEP_LAST of them."""
    saved = set(range(SAVE_INTERVAL, last + 1, SAVE_INTERVAL)) | {last, *signal_saves}
    return [f"step_{s:08d}" for s in sorted(saved)][-KEEP_LAST:]


def launches(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "launches.jsonl").read_text().splitlines()]


def test_stop_signal_to_the_torchrun_agent_saves_and_resumes(data_root, tmp_path):
    run_dir = tmp_path / "run"
    # 1) plain torchrun (the README's command); SIGTERM to the agent once step 3 is logged, before the
    #    first interval save.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           f"--shutdown-timeout={SHUTDOWN_GUARD_S}", str(ROOT / "pretrain_lcl.py"), "--config",
           str(ROOT / "examples/configs/tiny_cpu.yaml"), *overrides(data_root, run_dir)]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(agent, run_dir, 1)  # started (imports, set-up) before the machine gets busy
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(2)]
    try:
        output = signal_at_step(agent, agent.pid, signal.SIGTERM, run_dir, 3)
        assert all(proc.poll() is None for proc in busy)  # the machine was busy all along
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    stopped = last_step(run_dir)  # the step the ranks were at: they finish it, then save it
    assert 3 <= stopped < SAVE_INTERVAL, stopped
    assert agent.returncode == 1, output[-3000:]  # torchrun's agent exits 1 after a signal (torch's choice)
    assert f"stop signal (SIGTERM) received: saved step {stopped}" in output, output[-3000:]
    assert "forcefully exiting via" not in output, output[-3000:]  # no rank was left to the agent's SIGKILL
    assert "BrokenPipeError" not in output and "DataLoader worker" not in output, output[-3000:]
    assert checkpoints(run_dir) == kept_checkpoints(stopped)  # older saves kept, no step_*.tmp left behind
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"

    # 2) the launcher on the same run_dir resumes from that step; SIGUSR1 to its torchrun agent.
    script = subprocess.Popen(["bash", "examples/pretrain_lcl.sh", "examples/configs/tiny_cpu.yaml",
                               *overrides(data_root, run_dir)], cwd=ROOT, env=dict(env(), NPROC="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    agent = torchrun_agent_of(script.pid)
    second_launch_is_refused(script, agent, run_dir, data_root, after_step=stopped)
    output = signal_at_step(script, agent, signal.SIGUSR1, run_dir, stopped + 25)
    assert launches(run_dir)[-1]["start_step"] == stopped
    resumed_rows = [r["step"] for r in read_metrics(str(run_dir))]
    assert resumed_rows.count(stopped + 1) == 1 and resumed_rows.count(stopped) == 1  # no step redone
    second = last_step(run_dir)
    assert script.returncode == 0, output[-3000:]  # the launcher reports the ranks' "0 preempted"
    # The rank names the first stop signal it got: SIGUSR1 forwarded by the agent, or the SIGTERM of the
    # agent's shutdown when that arrives first (seen under load); either way it saved the step it was at.
    assert re.search(rf"stop signal \(SIG(USR1|TERM)\) received: saved step {second}\b", output), output[-3000:]
    assert "stopped by a signal after saving" in output
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{second:08d}"
    assert checkpoints(run_dir) == kept_checkpoints(second, stopped)


def second_launch_is_refused(first: subprocess.Popen, agent: int, run_dir: Path, data_root: Path,
                             after_step: int) -> None:
    """A second launch on the run directory of a running one (a double sbatch, a requeue racing a manual
    relaunch), through the launcher: exit 2, one line naming the directory and the holder (the first
    launch's rank 0); the first trains on untouched (before: the second resumed from the first's
    checkpoint and rewrote metrics.jsonl under it)."""
    wait_for_step(first, run_dir, after_step + 1)
    second = subprocess.run(["bash", "examples/pretrain_lcl.sh", "examples/configs/tiny_cpu.yaml",
                             *overrides(data_root, run_dir)], cwd=ROOT, env=dict(env(), NPROC="2"),
                            capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-3000:]
    refused = [line for line in second.stderr.splitlines() if line.startswith("run directory in use: ")]
    assert len(refused) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    holder = re.search(rf"run directory {run_dir} is in use by another launch \(host \S+, pid (\d+), slurm job "
                       r"none, since ", refused[0])
    assert holder, refused[0]
    with open(f"/proc/{holder.group(1)}/stat") as f:  # the first launch's rank 0, a child of its agent
        assert int(f.read().split(")")[-1].split()[1]) == agent
    assert "training failed: exit status 2 (run_dir_in_use; launcher exit 1)" in second.stderr
    assert first.poll() is None and len(launches(run_dir)) == 2


def test_a_stop_signal_in_the_first_second_of_a_launch_exits_0_without_training(data_root, tmp_path):
    """SIGUSR1 to the launcher's torchrun agent while it still imports torch (before: killed, exit 138):
    it remembers the signal, starts the ranks with it held back, then stops them with it; the ranks
    agree during their start-up and exit 0 without training; the launcher reports 0 (requeue)."""
    run_dir = tmp_path / "run"
    script = subprocess.Popen(["bash", "examples/pretrain_lcl.sh", "examples/configs/tiny_cpu.yaml",
                               *overrides(data_root, run_dir)], cwd=ROOT, env=dict(env(), NPROC="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    agent = torchrun_agent_of(script.pid)
    os.kill(agent, signal.SIGUSR1)
    output, _ = script.communicate(timeout=HANG_GUARD_S)
    assert script.returncode == 0, output[-3000:]
    assert output.count("stop signal (SIGUSR1) received during start-up: nothing trained by this launch") == 1, \
        output[-3000:]
    assert "stopped by a signal after saving; rerun the same command to resume" in output
    assert "Traceback" not in output, output[-3000:]
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


SHIELD_CHECK = """
import multiprocessing, os, signal, time
from megatron_lcl.stop_signals import shielded_from_stop_signals

received = []
signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
with shielded_from_stop_signals():
    manager = multiprocessing.get_context("spawn").Manager()  # a spawned helper with a queue
    queue = manager.Queue()
    os.kill(os.getpid(), signal.SIGTERM)  # a job-wide stop arriving during the save
    during = list(received)
helpers = [int(p) for p in open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()]
for pid in helpers:
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGUSR1)
time.sleep(1)
queue.put("alive")
print(during, received, len(helpers), queue.get())
"""


def test_processes_started_in_the_shield_outlive_stop_signals():
    """A spawned Manager (and the resource tracker it starts) survive SIGTERM + SIGUSR1; the
    signal sent to the process itself during the shield is handled exactly once."""
    proc = subprocess.run([sys.executable, "-c", SHIELD_CHECK], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    during, received, helpers, queue = proc.stdout.split()
    # Handled exactly once: at the end of the shield, or during it when another thread of the process
    # (one without the block) took it - either way, never lost and never fatal to the helpers.
    assert during in ("[]", f"[{int(signal.SIGTERM)}]"), proc.stdout
    assert (received, helpers, queue) == (f"[{int(signal.SIGTERM)}]", "2", "alive"), proc.stdout


KILLED_RANK = """
import os, signal, time
from megatron_lcl.checkpoint.writer import background_writer

writer = background_writer()  # as set-up does
writer.wait_ready()  # started: it ignores the stop signals from now on
for sig in (signal.SIGTERM, signal.SIGUSR1):  # a job-wide stop: the writer must finish an in-flight save
    os.kill(writer.process.pid, sig)
time.sleep(0.5)
assert writer.process.is_alive()
print(writer.process.pid, open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the rank dies outright (OOM killer, scancel --signal=KILL)
"""


def test_background_checkpoint_writer_outlives_stop_signals_and_dies_with_its_rank():
    """The rank's writer ignores the stop signals (the rank finishes a save in flight before it
    exits) but must not outlive a rank killed outright (it would hold the job's output pipes open)."""
    proc = subprocess.run([sys.executable, "-c", KILLED_RANK], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    helpers = [int(p) for p in proc.stdout.split()]
    assert helpers[0] in helpers[1:], "the writer (and its resource tracker) were started"
    deadline = time.time() + 120  # hang guard: the kernel kills them as the rank ends
    while time.time() < deadline and any(process_running(pid) for pid in helpers):
        time.sleep(0.2)
    assert not [pid for pid in helpers if process_running(pid)]



def test_config_error_exits_2_through_the_launcher(tmp_path):
    """The ranks exit 2, torchrun's agent 1; examples/pretrain_lcl.sh exits 2 with the message."""
    proc = subprocess.run(["bash", "examples/pretrain_lcl.sh", "examples/configs/tiny_cpu.yaml",
                           f"run_dir={tmp_path / 'run'}", "parallel.tensor_model_parallel_size=3"],
                          cwd=ROOT, env=dict(env(), NPROC="2"), capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "tensor_model_parallel_size" in proc.stderr and "config error" in proc.stderr
    assert "training failed: exit status 2 (config_error; launcher exit 1)" in proc.stderr
