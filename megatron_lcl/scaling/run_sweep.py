"""Run a scaling sweep: a ladder of model sizes x compute budgets, one training run per point.

    lcl-sweep examples/scaling/tiny_ladder.yaml                 # run missing points here
    lcl-sweep examples/scaling/tiny_ladder.yaml --list          # points, FLOPs, status (+ hours at the measured rate)
    lcl-sweep examples/scaling/paper_ladder.yaml --list --assume-mfu 0.15 0.2 0.35   # + est. GPU-hours
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
from typing import Dict, List, Optional, Tuple

import yaml

from megatron_lcl.config import (LM_PRESETS, VISION_PRESETS, HeadsConfig, LMConfig, ModelConfig, VisionConfig,
                                 apply_preset, load_config)
from megatron_lcl.models.flops import PEAK_FLOPS_PER_S, flops_per_sample, parameter_counts
from megatron_lcl.scaling.sweep import (FINISHED, backfill_eval, expand_points, finished_points, flops_kwargs,
                                        load_spec, read_results, run_setup, run_sweep, write_slurm_array)

PEAK_TFLOPS = PEAK_FLOPS_PER_S["h100-sxm-bf16"] / 1e12  # for --assume-mfu estimates (data-sheet peak)

# The paper's main run (Sec. 4.1, Table 7, App. A.4): ViT-L/14 + OPT-125M (randomly initialised),
# 2048-token samples, ~64k images per step (10,240 samples of ~6.4 images), 200k steps (Sec. 4.1; Table 7
# says 20k: examples/configs/vit_l14_opt125m_laion_mmc4.yaml), on 512 A800s for 5 days. Its code is plain
# DDP (one micro-batch per step), so it ran no feature pass.
PAPER_MAIN_RUN = dict(seq_length=2048, images_per_sample=6.4, global_batch_size=10240, train_steps=200_000,
                      gpus=512, days=5, peak_key="a800-bf16")


def paper_main_run_anchor() -> dict:
    """The MFU the paper's main run implies under this FLOPs model: its model FLOPs (causal attention as
    the kernels run it; no feature pass, as its plain DDP ran) over 61,440 A800-hours at 312 TFLOP/s."""
    run = PAPER_MAIN_RUN
    model = ModelConfig(vision=apply_preset(VisionConfig(preset="L/14", layer_scale_init=0.1), VISION_PRESETS),
                        lm=apply_preset(LMConfig(preset="opt-125m", vocab_size=50272), LM_PRESETS),
                        heads=HeadsConfig(embed_dim=768, pool_num_heads=16))
    flops = flops_per_sample(model, run["seq_length"], run["images_per_sample"]) \
        * run["global_batch_size"] * run["train_steps"]
    gpu_hours = run["gpus"] * run["days"] * 24
    peak = PEAK_FLOPS_PER_S[run["peak_key"]]
    return {"flops": flops, "gpu_hours": gpu_hours, "peak_tflops": peak / 1e12,
            "implied_mfu": flops / (gpu_hours * 3600 * peak)}


def gpu_hours(flops: float, mfu: float, peak_tflops: float) -> float:
    return flops / (mfu * peak_tflops * 1e12) / 3600


def measured_rates(results_csv: str) -> Dict[Tuple[str, str], float]:
    """{(model, arm): mean training model FLOP/s} over the spec's finished, trained points (the
    `model_flops_per_s` column: training steps only, under whatever load they ran beside)."""
    rates: Dict[Tuple[str, str], List[float]] = {}
    for row in read_results(results_csv):
        if row["status"] in FINISHED and float(row.get("model_flops_per_s") or 0) > 0:
            rates.setdefault((row["model"], row["arm"]), []).append(float(row["model_flops_per_s"]))
    return {key: sum(v) / len(v) for key, v in rates.items()}


def rate_for(rates: Dict[Tuple[str, str], float], model: str, arm: str) -> Optional[float]:
    """The measured rate of the same model and arm, else of the same model, else of every point."""
    for keep in (lambda k: k == (model, arm), lambda k: k[0] == model, lambda k: True):
        values = [r for k, r in rates.items() if keep(k)]
        if values:
            return sum(values) / len(values)
    return None


def list_points(spec, assume_mfu=(), peak_tflops=PEAK_TFLOPS, num_gpus=None) -> None:
    """The grid: one line per point (arm, model, budget, seed, parameters, steps, estimated FLOPs of every
    pass the point's config runs, the step-wide L_con's feature pass included), and with `assume_mfu`
    (one or more MFUs) each point's GPU-hours estimated from the FLOPs model at each, with the MFU the
    paper's main run implies as an anchor. Once some points have finished, each point's hours of one
    process at the training throughput those points measured (`measured_rates`), and what remains."""
    done = finished_points(spec.results_csv)
    points = expand_points(spec)
    rates = measured_rates(spec.results_csv)
    # columns as wide as their longest entry (+ 2), so that every field stays its own word
    wp, wa, wm, wb = (max([n] + [len(x) + 2 for x in xs]) for n, xs in (
        (30, [p.name for p in points]), (8, [p.arm or "-" for p in points]), (8, [p.model for p in points]),
        (12, [p.budget for p in points])))
    print(f"{'#':>3} {'point':<{wp}}{'arm':<{wa}}{'model':<{wm}}{'budget':<{wb}}{'seed':>5}{'params':>14}{'steps':>9}"
          f"{'batch':>7}{'est. FLOPs':>12}{'feat. pass':>11}" + "".join(f"{f'GPU-h@{m:.0%}':>12}" for m in assume_mfu)
          + (f"{'h@measured':>12}" if rates else "") + "  status")
    total_flops, todo_hours, todo = 0.0, 0.0, 0
    for p in points:
        cfg = load_config(spec.base_config, p.overrides)
        kwargs = flops_kwargs(cfg, spec.nproc)
        flops = flops_per_sample(cfg.model, cfg.data.seq_length, spec.images_per_sample, **kwargs) \
            * cfg.train.global_batch_size * cfg.train.train_steps
        total_flops += flops
        hours = 0.0 if p.untrained or not rates else flops / rate_for(rates, p.model, p.arm) / 3600
        if p.name not in done:
            todo, todo_hours = todo + 1, todo_hours + hours
        print(f"{p.index:>3} {p.name:<{wp}}{p.arm or '-':<{wa}}{p.model:<{wm}}{p.budget:<{wb}}"
              f"{'-' if p.seed is None else p.seed:>5}{parameter_counts(cfg.model)['total']:>14,}"
              f"{cfg.train.train_steps:>9}{cfg.train.global_batch_size:>7}{flops:>12.3g}"
              f"{'yes' if kwargs['feature_pass'] else 'no':>11}"
              + "".join(f"{gpu_hours(flops, m, peak_tflops):>12,.0f}" for m in assume_mfu)
              + (f"{hours:>12.2f}" if rates else "") + f"  {'done' if p.name in done else 'todo'}")
    arms = sorted({p.arm for p in points if p.arm})
    seeds = sorted({p.seed for p in points if p.seed is not None})
    print(f"{len(points)} points ({len(arms) or 1} arm(s) {arms or ''} x {len(spec.models)} model(s) x "
          f"{len(spec.budgets)} budget(s) x {len(seeds) or 1} seed(s) {seeds or ''}, less budget restrictions); "
          f"{len(done & {p.name for p in points})} done; total {total_flops:.3g} FLOPs (every pass: the feature "
          f"pass of contrastive_batch=step included; the LM's causal attention at s^2/2)")
    if rates:
        print(f"to do: {todo} point(s), about {todo_hours:.1f} h of training in one process at the model FLOP/s "
              f"that {len(done)} finished point(s) measured (same model and arm where there is one; training "
              f"steps only, not evaluation or start-up; at the load they ran under)")
    if assume_mfu:
        print_gpu_hours(total_flops, assume_mfu, peak_tflops, num_gpus)


def print_gpu_hours(total_flops: float, assume_mfu, peak_tflops: float, num_gpus=None) -> None:
    """GPU-hours of the whole sweep at each assumed MFU, and the paper's run as the anchor."""
    for m in assume_mfu:
        hours = gpu_hours(total_flops, m, peak_tflops)
        print(f"GPU-hours at {m:.0%} MFU: {hours:,.0f} in all -- an ESTIMATE from the FLOPs model at an assumed "
              f"MFU of {m:.0%} of {peak_tflops:g} TFLOP/s per GPU (not measured)"
              + (f"; {hours / num_gpus:,.0f} h of wall time on {num_gpus} GPUs" if num_gpus else ""))
    anchor = paper_main_run_anchor()
    print(f"anchor: the paper's main run (ViT-L/14 + OPT-125M, 200k steps of ~64k images; 512 A800s x 5 days = "
          f"{anchor['gpu_hours']:,} A800-hours) is {anchor['flops']:.3g} FLOPs by this model (no feature pass: "
          f"its plain DDP ran one micro-batch per step), i.e. {anchor['implied_mfu']:.1%} MFU of the A800's "
          f"{anchor['peak_tflops']:g} TFLOP/s bf16 peak")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("spec", help="sweep spec YAML (examples/scaling/*.yaml)")
    p.add_argument("--list", action="store_true", help="print the points and their status, run nothing")
    p.add_argument("--assume-mfu", type=float, nargs="+", default=[], metavar="MFU",
                   help="with --list: estimate GPU-hours at each of these MFUs (0-1], e.g. 0.15 0.2 0.35")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS,
                   help=f"with --assume-mfu: peak TFLOP/s per GPU (default {PEAK_TFLOPS:g}: H100/H200 SXM bf16 dense)")
    p.add_argument("--num-gpus", type=int, help="with --assume-mfu: GPUs the sweep runs on (wall-time estimate)")
    p.add_argument("--emit-slurm", metavar="PATH", help="write an sbatch job-array script, run nothing")
    p.add_argument("--index", type=int, nargs="+", help="run only these point indices (see --list)")
    p.add_argument("--setup-only", action="store_true", help="run the spec's setup steps and stop")
    p.add_argument("--eval-only", action="store_true",
                   help="run the spec's eval_command on finished points that have no evaluation yet")
    args = p.parse_args(argv)
    try:  # a spec that cannot work: one line naming the file and what is wrong, status 2
        spec = load_spec(args.spec)
        points = expand_points(spec)
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"sweep spec error: {e}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.index or []) - {point.index for point in points})
    if unknown:
        p.error(f"--index {unknown}: {args.spec} has points 0-{len(points) - 1} (see --list)")
    if args.list:
        bad = [m for m in args.assume_mfu if not 0 < m <= 1]
        if bad:
            p.error(f"--assume-mfu: each MFU must be in (0, 1], got {bad}")
        list_points(spec, args.assume_mfu, args.peak_tflops, args.num_gpus)
        return 0
    if args.emit_slurm:
        write_slurm_array(spec, args.emit_slurm)
        print(f"wrote {args.emit_slurm}: {len(points)} array tasks; results -> {spec.results_csv}\n"
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
