"""The report's findings, warnings and caveats in words, from an ``Analysis``.

Rules the text keeps: a verdict is "has an effect", "is within ±sesoi of zero" or "is
inconclusive", never "no effect"; every p-value carries its correction in its clause
("p = 0.32 uncorrected", "adjusted p = 1 (Holm over 9 primary tests)"); every interval
names its method and its n (seeds); the grid's joint privacy is stated in full once, in
the caveats, and referred to elsewhere.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import numpy as np

from scalemix.report import stats as st
from scalemix.report.plan import ReportPlan

if TYPE_CHECKING:
    from scalemix.report.analysis import Analysis

SELECTION_ADVICE = (
    "Choosing among models trained on private data costs privacy whatever data scores the "
    "choice (a public validation set included): the choice is a function of every model, so "
    "it is covered only by the grid's joint guarantee, not by one run's epsilon. To spend one "
    "run's budget, tune on public or proxy data and train once privately, or use a DP tuning "
    "procedure (e.g. Papernot & Steinke 2022: a random number of runs, only the best released)."
)

DIAGNOSTICS_CAVEAT = (
    "Diagnostics read from training batches (source = train: scale ratios, gradient norms, "
    "clip fractions, SNR) are computed from private examples without noise and are NOT "
    "covered by the DP guarantee. Do not publish them as private."
)

PRIVACY_HEAD = "Privacy of everything the grid published"  # the caveat with the full statement


# ------------------------------------------------------------------ words for numbers


def points(x: float) -> str:
    """A number of accuracy points: "1 point", "0.5 points"."""
    return f"{x:g} point" + ("" if x == 1 else "s")


def signed_points(x: float) -> str:
    """A fraction as signed accuracy points: 0.016 -> "+1.6 points"."""
    return f"{100 * x:+.1f} points"


def pv(x) -> str:
    """A p-value to 3 significant digits ("nan" when missing)."""
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def p_uncorrected(x, name: str = "p") -> str:
    """ "p = 0.32 uncorrected" (or "TOST p = ...", "Greenhouse-Geisser p = ...")."""
    return f"{name} = {pv(x)} uncorrected"


def p_adjusted(r) -> str:
    """ "adjusted p = 0.82 (Holm over 9 primary tests)", or why there is none."""
    adj = str(r.get("adj", ""))
    if adj.startswith("exploratory"):
        return "exploratory, uncorrected"
    if adj.startswith("not tested"):
        return adj
    return f"adjusted p = {pv(r.get('p_adj'))} ({adj})"


def tost_p(r) -> str:
    """ "TOST p = 0.019 uncorrected, adjusted 0.056 (Holm over 5 primary tests)": a
    primary test's equivalence is corrected like its difference."""
    text = p_uncorrected(r.get("p_tost"), "TOST p")
    adj = str(r.get("adj", ""))
    pt_adj = r.get("p_tost_adj")
    if (
        isinstance(pt_adj, float)
        and not math.isnan(pt_adj)
        and not adj.startswith(("exploratory", "not tested"))
    ):
        text += f", adjusted {pv(pt_adj)} ({adj})"
    return text


def count(v) -> str:
    """A number of seeds ("> 10^7" when beyond the search)."""
    return "> 10^7" if v is None else f"{v:,}"


def where(row, an: Analysis, exclude=()) -> str:
    """The stratum of a row: "groups = 1, scalenorm = True" (or "all")."""
    parts = [
        f"{a} = {row[a]}" for a in an.axes if a not in exclude and a in row and not _isnan(row[a])
    ]
    return ", ".join(parts) or "all"


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def verdict_words(verdict: str, rp: ReportPlan) -> str:
    """A verdict in words; "not significant" is never written as "no effect"."""
    if verdict == "equivalent":
        return f"is within ±{points(rp.sesoi)} of zero (equivalence shown by TOST)"
    if verdict == "inconclusive":
        return (
            "is inconclusive: not significant (a primary test: after the plan's correction), and "
            + (
                f"not shown by TOST to be within ±{points(rp.sesoi)} of zero"
                if rp.sesoi
                else "the plan sets no smallest effect of interest to test equivalence against"
            )
        )
    return {
        "effect": "has an effect",
        "effect (exploratory)": "may have an effect (exploratory)",
        "not tested": "was not tested (its gate was closed)",
        "not testable": "is not testable",
    }.get(verdict, verdict)


# ------------------------------------------------------------------ the findings


