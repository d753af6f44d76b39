"""``build_report``: a grid directory in, the report folder out (the PDF, its tables as
CSV and Markdown, findings.md, report.json, and optionally a W&B report run).

Next to the PDF: ``runs.csv``, ``cells.csv/.md``, ``marginals.csv`` (each level's seed
means), ``comparisons.csv/.md``, ``tests.csv``, ``findings.md`` and ``report.json``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scalemix import __version__
from scalemix.privacy.grid import grid_privacy_from_dir
from scalemix.report.analysis import Analysis, analyse
from scalemix.report.collect import collect, learning_curves, trajectories
from scalemix.report.findings import caveats
from scalemix.report.pdf import write_pdf
from scalemix.report.tables import display_tables, md_table
from scalemix.train.rundir import write_json_atomic


def code_version() -> str:
    """scalemix's version, and the git commit of the checkout it runs from (if any)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(root), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        sha, dirty = "", ""
    return __version__ + (f" (git {sha}{'+changes' if dirty else ''})" if sha else "")


def findings_markdown(an: Analysis, tables: dict[str, pd.DataFrame]) -> str:
    """findings.md: the analysis plan, the findings, warnings, caveats, the tests table and
    the levels over seed means."""
    return (
        f"# {an.grid}{' (' + an.preset + ')' if an.preset else ''}: findings\n\n"
        + "## Analysis plan\n\n"
        + "".join(f"{line}\n" for line in an.plan.describe())
        + "\n## Findings\n\n"
        + "".join(f"- {f}\n" for f in an.findings)
        + ("\n## Warnings\n\n" + "".join(f"- {w}\n" for w in an.warnings) if an.warnings else "")
        + "\n## Caveats\n\n"
        + "".join(f"- {c}\n" for c in caveats(an))
        + "\n## Tests\n\n"
        + md_table(tables["omnibus_corr"])
        + "\n## Accuracy per level (seed means over the other axes)\n\n"
        + md_table(tables["marginals"])
    )


def build_report(grid_dir, out_pdf=None, *, log=print, wandb=None) -> Path:
    """Write the PDF and its tables; return the PDF's path."""
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
    (folder / "cells.md").write_text(md_table(tables["cells"]))
    (folder / "comparisons.md").write_text(md_table(tables["comparisons"]))
    (folder / "findings.md").write_text(findings_markdown(an, tables))
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
