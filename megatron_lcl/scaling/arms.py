"""Objectives compared on transfer at matched compute: for each arm of a sweep (lcl, con, gen, ...)
and each transfer metric, error vs total training compute on the Pareto front, fitted with
E = a * C^c and E = a * (C + b)^c + d, bootstrap intervals over points and seeds, the difference
of exponents between two arms, where their fitted curves cross, and a held-out check.

    comparison = compare(rows, metrics=["retrieval_tr1", "probe_mean"])

As in Cherti et al. 2023 (OpenCLIP scaling: per-compute minimum, E = beta * C^alpha) and Nezhurina
et al. 2025 (CLIP vs MaMMUT: E = a (C + b)^c + d on the Pareto front, crossover compute).

- A configuration is one (arm, model, budget); its error is the mean over its seeds of
  1 - metric (metrics are accuracies / recalls in [0, 1]), floored at ERROR_FLOOR (a perfect score
  has no logarithm); its compute is the mean of the seeds' total training FLOPs (FLOPs model).
- The Pareto front: the configurations no cheaper configuration of the same arm beats.
- Only the ladder enters the fits: budgets an arm runs at every model size. Other budgets (e.g.
  the contrastive batch as an axis: one size, some arms) are side points (`side_by_side`).
- The four-parameter form only with >= IDENTIFIED_MIN_POINTS front points (else: not identified).
  For studies with per-item results, megatron_lcl.scaling.study is the stricter analysis (paired
  item and seed bootstrap, untrained baseline, naive held-out predictor, crossover rule).
- Bootstrap replicate: draw configurations with replacement (points), for each drawn configuration
  its seeds with replacement (seeds), recompute the front, refit. Replicates of two arms are paired
  by index for differences and crossovers. Intervals are percentile intervals at `level`.
- Held-out check: refit without the largest ladder budget and predict the best error measured at
  that budget (at its compute).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_lcl.scaling.fit import (IDENTIFIED_MIN_POINTS, PowerLaw, SaturatingLaw, crossovers,
                                      fit_power_law, fit_saturating, pareto_frontier)

ERROR_FLOOR = 1e-3
EXTRAPOLATE = 100.0  # crossovers are also searched up to this factor beyond the largest compute


@dataclass
class Config:
    """One (arm, model, budget): its seeds' errors and compute."""

    arm: str
    model: str
    budget: str
    compute: float  # mean total training FLOPs over seeds
    errors: np.ndarray  # 1 - metric, one per seed
    seeds: List[str] = field(default_factory=list)

    @property
    def error(self) -> float:
        return float(self.errors.mean())


@dataclass
class ArmFit:
    arm: str
    metric: str
    configs: List[Config]  # the ladder, by compute
    front: List[int]  # indices into configs
    power: Optional[PowerLaw] = None  # E = a C^-alpha, i.e. exponent c = -alpha
    saturating: Optional[SaturatingLaw] = None
    power_boot: List[Optional[PowerLaw]] = field(default_factory=list)  # one per replicate (None: no fit)
    saturating_boot: List[Optional[SaturatingLaw]] = field(default_factory=list)
    heldout: dict = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    @property
    def exponent(self) -> Optional[float]:
        """c of E = a C^c (negative: error falls with compute)."""
        return None if self.power is None else -self.power.alpha

    def best(self):
        """The fitted curve to compare with: the saturating one when it exists, else the power law."""
        return self.saturating or self.power


@dataclass
class Comparison:
    metrics: List[str]
    arms: List[str]
    ladder: List[str]  # budgets in the fits
    fits: Dict[Tuple[str, str], ArmFit]  # (arm, metric)
    level: float
    num_samples: int


# ---------------------------------------------------------------------------------- configurations

def error_of(value) -> Optional[float]:
    """1 - metric, floored; None when the row has no value."""
    if value in (None, ""):
        return None
    v = float(value)
    return None if not np.isfinite(v) else max(1.0 - v, ERROR_FLOOR)


def ladder_budgets(rows: Sequence[dict]) -> List[str]:
    """Budgets that every arm runs at every model size of the sweep (in order of first appearance)."""
    models = {r["model"] for r in rows}
    arms = {r.get("arm", "") for r in rows}
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    have = {(r.get("arm", ""), r["model"], r["budget"]) for r in rows}
    return [b for b in budgets if all((a, m, b) in have for a in arms for m in models)]


