"""Fit power laws to a sweep's results.csv and write PNG plots and a short markdown report.

    lcl-scaling-report runs/scaling/tiny_ladder/results.csv --out docs/scaling
    (or python tools/scaling_report.py ..., python -m megatron_lcl.scaling.report ...)

Fits (all with bootstrap confidence intervals over the runs):
  loss vs compute     L(C) = a C^-alpha (and E + a C^-alpha when there are >= 5 frontier runs), on
                      the compute-optimal frontier: the runs no cheaper run beats (IsoFLOP sweeps:
                      the best run of each budget); also L_gen and L_con on the same runs
  loss vs parameters  L(N) = a N^-alpha over the model sizes of the budget with the most compute
                      (IsoFLOP sweeps: the per-budget profiles and their parabolas, no power law)
  optimal size        N_opt(C) = k C^b: for IsoFLOP sweeps (every size at the same FLOPs per budget)
                      the minimum of a parabola in log N per budget; otherwise the frontier runs' N
Writes OUT/report.md, OUT/loss_vs_compute.png, OUT/loss_vs_params.png, OUT/optimal_params.png.

A sweep with `arms` (objectives compared at matched compute; megatron_lcl/scaling/arms.py) gets the
comparison report instead: per transfer metric (`--metrics`), error = 1 - metric vs compute on each
arm's Pareto front, fits E = a C^c and E = a (C + b)^c + d with bootstrap intervals over points and
seeds, exponent differences, crossovers, a held-out check; OUT/report.md, report.json and
OUT/error_vs_compute_<metric>.png.

    lcl-scaling-report runs/scaling/lcl_vs_con/results.csv --out docs/scaling/lcl_vs_con \
        --spec examples/scaling/lcl_vs_con.yaml

A sweep whose evaluation writes per-item results (`megatron_lcl.eval.transfer --per-item`) gets the
stricter analysis from `python -m megatron_lcl.scaling.study_report` (megatron_lcl/scaling/study.py:
untrained baseline, paired item x seed bootstrap with the front inside every replicate, the naive
held-out predictor, the crossover rule, the power calculation).
"""

import argparse
import datetime
import json
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from megatron_lcl.scaling.arms import compare
from megatron_lcl.scaling.arms_report import bootstrap_summary, write_report as write_arms_report
from megatron_lcl.scaling.fit import (PowerLaw, bootstrap_laws, fit_power_law, fit_with_ci,
                                      isoflop_optima, pareto_frontier, prediction_band)
from megatron_lcl.scaling.sweep import expand_points, load_spec, read_results

NUMERIC = ("params_total", "params_non_embedding", "train_flops", "tokens", "images", "loss", "lm_loss",
           "con_loss", "con_top1", "probe_accuracy", "train_steps", "global_batch_size", "step_time_s",
           "model_flops_per_s")


@dataclass
class Analysis:
    loss_key: str
    params_key: str
    frontier: np.ndarray  # row indices on the compute-optimal frontier (IsoFLOP: best run per budget), by compute
    loss_vs_compute: Optional[PowerLaw] = None
    loss_vs_compute_floor: Optional[PowerLaw] = None
    loss_vs_params: Optional[PowerLaw] = None
    params_budget: str = ""
    isoflop: bool = False
    optima: list = field(default_factory=list)  # (compute, N_opt, L_opt, from parabola) per budget / frontier run
    optimal_params: Optional[PowerLaw] = None
    term_fits: dict = field(default_factory=dict)  # {lm_loss|con_loss: PowerLaw} on the same frontier runs
    notes: List[str] = field(default_factory=list)


def load_rows(csv_path: str, spec_path: Optional[str] = None) -> List[dict]:
    """Finished (status ok) rows with their numeric columns as floats (empty -> nan); with a spec,
    only the points it defines (a CSV may hold points of an earlier version of the spec)."""
    rows = [r for r in read_results(csv_path) if r["status"] == "ok"]
    if spec_path is not None:
        names = {p.name for p in expand_points(load_spec(spec_path))}
        rows = [r for r in rows if r["point"] in names]
    for r in rows:
        for key in NUMERIC:
            r[key] = float(r[key]) if r.get(key) not in (None, "") else float("nan")
    return rows


def column(rows: List[dict], key: str) -> np.ndarray:
    return np.array([r[key] for r in rows], dtype=float)


