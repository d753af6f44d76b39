"""From the runs table to the report's numbers and findings (all statistics in stats.py).

**The seed is the unit.** The cells of one seed share their random streams (model
initialisation, Poisson batches, augmentation: common random numbers), so a grid of
K configurations x n seeds holds n independent units measured K times, not n K
independent runs (docs/sharp-edges.md, "The randomness model"). Every interval, test, count and figure here is
computed over seeds: a cell's runs (one per seed), a level's *seed means* over the other
axes (marginal views), each seed's difference (paired views), each seed's spread, or the
grid model, a repeated-measures ANOVA over seeds whose error terms are the seed x term
interactions. The effective n (seeds) is printed with each.

**The analysis plan** is the grid's ``[report]`` table, fixed by its first ``ablate``
(ablate.store.fix_analysis_plan): the metric (final test accuracy of the raw or the EMA
weights, never a best epoch), the primary axis, an optional two-level paired axis, the
primary questions (grid-model terms), alpha, the correction (one report-wide Holm, or
gatekeeping families in a fixed order) and the smallest effect of interest (``sesoi``, in
points), against which every result that is not significant is read by an equivalence
test: "equivalent within +-sesoi" or "inconclusive", never "no effect".

The primary tests are the grid-model terms named in ``questions`` (family "interaction"
or "main effects") and the simple effects: the paired comparisons of the paired axis
within each stratum, or each primary level against the first, and the omnibus test across
the primary axis within each stratum (family "simple effects"). Everything else (the
other grid-model terms, spread, correlations, per-example evidence) is exploratory and
says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scalemix.report import stats as st

METRIC = "test_acc"
METRIC_LABELS = {
    "test_acc": "final test accuracy (raw weights)",
    "test_acc_ema": "final test accuracy (EMA weights)",
}
FAMILIES = ("interaction", "main effects", "simple effects")


@dataclass
class ReportPlan:
    """The analysis plan a report follows: the grid's [report] as fixed (or, for a grid
    made before plans were fixed, as grid.json holds it), and how it was fixed."""

    metric: str = METRIC
    primary: str | None = None
    paired: str | None = None
    questions: list = field(default_factory=list)
    alpha: float = st.ALPHA
    correction: str = "holm"
    order: list = field(default_factory=lambda: list(FAMILIES))
    sesoi: float | None = None  # accuracy points
    record: dict | None = None  # analysis-plan.json: hash, fixed, results_when_fixed, changes
    mismatch: bool = False  # grid.json's [report] differs from the fixed plan

    @classmethod
    def from_plan(cls, plan: dict) -> ReportPlan:
        from scalemix.ablate.grid import METRICS, normalise_report

        grid_rep = normalise_report((plan.get("grid") or {}).get("report") or {})
        record = plan.get("analysis_plan")
        rep = normalise_report(record["report"]) if record else grid_rep
        return cls(
            metric=METRICS[rep["metric"]],
            primary=rep.get("primary"),
            paired=rep.get("paired"),
            questions=list(rep.get("questions", [])),
            alpha=float(rep["alpha"]),
            correction=rep["correction"],
            order=list(rep["order"]),
            sesoi=rep["sesoi"],
            record=record,
            mismatch=bool(record) and grid_rep != rep,
        )

    @property
    def sesoi_frac(self) -> float | None:
        return None if self.sesoi is None else self.sesoi / 100

    def describe(self) -> list[str]:
        """The pre-registration block of the title page."""
        rec = self.record
        if rec is None:
            when = (
                "NOT FIXED: this grid was made before analysis plans were fixed; the plan "
                "below is grid.json's [report] as it stands, and may have been chosen with the "
                "results in view."
            )
        elif rec.get("results_when_fixed"):
            when = (
                f"fixed {rec['fixed']} (hash {rec['hash']}) AFTER {rec['results_when_fixed']} "
                "run(s) had results: it may have been chosen with the results in view."
            )
        else:
            when = f"fixed {rec['fixed']} (hash {rec['hash']}) before any run had a result."
        fam = (
            "one Holm over every primary test"
            if self.correction == "holm"
            else "gatekeeping: the families "
            + " -> ".join(self.order)
            + ", Holm within each; a family is tested only if every test of the one before "
            "it is significant"
        )
        lines = [
            "Analysis plan: " + when,
            f"- metric: {METRIC_LABELS.get(self.metric, self.metric)}; primary axis: "
            f"{self.primary}; paired axis: {self.paired or 'none'}",
            "- primary questions (grid-model terms): "
            + (", ".join(self.questions) or "none named")
            + "; with them the simple effects (paired comparisons, omnibus tests per stratum)",
            f"- alpha = {self.alpha:g}; correction: {fam}",
            "- smallest effect of interest: "
            + (
                f"{self.sesoi:g} accuracy point{'' if self.sesoi == 1 else 's'} (a result "
                "that is not significant is read "
                "by an equivalence test against it)"
                if self.sesoi
                else "not set: no result can be read as equivalence; "
                "a result that is not significant is inconclusive"
            ),
        ]
        for ch in (rec or {}).get("changes", []):
            after = ch.get("results_when_changed", 0)
            lines.append(
                f"- CHANGED {ch['time']}: {', '.join(ch.get('keys', []))} "
                + (
                    f"AFTER {after} run(s) had results (was: "
                    + "; ".join(f"{k} = {ch['from'].get(k)}" for k in ch.get("keys", []))
                    + ")"
                    if after
                    else "before any result (harmless)"
                )
                + (f" [{ch['note']}]" if ch.get("note") else "")
            )
        if self.mismatch:
            lines.append(
                "- grid.json's [report] differs from the fixed plan (edited by hand?): the "
                "fixed plan is followed."
            )
        return lines


@dataclass
class Block:
    """The complete block the seed-level analyses use: every configuration of the kept
    levels for every kept seed."""

    y: np.ndarray  # (seeds, levels of axis 1, ...)
    axes: list  # the axes in the model (those with two or more levels)
    levels: dict  # axis -> kept levels, in plan order
    seeds: list
    dropped_seeds: list
    dropped_levels: dict
    fixed: dict  # axes with a single level left (constant in the block)

    @property
    def note(self) -> str:
        parts = []
        if self.dropped_seeds:
            parts.append(
                f"seed(s) {', '.join(map(str, self.dropped_seeds))} left out (a run missing)"
            )
        for a, lv in self.dropped_levels.items():
            parts.append(f"{a} = {', '.join(map(str, lv))} left out (runs missing in every seed)")
        return "; ".join(parts)


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


def _levels(plan: dict, axis: str) -> list:
    return list(plan["grid"]["axes"][axis])


def _fmt_level(axis: str, v) -> str:
    return f"{axis}={v}"


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
        paired_axis not in axes or len(_levels(plan, paired_axis)) != 2
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

    # ---- per cell: its runs, one per seed
    rows = []
    for key, g_all in runs.groupby(axes, sort=False, dropna=False):  # every planned cell
        key = key if isinstance(key, tuple) else (key,)
        g = g_all[g_all.status == "done"].copy()
        g[metric] = g[metric].astype(float)
        row = {**dict(zip(axes, key)), **st.describe(g[metric]).as_dict()}
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
    cells = pd.DataFrame(rows)

    # ---- paired comparisons (simple effects), per stratum, matched on seed
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
            sesoi,
        )
    else:
        levels = _levels(plan, primary)
        pairs = [(levels[0], lvl) for lvl in levels[1:]]
        comps = _paired_family(
            done, primary, pairs, others, f"{primary}: each vs {levels[0]}", metric, sesoi
        )
    comparisons = pd.DataFrame(comps)
    if not comparisons.empty:  # robustness, Holm over the comparisons' Wilcoxon tests
        comparisons["p_wilcoxon_holm"] = st.holm(comparisons["p_wilcoxon"].values)

    # ---- omnibus across the primary axis (within each level of the other axes), by seed
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
        if len(by_level) < 3:  # a two-level axis: its paired comparisons are the test
            continue
        res = st.omnibus(by_level, blocked)
        if res is not None:
            row = {**dict(zip(strata, key)), **res.__dict__}
            row["p_tost"] = _equivalence_of_levels(blocked, sesoi)
            omni.append(row)
    omnibus = pd.DataFrame(omni)

    # ---- the grid model over seeds (complete blocks)
    block = complete_block(done, axes, metric, plan)
    model = grid_model(block, rp.alpha, sesoi)
    questions = {_term_key(q) for q in rp.questions}
    if not model.empty:
        model["primary"] = [_term_key(t) in questions for t in model.term]
        missing = questions - {_term_key(t) for t in model.term}
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
        cells=cells,
        comparisons=comparisons,
        omnibus=omnibus,
        correlations=pd.DataFrame(),
        plan=rp,
    )
    an.grid_model = model
    an.block = block
    an.grid_privacy = grid_privacy
    multiplicity(an)
    if not descriptive:
        return an
    an.correlations = scale_mixing_association(done, axes, metric, plan)
    an.marginals = marginal_means(runs, done, axes, metric, plan)
    an.dispersion = dispersion(block)
    if "run_dir" in runs:  # stored predictions of the plan's weights (raw or EMA)
        per_example_evidence(an, ema=metric == "test_acc_ema")
    an.components = components(an)
    an.power = power_summary(an)
    an.sensitivity = sensitivity(runs, plan, axes, primary, paired_axis, others, metric)
    an.findings, an.warnings = findings(an)
    if paired_axis is None and rp.paired:
        an.warnings.append(
            f"The paired axis {rp.paired} has {len(_levels(plan, rp.paired))} levels "
            "in these runs, not two: it is analysed as an ordinary axis."
        )
    for q in sorted(missing, key=sorted):
        an.warnings.append(
            f"The primary question {' x '.join(sorted(q))!r} could not be tested (no model term)."
        )
    return an


def _term_key(term: str) -> frozenset:
    """A grid-model term ("a", "a x b") as a set of axes: "b x a" is the same question."""
    return frozenset(t.strip() for t in str(term).split(" x "))


# ------------------------------------------------------------------ seed-level tables


def complete_block(done: pd.DataFrame, axes: list, metric: str, plan: dict) -> Block | None:
    """The largest complete block of the grid that keeps its questions: every seed that
    has a run in every configuration. Seeds are left out before levels (a left-out seed
    costs power, a left-out level changes the question); a level is left out only when
    fewer than two seeds would be complete, and then the level missing the most runs.
    Axes left with one level are constant in the block. None when no block of two seeds
    and two configurations remains (or the grid is not a full factorial of its levels)."""
    if done.empty:
        return None
    d = done[[*axes, "seed", metric]].dropna()
    levels = {a: [v for v in _levels(plan, a) if (d[a] == v).any()] for a in axes}
    dropped_levels: dict = {}
    while True:
        keep = np.ones(len(d), dtype=bool)
        for a in axes:
            keep &= d[a].isin(levels[a]).values
        dd = d[keep]
        n_cells = int(np.prod([len(levels[a]) for a in axes]))
        per_seed = dd.drop_duplicates(subset=[*axes, "seed"]).seed.value_counts()
        complete = sorted(per_seed[per_seed == n_cells].index)
        if len(complete) >= 2:
            break
        # leave out the level that misses the most runs (an axis keeps one level at least)
        best, best_missing = None, 0
        n_seeds = dd.seed.nunique()
        for a in axes:
            if len(levels[a]) < 2:
                continue
            for v in levels[a]:
                present = int((dd[a] == v).sum())
                missing = n_seeds * n_cells // len(levels[a]) - present
                if missing > best_missing:
                    best, best_missing = (a, v), missing
        if best is None:
            return None
        a, v = best
        levels[a] = [x for x in levels[a] if x != v]
        dropped_levels.setdefault(a, []).append(v)
    model_axes = [a for a in axes if len(levels[a]) >= 2]
    if not model_axes:
        return None
    dd = dd[dd.seed.isin(complete)]
    shape = [len(complete)] + [len(levels[a]) for a in model_axes]
    y = np.full(shape, np.nan)
    seed_ix = {s: i for i, s in enumerate(complete)}
    lvl_ix = {a: {v: i for i, v in enumerate(levels[a])} for a in model_axes}
    for _, r in dd.iterrows():
        y[(seed_ix[r.seed], *(lvl_ix[a][r[a]] for a in model_axes))] = float(r[metric])
    if np.isnan(y).any():
        return None
    all_seeds = sorted(d.seed.unique())
    return Block(
        y=y,
        axes=model_axes,
        levels={a: levels[a] for a in model_axes},
        seeds=complete,
        dropped_seeds=[s for s in all_seeds if s not in complete],
        dropped_levels=dropped_levels,
        fixed={a: levels[a][0] for a in axes if len(levels[a]) == 1},
    )


def marginal_means(
    runs: pd.DataFrame, done: pd.DataFrame, axes: list, metric: str, plan: dict
) -> pd.DataFrame:
    """For each level of each axis: each seed's mean over the other axes (the seeds that
    ran every configuration at that level), and the t interval over those seed means.
    Pooling the runs instead would count one seed's correlated runs as independent."""
    rows = []
    for axis in axes:
        other = [a for a in axes if a != axis]
        for lvl in _levels(plan, axis):
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


