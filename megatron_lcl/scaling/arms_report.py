"""The report of an arms comparison (megatron_lcl.scaling.arms): per transfer metric one plot with
every arm (configurations, Pareto front, fits, bootstrap bands) and a markdown report that states
in words what the numbers show, with their intervals. Used by tools/scaling_report.py.
"""

import datetime
import os
from typing import List, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from megatron_lcl.scaling.arms import (ArmFit, Comparison, crossover, exponent_difference, parameter_intervals,
                                       side_by_side)

COLOURS = {"lcl": "tab:blue", "con": "tab:orange", "gen": "tab:green"}


def _fmt(x) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    return f"{x:.3g}" if abs(x) >= 1e4 or abs(x) < 1e-2 else f"{x:.4g}"


def _ci(lo_hi) -> str:
    return "" if lo_hi is None or not np.isfinite(lo_hi[0]) else f" [{_fmt(lo_hi[0])}, {_fmt(lo_hi[1])}]"


# ---------------------------------------------------------------------------------- plots

def _band(laws: list, grid: np.ndarray, level: float):
    with np.errstate(all="ignore"):  # a degenerate replicate's law may overflow far from its points
        preds = np.stack([law(grid) for law in laws if law is not None])
    tail = (1 - level) / 2 * 100
    return np.percentile(preds, tail, axis=0), np.percentile(preds, 100 - tail, axis=0)


