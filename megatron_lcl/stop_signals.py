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

Who acts on a request: the trainer (`megatron_lcl.training.signals.StopRequest`), at points where the
ranks agree (after the process group starts, before the first step, every step).
"""

import os
import signal
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
