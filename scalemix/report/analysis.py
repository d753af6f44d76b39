"""From the runs table to the report's numbers and findings (all statistics in stats.py).

The metric is the final test accuracy of each run (never the best epoch). The grid's
``[report]`` table names the ``primary`` axis (many-valued: omnibus test, x axis) and
optionally a two-level ``paired`` axis compared on shared seeds at each primary value.
Without a paired axis, each primary level is compared with the first listed (the
baseline). Each family of comparisons is Holm-corrected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from scalemix.report import stats as st

METRIC = "test_acc"


@dataclass
class Analysis:
    grid: str
    preset: str | None
    axes: list[str]
    primary: str
    paired_axis: str | None
    metric: str
    runs: pd.DataFrame
    cells: pd.DataFrame  # one row per axes combination: n, mean, std, ci, iqm
    comparisons: pd.DataFrame  # one row per paired comparison (Holm within the family)
    omnibus: pd.DataFrame  # one row per omnibus test
    correlations: pd.DataFrame  # scale-mixing summaries vs accuracy
    findings: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _levels(plan: dict, axis: str) -> list:
    return list(plan["grid"]["axes"][axis])


def _fmt_level(axis: str, v) -> str:
    return f"{axis}={v}"


def analyse(runs: pd.DataFrame, plan: dict, metric: str = METRIC) -> Analysis:
    grid = plan["grid"]
    axes = list(grid["axes"])
    rep = grid.get("report") or {}
    primary = rep.get("primary") or axes[0]
    paired_axis = rep.get("paired")
    if paired_axis is not None and (
        paired_axis not in axes or len(_levels(plan, paired_axis)) != 2
    ):
        paired_axis = None
    done = runs[runs.status == "done"].copy()
    done[metric] = done[metric].astype(float)

    # ---- per cell
    rows = []
    for key, g in done.groupby(axes, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = {**dict(zip(axes, key)), **st.describe(g[metric]).as_dict()}
        if "epsilon_lower_bound" in g and g.epsilon_lower_bound.notna().any():
            lb = g.epsilon_lower_bound.astype(float)
            row["eps_lower_bound_max"] = float(lb.max())  # the audit: largest over seeds
            row["eps_spent"] = float(g.epsilon_spent.astype(float).max())
        rows.append(row)
    cells = pd.DataFrame(rows)

    # ---- paired comparisons
    others = [a for a in axes if a not in (primary, paired_axis)]
    if paired_axis is not None:
        lo, hi = _levels(plan, paired_axis)
        comps = _paired_family(
            done,
            paired_axis,
            [(lo, hi)],
            [primary, *others],
            f"{paired_axis}: {hi} vs {lo}",
            metric,
        )
    else:
        levels = _levels(plan, primary)
        pairs = [(levels[0], lvl) for lvl in levels[1:]]
        comps = _paired_family(
            done, primary, pairs, others, f"{primary}: each vs {levels[0]}", metric
        )
    comparisons = pd.DataFrame(comps)
    if not comparisons.empty:
        for idx in comparisons.groupby("family").groups.values():
            comparisons.loc[idx, "p_holm"] = st.holm(comparisons.loc[idx, "p_t"].values)

    # ---- omnibus across the primary axis (within each level of the other axes)
    omni = []
    strata = [a for a in axes if a != primary]
    groups = done.groupby(strata, sort=False, dropna=False) if strata else [((), done)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        by_level = {lvl: g[g[primary] == lvl][metric].values for lvl in _levels(plan, primary)}
        blocked = {
            lvl: dict(zip(g[g[primary] == lvl].seed, g[g[primary] == lvl][metric]))
            for lvl in by_level
        }
        res = st.omnibus(by_level, blocked)
        if res is not None:
            omni.append({**dict(zip(strata, key)), **res.__dict__})
    omnibus = pd.DataFrame(omni)
    if not omnibus.empty:
        omnibus["p_holm"] = st.holm(omnibus["p"].values)

    # ---- scale mixing vs accuracy
    corr = []
    diag_cols = [c for c in done.columns if c.startswith(("final_log2_ratio", "mean_log2_ratio"))]
    for col in diag_cols:
        r = st.spearman(done[col].astype(float), done[metric])
        if r is not None:
            corr.append({"summary": col, **r.__dict__})
    correlations = pd.DataFrame(corr)
    if not correlations.empty:
        correlations["p_holm"] = st.holm(correlations["p"].values)

    an = Analysis(
        grid=grid["name"],
        preset=grid.get("preset"),
        axes=axes,
        primary=primary,
        paired_axis=paired_axis,
        metric=metric,
        runs=runs,
        cells=cells,
        comparisons=comparisons,
        omnibus=omnibus,
        correlations=correlations,
    )
    an.findings, an.warnings = findings(an)
    return an


def _paired_family(
    done: pd.DataFrame, axis: str, pairs: list, strata: list[str], family: str, metric: str
) -> list[dict]:
    """Compare level b against level a of ``axis`` on shared seeds, within each stratum."""
    rows = []
    groups = done.groupby(strata, sort=False, dropna=False) if strata else [((), done)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        for lo, hi in pairs:
            a = g[g[axis] == lo].set_index("seed")[metric]
            b = g[g[axis] == hi].set_index("seed")[metric]
            seeds = sorted(set(a.index) & set(b.index))
            if not seeds:
                continue
            r = st.paired(a[seeds].values, b[seeds].values)
            rows.append(
                {
                    "family": family,
                    axis: hi,
                    **dict(zip(strata, key)),
                    "a": _fmt_level(axis, lo),
                    "b": _fmt_level(axis, hi),
                    **r.as_dict(),
                }
            )
    return rows


def _pts(x: float) -> str:
    return f"{100 * x:+.1f} points"


def findings(an: Analysis) -> tuple[list[str], list[str]]:
    out, warn = [], []
    runs, cells = an.runs, an.cells
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
    if "epsilon_lower_bound" in runs and runs.epsilon_lower_bound.notna().any():
        lb = runs.epsilon_lower_bound.astype(float)
        out.append(
            f"Privacy audit: the largest one-run lower bound on epsilon is {lb.max():.2f} "
            f"(median {lb.median():.2f}) against an accountant's epsilon of at most "
            f"{runs.epsilon_spent.astype(float).max():.2f}; a lower bound is what an attacker "
            "demonstrably gets, the accountant's epsilon what the proof promises."
        )
    n_done = int((runs.status == "done").sum())
    n_bad = int(runs.status.isin(["failed", "diverged"]).sum())
    if n_bad:
        warn.append(
            f"{n_bad} of {len(runs)} runs failed or diverged; they are left out of every statistic "
            "(a configuration that diverges more often looks better than it is)."
        )
    if n_done < len(runs) - n_bad:
        warn.append(f"{len(runs) - n_bad - n_done} runs are not finished; this report is partial.")
    if not cells.empty:
        best = cells.sort_values("mean", ascending=False).iloc[0]
        label = ", ".join(f"{a}={best[a]}" for a in an.axes)
        out.append(
            f"Best mean accuracy: {100 * best['mean']:.1f} % at {label} "
            f"(95 % CI {100 * best['ci_low']:.1f}-{100 * best['ci_high']:.1f}, n = {int(best['n'])})."
        )
        seeds = int(cells["n"].min())
        if (w := st.too_few(seeds)) is not None:
            warn.append(f"Too few seeds to conclude: {w}.")
    comp = an.comparisons
    if not comp.empty:
        for fam, g in comp.groupby("family", sort=False):
            k = len(g)
            up = int((g.mean_diff > 0).sum())
            sig = g[g.p_holm < st.ALPHA]
            top = g.sort_values("mean_diff", ascending=False).iloc[0]
            where = _where(top, an, exclude=(an.paired_axis,) if an.paired_axis else ())
            b_label = top["b"]
            if g.b.nunique() == 1:  # one treatment compared within strata
                text = f"{b_label} raised accuracy in {up} of {k} comparisons ({fam}); "
            else:  # each level against the baseline
                text = f"Against {top['a']}, {up} of {k} levels raised accuracy; "
            text += f"the largest gain, {_pts(top.mean_diff)} at {where}, "
            if top.p_holm < st.ALPHA:
                text += f"holds after Holm correction (p = {top.p_holm:.3g})."
            else:
                text += f"does not hold after Holm correction (p = {top.p_holm:.3g})."
            out.append(text)
            if len(sig):
                worse = sig[sig.mean_diff < 0]
                out.append(
                    f"{len(sig)} of {k} differences are significant at {st.ALPHA} after Holm correction"
                    + (f", {len(worse)} of them losses." if len(worse) else ".")
                )
            else:
                out.append(
                    f"None of the {k} differences is significant at {st.ALPHA} after Holm correction."
                )
    om = an.omnibus
    for _, r in om.iterrows() if not om.empty else []:
        where = ", ".join(f"{a}={r[a]}" for a in an.axes if a != an.primary and a in r)
        verdict = "differs" if r.p_holm < st.ALPHA else "shows no detectable difference"
        out.append(
            f"Across {an.primary} ({r.levels} levels{', ' + where if where else ''}), accuracy {verdict} "
            f"({r.test}, p = {r.p:.3g}, Holm {r.p_holm:.3g})."
        )
    co = an.correlations
    if not co.empty:
        main = co[co.summary == "final_log2_ratio"]
        r = main.iloc[0] if not main.empty else co.iloc[0]
        strength = "" if r.p_holm < st.ALPHA else "no reliable "
        out.append(
            f"Scale mixing and accuracy: {strength}association between the {r.summary.replace('_', ' ')} "
            f"and accuracy (Spearman rho = {r.rho:+.2f}, 95 % CI {r.ci_low:+.2f} to {r.ci_high:+.2f}, "
            f"n = {r.n}, Holm p = {r.p_holm:.3g}); a correlation across configurations, not a cause."
        )
    return out, warn


def _where(row, an: Analysis, exclude=()) -> str:
    parts = [
        f"{a} = {row[a]}" for a in an.axes if a not in exclude and a in row and not _isnan(row[a])
    ]
    return ", ".join(parts) or "all"


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def privacy_settings(runs: pd.DataFrame) -> dict:
    """Each privacy field: its single value, or the sorted distinct values across runs."""
    done = runs[runs.status == "done"]
    out = {}
    for k in (
        "epsilon_spent",
        "delta",
        "accountant",
        "sampler",
        "noise",
        "sigma",
        "clip",
        "expected_batch_size",
    ):
        vals = [v for v in done[k].tolist() if v is not None and not _isnan(v)] if k in done else []
        uniq = sorted({float(f"{v:.5g}") if isinstance(v, float) else v for v in vals})
        out[k] = uniq[0] if len(uniq) == 1 else uniq
    return out
