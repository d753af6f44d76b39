"""The grid model and what the grid can resolve, with the seed as the unit.

The cells of one seed share their random streams (common random numbers), so the grid is
n seeds measured K times. ``complete_block`` takes the largest complete seeds x
configurations block; ``grid_model`` fits one repeated-measures ANOVA over seeds to it
(stats.rm_anova: each term against its own term x seed interaction, Greenhouse-Geisser
and lower-bound p for terms of more than one df) with an equivalence test per term;
``dispersion`` compares the spread across seeds at the seed level; ``components`` gives
the variance components (seed, seed x configuration, the test set's binomial part);
``power_summary`` what the grid can resolve at the plan's own alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from scalemix.report import stats as st
from scalemix.report.plan import ReportPlan


def axis_levels(plan: dict, axis: str) -> list:
    """The levels of ``axis`` in the grid's plan order."""
    return list(plan["grid"]["axes"][axis])


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


def term_key(term: str) -> frozenset:
    """A grid-model term ("a", "a x b") as a set of axes: "b x a" is the same question."""
    return frozenset(t.strip() for t in str(term).split(" x "))


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
    levels = {a: [v for v in axis_levels(plan, a) if (d[a] == v).any()] for a in axes}
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


def equivalence_of_levels(blocked: dict, sesoi: float | None) -> float:
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
        r["p_tost"] = term_equivalence(y, block.axes, r, sesoi)
    return pd.DataFrame(rows)


def term_equivalence(y: np.ndarray, axes: list, row: dict, sesoi: float | None) -> float:
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
    return equivalence_of_levels(blocked, sesoi)


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


def components(b: Block | None, test_size: float | None = None) -> dict:
    """Variance components of the metric (accuracy points squared) on the complete block:
    seed, residual (seed x configuration, with the test set's binomial noise inside, given
    the test set's size), and the return of more seeds against a larger test set for a
    paired difference's SE."""
    if b is None:
        return {}
    y = 100 * b.y.reshape(b.y.shape[0], -1)
    test_var = None
    if test_size:
        nt = float(test_size)
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


def power_summary(
    rp: ReportPlan,
    model: pd.DataFrame,
    comparisons: pd.DataFrame,
    family_sizes: dict,
    runs: pd.DataFrame,
    metric: str,
) -> dict:
    """What the grid can resolve: the test set's binomial error per run; for the primary
    term (the first 1-df question, else the paired comparisons), the SD of its per-seed
    contrast, with its chi-square interval, and at the plan's own alpha as corrected
    (Holm's first step: alpha / family size; the family's under gatekeeping) the smallest
    effect detectable with 80 % power at these seeds and the seeds needed for 1 point,
    0.5 point and the smallest effect of interest, each with the range the SD's
    interval implies. ``family_sizes``: what plan.multiplicity returned."""
    out: dict = {}
    runs = runs[runs.status == "done"]
    n_test = runs.get("test_size")
    if n_test is not None and n_test.notna().any() and len(runs):
        p = float(runs[metric].astype(float).mean())
        nt = float(n_test.dropna().iloc[0])
        out["test_size"] = int(nt)
        out["binomial_se_points"] = 100 * math.sqrt(p * (1 - p) / nt)
    gm = model
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
        comp = comparisons
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
        m = family_sizes.get("all primary tests", 1) if fam != "exploratory" else 1
    else:
        m = family_sizes.get(fam, 1) if fam != "exploratory" else 1
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