def is_isoflop(rows: List[dict]) -> bool:
    """Every budget's runs have (nearly) the same FLOPs, and some budget has >= 2 sizes."""
    budgets = {}
    for r in rows:
        budgets.setdefault(r["budget"], []).append(r["train_flops"])
    return any(len(c) >= 2 for c in budgets.values()) and all(max(c) / min(c) < 1.5 for c in budgets.values())


def budget_groups(rows: List[dict]) -> dict:
    """{budget: [row indices]} in order of first appearance."""
    groups = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["budget"], []).append(i)
    return groups


def frontier_runs(rows: List[dict], c: np.ndarray, l: np.ndarray, isoflop: bool) -> np.ndarray:
    """IsoFLOP sweeps: the best run of each budget; otherwise the runs no cheaper run beats."""
    if not isoflop:
        return pareto_frontier(c, l)
    best = [min(idx, key=lambda i: l[i]) for idx in budget_groups(rows).values()]
    return np.array(sorted(best, key=lambda i: c[i]), dtype=int)


def analyse(rows: List[dict], loss_key: str = "loss", params_key: str = "params_non_embedding",
            num_samples: int = 1000, level: float = 0.9) -> Analysis:
    c, n, l = column(rows, "train_flops"), column(rows, params_key), column(rows, loss_key)
    isoflop = is_isoflop(rows)
    a = Analysis(loss_key, params_key, frontier_runs(rows, c, l, isoflop), isoflop=isoflop)
    _fit_compute(a, rows, c, l, num_samples, level)
    _fit_params(a, rows, c, n, l, num_samples, level)
    _fit_optimal_size(a, rows, c, n, l, num_samples, level)
    return a


def _fit_compute(a: Analysis, rows, c, l, num_samples: int, level: float) -> None:
    f = a.frontier
    if len(f) < 2:
        a.notes.append("fewer than 2 runs on the compute frontier: no loss-vs-compute fit")
        return
    a.loss_vs_compute = fit_with_ci(c[f], l[f], num_samples=num_samples, level=level)
    for term in ("lm_loss", "con_loss"):
        if term != a.loss_key:
            a.term_fits[term] = fit_with_ci(c[f], column(rows, term)[f], num_samples=num_samples, level=level)
    if len(f) >= 5:
        a.loss_vs_compute_floor = fit_with_ci(c[f], l[f], irreducible=True, num_samples=num_samples // 4,
                                              level=level)


def _fit_params(a: Analysis, rows, c, n, l, num_samples: int, level: float) -> None:
    """L(N) over the sizes of the budget with the most compute (not for IsoFLOP sweeps: there a
    budget's L(N) is a profile with a minimum, not a power law)."""
    groups = budget_groups(rows)
    a.params_budget = max(groups, key=lambda b: np.mean(c[groups[b]]))
    if a.isoflop:
        a.notes.append("IsoFLOP sweep: loss vs parameters at fixed compute is a profile with a minimum "
                       "(parabolas in the loss-vs-parameters plot), so no L(N) power law is fitted")
        return
    sel = groups[a.params_budget]
    if len(set(n[sel])) >= 2:
        a.loss_vs_params = fit_with_ci(n[sel], l[sel], num_samples=num_samples, level=level)


def _edge_notes(rows, n, l, skip: set) -> List[str]:
    """IsoFLOP budgets (not in `skip`) whose best run is the smallest or largest size tried."""
    notes = []
    for budget, idx in budget_groups(rows).items():
        if budget in skip:
            continue
        best = min(idx, key=lambda i: l[i])
        if len(idx) >= 3 and n[best] in (n[idx].min(), n[idx].max()):
            side = "smallest" if n[best] == n[idx].min() else "largest"
            notes.append(f"budget {budget}: the best run is the {side} size tried, so the optimum lies "
                         f"outside the ladder; add {side.replace('est', 'er')} sizes to locate it")
    return notes


def _fit_optimal_size(a: Analysis, rows, c, n, l, num_samples: int, level: float) -> None:
    if a.isoflop:
        optima = isoflop_optima([r["budget"] for r in rows], c, n, l)
        a.optima = [(o.compute, o.params_opt, o.loss_opt, o.from_parabola) for o in optima]
        a.notes += _edge_notes(rows, n, l, skip={o.budget for o in optima if o.from_parabola})
    else:
        a.optima = [(c[i], n[i], l[i], False) for i in a.frontier]
        a.notes.append("budgets are steps x batch (not IsoFLOP): along the frontier the data grows with the "
                       "compute, so N_opt(C) from frontier runs is indicative only; IsoFLOP budgets "
                       "(`flops:` in the spec) measure it properly")
    oc, on = np.array([o[0] for o in a.optima]), np.array([o[1] for o in a.optima])
    if len(a.optima) >= 3 and len(set(on)) >= 2:
        a.optimal_params = fit_with_ci(oc, on, num_samples=num_samples, level=level)
    else:
        a.notes.append("the optimal size does not change over the frontier (or < 3 points): no N_opt(C) fit")


