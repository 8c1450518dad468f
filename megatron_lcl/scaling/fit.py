"""Power-law fits for scaling sweeps, with bootstrap confidence intervals.

    L(x) = a * x^-alpha            least squares on log L = log a - alpha log x
    L(x) = E + a * x^-alpha        with an irreducible loss E: for each E on a grid (then refined),
                                   the line fit of log(L - E); the E with the smallest squared error
                                   in log L wins (Chinchilla-style, but without scipy)

x is compute C (FLOPs) or parameters N. The compute-optimal frontier is either the lower envelope of
(C, L) over all runs (`pareto_frontier`), or, for IsoFLOP sweeps (several model sizes per compute
budget), the minimum of a parabola in log N per budget (`isoflop_optima`, Chinchilla approach 2);
N_opt(C) = k * C^a is then a power law too (`fit_power_law(..., increasing=True)`).

    E(C) = a * (C + b)^c + d       `fit_saturating` (scipy least squares in log E), the form Nezhurina
                                   et al. 2025 fit to the Pareto front of transfer error vs compute;
                                   `crossovers` finds where two fitted curves cross
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import brentq, least_squares


@dataclass
class PowerLaw:
    """y = e + a * x^-alpha (alpha < 0 for increasing laws such as N_opt(C))."""

    a: float
    alpha: float
    e: float = 0.0
    rmse_log: float = float("nan")  # root mean squared error of log y
    n: int = 0
    irreducible: bool = False  # fitted with the E term (E may come out 0)
    ci: Dict[str, Tuple[float, float]] = field(default_factory=dict)  # bootstrap intervals by name

    def __call__(self, x):
        return self.e + self.a * np.asarray(x, dtype=float) ** (-self.alpha)

    def params(self) -> Dict[str, float]:
        return {"a": self.a, "alpha": self.alpha, "e": self.e}

    def describe(self, x_name: str = "x", y_name: str = "L") -> str:
        def with_ci(name, value):
            lo_hi = self.ci.get(name)
            return f"{value:.4g}" + (f" [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else "")
        head = f"{y_name} = " + (f"{with_ci('e', self.e)} + " if self.irreducible else "")
        return head + f"{self.a:.4g} * {x_name}^-({with_ci('alpha', self.alpha)})"


def _check(x, y) -> Tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    assert x.shape == y.shape and x.ndim == 1, f"x {x.shape} and y {y.shape} must be 1-d of one length"
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    assert ok.sum() >= 2, f"a power-law fit needs >= 2 positive finite points, got {int(ok.sum())}"
    return x[ok], y[ok]


def _line_fit(log_x: np.ndarray, log_y: np.ndarray) -> Tuple[float, float]:
    """log y = c0 + c1 log x -> (a, alpha) with y = a x^-alpha."""
    c1, c0 = np.polyfit(log_x, log_y, 1)
    return float(np.exp(c0)), float(-c1)


def _log_sse(x, y, law: PowerLaw) -> float:
    pred = law(x)
    if np.any(pred <= 0):
        return float("inf")
    return float(np.sum((np.log(y) - np.log(pred)) ** 2))


def fit_power_law(x: Sequence[float], y: Sequence[float], irreducible: bool = False,
                  increasing: bool = False) -> PowerLaw:
    """Fit y = a x^-alpha (or e + a x^-alpha with `irreducible`). `increasing` only documents intent:
    the same fit then returns a negative alpha (e.g. N_opt = k C^0.5 gives alpha = -0.5)."""
    x, y = _check(x, y)
    lx = np.log(x)
    if not irreducible:
        a, alpha = _line_fit(lx, np.log(y))
        law = PowerLaw(a, alpha, 0.0, n=len(x))
    else:
        assert not increasing, "an irreducible term only makes sense for a decreasing law"
        law = _fit_with_floor(x, y)
    law.rmse_log = float(np.sqrt(_log_sse(x, y, law) / len(x)))
    return law


def _fit_with_floor(x: np.ndarray, y: np.ndarray, grid: int = 64, rounds: int = 4) -> PowerLaw:
    """Grid over E in [0, min y), refined `rounds` times around the best E."""
    lx = np.log(x)
    lo, hi = 0.0, float(y.min()) * (1 - 1e-6)
    best = None
    for _ in range(rounds):
        for e in np.linspace(lo, hi, grid):
            a, alpha = _line_fit(lx, np.log(y - e))
            law = PowerLaw(a, alpha, float(e), n=len(x), irreducible=True)
            sse = _log_sse(x, y, law)
            if best is None or sse < best[0]:
                best = (sse, law)
        step = (hi - lo) / (grid - 1)
        lo, hi = max(0.0, best[1].e - step), min(float(y.min()) * (1 - 1e-6), best[1].e + step)
    return best[1]


def bootstrap_laws(x: Sequence[float], y: Sequence[float], fit: Callable[[np.ndarray, np.ndarray], PowerLaw],
                   num_samples: int = 500, seed: int = 0) -> List[PowerLaw]:
    """Fits to the rows resampled with replacement `num_samples` times (draws with < 2 distinct x skipped)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    laws = []
    for _ in range(num_samples):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) >= 2:  # a line needs two distinct x
            laws.append(fit(x[idx], y[idx]))
    return laws


