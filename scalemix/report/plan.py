"""The analysis plan a report follows, and what it decides: which tests are primary,
how they are corrected for multiplicity, and each test's verdict.

The plan is the grid's ``[report]`` table, fixed by its first ``ablate``
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


def multiplicity(
    rp: ReportPlan, model: pd.DataFrame, comp: pd.DataFrame, omni: pd.DataFrame
) -> dict:
    """Adjusted p-values and verdicts of the primary tests, added in place to the grid
    model, the paired comparisons and the omnibus tests: columns ``family``,
    ``p_adj``, ``adj`` (the correction, in words), ``tested`` and ``verdict``. Grid-model
    terms of more than one df enter with their Greenhouse-Geisser p (valid without
    sphericity). Holm: one family of every primary test. Gatekeeping (serial; Westfall &
    Krishen 2001): the families in the plan's order, Holm within each; a family is tested
    only if every test of the family before it is significant (strong control of the
    familywise error). Exploratory tests get p_adj = nan and adj "exploratory,
    uncorrected". Returns the size of each family (Holm: {"all primary tests": m})."""
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
    # The equivalence tests of the primary family are corrected like the tests of
    # difference: "equivalent" is a claim too, and the plan's alpha holds for the family.
    tost_raw = {
        (k, i): float(frames[k]["p_tost"].iloc[i]) if "p_tost" in frames[k] else math.nan
        for k, i, *_ in entries
    }
    tost_adj = {k: [math.nan] * len(f) for k, f in frames.items()}
    if rp.correction == "holm":
        for (k, i, _, _), pa in zip(entries, st.holm([p for *_, p in entries])):
            out[k][0][i], out[k][1][i] = pa, f"Holm over {m_all} primary tests"
        for (k, i, *_), pt in zip(entries, st.holm([tost_raw[(k, i)] for k, i, *_ in entries])):
            tost_adj[k][i] = pt
        sizes = {"all primary tests": m_all}
    else:
        gate_open, sizes = True, {}
        for fam in rp.order:
            part = [e for e in entries if e[2] == fam]
            sizes[fam] = len(part)
            if not part:
                continue
            adj = st.holm([p for *_, p in part])
            for (k, i, *_), pt in zip(part, st.holm([tost_raw[(k, i)] for k, i, *_ in part])):
                tost_adj[k][i] = pt
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
    for k, f in frames.items():
        if f.empty:
            continue
        f["p_adj"], f["adj"], f["tested"] = out[k]
        tost = f["p_tost"] if "p_tost" in f else [math.nan] * len(f)
        f["p_tost_adj"] = tost_adj[k]
        # primary tests: equivalence by the adjusted TOST p; exploratory: uncorrected
        tost_used = [
            pt_raw if str(ad).startswith("exploratory") else pt_adj
            for pt_raw, pt_adj, ad in zip(tost, f.p_tost_adj, f.adj)
        ]
        f["verdict"] = [
            verdict(pa, pr, pt, te, ad, rp)
            for pa, pr, pt, te, ad in zip(f.p_adj, f[cols[k]], tost_used, f.tested, f.adj)
        ]
    return sizes


def verdict(p_adj, p_raw, p_tost, tested, adj, rp: ReportPlan) -> str:
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
