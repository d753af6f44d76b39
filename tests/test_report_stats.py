"""The report's statistics against scipy directly and hand-worked cases, and the
calibration of the paired tests under the null (no false positives beyond the level)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from scalemix.report import stats as st


def test_describe_matches_numpy_and_hand_worked_iqm():
    x = [1, 2, 3, 4, 5, 6, 7, 8]
    s = st.describe(x)
    assert s.n == 8 and s.mean == 4.5 and s.std == pytest.approx(np.std(x, ddof=1))
    assert s.iqm == pytest.approx((3 + 4 + 5 + 6) / 4)  # the middle 50 %
    assert s.ci_low < 4.5 < s.ci_high
    assert st.describe([1, 2, 3]).iqm is None  # fewer than 4 seeds: no IQM
    assert math.isnan(st.describe([0.7]).std)


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("noise", ["normal", "skewed"])
def test_stated_95_percent_intervals_cover_93_to_97_percent(n, noise):
    """Vectorised: 4000 simulated grids' cells of n seeds. The percentile bootstrap this
    replaced covered about 75 % at n = 3."""
    rng = np.random.default_rng(n)
    sims = 4000
    if noise == "normal":
        x, true = rng.normal(0.8, 0.02, (sims, n)), 0.8
    else:  # right-skewed (gamma, shape 8): accuracy noise with a long tail
        x, true = 0.8 + 0.01 * rng.gamma(8.0, 1.0, (sims, n)), 0.8 + 0.08
    hits = 0
    for row in x:
        lo, hi, method = st.mean_ci(row)
        hits += lo <= true <= hi
    assert method.startswith("t (")
    assert 0.93 <= hits / sims <= 0.97, hits / sims
    # and the old percentile bootstrap at n = 3 shows what was wrong
    if n == 3 and noise == "normal":
        boot = sum(
            lo <= 0.8 <= hi
            for lo, hi in (st.bootstrap_ci(r, seed=i) for i, r in enumerate(x[:300]))
        )
        assert boot / 300 < 0.85


def test_holm_hand_worked():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> max(0.06, 0.04) = 0.06
    assert st.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert st.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    out = st.holm([0.01, float("nan"), 0.02])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_paired_hand_worked_and_against_scipy():
    a, b = [1, 2, 3, 4], [2, 4, 3, 7]  # d = 1, 2, 0, 3
    r = st.paired(a, b)
    sd = math.sqrt(5 / 3)
    assert r.mean_diff == 1.5
    dz = 1.5 / sd
    assert r.effect_gz == pytest.approx(dz * (1 - 3 / (4 * 3 - 1)))  # Hedges' J, df 3
    assert r.t == pytest.approx(1.5 / (sd / 2))
    assert r.p_t == pytest.approx(sps.ttest_rel(b, a).pvalue)
    # the CI is the one the t test inverts: it excludes 0 exactly when p < 0.05
    half = sps.t.ppf(0.975, 3) * sd / 2
    assert (r.ci_low, r.ci_high) == pytest.approx((1.5 - half, 1.5 + half))
    assert (r.ci_low > 0) == (r.p_t < 0.05)
    assert r.p_wilcoxon == pytest.approx(sps.wilcoxon(np.subtract(b, a), method="approx").pvalue)
    # seeds won, with the exact interval of the paired P(b > a on the same seed); rliable's
    # cross-run P(X_b > X_a) needs 5 seeds (below, none is given)
    from statsmodels.stats.proportion import proportion_confint

    assert (r.wins, r.ties) == (3, 1)
    assert (r.win_low, r.win_high) == pytest.approx(proportion_confint(3, 4, method="beta"))
    assert math.isnan(r.poi_cross)


def test_cross_seed_probability_of_improvement_leaves_out_same_seed_pairs():
    """Hand-worked: b beats a on its own seed every time; against another seed's a only
    when that seed is lower. rliable's estimand over independent runs is the cross-seed
    share, 10/20 = 0.5; all pairs (same-seed ones included, correlated by common random
    numbers) would give 15/25."""
    a = np.array([0.10, 0.20, 0.30, 0.40, 0.50])
    b = a + 0.05
    p, lo, hi, cut = st.cross_seed_poi(a, b)
    pairs = [(b[i] > a[j]) for i in range(5) for j in range(5) if i != j]
    assert p == pytest.approx(np.mean(pairs)) and p == pytest.approx(0.5)
    everything = np.mean([(b[i] > a[j]) for i in range(5) for j in range(5)])
    assert everything == pytest.approx(15 / 25)  # what the old all-pairs estimate said
    # no spread between the leave-one-seed-out estimates: never a zero-width interval,
    # the exact interval of floor(5 / 2) = 2 disjoint cross-seed pairs instead
    assert (lo, hi) == pytest.approx(st.clopper_pearson(1, 2))
    # the jackknife over seeds, written out, on irregular data
    a = np.array([0.10, 0.35, 0.20, 0.50, 0.42, 0.33])
    b = a + np.array([0.05, -0.10, 0.30, 0.02, -0.20, 0.01])
    p, lo, hi, cut = st.cross_seed_poi(a, b)
    n = len(a)

    def win(i, j):  # ties count one half (b[2] = 0.5 = a[3])
        return (b[i] > a[j]) + 0.5 * (b[i] == a[j])

    assert p == pytest.approx(np.mean([win(i, j) for i in range(n) for j in range(n) if i != j]))
    loo = []
    for k in range(n):
        keep = [i for i in range(n) if i != k]
        loo.append(np.mean([win(i, j) for i in keep for j in keep if i != j]))
    var = (n - 1) / n * np.sum((np.array(loo) - np.mean(loo)) ** 2)
    half = sps.t.ppf(0.975, n - 1) * math.sqrt(var)
    assert var > 0
    assert (lo, hi) == pytest.approx((max(0, p - half), min(1, p + half)))
    assert cut == ("low" if p - half < 0 else "") + ("high" if p + half > 1 else "")
    assert math.isnan(st.cross_seed_poi(a[:4], b[:4])[0])  # 4 seeds: not estimated
    # every cross pair agrees: the exact interval of floor(n / 2) disjoint pairs
    p, lo, hi, _ = st.cross_seed_poi(np.zeros(6), np.ones(6))
    assert p == 1 and hi == 1 and lo == pytest.approx(0.025 ** (1 / 3))


def test_tost_matches_statsmodels_ttost_paired():
    from statsmodels.stats.weightstats import ttost_paired

    rng = np.random.default_rng(3)
    for n, shift in ((3, 0.0), (5, 0.004), (10, -0.02), (30, 0.001)):
        a = rng.normal(0.8, 0.01, n)
        b = a + shift + rng.normal(0, 0.005, n)
        p, p_low, p_upp = st.tost_paired(b - a, -0.01, 0.01)
        ref = ttost_paired(b, a, -0.01, 0.01)
        assert p == pytest.approx(ref[0]) and p_low == pytest.approx(ref[1][1])
        assert p_upp == pytest.approx(ref[2][1])
        assert st.paired(a, b, sesoi=0.01).p_tost == pytest.approx(ref[0])


def test_clopper_pearson_matches_statsmodels():
    from statsmodels.stats.proportion import proportion_confint

    for k, n in ((0, 3), (3, 3), (2, 3), (7, 12), (0, 1)):
        assert st.clopper_pearson(k, n) == pytest.approx(proportion_confint(k, n, method="beta"))


def test_hedges_gz_interval_is_the_unscaled_noncentral_t_interval():
    d = np.array([0.3, 1.1, 0.7, 1.6, 0.2, 0.9])
    g, lo, hi = st.hedges_gz(d)
    n, dz = len(d), d.mean() / d.std(ddof=1)
    t_obs = dz * math.sqrt(n)
    # at the bounds, the observed t is the 97.5 % / 2.5 % quantile of the noncentral t with
    # noncentrality bound * sqrt(n): the interval of delta_z itself, NOT multiplied by J
    # (the test before asserted the J-scaled interval, which loses coverage)
    assert sps.nct.cdf(t_obs, n - 1, lo * math.sqrt(n)) == pytest.approx(0.975, abs=1e-6)
    assert sps.nct.cdf(t_obs, n - 1, hi * math.sqrt(n)) == pytest.approx(0.025, abs=1e-6)
    j = 1 - 3 / (4 * (n - 1) - 1)
    assert g == pytest.approx(j * dz) and lo < g < hi


@pytest.mark.parametrize("delta", [0.0, 1.0])
def test_delta_z_interval_covers_95_percent_at_3_seeds(delta):
    """Vectorised simulation, 4000 paired samples of 3 seeds: the exact interval covers
    the true delta_z 93-97 % of the time; the old one (the same interval times J = 0.57)
    covered far less at delta_z = 1."""
    rng = np.random.default_rng(11)
    sims, n = 4000, 3
    d = rng.normal(delta, 1.0, (sims, n))
    t_obs = d.mean(axis=1) / d.std(axis=1, ddof=1) * math.sqrt(n)
    lo, hi = st.nct_noncentrality_bounds(t_obs, n - 1)
    lo, hi = lo / math.sqrt(n), hi / math.sqrt(n)
    cover = np.mean((lo <= delta) & (delta <= hi))
    assert 0.93 <= cover <= 0.97, cover
    j = 1 - 3 / (4 * (n - 1) - 1)
    old = np.mean((j * lo <= delta) & (delta <= j * hi))
    if delta:
        assert old < 0.85, old
    # the report's scalar path gives the bounds of the vectorised one
    _, l1, h1 = st.hedges_gz(d[0])
    assert (l1, h1) == pytest.approx((lo[0], hi[0]), abs=1e-6)


def test_interval_methods_are_named():
    assert st.describe([0.8, 0.81, 0.83]).ci_method == "t (df 2)"
    assert st.describe(np.linspace(0.7, 0.9, 25)).ci_method.startswith("BCa")
    assert st.paired([0.8], [0.81]).ci_method == "not testable (n = 1)"


def test_omnibus_friedman_exact_permutation_when_blocked_else_kruskal():
    groups = {1: [0.5, 0.6, 0.55], 2: [0.6, 0.7, 0.62], 3: [0.7, 0.75, 0.71]}
    blocked = {k: dict(enumerate(v)) for k, v in groups.items()}
    r = st.omnibus(groups, blocked)
    assert r.test == "Friedman (permutation, exact)"
    # hand-worked: each seed ranks the levels 1 < 2 < 3; of the 6^3 = 216 within-seed
    # shufflings, only the 6 that give every seed the same order reach chi2 = 6
    assert r.statistic == pytest.approx(6.0) and r.p == pytest.approx(6 / 216)
    r2 = st.omnibus({1: [0.5, 0.6], 2: [0.7]}, None)
    assert r2.test == "Kruskal-Wallis"
    assert r2.p == pytest.approx(sps.kruskal([0.5, 0.6], [0.7]).pvalue)


def test_spearman_and_its_interval():
    rng = np.random.default_rng(1)
    x = rng.normal(size=30)
    y = x + rng.normal(size=30)
    r = st.spearman(x, y)
    ref = sps.spearmanr(x, y)
    assert r.rho == pytest.approx(ref.statistic) and r.p == pytest.approx(ref.pvalue)
    z, se = math.atanh(r.rho), 1.06 / math.sqrt(27)
    assert r.ci_low == pytest.approx(math.tanh(z - 1.959964 * se), rel=1e-5)
    assert r.ci_low < r.rho < r.ci_high
    assert st.spearman([1, 2, 3], [1, 2, 3]) is None  # too few points


def test_too_few_seeds_is_said_in_words():
    assert st.min_wilcoxon_p(3) == 0.25 and st.min_wilcoxon_p(6) == pytest.approx(0.03125)
    assert "hint, not a finding" in st.too_few(3)
    assert st.too_few(6) is None and "nothing can be concluded" in st.too_few(1)


def test_paired_t_with_holm_keeps_the_familywise_error_under_the_null():
    rng = np.random.default_rng(2)
    rejections = 0
    sims = 400
    for _ in range(sims):
        ps = []
        for _ in range(4):  # a family of 4 comparisons, no true effect
            a = rng.normal(0.8, 0.01, 8)
            b = a + rng.normal(0.0, 0.01, 8)
            ps.append(sps.ttest_rel(b, a).pvalue)
        rejections += min(st.holm(ps)) < st.ALPHA
    assert rejections / sims <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / sims)


def test_brown_forsythe_is_levene_on_medians_and_pools_cells_by_level():
    rng = np.random.default_rng(1)
    x = [rng.normal(0, s, 7) for s in (1.0, 2.0, 4.0)]
    f, p, df = st.brown_forsythe({i: [v] for i, v in enumerate(x)})  # one cell per level
    ref = sps.levene(*x, center="median")
    assert f == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert df == "2, 18"
    # two cells per level: deviations from each cell's own median, then one-way ANOVA
    cells = {0: [x[0][:3], x[0][3:]], 1: [x[1][:4], x[1][4:]]}
    z = [np.abs(c - np.median(c)) for lvl in (0, 1) for c in cells[lvl]]
    ref = sps.f_oneway(np.concatenate(z[:2]), np.concatenate(z[2:]))
    f, p, _ = st.brown_forsythe(cells)
    assert f == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)


def test_per_example_mcnemar_hand_worked_and_bootstrap_against_the_normal_interval():
    # one seed, 10 examples: b alone right on 4, a alone right on 0 -> exact binomial
    a = np.array([[1, 1, 0, 0, 0, 0, 1, 0, 1, 1]], dtype=bool)
    b = np.array([[1, 1, 1, 1, 1, 1, 1, 0, 1, 1]], dtype=bool)
    r = st.per_example(a, b)
    assert (r["ex_b_only"], r["ex_a_only"]) == (4, 0)
    assert r["ex_p_mcnemar"] == pytest.approx(2 * 0.5**4)  # two-sided exact: 0.125
    assert r["ex_diff"] == pytest.approx(0.4)
    # many examples: the bootstrap interval of a mean of {-1, 0, 1} is the normal one
    rng = np.random.default_rng(2)
    a = rng.random((3, 4000)) < 0.80
    b = rng.random((3, 4000)) < 0.82
    r = st.per_example(a, b)
    d = (b.astype(float) - a.astype(float)).mean(axis=0)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert r["ex_ci_low"] == pytest.approx(d.mean() - half, abs=0.002)
    assert r["ex_ci_high"] == pytest.approx(d.mean() + half, abs=0.002)


def test_holm_matches_statsmodels_multipletests():
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(4)
    for k in (1, 2, 5, 13):
        p = rng.uniform(0, 0.2, k)
        assert st.holm(p) == pytest.approx(multipletests(p, method="holm")[1].tolist())
    assert np.isnan(st.holm([0.01, math.nan, 0.04])[1])  # nan is not counted
    assert st.holm([0.01, math.nan, 0.04])[::2] == pytest.approx([0.02, 0.04])


def test_mean_ci_marks_an_interval_cut_at_one():
    lo, hi, method, cut = st.mean_ci_cut([0.99, 0.97, 0.80])
    assert hi == 1.0 and cut == "high" and method == "t (df 2)"
    assert st.describe([0.99, 0.97, 0.80]).ci_cut == "high"
    assert st.mean_ci_cut([0.5, 0.6, 0.55])[3] == ""
    assert st.mean_ci_cut([0.01, 0.2, 0.02])[3] == "low"


def test_rm_anova_is_anovarm_with_greenhouse_geisser_beside_it():
    """F, df and p against statsmodels' AnovaRM (two and three within factors); the
    Greenhouse-Geisser epsilon of a main effect against Box's formula from the
    double-centred covariance of its levels; the critical effect of a 1-df term is the
    one at which the paired t test's p is exactly alpha."""
    import itertools

    import pandas as pd
    from statsmodels.stats.anova import AnovaRM

    rng = np.random.default_rng(5)
    for shape in ((4, 3, 2), (5, 2, 2, 3)):
        y = rng.normal(0, 1, shape) + rng.normal(0, 2, (shape[0],) + (1,) * (len(shape) - 1))
        y[..., 0] += 0.8  # an effect of the last axis
        names = [f"f{i}" for i in range(len(shape) - 1)]
        rows = [
            {"seed": idx[0], **{nm: str(i) for nm, i in zip(names, idx[1:])}, "y": y[idx]}
            for idx in itertools.product(*(range(k) for k in shape))
        ]
        ref = AnovaRM(pd.DataFrame(rows), "y", "seed", within=names).fit().anova_table
        ours = {r["term"]: r for r in st.rm_anova(y, names)}
        assert len(ours) == len(ref)
        for term, row in ref.iterrows():
            r = ours[term.replace(":", " x ")]
            assert r["F"] == pytest.approx(row["F Value"])
            assert (r["df1"], r["df2"]) == (row["Num DF"], row["Den DF"])
            assert r["p"] == pytest.approx(row["Pr > F"])
    # Greenhouse-Geisser, one factor of k = 4 levels: Box's epsilon from the covariance
    y = rng.normal(0, 1, (6, 4)) * np.array([0.2, 1.0, 3.0, 0.5])
    r = st.rm_anova(y, ["a"])[0]
    s = np.cov(y, rowvar=False)
    sc = s - s.mean(axis=0) - s.mean(axis=1)[:, None] + s.mean()  # double-centred
    eps = np.trace(sc) ** 2 / (3 * np.sum(sc * sc))
    assert r["eps_gg"] == pytest.approx(eps)
    assert r["p_gg"] == pytest.approx(sps.f.sf(r["F"], eps * 3, eps * 3 * 5))
    assert r["p_lb"] == pytest.approx(sps.f.sf(r["F"], 1, 5))
    # a 1-df term: the per-seed contrast, its t interval and the critical effect
    y = rng.normal(0, 1, (5, 3, 2))
    r = {x["term"]: x for x in st.rm_anova(y, ["g", "s"])}["s"]
    d = (y[:, :, 1] - y[:, :, 0]).mean(axis=1)
    assert r["effect_per_seed"] == pytest.approx(d.tolist())
    assert r["F"] == pytest.approx(sps.ttest_1samp(d, 0).statistic ** 2)
    assert r["F_crit"] == pytest.approx(sps.t.ppf(0.975, 4) ** 2)
    shifted = d - d.mean() + r["critical_effect"]  # the same spread, mean = critical effect
    assert sps.ttest_1samp(shifted, 0).pvalue == pytest.approx(0.05)


