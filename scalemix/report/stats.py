"""The statistics of an ablation report (scipy), each a small function tested against
scipy directly and hand-worked cases.

* ``describe``: n, mean, standard deviation (ddof 1), 95 % bootstrap CI of the mean
  (percentile, 10 000 resamples, seeded), interquartile mean where n >= 4.
* ``paired``: differences b - a matched on seed: mean with bootstrap CI, paired t test
  (the primary test), Wilcoxon signed-rank (robustness check), Cohen's d_z, and the
  probability of improvement P(b > a) (ties count one half).
* ``holm``: Holm-Bonferroni step-down adjusted p-values for one family of tests.
* ``omnibus``: Friedman across the levels of an axis when every seed has every level
  (blocked by seed), else Kruskal-Wallis.
* ``spearman``: rank correlation with a 95 % CI (Fisher z, SE 1.06 / sqrt(n - 3),
  Fieller, Hartley & Pearson 1957).
* ``min_wilcoxon_p`` / ``too_few``: what n seeds can and cannot show, said in words.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
BOOT = 10_000
SEED = 12345


def bootstrap_ci(x, level: float = 0.95, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean; (nan, nan) with fewer than 2 values."""
    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = stats.bootstrap(
        (x,),
        np.mean,
        n_resamples=BOOT,
        confidence_level=level,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def iqm(x) -> float:
    """Interquartile mean: the mean of the middle 50 % (scipy's 25 % trimmed mean)."""
    return float(stats.trim_mean(np.asarray(x, dtype=float), 0.25))


@dataclass
class Summary:
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    iqm: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def describe(x) -> Summary:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    lo, hi = bootstrap_ci(x)
    return Summary(
        n=n,
        mean=float(x.mean()) if n else math.nan,
        std=float(x.std(ddof=1)) if n > 1 else math.nan,
        ci_low=lo,
        ci_high=hi,
        iqm=iqm(x) if n >= 4 else None,
    )


@dataclass
class Paired:
    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    t: float
    p_t: float
    p_wilcoxon: float
    effect_dz: float
    prob_improvement: float
    p_holm: float = math.nan

    def as_dict(self) -> dict:
        return asdict(self)


def paired(a, b) -> Paired:
    """Compare b against a on matched pairs (same seed)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = b - a
    n = len(d)
    lo, hi = bootstrap_ci(d)
    if n >= 2 and np.std(d, ddof=1) > 0:
        t_res = stats.ttest_rel(b, a)
        t, p_t = float(t_res.statistic), float(t_res.pvalue)
        dz = float(d.mean() / d.std(ddof=1))
    else:
        t, p_t = math.nan, (1.0 if n >= 2 and np.all(d == 0) else math.nan)
        dz = math.nan
    if n >= 1 and np.any(d != 0):
        p_w = float(stats.wilcoxon(d).pvalue)
    else:
        p_w = math.nan
    poi = float(np.mean((d > 0) + 0.5 * (d == 0))) if n else math.nan
    return Paired(n, float(d.mean()) if n else math.nan, lo, hi, t, p_t, p_w, dz, poi)


def holm(pvalues) -> list[float]:
    """Holm step-down adjusted p-values (nan stays nan and is not counted)."""
    p = np.asarray(pvalues, dtype=float)
    ok = np.where(np.isfinite(p))[0]
    out = np.full(len(p), np.nan)
    m = len(ok)
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


@dataclass
class Omnibus:
    test: str
    statistic: float
    p: float
    levels: int
    blocks: int


def omnibus(groups: dict, blocked: dict | None = None) -> Omnibus | None:
    """``groups``: level -> values. ``blocked``: level -> {seed: value} for Friedman."""
    levels = [k for k, v in groups.items() if len(v) > 0]
    if len(levels) < 2:
        return None
    if blocked is not None and len(levels) >= 3:
        seeds = set.intersection(*(set(blocked[k]) for k in levels))
        if len(seeds) >= 2:
            cols = [[blocked[k][s] for s in sorted(seeds)] for k in levels]
            if np.ptp(np.asarray(cols)) > 0:
                res = stats.friedmanchisquare(*cols)
                return Omnibus(
                    "Friedman", float(res.statistic), float(res.pvalue), len(levels), len(seeds)
                )
    values = [np.asarray(groups[k], dtype=float) for k in levels]
    if np.ptp(np.concatenate(values)) == 0:
        return Omnibus("Kruskal-Wallis", 0.0, 1.0, len(levels), 0)
    res = stats.kruskal(*values)
    return Omnibus("Kruskal-Wallis", float(res.statistic), float(res.pvalue), len(levels), 0)


@dataclass
class Correlation:
    n: int
    rho: float
    p: float
    ci_low: float
    ci_high: float


def spearman(x, y) -> Correlation | None:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    if n < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    res = stats.spearmanr(x, y)
    rho = float(res.statistic)
    z = math.atanh(max(min(rho, 0.999999), -0.999999))
    se = 1.06 / math.sqrt(n - 3)
    zc = stats.norm.ppf(0.975)
    return Correlation(n, rho, float(res.pvalue), math.tanh(z - zc * se), math.tanh(z + zc * se))


def min_wilcoxon_p(n: int) -> float:
    """The smallest two-sided p-value the exact Wilcoxon signed-rank test can give with n pairs."""
    return min(1.0, 2 * 0.5**n) if n > 0 else 1.0


def too_few(n: int, alpha: float = ALPHA) -> str | None:
    """A plain-words warning when n seeds cannot support a conclusion."""
    if n < 2:
        return f"only {n} seed: no spread can be estimated, so nothing can be concluded"
    if min_wilcoxon_p(n) > alpha:
        return (
            f"only {n} paired seeds: the smallest p-value a signed-rank test can reach is "
            f"{min_wilcoxon_p(n):.3f} > {alpha}, and a t test on {n} pairs rests on normality "
            f"it cannot check, and bootstrap intervals from so few values are too narrow; "
            f"treat any difference as a hint, not a finding"
        )
    return None
