"""The statistics of an ablation report (scipy), each a small function tested against
scipy directly and hand-worked cases.

* ``describe``: n, mean, standard deviation (ddof 1), 95 % CI of the mean: Student t
  below 20 seeds (a percentile bootstrap of 3 values is their range, ~75 % coverage),
  BCa bootstrap from 20 on; the method is named in ``ci_method``; IQM where n >= 4.
* ``paired``: differences b - a matched on seed: mean with the paired-t CI (the same
  interval the paired t test inverts, so a figure never contradicts its test), paired t
  (primary), exact Wilcoxon signed-rank where possible (robustness), Hedges' g_z with an
  exact noncentral-t CI, and the probability of improvement P(b > a) over *all pairs of
  runs* (rliable's definition; ties one half) with a Hanley-McNeil interval.
* ``holm``: Holm-Bonferroni step-down adjusted p-values for one family of tests.
* ``omnibus``: Friedman across the levels of an axis when every seed has every level
  (blocked by seed), with an exact (or 20 000-draw Monte Carlo) permutation p-value
  instead of the chi-square approximation; else Kruskal-Wallis.
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


def bootstrap_ci(
    x, level: float = 0.95, seed: int = SEED, method: str = "percentile"
) -> tuple[float, float]:
    """Bootstrap CI of the mean (percentile or BCa); (nan, nan) with fewer than 2 values."""
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
        method=method,
        random_state=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def iqm(x) -> float:
    """Interquartile mean: the mean of the middle 50 % (scipy's 25 % trimmed mean)."""
    return float(stats.trim_mean(np.asarray(x, dtype=float), 0.25))


BCA_FROM = 20  # seeds from which a BCa bootstrap replaces the t interval


def mean_ci(x, level: float = 0.95) -> tuple[float, float, str]:
    """CI of the mean, and the name of the method that gave it. For a proportion (every
    value in [0, 1], e.g. accuracy) the interval is cut to [0, 1]: the mean cannot lie
    outside, so the cut keeps the coverage and drops only impossible values."""
    x = np.asarray(x, dtype=float)
    n = len(x)
    if n < 2:
        return math.nan, math.nan, "none (n < 2)"
    if np.all(x == x[0]):
        return float(x[0]), float(x[0]), "degenerate (no spread)"
    if n < BCA_FROM:
        half = stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
        lo, hi = float(x.mean() - half), float(x.mean() + half)
        if x.min() >= 0 and x.max() <= 1:
            lo, hi = max(lo, 0.0), min(hi, 1.0)
        return lo, hi, f"t (df {n - 1})"
    lo, hi = bootstrap_ci(x, level, method="BCa")
    return lo, hi, f"BCa bootstrap ({BOOT} resamples)"


@dataclass
class Summary:
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    iqm: float | None
    ci_method: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def describe(x) -> Summary:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    lo, hi, method = mean_ci(x)
    return Summary(
        n=n,
        mean=float(x.mean()) if n else math.nan,
        std=float(x.std(ddof=1)) if n > 1 else math.nan,
        ci_low=lo,
        ci_high=hi,
        iqm=iqm(x) if n >= 4 else None,
        ci_method=method,
    )


def hedges_gz(d) -> tuple[float, float, float]:
    """Hedges' g_z (d_z with the small-sample correction J) and its exact 95 % CI, from
    inverting the noncentral t distribution of the paired t statistic."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    if n < 3 or d.std(ddof=1) == 0:
        return math.nan, math.nan, math.nan
    df = n - 1
    j = 1 - 3 / (4 * df - 1)
    dz = d.mean() / d.std(ddof=1)
    t_obs = dz * math.sqrt(n)

    def cdf(nc: float) -> float:  # P(T <= t_obs | nc); where scipy gives NaN, the limit
        v = float(stats.nct.cdf(t_obs, df, nc))
        return v if math.isfinite(v) else (1.0 if nc < t_obs else 0.0)

    def solve(target: float) -> float:
        from scipy.optimize import brentq

        width = 5.0
        while cdf(t_obs - width) < target or cdf(t_obs + width) > target:
            width *= 2
        return brentq(lambda nc: cdf(nc) - target, t_obs - width, t_obs + width) / math.sqrt(n)

    return float(j * dz), float(j * solve(0.975)), float(j * solve(0.025))


def prob_improvement(a, b) -> tuple[float, float, float]:
    """P(X_b > X_a) over all pairs of runs (rliable; ties one half), with a 95 % interval
    from the Hanley & McNeil (1982) standard error, clipped to [0, 1]."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    na, nb = len(a), len(b)
    if not na or not nb:
        return math.nan, math.nan, math.nan
    cmp = (b[:, None] > a[None, :]) + 0.5 * (b[:, None] == a[None, :])
    p = float(cmp.mean())
    # at 0 or 1 the Hanley-McNeil variance vanishes; take it half a pair inside instead
    pv = min(max(p, 0.5 / (na * nb)), 1 - 0.5 / (na * nb))
    q1, q2 = pv / (2 - pv), 2 * pv * pv / (1 + pv)
    var = (pv * (1 - pv) + (nb - 1) * (q1 - pv * pv) + (na - 1) * (q2 - pv * pv)) / (na * nb)
    half = 1.96 * math.sqrt(max(var, 0.0))
    return p, max(0.0, p - half), min(1.0, p + half)


@dataclass
class Paired:
    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    t: float
    p_t: float
    p_wilcoxon: float
    effect_gz: float
    gz_low: float
    gz_high: float
    prob_improvement: float
    poi_low: float
    poi_high: float
    wins: int  # seeds where b > a
    ci_method: str = "paired t"
    wilcoxon_method: str = ""
    p_holm: float = math.nan

    def as_dict(self) -> dict:
        return asdict(self)


def paired(a, b) -> Paired:
    """Compare b against a on matched pairs (same seed)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = b - a
    n = len(d)
    # the interval the paired t test inverts, at every n: figure and test always agree
    if n >= 2 and d.std(ddof=1) > 0:
        half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
        lo, hi, method = d.mean() - half, d.mean() + half, f"paired t (df {n - 1})"
    elif n >= 2:
        lo = hi = float(d.mean())
        method = "degenerate (no spread)"
    else:
        lo = hi = math.nan
        method = f"not testable (n = {n})"
    if n >= 2 and np.std(d, ddof=1) > 0:
        t_res = stats.ttest_rel(b, a)
        t, p_t = float(t_res.statistic), float(t_res.pvalue)
    else:
        t, p_t = math.nan, (1.0 if n >= 2 and np.all(d == 0) else math.nan)
    p_w, w_method = math.nan, "not testable"
    if n >= 1 and np.any(d != 0):
        exact = n <= 50 and np.all(d != 0) and len(np.unique(np.abs(d))) == n
        w_method = "exact" if exact else "normal approximation (ties or zeros)"
        p_w = float(stats.wilcoxon(d, method="exact" if exact else "approx").pvalue)
    gz, gz_lo, gz_hi = hedges_gz(d)
    poi, poi_lo, poi_hi = prob_improvement(a, b)
    return Paired(
        n,
        float(d.mean()) if n else math.nan,
        float(lo),
        float(hi),
        t,
        p_t,
        p_w,
        gz,
        gz_lo,
        gz_hi,
        poi,
        poi_lo,
        poi_hi,
        int((d > 0).sum()),
        method,
        w_method,
    )


def holm(pvalues) -> list[float]:
    """Holm step-down adjusted p-values; nan stays nan and is not counted in the family.
    (statsmodels' ``multipletests(method="holm")`` gives the same numbers, as the tests
    check, but takes ~50 ms a call: too slow for the report's null simulations.)"""
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


def brown_forsythe(cells_by_level: dict) -> tuple[float, float, str] | None:
    """Do the levels of an axis differ in spread across seeds? Brown & Forsythe (1974):
    a one-way ANOVA on each run's absolute deviation from its own cell's median, grouped
    by level (``cells_by_level``: level -> list of per-cell arrays). With one cell per
    level this is ``scipy.stats.levene(center="median")``. Returns (F, p, df) or None."""
    z = {
        lvl: np.concatenate([np.abs(c - np.median(c)) for c in cells if len(c) >= 2])
        for lvl, cells in cells_by_level.items()
        if any(len(c) >= 2 for c in cells)
    }
    z = {k: v for k, v in z.items() if len(v) >= 2}
    if len(z) < 2 or all(np.all(v == v[0]) for v in z.values()):
        return None
    res = stats.f_oneway(*z.values())
    n = sum(len(v) for v in z.values())
    return float(res.statistic), float(res.pvalue), f"{len(z) - 1}, {n - len(z)}"


def per_example(correct_a: list, correct_b: list, n_boot: int = BOOT) -> dict:
    """Compare two configurations example by example on one test set: each element of
    ``correct_a`` / ``correct_b`` is one seed's boolean vector (same seed, same test set).
    McNemar's exact test (statsmodels) on the discordant examples pooled over seeds, and a
    paired bootstrap over test examples (the same examples resampled for every seed) of
    the mean accuracy difference. Both treat the trained models as fixed: they say whether
    these models differ on the test distribution, not whether the configuration would
    win again with new seeds (that is the paired t test over seeds)."""
    from statsmodels.stats.contingency_tables import mcnemar

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    n_ex = a.shape[1]
    b_only = int((b & ~a).sum())  # examples b gets right and a wrong (summed over seeds)
    a_only = int((a & ~b).sum())
    both_right, both_wrong = int((a & b).sum()), int((~a & ~b).sum())
    p = float(mcnemar([[both_right, a_only], [b_only, both_wrong]], exact=True).pvalue)
    # per-example difference averaged over seeds takes at most 2S + 1 values: resample the
    # examples through the counts of each value (an exact multinomial bootstrap)
    d = (b.astype(float) - a.astype(float)).mean(axis=0)
    values, counts = np.unique(d, return_counts=True)
    rng = np.random.default_rng(SEED)
    draws = rng.multinomial(n_ex, counts / n_ex, size=n_boot) @ values / n_ex
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {
        "ex_seeds": a.shape[0],
        "ex_examples": n_ex,
        "ex_diff": float(d.mean()),
        "ex_ci_low": float(lo),
        "ex_ci_high": float(hi),
        "ex_b_only": b_only,
        "ex_a_only": a_only,
        "ex_p_mcnemar": p,
    }


@dataclass
class Omnibus:
    test: str
    statistic: float
    p: float
    levels: int
    blocks: int


def _friedman_statistic(*samples, axis=-1):
    """Friedman's chi-square from within-block ranks, vectorised over permutations
    (the tie correction is left out: the permutation p-value needs no approximation)."""
    x = np.stack(samples, axis=0)  # (k levels, ..., b blocks)
    k, b = x.shape[0], x.shape[-1]
    ranks = stats.rankdata(x, axis=0)
    r_sum = ranks.sum(axis=-1)  # (k, ...)
    return 12.0 / (b * k * (k + 1)) * (r_sum**2).sum(axis=0) - 3.0 * b * (k + 1)


def friedman_permutation(cols: list, n_resamples: int = 20_000):
    """Friedman statistic with a permutation p-value: the levels' values are shuffled
    within each seed (block); exact when the permutations are few, else Monte Carlo."""
    data = [np.asarray(c, dtype=float) for c in cols]
    k, b = len(data), len(data[0])
    exact = math.factorial(k) ** b <= n_resamples
    res = stats.permutation_test(
        data,
        _friedman_statistic,
        permutation_type="samples",
        vectorized=True,
        n_resamples=np.inf if exact else n_resamples,
        alternative="greater",
        random_state=np.random.default_rng(SEED),
    )
    chi2 = float(stats.friedmanchisquare(*data).statistic) if k >= 3 else float(res.statistic)
    return chi2, float(res.pvalue), ("exact" if exact else "Monte Carlo")


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
                stat, p, how = friedman_permutation(cols)
                return Omnibus(f"Friedman (permutation, {how})", stat, p, len(levels), len(seeds))
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
            f"it cannot check; treat any difference as a hint, not a finding"
        )
    return None
