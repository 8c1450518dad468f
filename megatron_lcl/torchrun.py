"""torchrun (torch.distributed.run), started so that a stop signal at any moment of its start-up ends
as a requeue rather than a failed or hung job:

    python -m megatron_lcl.torchrun [torchrun's arguments]        (what examples/pretrain_lcl.sh runs)

torch's agent (torch 2.13) has no handler for the stop signals until it starts the workers
(`PContext.start`), after importing torch (seconds) and the rendezvous: SIGUSR1/SIGTERM before that
kill it (slurm: FAILED). Its handler then raises `SignalException` wherever the main thread is, also
inside `start_processes` before the agent has recorded the workers: its shutdown then signals nobody
and the workers are orphaned (or wait for a missing peer until the shutdown timeout). And a second
stop signal interrupts the shutdown's wait for the ranks' saves. Here:

1. the stop signals are caught from the first line (`catch_stop_signals`): remembered, not fatal;
2. while the workers start, torch's handler only remembers, and the stop signals are blocked in the
   starting thread, so every rank inherits them blocked (a rank unblocks them once its own handler is
   in place: the first line of `pretrain_lcl.py`);
3. once the agent holds the workers, a stop signal remembered so far is raised to the agent itself:
   torch's handler shuts the workers down with it, as it does for a signal that arrives later (each
   rank saves, or in its start-up exits without training; exit status 0, the launcher requeues);
4. after the first stop signal, later ones are ignored by the agent: its shutdown keeps waiting for the
   ranks (up to --shutdown-timeout) instead of leaving them to a SIGKILL;
5. once its ranks have exited, the agent exits without the interpreter's teardown (`exit_now`).

Upgrade check (torch): `elastic.multiprocessing.api` still installs `_terminate_process_handler` by
name in `PContext.start`, and `LocalElasticAgent._start_workers` assigns `self._pcontext`.
"""

from megatron_lcl.stop_signals import STOP_SIGNALS, catch_stop_signals, caught_stop_signal, remember_stop_signal

if __name__ == "__main__":
    catch_stop_signals()  # first (1)

import atexit  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

STOP_NAMES = [signal.Signals(s).name for s in STOP_SIGNALS]
_state = {"starting": False, "stopping": False}


def _agent_handler(torch_handler):
    """torch's handler (it raises SignalException), except: while workers start, remember (2); after the
    first stop signal, ignore further stop signals (4)."""

    @functools.wraps(torch_handler)
    def handle(signum, frame):
        if signum in STOP_SIGNALS:
            if _state["starting"]:
                remember_stop_signal(signum)
                return
            if _state["stopping"]:
                print(f"torchrun agent: {signal.Signals(signum).name} ignored, already stopping the ranks",
                      file=sys.stderr, flush=True)
                return
            _state["stopping"] = True
        torch_handler(signum, frame)

    return handle


def _held_start(start_workers):
    """LocalElasticAgent._start_workers with the stop signals held back (2), then re-raised (3)."""

    @functools.wraps(start_workers)
    def start(self, *args, **kwargs):
        _state["starting"] = True
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return start_workers(self, *args, **kwargs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending signal is remembered now
            _state["starting"] = False
            caught = caught_stop_signal()
            if caught and not _state["stopping"]:
                os.kill(os.getpid(), signal.Signals[caught])  # torch's handler: SignalException -> shutdown

    return start


def with_stop_signals_handled(argv: list) -> list:
    """torchrun's arguments with SIGTERM and SIGUSR1 among --signals-to-handle (torch's default lacks USR1)."""
    flags = ("--signals-to-handle", "--signals_to_handle")
    out, i, found = [], 0, False
    while i < len(argv):
        key, eq, value = argv[i].partition("=")
        if key in flags and (eq or i + 1 < len(argv)):
            if not eq:
                i, value = i + 1, argv[i + 1]
            names = [n.strip() for n in value.split(",") if n.strip()]
            out.append(f"--signals-to-handle={','.join(names + [n for n in STOP_NAMES if n not in names])}")
            found = True
        else:
            out.append(argv[i])
        i += 1
    if not found:
        out.insert(0, "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    return out


def main(argv=None) -> int:
    """torchrun with the stop signals handled as above; returns the agent's exit status (0, or 1 after a
    stop signal or a failed rank, as torch's)."""
    from torch.distributed import run
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing import api
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    api._terminate_process_handler = _agent_handler(api._terminate_process_handler)
    LocalElasticAgent._start_workers = _held_start(LocalElasticAgent._start_workers)
    try:
        run.main(with_stop_signals_handled(sys.argv[1:] if argv is None else list(argv)))
    except api.SignalException as e:  # the ranks are down and have reported: one line, not a traceback
        print(f"torchrun agent: stopped by {e.sigval.name} after its ranks exited (their exit status is "
              f"what counts; the agent's is 1, as torch's)", file=sys.stderr, flush=True)
        return 1
    except ChildFailedError as e:  # the ranks said why (one line each, above): the exit codes, no traceback
        codes = ", ".join(f"rank {rank}: {_exit(f.exitcode)}" for rank, f in sorted(e.failures.items()))
        print(f"torchrun agent: ranks failed ({codes})", file=sys.stderr, flush=True)
        return 1
    return 0


def exit_now(code: int) -> None:
    """End the agent without the interpreter's teardown: its ranks are gone and have reported, the exit
    handlers run first (logging's flush). The teardown is a garbage collection over everything torch
    imported: measured 27-55 s after the ranks had exited, with the agent sharing its session's CPU with
    other jobs on a busy 2-core machine (py-spy: `gc_collect_main`, no Python frame left), time in which
    slurm's KillWait may run out before examples/pretrain_lcl.sh requeues the job."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit(code: int) -> str:
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


if __name__ == "__main__":
    exit_now(main())