def _equivalence_of_levels(blocked: dict, sesoi: float | None) -> float:
    """Intersection-union equivalence (every pair of levels within +-sesoi, each by the
    paired TOST over the seeds both have): the largest TOST p, or nan."""
    if not sesoi:
        return math.nan
    lv = [k for k in blocked if blocked[k]]
    ps = []
    for i in range(len(lv)):
        for j in range(i + 1, len(lv)):
            seeds = sorted(set(blocked[lv[i]]) & set(blocked[lv[j]]))
            if len(seeds) < 2:
                return math.nan
            d = [blocked[lv[j]][s] - blocked[lv[i]][s] for s in seeds]
            ps.append(st.tost_paired(d, -sesoi, sesoi)[0])
    return max(ps) if ps else math.nan


def grid_model(block: Block | None, alpha: float = st.ALPHA, sesoi: float | None = None):
    """One model for the whole grid: a repeated-measures ANOVA over seeds of the complete
    block (stats.rm_anova: AnovaRM's F and p, each term against its own term x seed
    interaction), with Greenhouse-Geisser and lower-bound p for terms of more than one df,
    the critical F (and, for 1-df terms, the critical effect in points) at alpha, and for
    each term an equivalence test against +-sesoi where one is defined (1-df terms: TOST
    of the per-seed contrast; main effects: every pair of levels' seed means; two-way
    interactions with a two-level axis: every pair of its simple effects)."""
    if block is None or block.y.shape[0] < 2:
        return pd.DataFrame()
    y = block.y
    rows = st.rm_anova(y, block.axes, alpha)
    model = "repeated-measures ANOVA over seeds (seed as block; error: term x seed)" + (
        f"; complete block of {y.shape[0]} seeds: {block.note}" if block.note else ""
    )
    for r in rows:
        r["df"] = f"{r['df1']:g}, {r['df2']:g}"
        r["model"] = model
        r["p_tost"] = _term_equivalence(y, block.axes, r, sesoi)
    return pd.DataFrame(rows)


