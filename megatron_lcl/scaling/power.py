"""Power of an objectives-at-matched-compute study, from a pilot's noise: how many seeds, test items,
front points and how much compute range a study needs to see a given difference.

    noise = pilot_noise(study, "retrieval_ir1")       # from runs with >= 2 seeds per (arm, cell)
    se = exponent_difference_se(noise, seeds=4, points=7, compute_range=1000, items=1126)
    seeds_needed(noise, delta=0.02, points=7, compute_range=1000, items=1126)

The noise model, for the paired difference D = E_a - E_b of two arms' errors at one configuration
(same size, budget and seed list; the same test items):

    Var(mean over S seeds of D) = run_var / S + item_var / N

- run_var: the variance over seeds of a run's D with the items fixed (initialisation, data order
  and the transfer heads' seed); estimated by the sample variance over the pilot's seeds, pooled over
  configurations (weighted by their degrees of freedom);
- item_var / N: the sampling variance of the test items (a new item set would move D): item_var is the
  per-item variance of hit_a - hit_b, averaged over runs. It does not shrink with seeds.

An exponent difference is the difference of two slopes of log E vs log C on K front points spaced
evenly in log C over a compute range R (factor):

    Var(c_a - c_b) = Var(D / E) / Sxx,   Sxx = sum_k (ln C_k - mean)^2 = ln(R)^2 K (K + 1) / (12 (K - 1))

with E the error level (delta method: ln E_a - ln E_b ~ D / E). Treating the points as independent is
conservative for the item term (the same items at every point: that part partly cancels in a slope).
The 90 % interval excludes 0 with 80 % power when SE <= delta / (1.645 + 0.842).
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np

Z_INTERVAL = 1.6449  # two-sided 90 % interval
Z_POWER = 0.8416  # 80 % power


@dataclass
class Noise:
    metric: str
    run_var: float  # variance over seeds of one run's paired error difference (items fixed)
    run_dof: int  # degrees of freedom behind run_var
    item_var: float  # per-item variance of hit_a - hit_b (divide by the number of items)
    error: float  # mean error level of the configurations used
    configurations: int  # (arm pair, size, budget) groups behind item_var
    paired: bool = True  # False: run_var is 2 x one arm's seed variance (no arm pair with 2 seeds yet)


def _same_seed_pairs(study) -> Dict[tuple, list]:
    """(arm a, arm b, model, budget) -> [(run of a, run of b)] with the same seed."""
    runs = {(r.arm, r.model, r.budget, r.seed): r for r in study.runs}
    out: Dict[tuple, list] = {}
    for i, a in enumerate(study.arms):
        for b in study.arms[i + 1:]:
            for (arm, model, budget, seed), ra in sorted(runs.items()):
                if arm == a and (b, model, budget, seed) in runs:
                    out.setdefault((a, b, model, budget), []).append((ra, runs[(b, model, budget, seed)]))
    return out


def _pooled_variance(groups: List[np.ndarray]) -> tuple:
    """(pooled sample variance, degrees of freedom) over groups of >= 2 values."""
    groups = [g for g in groups if len(g) >= 2]
    dof = sum(len(g) - 1 for g in groups)
    return (sum(float(((g - g.mean()) ** 2).sum()) for g in groups) / dof if dof else float("nan")), dof


def pilot_noise(study, metric: str) -> Noise:
    """From `study` (megatron_lcl.scaling.study.Study): run_var pooled over every arm pair and (model,
    budget) with >= 2 common seeds; with none yet (a pilot still running), 2 x one arm's variance over
    seeds (`paired` False: an upper bound, as if the arms of one seed were uncorrelated). item_var and
    the error level from every same-seed pair of arms."""
    pairs = _same_seed_pairs(study)
    if not pairs:
        raise ValueError(f"{metric}: no two arms share a size, budget and seed: no paired noise to measure")
    acc = lambda r: float(np.nanmean(r.hits[metric]))  # noqa: E731
    run_var, dof = _pooled_variance([np.array([acc(ra) - acc(rb) for ra, rb in ps]) for ps in pairs.values()])
    paired = dof > 0
    if not paired:
        by_config: Dict[tuple, list] = {}
        for r in study.runs:
            by_config.setdefault((r.arm, r.model, r.budget), []).append(acc(r))
        one_arm, dof = _pooled_variance([np.array(v) for v in by_config.values()])
        if not dof:
            raise ValueError(f"{metric}: no configuration has >= 2 seeds: the pilot cannot give a run variance")
        run_var = 2 * one_arm
    item_var = float(np.mean([np.nanvar(ra.hits[metric] - rb.hits[metric]) for ps in pairs.values() for ra, rb in ps]))
    error = float(np.mean([1 - acc(r) for ps in pairs.values() for pair in ps for r in pair]))
    if error < 1e-3:
        raise ValueError(f"{metric}: saturated (mean error {error:.2g}): a relative noise is undefined")
    return Noise(metric, run_var, dof, item_var, error, len(pairs), paired)


def sxx(points: int, compute_range: float) -> float:
    """Sum of squared deviations of ln C over `points` evenly log-spaced values spanning `compute_range`x."""
    assert points >= 2 and compute_range > 1, "a slope needs >= 2 points over a range > 1"
    return math.log(compute_range) ** 2 * points * (points + 1) / (12 * (points - 1))


def difference_se(noise: Noise, seeds: int, items: int) -> float:
    """Standard error of a configuration's paired error difference, mean over `seeds` seeds."""
    return math.sqrt(noise.run_var / seeds + noise.item_var / items)


def exponent_difference_se(noise: Noise, seeds: int, points: int, compute_range: float, items: int) -> float:
    return difference_se(noise, seeds, items) / noise.error / math.sqrt(sxx(points, compute_range))


def power(delta: float, se: float) -> float:
    """Probability that the 90 % interval of an estimate with standard error `se` excludes 0 when the
    true value is `delta`."""
    if se <= 0:  # no noise at all (e.g. identical runs): any true difference is seen, none is not
        return 1.0 if delta else 0.0
    return 0.5 * math.erfc(-(abs(delta) / se - Z_INTERVAL) / math.sqrt(2))


def seeds_needed(noise: Noise, delta: float, points: int, compute_range: float, items: int) -> int:
    """The fewest seeds whose exponent difference SE reaches delta / (z_interval + z_power):
    run_var / S + item_var / N <= (target * error)^2 * Sxx. 0 when no number of seeds can (the item
    term alone is too large: more items, points or compute range needed)."""
    target = abs(delta) / (Z_INTERVAL + Z_POWER)
    room = (target * noise.error) ** 2 * sxx(points, compute_range) - noise.item_var / items
    if room <= 0:
        return 0
    return max(1, math.ceil(noise.run_var / room - 1e-12))


def power_table(noise: Noise, items: int, delta: float, seeds: Sequence[int] = (1, 2, 4, 6, 8),
                designs: Sequence[tuple] = ((3, 30), (5, 100), (7, 300), (7, 1000), (9, 1000))) -> List[Dict]:
    """Rows of (seeds, front points, compute range) -> SE of an exponent difference and the power to
    see `delta`; also the smallest difference in error a single configuration can resolve."""
    rows = []
    for points, compute_range in designs:
        for s in seeds:
            se = exponent_difference_se(noise, s, points, compute_range, items)
            rows.append({"seeds": s, "points": points, "range": compute_range, "se": se, "power": power(delta, se),
                         "level_mde": (Z_INTERVAL + Z_POWER) * difference_se(noise, s, items)})
    return rows
