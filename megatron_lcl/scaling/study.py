"""Objectives compared at matched compute, analysed so that the answer holds (issue 33): per-item
results, an untrained-encoder baseline, a paired bootstrap with the Pareto front chosen inside every
replicate, an identifiability rule for the four-parameter form, held-out prediction against a naive
predictor, and crossovers claimed only where the data are significant on both sides.

    study = load_study("runs/scaling/lcl_vs_con_v2/results.csv")
    analysis = analyse(study, num_samples=4000)

- A run: one ok row of results.csv (arm, model, budget, seed) with its per-item results
  (RUN_DIR/per_item.csv from `megatron_lcl.eval.transfer --per-item`): per test item a 0/1 hit for
  every metric (a probe's top-1; recall@k from the item's TR / IR rank). Every run is scored on the same
  items (the intersection is used and its size reported).
- Untrained runs (train_steps 0: an `untrained` budget) are the baseline of their (model, seed); a
  trained run's gain is its metric minus that baseline's, item for item.
- A configuration (arm, model, budget): error = 1 - metric, averaged over its seeds (floored at
  ERROR_FLOOR: a perfect score has no logarithm); compute = the mean
  of its seeds' training FLOPs. The front: the configurations no cheaper one of the same arm beats.
- Fits on the front: E = a C^c (>= 2 points; two arms' exponents are compared only on fronts of >=
  EXPONENT_MIN_POINTS points from >= 2 budgets); E = a (C + b)^c + d only with >= IDENTIFIED_MIN_POINTS
  front points, else the four-parameter form is "not identified" (it has four parameters and bends).
- A bootstrap replicate draws the test items with replacement (one draw for every run) and the seeds
  with replacement, one draw for every cell that ran the same seeds (every arm, size and budget of a
  finished study): arms are paired by size, budget and seed, which fix the initialisation, the data
  order and the heads' seed, and a seed stays one cluster across budgets and sizes, as it would in a
  rerun with new seeds, so a seed that is good at every budget moves a curve, not its slope or the
  step from one budget to the next. Every replicate recomputes each configuration's error, each arm's
  front and each fit. Intervals are percentiles.
- Chance flag: a run whose contrastive loss is near chance, con_loss / ln(con_batch) > CHANCE_RATIO
  (con_batch: the images of one InfoNCE), has not started to learn its contrastive task.
- Held-out check: the fits without the largest budget predict the best error at that budget; the naive
  predictor "no further improvement" (the best error of the fitted budgets) is scored beside them.
- More steps: per arm and size, the error at each budget minus the next smaller one (`more_steps`),
  flagged when more steps score significantly worse (the first study's 400 < 120-step anomaly: a
  random encoder drifting while its contrastive task is at chance).
- Best size per budget (`best_sizes`): which size is best at each budget and how often across
  replicates; one at the smallest or largest size says the ladder may not bracket the best size.
- Crossover: claimed only when one arm's best error (over sizes) is significantly lower at some budget
  and the other arm's significantly lower at a larger budget (both intervals exclude 0); where the
  fitted curves cross is reported as a description, not a finding.
"""

import csv
import gzip
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_lcl.scaling.fit import IDENTIFIED_MIN_POINTS, crossovers, fit_saturating, pareto_frontier
from megatron_lcl.scaling.sweep import read_results

CHANCE_RATIO = 0.9
ERROR_FLOOR = 1e-3
LEVEL = 0.9
FIT_SHARE_MIN = 0.95  # an exponent difference is reported only when both arms fit in >= 95 % of replicates
# ... and when each arm's front on the data holds >= EXPONENT_MIN_POINTS points from >= 2 budgets: a
# two-point line has no residual, and a front from one budget is the size axis at a fixed number of
# steps (a parameter exponent), not error against compute.
EXPONENT_MIN_POINTS = 3
EXPONENT_MIN_BUDGETS = 2
RANK_METRICS = {"retrieval_tr1": ("tr_rank", 1), "retrieval_tr5": ("tr_rank", 5),
                "retrieval_ir1": ("ir_rank", 1), "retrieval_ir5": ("ir_rank", 5)}


