"""The stop signals (SIGTERM, SIGUSR1: save, then exit 0 for a requeue), caught from a process's first
line. Standard library only: this module is imported before torch and megatron-core, whose imports
take seconds (~7 s for megatron-core on a loaded node) during which a signal's default action would
kill the process.

- `catch_stop_signals()`: the first statement of a rank (`pretrain_lcl.py`) and of the launcher's
  agent (`megatron_lcl.runtime.torchrun`). A stop signal from then on is remembered, not fatal; it
  also unblocks the stop signals, which a rank inherits blocked from that agent (so that none arrives
  between its exec and this call, where it would still be fatal).
- `stop_requested()`: the first stop signal caught, or the one named in the stop file
  (`$LCL_STOP_FILE`, written by `examples/pretrain_lcl.sh` when its batch shell gets the signal: a
  request no process can miss, whenever it starts), else None.
- `megatron_lcl.torchrun`: torchrun's agent, holding stop signals back while it starts the ranks.

- `StopRequest`: how the trainer acts on a request. Its handler only sets a flag; the trainer reads
  it at points where the ranks agree (the flag travels in an all-reduce): after the process group
  starts, before the first step, and in every step's all-reduce, so every rank stops after the same
  step even when the signal reaches them at different times. A signal caught before `install()`
  (during the imports) or a stop file counts as well.

Helper processes must outlive a stop signal: torchrun's agent (`os.killpg` on each rank's session)
and slurm (every process of the job step) deliver it to every process of the job, not only to the
ranks, and a rank finishes its step and saves before it exits:

- its DataLoader workers ignore it (`ignore_stop_signals`, their `worker_init_fn`);
- its background checkpoint writer (`checkpoint.writer`, spawned at set-up) is started inside
  `shielded_from_stop_signals`, so it inherits the stop signals blocked (a blocked signal stays
  blocked across fork and exec, while a Python handler does not survive exec) until it ignores them.

The rank closes its helpers itself when it exits. A rank killed outright (SIGKILL, os._exit) takes
its writer with it (PR_SET_PDEATHSIG).
"""

import os
import signal
import threading
from contextlib import contextmanager
from multiprocessing import resource_tracker
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_FILE_ENV = "LCL_STOP_FILE"

_caught = []  # names of the stop signals caught by `catch_stop_signals`' handler, first first


def catch_stop_signals() -> None:
    """From now on a stop signal is remembered (`stop_requested`) instead of ending the process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, remember_stop_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a pending one is handled now


def remember_stop_signal(signum, _frame=None) -> None:
    _caught.append(signal.Signals(signum).name)


def caught_stop_signal() -> Optional[str]:
    """The name of the first stop signal this process caught (not counting the stop file), else None."""
    return _caught[0] if _caught else None


def stop_requested() -> Optional[str]:
    """The name of the first stop signal caught, else the stop file's signal, else None."""
    if _caught:
        return _caught[0]
    path = os.environ.get(STOP_FILE_ENV)
    if path and os.path.exists(path):
        try:
            with open(path) as f:
                return f.read().strip() or "stop file"
        except OSError:
            return "stop file"
    return None


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


class StopRequest:
    def __init__(self):
        self._signal_name = None
        self._previous = {}

    @property
    def signal_name(self):
        """The first stop signal this process got (or the stop file's), None without one."""
        return self._signal_name or stop_requested()

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        self._signal_name = self._signal_name or signal.Signals(signum).name
