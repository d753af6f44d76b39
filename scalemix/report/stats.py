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


def mean_ci_cut(x, level: float = 0.95) -> tuple[float, float, str, str]:
    """CI of the mean, the name of the method that gave it, and where it was cut. For a
    proportion (every value in [0, 1], e.g. accuracy) the interval is cut to [0, 1]: the
    mean cannot lie outside, so the cut keeps the coverage and drops only impossible
    values; the last element says so ("", "low", "high" or "both"), for the tables and
    figures to mark."""
    x = np.asarray(x, dtype=float)
    n = len(x)
    if n < 2:
        return math.nan, math.nan, "none (n < 2)", ""
    if np.all(x == x[0]):
        return float(x[0]), float(x[0]), "degenerate (no spread)", ""
    if n < BCA_FROM:
        half = stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
        lo, hi = float(x.mean() - half), float(x.mean() + half)
        cut = ""
        if x.min() >= 0 and x.max() <= 1:
            cut = ("low" if lo < 0 else "") + ("high" if hi > 1 else "")
            cut = "both" if cut == "lowhigh" else cut
            lo, hi = max(lo, 0.0), min(hi, 1.0)
        return lo, hi, f"t (df {n - 1})", cut
    lo, hi = bootstrap_ci(x, level, method="BCa")
    return lo, hi, f"BCa bootstrap ({BOOT} resamples)", ""


def mean_ci(x, level: float = 0.95) -> tuple[float, float, str]:
    """``mean_ci_cut`` without the cut marker."""
    return mean_ci_cut(x, level)[:3]


@dataclass
class Summary:
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    iqm: float | None
    ci_method: str = ""
    ci_cut: str = ""  # "", "low", "high", "both": where the interval was cut to [0, 1]

    def as_dict(self) -> dict:
        return asdict(self)


def describe(x) -> Summary:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    lo, hi, method, cut = mean_ci_cut(x)
    return Summary(
        n=n,
        mean=float(x.mean()) if n else math.nan,
        std=float(x.std(ddof=1)) if n > 1 else math.nan,
        ci_low=lo,
        ci_high=hi,
        iqm=iqm(x) if n >= 4 else None,
        ci_method=method,
        ci_cut=cut,
    )


def nct_noncentrality_bounds(t_obs, df, level: float = 0.95):
    """The noncentrality parameters at which ``t_obs`` is the upper / lower (1 - level) / 2
    quantile of the noncentral t with ``df`` degrees of freedom: the exact confidence
    interval of the noncentrality (Steiger & Fouladi 1997). Vectorised over ``t_obs``
    (bisection; the cdf falls monotonically in the noncentrality)."""
    t_obs = np.atleast_1d(np.asarray(t_obs, dtype=float))
    df = np.broadcast_to(np.asarray(df, dtype=float), t_obs.shape)

    def cdf(nc):  # P(T <= t_obs | nc); where scipy gives NaN, the limit
        v = stats.nct.cdf(t_obs, df, nc)
        return np.where(np.isfinite(v), v, np.where(nc < t_obs, 1.0, 0.0))

    out = []
    for target in (0.5 + level / 2, 0.5 - level / 2):
        width = 5.0 + np.abs(t_obs)
        lo, hi = t_obs - width, t_obs + width
        for _ in range(60):  # widen until the root is bracketed
            need_lo, need_hi = cdf(lo) < target, cdf(hi) > target
            if not (need_lo.any() or need_hi.any()):
                break
            lo = np.where(need_lo, lo - 2 * width, lo)
            hi = np.where(need_hi, hi + 2 * width, hi)
            width = 2 * width
        if t_obs.size == 1:  # one interval (the report): Brent's method, a few evaluations
            from scipy.optimize import brentq

            root = brentq(
                lambda nc, t=target: float(cdf(np.array([nc]))[0]) - t, lo[0], hi[0], xtol=1e-10
            )
            out.append(np.array([root]))
            continue
        for _ in range(64):
            mid = (lo + hi) / 2
            above = cdf(mid) > target  # the root lies above mid
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        out.append((lo + hi) / 2)
    return out[0], out[1]