class StudyInputError(ValueError):
    """The study's input cannot be analysed as given (no per-item results, a row twice, an unknown arm):
    `study_report` says so in one line and exits 2; any other error keeps its traceback."""


@dataclass
class Run:
    arm: str
    model: str
    budget: str
    seed: str
    compute: float  # training FLOPs (0: untrained)
    hits: Dict[str, np.ndarray]  # metric -> [n_items] 0/1, in the study's item order
    con_ratio: Optional[float] = None  # con_loss / ln(con_batch); None without a contrastive loss

    @property
    def near_chance(self) -> bool:
        return self.con_ratio is not None and self.con_ratio > CHANCE_RATIO


@dataclass
class Study:
    runs: List[Run]  # trained runs
    baselines: Dict[Tuple[str, str], Run]  # (model, seed) -> the untrained run
    items: List[str]
    metrics: List[str]
    notes: List[str] = field(default_factory=list)

    @property
    def arms(self) -> List[str]:
        return list(dict.fromkeys(r.arm for r in self.runs))

    @property
    def budgets(self) -> List[str]:
        """Budgets by compute (the mean over their runs)."""
        mean = {b: np.mean([r.compute for r in self.runs if r.budget == b]) for b in {r.budget for r in self.runs}}
        return sorted(mean, key=mean.get)


# ---------------------------------------------------------------------------------- loading

def item_hits(row: dict, metrics: Sequence[str]) -> Dict[str, float]:
    """One per_item.csv row -> {metric: 0/1} for the metrics it has (probe_* columns are hits; recall
    from the ranks: a hit at k when rank < k)."""
    out = {}
    for m in metrics:
        column, k = RANK_METRICS.get(m, (m, None))
        value = row.get(column, "")
        if value != "":
            out[m] = float(float(value) < k) if k else float(value)
    return out


def read_per_item(path: str, metrics: Sequence[str]) -> Dict[str, Dict[str, float]]:
    with open(path, newline="") as f:
        return {r["item"]: item_hits(r, metrics) for r in csv.DictReader(f)}


def per_item_metrics(path: str) -> List[str]:
    """The metrics a per_item.csv can give (probe columns, recall@1/5 from rank columns)."""
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    return [c for c in header if c.startswith("probe_")] + \
        [m for m, (column, _) in RANK_METRICS.items() if column in header]


def read_report_items(path: str) -> Tuple[List[str], Dict[Tuple[str, str, str, str], Dict[str, Dict[str, float]]]]:
    """A report's per_item.csv.gz (study_report.write_per_item: arm, model, budget, seed, item, one 0/1
    column per metric) -> (metrics, {(arm, model, budget, seed): {item: {metric: hit}}})."""
    with gzip.open(path, "rt", newline="") as f:
        reader = csv.DictReader(f)
        metrics = [c for c in reader.fieldnames if c not in ("arm", "model", "budget", "seed", "item")]
        tables: Dict[Tuple[str, str, str, str], Dict[str, Dict[str, float]]] = {}
        for r in reader:
            tables.setdefault((r["arm"], r["model"], r["budget"], r["seed"]), {})[r["item"]] = \
                {m: float(r[m]) for m in metrics if r[m] != ""}
    return metrics, tables


def _run_dir(row: dict, csv_path: str) -> str:
    """The row's run directory as written, else OUTPUT/runs/<point> beside the CSV (a moved sweep)."""
    if row.get("run_dir") and os.path.isdir(row["run_dir"]):
        return row["run_dir"]
    return os.path.join(os.path.dirname(os.path.abspath(csv_path)), "runs", row["point"])


def _con_ratio(row: dict) -> Optional[float]:
    try:
        loss, batch = float(row.get("con_loss") or 0), float(row.get("con_batch") or 0)
    except ValueError:
        return None
    return loss / math.log(batch) if loss > 0 and batch > 1 else None