def test_seeds_needed_and_detectable_effect_against_statsmodels():
    from statsmodels.stats.power import TTestPower

    power = TTestPower()
    for es in (0.05, 0.19, 0.5, 1.0, 2.0):
        for alpha in (0.05, 0.05 / 9):
            n = st.seeds_needed(es, alpha)
            below = power.power(es, n - 1, alpha) if n > 2 else 0.0
            assert power.power(es, n, alpha) >= 0.8 > below
    for n in (3, 5, 20):
        assert st.detectable_effect(n) == pytest.approx(
            power.solve_power(nobs=n, alpha=0.05, power=0.8), rel=1e-5
        )
    # where scipy's noncentral t gives NaN (df 1, large noncentrality): the integral
    assert st.t_power(8.0, 2) == pytest.approx(0.6253, abs=2e-3)


def test_sd_interval_is_the_chi_square_interval_and_covers():
    lo, hi = st.sd_interval(5.28, 2)
    assert lo == pytest.approx(5.28 * math.sqrt(2 / sps.chi2.ppf(0.975, 2)))
    assert hi == pytest.approx(5.28 * math.sqrt(2 / sps.chi2.ppf(0.025, 2)))
    rng = np.random.default_rng(2)
    sd = rng.normal(0, 1.0, (4000, 3)).std(axis=1, ddof=1)
    f = np.sqrt(2 / sps.chi2.ppf([0.975, 0.025], 2))
    assert 0.93 <= np.mean((sd * f[0] <= 1) & (1 <= sd * f[1])) <= 0.97