def hedges_gz(d, level: float = 0.95) -> tuple[float, float, float]:
    """Hedges' g_z (d_z = mean / SD of the paired differences, times the small-sample
    correction J) and the exact CI of the standardised effect delta_z = mu / sigma:
    the noncentral-t interval of the paired t statistic divided by sqrt(n), *not*
    multiplied by J (J corrects the point estimate's bias; scaling the interval by it
    shrinks it and loses coverage: 78 % at n = 3, delta_z = 1)."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    if n < 3 or d.std(ddof=1) == 0:
        return math.nan, math.nan, math.nan
    df = n - 1
    j = 1 - 3 / (4 * df - 1)
    dz = d.mean() / d.std(ddof=1)
    lo, hi = nct_noncentrality_bounds(dz * math.sqrt(n), df, level)
    return float(j * dz), float(lo[0] / math.sqrt(n)), float(hi[0] / math.sqrt(n))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a binomial proportion: k successes in n."""
    if n <= 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


RLIABLE_FROM = 5  # seeds from which the cross-seed P(X_b > X_a) is estimated


def cross_seed_poi(a, b, level: float = 0.95) -> tuple[float, float, float, str]:
    """rliable's probability of improvement P(X_b > X_a) for two *independent* runs (ties
    one half), estimated from the cross-seed pairs only: runs of one seed share random
    streams, so a same-seed pair is not a draw of two independent runs. With paired
    seeds the pairs (i, j), i != j, form a U-statistic whose terms share seeds: its 95 %
    interval is a jackknife over seeds (t, df n - 1), cut to [0, 1] (the cut is named in
    the last element: "", "low", "high" or "both"). Where every pair agrees the
    jackknife has no spread: then the exact interval of floor(n / 2) disjoint pairs.
    Needs RLIABLE_FROM seeds; below, (nan, nan, nan, "")."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = len(a)
    if n < RLIABLE_FROM or len(b) != n:
        return math.nan, math.nan, math.nan, ""
    w = (b[:, None] > a[None, :]) + 0.5 * (b[:, None] == a[None, :])
    off = ~np.eye(n, dtype=bool)
    p = float(w[off].mean())
    total = w[off].sum()
    # leave seed k out: drop its row and column (its same-seed term was never counted)
    loo = (total - w.sum(axis=1) - w.sum(axis=0) + 2 * np.diag(w)) / ((n - 1) * (n - 2))
    var = (n - 1) / n * float(((loo - loo.mean()) ** 2).sum())
    if var > 0:
        half = stats.t.ppf(0.5 + level / 2, n - 1) * math.sqrt(var)
        lo, hi = p - half, p + half
    else:
        k = n // 2
        lo, hi = clopper_pearson(int(round(p * k)), k, level)
    cut = ("low" if lo < 0 else "") + ("high" if hi > 1 else "")
    return p, max(0.0, lo), min(1.0, hi), ("both" if cut == "lowhigh" else cut)


def tost_paired(d, low: float, upp: float) -> tuple[float, float, float]:
    """Two one-sided t tests (Schuirmann 1987) that the mean of the paired differences
    ``d`` lies inside (low, upp): (p, p of H0 mean <= low, p of H0 mean >= upp); p is the
    larger. The same numbers as statsmodels' ``ttost_paired(b, a, low, upp)``."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    if n < 2:
        return math.nan, math.nan, math.nan
    sd = d.std(ddof=1)
    if sd == 0:
        inside = low < d.mean() < upp
        return (0.0, 0.0, 0.0) if inside else (1.0, 1.0, 1.0)
    se = sd / math.sqrt(n)
    p_low = float(stats.t.sf((d.mean() - low) / se, n - 1))
    p_upp = float(stats.t.cdf((d.mean() - upp) / se, n - 1))
    return max(p_low, p_upp), p_low, p_upp


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
    gz_low: float  # exact interval of delta_z (noncentral t), not scaled by J
    gz_high: float
    wins: int  # seeds where b > a (the same seed: common random numbers)
    ties: int  # seeds where b == a
    win_low: float  # Clopper-Pearson interval of the paired P(b > a on the same seed)
    win_high: float
    poi_cross: float  # rliable's P(X_b > X_a) from cross-seed pairs (RLIABLE_FROM seeds)
    poi_cross_low: float
    poi_cross_high: float
    poi_cross_cut: str = ""
    p_tost: float = math.nan  # equivalence within +-sesoi (two one-sided t tests)
    ci_method: str = "paired t"
    wilcoxon_method: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def paired(a, b, sesoi: float | None = None) -> Paired:
    """Compare b against a on matched pairs (same seed). ``sesoi``: the smallest effect
    of interest, in the units of a and b, for the equivalence test."""
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
    wins, ties = int((d > 0).sum()), int((d == 0).sum())
    w_lo, w_hi = clopper_pearson(wins, n)
    poi, poi_lo, poi_hi, poi_cut = cross_seed_poi(a, b)
    p_tost = tost_paired(d, -sesoi, sesoi)[0] if sesoi else math.nan
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
        wins,
        ties,
        w_lo,
        w_hi,
        poi,
        poi_lo,
        poi_hi,
        poi_cut,
        p_tost,
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