def _term_equivalence(y: np.ndarray, axes: list, row: dict, sesoi: float | None) -> float:
    if not sesoi:
        return math.nan
    if "effect_per_seed" in row:  # a 1-df term
        return st.tost_paired(row["effect_per_seed"], -sesoi, sesoi)[0]
    idx = [axes.index(a) for a in row["axes"]]
    n = y.shape[0]
    if len(idx) == 1:  # a main effect: every pair of the levels' seed means
        i = idx[0]
        m = np.moveaxis(y, i + 1, 1).reshape(n, y.shape[i + 1], -1).mean(axis=2)
    elif len(idx) == 2 and 2 in (y.shape[idx[0] + 1], y.shape[idx[1] + 1]):
        two = idx[0] if y.shape[idx[0] + 1] == 2 else idx[1]
        other = idx[1] if two == idx[0] else idx[0]
        z = np.moveaxis(y, (two + 1, other + 1), (1, 2))
        z = z.reshape(n, 2, y.shape[other + 1], -1).mean(axis=3)
        m = z[:, 1, :] - z[:, 0, :]  # each seed's simple effect at each level of the other
    else:
        return math.nan
    blocked = {j: dict(enumerate(m[:, j])) for j in range(m.shape[1])}
    return _equivalence_of_levels(blocked, sesoi)


