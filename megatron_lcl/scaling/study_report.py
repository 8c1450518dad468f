"""The report of an objectives-at-matched-compute study (megatron_lcl.scaling.study): markdown, JSON,
plots, the combined per-item file, the learning-rate pilot and the power calculation.

    python -m megatron_lcl.scaling.study_report runs/scaling/lcl_vs_con_pilot/results.csv \
        --out docs/scaling/lcl_vs_con_pilot --bootstrap 4000 [--budgets p150-lr1e-3 p450-lr1e-3 ...]
    python -m megatron_lcl.scaling.study_report STUDY/results.csv SIDE/results.csv --out DIR \
        --arms lcl_lr3e-4 con --budgets b1200 b2400 b4800      # a side sweep's arm beside the study's

Writes OUT/report.md, OUT/report.json, OUT/error_vs_compute_<metric>.png, OUT/per_item.csv.gz (one row
per run and test item: the paired comparisons can be redone from it) and OUT/results.csv (the sweep's
rows). `--budgets` and `--arms` restrict the fits and comparisons (e.g. to one learning rate, or to the
arms that finished a budget); the run table, the learning-rate section and the power calculation use
every run.
"""

import argparse
import csv
import datetime
import gzip
import io
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml
from matplotlib.figure import Figure

from megatron_lcl.scaling import power
from megatron_lcl.scaling.study import (Analysis, Run, Study, StudyInputError, analyse, cell_seeds, interval,
                                        load_study, paired_items)
from megatron_lcl.scaling.sweep import read_results

POWER_DELTA = 0.02  # the exponent difference the power calculation asks about (issue 33)


# ---------------------------------------------------------------------------------- the learning rate

def run_settings(rows: Sequence[dict], csv_path: str) -> Dict[str, dict]:
    """point -> {lr, steps, final loss} from OUTPUT/configs/<point>.yaml (else the `lr` column a report's
    results.csv carries) and the CSV row."""
    out = {}
    for r in rows:
        path = os.path.join(os.path.dirname(os.path.abspath(csv_path)), "configs", f"{r['point']}.yaml")
        lr = float(r["lr"]) if r.get("lr") not in (None, "") else None
        if os.path.exists(path):
            with open(path) as f:
                lr = (yaml.safe_load(f) or {}).get("optimizer", {}).get("lr")
        out[r["point"]] = {"lr": lr, "steps": int(float(r.get("train_steps") or 0)),
                           "loss": float(r["loss"]) if r.get("loss") not in (None, "") else float("nan")}
    return out


def write_results(rows: Sequence[dict], settings: Dict[str, dict], path: str) -> None:
    """The sweeps' rows with each point's learning rate as an `lr` column: with per_item.csv.gz this
    is all `study_report` needs to rebuild the report where the run directories are gone."""
    fields = list(dict.fromkeys([k for r in rows for k in r] + ["lr"]))
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            lr = settings.get(r["point"], {}).get("lr")
            w.writerow({**r, "lr": "" if lr is None else lr})
    os.replace(path + ".tmp", path)


def point_name(run) -> str:
    """The sweep's name of a run's point (megatron_lcl.scaling.sweep: <arm>-<model>-<budget>-s<seed>)."""
    return f"{run.arm}-{run.model}-{run.budget}-s{run.seed}"


def learning_rate_table(study: Study, settings: Dict[str, dict]) -> List[dict]:
    """Per (arm, model, steps, lr): mean over seeds of the final loss, the metrics and the mean gain over
    the untrained encoder of the same size and seed (mean over the metrics, item for item); `chosen`
    marks each arm's rate with the highest mean gain at the largest steps that has several rates (the
    pilot's test items are the study's validation items: the study tests on another corpus)."""
    groups: Dict[tuple, list] = {}
    for run in study.runs:
        s = settings.get(point_name(run), {})
        if s.get("lr") is not None and (run.model, run.seed) in study.baselines:
            groups.setdefault((run.arm, run.model, s["steps"], float(s["lr"])), []).append((run, s))
    table = []
    for (arm, model, steps, lr), members in sorted(groups.items()):
        means = {m: float(np.mean([np.nanmean(r.hits[m]) for r, _ in members])) for m in study.metrics}
        gain = np.mean([np.nanmean(r.hits[m] - study.baselines[(r.model, r.seed)].hits[m])
                        for r, _ in members for m in study.metrics])
        table.append({"arm": arm, "model": model, "steps": steps, "lr": lr, "seeds": len(members),
                      "loss": float(np.mean([s["loss"] for _, s in members])), "gain": float(gain), **means})
    for arm, model in {(t["arm"], t["model"]) for t in table}:
        mine = [t for t in table if (t["arm"], t["model"]) == (arm, model)]
        multi = [s for s in {t["steps"] for t in mine} if sum(t["steps"] == s for t in mine) > 1]
        if multi:
            max((t for t in mine if t["steps"] == max(multi)), key=lambda t: t["gain"])["chosen"] = True
    return table