def findings(an: Analysis) -> tuple[list[str], list[str]]:
    """The findings and the warnings, in the order the report prints them."""
    out, warn = [], []
    warn += _run_warnings(an)
    out += _audit(an)
    best, few = _best_configuration(an)
    out += best
    warn += few
    gm = an.grid_model
    for _, r in gm.iterrows() if not gm.empty else []:
        if not isinstance(r.p, float) or math.isnan(r.p):
            continue
        out.append(term_finding(an, r))
    out += _simple_effects(an)
    out += _omnibus(an)
    out += _spread(an)
    out += _scale_mixing(an)
    out += _per_example(an)
    out += resolution(an)
    out += privacy_findings(an)
    out += _sensitivity(an)
    return out, warn


def _run_warnings(an: Analysis) -> list[str]:
    runs, cells = an.runs, an.cells
    warn = []
    if (
        "privacy_alarm" in runs
        and (alarm := runs[runs.privacy_alarm.fillna(False).astype(bool)]).size
    ):
        ids = ", ".join(alarm.id.tolist()[:5]) + (" ..." if len(alarm) > 5 else "")
        warn.append(
            f"PRIVACY ALARM: in {len(alarm)} run(s) ({ids}) the one-run audit's lower bound "
            "exceeds the accountant's epsilon at 95 % confidence. The runs do not do what the "
            "privacy proof assumes: this is a bug, not a result (see each cell's audit/audit.json)."
        )
    n_done = int((runs.status == "done").sum())
    n_bad = int(runs.status.isin(["failed", "diverged"]).sum())
    if n_bad:
        warn.append(
            f"{n_bad} of {len(runs)} runs failed or diverged: the tables count them per cell, "
            "and the sensitivity analysis scores them as chance accuracy (complete-case "
            "statistics alone make a configuration that diverges more often look better)."
        )
    empty = cells[cells.n == 0] if not cells.empty else cells
    for _, c in empty.iterrows():
        at = ", ".join(f"{a}={c[a]}" for a in an.axes)
        warn.append(
            f"Cell {at} has no finished run ({c['failed']} failed, {c['diverged']} diverged)."
        )
    if n_done < len(runs) - n_bad:
        warn.append(f"{len(runs) - n_bad - n_done} runs are not finished; this report is partial.")
    if an.block is not None and an.block.note:
        warn.append(
            f"The seed-level analyses (grid model, spread, variance components) use a complete "
            f"block of {len(an.block.seeds)} seeds: {an.block.note}."
        )
    return warn


def _audit(an: Analysis) -> list[str]:
    runs = an.runs
    if "epsilon_lower_bound" not in runs or not runs.epsilon_lower_bound.notna().any():
        return []
    lb = runs.epsilon_lower_bound.astype(float)
    return [
        f"Privacy audit: the largest one-run lower bound on epsilon is {lb.max():.2f} "
        f"(median {lb.median():.2f}) against an accountant's epsilon of at most "
        f"{runs.epsilon_spent.astype(float).max():.2f}; a lower bound is what an attacker "
        "demonstrably gets, the accountant's epsilon what the proof promises."
    ]


def _best_configuration(an: Analysis) -> tuple[list[str], list[str]]:
    cells = an.cells
    if cells.empty or not cells["mean"].notna().any():
        return [], []
    best = cells.sort_values("mean", ascending=False).iloc[0]
    label = ", ".join(f"{a}={best[a]}" for a in an.axes)
    cut = " (cut at 100 %)" if best.get("ci_cut") in ("high", "both") else ""
    out = [
        f"Highest mean {an.metric_label}: {100 * best['mean']:.1f} % at {label} (95 % t CI "
        f"over {int(best['n'])} seeds {100 * best['ci_low']:.1f}-{100 * best['ci_high']:.1f}"
        f"{cut}). Chosen on the test set (the grid has no validation split): as an "
        "estimate of the chosen configuration's accuracy it is biased upwards, the more "
        "so the more configurations it was chosen from."
    ]
    w = st.too_few(int(cells["n"].max()), an.plan.alpha)
    return out, ([] if w is None else [f"Too few seeds to conclude: {w}."])


