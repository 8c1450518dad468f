"""The signals that ask a run to stop (save, then exit 0 for a requeue), and how helper processes
outlive them.

torchrun's agent (`os.killpg` on each rank's session) and slurm (every process of the job step)
deliver a stop signal to every process of the job, not only to the ranks. A rank finishes its step
and saves before it exits, so the processes it relies on meanwhile must not die from the signal:

- its DataLoader workers ignore it (`ignore_stop_signals`, their `worker_init_fn`);
- its background checkpoint writer (`checkpoint.writer`, spawned at set-up) is started inside
  `shielded_from_stop_signals`, so it inherits the stop signals blocked (a blocked signal stays
  blocked across fork and exec, while a Python handler does not survive exec) until it ignores them.

The rank closes its helpers itself when it exits. A rank killed outright (SIGKILL, os._exit) takes
its writer with it (PR_SET_PDEATHSIG).
"""

import signal
import threading
from contextlib import contextmanager
from multiprocessing import resource_tracker

from megatron_lcl.stop_signals import STOP_SIGNALS


def ignore_stop_signals(*_args) -> None:
    """Make this process ignore STOP_SIGNALS (a DataLoader `worker_init_fn`)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextmanager
def shielded_from_stop_signals():
    """Processes started inside do not die from STOP_SIGNALS; this process still receives them.

    The stop signals are blocked in the calling thread (main thread only; elsewhere a no-op) and
    unblocked on exit. Children forked or spawned meanwhile inherit the block. A stop signal sent
    to this process meanwhile is not lost: another thread runs its handler, or it stays pending and
    runs the handler when the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # multiprocessing's resource tracker (the first spawn starts it) unblocks SIGINT and SIGTERM
        # in this thread after starting itself (CPython 3.8-3.13): start it now, then block again.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