def load_study(csv_paths, metrics: Optional[Sequence[str]] = None) -> Study:
    """Every ok row of one results.csv, or of several (a study and its side checks, scored on the same
    items: one study), with its per-item results: the run's per_item.csv, else a report's per_item.csv.gz
    beside its CSV (a committed report re-analysed without its run directories). Rows with neither are
    skipped and counted in `notes`."""
    paths = [csv_paths] if isinstance(csv_paths, str) else list(csv_paths)
    rows, tables, notes = [], {}, []
    for source, csv_path in enumerate(paths):
        report_items = os.path.join(os.path.dirname(os.path.abspath(csv_path)), "per_item.csv.gz")
        report = read_report_items(report_items) if os.path.exists(report_items) else None
        for r in (r for r in read_results(csv_path) if r["status"] == "ok"):
            key = (r.get("arm", ""), r["model"], r["budget"], str(r.get("seed", "")))
            rows.append((source, r, key))
            path = os.path.join(_run_dir(r, csv_path), "per_item.csv")
            if os.path.exists(path):
                metrics = metrics or per_item_metrics(path)
                tables[(source, r["point"])] = read_per_item(path, metrics)
            elif report and key in report[1]:
                metrics = metrics or report[0]
                tables[(source, r["point"])] = report[1][key]
    missing = [r["point"] for source, r, _ in rows if (source, r["point"]) not in tables]
    if missing:
        notes.append(f"{len(missing)} ok run(s) without per_item.csv left out: {', '.join(missing[:5])}")
    if not tables:
        raise StudyInputError(f"{', '.join(paths)}: no ok run has a per_item.csv")
    items = sorted(set.intersection(*(set(t) for t in tables.values())))
    if any(len(t) != len(items) for t in tables.values()):
        notes.append(f"runs scored different items: the {len(items)} every run has are used")
    counts = Counter(key for source, r, key in rows if (source, r["point"]) in tables)
    twice = sorted(k for k, n in counts.items() if n > 1)
    if twice:
        raise StudyInputError(f"{', '.join(paths)}: the same (arm, model, budget, seed) in more than one row: "
                         f"{twice[:3]} (a side check's arm needs its own name)")
    study = Study([], {}, items, list(metrics), notes)
    for source, r, _ in rows:
        if (source, r["point"]) in tables:
            _add_run(study, r, tables[(source, r["point"])])
    return study


def _add_run(study: Study, row: dict, table: Dict[str, Dict[str, float]]) -> None:
    hits = {m: np.array([table[i].get(m, np.nan) for i in study.items]) for m in study.metrics}
    run = Run(row.get("arm", ""), row["model"], row["budget"], str(row.get("seed", "")),
              float(row.get("train_flops") or 0), hits, _con_ratio(row))
    if int(float(row.get("train_steps") or 0)) == 0:
        study.baselines[(run.model, run.seed)] = run
    else:
        study.runs.append(run)


# ---------------------------------------------------------------------------------- the bootstrap

@dataclass
class Replicates:
    """Per metric, every run's metric under each replicate's item draw: `[n_runs, B]` (column 0 of
    the draws is the data itself: every item once); seed draws per (model, budget) cell `[B, n_seeds]`,
    the same array for every cell with the same seeds."""

    values: Dict[str, np.ndarray]  # metric -> [n_runs (trained, then baselines), B + 1]
    seed_draws: Dict[Tuple[str, str], np.ndarray]  # (model, budget) -> [B + 1, n] indices into its seeds
    cell_seeds: Dict[Tuple[str, str], List[str]]


def draw_replicates(study: Study, num_samples: int, seed: int = 0) -> Replicates:
    rng = np.random.default_rng(seed)
    n = len(study.items)
    weights = np.vstack([np.ones(n), rng.multinomial(n, np.full(n, 1.0 / n), size=num_samples)])  # [B + 1, n]
    runs = study.runs + list(study.baselines.values())
    values = {}
    for m in study.metrics:
        hits = np.vstack([r.hits[m] for r in runs])  # [n_runs, n]
        ok = ~np.isnan(hits)
        values[m] = (np.where(ok, hits, 0.0) @ weights.T) / np.maximum(ok.astype(float) @ weights.T, 1e-12)
    seeds_of = cell_seeds(study.runs)
    by_seeds = {}  # one seed draw per distinct seed list: a seed is one cluster across the cells
    for seeds in sorted({tuple(s) for s in seeds_of.values()}):
        d = rng.integers(0, len(seeds), size=(num_samples + 1, len(seeds)))
        d[0] = np.arange(len(seeds))  # replicate 0: the data
        by_seeds[seeds] = d
    return Replicates(values, {c: by_seeds[tuple(s)] for c, s in seeds_of.items()}, seeds_of)