# ---------------------------------------------------------------------------------- markdown

def fmt(x, digits=3) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}g}"


def run_table(analysis: Analysis, metric: str) -> List[str]:
    lines = [f"| arm | model | budget | FLOPs | seeds | near chance | {metric} | gain over untrained [90 %] "
             "| on front |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm in analysis.study.arms:
        result = analysis.arms[(arm, metric)]
        for i, c in enumerate(result.configs):
            lo, hi = interval(c.gain[1:]) if c.gain is not None else (None, None)
            gain = "-" if c.gain is None else f"{c.gain[0]:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            lines.append(f"| {arm} | {c.model} | {c.budget} | {c.compute:.3g} | {len(c.seeds)} | {c.near_chance} | "
                         f"{1 - c.error[0]:.3f} | {gain} | {result.front_share[i]:.0%} |")
    return lines


def fit_lines(analysis: Analysis, metric: str) -> List[str]:
    lines = []
    for arm in analysis.study.arms:
        r = analysis.arms[(arm, metric)]
        lo, hi = interval(r.exponent[1:]) if np.isfinite(r.exponent[0]) else (None, None)  # none without a data fit
        sat = r.saturating or {}
        four = sat.get("not_identified") or \
            f"c = {fmt(sat.get('c'))}, d = {fmt(sat.get('d'))}, b = {fmt(sat.get('b'))} FLOPs"
        lines.append(f"- {arm}: `E = a C^c`: c = {fmt(r.exponent[0])} [{fmt(lo)}, {fmt(hi)}] on {len(r.front)} front "
                     f"point(s) from {r.front_budgets} budget(s); `E = a (C + b)^c + d`: {four}")
        h = r.heldout
        if "observed" in h:
            rel = f"{100 * h['power_rel_error']:+.1f}" if "power" in h else "-"
            lines.append(f"  - held out ({h['budget']}, best {h['model']}): observed error {h['observed']:.3f}; "
                         "power law "
                         f"predicts {fmt(h.get('power'))} ({rel} %); "
                         f"naive (no further improvement) {h['naive']:.3f} ({100 * h['naive_rel_error']:+.1f} %)")
        else:
            lines.append(f"  - held out: {h.get('note')}")
    return lines


def step_lines(analysis: Analysis, metric: str) -> List[str]:
    """Per arm: does the error fall from each budget to the next at every size (`study.more_steps`)?"""
    lines = []
    for arm in analysis.study.arms:
        steps = analysis.steps.get((arm, metric), [])
        if not steps:
            continue
        worse = [f"{e['model']} {e['from']}->{e['to']}" for e in steps if e["worse"]]
        each = ", ".join(f"{e['model']} {e['from']}->{e['to']} {e['delta']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]"
                         for e in steps)
        lines.append(f"- more steps, {arm} (error at the larger budget - the smaller; + is worse): {each}; "
                     + (f"**significantly worse: {', '.join(worse)}**" if worse else "never significantly worse"))
    return lines


def best_size_lines(analysis: Analysis, metric: str) -> List[str]:
    """Per arm: the best size at each budget, its share of replicates, and whether it is inside the ladder."""
    where = {None: "inside the ladder", "smallest": "the smallest size", "largest": "the largest size",
             "too few sizes": "fewer than 3 sizes"}
    lines = []
    for arm in analysis.study.arms:
        best = analysis.best[(arm, metric)]
        if all(len(e["shares"]) < 2 for e in best):
            continue  # one size per budget: nothing to choose
        edges = sum(1 for e in best if e["edge"] in ("smallest", "largest"))
        lines.append(f"- best size, {arm}: "
                     + ", ".join(f"{e['budget']} {e['model']} ({e['share']:.0%} of replicates; {where[e['edge']]})"
                                 for e in best)
                     + (f"; at an end of the ladder at {edges} budget(s): the ladder may not hold the best size there"
                        if edges else ""))
    return lines