# ---------------------------------------------------------------------------------- plots

def _plain_log_axes(ax) -> None:
    """Log axes with plain numbers (2.5, not 2.5x10^0) on the y axis."""
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter() if ax.get_ylim()[1] / ax.get_ylim()[0] < 10 else NullFormatter())
    ax.yaxis.set_minor_locator(LogLocator(subs="all"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _draw_fit(ax, x, y, law: Optional[PowerLaw], label: str, irreducible: bool = False) -> None:
    if law is None:
        return
    grid = np.geomspace(min(x), max(x), 100)
    ax.plot(grid, law(grid), "k--", lw=1.2, label=label)
    laws = bootstrap_laws(x, y, lambda bx, by: fit_power_law(bx, by, irreducible), 200, seed=1)
    lo, hi = prediction_band(laws, grid)
    ax.fill_between(grid, lo, hi, color="k", alpha=0.12, lw=0)


def plot_loss_vs_compute(rows, a: Analysis, path: str) -> None:
    keys = [a.loss_key, "lm_loss", "con_loss"] + (["probe_accuracy"] if _has_probe(rows) else [])
    fig = Figure(figsize=(5 * len(keys), 4))
    axes = fig.subplots(1, len(keys))
    c = column(rows, "train_flops")
    size = {r["model"]: r[a.params_key] for r in rows}
    models = sorted(size, key=size.get)
    for ax, key in zip(axes, keys):
        for m in models:
            idx = sorted((i for i, r in enumerate(rows) if r["model"] == m), key=lambda i: c[i])
            ax.plot(c[idx], column(rows, key)[idx], "o-", ms=4, label=f"{m} ({rows[idx[0]][a.params_key]:,.0f})")
        ax.set_xscale("log"), ax.set_yscale("log" if key != "probe_accuracy" else "linear")
        ax.set_xlabel("training FLOPs C"), ax.set_title(key)
        if key != "probe_accuracy":
            _plain_log_axes(ax)
    f = a.frontier
    axes[0].plot(c[f], column(rows, a.loss_key)[f], "ks", mfc="none", ms=9, label="frontier")
    if a.loss_vs_compute is not None:
        _draw_fit(axes[0], c[f], column(rows, a.loss_key)[f], a.loss_vs_compute,
                  f"L ~ C^-{a.loss_vs_compute.alpha:.3f}")
    axes[0].legend(fontsize=7, title=f"model ({a.params_key})", title_fontsize=7)
    fig.tight_layout(), fig.savefig(path, dpi=90)


def plot_loss_vs_params(rows, a: Analysis, path: str) -> None:
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    n, l, c = column(rows, a.params_key), column(rows, a.loss_key), column(rows, "train_flops")
    budgets = sorted(dict.fromkeys(r["budget"] for r in rows),
                     key=lambda b: np.mean([c[i] for i, r in enumerate(rows) if r["budget"] == b]))
    for b in budgets:
        idx = sorted((i for i, r in enumerate(rows) if r["budget"] == b), key=lambda i: n[i])
        line, = ax.plot(n[idx], l[idx], "o" if a.isoflop else "o-", ms=4, label=f"budget {b}")
        if a.isoflop and len(set(n[idx])) >= 3:  # the parabola in log N that locates the optimum
            coef = np.polyfit(np.log(n[idx]), l[idx], 2)
            grid = np.geomspace(n[idx].min(), n[idx].max(), 60)
            ax.plot(grid, np.polyval(coef, np.log(grid)), ":", color=line.get_color())
    if a.isoflop:
        ax.plot([o[1] for o in a.optima], [o[2] for o in a.optima], "k*", ms=10, label="optimum per budget")
        ax.set_title("IsoFLOP profiles")
    if a.loss_vs_params is not None:
        sel = [i for i, r in enumerate(rows) if r["budget"] == a.params_budget]
        _draw_fit(ax, n[sel], l[sel], a.loss_vs_params, f"L ~ N^-{a.loss_vs_params.alpha:.3f} ({a.params_budget})")
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel(f"parameters N ({a.params_key})")
    ax.set_ylabel(a.loss_key), ax.legend(fontsize=7)
    _plain_log_axes(ax)
    fig.tight_layout(), fig.savefig(path, dpi=90)


def plot_optimal_params(a: Analysis, path: str) -> None:
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    oc, on = np.array([o[0] for o in a.optima]), np.array([o[1] for o in a.optima])
    ax.plot(oc, on, "ko", label="IsoFLOP minima" if a.isoflop else "frontier runs")
    if a.optimal_params is not None:
        _draw_fit(ax, oc, on, a.optimal_params, f"N_opt ~ C^{-a.optimal_params.alpha:.3f}")
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("training FLOPs C")
    ax.set_ylabel(f"compute-optimal N ({a.params_key})"), ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(path, dpi=90)


def _has_probe(rows) -> bool:
    return any(np.isfinite(r["probe_accuracy"]) for r in rows)


# ---------------------------------------------------------------------------------- markdown

def _fmt(x: float) -> str:
    return "" if not np.isfinite(x) else (f"{x:.3g}" if abs(x) >= 1e4 or abs(x) < 1e-2 else f"{x:.4g}")


def runs_table(rows: List[dict], a: Analysis) -> List[str]:
    on_frontier = {rows[i]["point"] for i in a.frontier}
    lines = ["| point | params (non-emb.) | params (total) | steps x batch | images | FLOPs | loss | L_gen | "
             "L_con | con top-1 | probe acc. | frontier |", "|" + "---|" * 12]
    for r in sorted(rows, key=lambda r: r["train_flops"]):
        lines.append(f"| {r['point']} | {r['params_non_embedding']:,.0f} | {r['params_total']:,.0f} | "
                     f"{r['train_steps']:.0f} x {r['global_batch_size']:.0f} | {r['images']:,.0f} | "
                     f"{_fmt(r['train_flops'])} | {_fmt(r['loss'])} | {_fmt(r['lm_loss'])} | {_fmt(r['con_loss'])} | "
                     f"{_fmt(r['con_top1'])} | {_fmt(r['probe_accuracy'])} | {'yes' if r['point'] in on_frontier else ''} |")
    return lines


def fit_lines(a: Analysis, level: float) -> List[str]:
    pct = f"{level:.0%}"
    lines = [f"Intervals are {pct} bootstrap percentiles (runs resampled with replacement)."
             " `rmse` is the root mean squared error of log L.", ""]
    def add(title, law, x, y, n_desc):
        if law is not None:
            lines.append(f"- **{title}** ({n_desc}, n = {law.n}): `{law.describe(x, y)}`, rmse {law.rmse_log:.3g}")
    add("Loss vs compute", a.loss_vs_compute, "C", "L",
        "best run of each budget" if a.isoflop else "compute-optimal frontier")
    add("Loss vs compute, with irreducible loss", a.loss_vs_compute_floor, "C", "L", "frontier")
    for term, law in a.term_fits.items():
        add(f"{term} vs compute", law, "C", term, f"the same {len(a.frontier)} frontier runs")
    add("Loss vs parameters", a.loss_vs_params, "N", "L", f"budget {a.params_budget}")
    if a.optimal_params is not None:
        law = a.optimal_params
        lo, hi = law.ci.get("alpha", (np.nan, np.nan))
        lines.append(f"- **Compute-optimal size** ({'IsoFLOP parabola minima' if a.isoflop else 'frontier runs'}, "
                     f"n = {law.n}): `N_opt = {law.a:.4g} * C^{-law.alpha:.4g}` "
                     f"(exponent {pct} interval [{-hi:.4g}, {-lo:.4g}]), rmse {law.rmse_log:.3g}")
    lines += [f"- note: {n}" for n in a.notes]
    if a.isoflop:
        lines += ["", "IsoFLOP optima (parabola in log N per budget; `best run` where the minimum is not inside "
                  "the sizes tried):", "", "| FLOPs | N_opt | L_opt | from |", "|---|---|---|---|"]
        lines += [f"| {_fmt(c)} | {n:,.0f} | {_fmt(l)} | {'parabola' if p else 'best run'} |"
                  for c, n, l, p in a.optima]
    return lines


def write_report(rows, a: Analysis, out_dir: str, csv_path: str, title: str, level: float, command: str,
                 spec: Optional[str] = None) -> str:
    total_flops = sum(r["train_flops"] for r in rows)
    step_s = [r["step_time_s"] for r in rows]
    lines = [f"# Scaling report: {title}", "",
             f"Generated by `{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
             f"from `{csv_path}`: {len(rows)} finished runs, {_fmt(total_flops)} training FLOPs in all "
             f"(FLOPs model: `megatron_lcl/models/flops.py`), mean step time {np.mean(step_s):.3g} s. "
             f"Loss column: `{a.loss_key}` (mean over the last logged steps of each run; a training loss), "
             f"parameters: `{a.params_key}`."]
    if spec:
        lines += ["", f"Reproduce: `python tools/sweep.py {spec}` (skips finished points), then the command above."]
    lines += ["", "## Fits", ""]
    lines += fit_lines(a, level)
    lines += ["", "## Plots", "", "![loss vs compute](loss_vs_compute.png)", "",
              "![loss vs parameters](loss_vs_params.png)", "", "![compute-optimal size](optimal_params.png)", "",
              "## Runs", ""] + runs_table(rows, a)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("csv", help="a sweep's results.csv (tools/sweep.py)")
    p.add_argument("--out", required=True, help="folder for report.md and the PNGs")
    p.add_argument("--title", default=None, help="report title (default: the CSV's folder name)")
    p.add_argument("--loss", default="loss", choices=("loss", "lm_loss", "con_loss"))
    p.add_argument("--params", default="params_non_embedding", choices=("params_non_embedding", "params_total"))
    p.add_argument("--spec", help="the sweep spec: only its points are used, and it is cited in the report")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--level", type=float, default=0.9, help="confidence level of the intervals")
    p.add_argument("--metrics", nargs="+", default=list(TRANSFER_METRICS),
                   help="arms comparison: the transfer metrics (results.csv columns, in [0, 1]) to fit")
    args = p.parse_args(argv)
    for path in [args.csv] + ([args.spec] if args.spec else []):
        if not os.path.isfile(path):
            p.error(f"{path}: no such file")
    rows = load_rows(args.csv, args.spec)
    if len(rows) < 2:
        print(f"{args.csv}: {len(rows)} finished run(s); a fit needs at least 2", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    if any(r.get("arm") for r in rows):
        return arms_main(args, rows, argv)
    a = analyse(rows, args.loss, args.params, args.bootstrap, args.level)
    plot_loss_vs_compute(rows, a, os.path.join(args.out, "loss_vs_compute.png"))
    plot_loss_vs_params(rows, a, os.path.join(args.out, "loss_vs_params.png"))
    plot_optimal_params(a, os.path.join(args.out, "optimal_params.png"))
    title = args.title or os.path.basename(os.path.dirname(os.path.abspath(args.csv)))
    command = "python tools/scaling_report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = write_report(rows, a, args.out, args.csv, title, args.level, command, args.spec)
    print(text[: text.index("## Plots")])
    print(f"wrote {args.out}/report.md and 3 PNGs")
    return 0


TRANSFER_METRICS = ("retrieval_tr1", "retrieval_ir1", "retrieval_tr5", "probe_mean")


def arms_main(args, rows: List[dict], argv) -> int:
    """The comparison of a sweep's arms on transfer metrics (megatron_lcl.scaling.arms)."""
    missing = [m for m in args.metrics if not any(np.isfinite(_number(r.get(m))) for r in rows)]
    if missing:
        print(f"{args.csv}: no values for metric(s) {missing}; columns: {sorted(rows[0])}", file=sys.stderr)
        return 2
    for r in rows:
        r["seed"] = "" if r.get("seed") in (None, "") else str(r["seed"])
    cmp = compare(rows, args.metrics, num_samples=args.bootstrap, level=args.level)  # no cap: 400 made intervals Monte-Carlo noise
    title = args.title or os.path.basename(os.path.dirname(os.path.abspath(args.csv)))
    command = "python tools/scaling_report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    probes = sorted(k for k in rows[0] if k.startswith("probe_") and k != "probe_accuracy")
    text = write_arms_report(cmp, rows, args.out, title, command, args.csv, args.spec,
                             table_metrics=list(dict.fromkeys(list(args.metrics) + probes)))
    summary = {m: bootstrap_summary(cmp, m) for m in args.metrics}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    print(text[: text.find("## Side points") if "## Side points" in text else text.find("## Configurations")])
    print(f"wrote {args.out}/report.md, report.json and {len(args.metrics)} PNGs")
    return 0


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


if __name__ == "__main__":
    sys.exit(main())