def cell_seeds(runs: Sequence[Run]) -> Dict[Tuple[str, str], List[str]]:
    """(model, budget) -> the seeds its runs ran (any arm), sorted; cells in sorted order."""
    seeds: Dict[Tuple[str, str], set] = {}
    for r in runs:
        seeds.setdefault((r.model, r.budget), set()).add(r.seed)
    return {c: sorted(s) for c, s in sorted(seeds.items())}


@dataclass
class ConfigValues:
    """A configuration's error (1 - metric, mean over drawn seeds) and gain over the untrained baseline,
    per replicate `[B + 1]` (index 0: the data)."""

    arm: str
    model: str
    budget: str
    compute: float
    error: np.ndarray
    gain: Optional[np.ndarray]
    seeds: List[str]
    near_chance: int  # runs flagged near chance


def config_values(study: Study, reps: Replicates, metric: str) -> List[ConfigValues]:
    index = {(r.arm, r.model, r.budget, r.seed): i for i, r in enumerate(study.runs)}
    base_index = {k: len(study.runs) + i for i, k in enumerate(study.baselines)}
    values = reps.values[metric]
    out = []
    for arm in study.arms:
        for (model, budget), seeds in reps.cell_seeds.items():
            rows = [index.get((arm, model, budget, s)) for s in seeds]
            if all(i is None for i in rows):
                continue
            out.append(_config(study, values, reps.seed_draws[(model, budget)], rows,
                               [base_index.get((model, s)) for s in seeds], arm, model, budget, seeds))
    return sorted(out, key=lambda c: (c.arm, c.compute))


def _config(study, values, draws, rows, base_rows, arm, model, budget, seeds) -> ConfigValues:
    """Mean over the drawn seeds of each replicate (a seed this arm lacks is left out of the mean)."""
    metric = np.vstack([values[i] if i is not None else np.full(values.shape[1], np.nan) for i in rows])  # [S, B+1]
    cols = np.arange(values.shape[1])
    picked = metric[draws.T, cols]  # [S, B + 1]: replicate b's drawn seeds
    with np.errstate(invalid="ignore"):
        error = np.maximum(1.0 - np.nanmean(picked, axis=0), ERROR_FLOOR)  # a perfect score has no logarithm
        gain = None
        if all(b is not None for b in base_rows):
            base = np.vstack([values[b] for b in base_rows])[draws.T, cols]
            gain = np.nanmean(picked - base, axis=0)
    runs = [study.runs[i] for i in rows if i is not None]
    return ConfigValues(arm, model, budget, float(np.mean([r.compute for r in runs])), error, gain,
                        [s for s, i in zip(seeds, rows) if i is not None], sum(r.near_chance for r in runs))


# ---------------------------------------------------------------------------------- fits per replicate

def front_and_fit(compute: np.ndarray, error: np.ndarray) -> Tuple[np.ndarray, Optional[float], Optional[float]]:
    """(front indices, c, log a) of E = a C^c on the front of (compute, error); c None with < 2 points."""
    ok = np.isfinite(error) & (error > 0)
    idx = np.nonzero(ok)[0]
    front = idx[pareto_frontier(compute[idx], error[idx])]
    if len(np.unique(compute[front])) < 2:
        return front, None, None
    slope, intercept = np.polyfit(np.log(compute[front]), np.log(error[front]), 1)
    return front, float(slope), float(intercept)


@dataclass
class ArmResult:
    arm: str
    metric: str
    configs: List[ConfigValues]
    front: List[int]  # indices into configs (the data)
    exponent: np.ndarray  # c per replicate [B + 1] (nan: no fit); index 0 the data
    log_a: np.ndarray
    front_share: np.ndarray  # per config: the share of replicates in which it is on the front
    saturating: Optional[dict] = None  # the four-parameter fit, or {"not_identified": reason}
    heldout: dict = field(default_factory=dict)
    front_budgets: int = 0  # distinct budgets among the front's configurations (the data)


