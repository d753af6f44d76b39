"""``scalemix report``: the statistical report of a grid directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scalemix.cli.options import WandbEntity, WandbProject


def report(
    grid_dir: Path = typer.Argument(..., help="A grid directory written by 'scalemix ablate'."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="PDF path (default DIR/report/report.pdf; tables beside it)."
    ),
    wandb: bool = typer.Option(
        False, "--wandb", help="Also log the summary tables to the grid's W&B group."
    ),
    wandb_project: WandbProject = "scalemix",
    wandb_entity: WandbEntity = None,
) -> None:
    """Build the PDF report (per-cell statistics, paired tests with Holm correction, omnibus
    tests, scale mixing vs accuracy, findings and caveats) and CSV / Markdown tables."""
    from scalemix.ablate.store import GridDir
    from scalemix.errors import ConfigError
    from scalemix.report import build_report

    if output is not None and output.suffix.lower() != ".pdf":
        raise ConfigError(f"--output {output}: the report is a PDF; give a path ending in .pdf")
    plan = GridDir(grid_dir).plan()
    tracking = None
    if wandb:
        from scalemix.tracking import WandbSettings

        name = plan["grid"]["name"]
        tracking = WandbSettings(
            project=wandb_project, entity=wandb_entity, group=name, job_type=name
        )
    pdf = build_report(grid_dir, output, log=lambda m: typer.echo(m, err=True), wandb=tracking)
    typer.echo(str(pdf))
