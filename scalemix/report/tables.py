"""The report's tables for people: strings with a unit on every column, and the footnote
of each table, which names only the columns and marks the table shows.

``display_tables`` turns an ``Analysis`` into the tables of the PDF, the Markdown files
and W&B (accuracies in %, differences in points, p-values to 3 digits, each column saying
whether it is uncorrected or adjusted and how); ``table_notes`` gives their footnotes;
``md_table`` writes a table as Markdown.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pandas as pd

from scalemix.report.findings import points

if TYPE_CHECKING:
    from scalemix.report.analysis import Analysis

CUT_MARK = "^"  # an interval cut to [0, 1]: the t interval reached past it


def md_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table ("_none_" when empty)."""
    if frame.empty:
        return "_none_\n"
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x) -> str:
    """A fraction as a percentage to one decimal ("" when missing)."""
    return "" if _missing(x) else f"{100 * x:.1f}"


def p_value(x, n: int | None = None) -> str:
    """A p-value to 3 significant digits; "not testable" below 2 seeds."""
    if n is not None and n < 2:
        return f"not testable (n = {n})"
    return "" if _missing(x) else f"{x:.3g}"


def ci_text(lo, hi, scale: float = 1.0, fmt: str = "+.2f") -> str:
    """An interval "lo to hi", scaled (100: fractions to points)."""
    if _missing(lo):
        return ""
    return f"{scale * lo:{fmt}} to {scale * hi:{fmt}}"


def ci_pct(lo, hi, cut: str = "") -> str:
    """An interval of accuracies in %, with ^ at an end cut at 0 or 100 %."""
    if _missing(lo):
        return ""
    return (
        f"{'' if cut not in ('low', 'both') else CUT_MARK}{pct(lo)}-{pct(hi)}"
        f"{CUT_MARK if cut in ('high', 'both') else ''}"
    )


def adj_short(adj: str, p_adj) -> str:
    """An adjusted p with its correction: "1 (Holm, 9 tests)"."""
    adj = str(adj)
    if adj.startswith("exploratory"):
        return "exploratory: none"
    if adj.startswith("not tested"):
        return "not tested (gate closed)"
    if adj.startswith("Holm over") and "family" in adj:
        m, fam = adj.split("Holm over ")[1].split(" test(s) of family ")
        return f"{p_value(p_adj)} (Holm, {m} in {fam.strip(chr(39))})"
    if adj.startswith("Holm over"):
        return f"{p_value(p_adj)} (Holm, {adj.split('Holm over ')[1].split(' ')[0]} tests)"
    return f"{p_value(p_adj)} ({adj})"


def _sd_with_interval(sd, lo, hi) -> str:
    if _missing(sd):
        return ""
    return f"{100 * sd:.1f}" + ("" if _missing(lo) else f" [{100 * lo:.1f}, {100 * hi:.1f}]")


def _any_cut(cuts) -> bool:
    return any(str(c) in ("low", "high", "both") for c in cuts)


# column names that footnotes and tests refer to
SD_COLUMN = "SD across seeds (pts) [95% CI, chi-square]"
IQM_COLUMN = "IQM (%)"
WILCOXON_COLUMN = "p (Wilcoxon), Holm over comparisons"
POI_COLUMN = "P(X_b > X_a), cross-seed [95% CI]"


def display_tables(an: Analysis) -> dict[str, pd.DataFrame]:
    """The human-readable tables (strings, every column with its unit: accuracies in %,
    differences in points, p-values to 3 digits with their correction)."""
    return {
        "cells": _cells_table(an),
        "marginals": _marginals_table(an),
        "comparisons": (comp := _comparisons_table(an)),
        "per_example": _per_example_table(an, comp),
        "omnibus_corr": _tests_table(an),
    }


