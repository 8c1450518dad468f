"""Run a scaling sweep: a ladder of model sizes x compute budgets, one training run per point.

    python tools/sweep.py examples/scaling/tiny_ladder.yaml                 # run missing points here
    python tools/sweep.py examples/scaling/tiny_ladder.yaml --list          # points, FLOPs, status
    python tools/sweep.py SPEC --emit-slurm sweep.sbatch && sbatch sweep.sbatch   # one array task per point
    python tools/sweep.py SPEC --index 3                                    # one point (what a task runs)
    python tools/sweep.py SPEC --eval-only          # probe accuracy for finished points that lack it
    python tools/scaling_report.py OUTPUT/results.csv --out docs/scaling    # fits, plots, report

Results are appended to OUTPUT/results.csv (one row per finished point). Stop it at any time and
run the same command again: finished points are skipped, an interrupted one resumes from its
checkpoint. The spec format is documented in megatron_lcl/scaling/sweep.py.
"""

import argparse
import sys


from megatron_lcl.scaling.sweep import (backfill_eval, expand_points, finished_points, load_spec,
                                        run_setup, run_sweep, write_slurm_array)


def list_points(spec) -> None:
    from megatron_lcl.models.flops import flops_per_sample, parameter_counts
    from megatron_lcl.config import load_config

    done = finished_points(spec.results_csv)
    print(f"{'#':>3} {'point':<28}{'params':>12}{'steps':>8}{'batch':>7}{'est. FLOPs':>12}  status")
    for p in expand_points(spec):
        cfg = load_config(spec.base_config, p.overrides)
        flops = flops_per_sample(cfg.model, cfg.data.seq_length, spec.images_per_sample) \
            * cfg.train.global_batch_size * cfg.train.train_steps
        print(f"{p.index:>3} {p.name:<28}{parameter_counts(cfg.model)['total']:>12,}{cfg.train.train_steps:>8}"
              f"{cfg.train.global_batch_size:>7}{flops:>12.3g}  {'done' if p.name in done else 'todo'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("spec", help="sweep spec YAML (examples/scaling/*.yaml)")
    p.add_argument("--list", action="store_true", help="print the points and their status, run nothing")
    p.add_argument("--emit-slurm", metavar="PATH", help="write an sbatch job-array script, run nothing")
    p.add_argument("--index", type=int, nargs="+", help="run only these point indices (see --list)")
    p.add_argument("--setup-only", action="store_true", help="run the spec's setup steps and stop")
    p.add_argument("--eval-only", action="store_true",
                   help="run the spec's eval_command on finished points that have no probe accuracy yet")
    args = p.parse_args(argv)
    spec = load_spec(args.spec)
    if args.list:
        list_points(spec)
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
        print(f"[sweep] probe accuracy added for {len(rows)} point(s) in {spec.results_csv}")
        return 0
    rows = run_sweep(spec, only=args.index)
    failed = [r["point"] for r in rows if r["status"] not in ("ok", "diverged")]
    print(f"[sweep] {len(rows)} point(s) run, results in {spec.results_csv}"
          + (f"; not finished: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