def test_variance_components_are_the_two_way_anova_mean_squares():
    import pandas as pd
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    rng = np.random.default_rng(8)
    n, k = 6, 5
    y = rng.normal(0, 2.0, (n, 1)) + rng.normal(0, 0.5, (n, k)) + np.arange(k)
    vc = st.variance_components(y, test_var=0.1)
    df = pd.DataFrame(
        [{"seed": str(i), "cell": str(j), "y": y[i, j]} for i in range(n) for j in range(k)]
    )
    tab = anova_lm(smf.ols("y ~ C(seed) + C(cell)", df).fit())
    assert vc["ms_seed"] == pytest.approx(tab.loc["C(seed)", "mean_sq"])
    assert vc["ms_residual"] == pytest.approx(tab.loc["Residual", "mean_sq"])
    assert vc["seed"] == pytest.approx((vc["ms_seed"] - vc["ms_residual"]) / k)
    assert vc["test_set"] == 0.1 and vc["seed_x_config"] == pytest.approx(vc["residual"] - 0.1)
    # planted components recovered on average
    ys = rng.normal(0, 2.0, (400, n, 1)) + rng.normal(0, 0.5, (400, n, k))
    est = np.array([[st.variance_components(t)[c] for c in ("seed", "residual")] for t in ys])
    assert est.mean(axis=0) == pytest.approx([4.0, 0.25], rel=0.15)