def _simple_effects(an: Analysis) -> list[str]:
    rp, comp, out = an.plan, an.comparisons, []
    if comp.empty:
        return out
    skip = (an.paired_axis,) if an.paired_axis else ()
    for fam, g in comp.groupby("family_name", sort=False):
        k = len(g)
        up = int((g.mean_diff > 0).sum())
        top = g.sort_values("mean_diff", ascending=False).iloc[0]
        seeds_won, seeds_all = int(g.wins.sum()), int(g.n.sum())
        if g.b.nunique() == 1:  # one treatment compared within strata
            text = (
                f"Simple effects ({fam}, matched on seed): {top['b']} had the higher mean in "
                f"{up} of {k} strata; "
            )
        else:  # each level against the baseline
            text = (
                f"Simple effects ({fam}, matched on seed): {up} of {k} levels had the higher mean; "
            )
        text += (
            f"it won {seeds_won} of {seeds_all} seed-matched pairs (these pairs share "
            "seeds across strata: not independent). The largest difference, "
            f"{signed_points(top.mean_diff)} at {where(top, an, skip)} (95 % paired-t CI "
            f"{signed_points(top.ci_low)} to {signed_points(top.ci_high)}, n = {int(top.n)} "
            f"seeds, seeds won {int(top.wins)}/{int(top.n)}, exact 95 % CI of the paired "
            f"P(improvement) {top.win_low:.2f}-{top.win_high:.2f}), "
        )
        if top.n < 2 or math.isnan(top.p_t):
            text += f"is not testable (n = {int(top.n)})."
        else:
            text += (
                f"{verdict_words(top.verdict, rp)} ({p_uncorrected(top.p_t)}, "
                f"{p_adjusted(top)}"
                + (f"; {tost_p(top)} against ±{points(rp.sesoi)}" if rp.sesoi else "")
                + ")."
            )
        out.append(text)
        n_eff = int((g.verdict == "effect").sum())
        n_eq = int((g.verdict == "equivalent").sum())
        n_inc = int((g.verdict == "inconclusive").sum())
        n_not = int((g.verdict == "not tested").sum())
        out.append(
            f"Of the {k} simple effects: {n_eff} significant after correction, {n_eq} "
            f"equivalent within the smallest effect of interest, {n_inc} inconclusive"
            + (f", {n_not} not tested (gate closed)" if n_not else "")
            + "."
        )
    return out


def _omnibus(an: Analysis) -> list[str]:
    rp, om, out = an.plan, an.omnibus, []
    for _, r in om.iterrows() if not om.empty else []:
        at = ", ".join(f"{a}={r[a]}" for a in an.axes if a != an.primary and a in r)
        out.append(
            f"Across {an.primary} ({r.levels} levels, {r.blocks} seeds"
            f"{', ' + at if at else ''}), accuracy {verdict_words(r.verdict, rp)} "
            f"({r.test}, {p_uncorrected(r.p)}, {p_adjusted(r)}"
            + (
                f"; every pair of levels within ±{points(rp.sesoi)}: {tost_p(r)}"
                if rp.sesoi
                else ""
            )
            + ")."
        )
    return out


def _spread(an: Analysis) -> list[str]:
    disp, out = an.dispersion, []
    for _, r in disp.iterrows() if not disp.empty else []:
        sds = ", ".join(f"{k}: {100 * v:.2f}" for k, v in r.pooled_sd.items())
        verdict = "differs" if r.p < an.plan.alpha else "is inconclusive (not significant)"
        gg = f", {p_uncorrected(r.p_gg, 'Greenhouse-Geisser p')}" if np.isfinite(r.p_gg) else ""
        out.append(
            f"Spread across seeds by {r.axis} (pooled SD in points: {sds}) {verdict}: seed-level "
            f"test of each seed's mean absolute deviation, F = {r.F:.3g}, df {r.df}, "
            f"n = {r.n_seeds} seeds, {p_uncorrected(r.p)}{gg} (exploratory)."
        )
    return out


def _scale_mixing(an: Analysis) -> list[str]:
    co, out = an.correlations, []
    for _, r in co.iterrows() if not co.empty else []:
        strength = (
            "an association" if r.p < an.plan.alpha else "an inconclusive result (not significant)"
        )
        out.append(
            f"Scale mixing and accuracy ({r.part}; exploratory): {strength} between the final "
            f"log2 scale ratio and accuracy (Spearman rho = {r.rho:+.2f}, 95 % CI "
            f"{r.ci_low:+.2f} to {r.ci_high:+.2f}, effective n = {r.n}, {p_uncorrected(r.p)}); "
            "a correlation, not a cause."
        )
    return out