def pair_lines(analysis: Analysis, metric: str) -> List[str]:
    lines = []
    for (a, b, m), p in analysis.pairs.items():
        if m != metric:
            continue
        d, x = p["exponent_difference"], p["crossover"]
        verdict = {1: f"{b}'s error falls faster", -1: f"{a}'s error falls faster", 0: "no difference detectable"}
        if d["identified"]:
            lines.append(f"- {a} vs {b}: c_{a} - c_{b} = {fmt(d['delta'])} [{fmt(d['lo'])}, {fmt(d['hi'])}] "
                         f"({d['n']} of {d['of']} paired replicates): {verdict[d['significant']]}.")
        else:
            lines.append(f"- {a} vs {b}: exponent difference not identified: {d['why']}")
        by = ", ".join(f"{e['budget']} {e['delta']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]" for e in x["by_budget"])
        lines.append(f"  - best error {a} - {b} per budget: {by}")
        claim = x["claimed"]
        lines.append("  - crossover: " + (f"claimed between {claim['between'][0]} and {claim['between'][1]} "
                                          f"({claim['lower_first']} lower first)" if claim else
                                          "none claimed (no budget pair significant on both sides)")
                     + (f"; the fitted power laws cross at {', '.join(fmt(c) for c in x['fitted'])} FLOPs "
                        "(description only)" if x["fitted"] else ""))
    return lines


def paired_item_lines(study: Study, metric: str) -> List[str]:
    lines = []
    arms = study.arms
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            rows = paired_items(study, metric, a, b)
            if rows:
                lines += [f"Per item, {a} vs {b} (pooled over common seeds): items only {a} gets right / only {b}; "
                          f"mean difference of {metric}.", "",
                          f"| model | budget | seeds | only {a} | only {b} | {a} - {b} |", "|---|---|---|---|---|---|"]
                lines += [f"| {r['model']} | {r['budget']} | {r['seeds']} | {r['only_a']} | {r['only_b']} | "
                          f"{r['delta']:+.3f} |" for r in rows] + [""]
    return lines


def power_lines(study: Study, metrics: Sequence[str]) -> List[str]:
    lines = ["## Power", "", "From this study's own noise (megatron_lcl/scaling/power.py): run_var = variance over "
             "seeds of a configuration's paired error difference between two arms (the items fixed), item_var = "
             "per-item variance of the paired hit difference (test-set sampling). SE of an exponent difference "
             f"for K front points spread evenly in log C over R x compute; power to see |c_a - c_b| = {POWER_DELTA} "
             "(90 % interval excluding 0); `MDE` the smallest error difference one configuration resolves at "
             "80 % power.", ""]
    for m in metrics:
        try:
            noise = power.pilot_noise(study, m)
        except ValueError as e:
            lines += [f"- {e}", ""]
            continue
        n = len(study.items)
        source = "paired differences" if noise.paired else \
            "2 x one arm's variance over seeds: an upper bound, no arm pair has 2 seeds yet"
        lines += [f"### {m}", "", f"run_var = {noise.run_var:.3g} (sd {noise.run_var ** 0.5:.3f}, {noise.run_dof} dof, "
                  f"{source}); item_var = {noise.item_var:.3g} (/ {n} items: sd {(noise.item_var / n) ** 0.5:.3f}, "
                  f"from {noise.configurations} arm pair x configuration group(s)); error level {noise.error:.3f}.", "",
                  "| seeds | K points | range | SE(c_a - c_b) | power | MDE (one configuration) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['seeds']} | {r['points']} | {r['range']:g}x | {r['se']:.4f} | {r['power']:.0%} | "
                  f"{r['level_mde']:.3f} |" for r in power.power_table(noise, n, POWER_DELTA)]
        need = {(k, rng): power.seeds_needed(noise, POWER_DELTA, k, rng, n)
                for k, rng in ((5, 100), (7, 1000), (9, 1000))}
        lines += ["", "Seeds needed for 80 % power at |delta c| = 0.02: " + "; ".join(
            f"K = {k} over {rng}x: {s if s else 'not reachable with these items'}" for (k, rng), s in need.items()), ""]
    return lines


def learning_rate_lines(table: List[dict], metrics: Sequence[str]) -> List[str]:
    if not any(t.get("chosen") for t in table):
        return []
    lines = ["## Learning rate (pilot)", "", "Protocol, the same for every arm: the rate with the highest mean gain "
             "over the untrained encoder (mean over the metrics) at the longest pilot budget that ran several "
             "rates. The pilot's test items are the study's validation items: the study tests on another "
             "corpus. The final pre-training loss (the arm's own objective) is shown beside it; it is not the "
             "criterion (a rate can lower the loss while it wrecks the encoder's features).", "",
             "| arm | model | steps | lr | seeds | final loss | mean gain | " + " | ".join(metrics) + " | chosen |",
             "|---|---|---|---|---|---|---|" + "---|" * len(metrics) + "---|"]
    lines += [f"| {t['arm']} | {t['model']} | {t['steps']} | {t['lr']:g} | {t['seeds']} | {t['loss']:.3f} | "
              f"{t['gain']:+.3f} | " + " | ".join(fmt(t[m]) for m in metrics)
              + f" | {'yes' if t.get('chosen') else ''} |"
              for t in table]
    return lines + [""]


