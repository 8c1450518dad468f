"""Run a scaling sweep: a ladder of model sizes x compute budgets, one training run per point.

    lcl-sweep examples/scaling/tiny_ladder.yaml                 # run missing points here
    lcl-sweep examples/scaling/tiny_ladder.yaml --list          # points, FLOPs, status
    lcl-sweep examples/scaling/paper_ladder.yaml --list --assume-mfu 0.35   # + est. GPU-hours
    lcl-sweep SPEC --emit-slurm sweep.sbatch && sbatch sweep.sbatch   # one array task per point
    lcl-sweep SPEC --index 3                                    # one point (what a task runs)
    lcl-sweep SPEC --eval-only          # evaluate finished points that lack an evaluation
    lcl-scaling-report OUTPUT/results.csv --out docs/scaling    # fits, plots, report
    (or python tools/sweep.py ..., python -m megatron_lcl.scaling.run_sweep ...)

Results are appended to OUTPUT/results.csv (one row per finished point). Stop it at any time and
run the same command again: finished points are skipped, an interrupted one resumes from its
checkpoint. The spec format is documented in megatron_lcl/scaling/sweep.py.
"""

import argparse
import sys

from megatron_lcl.config import load_config
from megatron_lcl.models.flops import PEAK_FLOPS_PER_S, flops_per_sample, parameter_counts
from megatron_lcl.scaling.sweep import (backfill_eval, expand_points, finished_points, load_spec,
                                        run_setup, run_sweep, write_slurm_array)

PEAK_TFLOPS = PEAK_FLOPS_PER_S["h100-sxm-bf16"] / 1e12  # for --assume-mfu estimates (data-sheet peak)


def list_points(spec, assume_mfu=None, peak_tflops=PEAK_TFLOPS, num_gpus=None) -> None:
    """The grid: one line per point (arm, model, budget, seed, parameters, steps, estimated FLOPs), and
    with `assume_mfu` each point's GPU-hours estimated from the FLOPs model at that MFU."""
    done = finished_points(spec.results_csv)
    points = expand_points(spec)
    gpu_h = assume_mfu is not None
    print(f"{'#':>3} {'point':<30}{'arm':<8}{'model':<8}{'budget':<12}{'seed':>5}{'params':>14}{'steps':>9}"
          f"{'batch':>7}{'est. FLOPs':>12}" + (f"{'est. GPU-h':>12}" if gpu_h else "") + "  status")
    total_flops = 0.0
    for p in points:
        cfg = load_config(spec.base_config, p.overrides)
        flops = flops_per_sample(cfg.model, cfg.data.seq_length, spec.images_per_sample, loss_mode=cfg.loss.mode) \
            * cfg.train.global_batch_size * cfg.train.train_steps
        total_flops += flops
        hours = f"{flops / (assume_mfu * peak_tflops * 1e12) / 3600:>12,.0f}" if gpu_h else ""
        print(f"{p.index:>3} {p.name:<30}{p.arm or '-':<8}{p.model:<8}{p.budget:<12}"
              f"{'-' if p.seed is None else p.seed:>5}{parameter_counts(cfg.model)['total']:>14,}"
              f"{cfg.train.train_steps:>9}{cfg.train.global_batch_size:>7}{flops:>12.3g}{hours}  "
              f"{'done' if p.name in done else 'todo'}")
    arms = sorted({p.arm for p in points if p.arm})
    seeds = sorted({p.seed for p in points if p.seed is not None})
    print(f"{len(points)} points ({len(arms) or 1} arm(s) {arms or ''} x {len(spec.models)} model(s) x "
          f"{len(spec.budgets)} budget(s) x {len(seeds) or 1} seed(s) {seeds or ''}, less budget restrictions); "
          f"{len(done & {p.name for p in points})} done; total {total_flops:.3g} FLOPs")
    if gpu_h:
        hours = total_flops / (assume_mfu * peak_tflops * 1e12) / 3600
        print(f"GPU-hours: {hours:,.0f} in all -- an ESTIMATE from the FLOPs model at an assumed MFU of "
              f"{assume_mfu:.0%} of {peak_tflops:g} TFLOP/s per GPU (not measured)"
              + (f"; {hours / num_gpus:,.0f} h of wall time on {num_gpus} GPUs" if num_gpus else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("spec", help="sweep spec YAML (examples/scaling/*.yaml)")
    p.add_argument("--list", action="store_true", help="print the points and their status, run nothing")
    p.add_argument("--assume-mfu", type=float, help="with --list: estimate GPU-hours at this MFU (0-1)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS,
                   help=f"with --assume-mfu: peak TFLOP/s per GPU (default {PEAK_TFLOPS:g}: H100/H200 SXM bf16 dense)")
    p.add_argument("--num-gpus", type=int, help="with --assume-mfu: GPUs the sweep runs on (wall-time estimate)")
    p.add_argument("--emit-slurm", metavar="PATH", help="write an sbatch job-array script, run nothing")
    p.add_argument("--index", type=int, nargs="+", help="run only these point indices (see --list)")
    p.add_argument("--setup-only", action="store_true", help="run the spec's setup steps and stop")
    p.add_argument("--eval-only", action="store_true",
                   help="run the spec's eval_command on finished points that have no evaluation yet")
    args = p.parse_args(argv)
    spec = load_spec(args.spec)
    if args.list:
        if args.assume_mfu is not None and not 0 < args.assume_mfu <= 1:
            p.error(f"--assume-mfu must be in (0, 1], got {args.assume_mfu}")
        list_points(spec, args.assume_mfu, args.peak_tflops, args.num_gpus)
        return 0
    if args.emit_slurm:
        write_slurm_array(spec, args.emit_slurm)
        print(f"wrote {args.emit_slurm}: {len(expand_points(spec))} array tasks; results -> {spec.results_csv}\n"
              f"prepare data first if the spec has setup steps: python tools/sweep.py {args.spec} --setup-only")
        return 0
    if args.setup_only:
        run_setup(spec)
        return 0
    if args.eval_only:
        rows = backfill_eval(spec, only=args.index)
        print(f"[sweep] evaluation metrics added for {len(rows)} point(s) in {spec.results_csv}")
        return 0
    rows = run_sweep(spec, only=args.index)
    failed = [r["point"] for r in rows if r["status"] not in ("ok", "diverged")]
    print(f"[sweep] {len(rows)} point(s) run, results in {spec.results_csv}"
          + (f"; not finished: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
