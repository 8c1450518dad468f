"""Preemption: SIGTERM / SIGUSR1 ask the run to finish its step, save and exit 0 (slurm requeues it).

The handler only sets a flag; the trainer reads it at points where the ranks agree (the flag travels
in an all-reduce): after the process group starts, before the first step, and in every step's
all-reduce. So every rank stops at the same point even when the signal reaches them at different
times. A signal that arrived before `install()` (during the imports: `megatron_lcl.stop_signals`) or
a stop file counts as well.
"""

import signal

from megatron_lcl.stop_signals import STOP_SIGNALS, stop_requested


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