def _cells_table(an: Analysis) -> pd.DataFrame:
    cells = an.cells
    out = cells[an.axes].astype(str)
    out["n (seeds)"] = cells["n"].astype(int)
    out["failed / diverged (runs of planned)"] = [
        f"{int(f)} / {int(d)} of {int(p)}"
        for f, d, p in zip(cells["failed"], cells["diverged"], cells["planned"])
    ]
    out["mean (%)"] = cells["mean"].map(pct)
    out[SD_COLUMN] = [
        _sd_with_interval(s, lo, hi)
        for s, lo, hi in zip(
            cells["std"],
            cells.get("sd_low", [math.nan] * len(cells)),
            cells.get("sd_high", [math.nan] * len(cells)),
        )
    ]
    out["95% CI of the mean (%)"] = [
        ci_pct(a, b, c) for a, b, c in zip(cells.ci_low, cells.ci_high, cells.get("ci_cut", ""))
    ]
    out["CI method"] = cells["ci_method"]
    if "other_mean" in cells and cells.other_mean.notna().any():
        other = "raw" if an.metric == "test_acc_ema" else "EMA"
        out[f"mean, {other} weights (%, descriptive)"] = cells.other_mean.map(pct)
    if (cells["n"] >= 4).any():
        out[IQM_COLUMN] = cells["iqm"].map(lambda v: pct(v) if v is not None else "")
    if "eps_lower_bound_max" in cells and cells.eps_lower_bound_max.notna().any():
        out["eps lower bound (audit, max over seeds)"] = [
            "" if math.isnan(v) else f"{v:.2f} (acct {e:.2f})"
            for v, e in zip(cells.eps_lower_bound_max, cells.eps_spent)
        ]
    return out


def _marginals_table(an: Analysis) -> pd.DataFrame:
    marg = an.marginals
    if marg.empty:
        return pd.DataFrame()
    return pd.DataFrame(
        {
            "axis": marg.axis,
            "level": marg.level.astype(str),
            "configurations averaged": marg.configurations,
            "n (seeds)": marg.seeds,
            "mean of seed means (%)": marg["mean"].map(pct),
            "95% CI over seed means (%)": [
                ci_pct(a, b, c) for a, b, c in zip(marg.ci_low, marg.ci_high, marg.ci_cut)
            ],
            "seeds left out (a run missing)": marg.seeds_left_out,
        }
    )


def _strata(an: Analysis) -> list[str]:
    comp = an.comparisons
    return [a for a in an.axes if a in comp.columns and a != an.paired_axis]


def _comparisons_table(an: Analysis) -> pd.DataFrame:
    comp = an.comparisons
    if comp.empty:
        return pd.DataFrame()
    out = comp[_strata(an)].astype(str)
    out.insert(0, "b vs a", comp["b"] + " vs " + comp["a"])
    out["n (seeds)"] = comp["n"].astype(int)
    out["diff b - a (pts)"] = comp.mean_diff.map(lambda v: f"{100 * v:+.2f}")
    out["95% CI, paired t (pts)"] = [ci_text(a, b, 100) for a, b in zip(comp.ci_low, comp.ci_high)]
    out["p (t), uncorrected"] = [p_value(p, n) for p, n in zip(comp.p_t, comp.n)]
    out["p (t), adjusted (correction)"] = [adj_short(a, p) for a, p in zip(comp.adj, comp.p_adj)]
    if an.plan.sesoi:
        out[f"TOST p (±{an.plan.sesoi:g} pts), uncorrected"] = comp.p_tost.map(p_value)
        if "p_tost_adj" in comp:
            out["TOST p, adjusted"] = comp.p_tost_adj.map(p_value)
    out["verdict"] = comp.verdict
    if (comp.n >= 6).any():  # below 6 pairs the signed-rank test cannot reach 0.05
        out[WILCOXON_COLUMN] = [p_value(p, n) for p, n in zip(comp.p_wilcoxon_holm, comp.n)]
    out["g_z [95% CI of delta_z]"] = [
        "" if math.isnan(g) else f"{g:+.2f} [{lo:+.2f}, {hi:+.2f}]"
        for g, lo, hi in zip(comp.effect_gz, comp.gz_low, comp.gz_high)
    ]
    out["seeds won [exact 95% CI of P(win)]"] = [
        f"{int(w)}/{int(n)} [{lo:.2f}, {hi:.2f}]"
        for w, n, lo, hi in zip(comp.wins, comp.n, comp.win_low, comp.win_high)
    ]
    if comp.poi_cross.notna().any():
        out[POI_COLUMN] = [
            ""
            if math.isnan(p)
            else f"{p:.2f} [{CUT_MARK if c in ('low', 'both') else ''}{lo:.2f}, "
            f"{hi:.2f}{CUT_MARK if c in ('high', 'both') else ''}]"
            for p, lo, hi, c in zip(
                comp.poi_cross, comp.poi_cross_low, comp.poi_cross_high, comp.poi_cross_cut
            )
        ]
    return out


