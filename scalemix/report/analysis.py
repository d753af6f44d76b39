"""From the runs table to the report's numbers: data in, an ``Analysis`` out.

**The seed is the unit.** The cells of one seed share their random streams (model
initialisation, Poisson batches, augmentation: common random numbers), so a grid of
K configurations x n seeds holds n independent units measured K times, not n K
independent runs (docs/sharp-edges.md, "The randomness model"). Every interval, test,
count and figure is computed over seeds: a cell's runs (one per seed), a level's *seed
means* over the other axes (marginal views), each seed's difference (paired views), each
seed's spread, or the grid model (gridmodel.py), a repeated-measures ANOVA over seeds
whose error terms are the seed x term interactions. The effective n (seeds) is printed
with each.

``analyse`` assembles the report's numbers: per-cell summaries, the paired comparisons
(simple effects) and omnibus tests per stratum, the grid model, the plan's multiplicity
and verdicts (plan.py), and then the descriptive and exploratory parts: marginal means,
spread, scale mixing against accuracy, per-example evidence, variance components, power,
a sensitivity analysis for failed runs, and the findings in words (findings.py). The
estimators themselves are in stats.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scalemix.report import stats as st
from scalemix.report.findings import findings
from scalemix.report.gridmodel import (
    Block,
    axis_levels,
    complete_block,
    components,
    dispersion,
    equivalence_of_levels,
    grid_model,
    power_summary,
    term_key,
)
from scalemix.report.plan import METRIC_LABELS, ReportPlan, multiplicity

__all__ = [
    "SCALE_SUMMARY",
    "Analysis",
    "ReportPlan",
    "analyse",
    "marginal_means",
    "paired_family",
    "per_example_evidence",
    "privacy_settings",
    "scale_mixing_association",
    "sensitivity",
]

SCALE_SUMMARY = "final_log2_ratio"  # the one primary scale-mixing summary


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
    comparisons: pd.DataFrame  # one row per paired comparison
    omnibus: pd.DataFrame  # one row per omnibus test
    correlations: pd.DataFrame  # scale mixing vs accuracy: between / within configurations
    plan: ReportPlan = field(default_factory=ReportPlan)
    marginals: pd.DataFrame = field(default_factory=pd.DataFrame)  # seed means per level
    grid_model: pd.DataFrame = field(default_factory=pd.DataFrame)  # one model, every term
    block: Block | None = None
    power: dict = field(default_factory=dict)  # what the grid can resolve
    components: dict = field(default_factory=dict)  # variance components
    sensitivity: pd.DataFrame = field(default_factory=pd.DataFrame)  # failures as chance
    dispersion: pd.DataFrame = field(default_factory=pd.DataFrame)  # spread per axis level
    family_sizes: dict = field(default_factory=dict)
    grid_privacy: object = None  # privacy.grid.GridPrivacy, when the report has its dir
    findings: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def metric_label(self) -> str:
        return METRIC_LABELS.get(self.metric, self.metric)


def analyse(
    runs: pd.DataFrame,
    plan: dict,
    metric: str | None = None,
    grid_privacy=None,
    *,
    descriptive: bool = True,
) -> Analysis:
    """Every number of the report. ``metric`` overrides the plan's (tests only);
    ``grid_privacy`` is the grid's joint privacy (privacy.grid.grid_privacy_from_dir);
    ``descriptive=False`` stops after the primary tests and their verdicts (no marginal
    means, spread, correlations, resolution, findings: for simulations)."""
    grid = plan["grid"]
    axes = list(grid["axes"])
    rp = ReportPlan.from_plan(plan)
    if metric is not None:
        rp.metric = metric
    metric = rp.metric
    primary = rp.primary if rp.primary in axes else axes[0]
    rp.primary = primary
    paired_axis = rp.paired
    if paired_axis is not None and (
        paired_axis not in axes or len(axis_levels(plan, paired_axis)) != 2
    ):
        paired_axis = None
    runs = runs.copy()
    if metric not in runs:
        runs[metric] = math.nan
    done = runs[runs.status == "done"].copy()
    done[metric] = done[metric].astype(float)
    if len(done) and not np.isfinite(done[metric]).any():
        from scalemix.errors import ConfigError

        raise ConfigError(
            f"the analysis plan's metric is {METRIC_LABELS.get(metric, metric)}, but no finished "
            "run has it (runs without an EMA have no EMA accuracy); the plan is fixed: report "
            "on a grid whose runs keep an EMA"
        )
    done = done[np.isfinite(done[metric])]
    sesoi = rp.sesoi_frac
    others = [a for a in axes if a not in (primary, paired_axis)]

    comparisons = pd.DataFrame(
        simple_effects(done, plan, primary, paired_axis, others, metric, sesoi)
    )
    if not comparisons.empty:  # robustness, Holm over the comparisons' Wilcoxon tests
        comparisons["p_wilcoxon_holm"] = st.holm(comparisons["p_wilcoxon"].values)
    block = complete_block(done, axes, metric, plan)
    model = grid_model(block, rp.alpha, sesoi)
    questions = {term_key(q) for q in rp.questions}
    if not model.empty:
        model["primary"] = [term_key(t) in questions for t in model.term]
        missing = questions - {term_key(t) for t in model.term}
    else:
        missing = questions

    an = Analysis(
        grid=grid["name"],
        preset=grid.get("preset"),
        axes=axes,
        primary=primary,
        paired_axis=paired_axis,
        metric=metric,
        runs=runs,
        cells=cell_summaries(runs, axes, metric),
        comparisons=comparisons,
        omnibus=omnibus_tests(done, plan, axes, primary, metric, sesoi),
        correlations=pd.DataFrame(),
        plan=rp,
    )
    an.grid_model = model
    an.block = block
    an.grid_privacy = grid_privacy
    an.family_sizes = multiplicity(rp, an.grid_model, an.comparisons, an.omnibus)
    if not descriptive:
        return an
    an.correlations = scale_mixing_association(done, axes, metric, plan)
    an.marginals = marginal_means(runs, done, axes, metric, plan)
    an.dispersion = dispersion(block)
    if "run_dir" in runs:  # stored predictions of the plan's weights (raw or EMA)
        per_example_evidence(an, ema=metric == "test_acc_ema")
    test_size = done.test_size.dropna() if "test_size" in done else pd.Series(dtype=float)
    an.components = components(block, float(test_size.iloc[0]) if len(test_size) else None)
    an.power = power_summary(rp, an.grid_model, an.comparisons, an.family_sizes, runs, metric)
    an.sensitivity = sensitivity(runs, plan, axes, primary, paired_axis, others, metric)
    an.findings, an.warnings = findings(an)
    if paired_axis is None and rp.paired:
        an.warnings.append(
            f"The paired axis {rp.paired} has {len(axis_levels(plan, rp.paired))} levels "
            "in these runs, not two: it is analysed as an ordinary axis."
        )
    for q in sorted(missing, key=sorted):
        an.warnings.append(
            f"The primary question {' x '.join(sorted(q))!r} could not be tested (no model term)."
        )
    return an


def cell_summaries(runs: pd.DataFrame, axes: list, metric: str) -> pd.DataFrame:
    """One row per planned cell (its runs: one per seed): n, mean, SD across seeds with
    its chi-square 95 % interval (n - 1 df), the mean's t interval, IQM, the other
    weights' mean (descriptive), failed / diverged of planned, and the audit's largest
    lower bound on epsilon."""
    rows = []
    for key, g_all in runs.groupby(axes, sort=False, dropna=False):  # every planned cell
        key = key if isinstance(key, tuple) else (key,)
        g = g_all[g_all.status == "done"].copy()
        g[metric] = g[metric].astype(float)
        row = {**dict(zip(axes, key)), **st.describe(g[metric]).as_dict()}
        row["sd_low"], row["sd_high"] = (
            st.sd_interval(row["std"], row["n"] - 1) if row["n"] >= 2 else (math.nan, math.nan)
        )
        other = "test_acc_ema" if metric == "test_acc" else "test_acc"
        if other in g and g[other].notna().any():  # the other weights', descriptive
            row["other_mean"] = float(g[other].astype(float).mean())
        row["planned"] = len(g_all)
        row["failed"] = int((g_all.status == "failed").sum())
        row["diverged"] = int((g_all.status == "diverged").sum())
        row["divergence_rate"] = row["diverged"] / len(g_all)
        if "epsilon_lower_bound" in g and g.epsilon_lower_bound.notna().any():
            lb = g.epsilon_lower_bound.astype(float)
            row["eps_lower_bound_max"] = float(lb.max())  # the audit: largest over seeds
            row["eps_spent"] = float(g.epsilon_spent.astype(float).max())
        rows.append(row)
    return pd.DataFrame(rows)


def simple_effects(
    done: pd.DataFrame,
    plan: dict,
    primary: str,
    paired_axis: str | None,
    others: list,
    metric: str,
    sesoi: float | None = None,
) -> list[dict]:
    """The paired comparisons, matched on seed: the paired axis' second level against its
    first within each stratum of the other axes, or (no paired axis) each primary level
    against the first."""
    if paired_axis is not None:
        lo, hi = axis_levels(plan, paired_axis)
        return paired_family(
            done,
            paired_axis,
            [(lo, hi)],
            [primary, *others],
            f"{paired_axis}: {hi} vs {lo}",
            metric,
            sesoi,
        )
    levels = axis_levels(plan, primary)
    pairs = [(levels[0], lvl) for lvl in levels[1:]]
    return paired_family(
        done, primary, pairs, others, f"{primary}: each vs {levels[0]}", metric, sesoi
    )


def omnibus_tests(
    done: pd.DataFrame, plan: dict, axes: list, primary: str, metric: str, sesoi: float | None
) -> pd.DataFrame:
    """Across the primary axis within each level of the other axes, blocked by seed
    (stats.omnibus), with the equivalence of every pair of levels; none for a two-level
    axis (its paired comparisons are the test)."""
    omni = []
    strata = [a for a in axes if a != primary]
    groups = done.groupby(strata, sort=False, dropna=False) if strata else [((), done)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        by_level = {lvl: g[g[primary] == lvl][metric].values for lvl in axis_levels(plan, primary)}
        blocked = {
            lvl: dict(zip(g[g[primary] == lvl].seed, g[g[primary] == lvl][metric]))
            for lvl in by_level
        }
        if len(by_level) < 3:  # a two-level axis: its paired comparisons are the test
            continue
        res = st.omnibus(by_level, blocked)
        if res is not None:
            row = {**dict(zip(strata, key)), **res.__dict__}
            row["p_tost"] = equivalence_of_levels(blocked, sesoi)
            omni.append(row)
    return pd.DataFrame(omni)


def marginal_means(
    runs: pd.DataFrame, done: pd.DataFrame, axes: list, metric: str, plan: dict
) -> pd.DataFrame:
    """For each level of each axis: each seed's mean over the other axes (the seeds that
    ran every configuration at that level), and the t interval over those seed means.
    Pooling the runs instead would count one seed's correlated runs as independent."""
    rows = []
    for axis in axes:
        other = [a for a in axes if a != axis]
        for lvl in axis_levels(plan, axis):
            g = done[done[axis] == lvl]
            planned = runs[runs[axis] == lvl]
            if planned.empty:
                continue
            n_cfg = planned.groupby(other, dropna=False).ngroups if other else 1
            per_seed = g.groupby("seed")[metric].agg(["mean", "size"])
            full = per_seed[per_seed["size"] == n_cfg]
            s = st.describe(full["mean"].values)
            rows.append(
                {
                    "axis": axis,
                    "level": lvl,
                    "configurations": n_cfg,
                    "seeds": s.n,
                    "seeds_left_out": int(len(per_seed) - len(full)),
                    "seed_means": full["mean"].tolist(),
                    **{k: v for k, v in s.as_dict().items() if k != "n"},
                }
            )
    return pd.DataFrame(rows)


