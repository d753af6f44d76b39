"""The Typer application: one sub-module per command group."""

from __future__ import annotations

import typer

from scalemix.cli import (
    ablate_cmd,
    audit_cmd,
    bench_cmd,
    bench_gpu_cmd,
    models_cmd,
    privacy_cmd,
    report_cmd,
    spp_cmd,
    train_cmd,
)

app = typer.Typer(
    name="scalemix",
    help=(
        "Differentially private (DP-SGD) training of residual networks, scale-mixing "
        "diagnostics, ablation grids and statistical reports.\n\n"
        "Start with:  scalemix train --out runs/demo   (embedded data, no download, CPU)"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal width
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("train")(train_cmd.train)
app.command("models")(models_cmd.models)
app.command("spp")(spp_cmd.spp)
app.command("ablate")(ablate_cmd.ablate)
app.command("grids")(ablate_cmd.grids)
app.command("status")(ablate_cmd.status)
app.command("report")(report_cmd.report)
app.command("audit")(audit_cmd.audit)
app.add_typer(privacy_cmd.app, name="privacy")
bench_cmd.app.command("gpu")(bench_gpu_cmd.gpu)
app.add_typer(bench_cmd.app, name="bench")


@app.command("version")
def version() -> None:
    """Print the scalemix version."""
    from scalemix import __version__

    typer.echo(__version__)