def fit_arm(configs: List[ConfigValues], arm: str, metric: str) -> ArmResult:
    compute = np.array([c.compute for c in configs])
    errors = np.vstack([c.error for c in configs])  # [n_configs, B + 1]
    exps, logas = np.full(errors.shape[1], np.nan), np.full(errors.shape[1], np.nan)
    on_front = np.zeros(len(configs))
    front0 = []
    for b in range(errors.shape[1]):
        front, c, la = front_and_fit(compute, errors[:, b])
        if b == 0:
            front0 = front.tolist()
        on_front[front] += 1
        if c is not None:
            exps[b], logas[b] = c, la
    result = ArmResult(arm, metric, configs, front0, exps, logas, on_front / errors.shape[1],
                       front_budgets=len({configs[i].budget for i in front0}))
    result.saturating = saturating_fit(compute[front0], errors[front0, 0])
    result.heldout = heldout_check(configs)
    return result


def saturating_fit(compute: np.ndarray, error: np.ndarray) -> dict:
    """E = a (C + b)^c + d on the front, only when identified (>= IDENTIFIED_MIN_POINTS distinct
    compute values); else {"not_identified": why}."""
    k = len(np.unique(compute))
    if k < IDENTIFIED_MIN_POINTS:
        return {"not_identified": f"not identified ({k} front points; it needs >= {IDENTIFIED_MIN_POINTS})"}
    law = fit_saturating(compute, error)
    return {**law.params(), "rmse_log": law.rmse_log, "n": k}


def heldout_check(configs: List[ConfigValues]) -> dict:
    """Fit without the largest budget; predict the best error measured there. Beside it the naive
    predictor: no further improvement (the best error of the fitted budgets)."""
    budgets = sorted({c.budget for c in configs}, key=lambda b: max(c.compute for c in configs if c.budget == b))
    if len(budgets) < 3:
        return {"note": f"{len(budgets)} budget(s): a held-out check needs >= 3"}
    train = [c for c in configs if c.budget != budgets[-1]]
    target = min((c for c in configs if c.budget == budgets[-1]), key=lambda c: c.error[0])
    front, slope, intercept = front_and_fit(np.array([c.compute for c in train]), np.array([c.error[0] for c in train]))
    observed = float(target.error[0])
    naive = float(min(c.error[0] for c in train))
    out = {"budget": budgets[-1], "model": target.model, "compute": target.compute, "observed": observed,
           "naive": naive, "naive_rel_error": (naive - observed) / observed}
    if slope is not None:
        predicted = float(np.exp(intercept) * target.compute ** slope)
        out.update(power=predicted, power_rel_error=(predicted - observed) / observed)
    return out


# ---------------------------------------------------------------------------------- two arms

def interval(values: np.ndarray, level: float = LEVEL) -> Tuple[float, float]:
    v = values[np.isfinite(values)]
    if not len(v):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))


def significant(lo: float, hi: float) -> int:
    """+1 when the interval lies above 0, -1 below, 0 when it includes 0 (or is undefined)."""
    return 1 if lo > 0 else -1 if hi < 0 else 0


