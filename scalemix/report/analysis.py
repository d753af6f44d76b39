"""From the runs table to the report's numbers and findings (all statistics in stats.py).

The metric is the final test accuracy of each run (never the best epoch). The grid's
``[report]`` table names the ``primary`` axis (many-valued: omnibus test, x axis) and
optionally a two-level ``paired`` axis compared on shared seeds at each primary value.
Without a paired axis, each primary level is compared with the first listed (the
baseline). The paired comparisons and omnibus tests are the primary questions, corrected
together by one report-wide Holm; Wilcoxon p-values get their own Holm; correlations are
exploratory and marked uncorrected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
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
    comparisons: pd.DataFrame  # one row per paired comparison (report-wide Holm)
    omnibus: pd.DataFrame  # one row per omnibus test
    correlations: pd.DataFrame  # scale mixing vs accuracy: between / within configurations
    grid_model: pd.DataFrame = field(default_factory=pd.DataFrame)  # one model, every term
    power: dict = field(default_factory=dict)  # what the grid can resolve
    sensitivity: pd.DataFrame = field(default_factory=pd.DataFrame)  # failures as chance
    dispersion: pd.DataFrame = field(default_factory=pd.DataFrame)  # spread per axis level
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
    for key, g_all in runs.groupby(axes, sort=False, dropna=False):  # every planned cell
        key = key if isinstance(key, tuple) else (key,)
        g = g_all[g_all.status == "done"].copy()
        g[metric] = g[metric].astype(float)
        row = {**dict(zip(axes, key)), **st.describe(g[metric]).as_dict()}
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
        if len(by_level) < 3:  # a two-level axis: its paired comparisons are the test
            continue
        res = st.omnibus(by_level, blocked)
        if res is not None:
            omni.append({**dict(zip(strata, key)), **res.__dict__})
    omnibus = pd.DataFrame(omni)

    # ---- the multiplicity plan: the paired comparisons, the omnibus tests and the grid
    # model's terms named in [report] questions are the primary (confirmatory) questions,
    # corrected together by one report-wide Holm; Wilcoxon p-values (robustness) get their
    # own Holm; every other p-value is exploratory and shown as uncorrected.
    model = grid_model(done, axes, metric)
    questions = {_term_key(q) for q in rep.get("questions", [])}
    if not model.empty:
        model["primary"] = [_term_key(t) in questions for t in model.term]
        missing = questions - {_term_key(t) for t in model.term}
    else:
        missing = questions
    asked = model[model.primary] if not model.empty else model
    primary_p = (
        list(comparisons.get("p_t", pd.Series(dtype=float)))
        + list(omnibus.get("p", pd.Series(dtype=float)))
        + list(asked.get("p", pd.Series(dtype=float)))
    )
    adjusted = st.holm(primary_p)
    k1, k2 = len(comparisons), len(comparisons) + len(omnibus)
    if not comparisons.empty:
        comparisons["p_holm"] = adjusted[:k1]
        comparisons["p_wilcoxon_holm"] = st.holm(comparisons["p_wilcoxon"].values)
    if not omnibus.empty:
        omnibus["p_holm"] = adjusted[k1:k2]
    if not model.empty:
        model["p_holm"] = math.nan
        model.loc[model.primary, "p_holm"] = adjusted[k2:]

    # ---- scale mixing vs accuracy, without pseudo-replication: between configurations
    # (cell means) and within configurations (each seed's deviation from its cell mean)
    correlations = scale_mixing_association(done, axes, metric)

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
    an.grid_model = model
    an.dispersion = dispersion(done, axes, metric)
    if "run_dir" in runs:
        per_example_evidence(an)
    an.power = power_summary(an)
    an.sensitivity = sensitivity(runs, plan, axes, primary, paired_axis, others, metric)
    an.findings, an.warnings = findings(an)
    if paired_axis is None and rep.get("paired"):
        an.warnings.append(
            f"The paired axis {rep['paired']} has {len(_levels(plan, rep['paired']))} levels "
            "in these runs, not two: it is analysed as an ordinary axis."
        )
    for q in sorted(missing):
        an.warnings.append(f"The primary question {q!r} could not be tested (no model term).")
    return an


def _term_key(term: str) -> frozenset:
    """A grid-model term ("a", "a x b") as a set of axes: "b x a" is the same question."""
    return frozenset(t.strip() for t in str(term).split(" x "))


def dispersion(done: pd.DataFrame, axes: list, metric: str) -> pd.DataFrame:
    """Spread across seeds per level of each axis (pooled within-cell SD) and the
    Brown-Forsythe test of equal spread (exploratory, uncorrected): a configuration can
    matter by making training stable rather than better on average."""
    rows = []
    for axis in axes:
        by_level: dict = {}
        for key, g in done.groupby(axes, sort=False, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            by_level.setdefault(key[axes.index(axis)], []).append(g[metric].astype(float).values)
        res = st.brown_forsythe(by_level)
        if res is None:
            continue
        sds = {
            lvl: math.sqrt(
                sum(((c - c.mean()) ** 2).sum() for c in cs if len(c) >= 2)
                / max(1, sum(len(c) - 1 for c in cs if len(c) >= 2))
            )
            for lvl, cs in by_level.items()
        }
        rows.append(
            {
                "axis": axis,
                "F": res[0],
                "p": res[1],
                "df": res[2],
                "pooled_sd": {str(k): v for k, v in sds.items()},
            }
        )
    return pd.DataFrame(rows)


def per_example_evidence(an: Analysis) -> None:
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
            oa, ob = test_outcomes(dirs[a]), test_outcomes(dirs[b])
            if oa is not None and ob is not None and np.array_equal(oa[1], ob[1]):
                pairs.append((oa[0] == oa[1], ob[0] == ob[1]))  # same test set, per example
        rows.append(st.per_example(*zip(*pairs)) if pairs else {})
    extra = pd.DataFrame(rows, index=comp.index)
    for c in extra.columns:
        comp[c] = extra[c]


SCALE_SUMMARY = "final_log2_ratio"  # the one primary scale-mixing summary


def scale_mixing_association(done: pd.DataFrame, axes: list, metric: str) -> pd.DataFrame:
    """Spearman between the final log2 scale ratio (mean over blocks) and accuracy, split
    into a between-configuration part (n = configurations) and a within-configuration
    part (seed deviations from their cell's mean); both exploratory."""
    if SCALE_SUMMARY not in done or done[SCALE_SUMMARY].isna().all():
        return pd.DataFrame()
    d = done[[*axes, SCALE_SUMMARY, metric]].dropna().copy()
    d[SCALE_SUMMARY] = d[SCALE_SUMMARY].astype(float)
    means = d.groupby(axes, sort=False, dropna=False)[[SCALE_SUMMARY, metric]].transform("mean")
    rows = []
    cells = d.groupby(axes, sort=False, dropna=False)[[SCALE_SUMMARY, metric]].mean()
    for part, x, y in (
        ("between configurations", cells[SCALE_SUMMARY], cells[metric]),
        (
            "within configurations",
            d[SCALE_SUMMARY] - means[SCALE_SUMMARY],
            d[metric] - means[metric],
        ),
    ):
        r = st.spearman(x.values, y.values)
        if r is not None:
            rows.append({"summary": SCALE_SUMMARY, "part": part, **r.__dict__, "p_holm": math.nan})
    return pd.DataFrame(rows)


def grid_model(done: pd.DataFrame, axes: list, metric: str) -> pd.DataFrame:
    """One model for the whole grid: accuracy ~ axes with all their interactions, seed as
    a blocking effect (statsmodels AnovaRM: repeated-measures ANOVA) when every seed has
    every cell, else a mixed model with a random intercept per seed (MixedLM, Wald tests)."""
    import warnings

    d = done[[*axes, "seed", metric]].dropna().copy()
    for a in axes:
        d[a] = d[a].astype(str)
    cells = d.groupby(axes, dropna=False).ngroups
    seeds = d.seed.nunique()
    if seeds < 2 or cells < 2:
        return pd.DataFrame()
    balanced = len(d) == cells * seeds and (d.groupby("seed").size() == cells).all()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if balanced:
                from statsmodels.stats.anova import AnovaRM

                tab = AnovaRM(d, metric, "seed", within=axes).fit().anova_table
                return pd.DataFrame(
                    {
                        "term": [t.replace(":", " x ") for t in tab.index],
                        "F": tab["F Value"].values,
                        "df": [f"{a:g}, {b:g}" for a, b in zip(tab["Num DF"], tab["Den DF"])],
                        "p": tab["Pr > F"].values,
                        "model": "repeated-measures ANOVA (AnovaRM), seed as block",
                    }
                )
            import statsmodels.formula.api as smf

            formula = f"{metric} ~ " + " * ".join(f"C({a})" for a in axes)
            fit = smf.mixedlm(formula, d, groups=d["seed"]).fit(reml=True)
            wt = fit.wald_test_terms(scalar=True).table
            wt = wt[wt.index != "Intercept"]
            return pd.DataFrame(
                {
                    "term": [
                        t.replace("C(", "").replace(")", "").replace(":", " x ") for t in wt.index
                    ],
                    "F": wt["statistic"].values,
                    "df": [str(v) for v in wt["df_constraint"].values],
                    "p": wt["pvalue"].values,
                    "model": "mixed model (MixedLM), random intercept per seed, Wald chi2",
                }
            )
    except Exception as e:  # pragma: no cover - a degenerate grid: say so
        return pd.DataFrame(
            [
                {
                    "term": "model not estimable",
                    "F": math.nan,
                    "df": "",
                    "p": math.nan,
                    "model": str(e)[:80],
                }
            ]
        )


def selection_cost(runs: pd.DataFrame) -> str | None:
    """The privacy of choosing the best configuration of the grid, as a number: releasing
    the choice reads every run, and every run saw the same private data, so by basic
    composition (Dwork & Roth 2014, Thm 3.16) it is (sum of epsilons, sum of deltas)-DP."""
    done = (
        runs[(runs.status == "done") & runs.epsilon_spent.notna()]
        if "epsilon_spent" in runs
        else runs[:0]
    )
    if done.empty:
        return None
    k = len(done)
    eps = float(done.epsilon_spent.astype(float).sum())
    delta = float(done.delta.astype(float).sum()) if "delta" in done else math.nan
    one = float(done.epsilon_spent.astype(float).max())
    return (
        f"Choosing the best configuration from these {k} runs is a computation on all of them; "
        f"by basic composition the choice is ({eps:.3g}, {delta:.2g})-DP, against ({one:.3g}, "
        f"{float(done.delta.astype(float).max()):.2g}) for one run. Papernot & Steinke (2022) "
        "show that a random number of runs (e.g. Poisson) and releasing only the best costs "
        "only a small multiple of one run's epsilon; this grid ran a fixed set, so composition "
        "is the bound that applies. Select on public data to avoid the cost."
    )


def power_summary(an: Analysis) -> dict:
    """What the grid can resolve: the test set's binomial error per run, the paired SD,
    the minimum detectable effect at the current seeds (80 % power, two-sided 0.05) and
    the seeds needed for 1 and 0.5 points."""
    from statsmodels.stats.power import TTestPower

    out: dict = {}
    runs = an.runs[an.runs.status == "done"]
    n_test = runs.get("test_size")
    if n_test is not None and n_test.notna().any() and len(runs):
        p = float(runs[an.metric].astype(float).mean())
        nt = float(n_test.dropna().iloc[0])
        out["test_size"] = int(nt)
        out["binomial_se_points"] = 100 * math.sqrt(p * (1 - p) / nt)
    comp = an.comparisons
    if comp.empty or "diffs" not in comp:
        return out
    sds = [np.std(d, ddof=1) for d in comp.diffs if len(d) >= 2]
    if not sds:
        return out
    sd = float(math.sqrt(np.mean(np.square(sds))))
    n = int(comp.n.median())
    out.update(paired_sd_points=100 * sd, seeds=n)
    power = TTestPower()
    if n >= 2 and sd > 0:
        es = power.solve_power(nobs=n, alpha=st.ALPHA, power=0.8)
        out["mde_points"] = 100 * es * sd
    for pts in (1.0, 0.5):
        if sd > 0:
            need = power.solve_power(effect_size=(pts / 100) / sd, alpha=st.ALPHA, power=0.8)
            out[f"seeds_for_{pts:g}_point"] = int(math.ceil(need))
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
    r.loc[bad, metric] = chance
    r.loc[bad, "status"] = "done"
    r = r[r.status == "done"].copy()
    r[metric] = r[metric].astype(float)
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
    done: pd.DataFrame, axis: str, pairs: list, strata: list[str], family: str, metric: str
) -> list[dict]:
    """Compare level b against level a of ``axis`` on shared seeds, within each stratum."""
    rows = []
    groups = done.groupby(strata, sort=False, dropna=False) if strata else [((), done)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        for lo, hi in pairs:
            ga, gb = g[g[axis] == lo].set_index("seed"), g[g[axis] == hi].set_index("seed")
            a, b = ga[metric], gb[metric]
            seeds = sorted(set(a.index) & set(b.index))
            if not seeds:
                continue
            r = st.paired(a[seeds].values, b[seeds].values)
            rows.append(
                {
                    "diffs": (b[seeds].values - a[seeds].values).tolist(),
                    "ids_a": ga.loc[seeds, "id"].tolist(),
                    "ids_b": gb.loc[seeds, "id"].tolist(),
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
            seeds_won, seeds_all = int(g.wins.sum()), int(g.n.sum())
            if g.b.nunique() == 1:  # one treatment compared within strata
                text = (
                    f"{b_label} raised mean accuracy in {up} of {k} comparisons ({fam}), "
                    f"and in {seeds_won} of {seeds_all} seed-matched pairs; "
                )
            else:  # each level against the baseline
                text = (
                    f"Against {top['a']}, {up} of {k} levels raised mean accuracy "
                    f"({seeds_won} of {seeds_all} seed-matched pairs); "
                )
            text += f"the largest gain, {_pts(top.mean_diff)} at {where}, "
            if top.n < 2 or math.isnan(top.p_holm):
                text += f"is not testable (n = {int(top.n)})."
            elif top.p_holm < st.ALPHA:
                text += f"holds after the report-wide Holm correction (p = {top.p_holm:.3g})."
            else:
                text += (
                    f"does not hold after the report-wide Holm correction (p = {top.p_holm:.3g})."
                )
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
    for _, r in co.iterrows() if not co.empty else []:
        strength = "an" if r.p < st.ALPHA else "no reliable"
        out.append(
            f"Scale mixing and accuracy ({r.part}; exploratory, uncorrected): {strength} "
            f"association between the final log2 scale ratio and accuracy (Spearman rho = "
            f"{r.rho:+.2f}, 95 % CI {r.ci_low:+.2f} to {r.ci_high:+.2f}, n = {r.n}, p = {r.p:.3g}); "
            "a correlation, not a cause."
        )
    gm = an.grid_model
    for _, r in gm.iterrows() if not gm.empty else []:
        if not isinstance(r.p, float) or math.isnan(r.p):
            continue
        if r.get("primary", False):
            verdict = "has an effect" if r.p_holm < st.ALPHA else "shows no detectable effect"
            how = f"p = {r.p:.3g}, report-wide Holm {r.p_holm:.3g}; a primary question"
        else:
            verdict = "may have an effect" if r.p < st.ALPHA else "shows no detectable effect"
            how = f"p = {r.p:.3g}, exploratory, uncorrected"
        out.append(f"Grid model ({r.model}): {r.term} {verdict} (F = {r.F:.3g}, df {r.df}, {how}).")
    disp = an.dispersion
    for _, r in disp.iterrows() if not disp.empty else []:
        sds = ", ".join(f"{k}: {100 * v:.2f}" for k, v in r.pooled_sd.items())
        verdict = "differs" if r.p < st.ALPHA else "shows no detectable difference"
        out.append(
            f"Spread across seeds by {r.axis} (pooled SD in points: {sds}) {verdict} "
            f"(Brown-Forsythe F = {r.F:.3g}, df {r.df}, p = {r.p:.3g}; exploratory, uncorrected)."
        )
    comp = an.comparisons
    if "ex_p_mcnemar" in comp and comp.ex_p_mcnemar.notna().any():
        ex = comp[comp.ex_p_mcnemar.notna()]
        top = ex.loc[ex.ex_diff.abs().idxmax()]
        out.append(
            f"Per test example (second source of evidence; the trained models held fixed): "
            f"{int((ex.ex_p_mcnemar < st.ALPHA).sum())} of {len(ex)} comparisons differ by "
            f"McNemar's exact test at {st.ALPHA} (uncorrected); the largest, {top['b']} vs "
            f"{top['a']} at {_where(top, an, exclude=(an.paired_axis,) if an.paired_axis else ())}, "
            f"{_pts(top.ex_diff)} (95 % bootstrap over {int(top.ex_examples)} test examples "
            f"{100 * top.ex_ci_low:+.1f} to {100 * top.ex_ci_high:+.1f}, p = {top.ex_p_mcnemar:.3g}). "
            "This is about these trained models on this test set; whether the configuration "
            "wins again with new seeds is the paired t test's question."
        )
    pw = an.power
    if pw.get("binomial_se_points") is not None:
        text = (
            f"Resolution: one run's test accuracy has a binomial standard error of "
            f"{pw['binomial_se_points']:.1f} points ({pw['test_size']} test examples)"
        )
        if pw.get("mde_points") is not None:
            text += (
                f"; the paired SD across seeds is {pw['paired_sd_points']:.1f} points, so with "
                f"{pw['seeds']} seeds the smallest effect detectable with 80 % power is "
                f"{pw['mde_points']:.1f} points"
            )
        if pw.get("seeds_for_1_point") is not None:
            text += (
                f"; detecting 1 point needs {pw['seeds_for_1_point']} seeds, 0.5 point "
                f"{pw['seeds_for_0.5_point']}"
            )
        out.append(text + ".")
    if (sel := selection_cost(runs)) is not None:
        out.append(sel)
    sens = an.sensitivity
    if not sens.empty:
        changed = None  # comparable row by row only when no comparison was lost
        if len(sens) == len(an.comparisons):
            verdicts = (sens.p_holm < st.ALPHA).values, (an.comparisons.p_holm < st.ALPHA).values
            changed = int((verdicts[0] != verdicts[1]).sum())
        out.append(
            "Sensitivity: with failed and diverged runs counted as chance accuracy, "
            f"{int((sens.p_holm < st.ALPHA).sum())} of {len(sens)} comparisons hold after Holm"
            + (f" ({changed} verdict(s) change)" if changed is not None else "")
            + "."
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
