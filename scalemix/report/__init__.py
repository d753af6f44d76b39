"""Statistical ablation reports: ``scalemix report DIR``.

collect.py loads a grid directory into a DataFrame; stats.py holds the statistics;
analysis.py turns runs into per-cell summaries, paired comparisons, omnibus tests,
correlations and plain-language findings; pdf.py draws the PDF. ``build_report`` writes,
next to the PDF, ``runs.csv``, ``cells.csv/.md``, ``marginals.csv`` (each level's seed
means), ``comparisons.csv/.md``, ``tests.csv``, ``findings.md`` and ``report.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from scalemix import __version__


def code_version() -> str:
    """scalemix's version, and the git commit of the checkout it runs from (if any)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        sha, dirty = "", ""
    return __version__ + (f" (git {sha}{'+changes' if dirty else ''})" if sha else "")


def _md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_none_\n"
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _pct(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _p(x, n: int | None = None) -> str:
    if n is not None and n < 2:
        return f"not testable (n = {n})"
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _ci(lo, hi, scale: float = 1.0, fmt: str = "+.2f") -> str:
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return ""
    return f"{scale * lo:{fmt}} to {scale * hi:{fmt}}"


CUT_MARK = "^"  # an interval cut to [0, 1]: the t interval reached past it


def _ci_pct(lo, hi, cut: str = "") -> str:
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return ""
    return (
        f"{'' if cut not in ('low', 'both') else CUT_MARK}{_pct(lo)}-{_pct(hi)}"
        f"{CUT_MARK if cut in ('high', 'both') else ''}"
    )


def _adj_short(adj: str, p_adj) -> str:
    """An adjusted p with its correction: "1 (Holm, 9 tests)"."""
    adj = str(adj)
    if adj.startswith("exploratory"):
        return "exploratory: none"
    if adj.startswith("not tested"):
        return "not tested (gate closed)"
    if adj.startswith("Holm over") and "family" in adj:
        m, fam = adj.split("Holm over ")[1].split(" test(s) of family ")
        return f"{_p(p_adj)} (Holm, {m} in {fam.strip(chr(39))})"
    if adj.startswith("Holm over"):
        return f"{_p(p_adj)} (Holm, {adj.split('Holm over ')[1].split(' ')[0]} tests)"
    return f"{_p(p_adj)} ({adj})"


def display_tables(an) -> dict[str, pd.DataFrame]:
    """The human-readable tables (strings, every column with its unit: accuracies in %,
    differences in points, p-values to 3 digits with their correction)."""
    cells = an.cells.copy()
    out_cells = cells[an.axes].astype(str)
    out_cells["n (seeds)"] = cells["n"].astype(int)
    out_cells["failed / diverged (runs of planned)"] = [
        f"{int(f)} / {int(d)} of {int(p)}"
        for f, d, p in zip(cells["failed"], cells["diverged"], cells["planned"])
    ]
    out_cells["mean (%)"] = cells["mean"].map(_pct)
    out_cells["SD across seeds (pts)"] = cells["std"].map(_pct)
    out_cells["95% CI of the mean (%)"] = [
        _ci_pct(a, b, c) for a, b, c in zip(cells.ci_low, cells.ci_high, cells.get("ci_cut", ""))
    ]
    out_cells["CI method"] = cells["ci_method"]
    if "other_mean" in cells and cells.other_mean.notna().any():
        other = "raw" if an.metric == "test_acc_ema" else "EMA"
        out_cells[f"mean, {other} weights (%, descriptive)"] = cells.other_mean.map(_pct)
    if (cells["n"] >= 4).any():
        out_cells["IQM (%)"] = cells["iqm"].map(lambda v: _pct(v) if v is not None else "")
    if "eps_lower_bound_max" in cells and cells.eps_lower_bound_max.notna().any():
        out_cells["eps lower bound (audit, max over seeds)"] = [
            "" if math.isnan(v) else f"{v:.2f} (acct {e:.2f})"
            for v, e in zip(cells.eps_lower_bound_max, cells.eps_spent)
        ]
    comp = an.comparisons
    strata = []
    if comp.empty:
        out_comp = pd.DataFrame()
    else:
        strata = [a for a in an.axes if a in comp.columns and a != an.paired_axis]
        out_comp = comp[strata].astype(str)
        out_comp.insert(0, "b vs a", comp["b"] + " vs " + comp["a"])
        out_comp["n (seeds)"] = comp["n"].astype(int)
        out_comp["diff b - a (pts)"] = comp.mean_diff.map(lambda v: f"{100 * v:+.2f}")
        out_comp["95% CI, paired t (pts)"] = [
            _ci(a, b, 100) for a, b in zip(comp.ci_low, comp.ci_high)
        ]
        out_comp["p (t), uncorrected"] = [_p(p, n) for p, n in zip(comp.p_t, comp.n)]
        out_comp["p (t), adjusted (correction)"] = [
            _adj_short(a, p) for a, p in zip(comp.adj, comp.p_adj)
        ]
        if an.plan.sesoi:
            out_comp[f"TOST p (±{an.plan.sesoi:g} pts)"] = comp.p_tost.map(_p)
        out_comp["verdict"] = comp.verdict
        if (comp.n >= 6).any():  # below 6 pairs the signed-rank test cannot reach 0.05
            out_comp["p (Wilcoxon), Holm over comparisons"] = [
                _p(p, n) for p, n in zip(comp.p_wilcoxon_holm, comp.n)
            ]
        out_comp["g_z [95% CI of delta_z]"] = [
            "" if math.isnan(g) else f"{g:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            for g, lo, hi in zip(comp.effect_gz, comp.gz_low, comp.gz_high)
        ]
        out_comp["seeds won [exact 95% CI of P(win)]"] = [
            f"{int(w)}/{int(n)} [{lo:.2f}, {hi:.2f}]"
            for w, n, lo, hi in zip(comp.wins, comp.n, comp.win_low, comp.win_high)
        ]
        if comp.poi_cross.notna().any():
            out_comp["P(X_b > X_a), cross-seed [95% CI]"] = [
                ""
                if math.isnan(p)
                else f"{p:.2f} [{'^' if c in ('low', 'both') else ''}{lo:.2f}, "
                f"{hi:.2f}{'^' if c in ('high', 'both') else ''}]"
                for p, lo, hi, c in zip(
                    comp.poi_cross, comp.poi_cross_low, comp.poi_cross_high, comp.poi_cross_cut
                )
            ]
    out_ex = pd.DataFrame()
    if not comp.empty and "ex_diff" in comp and comp.ex_diff.notna().any():
        ex = comp[comp.ex_diff.notna()]  # per test example: the trained models held fixed
        out_ex = out_comp.loc[ex.index, [c for c in out_comp.columns[: 1 + len(strata)]]].copy()
        out_ex["seeds x test examples"] = [
            f"{int(s)} x {int(n)}" for s, n in zip(ex.ex_seeds, ex.ex_examples)
        ]
        out_ex["only b right / only a right (examples)"] = [
            f"{int(b)} / {int(a)}" for b, a in zip(ex.ex_b_only, ex.ex_a_only)
        ]
        out_ex["diff (pts)"] = ex.ex_diff.map(lambda v: f"{100 * v:+.2f}")
        out_ex["95% CI, bootstrap over examples (pts)"] = [
            _ci(lo, hi, 100) for lo, hi in zip(ex.ex_ci_low, ex.ex_ci_high)
        ]
        out_ex["McNemar exact p, uncorrected"] = [_p(p) for p in ex.ex_p_mcnemar]
    rows = []
    for _, r in an.omnibus.iterrows():
        where = ", ".join(f"{a}={r[a]}" for a in an.axes if a != an.primary and a in r)
        rows.append(
            {
                "test": f"{r.test} across {an.primary}",
                "where": where or "all",
                "n (seeds)": int(r.blocks) if r.blocks else "",
                "statistic": f"chi2 {r.statistic:.3g}",
                "p, uncorrected": _p(r.p),
                "p, sphericity-free": "",
                "p, adjusted (correction)": _adj_short(r.adj, r.p_adj),
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
                "p, uncorrected": _p(r.p),
                "p, sphericity-free": ""
                if r.df1 <= 1
                else (
                    f"GG {_p(r.p_gg)} (eps {r.eps_gg:.2f}); LB {_p(r.p_lb)}"
                    if r.get("gg_estimable", True)
                    else f"GG {_p(r.p_gg)} (not estimable); LB {_p(r.p_lb)} (verdict)"
                ),
                "p, adjusted (correction)": _adj_short(r.adj, r.p_adj),
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
                "p, uncorrected": _p(r.p),
                "p, sphericity-free": "" if math.isnan(r.p_gg) else f"GG {_p(r.p_gg)}",
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
                "p, uncorrected": _p(r.p),
                "p, sphericity-free": "",
                "p, adjusted (correction)": "exploratory: none",
                "verdict": "",
            }
        )
    marg = an.marginals
    out_marg = pd.DataFrame()
    if not marg.empty:
        out_marg = pd.DataFrame(
            {
                "axis": marg.axis,
                "level": marg.level.astype(str),
                "configurations averaged": marg.configurations,
                "n (seeds)": marg.seeds,
                "mean of seed means (%)": marg["mean"].map(_pct),
                "95% CI over seed means (%)": [
                    _ci_pct(a, b, c) for a, b, c in zip(marg.ci_low, marg.ci_high, marg.ci_cut)
                ],
                "seeds left out (a run missing)": marg.seeds_left_out,
            }
        )
    return {
        "cells": out_cells,
        "marginals": out_marg,
        "comparisons": out_comp,
        "per_example": out_ex,
        "omnibus_corr": pd.DataFrame(rows),
    }


def build_report(grid_dir, out_pdf=None, *, log=print, wandb=None) -> Path:
    """Write the PDF and its tables; return the PDF's path."""
    from scalemix.privacy.grid import grid_privacy_from_dir
    from scalemix.report.analysis import analyse
    from scalemix.report.collect import collect, learning_curves, trajectories
    from scalemix.report.pdf import write_pdf
    from scalemix.train.rundir import write_json_atomic

    grid_dir = Path(grid_dir)
    runs, plan = collect(grid_dir)
    an = analyse(runs, plan, grid_privacy=grid_privacy_from_dir(grid_dir))
    pdf_path = Path(out_pdf) if out_pdf else grid_dir / "report" / "report.pdf"
    folder = pdf_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tables = display_tables(an)
    runs.drop(columns=["model_axes", "image_shape", "run_dir"], errors="ignore").to_csv(
        folder / "runs.csv", index=False
    )
    an.cells.to_csv(folder / "cells.csv", index=False)
    an.marginals.to_csv(folder / "marginals.csv", index=False)
    an.comparisons.to_csv(folder / "comparisons.csv", index=False)
    pd.concat(
        [
            an.omnibus.assign(kind="omnibus"),
            an.grid_model.assign(kind="grid model"),
            an.dispersion.assign(kind="spread (seed level)"),
            an.correlations.assign(kind="spearman"),
        ],
        ignore_index=True,
    ).to_csv(folder / "tests.csv", index=False)
    (folder / "cells.md").write_text(_md_table(tables["cells"]))
    (folder / "comparisons.md").write_text(_md_table(tables["comparisons"]))
    from scalemix.report.pdf import caveats

    (folder / "findings.md").write_text(
        f"# {an.grid}{' (' + an.preset + ')' if an.preset else ''}: findings\n\n"
        + "## Analysis plan\n\n"
        + "".join(f"{line}\n" for line in an.plan.describe())
        + "\n## Findings\n\n"
        + "".join(f"- {f}\n" for f in an.findings)
        + ("\n## Warnings\n\n" + "".join(f"- {w}\n" for w in an.warnings) if an.warnings else "")
        + "\n## Caveats\n\n"
        + "".join(f"- {c}\n" for c in caveats(an))
        + "\n## Tests\n\n"
        + _md_table(tables["omnibus_corr"])
        + "\n## Accuracy per level (seed means over the other axes)\n\n"
        + _md_table(tables["marginals"])
    )
    tmp = pdf_path.with_name(f".{pdf_path.name}.tmp")
    pages = write_pdf(
        tmp,
        an,
        plan,
        trajectories(grid_dir, runs),
        learning_curves(runs),
        tables,
        code_version(),
    )
    tmp.replace(pdf_path)  # never a half-written PDF under the final name
    write_json_atomic(
        folder / "report.json",
        {
            "pdf": str(pdf_path),
            "pages": pages,
            "findings": an.findings,
            "warnings": an.warnings,
            "analysis_plan": an.plan.describe(),
            "grid_privacy": an.grid_privacy.as_dict() if an.grid_privacy is not None else None,
        },
    )
    if wandb is not None:
        from dataclasses import replace

        from scalemix.tracking import WandbRun

        run = WandbRun(
            replace(wandb, name=f"{an.grid}-report", job_type="report"),
            folder,
            {"grid": plan["grid"]},
        )
        run.log_table("report/cells", tables["cells"])
        if not tables["comparisons"].empty:
            run.log_table("report/comparisons", tables["comparisons"])
        run.summary({f"finding_{i}": f for i, f in enumerate(an.findings)})
        cmd = run.finish()
        if cmd:
            log(f"W&B report run written offline; upload it with: {cmd}")
    log(f"report: {pages} pages -> {pdf_path}")
    return pdf_path