def exponent_difference(a: ArmResult, b: ArmResult, level: float = LEVEL) -> dict:
    """c_a - c_b on paired replicates (the same item and seed draws). Identified only when both arms
    have a fit on the data on a front of at least EXPONENT_MIN_POINTS points from EXPONENT_MIN_BUDGETS
    budgets, and a fit in at least FIT_SHARE_MIN of the replicates: an interval over the few
    replicates whose resampled front happens to hold two points describes those replicates, not the
    study (`identified` False, with `why`, and no interval)."""
    delta = a.exponent[1:] - b.exponent[1:]
    n, total = int(np.isfinite(delta).sum()), len(delta)
    out = {"delta": float(a.exponent[0] - b.exponent[0]), "lo": float("nan"), "hi": float("nan"),
           "n": n, "of": total, "significant": 0, "identified": False}
    missing = [r.arm for r in (a, b) if not np.isfinite(r.exponent[0])]
    narrow = [f"{r.arm}'s holds {len(r.front)} point(s) from {r.front_budgets} budget(s)" for r in (a, b)
              if len(r.front) < EXPONENT_MIN_POINTS or r.front_budgets < EXPONENT_MIN_BUDGETS]
    if missing:
        out["why"] = f"no power-law fit on the data for {' and '.join(missing)} (fewer than 2 front points)"
    elif narrow:
        out["why"] = (f"the front on the data: {'; '.join(narrow)} (an exponent needs >= {EXPONENT_MIN_POINTS} "
                      f"points from >= {EXPONENT_MIN_BUDGETS} budgets; one budget's front is the size axis at "
                      "fixed steps)")
    elif n < FIT_SHARE_MIN * total:
        out["why"] = (f"both arms fit in only {n} of {total} replicates (< {FIT_SHARE_MIN:.0%}): "
                      "the front is too often a single point")
    else:
        lo, hi = interval(delta, level)
        out.update(lo=lo, hi=hi, significant=significant(lo, hi), identified=True)
    return out


def best_by_budget(result: ArmResult) -> Dict[str, np.ndarray]:
    """Per budget, the best error over sizes per replicate `[B + 1]`."""
    out = {}
    for c in result.configs:
        out[c.budget] = c.error if c.budget not in out else np.fmin(out[c.budget], c.error)
    return out


def budget_differences(a: ArmResult, b: ArmResult, budgets: Sequence[str], level: float = LEVEL) -> List[dict]:
    """Per budget both arms ran: best error of a minus best error of b, with its paired interval."""
    best_a, best_b = best_by_budget(a), best_by_budget(b)
    out = []
    for budget in budgets:
        if budget in best_a and budget in best_b:
            d = best_a[budget] - best_b[budget]
            lo, hi = interval(d[1:], level)
            out.append({"budget": budget, "delta": float(d[0]), "lo": lo, "hi": hi, "significant": significant(lo, hi)})
    return out


def crossover(a: ArmResult, b: ArmResult, budgets: Sequence[str], level: float = LEVEL) -> dict:
    """Claimed only when the sign of the best-error difference is significant both ways: significant
    one way at some budget and the other way at a larger one. The fitted power laws' crossing (at the
    data) is reported as `fitted` (a description, not a finding)."""
    diffs = budget_differences(a, b, budgets, level)
    claim = None
    for i, lower in enumerate(diffs):
        upper = next((d for d in diffs[i + 1:] if d["significant"] == -lower["significant"] != 0), None)
        if lower["significant"] and upper:
            claim = {"between": (lower["budget"], upper["budget"]),
                     "lower_first": a.arm if lower["significant"] < 0 else b.arm}
            break
    fitted = []
    if np.isfinite(a.exponent[0]) and np.isfinite(b.exponent[0]):
        computes = [c.compute for c in a.configs + b.configs]
        fa = lambda x: np.exp(a.log_a[0]) * np.asarray(x) ** a.exponent[0]  # noqa: E731
        fb = lambda x: np.exp(b.log_a[0]) * np.asarray(x) ** b.exponent[0]  # noqa: E731
        fitted = crossovers(fa, fb, min(computes), max(computes))
    return {"claimed": claim, "by_budget": diffs, "fitted": fitted}


def more_steps(result: ArmResult, budgets: Sequence[str], level: float = LEVEL) -> List[dict]:
    """Per size, the error at each budget minus the error at the next smaller budget the arm ran
    (budgets in compute order), with its bootstrap interval: `worse` when more steps score significantly
    worse (the old study's b2 < b1 anomaly; issue 33 asks that it never happen). Both configurations
    use the same item and seed draws (paired: a seed's effect shared across budgets cancels)."""
    rank = {b: i for i, b in enumerate(budgets)}
    by_model: Dict[str, List[ConfigValues]] = {}
    for c in result.configs:
        if c.budget in rank:
            by_model.setdefault(c.model, []).append(c)
    out = []
    for model, configs in by_model.items():
        configs = sorted(configs, key=lambda c: rank[c.budget])
        for lower, upper in zip(configs, configs[1:]):
            d = upper.error - lower.error
            lo, hi = interval(d[1:], level)
            out.append({"model": model, "from": lower.budget, "to": upper.budget, "delta": float(d[0]),
                        "lo": lo, "hi": hi, "worse": significant(lo, hi) > 0})
    return out


