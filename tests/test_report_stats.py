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


def test_bootstrap_ci_covers_the_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    hits = 0
    for i in range(200):
        x = rng.normal(0.0, 1.0, 20)
        lo, hi = st.bootstrap_ci(x, seed=i)
        hits += lo <= 0.0 <= hi
    assert 0.86 <= hits / 200 <= 0.99  # percentile bootstrap, n = 20: slightly under 95 %


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
    assert r.effect_dz == pytest.approx(1.5 / sd)
    assert r.t == pytest.approx(1.5 / (sd / 2))
    assert r.p_t == pytest.approx(sps.ttest_rel(b, a).pvalue)
    assert r.p_wilcoxon == pytest.approx(sps.wilcoxon(np.subtract(b, a)).pvalue)
    assert r.prob_improvement == pytest.approx((3 + 0.5) / 4)


def test_omnibus_friedman_when_blocked_else_kruskal():
    groups = {1: [0.5, 0.6, 0.55], 2: [0.6, 0.7, 0.62], 3: [0.7, 0.75, 0.71]}
    blocked = {k: dict(enumerate(v)) for k, v in groups.items()}
    r = st.omnibus(groups, blocked)
    assert r.test == "Friedman"
    assert r.p == pytest.approx(sps.friedmanchisquare(*groups.values()).pvalue)
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
