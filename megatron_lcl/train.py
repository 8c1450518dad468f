"""Pre-train a ViT with Latent Compression Learning on interleaved image-text data.

    torchrun --nproc_per_node=2 pretrain_lcl.py --config examples/configs/tiny_cpu.yaml \
        run_dir=runs/tiny optimizer.lr=1e-3 parallel.tensor_model_parallel_size=2
    torchrun --nproc_per_node=2 -m megatron_lcl.train --config ...        # the same, as a module

The run directory gets the resolved `config.yaml`, `metrics.jsonl`, `tensorboard/` and
`checkpoints/`. A rerun with the same run_dir resumes from its latest checkpoint; `--load DIR`
starts from another run's checkpoint (any TP/PP). SIGTERM/SIGUSR1 (from the first line on, see
`megatron_lcl.stop_signals`): save and exit 0; during start-up, exit 0 without training.
Exit status: 0 finished, stopped by a signal or by train.exit_after_steps; 1 diverged (non-finite
loss) or a checkpoint that could not be saved or loaded (one line names it); 2 invalid configuration
(the message names the fields), an unwritable run directory, or a run directory another launch holds
(one line names the holder). torchrun's agent exits 1 whenever a
rank fails or it was signalled, so with $LCL_EXIT_STATUS_FILE set the ranks also write "<exit status>
<reason>" there ("0 preempted", "2 config_error", ...): examples/pretrain_lcl.sh exits with that
status and requeues the slurm job after "0 preempted".
"""

import argparse
import atexit
import os
import sys

from megatron_lcl.stop_signals import catch_stop_signals  # standard library only: imports nothing heavy

# The heavy imports (torch, megatron-core: seconds) happen inside `main`, after `run` caught the stop
# signals: `python -m megatron_lcl.train` runs this module's top level first. (The package's `__init__`,
# run before it, imports only the standard library.)

EXIT_CODES = {"completed": 0, "exit_after_steps": 0, "preempted": 0, "diverged": 1, "checkpoint_error": 1,
              "config_error": 2, "run_dir_in_use": 2}
EXIT_STATUS_FILE_ENV = "LCL_EXIT_STATUS_FILE"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="experiment YAML (examples/configs/*.yaml)")
    p.add_argument("--load", help="checkpoint to start from: a checkpoints/ folder or one step_* folder")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_intermixed_args(argv)  # overrides before, between or after the options


def main(argv=None) -> int:
    """Parse, validate, train; returns the exit status (see the module docstring)."""
    from megatron_lcl.checkpoint import CheckpointError, RunDirInUse, run_dir_write_error
    from megatron_lcl.config import ConfigError, config_to_yaml, load_config, validate_config

    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"checkpoint.load={args.load}"] if args.load else [])
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            validate_config(cfg)
        else:  # the world torchrun launched, before any process group is built on it
            validate_config(cfg, int(os.environ.get("WORLD_SIZE", "1")), check_files=True)
            write_error = run_dir_write_error(cfg.run_dir)
            if write_error:
                raise ConfigError(write_error)
    except ConfigError as e:
        return config_error(args, e)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    from megatron_lcl.runtime.mcore_compat import apex_report
    from megatron_lcl.training.trainer import Trainer

    if os.environ.get("RANK", "0") == "0":
        print(apex_report(), flush=True)
    trainer = Trainer(cfg)
    try:  # close() also when setup() fails: it removes the stop-signal handlers setup() installs first
        trainer.setup()
        status = trainer.train()
    except ConfigError as e:
        return config_error(args, e)
    except RunDirInUse as e:  # the same on every rank: said once
        if os.environ.get("RANK", "0") == "0":
            print(f"run directory in use: {e}", file=sys.stderr)
        return report_exit("run_dir_in_use")
    except CheckpointError as e:  # a load or save failed on some rank (every rank raises the same error)
        return checkpoint_error(e)
    finally:
        trainer.close()
    return report_exit(status)


def checkpoint_error(error: Exception) -> int:
    """One line (the error names the checkpoint, the rank and the cause), no traceback, exit 1."""
    print(f"checkpoint error: {error}", file=sys.stderr)
    return report_exit("checkpoint_error")


def config_error(args: argparse.Namespace, error: Exception) -> int:
    print(f"config error ({args.config or 'defaults'}): {error}", file=sys.stderr)
    return report_exit("config_error")


def report_exit(reason: str) -> int:
    """The exit status for `reason`, also written to $LCL_EXIT_STATUS_FILE when set. Every rank
    writes (the reasons are agreed over ranks, or a config error all ranks see): torchrun stops the
    other ranks as soon as one exits non-zero, so rank 0 alone might never get to it."""
    code, path = EXIT_CODES[reason], os.environ.get(EXIT_STATUS_FILE_ENV)
    if path:
        tmp = f"{path}.{os.environ.get('RANK', '0')}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # a config error may precede the run dir
        with open(tmp, "w") as f:
            f.write(f"{code} {reason}\n")
        os.replace(tmp, path)
    return code


def run(argv=None) -> None:
    """Command-line entry: catch stop signals (before the imports), `main`, then tear down the process
    groups and exit with its status.

    The exit skips the interpreter's teardown (`os._exit` after the exit handlers ran): every file is
    closed (checkpoints fsynced), the process groups are gone and the helper processes ended, and the
    teardown of torch and megatron-core modules took 1.5-3 s of the time from a stop signal to the
    job's end (docs/training.md, "Checkpoints").
    """
    catch_stop_signals()
    code = main(argv)
    from megatron_lcl.runtime import destroy_distributed

    destroy_distributed()
    atexit._run_exitfuncs()  # what libraries registered (logging's flush, multiprocessing's joins), now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