def bootstrap(x: Sequence[float], y: Sequence[float], fit: Callable[[np.ndarray, np.ndarray], PowerLaw],
              num_samples: int = 500, level: float = 0.9, seed: int = 0) -> Dict[str, Tuple[float, float]]:
    """Percentile intervals (`level`, e.g. 90%) of each fitted parameter over bootstrap refits."""
    laws = bootstrap_laws(x, y, fit, num_samples, seed)
    tail = (1 - level) / 2 * 100
    return {name: (float(np.percentile([law.params()[name] for law in laws], tail)),
                   float(np.percentile([law.params()[name] for law in laws], 100 - tail)))
            for name in ("a", "alpha", "e")}


def prediction_band(laws: List[PowerLaw], x: Sequence[float], level: float = 0.9) -> Tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band of the bootstrap fits' predictions at `x` (for plots)."""
    preds = np.stack([law(x) for law in laws])
    tail = (1 - level) / 2 * 100
    return np.percentile(preds, tail, axis=0), np.percentile(preds, 100 - tail, axis=0)


def fit_with_ci(x, y, irreducible: bool = False, num_samples: int = 500, level: float = 0.9,
                seed: int = 0) -> PowerLaw:
    """`fit_power_law` plus bootstrap intervals in `.ci` (alpha, a and, with a floor, e)."""
    law = fit_power_law(x, y, irreducible)
    law.ci = bootstrap(x, y, lambda bx, by: fit_power_law(bx, by, irreducible), num_samples, level, seed)
    if not irreducible:
        law.ci.pop("e", None)
    return law


# ---------------------------------------------------------------------------------- the frontier

def pareto_frontier(compute: Sequence[float], loss: Sequence[float]) -> np.ndarray:
    """Indices of runs no cheaper run beats: the lower envelope of loss vs compute, by compute."""
    c, l = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    keep, best = [], np.inf
    for i in np.argsort(c, kind="stable"):
        if l[i] < best:
            keep.append(int(i))
            best = l[i]
    return np.array(keep, dtype=int)


@dataclass
class IsoFlopOptimum:
    budget: str
    compute: float  # mean FLOPs of the budget's runs
    params_opt: float  # N at the parabola's minimum (or the best run when the fit is not usable)
    loss_opt: float
    from_parabola: bool


def isoflop_optima(budget: Sequence[str], compute: Sequence[float], params: Sequence[float],
                   loss: Sequence[float]) -> List[IsoFlopOptimum]:
    """Per compute budget: fit L = c2 (log N)^2 + c1 log N + c0 and take its minimum (Chinchilla
    approach 2). Falls back to the best run when a budget has < 3 sizes, the parabola opens downward,
    or its minimum lies outside the sizes tried (an extrapolated optimum is not trusted)."""
    budget = np.asarray(budget)
    c, n, l = (np.asarray(v, dtype=float) for v in (compute, params, loss))
    out = []
    for name in dict.fromkeys(budget.tolist()):
        sel = budget == name
        ln, ll = np.log(n[sel]), l[sel]
        best = int(np.argmin(ll))
        opt = IsoFlopOptimum(str(name), float(c[sel].mean()), float(n[sel][best]), float(ll[best]), False)
        if len(np.unique(ln)) >= 3:
            c2, c1, c0 = np.polyfit(ln, ll, 2)
            x_min = -c1 / (2 * c2) if c2 > 0 else np.nan
            if np.isfinite(x_min) and ln.min() <= x_min <= ln.max():
                opt = IsoFlopOptimum(str(name), opt.compute, float(np.exp(x_min)),
                                     float(c2 * x_min ** 2 + c1 * x_min + c0), True)
        out.append(opt)
    return sorted(out, key=lambda o: o.compute)


# ---------------------------------------------------------------------------------- E(C) = a (C + b)^c + d

@dataclass
class SaturatingLaw:
    """E(C) = a * (C/scale + b)^c + d (Nezhurina et al. 2025: the Pareto front of error vs compute).
    C is divided by `scale` (the smallest compute fitted) so that b is in those units and the fit is
    well conditioned; c < 0 is the scaling exponent, d >= 0 the error compute does not remove."""

    a: float
    b: float
    c: float
    d: float
    scale: float
    rmse_log: float = float("nan")
    n: int = 0

    def __call__(self, compute):
        return self.a * (np.asarray(compute, dtype=float) / self.scale + self.b) ** self.c + self.d

    def params(self) -> Dict[str, float]:
        """In compute units: E = a (C + b)^c + d with C and b in FLOPs."""
        return {"a": self.a * self.scale ** -self.c, "b": self.b * self.scale, "c": self.c, "d": self.d}


