"""The run directory's lock (megatron_lcl/checkpoint/run_dir.py: `lock_run_dir`), one process at a time.
The double launch through torchrun and the launcher is in tests/test_preemption.py (it shares that
module's running job)."""

import os
import signal
import subprocess
import sys

import pytest

from megatron_lcl.checkpoint import RunDirInUse, lock_run_dir, unlock_run_dir

HOLDER = """
import os, sys, time
from megatron_lcl.checkpoint import lock_run_dir
lock_run_dir(sys.argv[1])
if os.fork() == 0:  # a helper (DataLoader worker, checkpoint writer) that outlives the holder
    # it speaks once past the fork hooks (which close its copy of the lock), so a loaded machine
    # cannot kill the holder while the helper, not yet scheduled, still shares the lock
    print(os.getpid(), flush=True)
    time.sleep(60)
    os._exit(0)
time.sleep(60)
"""


def test_the_holder_is_named_and_its_death_releases_the_lock(tmp_path):
    """A second taker gets one message naming the directory and the holder (host, pid, job); when the
    holder is SIGKILLed the kernel releases the lock, although a forked helper of it still lives."""
    run_dir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, SLURM_JOB_ID="4242"))
    try:
        helper = int(holder.stdout.readline())
        with pytest.raises(RunDirInUse) as refused:
            lock_run_dir(run_dir)
        message = str(refused.value)
        assert message.startswith(f"run directory {run_dir} is in use by another launch (host ")
        assert f", pid {holder.pid}, slurm job 4242, since " in message and "\n" not in message
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
        assert os.path.exists(f"/proc/{helper}")  # the helper lives on, holding no lock
        fd = lock_run_dir(run_dir)
        unlock_run_dir(fd)
    finally:
        holder.kill()
        holder.wait()
        try:
            os.kill(helper, signal.SIGKILL)
        except (OSError, UnboundLocalError):
            pass


def test_the_lock_is_taken_again_after_release(tmp_path):
    fd = lock_run_dir(str(tmp_path))
    with pytest.raises(RunDirInUse):  # also within one process: one launch at a time
        lock_run_dir(str(tmp_path))
    unlock_run_dir(fd)
    unlock_run_dir(lock_run_dir(str(tmp_path)))
