"""``scalemix report``: the statistical report of a grid directory, or several grids side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scalemix.cli.options import WandbEntity, WandbProject


def report(
    grid_dirs: list[Path] = typer.Argument(
        ...,
        help="A grid directory written by 'scalemix ablate'; give two or more to put the "
        "configurations they share side by side.",
        metavar="DIR",
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="PDF path (default DIR/report/report.pdf; tables beside it)."
    ),
    wandb: bool = typer.Option(
        False, "--wandb", help="Also log the summary tables to the grid's W&B group."
    ),
    wandb_project: WandbProject = "scalemix",
    wandb_entity: WandbEntity = None,
) -> None:
    """Build the PDF report (per-cell statistics, paired tests with the report-wide Holm
    correction, the grid model, stability, per-example evidence, scale mixing vs accuracy,
    learning curves, findings and caveats) and CSV / Markdown tables.

    With several directories: the configurations the grids share (the same training
    configuration except the seed), side by side, in DIR1/../compare-NAME1-NAME2/report.pdf (-o to choose)."""
    from scalemix.ablate.store import GridDir
    from scalemix.errors import ConfigError
    from scalemix.report import build_report

    if output is not None and output.suffix.lower() != ".pdf":
        raise ConfigError(f"--output {output}: the report is a PDF; give a path ending in .pdf")
    if len(set(map(str, grid_dirs))) != len(grid_dirs):
        raise ConfigError("the same grid directory is named twice; name each grid once")
    plans = [GridDir(d).plan() for d in grid_dirs]  # every directory is a grid, or a clear error
    if len(grid_dirs) > 1:
        if wandb:
            raise ConfigError("--wandb logs one grid's report; run it per grid directory")
        from scalemix.report.compare import compare_grids

        pdf = compare_grids(grid_dirs, output, log=lambda m: typer.echo(m, err=True))
        typer.echo(str(pdf))
        return
    grid_dir, plan = grid_dirs[0], plans[0]
    tracking = None
    if wandb:
        from scalemix.tracking import WandbSettings

        name = plan["grid"]["name"]
        tracking = WandbSettings(
            project=wandb_project, entity=wandb_entity, group=name, job_type=name
        )
    pdf = build_report(grid_dir, output, log=lambda m: typer.echo(m, err=True), wandb=tracking)
    typer.echo(str(pdf))