def per_example_evidence(an: Analysis, *, ema: bool = False) -> None:
    """For every paired comparison whose runs stored their test predictions: McNemar and a
    paired bootstrap over test examples (stats.per_example), as a second source of
    evidence beside the paired t test over seeds. Adds the ex_* columns in place."""
    from scalemix.report.collect import test_outcomes

    comp = an.comparisons
    if comp.empty:
        return
    dirs = an.runs.set_index("id").run_dir
    rows = []
    for _, r in comp.iterrows():
        pairs = []
        for a, b in zip(r.ids_a, r.ids_b):
            oa, ob = test_outcomes(dirs[a], ema=ema), test_outcomes(dirs[b], ema=ema)
            if oa is not None and ob is not None and np.array_equal(oa[1], ob[1]):
                pairs.append((oa[0] == oa[1], ob[0] == ob[1]))  # same test set, per example
        rows.append(st.per_example(*zip(*pairs)) if pairs else {})
    extra = pd.DataFrame(rows, index=comp.index)
    for c in extra.columns:
        comp[c] = extra[c]


def scale_mixing_association(done: pd.DataFrame, axes: list, metric: str, plan) -> pd.DataFrame:
    """Spearman between the final log2 scale ratio (mean over blocks) and accuracy, split
    into a between-configuration part (configuration means: n = configurations) and a
    within part: the two-way residuals of both (each run's value less its configuration's
    mean and its seed's mean, on the complete block), whose effective n is the residual
    df (configurations - 1)(seeds - 1) + 1; removing the seed's mean keeps one seed's
    shared pattern from counting once per configuration. Both exploratory."""
    if SCALE_SUMMARY not in done or done[SCALE_SUMMARY].isna().all():
        return pd.DataFrame()
    d = done[[*axes, "seed", SCALE_SUMMARY, metric]].dropna().copy()
    d[SCALE_SUMMARY] = d[SCALE_SUMMARY].astype(float)
    rows = []
    cells = d.groupby(axes, sort=False, dropna=False)[[SCALE_SUMMARY, metric]].mean()
    r = st.spearman(cells[SCALE_SUMMARY].values, cells[metric].values)
    if r is not None:
        rows.append({"summary": SCALE_SUMMARY, "part": "between configurations", **r.__dict__})
    bx = complete_block(d, axes, SCALE_SUMMARY, plan)
    by = complete_block(d, axes, metric, plan)
    if bx is not None and by is not None and bx.y.shape == by.y.shape:
        n = bx.y.shape[0]
        res = []
        for b in (bx, by):
            yy = b.y.reshape(n, -1)
            res.append(yy - yy.mean(axis=0) - yy.mean(axis=1, keepdims=True) + yy.mean())
        k = bx.y.reshape(n, -1).shape[1]
        r = st.spearman(res[0].ravel(), res[1].ravel(), df=(n - 1) * (k - 1))
        if r is not None:
            rows.append(
                {
                    "summary": SCALE_SUMMARY,
                    "part": "within configurations and seeds",
                    **r.__dict__,
                }
            )
    return pd.DataFrame(rows)


