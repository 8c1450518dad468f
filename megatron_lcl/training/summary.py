"""Summarise a run directory: first/last metrics, throughput, and a loss-curve PNG.

    python -m megatron_lcl.training.summary RUN_DIR [--plot loss_curve.png]
"""

import argparse
from typing import List

from matplotlib.figure import Figure

from megatron_lcl.checkpoint.run_dir import read_metrics


def summary_text(rows: List[dict]) -> str:
    first, last = rows[0], rows[-1]

    def fmt(row):
        s = f"loss {row['loss']:.4f} (lm {row['lm_loss']:.4f}, con {row['con_loss']:.4f}), top1 {row['con_top1']:.2f}"
        if "effective_rank" in row:
            s += f", effective rank of v {row['effective_rank']:.1f}"
        return s

    mean_step = sum(r["step_time_s"] for r in rows) / len(rows)
    lines = [f"  step {first['step']:>6}: {fmt(first)}",
             f"  step {last['step']:>6}: {fmt(last)}",
             f"  consumed: {last['consumed_samples']} samples, {last['consumed_images']} images, "
             f"{last['consumed_tokens']} tokens; skipped steps: {last['skipped_steps']}",
             f"  mean step time {mean_step:.3f} s, last {last['tokens_per_s']:.0f} tokens/s, "
             f"{last['images_per_s']:.1f} images/s"]
    skips = {k: v for k, v in last.items() if k.startswith("skipped/")}
    if skips:
        lines.append("  data skipped: " + ", ".join(f"{k[8:]} {v}" for k, v in skips.items()))
    return "\n".join(lines)


def plot(rows: List[dict], path: str) -> None:
    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    for key in ("loss", "lm_loss"):
        axes[0].plot(steps, [r[key] for r in rows], label=key)
    axes[0].set_title("L = L_gen + lambda L_con"), axes[0].legend()
    axes[1].plot(steps, [r["con_loss"] for r in rows], label="con_loss")
    axes[1].plot(steps, [r["con_top1"] for r in rows], label="con_top1")
    axes[1].set_title("contrastive"), axes[1].legend()
    ranked = [r for r in rows if "effective_rank" in r]
    axes[2].plot([r["step"] for r in ranked], [r["effective_rank"] for r in ranked])
    axes[2].set_title("collapse monitor: effective rank of v_i")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--plot", help="write a loss-curve PNG here")
    args = p.parse_args(argv)
    rows = read_metrics(args.run_dir)
    print(f"run {args.run_dir}: {len(rows)} logged steps")
    print(summary_text(rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"  loss curve: {args.plot}")


if __name__ == "__main__":
    main()