def _per_example(an: Analysis) -> list[str]:
    comp, alpha = an.comparisons, an.plan.alpha
    if "ex_p_mcnemar" in comp and comp.ex_p_mcnemar.notna().any():
        ex = comp[comp.ex_p_mcnemar.notna()]
        top = ex.loc[ex.ex_diff.abs().idxmax()]
        skip = (an.paired_axis,) if an.paired_axis else ()
        return [
            f"Per test example (second source of evidence; the trained models held fixed; "
            f"exploratory): {int((ex.ex_p_mcnemar < alpha).sum())} of {len(ex)} comparisons "
            f"differ by McNemar's exact test at {alpha:g} (uncorrected; the test pools each "
            f"seed's pairs, so every test example counts once per seed and the pairs are not "
            f"independent); the largest, {top['b']} vs {top['a']} at {where(top, an, skip)}, "
            f"{signed_points(top.ex_diff)} (95 % bootstrap over {int(top.ex_examples)} test "
            f"examples {100 * top.ex_ci_low:+.1f} to {100 * top.ex_ci_high:+.1f}, "
            f"{p_uncorrected(top.ex_p_mcnemar, 'McNemar p')}). This is about these trained "
            "models on this test set; whether the configuration wins again with new seeds is "
            "the paired t test's question."
        ]
    if "run_dir" in an.runs and not comp.empty:
        return [
            "Per test example: not compared, because the runs did not store the test "
            "predictions of the plan's weights"
            + (
                " (EMA predictions are stored from scalemix 2026-12 on)."
                if an.metric != "test_acc"
                else "."
            )
        ]
    return []


def _sensitivity(an: Analysis) -> list[str]:
    sens, alpha = an.sensitivity, an.plan.alpha
    if sens.empty:
        return []
    changed = None  # comparable row by row only when no comparison was lost
    if len(sens) == len(an.comparisons):
        verdicts = (
            (sens.p_holm < alpha).values,
            (an.comparisons.verdict == "effect").values,
        )
        changed = int((verdicts[0] != verdicts[1]).sum())
    return [
        "Sensitivity: with failed and diverged runs counted as chance accuracy, "
        f"{int((sens.p_holm < alpha).sum())} of {len(sens)} comparisons are significant "
        "(Holm over the comparisons)"
        + (f"; {changed} verdict(s) differ from the main analysis" if changed is not None else "")
        + "."
    ]


def term_finding(an: Analysis, r) -> str:
    """One grid-model term: its verdict, effect and interval, F with its uncorrected,
    sphericity-free and adjusted p, the level a lone effect must pass, equivalence."""
    from scipy import stats as st_scipy

    rp = an.plan
    role = "a primary question" if r.primary else "exploratory"
    text = f"Grid model ({role}): {r.term} {verdict_words(r.verdict, rp)}"
    parts = []
    if "effect" in r and isinstance(r.get("effect"), float) and not math.isnan(r.effect):
        parts.append(
            f"effect {signed_points(r.effect)}, 95 % CI {signed_points(r.effect_low)} to "
            f"{signed_points(r.effect_high)} over {int(r.n_seeds)} seeds"
        )
    parts.append(f"F({r.df}) = {r.F:.3g}, {p_uncorrected(r.p)} (sphericity assumed)")
    gg = p_uncorrected(r.p_gg, "Greenhouse-Geisser p")
    lb = p_uncorrected(r.p_lb, "lower bound p")
    if r.df1 > 1 and r.get("gg_estimable", True):
        parts.append(f"{gg} (epsilon {r.eps_gg:.2f}), {lb}")
    elif r.df1 > 1:
        parts.append(
            f"{gg} (epsilon {r.eps_gg:.2f}, not estimable from {int(r.n_seeds)} seeds for "
            f"{int(r.df1)} df: capped at {(r.n_seeds - 1) / r.df1:.2f}), {lb} (used for the "
            "verdict)"
        )
    parts.append(p_adjusted(r))
    # the level a lone effect must pass: the plan's alpha, over the family for Holm's first
    # step (the same level the power finding uses)
    m = an.family_sizes.get("all primary tests", 1) if r.primary and rp.correction == "holm" else 1
    a = rp.alpha / max(1, int(m))
    f_crit = float(st_scipy.f.ppf(1 - a, r.df1, r.df2)) if r.df2 > 0 else math.nan
    crit = f"significance at alpha = {a:.3g}" + (
        f" (the plan's {rp.alpha:g} over {m} tests, Holm's first step)" if m > 1 else ""
    )
    crit += f" needs F > {f_crit:.3g}"
    if isinstance(r.get("critical_effect"), float) and not math.isnan(r.critical_effect):
        # 1-df term: the critical effect scales with the critical t (F = t^2)
        scale = math.sqrt(f_crit / r.F_crit) if r.F_crit > 0 else math.nan
        crit += f", an effect of at least {100 * r.critical_effect * scale:.1f} points"
    parts.append(crit)
    if rp.sesoi and not math.isnan(r.p_tost):
        parts.append(f"equivalence within ±{points(rp.sesoi)}: {tost_p(r)}")
    return text + " (" + "; ".join(parts) + ")."