def sensitivity(runs, plan, axes, primary, paired_axis, others, metric) -> pd.DataFrame:
    """The paired comparisons again with every failed or diverged run counted as the
    worst outcome (chance accuracy) instead of being dropped."""
    bad = runs.status.isin(["failed", "diverged"])
    if not bad.any():
        return pd.DataFrame()
    r = runs.copy()
    classes = runs["num_classes"].dropna() if "num_classes" in runs else pd.Series(dtype=float)
    chance = 1.0 / float(classes.iloc[0]) if len(classes) else 0.1  # ten classes if unknown
    r[metric] = r[metric].astype(float)
    r.loc[bad, metric] = chance
    r.loc[bad, "status"] = "done"
    r = r[r.status == "done"].copy()
    if paired_axis is not None:
        lo, hi = axis_levels(plan, paired_axis)
        comps = paired_family(r, paired_axis, [(lo, hi)], [primary, *others], "sensitivity", metric)
    else:
        levels = axis_levels(plan, primary)
        comps = paired_family(
            r, primary, [(levels[0], lv) for lv in levels[1:]], others, "sensitivity", metric
        )
    out = pd.DataFrame(comps)
    if not out.empty:
        out["p_holm"] = st.holm(out.p_t.values)
    return out


def paired_family(
    done: pd.DataFrame,
    axis: str,
    pairs: list,
    strata: list[str],
    family: str,
    metric: str,
    sesoi: float | None = None,
) -> list[dict]:
    """Compare level b against level a of ``axis`` on shared seeds, within each stratum."""
    rows = []
    groups = done.groupby(strata, sort=False, dropna=False) if strata else [((), done)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        by_level = {}  # level -> {seed: (value, id)}
        for lvl, s, v, i in zip(g[axis], g["seed"], g[metric].astype(float), g["id"]):
            by_level.setdefault(lvl, {})[s] = (v, i)
        for lo, hi in pairs:
            a, b = by_level.get(lo, {}), by_level.get(hi, {})
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            va = np.array([a[s][0] for s in seeds])
            vb = np.array([b[s][0] for s in seeds])
            r = st.paired(va, vb, sesoi)
            rows.append(
                {
                    "diffs": (vb - va).tolist(),
                    "seeds": seeds,
                    "ids_a": [a[s][1] for s in seeds],
                    "ids_b": [b[s][1] for s in seeds],
                    "family_name": family,
                    axis: hi,
                    **dict(zip(strata, key)),
                    "a": f"{axis}={lo}",
                    "b": f"{axis}={hi}",
                    **r.as_dict(),
                }
            )
    return rows


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


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)
