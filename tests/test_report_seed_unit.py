"""The seed is the unit (issue 22): the example grid's 24 runs recomputed with scipy and
statsmodels, planted common-random-number grids, the removed-run stability of the grid
model, equivalence, power at the plan's own alpha, and the pages' wording."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from scalemix.report import stats as st
from scalemix.report.analysis import analyse, marginal_means

from .report_helpers import QUICK_AXES, grid_runs, quick_plan, quick_runs
from .report_helpers import QUICK_N_TEST as N_TEST


def _anovarm(runs: pd.DataFrame, metric: str):
    from statsmodels.stats.anova import AnovaRM

    d = runs.assign(groups=runs.groups.astype(str), scalenorm=runs.scalenorm.astype(str))
    return AnovaRM(d, metric, "seed", within=["groups", "scalenorm"]).fit().anova_table


def test_the_example_grid_over_seeds_against_statsmodels():
    """Issue 22's numbers: the marginal intervals over seed means (62-101 cut at 100, and
    80-93), AnovaRM's terms with Greenhouse-Geisser beside them (interaction 0.097 ->
    0.20), F(1, 2) needs 18.5, the primary family of 9, and the EMA metric's interaction
    (p = 0.027)."""
    runs = quick_runs()
    an = analyse(runs, quick_plan(sesoi=1.0))
    m = an.marginals.set_index(["axis", "level"])
    off, on = m.loc[("scalenorm", False)], m.loc[("scalenorm", True)]
    y = runs.pivot_table(index="seed", columns=["scalenorm", "groups"], values="test_acc")
    for row, sn in ((off, False), (on, True)):
        seed_means = y[sn].mean(axis=1).values
        half = sps.t.ppf(0.975, 2) * seed_means.std(ddof=1) / math.sqrt(3)
        assert row.seeds == 3 and row["mean"] == pytest.approx(seed_means.mean())
        assert row.ci_low == pytest.approx(seed_means.mean() - half)
        assert row.ci_high == pytest.approx(min(1.0, seed_means.mean() + half))
    assert off.ci_cut == "high" and 100 * off.ci_low == pytest.approx(61.95, abs=0.01)
    assert (100 * on.ci_low, 100 * on.ci_high) == pytest.approx((79.57, 92.76), abs=0.01)
    ref = _anovarm(runs, "test_acc")
    gm = an.grid_model.set_index("term")
    for term, row in ref.iterrows():
        assert gm.loc[term.replace(":", " x "), "p"] == pytest.approx(row["Pr > F"])
    inter = gm.loc["groups x scalenorm"]
    assert inter.p == pytest.approx(0.0967, abs=1e-4)
    assert inter.p_gg == pytest.approx(0.204, abs=1e-3)
    # 3 seeds for 3 df: the contrasts' covariance has rank 2, epsilon cannot be estimated,
    # so the verdict takes the lower bound (p with 1 and n - 1 df)
    assert not inter.gg_estimable and inter.p_verdict == inter.p_lb
    assert inter.p_lb == pytest.approx(sps.f.sf(inter.F, 1, 2))
    assert gm.loc["scalenorm", "F_crit"] == pytest.approx(18.51, abs=0.01)
    assert (gm.adj[gm.primary] == "Holm over 9 primary tests").all()
    assert (an.comparisons.adj == "Holm over 9 primary tests").all()
    assert set(gm.verdict) == {"inconclusive"}
    ema = analyse(runs, quick_plan(metric="ema"))
    assert ema.metric == "test_acc_ema"
    ref = _anovarm(runs, "test_acc_ema")
    assert ema.grid_model.set_index("term").loc["groups x scalenorm", "p"] == pytest.approx(
        ref.loc["groups:scalenorm", "Pr > F"]
    )
    assert ref.loc["groups:scalenorm", "Pr > F"] == pytest.approx(0.027, abs=1e-3)
    assert any("EMA weights" in f for f in ema.findings)


def test_power_is_at_the_plans_own_alpha_with_the_range_of_the_sd():
    """The primary 1-df term's per-seed contrast (the main effect's SD, not one stratum's),
    at alpha / 9 (Holm's first step), with the seeds needed at both ends of the SD's
    chi-square interval."""
    runs = quick_runs()
    an = analyse(runs, quick_plan(sesoi=1.0))
    pw = an.power
    y = runs.pivot_table(index="seed", columns=["scalenorm", "groups"], values="test_acc")
    contrast = (y[True] - y[False]).mean(axis=1).values
    sd = contrast.std(ddof=1)
    assert pw["term"] == "scalenorm" and pw["paired_sd_points"] == pytest.approx(100 * sd)
    assert pw["alpha"] == pytest.approx(0.05 / 9) and pw["family_size"] == 9
    lo, hi = st.sd_interval(sd, 2)
    assert (pw["sd_low_points"], pw["sd_high_points"]) == pytest.approx((100 * lo, 100 * hi))
    assert pw["seeds_for_1_point"] == st.seeds_needed(0.01 / sd, 0.05 / 9)
    assert pw["seeds_for_1_point_range"] == (
        st.seeds_needed(0.01 / lo, 0.05 / 9),
        st.seeds_needed(0.01 / hi, 0.05 / 9),
    )
    assert pw["seeds_for_1_point"] > st.seeds_needed(0.01 / sd, 0.05)  # Holm costs seeds
    text = " ".join(an.findings)
    assert "the plan's 0.05 over 9 tests" in text and "over the SD's interval" in text


def test_variance_components_and_the_return_on_seeds_against_test_examples():
    runs = quick_runs()
    an = analyse(runs, quick_plan())
    vc = an.components
    y = 100 * runs.pivot_table(index="seed", columns=["groups", "scalenorm"], values="test_acc")
    p = runs.test_acc.values
    ref = st.variance_components(y.values, float(np.mean(p * (1 - p)) / N_TEST) * 1e4)
    for k in ("seed", "residual", "test_set", "seed_x_config"):
        assert vc[k] == pytest.approx(ref[k])
    assert vc["se_paired_2x_seeds"] == pytest.approx(vc["se_paired_now"] / math.sqrt(2))
    assert vc["se_paired_2x_seeds"] < vc["se_paired_4x_test"] < vc["se_paired_now"]
    assert any(f.startswith("Variance components") for f in an.findings)


def test_spread_and_scale_correlation_at_the_seed_level():
    """Spread: each seed's mean absolute deviation from the cell means per level, the
    levels compared within seed (a paired t test for two levels; p 0.26 on the example,
    where the run-level Brown-Forsythe said 0.074). Spearman within configurations: on the
    two-way residuals with n_eff = 7 x 2 + 1 = 15, not 24."""
    runs = quick_runs()
    runs["final_log2_ratio"] = np.linspace(-1, 0, 24)[np.random.default_rng(0).permutation(24)]
    an = analyse(runs, quick_plan())
    y = runs.pivot_table(index="seed", columns=["scalenorm", "groups"], values="test_acc")
    dev = (y - y.mean(axis=0)).abs()
    z = {sn: dev[sn].mean(axis=1).values for sn in (False, True)}
    ref = sps.ttest_rel(z[True], z[False])
    row = an.dispersion.set_index("axis").loc["scalenorm"]
    assert row.p == pytest.approx(ref.pvalue) and row.F == pytest.approx(ref.statistic**2)
    assert row.df == "1, 2" and row.n_seeds == 3 and row.p == pytest.approx(0.261, abs=1e-3)
    within = an.correlations.set_index("part").loc["within configurations and seeds"]
    assert within.n == 15
    between = an.correlations.set_index("part").loc["between configurations"]
    assert between.n == 8


@pytest.mark.slow
def test_the_marginal_interval_over_seed_means_covers_on_a_planted_crn_grid():
    """400 grids of 3 seeds x 8 cells whose cells of a seed share a large seed effect
    (common random numbers): the t interval over seed means covers each level's mean
    93-97 % of the time; pooling the 12 runs of a level (df 11) covered far less."""
    rng = np.random.default_rng(1)
    sims, cover, pooled = 400, 0, 0
    plan = {"grid": {"axes": {"groups": [1, 4, 16, 64], "scalenorm": [False, True]}}}
    truth = 0.80
    for _ in range(sims):
        seed_eff = rng.normal(0, 0.03, 3)
        runs = grid_runs(
            lambda groups, scalenorm, seed, e=seed_eff: truth + e[seed] + rng.normal(0, 0.005),
            3,
            QUICK_AXES,
        )
        m = marginal_means(runs, runs, ["groups", "scalenorm"], "test_acc", plan)
        r = m[(m.axis == "scalenorm") & (m.level == False)].iloc[0]  # noqa: E712
        cover += r.ci_low <= truth <= r.ci_high
        x = runs[~runs.scalenorm].test_acc.values
        half = sps.t.ppf(0.975, 11) * x.std(ddof=1) / math.sqrt(12)
        pooled += abs(x.mean() - truth) <= half
    assert 0.92 <= cover / sims <= 0.98, cover / sims
    assert pooled / sims < 0.85, pooled / sims


def test_one_removed_run_cannot_flip_a_verdict():
    """The example grid less any one of its 24 runs: the grid model keeps its error
    structure (complete blocks: the seed missing a run is left out and named), and no
    primary term turns into a finding (the mixed model it replaced gave p = 0.0003 for
    ScaleNorm with one run removed). A planted effect (6 seeds, +3 points, common random
    numbers) stays an effect whichever run is removed."""
    full = quick_runs()
    for i in range(len(full)):
        an = analyse(full.drop(index=i), quick_plan(), descriptive=False)
        gm = an.grid_model
        assert (gm.n_seeds == 2).all()
        assert "left out" in gm.model.iloc[0]
        assert not (gm[gm.primary].verdict == "effect").any(), (i, gm[["term", "p"]])
    rng = np.random.default_rng(3)
    shift = rng.normal(0, 0.03, 6)
    planted = grid_runs(
        lambda groups, scalenorm, seed: 0.8 + shift[seed] + 0.03 * scalenorm + rng.normal(0, 0.004),
        6,
        QUICK_AXES,
    )
    plan = quick_plan()
    plan["grid"]["seeds"] = list(range(6))
    base = analyse(planted, plan, descriptive=False).grid_model.set_index("term")
    assert base.loc["scalenorm", "verdict"] == "effect"
    for i in range(0, len(planted), 5):
        gm = analyse(planted.drop(index=i), plan, descriptive=False).grid_model.set_index("term")
        assert gm.loc["scalenorm", "verdict"] == "effect"
        assert gm.loc["groups", "verdict"] != "effect"


def test_a_cell_missing_in_every_seed_leaves_out_its_level_and_says_so():
    runs = quick_runs()
    runs = runs[~((runs.groups == 1) & runs.scalenorm)]
    an = analyse(runs, quick_plan())
    assert an.block.levels["groups"] == [4, 16, 64] and an.block.dropped_levels == {"groups": [1]}
    assert "groups = 1 left out" in an.grid_model.model.iloc[0]
    assert any("complete block" in w for w in an.warnings)


def test_equivalence_reads_a_null_result_and_inconclusive_is_said():
    """TOST against the plan's smallest effect of interest: 10 seeds of a tight null are
    equivalent within 1 point; 3 noisy seeds are inconclusive; nothing is ever written as
    'no effect'."""
    rng = np.random.default_rng(0)
    parts = []
    for sd, n, tag in ((0.002, 10, "tight"), (0.03, 3, "noisy")):
        shift = rng.normal(0, 0.01, n)
        parts.append(
            grid_runs(
                lambda groups, scalenorm, seed, shift=shift, sd=sd: (
                    0.8 + shift[seed] + rng.normal(0, sd)
                ),
                n,
                QUICK_AXES,
                tag=tag,
            )
        )
    runs = pd.concat(parts, ignore_index=True)
    tight = analyse(runs[runs.tag == "tight"], quick_plan(sesoi=1.0))
    noisy = analyse(runs[runs.tag == "noisy"], quick_plan(sesoi=1.0))
    assert (tight.comparisons.verdict == "equivalent").all()
    assert tight.grid_model.set_index("term").loc["scalenorm", "verdict"] == "equivalent"
    d = tight.comparisons.iloc[0].diffs
    from statsmodels.stats.weightstats import ttost_paired

    assert tight.comparisons.iloc[0].p_tost == pytest.approx(
        ttost_paired(np.array(d), np.zeros(len(d)), -0.01, 0.01)[0]
    )
    assert (noisy.comparisons.verdict == "inconclusive").all()
    for an in (tight, noisy):
        text = " ".join(an.findings).lower()
        assert "no effect" not in text and "no detectable" not in text
    assert "within ±1 point of zero" in " ".join(tight.findings)
    assert "is inconclusive: not significant (a primary test: after the plan" in " ".join(noisy.findings)


def test_gatekeeping_tests_a_family_only_after_the_one_before_it():
    """correction = "gatekeeping", order interaction -> main effects -> simple effects:
    with no interaction the later families are not tested (and say so); with every
    hypothesis of a family rejected the next is tested, Holm within it."""
    runs = quick_runs()
    an = analyse(runs, quick_plan(correction="gatekeeping"))
    gm = an.grid_model.set_index("term")
    assert gm.loc["groups x scalenorm", "adj"] == "Holm over 1 test(s) of family 'interaction'"
    assert gm.loc["scalenorm", "verdict"] == "not tested"
    assert (an.comparisons.verdict == "not tested").all()
    assert an.family_sizes == {"interaction": 1, "main effects": 2, "simple effects": 6}
    # everything planted: every gate opens
    rng = np.random.default_rng(2)
    runs = grid_runs(
        lambda groups, scalenorm, seed: (
            0.7
            + 0.01 * np.log2(groups)
            + (0.05 + 0.02 * (groups == 1)) * scalenorm
            + rng.normal(0, 0.002)
        ),
        8,
        QUICK_AXES,
    )
    plan = quick_plan(correction="gatekeeping")
    plan["grid"]["seeds"] = list(range(8))
    an = analyse(runs, plan)
    gm = an.grid_model.set_index("term")
    assert (gm.verdict[gm.primary] == "effect").all()
    assert (an.comparisons.tested).all()
    assert an.comparisons.adj.iloc[0] == "Holm over 6 test(s) of family 'simple effects'"


P_VALUE = re.compile(r"\bp = [0-9.e+-]+")
LABELS = ("uncorrected", "adjusted", "TOST", "Greenhouse", "lower bound", "McNemar", "Holm")


def test_every_p_value_in_the_findings_names_its_correction():
    """findings.md printed a Holm-adjusted p as plain "p = 0.819": every p-value now
    carries its correction (or says it has none) within its clause."""
    for plan in (quick_plan(sesoi=1.0), quick_plan(correction="gatekeeping")):
        runs = quick_runs()
        runs["final_log2_ratio"] = np.linspace(-1, 0, 24)
        an = analyse(runs, plan)
        for f in an.findings:
            for m in P_VALUE.finditer(f):
                context = f[max(0, m.start() - 30) : m.end() + 16]
                assert any(lab in context for lab in LABELS), context


def test_best_configuration_is_labelled_as_chosen_on_the_test_set():
    an = analyse(quick_runs(), quick_plan())
    best = [f for f in an.findings if f.startswith("Highest mean")][0]
    assert "Chosen on the test set" in best and "groups=1, scalenorm=True" in best