def test_spearman_on_residuals_uses_the_residual_df():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=24), rng.normal(size=24)
    r = st.spearman(x, y, df=14)
    rho = sps.spearmanr(x, y).statistic
    t = rho * math.sqrt(13 / (1 - rho**2))
    assert r.n == 15 and r.rho == pytest.approx(rho)
    assert r.p == pytest.approx(2 * sps.t.sf(abs(t), 13))


def test_greenhouse_geisser_keeps_the_level_where_sphericity_fails():
    """Common random numbers of unequal size across levels (a seed's pattern grows with
    the group count): under the null the uncorrected RM-ANOVA p rejects too often; the
    Greenhouse-Geisser p, which the verdicts use for multi-df terms, does not."""
    rng = np.random.default_rng(12)
    sims, raw, gg = 2000, 0, 0
    scale = np.array([0.002, 0.01, 0.03])[None, :, None]
    for _ in range(sims):
        y = rng.normal(0, 1, (3, 1, 1)) * scale + rng.normal(0, 0.005, (3, 3, 2))
        r = st.rm_anova(y, ["groups", "scalenorm"])[0]
        raw += r["p"] < 0.05
        gg += r["p_gg"] < 0.05
    mc = 2 * math.sqrt(0.05 * 0.95 / sims)
    assert raw / sims > 0.05 + mc, raw / sims
    assert gg / sims <= 0.05 + mc, gg / sims