def spearman(x, y, df: int | None = None) -> Correlation | None:
    """Spearman's rho with a 95 % Fisher-z CI (SE 1.06 / sqrt(n - 3)). ``df``: the
    residual degrees of freedom when x and y are residuals of a fitted model (each fitted
    parameter costs one): the p-value is then the t test of rho on df - 1 degrees of
    freedom, the CI uses df + 1 effective points, and ``n`` reports that effective n."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x) if df is None else df + 1
    if n < 4 or len(x) < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    res = stats.spearmanr(x, y)
    rho = float(res.statistic)
    if df is None:
        p = float(res.pvalue)
    else:
        r = max(min(rho, 0.999999), -0.999999)
        tt = r * math.sqrt((n - 2) / (1 - r * r))
        p = float(2 * stats.t.sf(abs(tt), n - 2))
    z = math.atanh(max(min(rho, 0.999999), -0.999999))
    se = 1.06 / math.sqrt(n - 3)
    zc = stats.norm.ppf(0.975)
    return Correlation(n, rho, p, math.tanh(z - zc * se), math.tanh(z + zc * se))


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


# ---------------------------------------------------------------- the grid model


def helmert(k: int) -> np.ndarray:
    """(k - 1, k) orthonormal contrasts, each orthogonal to the constant."""
    out = np.zeros((k - 1, k))
    for j in range(1, k):
        out[j - 1, :j] = 1.0
        out[j - 1, j] = -j
        out[j - 1] /= math.sqrt(j * (j + 1))
    return out


def _term_matrix(levels: tuple, term: tuple) -> np.ndarray:
    """Orthonormal contrasts of one term over the flattened cells (C order)."""
    mat = np.ones((1, 1))
    for i, k in enumerate(levels):
        part = helmert(k) if i in term else np.ones((1, k)) / math.sqrt(k)
        mat = np.kron(mat, part)
    return mat


def _term_signs(levels: tuple, term: tuple) -> np.ndarray | None:
    """For a 1-df term (every axis in it has two levels): the +-1 weights whose weighted
    cell mean, divided by K / 2^|term|, is the effect in the metric's units: the
    difference second minus first level for a main effect, the difference of those
    differences for a two-way interaction, and so on."""
    if any(levels[i] != 2 for i in term):
        return None
    w = np.ones(1)
    for i, k in enumerate(levels):
        w = np.kron(w, np.array([-1.0, 1.0]) if i in term else np.ones(k))
    return w / (w.size / 2 ** len(term))


def rm_anova(y: np.ndarray, names: list[str], alpha: float = ALPHA) -> list[dict]:
    """Repeated-measures ANOVA of a complete block ``y`` (seeds, levels of axis 1, ...):
    every main effect and interaction, each tested against its own term x seed
    interaction (the error structure of statsmodels' AnovaRM, whose F and p it
    reproduces), with the Greenhouse-Geisser epsilon and p (Greenhouse & Geisser 1959:
    the df scaled by epsilon) and the lower-bound p (df 1, n - 1) for terms of more than
    one df, and the critical F at ``alpha``. For 1-df terms also each seed's contrast
    (``effect_per_seed``, in the metric's units), from which the effect, its t interval
    and the critical effect (the smallest that ``alpha`` would call significant)."""
    import itertools

    n = y.shape[0]
    levels = tuple(y.shape[1:])
    flat = y.reshape(n, -1)
    rows = []
    for r in range(1, len(levels) + 1):
        for term in itertools.combinations(range(len(levels)), r):
            z = flat @ _term_matrix(levels, term).T  # (n, df1)
            df1, df2 = z.shape[1], z.shape[1] * (n - 1)
            zbar = z.mean(axis=0)
            s = np.atleast_2d(np.cov(z, rowvar=False, ddof=1)) if n > 1 else np.zeros((1, 1))
            ss_t, ss_e = n * float(zbar @ zbar), (n - 1) * float(np.trace(s))
            if n < 2:
                f = math.nan
            elif ss_e > 0:
                f = (ss_t / df1) / (ss_e / df2)
            else:
                f = math.inf if ss_t > 0 else math.nan
            p = (
                float(stats.f.sf(f, df1, df2))
                if math.isfinite(f)
                else (0.0 if f == math.inf else math.nan)
            )
            tr2 = float(np.trace(s @ s))
            eps = float(np.trace(s) ** 2 / (df1 * tr2)) if df1 > 1 and tr2 > 0 else 1.0
            # with fewer seeds than the term's df the contrasts' covariance is rank-deficient
            # (rank <= n - 1): Greenhouse-Geisser's epsilon cannot be estimated (it is capped
            # at (n - 1) / df1), so only the lower bound is sphericity-free
            gg_ok = df1 > 1 and n - 1 >= df1
            row = {
                "term": " x ".join(names[i] for i in term),
                "axes": [names[i] for i in term],
                "F": f,
                "df1": df1,
                "df2": df2,
                "p": p,
                "eps_gg": eps if df1 > 1 else math.nan,
                "p_gg": float(stats.f.sf(f, eps * df1, eps * df2))
                if df1 > 1 and math.isfinite(f)
                else math.nan,
                "gg_estimable": bool(gg_ok),
                "p_lb": float(stats.f.sf(f, 1, n - 1))
                if df1 > 1 and math.isfinite(f)
                else math.nan,
                "F_crit": float(stats.f.ppf(1 - alpha, df1, df2)) if n > 1 else math.nan,
                "n_seeds": n,
            }
            w = _term_signs(levels, term)
            if w is not None:
                d = flat @ w
                row["effect_per_seed"] = d.tolist()
                row["effect"] = float(d.mean())
                if n >= 2:
                    se = float(d.std(ddof=1)) / math.sqrt(n)
                    tc = float(stats.t.ppf(1 - alpha / 2, n - 1))
                    row.update(
                        effect_sd=float(d.std(ddof=1)),
                        effect_low=row["effect"] - tc * se,
                        effect_high=row["effect"] + tc * se,
                        critical_effect=tc * se,
                    )
            rows.append(row)
    return rows


# ---------------------------------------------------------------- what a grid can resolve


def t_power(effect_size: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided one-sample (paired) t test at standardised effect
    ``effect_size`` with n pairs (statsmodels' ``TTestPower().power``)."""
    if n < 2:
        return math.nan
    df = n - 1
    tc = stats.t.ppf(1 - alpha / 2, df)
    nc = effect_size * math.sqrt(n)
    p = float(stats.nct.sf(tc, df, nc) + stats.nct.cdf(-tc, df, nc))
    if math.isfinite(p):
        return p
    # where scipy's nct fails (large nc at df 1 or 2): T = (Z + nc) / sqrt(V / df) with
    # V ~ chi2(df), averaged over 4000 midpoint quantiles of V (error ~ 1e-4)
    v = _CHI2_MID.setdefault(df, stats.chi2.ppf((np.arange(4000) + 0.5) / 4000, df))
    c = tc * np.sqrt(v / df)
    return float(np.mean(stats.norm.sf(c - nc) + stats.norm.cdf(-c - nc)))


_CHI2_MID: dict = {}


def seeds_needed(effect_size: float, alpha: float = ALPHA, power: float = 0.8) -> int | None:
    """The smallest number of seeds (pairs) at which the two-sided paired t test reaches
    ``power`` for the standardised effect (effect / SD of the per-seed contrast);
    statsmodels' ``TTestPower().solve_power`` rounded up. None when it would pass 10^7.
    Starts from the normal approximation with Guenther's (1981) correction and steps to
    the exact noncentral-t answer."""
    es = abs(effect_size)
    if not es > 0:
        return None
    za, zb = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    n = max(2, math.ceil(((za + zb) / es) ** 2 + za * za / 2))
    if n > 10**7:
        return None
    while t_power(es, n, alpha) < power:
        n += 1 if n < 100 else max(1, n // 100)
    while n > 2 and t_power(es, n - 1, alpha) >= power:
        n -= 1
    return n


def detectable_effect(n: int, alpha: float = ALPHA, power: float = 0.8) -> float:
    """The standardised effect the paired t test detects with ``power`` at n seeds."""
    from scipy.optimize import brentq

    if n < 2:
        return math.nan
    hi = 1.0
    while t_power(hi, n, alpha) < power:
        hi *= 2
        if hi > 1e6:
            return math.inf
    return float(brentq(lambda es: t_power(es, n, alpha) - power, 0.0, hi, xtol=1e-8))


def sd_interval(sd: float, df: int, level: float = 0.95) -> tuple[float, float]:
    """The chi-square confidence interval of a normal SD estimated with df degrees of
    freedom: sd * sqrt(df / chi2_{1-a/2}) to sd * sqrt(df / chi2_{a/2})."""
    if df < 1 or not math.isfinite(sd):
        return math.nan, math.nan
    a = (1 - level) / 2
    return (
        float(sd * math.sqrt(df / stats.chi2.ppf(1 - a, df))),
        float(sd * math.sqrt(df / stats.chi2.ppf(a, df))),
    )


def variance_components(y: np.ndarray, test_var: float | None = None) -> dict:
    """Variance components of a complete seeds x configurations table ``y`` (n, K), by
    the two-way ANOVA without replication (expected mean squares, negative estimates set
    to 0): ``seed`` (what a seed shifts in every configuration: common random numbers,
    cancelled by paired comparisons), ``residual`` (seed x configuration, what the paired
    comparisons and the grid model's error terms see) and, given ``test_var`` (a run's
    binomial test-set variance p (1 - p) / n_test), the part of the residual that is at
    most test-set noise, and the rest (``seed_x_config``)."""
    n, k = y.shape
    if n < 2 or k < 2:
        return {}
    grand = y.mean()
    seed_m, cell_m = y.mean(axis=1), y.mean(axis=0)
    ms_seed = k * float(((seed_m - grand) ** 2).sum()) / (n - 1)
    resid = y - seed_m[:, None] - cell_m[None, :] + grand
    ms_res = float((resid**2).sum()) / ((n - 1) * (k - 1))
    out = {
        "seeds": n,
        "configurations": k,
        "ms_seed": ms_seed,
        "ms_residual": ms_res,
        "df_residual": (n - 1) * (k - 1),
        "seed": max(0.0, (ms_seed - ms_res) / k),
        "residual": ms_res,
    }
    if test_var is not None and math.isfinite(test_var):
        out["test_set"] = min(test_var, ms_res)
        out["seed_x_config"] = max(0.0, ms_res - test_var)
    return out