def resolution(an: Analysis) -> list[str]:
    """What the grid resolves: the test set's binomial error, the variance components,
    the power for the primary term at the plan's own alpha."""
    out = []
    pw, vc = an.power, an.components
    if pw.get("binomial_se_points") is not None:
        out.append(
            f"Resolution: one run's test accuracy has a binomial standard error of "
            f"{pw['binomial_se_points']:.1f} points ({pw['test_size']} test examples)."
        )
    if vc:
        text = (
            f"Variance components ({vc['seeds']} seeds x {vc['configurations']} configurations, "
            f"SD in points): seed {math.sqrt(max(vc['seed'], 0.0)):.2f}"
            + (" (a negative estimate, truncated at 0;" if vc["seed"] < 0 else " (")
            + "shared by a seed's cells, "
            f"cancels in paired comparisons), seed x configuration "
            f"{math.sqrt(vc['residual']):.2f}"
        )
        if "test_set" in vc:
            text += (
                f", of which at most {math.sqrt(vc['test_set']):.2f} is the test set's "
                "binomial noise"
            )
        text += (
            f". A paired difference's SE over {vc['seeds']} seeds is "
            f"{vc['se_paired_now']:.2f} points; twice the seeds: {vc['se_paired_2x_seeds']:.2f}"
        )
        if "se_paired_4x_test" in vc:
            text += f"; a test set 4x larger: at best {vc['se_paired_4x_test']:.2f}"
        out.append(text + ".")
    if pw.get("mde_points") is not None:
        a = pw["alpha"]
        alpha_txt = (
            f"alpha = {a:.3g} (the plan's {an.plan.alpha:g} over {pw['family_size']} tests, "
            "the Holm step a lone effect must pass)"
            if pw["family_size"] > 1
            else f"alpha = {a:.3g}"
        )
        text = (
            f"Power for {pw['term']}: the SD of its per-seed contrast is "
            f"{pw['paired_sd_points']:.2f} points (95 % CI {pw['sd_low_points']:.2f} to "
            f"{pw['sd_high_points']:.2f}, df {pw['seeds'] - 1}); at {alpha_txt}, "
            f"{pw['seeds']} seeds detect {pw['mde_points']:.1f} points with 80 % power"
        )
        for key, val in pw.items():
            if key.startswith("seeds_for_") and not key.endswith("range"):
                pts = key[len("seeds_for_") : -len("_point")]
                lo, hi = pw[key + "_range"]
                text += (
                    f"; {pts} point{'s' if pts != '1' else ''} needs {count(val)} seeds "
                    f"({count(lo)} to {count(hi)} over the SD's interval)"
                )
        out.append(text + ".")
    return out


# ------------------------------------------------------------------ privacy and caveats


def privacy_summary(gp) -> str:
    """The grid's joint privacy in one sentence: the guarantee (or why there is none), and
    the noise tails' remark where the full statement makes one."""
    text = str(getattr(gp, "text", "") or "").strip()
    if not text:
        return "unknown."
    head = text.split(": ", 1)[0].rstrip(".") + "."
    tails = [s for s in re.split(r"(?<=[.)]) (?=[A-Z(])", text) if "cut tails" in s]
    return " ".join([head, *tails])


def privacy_findings(an: Analysis) -> list[str]:
    """The privacy of the grid as a whole (privacy.grid) in short; the full statement and
    what choosing a cell costs are in the caveats."""
    gp = an.grid_privacy
    if gp is None:
        return []
    return [
        f"Privacy of the whole grid: {privacy_summary(gp)} The full statement (what it covers "
        "and assumes), and what choosing a configuration costs, are under Caveats."
    ]


def caveats(an: Analysis) -> list[str]:
    """The caveats: the grid's joint privacy in full (or its stated absence), what
    choosing a configuration costs, the diagnostics, the metric, the test set."""
    gp = an.grid_privacy
    if gp is None:
        priv = (
            "The joint privacy of the grid was not computed for this report (no grid "
            "directory): every run saw the same private data, so the runs together are not "
            "covered by one run's epsilon."
        )
    else:
        priv = f"{PRIVACY_HEAD}: {gp.text}"
    return [
        priv,
        SELECTION_ADVICE,
        DIAGNOSTICS_CAVEAT,
        f"The metric is each run's {an.metric_label}, never its best epoch.",
        "Every accuracy is measured on the test set, and the best configuration is chosen on "
        "it (the grid has no validation split): its accuracy is an optimistic estimate.",
    ]