# ------------------------------------------------------------------ the multiplicity plan


def multiplicity(an: Analysis) -> None:
    """Adjusted p-values and verdicts of the primary tests (in place): columns ``family``,
    ``p_adj``, ``adj`` (the correction, in words), ``tested`` and ``verdict``. Grid-model
    terms of more than one df enter with their Greenhouse-Geisser p (valid without
    sphericity). Holm: one family of every primary test. Gatekeeping (serial; Westfall &
    Krishen 2001): the families in the plan's order, Holm within each; a family is tested
    only if every test of the family before it is significant (strong control of the
    familywise error). Exploratory tests get p_adj = nan and adj "exploratory,
    uncorrected"."""
    rp = an.plan
    model, comp, omni = an.grid_model, an.comparisons, an.omnibus
    frames = {"model": model, "comp": comp, "omni": omni}
    if not model.empty:
        model["family"] = [
            ("interaction" if len(ax) > 1 else "main effects") if prim else "exploratory"
            for ax, prim in zip(model["axes"], model["primary"])
        ]
        # multi-df terms: Greenhouse-Geisser where it can be estimated, else the lower bound
        ok = model.get("gg_estimable", pd.Series(True, index=model.index)).astype(bool)
        model["p_verdict"] = np.where(
            model.df1 > 1, np.where(ok & np.isfinite(model.p_gg), model.p_gg, model.p_lb), model.p
        )
    cols = {"model": "p_verdict", "comp": "p_t", "omni": "p"}
    out = {  # per frame: p_adj, adj, tested, as lists
        k: ([math.nan] * len(f), ["exploratory, uncorrected"] * len(f), [True] * len(f))
        for k, f in frames.items()
    }
    entries = []  # (frame, position, family, p)
    if not model.empty:
        for i, (prim, fam, p) in enumerate(zip(model.primary, model.family, model.p_verdict)):
            if prim:
                entries.append(("model", i, fam, float(p)))
    for k in ("comp", "omni"):
        f = frames[k]
        if not f.empty:
            f["family"] = "simple effects"
            entries += [
                ("comp" if k == "comp" else "omni", i, "simple effects", float(p))
                for i, p in enumerate(f[cols[k]])
            ]
    m_all = int(sum(np.isfinite(p) for *_, p in entries))
    if rp.correction == "holm":
        for (k, i, _, _), pa in zip(entries, st.holm([p for *_, p in entries])):
            out[k][0][i], out[k][1][i] = pa, f"Holm over {m_all} primary tests"
        an.family_sizes = {"all primary tests": m_all}
    else:
        gate_open, sizes = True, {}
        for fam in rp.order:
            part = [e for e in entries if e[2] == fam]
            sizes[fam] = len(part)
            if not part:
                continue
            adj = st.holm([p for *_, p in part])
            m = int(sum(np.isfinite(p) for *_, p in part))
            for (k, i, _, _), pa in zip(part, adj):
                out[k][0][i] = pa if gate_open else math.nan
                out[k][2][i] = gate_open
                out[k][1][i] = (
                    f"Holm over {m} test(s) of family '{fam}'"
                    if gate_open
                    else f"not tested: gate closed before family '{fam}'"
                )
            gate_open = gate_open and all(pa < rp.alpha for pa in adj if not math.isnan(pa))
        for k, i, fam, _ in entries:  # a family the order leaves out is exploratory
            if fam not in rp.order:
                out[k][1][i] = "exploratory, uncorrected (not in the order)"
        an.family_sizes = sizes
    for k, f in frames.items():
        if f.empty:
            continue
        f["p_adj"], f["adj"], f["tested"] = out[k]
        tost = f["p_tost"] if "p_tost" in f else [math.nan] * len(f)
        f["verdict"] = [
            _verdict(pa, pr, pt, te, ad, rp)
            for pa, pr, pt, te, ad in zip(f.p_adj, f[cols[k]], tost, f.tested, f.adj)
        ]