# ---------------------------------------------------------------------------------- plots, files

def plot_metric(analysis: Analysis, metric: str, path: str) -> None:
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    colours = dict(zip(analysis.study.arms, ("C0", "C1", "C2", "C3", "C4")))
    for arm in analysis.study.arms:
        r = analysis.arms[(arm, metric)]
        compute = np.array([c.compute for c in r.configs])
        error = np.array([c.error[0] for c in r.configs])
        ax.scatter(compute, error, color=colours[arm], alpha=0.5, s=18)
        ax.plot(compute[r.front], error[r.front], "o-", color=colours[arm], label=arm)
        if np.isfinite(r.exponent[0]):
            grid = np.geomspace(compute.min(), compute.max(), 50)
            ax.plot(grid, np.exp(r.log_a[0]) * grid ** r.exponent[0], "--", color=colours[arm], lw=1)
    for (model, _), base in sorted(analysis.study.baselines.items())[:1]:
        ax.axhline(1 - float(np.nanmean(base.hits[metric])), color="grey", ls=":", label=f"untrained ({model})")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel=f"error = 1 - {metric}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_per_item(study: Study, path: str) -> None:
    """One row per (run, item): point key, item, every metric's hit (0/1, blank when absent). The gzip
    header carries no time stamp, so the same results give the same bytes (no churn in a committed copy)."""
    runs = study.runs + list(study.baselines.values())
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as z, \
            io.TextIOWrapper(z, newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "model", "budget", "seed", "item", *study.metrics])
        for r in runs:
            cols = np.vstack([r.hits[m] for m in study.metrics]).T  # [n_items, n_metrics]
            for item, values in zip(study.items, cols):
                w.writerow([r.arm, r.model, r.budget, r.seed, item, *("" if np.isnan(v) else int(v) for v in values)])


def summary_json(analysis: Analysis) -> dict:
    out = {"items": len(analysis.study.items), "replicates": analysis.num_samples, "level": analysis.level,
           "metrics": {}}
    for (arm, metric), r in analysis.arms.items():
        lo, hi = interval(r.exponent[1:])
        out["metrics"].setdefault(metric, {})[arm] = {
            "exponent": r.exponent[0], "exponent_interval": [lo, hi], "front": [r.configs[i].budget + "/" +
                                                                               r.configs[i].model for i in r.front],
            "saturating": r.saturating, "heldout": r.heldout}
    for (a, b, metric), p in analysis.pairs.items():
        out["metrics"][metric][f"{a}-{b}"] = p
    for (arm, metric), steps in analysis.steps.items():
        out["metrics"][metric][arm]["more_steps"] = steps
        out["metrics"][metric][arm]["best_sizes"] = analysis.best[(arm, metric)]
    return out


# ---------------------------------------------------------------------------------- main

def restrict(study: Study, budgets: Optional[Sequence[str]], arms: Optional[Sequence[str]] = None) -> Study:
    """The runs the fits and comparisons use: those of `budgets` and `arms` (all when None) whose size,
    budget and seed every one of those arms has (arms are compared on the same seeds; a sweep still
    running has ragged cells, and naming the arms that finished keeps their points in)."""
    unknown = sorted(set(arms or ()) - set(study.arms))
    if unknown:
        raise StudyInputError(f"--arms {' '.join(unknown)}: not in the study (its arms: {', '.join(study.arms)})")
    have_budgets = list(dict.fromkeys(r.budget for r in study.runs))
    unknown = [b for b in budgets or () if b not in have_budgets]
    if unknown:  # a mistyped budget used to give a report of the others, or of nothing
        raise StudyInputError(f"--budgets {' '.join(unknown)}: not in the study's trained runs (its budgets: "
                              f"{', '.join(have_budgets)})")
    runs = [r for r in study.runs if (not budgets or r.budget in budgets) and (not arms or r.arm in arms)]
    kept = {r.arm for r in runs}
    have = {(r.arm, r.model, r.budget, r.seed) for r in runs}
    complete = [r for r in runs if all((a, r.model, r.budget, r.seed) in have for a in kept)]
    notes = [f"fits and comparisons on budgets {', '.join(budgets)} only"] if budgets else []
    if arms:
        notes.append(f"fits and comparisons on arms {', '.join(arms)} only")
    if len(complete) < len(runs):
        notes.append(f"{len(runs) - len(complete)} run(s) whose size, budget and seed not every arm has are left "
                     "out of the fits and comparisons (they stay in the learning-rate and power sections)")
    notes += seed_list_notes(complete)
    return Study(complete, study.baselines, study.items, study.metrics, study.notes + notes)