def configs_of(rows: Sequence[dict], arm: str, metric: str, budgets: Sequence[str]) -> List[Config]:
    """The arm's configurations at `budgets` with a value of `metric`, by compute."""
    groups: Dict[Tuple[str, str], list] = {}
    for r in rows:
        if r.get("arm", "") == arm and r["budget"] in budgets and error_of(r.get(metric)) is not None:
            groups.setdefault((r["model"], r["budget"]), []).append(r)
    out = [Config(arm, model, budget, float(np.mean([float(r["train_flops"]) for r in rs])),
                  np.array([error_of(r[metric]) for r in rs]), [str(r.get("seed", "")) for r in rs])
           for (model, budget), rs in groups.items()]
    return sorted(out, key=lambda c: c.compute)


def front_of(compute: np.ndarray, error: np.ndarray) -> np.ndarray:
    return pareto_frontier(compute, error)


# ---------------------------------------------------------------------------------- fits

def _fit_front(compute: np.ndarray, error: np.ndarray, start: Optional[SaturatingLaw] = None,
               saturating: bool = True):
    """(power law or None, saturating law or None) on the front of (compute, error); `saturating`
    False skips the four-parameter fit (bootstrap refits of an arm whose full data has none)."""
    f = front_of(compute, error)
    c, e = compute[f], error[f]
    power = fit_power_law(c, e) if len(np.unique(c)) >= 2 else None
    if not saturating or len(np.unique(c)) < IDENTIFIED_MIN_POINTS:
        return power, None
    return power, fit_saturating(c, e, start)


