"""Preemption: SIGTERM / SIGUSR1 ask the run to finish its step, save and exit 0 (slurm requeues it).

The handler only sets a flag; the trainer reads it between steps and agrees with the other ranks
(the flag travels in the per-step all-reduce), so every rank stops after the same step even when the
signal reaches them at different times.
"""

import signal

from megatron_lcl.runtime.signals import STOP_SIGNALS


class StopRequest:
    def __init__(self):
        self.signal_name = None
        self._previous = {}

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
        self.signal_name = signal.Signals(signum).name