def _verdict(p_adj, p_raw, p_tost, tested, adj, rp: ReportPlan) -> str:
    """ "effect", "equivalent", "inconclusive", "not tested" (a closed gate), or for an
    exploratory test "effect (exploratory)" / "equivalent" / "inconclusive"."""
    exploratory = str(adj).startswith("exploratory")
    if not tested:
        return "not tested"
    p = p_raw if exploratory else p_adj
    if isinstance(p, float) and math.isnan(p):
        return "not testable"
    if p < rp.alpha:
        return "effect (exploratory)" if exploratory else "effect"
    if isinstance(p_tost, float) and not math.isnan(p_tost) and p_tost < rp.alpha:
        return "equivalent"
    return "inconclusive"


def _points(x: float) -> str:
    return f"{x:g} point" + ("" if x == 1 else "s")


def verdict_words(verdict: str, rp: ReportPlan) -> str:
    """A verdict in words; "not significant" is never written as "no effect"."""
    if verdict == "equivalent":
        return f"is within ±{_points(rp.sesoi)} of zero (equivalence shown by TOST)"
    if verdict == "inconclusive":
        return "is inconclusive: not significant, and " + (
            f"not shown by TOST to be within ±{_points(rp.sesoi)} of zero"
            if rp.sesoi
            else "the plan sets no smallest effect of interest to test equivalence against"
        )
    return {
        "effect": "has an effect",
        "effect (exploratory)": "may have an effect (exploratory)",
        "not tested": "was not tested (its gate was closed)",
        "not testable": "is not testable",
    }.get(verdict, verdict)


# ------------------------------------------------------------------ exploratory analyses