def _per_example_table(an: Analysis, out_comp: pd.DataFrame) -> pd.DataFrame:
    comp = an.comparisons
    if comp.empty or "ex_diff" not in comp or not comp.ex_diff.notna().any():
        return pd.DataFrame()
    ex = comp[comp.ex_diff.notna()]  # per test example: the trained models held fixed
    out = out_comp.loc[ex.index, list(out_comp.columns[: 1 + len(_strata(an))])].copy()
    out["seeds x test examples"] = [
        f"{int(s)} x {int(n)}" for s, n in zip(ex.ex_seeds, ex.ex_examples)
    ]
    out["only b right / only a right (examples)"] = [
        f"{int(b)} / {int(a)}" for b, a in zip(ex.ex_b_only, ex.ex_a_only)
    ]
    out["diff (pts)"] = ex.ex_diff.map(lambda v: f"{100 * v:+.2f}")
    out["95% CI, bootstrap over examples (pts)"] = [
        ci_text(lo, hi, 100) for lo, hi in zip(ex.ex_ci_low, ex.ex_ci_high)
    ]
    out["McNemar exact p, uncorrected"] = [p_value(p) for p in ex.ex_p_mcnemar]
    return out


def _tests_table(an: Analysis) -> pd.DataFrame:
    rows = []
    for _, r in an.omnibus.iterrows():
        at = ", ".join(f"{a}={r[a]}" for a in an.axes if a != an.primary and a in r)
        rows.append(
            {
                "test": f"{r.test} across {an.primary}",
                "where": at or "all",
                "n (seeds)": int(r.blocks) if r.blocks else "",
                "statistic": f"chi2 {r.statistic:.3g}",
                "p, uncorrected": p_value(r.p),
                "p, sphericity-free, uncorrected": "",
                "p, adjusted (correction)": adj_short(r.adj, r.p_adj),
                "verdict": r.verdict,
            }
        )
    for _, r in an.grid_model.iterrows():
        rows.append(
            {
                "test": f"grid model: {r.term}" + (" (primary)" if r.get("primary", False) else ""),
                "where": "all (repeated-measures ANOVA over seeds)",
                "n (seeds)": int(r.n_seeds),
                "statistic": f"F {r.F:.3g} (df {r.df}; crit {r.F_crit:.3g})",
                "p, uncorrected": p_value(r.p),
                "p, sphericity-free, uncorrected": ""
                if r.df1 <= 1
                else (
                    f"GG {p_value(r.p_gg)} (eps {r.eps_gg:.2f}); LB {p_value(r.p_lb)}"
                    if r.get("gg_estimable", True)
                    else f"GG {p_value(r.p_gg)} (not estimable); LB {p_value(r.p_lb)} (verdict)"
                ),
                "p, adjusted (correction)": adj_short(r.adj, r.p_adj),
                "verdict": r.verdict,
            }
        )
    for _, r in an.dispersion.iterrows():
        rows.append(
            {
                "test": f"spread across seeds by {r.axis} (seed-level)",
                "where": "SD (pts) "
                + ", ".join(f"{k}: {100 * v:.2f}" for k, v in r.pooled_sd.items()),
                "n (seeds)": int(r.n_seeds),
                "statistic": f"F {r.F:.3g} (df {r.df})",
                "p, uncorrected": p_value(r.p),
                "p, sphericity-free, uncorrected": ""
                if math.isnan(r.p_gg)
                else f"GG {p_value(r.p_gg)}",
                "p, adjusted (correction)": "exploratory: none",
                "verdict": "",
            }
        )
    for _, r in an.correlations.iterrows():
        rows.append(
            {
                "test": f"Spearman: final log2 scale ratio vs accuracy, {r.part}",
                "where": "configuration means"
                if r.part.startswith("between")
                else "two-way residuals",
                "n (seeds)": f"n_eff {r.n} (pairs)",
                "statistic": f"rho {r.rho:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]",
                "p, uncorrected": p_value(r.p),
                "p, sphericity-free, uncorrected": "",
                "p, adjusted (correction)": "exploratory: none",
                "verdict": "",
            }
        )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ footnotes


def table_notes(an: Analysis, tables: dict[str, pd.DataFrame]) -> dict[str, str]:
    """Each table's footnote, naming only the columns and marks the table shows."""
    return {
        "cells": _cells_note(an, tables.get("cells", pd.DataFrame())),
        "marginals": _marginals_note(an),
        "comparisons": _comparisons_note(an, tables.get("comparisons", pd.DataFrame())),
        "per_example": _per_example_note(an),
        "omnibus_corr": _tests_note(an),
    }


CUT_NOTE = "^ marks an interval cut at 0 or 100 % (the t interval reached past it)"