def best_sizes(result: ArmResult) -> List[dict]:
    """Per budget, the size with the lowest error on the data and the share of replicates in which each
    size is the best. `edge` names the end of the ladder the best size sits at ("smallest" / "largest";
    None: inside): issue 33 asks for sizes enough that each budget's best size is inside the range, and
    a best size at the edge says the ladder may not hold the compute-optimal size for that budget."""
    out = []
    for budget in dict.fromkeys(c.budget for c in result.configs):
        configs = sorted((c for c in result.configs if c.budget == budget), key=lambda c: c.compute)
        errors = np.vstack([c.error for c in configs])  # [sizes, B + 1]
        best = np.argmin(errors, axis=0)
        share = {c.model: float(np.mean(best[1:] == i)) for i, c in enumerate(configs)}
        i = int(best[0])
        edge = None if 0 < i < len(configs) - 1 else ("smallest" if i == 0 else "largest")
        out.append({"budget": budget, "model": configs[i].model, "share": share[configs[i].model],
                    "shares": share, "edge": edge if len(configs) > 2 else "too few sizes"})
    return out


def paired_items(study: Study, metric: str, arm_a: str, arm_b: str) -> List[dict]:
    """Per (model, budget): the per-item comparison of two arms pooled over their common seeds: items
    only a gets right, only b gets right, and the mean difference in the metric."""
    runs = {(r.arm, r.model, r.budget, r.seed): r for r in study.runs}
    cells = sorted({(r.model, r.budget) for r in study.runs}, key=lambda c: (c[1], c[0]))
    out = []
    for model, budget in cells:
        pairs = [(runs[(arm_a, model, budget, s)], runs[(arm_b, model, budget, s)]) for s in
                 sorted({r.seed for r in study.runs}) if (arm_a, model, budget, s) in runs
                 and (arm_b, model, budget, s) in runs]
        if pairs:
            ha = np.concatenate([p[0].hits[metric] for p in pairs])
            hb = np.concatenate([p[1].hits[metric] for p in pairs])
            out.append({"model": model, "budget": budget, "seeds": len(pairs),
                        "only_a": int(((ha == 1) & (hb == 0)).sum()), "only_b": int(((ha == 0) & (hb == 1)).sum()),
                        "delta": float(np.nanmean(ha - hb))})
    return out


# ---------------------------------------------------------------------------------- all of it

@dataclass
class Analysis:
    study: Study
    num_samples: int
    level: float
    arms: Dict[Tuple[str, str], ArmResult]  # (arm, metric)
    pairs: Dict[Tuple[str, str, str], dict]  # (arm_a, arm_b, metric) -> exponent difference, crossover
    steps: Dict[Tuple[str, str], List[dict]] = field(default_factory=dict)  # (arm, metric) -> `more_steps`
    best: Dict[Tuple[str, str], List[dict]] = field(default_factory=dict)  # (arm, metric) -> `best_sizes`


def analyse(study: Study, num_samples: int = 4000, level: float = LEVEL, seed: int = 0) -> Analysis:
    reps = draw_replicates(study, num_samples, seed)
    arms_out, pairs, steps, best = {}, {}, {}, {}
    for metric in study.metrics:
        configs = config_values(study, reps, metric)
        for arm in study.arms:
            arms_out[(arm, metric)] = fit_arm([c for c in configs if c.arm == arm], arm, metric)
            steps[(arm, metric)] = more_steps(arms_out[(arm, metric)], study.budgets, level)
            best[(arm, metric)] = best_sizes(arms_out[(arm, metric)])
        for i, a in enumerate(study.arms):
            for b in study.arms[i + 1:]:
                ra, rb = arms_out[(a, metric)], arms_out[(b, metric)]
                pairs[(a, b, metric)] = {"exponent_difference": exponent_difference(ra, rb, level),
                                         "crossover": crossover(ra, rb, study.budgets, level)}
    return Analysis(study, num_samples, level, arms_out, pairs, steps, best)