def plot_metric(cmp: Comparison, metric: str, path: str) -> None:
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for i, arm in enumerate(cmp.arms):
        fit = cmp.fits[(arm, metric)]
        if not fit.configs:
            continue
        colour = COLOURS.get(arm, f"C{i}")
        c = np.array([x.compute for x in fit.configs])
        e = np.array([x.error for x in fit.configs])
        sd = np.array([x.errors.std(ddof=1) if len(x.errors) > 1 else 0.0 for x in fit.configs])
        ax.errorbar(c, e, yerr=sd, fmt="o", mfc="none", color=colour, alpha=0.5, ms=5, lw=0.8)
        ax.plot(c[fit.front], e[fit.front], "o", color=colour, ms=6, label=f"{arm or 'run'}: front")
        grid = np.geomspace(c.min() / 1.5, c.max() * 3, 120)
        law, boot, style = (fit.saturating, fit.saturating_boot, "-") if fit.saturating is not None \
            else (fit.power, fit.power_boot, "--")
        if law is not None:
            ax.plot(grid, law(grid), style, color=colour, lw=1.3, label=f"{arm}: " + (
                f"a(C+b)^{law.c:.2f}+d" if fit.saturating is not None else f"aC^{-law.alpha:.3f}"))
            if any(b is not None for b in boot):
                lo, hi = _band(boot, grid, cmp.level)
                ax.fill_between(grid, lo, hi, color=colour, alpha=0.12, lw=0)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("total training compute C (FLOPs, FLOPs model)")
    ax.set_ylabel(f"error = 1 - {metric}")
    ax.set_title(f"{metric}: mean over seeds (bars: sd), {cmp.level:.0%} bootstrap bands", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(path, dpi=90)


# ---------------------------------------------------------------------------------- words

def _caveat(cmp: Comparison, rows: Sequence[dict]) -> str:
    """What this amount of data cannot carry, in words (the smallest front and seed count)."""
    fronts = [len(f.front) for f in cmp.fits.values() if f.configs]
    seeds = len({str(r.get("seed", "")) for r in rows})
    parts = [f"Each fit rests on {min(fronts, default=0)}-{max(fronts, default=0)} front points"
             f" and {seeds} seed(s) per configuration"]
    if min(fronts, default=0) < 5 or seeds < 3:
        parts.append("with so few points a bootstrap interval understates the uncertainty of an exponent (it "
                     "cannot see the model's error, only the spread of these points), and the four-parameter "
                     "form is fitted only where a front has >= 5 points; read differences whose interval barely "
                     "excludes 0 as hints, not findings")
    return "; ".join(parts) + "."


def fit_lines(cmp: Comparison, fit: ArmFit) -> List[str]:
    ci = parameter_intervals(fit, cmp.level)
    lines = []
    if fit.power is not None:
        lines.append(f"  - `E = a C^c`: c = {_fmt(fit.exponent)}{_ci(ci['c'])}, a = {_fmt(fit.power.a)}, "
                     f"rmse(log E) {_fmt(fit.power.rmse_log)}, {len(fit.front)} front points")
    if fit.saturating is not None:
        p = fit.saturating.params()
        lines.append(f"  - `E = a (C + b)^c + d`: c = {_fmt(p['c'])}{_ci(ci.get('sat_c'))}, "
                     f"d = {_fmt(p['d'])}{_ci(ci.get('sat_d'))}, b = {_fmt(p['b'])} FLOPs, "
                     f"rmse(log E) {_fmt(fit.saturating.rmse_log)}")
    h = fit.heldout
    if "observed" in h:
        preds = ", ".join(f"{name} predicts {_fmt(h[name]['predicted'])} ({h[name]['relative_error']:+.0%})"
                          for name in ("power", "saturating") if name in h)
        lines.append(f"  - held out: fit without budget {h['budget']}; best error there "
                     f"{_fmt(h['observed'])} ({h['config']}, C = {_fmt(h['compute'])}): {preds or 'no fit'}")
    elif h.get("note"):
        lines.append(f"  - held out: {h['note']}")
    lines += [f"  - note: {n}" for n in fit.notes]
    return lines


def _largest_compute_sentence(cmp: Comparison, metric: str) -> str:
    """Each arm's best configuration at the largest ladder budget, in words."""
    parts = []
    for arm in cmp.arms:
        fit = cmp.fits[(arm, metric)]
        top = [c for c in fit.configs if cmp.ladder and c.budget == cmp.ladder[-1]]
        if top:
            best = min(top, key=lambda c: c.error)
            sd = best.errors.std(ddof=1) if len(best.errors) > 1 else float("nan")
            parts.append(f"{arm} {_fmt(best.error)}" + (f" ± {_fmt(sd)}" if np.isfinite(sd) else "")
                         + f" ({best.model}, {len(best.errors)} seed(s))")
    return f"At the largest budget ({cmp.ladder[-1] if cmp.ladder else '-'}), best error: " + "; ".join(parts) + "."


def pair_lines(cmp: Comparison, metric: str) -> List[str]:
    lines = []
    arms = cmp.arms
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            fa, fb = cmp.fits[(a, metric)], cmp.fits[(b, metric)]
            diff = exponent_difference(fa, fb, cmp.level)
            if diff is None:
                continue
            verdict = ("the interval includes 0: no difference in how fast the error falls is detectable"
                       if diff["lo"] <= 0 <= diff["hi"] else
                       f"the interval excludes 0: {a}'s error falls {'faster' if diff['hi'] < 0 else 'slower'} "
                       f"with compute than {b}'s")
            lines.append(f"- {a} vs {b}: c_{a} - c_{b} = {_fmt(diff['delta'])} [{_fmt(diff['lo'])}, "
                         f"{_fmt(diff['hi'])}] ({diff['n']} paired replicates): {verdict}.")
            x = crossover(fa, fb, cmp.level)
            if x is None:
                continue
            lo, hi = x["range"]
            if x["in_range"]:
                where = f"the fitted curves ({x['form']}) cross at C = {', '.join(_fmt(c) for c in x['in_range'])}"
            else:
                lower = a if x["a_lower_at_max"] else b
                where = (f"no crossover in range ({_fmt(lo)}-{_fmt(hi)} FLOPs; {x['form']} fits); {lower} is lower "
                         f"at the largest compute")
            extra = (f"; extrapolated, they would cross at C = {', '.join(_fmt(c) for c in x['extrapolated'])}"
                     f" (beyond the data: not a finding)" if x["extrapolated"] else "")
            boot = (f"; {x['boot_fraction']:.0%} of {x['boot_n']} paired bootstrap replicates cross in range"
                    + (f", at C in{_ci(x['boot_interval'])}" if x["boot_interval"] else ""))
            lines.append(f"  {where}{extra}{boot}.")
    return lines


def side_table(rows: Sequence[dict], metrics: Sequence[str]) -> List[str]:
    entries = side_by_side(rows, metrics)
    if not entries:
        return []
    head = "| arm | model | steps | budget | contrastive batch (samples) | seeds | FLOPs | " + \
        " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in sorted(entries, key=lambda e: (e["arm"], e["model"], e["train_steps"], e["budget"])):
        cells = ["-" if e[m] is None else f"{e[m][0]:.3f} ± {e[m][1]:.3f}" for m in metrics]
        lines.append(f"| {e['arm']} | {e['model']} | {e['train_steps']} | {e['budget']} | {e['contrastive_batch']} | "
                     f"{e['seeds']} | {_fmt(e['train_flops'])} | " + " | ".join(cells) + " |")
    return lines


def configs_table(cmp: Comparison, metric: str) -> List[str]:
    lines = ["| arm | model | budget | FLOPs | error (mean) | sd | seeds | front |", "|---|---|---|---|---|---|---|---|"]
    for arm in cmp.arms:
        fit = cmp.fits[(arm, metric)]
        for i, c in enumerate(fit.configs):
            sd = c.errors.std(ddof=1) if len(c.errors) > 1 else float("nan")
            lines.append(f"| {arm} | {c.model} | {c.budget} | {_fmt(c.compute)} | {c.error:.4f} | {_fmt(sd)} | "
                         f"{len(c.errors)} | {'yes' if i in fit.front else ''} |")
    return lines


def write_report(cmp: Comparison, rows: Sequence[dict], out_dir: str, title: str, command: str,
                 csv_path: str, spec: Optional[str] = None, table_metrics: Sequence[str] = ()) -> str:
    os.makedirs(out_dir, exist_ok=True)
    seeds = sorted({str(r.get("seed", "")) for r in rows})
    lines = [f"# Objectives compared on transfer at matched compute: {title}", "",
             f"Generated by `{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
             f"from `{csv_path}`: {len(rows)} finished runs; arms {cmp.arms}; seeds {seeds}; ladder budgets "
             f"{cmp.ladder} (other budgets: side points, below). Error = 1 - metric (floored at 1e-3), mean over "
             f"seeds; compute C = total training FLOPs of the whole model (FLOPs model). Fits on each arm's "
             f"Pareto front; intervals: {cmp.level:.0%} bootstrap percentiles over {cmp.num_samples} replicates "
             f"(configurations and, within each, seeds resampled with replacement)."]
    if spec:
        lines += ["", f"Reproduce: `python tools/sweep.py {spec}` (restartable: skips finished points), then the "
                  "command above."]
    lines += ["", "## What the data shows", "", _caveat(cmp, rows), ""]
    for metric in cmp.metrics:
        lines += [f"### {metric}", "", _largest_compute_sentence(cmp, metric), ""]
        lines += pair_lines(cmp, metric) + [""]
        for arm in cmp.arms:
            lines += [f"- {arm}:"] + fit_lines(cmp, cmp.fits[(arm, metric)])
        lines += ["", f"![{metric}](error_vs_compute_{metric}.png)", ""]
    side = side_table(rows, list(table_metrics or cmp.metrics))
    if side:
        lines += ["## Side points at matched compute (e.g. the contrastive batch)", "",
                  "Points that differ from a ladder point only in their budget's settings (same arm, model and "
                  "steps); metric values (not errors), mean ± sd over seeds.", ""] + side + [""]
    lines += ["## Configurations", ""]
    for metric in cmp.metrics:
        lines += [f"### {metric}", ""] + configs_table(cmp, metric) + [""]
    for metric in cmp.metrics:
        plot_metric(cmp, metric, os.path.join(out_dir, f"error_vs_compute_{metric}.png"))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    return text


def bootstrap_summary(cmp: Comparison, metric: str) -> dict:
    """Machine-readable numbers of one metric (for report.json): exponents, intervals, differences."""
    out = {}
    for arm in cmp.arms:
        fit = cmp.fits[(arm, metric)]
        ci = parameter_intervals(fit, cmp.level)
        out[arm] = {"exponent": fit.exponent, "exponent_ci": ci["c"], "front": len(fit.front),
                    "saturating": fit.saturating.params() if fit.saturating else None,
                    "saturating_ci": {k[4:]: v for k, v in ci.items() if k.startswith("sat_")},
                    "heldout": fit.heldout}
    for i, a in enumerate(cmp.arms):
        for b in cmp.arms[i + 1:]:
            fa, fb = cmp.fits[(a, metric)], cmp.fits[(b, metric)]
            out[f"{a}-{b}"] = {"exponent_difference": exponent_difference(fa, fb, cmp.level),
                               "crossover": crossover(fa, fb, cmp.level)}
    return out