def dispersion(block: Block | None) -> pd.DataFrame:
    """Spread across seeds per level of each axis, with the seed as the unit: each seed's
    mean absolute deviation from the cell means over the level's configurations, the
    levels compared within seed by a repeated-measures ANOVA (a paired t test for two
    levels; a seed-level Levene test, exploratory and uncorrected). Each run's deviation
    from its own cell's median (Brown-Forsythe) counted one seed's shared pattern once
    per cell and, at an odd number of seeds, put a structural zero in every cell. Also
    each level's pooled SD across seeds (descriptive)."""
    if block is None or block.y.shape[0] < 3:
        return pd.DataFrame()
    y = block.y
    n = y.shape[0]
    dev = np.abs(y - y.mean(axis=0, keepdims=True))
    rows = []
    for i, axis in enumerate(block.axes):
        k = y.shape[i + 1]
        z = np.moveaxis(dev, i + 1, 1).reshape(n, k, -1).mean(axis=2)  # (seeds, levels)
        var = np.moveaxis(y, i + 1, 1).reshape(n, k, -1).var(axis=0, ddof=1).mean(axis=1)
        if np.ptp(z) == 0:
            continue
        r = st.rm_anova(z, [axis])[0]
        rows.append(
            {
                "axis": axis,
                "F": r["F"],
                "p": r["p"],
                "p_gg": r["p_gg"],
                "df": f"{r['df1']:g}, {r['df2']:g}",
                "n_seeds": n,
                "pooled_sd": {
                    str(lv): float(math.sqrt(v)) for lv, v in zip(block.levels[axis], var)
                },
                "mad_per_seed": {
                    str(lv): z[:, j].tolist() for j, lv in enumerate(block.levels[axis])
                },
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


SCALE_SUMMARY = "final_log2_ratio"  # the one primary scale-mixing summary


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


# ------------------------------------------------------------------ what the grid resolves


def components(an: Analysis) -> dict:
    """Variance components of the metric (accuracy points squared) on the complete block:
    seed, residual (seed x configuration, with the test set's binomial noise inside), and
    the return of more seeds against a larger test set for a paired difference's SE."""
    b = an.block
    if b is None:
        return {}
    y = 100 * b.y.reshape(b.y.shape[0], -1)
    runs = an.runs[an.runs.status == "done"]
    test_var = None
    if "test_size" in runs and runs.test_size.notna().any():
        nt = float(runs.test_size.dropna().iloc[0])
        p = b.y.ravel()
        test_var = float(np.mean(p * (1 - p)) / nt) * 1e4
    out = st.variance_components(y, test_var)
    if not out:
        return out
    n = y.shape[0]
    res = out["residual"]
    out["se_paired_now"] = math.sqrt(2 * res / n)
    out["se_paired_2x_seeds"] = math.sqrt(2 * res / (2 * n))
    if test_var is not None:
        out["se_paired_4x_test"] = math.sqrt(2 * (res - 0.75 * out["test_set"]) / n)
    return out


def power_summary(an: Analysis) -> dict:
    """What the grid can resolve: the test set's binomial error per run; for the primary
    term (the first 1-df question, else the paired comparisons), the SD of its per-seed
    contrast, with its chi-square interval, and at the plan's own alpha as corrected
    (Holm's first step: alpha / family size; the family's under gatekeeping) the smallest
    effect detectable with 80 % power at these seeds and the seeds needed for 1 point,
    0.5 point and the smallest effect of interest, each with the range the SD's
    interval implies."""
    out: dict = {}
    rp = an.plan
    runs = an.runs[an.runs.status == "done"]
    n_test = runs.get("test_size")
    if n_test is not None and n_test.notna().any() and len(runs):
        p = float(runs[an.metric].astype(float).mean())
        nt = float(n_test.dropna().iloc[0])
        out["test_size"] = int(nt)
        out["binomial_se_points"] = 100 * math.sqrt(p * (1 - p) / nt)
    gm = an.grid_model
    term = None
    if not gm.empty and "effect_sd" in gm:
        cand = gm[gm.primary & gm.effect_sd.notna()] if "primary" in gm else gm[:0]
        if cand.empty:
            cand = gm[gm.effect_sd.notna()]
        if not cand.empty:
            term = cand.iloc[0]
    if term is not None:
        sd, n = float(term.effect_sd), int(term.n_seeds)
        out["term"] = term.term
        out["sd_source"] = f"the per-seed contrast of {term.term} (the grid model's error)"
        fam = term.get("family", "exploratory")
    else:
        comp = an.comparisons
        if comp.empty or "diffs" not in comp:
            return out
        sds = [np.std(d, ddof=1) for d in comp.diffs if len(d) >= 2]
        if not sds:
            return out
        sd = float(math.sqrt(np.mean(np.square(sds))))
        n = int(comp.n.median())
        out["term"] = "the paired comparisons"
        out["sd_source"] = "the paired differences within strata (pooled)"
        fam = "simple effects"
    if rp.correction == "holm":
        m = an.family_sizes.get("all primary tests", 1) if fam != "exploratory" else 1
    else:
        m = an.family_sizes.get(fam, 1) if fam != "exploratory" else 1
    m = max(1, int(m))
    alpha = rp.alpha / m
    out.update(paired_sd_points=100 * sd, seeds=n, alpha=alpha, family_size=m)
    if not sd > 0 or n < 2:
        return out
    lo, hi = st.sd_interval(sd, n - 1)
    out["sd_low_points"], out["sd_high_points"] = 100 * lo, 100 * hi
    out["mde_points"] = 100 * sd * st.detectable_effect(n, alpha)
    targets = [1.0, 0.5] + ([rp.sesoi] if rp.sesoi and rp.sesoi not in (1.0, 0.5) else [])
    for pts in targets:
        out[f"seeds_for_{pts:g}_point"] = st.seeds_needed((pts / 100) / sd, alpha)
        out[f"seeds_for_{pts:g}_point_range"] = (
            st.seeds_needed((pts / 100) / lo, alpha),
            st.seeds_needed((pts / 100) / hi, alpha),
        )
    return out


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
        lo, hi = _levels(plan, paired_axis)
        comps = _paired_family(
            r, paired_axis, [(lo, hi)], [primary, *others], "sensitivity", metric
        )
    else:
        levels = _levels(plan, primary)
        comps = _paired_family(
            r, primary, [(levels[0], lv) for lv in levels[1:]], others, "sensitivity", metric
        )
    out = pd.DataFrame(comps)
    if not out.empty:
        out["p_holm"] = st.holm(out.p_t.values)
    return out


def _paired_family(
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
                    "a": _fmt_level(axis, lo),
                    "b": _fmt_level(axis, hi),
                    **r.as_dict(),
                }
            )
    return rows


# ------------------------------------------------------------------ findings


def _pts(x: float) -> str:
    return f"{100 * x:+.1f} points"


def _pv(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _adj_text(r) -> str:
    """ "Holm-adjusted p = 0.82 (Holm over 9 primary tests)" or why there is none."""
    adj = str(r.get("adj", ""))
    if adj.startswith("exploratory"):
        return "exploratory, uncorrected"
    if adj.startswith("not tested"):
        return adj
    return f"adjusted p = {_pv(r.get('p_adj'))} ({adj})"


def findings(an: Analysis) -> tuple[list[str], list[str]]:
    out, warn = [], []
    rp = an.plan
    alpha = rp.alpha
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
            f"{n_bad} of {len(runs)} runs failed or diverged: the tables count them per cell, "
            "and the sensitivity analysis scores them as chance accuracy (complete-case "
            "statistics alone make a configuration that diverges more often look better)."
        )
    empty = cells[cells.n == 0] if not cells.empty else cells
    for _, c in empty.iterrows():
        where = ", ".join(f"{a}={c[a]}" for a in an.axes)
        warn.append(
            f"Cell {where} has no finished run ({c['failed']} failed, {c['diverged']} diverged)."
        )
    if n_done < len(runs) - n_bad:
        warn.append(f"{len(runs) - n_bad - n_done} runs are not finished; this report is partial.")
    if an.block is not None and an.block.note:
        warn.append(
            f"The seed-level analyses (grid model, spread, variance components) use a complete "
            f"block of {len(an.block.seeds)} seeds: {an.block.note}."
        )
    if not cells.empty and cells["mean"].notna().any():
        best = cells.sort_values("mean", ascending=False).iloc[0]
        label = ", ".join(f"{a}={best[a]}" for a in an.axes)
        cut = " (cut at 100 %)" if best.get("ci_cut") in ("high", "both") else ""
        out.append(
            f"Highest mean {an.metric_label}: {100 * best['mean']:.1f} % at {label} (95 % t CI "
            f"over {int(best['n'])} seeds {100 * best['ci_low']:.1f}-{100 * best['ci_high']:.1f}"
            f"{cut}). Chosen on the test set (the grid has no validation split): as an "
            "estimate of the chosen configuration's accuracy it is biased upwards, the more "
            "so the more configurations it was chosen from."
        )
        seeds = int(cells["n"].max())
        if (w := st.too_few(seeds, alpha)) is not None:
            warn.append(f"Too few seeds to conclude: {w}.")
    gm = an.grid_model
    for _, r in gm.iterrows() if not gm.empty else []:
        if not isinstance(r.p, float) or math.isnan(r.p):
            continue
        out.append(_term_finding(an, r))
    comp = an.comparisons
    if not comp.empty:
        for fam, g in comp.groupby("family_name", sort=False):
            k = len(g)
            up = int((g.mean_diff > 0).sum())
            top = g.sort_values("mean_diff", ascending=False).iloc[0]
            where = _where(top, an, exclude=(an.paired_axis,) if an.paired_axis else ())
            seeds_won, seeds_all = int(g.wins.sum()), int(g.n.sum())
            if g.b.nunique() == 1:  # one treatment compared within strata
                text = (
                    f"Simple effects ({fam}, matched on seed): {top['b']} had the higher mean in "
                    f"{up} of {k} strata; "
                )
            else:  # each level against the baseline
                text = f"Simple effects ({fam}, matched on seed): {up} of {k} levels had the higher mean; "
            text += (
                f"it won {seeds_won} of {seeds_all} seed-matched pairs (these pairs share "
                "seeds across strata: not independent). The largest difference, "
                f"{_pts(top.mean_diff)} at {where} (95 % paired-t CI {_pts(top.ci_low)} to "
                f"{_pts(top.ci_high)}, n = {int(top.n)} seeds, seeds won {int(top.wins)}/"
                f"{int(top.n)}, exact 95 % CI of the paired P(improvement) "
                f"{top.win_low:.2f}-{top.win_high:.2f}), "
            )
            if top.n < 2 or math.isnan(top.p_t):
                text += f"is not testable (n = {int(top.n)})."
            else:
                text += (
                    f"{verdict_words(top.verdict, rp)} (p = {_pv(top.p_t)} uncorrected, "
                    f"{_adj_text(top)}"
                    + (
                        f"; TOST p = {_pv(top.p_tost)} against ±{_points(rp.sesoi)}"
                        if rp.sesoi
                        else ""
                    )
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
    om = an.omnibus
    for _, r in om.iterrows() if not om.empty else []:
        where = ", ".join(f"{a}={r[a]}" for a in an.axes if a != an.primary and a in r)
        out.append(
            f"Across {an.primary} ({r.levels} levels, {r.blocks} seeds"
            f"{', ' + where if where else ''}), accuracy {verdict_words(r.verdict, rp)} "
            f"({r.test}, p = {_pv(r.p)} uncorrected, {_adj_text(r)}"
            + (
                f"; every pair of levels within ±{_points(rp.sesoi)}: TOST p = {_pv(r.p_tost)}"
                if rp.sesoi
                else ""
            )
            + ")."
        )
    disp = an.dispersion
    for _, r in disp.iterrows() if not disp.empty else []:
        sds = ", ".join(f"{k}: {100 * v:.2f}" for k, v in r.pooled_sd.items())
        verdict = "differs" if r.p < alpha else "is inconclusive (not significant)"
        gg = f", Greenhouse-Geisser p = {_pv(r.p_gg)}" if np.isfinite(r.p_gg) else ""
        out.append(
            f"Spread across seeds by {r.axis} (pooled SD in points: {sds}) {verdict}: seed-level "
            f"test of each seed's mean absolute deviation, F = {r.F:.3g}, df {r.df}, "
            f"n = {r.n_seeds} seeds, p = {_pv(r.p)} uncorrected{gg} (exploratory)."
        )
    co = an.correlations
    for _, r in co.iterrows() if not co.empty else []:
        strength = "an association" if r.p < alpha else "an inconclusive result (not significant)"
        out.append(
            f"Scale mixing and accuracy ({r.part}; exploratory): {strength} between the final "
            f"log2 scale ratio and accuracy (Spearman rho = {r.rho:+.2f}, 95 % CI "
            f"{r.ci_low:+.2f} to {r.ci_high:+.2f}, effective n = {r.n}, p = {_pv(r.p)} "
            "uncorrected); a correlation, not a cause."
        )
    if "ex_p_mcnemar" in comp and comp.ex_p_mcnemar.notna().any():
        ex = comp[comp.ex_p_mcnemar.notna()]
        top = ex.loc[ex.ex_diff.abs().idxmax()]
        out.append(
            f"Per test example (second source of evidence; the trained models held fixed; "
            f"exploratory): {int((ex.ex_p_mcnemar < alpha).sum())} of {len(ex)} comparisons "
            f"differ by McNemar's exact test at {alpha:g} (uncorrected; the test pools each "
            f"seed's pairs, so every test example counts once per seed and the pairs are not "
            f"independent); the largest, {top['b']} vs "
            f"{top['a']} at {_where(top, an, exclude=(an.paired_axis,) if an.paired_axis else ())}, "
            f"{_pts(top.ex_diff)} (95 % bootstrap over {int(top.ex_examples)} test examples "
            f"{100 * top.ex_ci_low:+.1f} to {100 * top.ex_ci_high:+.1f}, McNemar p = "
            f"{_pv(top.ex_p_mcnemar)} uncorrected). This is about these trained models on this "
            "test set; whether the configuration wins again with new seeds is the paired t "
            "test's question."
        )
    elif "run_dir" in runs and not comp.empty:
        out.append(
            "Per test example: not compared, because the runs did not store the test "
            "predictions of the plan's weights"
            + (
                " (EMA predictions are stored from scalemix 2026-12 on)."
                if an.metric != "test_acc"
                else "."
            )
        )
    out.extend(_resolution(an))
    out.extend(privacy_findings(an))
    sens = an.sensitivity
    if not sens.empty:
        changed = None  # comparable row by row only when no comparison was lost
        if len(sens) == len(an.comparisons):
            verdicts = (
                (sens.p_holm < alpha).values,
                (an.comparisons.verdict == "effect").values,
            )
            changed = int((verdicts[0] != verdicts[1]).sum())
        out.append(
            "Sensitivity: with failed and diverged runs counted as chance accuracy, "
            f"{int((sens.p_holm < alpha).sum())} of {len(sens)} comparisons are significant "
            "(Holm over the comparisons)"
            + (
                f"; {changed} verdict(s) differ from the main analysis"
                if changed is not None
                else ""
            )
            + "."
        )
    return out, warn


def _term_finding(an: Analysis, r) -> str:
    rp = an.plan
    role = "a primary question" if r.primary else "exploratory"
    text = f"Grid model ({role}): {r.term} {verdict_words(r.verdict, rp)}"
    parts = []
    if "effect" in r and isinstance(r.get("effect"), float) and not math.isnan(r.effect):
        parts.append(
            f"effect {_pts(r.effect)}, 95 % CI {_pts(r.effect_low)} to {_pts(r.effect_high)} "
            f"over {int(r.n_seeds)} seeds"
        )
    parts.append(f"F({r.df}) = {r.F:.3g}, p = {_pv(r.p)} uncorrected (sphericity assumed)")
    if r.df1 > 1 and r.get("gg_estimable", True):
        parts.append(
            f"Greenhouse-Geisser p = {_pv(r.p_gg)} (epsilon {r.eps_gg:.2f}), lower bound "
            f"p = {_pv(r.p_lb)}"
        )
    elif r.df1 > 1:
        parts.append(
            f"Greenhouse-Geisser p = {_pv(r.p_gg)} (epsilon {r.eps_gg:.2f}, not estimable "
            f"from {int(r.n_seeds)} seeds for {int(r.df1)} df: capped at "
            f"{(r.n_seeds - 1) / r.df1:.2f}), lower bound p = {_pv(r.p_lb)} (used for the "
            "verdict)"
        )
    parts.append(_adj_text(r))
    # the level a lone effect must pass: the plan's alpha, over the family for Holm's first
    # step (the same level the power finding uses)
    from scipy import stats as st_scipy

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
        parts.append(f"equivalence within ±{_points(rp.sesoi)}: TOST p = {_pv(r.p_tost)}")
    return text + " (" + "; ".join(parts) + ")."


def _resolution(an: Analysis) -> list[str]:
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
                    f"; {pts} point{'s' if pts != '1' else ''} needs {_n(val)} seeds "
                    f"({_n(lo)} to {_n(hi)} over the SD's interval)"
                )
        out.append(text + ".")
    return out


def _n(v) -> str:
    return "> 10^7" if v is None else f"{v:,}"


def privacy_findings(an: Analysis) -> list[str]:
    """The privacy of the grid as a whole (privacy.grid), and what choosing a cell costs."""
    gp = an.grid_privacy
    if gp is None:
        return []
    text = str(getattr(gp, "text", "") or "")
    return [
        f"Privacy of the whole grid: {text}" if text else "Privacy of the whole grid: unknown.",
        SELECTION_ADVICE,
    ]


SELECTION_ADVICE = (
    "Choosing among models trained on private data costs privacy whatever data scores the "
    "choice (a public validation set included): the choice is a function of every model, so "
    "it is covered only by the grid's joint guarantee, not by one run's epsilon. To spend one "
    "run's budget, tune on public or proxy data and train once privately, or use a DP tuning "
    "procedure (e.g. Papernot & Steinke 2022: a random number of runs, only the best released)."
)


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
