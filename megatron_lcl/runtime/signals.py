"""The signals that ask a run to stop (save, then exit 0 for a requeue), and how helper processes
outlive them.

torchrun's agent and slurm deliver a stop signal to every process of the job, not only to the ranks.
A rank finishes its step and saves before it exits, so the processes it relies on meanwhile (its
DataLoader workers) must ignore the signal; the rank stops them itself when it closes.
"""

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(*_args) -> None:
    """Make this process ignore STOP_SIGNALS (a DataLoader `worker_init_fn`)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