def _cells_note(an: Analysis, shown: pd.DataFrame) -> str:
    cells = an.cells
    parts = [
        "n: finished seeds (one run per seed)",
        "SD: across seeds, with its 95 % chi-square interval (n - 1 df)",
        "CI: 95 % of the mean by the named method (t below 20 seeds)",
    ]
    if "ci_cut" in cells and _any_cut(cells.ci_cut):
        parts.append(CUT_NOTE)
    if any(c.startswith("mean, ") and "weights" in c for c in shown.columns):
        parts.append("the other weights' mean is descriptive (the plan's metric is the one tested)")
    if IQM_COLUMN in shown:
        parts.append("IQM: interquartile mean (shown from 4 seeds)")
    if "eps lower bound (audit, max over seeds)" in shown:
        parts.append(
            "eps lower bound: the one-run audit's, largest over seeds, beside the "
            "accountant's epsilon"
        )
    return "; ".join(parts) + "."


def _marginals_note(an: Analysis) -> str:
    text = (
        "Each seed's mean over the other axes' configurations at that level (seeds missing "
        "a run there are left out), then the t interval over those seed means: n is the "
        "number of seeds, not of runs."
    )
    marg = an.marginals
    if not marg.empty and "ci_cut" in marg and _any_cut(marg.ci_cut):
        text += " " + CUT_NOTE + "."
    return text


def _comparisons_note(an: Analysis, shown: pd.DataFrame) -> str:
    sesoi = an.plan.sesoi
    parts = [
        "Differences b - a in accuracy points, matched on seed. p (t): paired t test, "
        "uncorrected and adjusted as the analysis plan says (the correction is named); its "
        "CI is the interval it inverts."
    ]
    if sesoi:
        parts.append(
            f"TOST: equivalence within ±{points(sesoi)}, uncorrected. Verdict: effect "
            "(adjusted p < alpha), equivalent (TOST p < alpha), else inconclusive."
        )
    else:
        parts.append(
            "Verdict: effect (adjusted p < alpha), else inconclusive (the plan sets no "
            "smallest effect of interest to test equivalence against)."
        )
    if WILCOXON_COLUMN in shown:
        parts.append("Wilcoxon: exact signed-rank test (robustness), Holm over the comparisons.")
    parts.append(
        "g_z: Hedges' corrected standardised effect; its interval is the exact "
        "noncentral-t interval of delta_z. Seeds won: b > a on the same seed, with the "
        "exact (Clopper-Pearson) interval of the paired P(improvement)."
    )
    if POI_COLUMN in shown:
        comp = an.comparisons
        parts.append(
            "P(X_b > X_a): rliable's probability of improvement from cross-seed pairs only "
            "(jackknife over seeds)"
            + ("; ^ marks an interval cut at 0 or 1." if _any_cut(comp.poi_cross_cut) else ".")
        )
    return " ".join(parts)


def _per_example_note(an: Analysis) -> str:
    weights = "EMA weights'" if an.metric == "test_acc_ema" else "raw weights'"
    return (
        "The same comparisons scored example by example on the shared test set, pooled over "
        "the matched seeds: McNemar's exact test on the discordant examples and a bootstrap "
        "over test examples (the same examples resampled for every seed). Both hold the "
        "trained models fixed: they measure test-set noise only, not seed-to-seed "
        f"variation. Uncorrected. The {weights} predictions (the plan's metric)."
    )


def _tests_note(an: Analysis) -> str:
    parts = []
    gm = an.grid_model
    if not gm.empty:
        text = (
            "Grid model: repeated-measures ANOVA over seeds (each term against its own term x "
            "seed interaction, as AnovaRM), with the critical F at alpha."
        )
        if (gm.df1 > 1).any():
            text += (
                " For terms of more than one df the Greenhouse-Geisser (GG) and lower-bound "
                "(LB) p, which need no sphericity (GG is the one the verdict uses where it can "
                "be estimated, else LB)."
            )
        parts.append(text)
    if not an.omnibus.empty:
        parts.append("Friedman: blocked by seed, permutation p.")
    if not an.dispersion.empty:
        parts.append(
            "Spread: each seed's mean absolute deviation from the cell means, levels compared "
            "within seed."
        )
    if not an.correlations.empty:
        parts.append(
            "Spearman: configuration means (between), two-way residuals (within; n_eff = "
            "residual df + 1)."
        )
    parts.append(
        "Adjusted p: the analysis plan's correction, named; exploratory rows are uncorrected."
    )
    return " ".join(parts)