def seed_list_notes(runs: Sequence[Run]) -> List[str]:
    """A note when cells ran different seeds (a seed still running at some budgets): the bootstrap draws
    each seed list on its own (study.draw_replicates), so a seed is one cluster only among the cells
    with its list, and differences across lists (more steps, slopes) are unpaired in the seed."""
    cells: Dict[Tuple[str, ...], List[Tuple[str, str]]] = {}
    for cell, seeds in cell_seeds(runs).items():
        cells.setdefault(tuple(seeds), []).append(cell)
    if len(cells) < 2:
        return []
    parts = [f"seeds {', '.join(s)} at {', '.join(sorted({f'{m}-{b}' for m, b in c}))}" for s, c in sorted(cells.items())]
    return ["cells ran different seeds (" + "; ".join(parts) + "): each seed list is drawn on its own, so "
            "differences between cells of different lists (more steps, slopes) are unpaired in the seed "
            "(usually wider intervals than paired ones)"]


def write_report(csv_paths, out: str, num_samples: int, budgets: Optional[Sequence[str]], command: str,
                 arms: Optional[Sequence[str]] = None) -> str:
    """The report of one sweep's results.csv, or of several analysed as one study (a study and its side
    checks on the same test items): report.md, report.json, plots, and the merged results.csv and
    per_item.csv.gz it can be rebuilt from."""
    paths = [csv_paths] if isinstance(csv_paths, str) else list(csv_paths)
    os.makedirs(out, exist_ok=True)
    full = load_study(paths)
    study = restrict(full, budgets, arms)
    analysis = analyse(study, num_samples)
    rows, settings = [], {}
    for path in paths:
        mine = read_results(path)
        rows += mine
        settings.update(run_settings(mine, path))  # every row: results.csv below carries each one's lr
    lr_table = learning_rate_table(full, settings)
    lines = [f"# {os.path.basename(out.rstrip('/'))}: objectives at matched compute", "",
             f"Generated by `{command}` on {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC: {len(full.runs)} trained "
             f"run(s) and {len(full.baselines)} untrained baseline(s), arms {full.arms}, {len(full.items)} test items "
             f"(the same for every run), {num_samples} paired bootstrap replicates (items x seeds, a seed one cluster across cells; "
             f"front and fits inside every replicate), 90 % percentile intervals.", ""]
    lines += [f"- note: {n}" for n in study.notes] + [""]
    for metric in study.metrics:
        plot_metric(analysis, metric, os.path.join(out, f"error_vs_compute_{metric}.png"))
        lines += [f"## {metric}", ""] + run_table(analysis, metric) + [""] + fit_lines(analysis, metric) + \
            step_lines(analysis, metric) + best_size_lines(analysis, metric) + pair_lines(analysis, metric) + \
            [""] + paired_item_lines(study, metric) + [f"![{metric}](error_vs_compute_{metric}.png)", ""]
    lines += learning_rate_lines(lr_table, full.metrics) + power_lines(full, full.metrics)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({**summary_json(analysis), "learning_rate": lr_table}, f, indent=1, default=float)
    write_per_item(full, os.path.join(out, "per_item.csv.gz"))
    write_results(rows, settings, os.path.join(out, "results.csv"))
    return os.path.join(out, "report.md")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="the sweep's results.csv (its runs' per_item.csv are read); "
                   "several: one study from a sweep and its side checks on the same test items")
    p.add_argument("--out", required=True)
    p.add_argument("--bootstrap", type=int, default=4000, help="paired bootstrap replicates (default 4000)")
    p.add_argument("--budgets", nargs="*", help="budgets the fits and comparisons use (default: all)")
    p.add_argument("--arms", nargs="*", help="arms the fits and comparisons use (default: all; e.g. the arms "
                   "whose points at a new budget have finished while another's still run)")
    args = p.parse_args(argv)
    missing = [path for path in args.results if not os.path.exists(path)]
    if missing:
        print(f"{', '.join(missing)}: no such file", file=sys.stderr)
        return 2
    command = "python -m megatron_lcl.scaling.study_report " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        print(write_report(args.results, args.out, args.bootstrap, args.budgets, command, args.arms))
    except StudyInputError as e:  # an unknown arm, a row twice, no per-item results
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
