"""Statistical ablation reports: ``scalemix report DIR``.

collect.py loads a grid directory into a DataFrame; stats.py holds the statistics;
analysis.py turns runs into per-cell summaries, paired comparisons, omnibus tests,
correlations and plain-language findings; pdf.py draws the PDF. ``build_report`` writes,
next to the PDF, ``runs.csv``, ``cells.csv/.md``, ``comparisons.csv/.md``, ``tests.csv``
and ``findings.md``.
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


def display_tables(an) -> dict[str, pd.DataFrame]:
    """The human-readable tables (strings: accuracies in %, p-values to 3 digits)."""
    cells = an.cells.copy()
    out_cells = cells[an.axes].astype(str)
    out_cells["n"] = cells["n"].astype(int)
    out_cells["failed/diverged"] = [
        f"{int(f)}/{int(d)} of {int(p)}"
        for f, d, p in zip(cells["failed"], cells["diverged"], cells["planned"])
    ]
    out_cells["mean %"] = cells["mean"].map(_pct)
    out_cells["sd"] = cells["std"].map(_pct)
    out_cells["95% CI"] = [
        f"{_pct(a)}-{_pct(b)}" if not math.isnan(a) else ""
        for a, b in zip(cells.ci_low, cells.ci_high)
    ]
    out_cells["CI method"] = cells["ci_method"]
    out_cells["IQM %"] = cells["iqm"].map(lambda v: _pct(v) if v is not None else "")
    if "eps_lower_bound_max" in cells and cells.eps_lower_bound_max.notna().any():
        out_cells["eps lower bound (audit, max)"] = [
            "" if math.isnan(v) else f"{v:.2f} (acct {e:.2f})"
            for v, e in zip(cells.eps_lower_bound_max, cells.eps_spent)
        ]
    comp = an.comparisons
    if comp.empty:
        out_comp = pd.DataFrame()
    else:
        strata = [a for a in an.axes if a in comp.columns and a != an.paired_axis]
        out_comp = comp[strata].astype(str)
        out_comp.insert(0, "b vs a", comp["b"] + " vs " + comp["a"])
        out_comp["n"] = comp["n"].astype(int)
        out_comp["diff (pts)"] = comp.mean_diff.map(lambda v: f"{100 * v:+.2f}")
        out_comp["95% CI (paired t)"] = [_ci(a, b, 100) for a, b in zip(comp.ci_low, comp.ci_high)]
        out_comp["p (t), uncorr."] = [_p(p, n) for p, n in zip(comp.p_t, comp.n)]
        out_comp["p Holm (report)"] = [_p(p, n) for p, n in zip(comp.p_holm, comp.n)]
        out_comp["p (W), Holm"] = [_p(p, n) for p, n in zip(comp.p_wilcoxon_holm, comp.n)]
        out_comp["g_z [95% CI]"] = [
            "" if math.isnan(g) else f"{g:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            for g, lo, hi in zip(comp.effect_gz, comp.gz_low, comp.gz_high)
        ]
        out_comp["P(b>a) [95% CI]"] = [
            f"{p:.2f} [{lo:.2f}, {hi:.2f}]"
            for p, lo, hi in zip(comp.prob_improvement, comp.poi_low, comp.poi_high)
        ]
        out_comp["seeds won"] = [f"{int(w)}/{int(n)}" for w, n in zip(comp.wins, comp.n)]
    out_ex = pd.DataFrame()
    if not comp.empty and "ex_diff" in comp and comp.ex_diff.notna().any():
        ex = comp[comp.ex_diff.notna()]  # per test example: the trained models held fixed
        out_ex = out_comp.loc[ex.index, [c for c in out_comp.columns[: 1 + len(strata)]]].copy()
        out_ex["seeds x examples"] = [
            f"{int(s)} x {int(n)}" for s, n in zip(ex.ex_seeds, ex.ex_examples)
        ]
        out_ex["only b right / only a right"] = [
            f"{int(b)} / {int(a)}" for b, a in zip(ex.ex_b_only, ex.ex_a_only)
        ]
        out_ex["diff (pts)"] = ex.ex_diff.map(lambda v: f"{100 * v:+.2f}")
        out_ex["95% CI (bootstrap over examples)"] = [
            _ci(lo, hi, 100) for lo, hi in zip(ex.ex_ci_low, ex.ex_ci_high)
        ]
        out_ex["McNemar exact p, uncorr."] = [_p(p) for p in ex.ex_p_mcnemar]
    rows = []
    for _, r in an.omnibus.iterrows():
        where = ", ".join(f"{a}={r[a]}" for a in an.axes if a != an.primary and a in r)
        rows.append(
            {
                "test": f"{r.test} across {an.primary}",
                "where": where or "all",
                "statistic": f"{r.statistic:.3g}",
                "p": _p(r.p),
                "p Holm": _p(r.p_holm) + " (report)",
            }
        )
    for _, r in an.grid_model.iterrows():
        rows.append(
            {
                "test": f"grid model: {r.term}",
                "where": r.model,
                "statistic": f"F {r.F:.3g} (df {r.df})",
                "p": _p(r.p),
                "p Holm": _p(r.p_holm) + " (report)"
                if r.get("primary", False)
                else "exploratory, uncorrected",
            }
        )
    for _, r in an.dispersion.iterrows():
        rows.append(
            {
                "test": f"Brown-Forsythe: spread across seeds by {r.axis}",
                "where": "SD (pts) "
                + ", ".join(f"{k}: {100 * v:.2f}" for k, v in r.pooled_sd.items()),
                "statistic": f"F {r.F:.3g} (df {r.df})",
                "p": _p(r.p),
                "p Holm": "exploratory, uncorrected",
            }
        )
    for _, r in an.correlations.iterrows():
        rows.append(
            {
                "test": f"Spearman: final log2 scale ratio vs accuracy, {r.part}",
                "where": f"n = {r.n}",
                "statistic": f"rho {r.rho:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]",
                "p": _p(r.p),
                "p Holm": "exploratory",
            }
        )
    return {
        "cells": out_cells,
        "comparisons": out_comp,
        "per_example": out_ex,
        "omnibus_corr": pd.DataFrame(rows),
    }


def build_report(grid_dir, out_pdf=None, *, log=print, wandb=None) -> Path:
    """Write the PDF and its tables; return the PDF's path."""
    from scalemix.report.analysis import analyse
    from scalemix.report.collect import collect, learning_curves, trajectories
    from scalemix.report.pdf import write_pdf
    from scalemix.train.rundir import write_json_atomic

    grid_dir = Path(grid_dir)
    runs, plan = collect(grid_dir)
    an = analyse(runs, plan)
    pdf_path = Path(out_pdf) if out_pdf else grid_dir / "report" / "report.pdf"
    folder = pdf_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tables = display_tables(an)
    runs.drop(columns=["model_axes", "image_shape", "run_dir"], errors="ignore").to_csv(
        folder / "runs.csv", index=False
    )
    an.cells.to_csv(folder / "cells.csv", index=False)
    an.comparisons.to_csv(folder / "comparisons.csv", index=False)
    pd.concat(
        [
            an.omnibus.assign(kind="omnibus"),
            an.grid_model.assign(kind="grid model"),
            an.dispersion.assign(kind="dispersion"),
            an.correlations.assign(kind="spearman"),
        ],
        ignore_index=True,
    ).to_csv(folder / "tests.csv", index=False)
    (folder / "cells.md").write_text(_md_table(tables["cells"]))
    (folder / "comparisons.md").write_text(_md_table(tables["comparisons"]))
    from scalemix.report.pdf import CAVEATS

    (folder / "findings.md").write_text(
        f"# {an.grid}{' (' + an.preset + ')' if an.preset else ''}: findings\n\n"
        + "".join(f"- {f}\n" for f in an.findings)
        + ("\n## Warnings\n\n" + "".join(f"- {w}\n" for w in an.warnings) if an.warnings else "")
        + "\n## Caveats\n\n"
        + "".join(f"- {c}\n" for c in CAVEATS)
        + "\n## Tests\n\n"
        + _md_table(tables["omnibus_corr"])
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
        {"pdf": str(pdf_path), "pages": pages, "findings": an.findings, "warnings": an.warnings},
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