SATURATING_MIN_POINTS = 5  # four parameters: at least one degree of freedom (what the fit itself needs)
# What a report needs before it quotes the four-parameter form: with fewer front points its b and d
# are not identified (b and c trade off along a ridge; 5-point fits gave b ~ 1e-14 FLOPs, d ~ 1e-15)
IDENTIFIED_MIN_POINTS = 8


def fit_saturating(compute: Sequence[float], error: Sequence[float],
                   start: Optional[SaturatingLaw] = None) -> SaturatingLaw:
    """Least squares in log E (relative errors) with b >= 0, c in [-5, 0), 0 <= d < min E. The surface
    is flat along ridges (b and c trade off), so: a grid over (b, c) where the best (a, d) of each
    cell is a weighted linear least squares (variable projection), then a local refinement from the
    best cell (and from `start`, e.g. the full-data fit for bootstrap refits). Needs
    SATURATING_MIN_POINTS distinct compute values."""
    x, y = _check(compute, error)
    assert len(np.unique(x)) >= SATURATING_MIN_POINTS, \
        f"a * (C + b)^c + d needs >= {SATURATING_MIN_POINTS} distinct compute values, got {len(np.unique(x))}"
    scale = float(x.min())
    xs, ly, d_max = x / scale, np.log(y), float(y.min()) * (1 - 1e-6)
    lower, upper = [-30.0, 0.0, -5.0, 0.0], [30.0, 1e3, -1e-4, d_max]

    def residual(p):  # p = (log a, b, c, d)
        return np.log(np.exp(p[0]) * (xs + p[1]) ** p[2] + p[3]) - ly

    starts = [_best_grid_cell(xs, y, d_max)]
    if start is not None:
        starts.append([np.log(start.a) + start.c * np.log(scale / start.scale), start.b * start.scale / scale,
                       start.c, min(start.d, d_max)])
    best = None
    for p0 in starts:
        r = least_squares(residual, np.clip(np.nan_to_num(p0), lower, upper), bounds=(lower, upper), method="trf")
        if best is None or r.cost < best.cost:
            best = r
    la, b, c, d = best.x
    law = SaturatingLaw(float(np.exp(la)), float(b), float(c), float(d), scale, n=len(x))
    law.rmse_log = float(np.sqrt(np.mean((np.log(law(x)) - ly) ** 2)))
    return law


def _best_grid_cell(xs: np.ndarray, y: np.ndarray, d_max: float) -> list:
    """(log a, b, c, d) of the best (b, c) grid cell; in each cell a >= 0 and 0 <= d <= d_max solve
    the least squares of a * (xs + b)^c + d against y weighted by 1 / y (relative errors)."""
    b = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 31)])[:, None, None]
    c = np.linspace(-5.0, -0.01, 120)[None, :, None]
    f = (xs[None, None, :] + b) ** c  # [nb, nc, n]
    w2 = (1.0 / y) ** 2
    sff, sf, s1 = (w2 * f * f).sum(-1), (w2 * f).sum(-1), w2.sum()
    sfy, sy = (w2 * f * y).sum(-1), (w2 * y).sum()
    det = sff * s1 - sf * sf
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(det > 0, (sfy * s1 - sf * sy) / det, 0.0)
        d = np.clip(np.where(det > 0, (sff * sy - sf * sfy) / det, 0.0), 0.0, d_max)
        a = np.maximum(np.where(d != 0, (sfy - d * sf) / sff, sfy / sff), 1e-300)  # refit a at the clipped d
        pred = a[..., None] * f + d[..., None]
        sse = (np.log(np.maximum(pred, 1e-300)) - np.log(y)) ** 2
    sse = np.nan_to_num(sse.sum(-1), nan=np.inf)
    i, j = np.unravel_index(np.argmin(sse), sse.shape)
    return [float(np.log(a[i, j])), float(b[i, 0, 0]), float(c[0, j, 0]), float(d[i, j])]


def crossovers(f: Callable, g: Callable, lo: float, hi: float, num: int = 400) -> List[float]:
    """Compute values in [lo, hi] where curves f and g cross (sign changes of f - g on a log grid,
    each refined by bisection in log C). Empty when they do not cross there."""
    grid = np.geomspace(lo, hi, num)
    diff = np.asarray(f(grid), dtype=float) - np.asarray(g(grid), dtype=float)
    out = []
    for i in np.nonzero(np.sign(diff[:-1]) * np.sign(diff[1:]) < 0)[0]:
        h = lambda t: float(f(np.exp(t)) - g(np.exp(t)))  # noqa: E731
        out.append(float(np.exp(brentq(h, np.log(grid[i]), np.log(grid[i + 1])))))
    return out