def _replicate(configs: List[Config], rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One bootstrap draw: configurations with replacement, each with its seeds resampled."""
    idx = rng.integers(0, len(configs), len(configs))
    compute = np.array([configs[i].compute for i in idx])
    error = np.array([rng.choice(configs[i].errors, len(configs[i].errors)).mean() for i in idx])
    return compute, error


def fit_arm(configs: List[Config], arm: str, metric: str, num_samples: int = 200, seed: int = 0) -> ArmFit:
    compute = np.array([c.compute for c in configs])
    error = np.array([c.error for c in configs])
    fit = ArmFit(arm, metric, configs, front_of(compute, error).tolist() if configs else [])
    if len(fit.front) < 2:
        fit.notes.append(f"{len(fit.front)} configuration(s) on the front: no fit")
        return fit
    fit.power, fit.saturating = _fit_front(compute, error)
    if fit.saturating is None:
        fit.notes.append(f"{len(fit.front)} front points: a * (C + b)^c + d is not identified (needs >= "
                         f"{IDENTIFIED_MIN_POINTS})")
    rng = np.random.default_rng(seed)
    for _ in range(num_samples):
        with np.errstate(all="ignore"):  # degenerate draws (e.g. two points) may overflow; they still count
            power, saturating = _fit_front(*_replicate(configs, rng), start=fit.saturating,
                                           saturating=fit.saturating is not None)
        fit.power_boot.append(power)
        fit.saturating_boot.append(saturating)
    fit.heldout = heldout_check(configs)
    return fit


def interval(values: Sequence[float], level: float) -> Tuple[float, float]:
    tail = (1 - level) / 2 * 100
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))


def parameter_intervals(fit: ArmFit, level: float) -> Dict[str, Tuple[float, float]]:
    """Bootstrap intervals of c (power law) and of a, b, c, d (saturating: keys sat_*)."""
    out = {"c": interval([-p.alpha for p in fit.power_boot if p is not None], level),
           "a": interval([p.a for p in fit.power_boot if p is not None], level)}
    sats = [s for s in fit.saturating_boot if s is not None]
    if sats:
        for name in ("a", "b", "c", "d"):
            out[f"sat_{name}"] = interval([s.params()[name] for s in sats], level)
    return out


def heldout_check(configs: List[Config]) -> dict:
    """Refit without the largest budget (by compute); predict the best error measured there."""
    budgets = sorted({c.budget for c in configs}, key=lambda b: max(c.compute for c in configs if c.budget == b))
    if len(budgets) < 3:
        return {"note": "fewer than 3 budgets: no held-out check"}
    held = budgets[-1]
    train = [c for c in configs if c.budget != held]
    target = min((c for c in configs if c.budget == held), key=lambda c: c.error)
    power, saturating = _fit_front(np.array([c.compute for c in train]), np.array([c.error for c in train]))
    out = {"budget": held, "compute": target.compute, "observed": target.error, "config": target.model}
    for name, law in (("power", power), ("saturating", saturating)):
        if law is not None:
            predicted = float(law(target.compute))
            out[name] = {"predicted": predicted, "relative_error": (predicted - target.error) / target.error}
    return out


# ---------------------------------------------------------------------------------- two arms

def exponent_difference(a: ArmFit, b: ArmFit, level: float) -> Optional[dict]:
    """c_a - c_b (power-law exponents) with a paired-bootstrap interval."""
    if a.power is None or b.power is None:
        return None
    deltas = [-pa.alpha + pb.alpha for pa, pb in zip(a.power_boot, b.power_boot) if pa is not None and pb is not None]
    lo, hi = interval(deltas, level)
    return {"delta": a.exponent - b.exponent, "lo": lo, "hi": hi, "n": len(deltas)}


def crossover(a: ArmFit, b: ArmFit, level: float) -> Optional[dict]:
    """Where the two arms' fitted curves cross: in the measured compute range, and beyond it up to
    EXTRAPOLATE x the largest compute (an extrapolation); the fraction of paired bootstrap replicates
    whose curves cross in the measured range, and the interval of that crossing. The saturating
    curves are compared when both arms have them and at least half the replicates refit them both,
    else the power laws."""
    fa, fb = a.best(), b.best()
    if fa is None or fb is None:
        return None
    both = sum(x is not None and y is not None for x, y in zip(a.saturating_boot, b.saturating_boot))
    # the four-parameter curves only where both arms have them and most replicates could refit them
    form = "saturating" if a.saturating is not None and b.saturating is not None and \
        both >= len(a.saturating_boot) / 2 else "power"
    if form == "power":
        fa, fb = a.power, b.power
    computes = [c.compute for c in a.configs + b.configs]
    lo, hi = min(computes), max(computes)
    boot_a = a.saturating_boot if form == "saturating" else a.power_boot
    boot_b = b.saturating_boot if form == "saturating" else b.power_boot
    pairs = [(x, y) for x, y in zip(boot_a, boot_b) if x is not None and y is not None]
    with np.errstate(all="ignore"):
        crossing = [crossovers(x, y, lo, hi) for x, y in pairs]
    first = [c[0] for c in crossing if c]
    return {"form": form, "range": (lo, hi), "in_range": crossovers(fa, fb, lo, hi),
            "extrapolated": crossovers(fa, fb, hi, hi * EXTRAPOLATE),
            "boot_fraction": len(first) / len(pairs) if pairs else float("nan"),
            "boot_interval": interval(first, level) if first else None, "boot_n": len(pairs),
            "a_lower_at_max": bool(fa(hi) < fb(hi))}


# ---------------------------------------------------------------------------------- all of it

def compare(rows: Sequence[dict], metrics: Sequence[str], num_samples: int = 200, level: float = 0.9,
            seed: int = 0) -> Comparison:
    """Fit every (arm, metric) on the ladder budgets of `rows` (status-ok sweep rows)."""
    ladder = ladder_budgets(rows)
    arms = list(dict.fromkeys(r.get("arm", "") for r in rows))
    fits = {(arm, metric): fit_arm(configs_of(rows, arm, metric, ladder), arm, metric, num_samples, seed)
            for metric in metrics for arm in arms}
    return Comparison(list(metrics), arms, ladder, fits, level, num_samples)


def side_by_side(rows: Sequence[dict], metrics: Sequence[str]) -> List[dict]:
    """Points that differ from a ladder point only in their budget's settings (same arm, model and
    steps, e.g. another contrastive batch): one entry per (arm, model, steps, budget) with the mean
    and sd of each metric over seeds, for groups that hold more than one budget."""
    groups: Dict[tuple, Dict[str, list]] = {}
    for r in rows:
        key = (r.get("arm", ""), r["model"], int(float(r["train_steps"])))
        groups.setdefault(key, {}).setdefault(r["budget"], []).append(r)
    out = []
    for (arm, model, steps), by_budget in groups.items():
        if len(by_budget) < 2:
            continue
        for budget, rs in by_budget.items():
            entry = {"arm": arm, "model": model, "train_steps": steps, "budget": budget,
                     "contrastive_batch": rs[0].get("contrastive_batch", ""), "seeds": len(rs),
                     "train_flops": float(np.mean([float(r["train_flops"]) for r in rs]))}
            for m in metrics:
                values = [float(r[m]) for r in rs if r.get(m) not in (None, "")]
                entry[m] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0) \
                    if values else None
            out.append(entry)
    return out
