"""``scalemix spp``: signal-propagation plot of a model at initialisation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from scalemix.cli.options import WS, Act, Groups, ModelName, Norm, Placement, ScaleNorm
from scalemix.errors import ConfigError


def spp(
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Figure file, .png or .pdf (default: ./spp-MODEL.png)."
    ),
    model: ModelName = "resnet9",
    norm: Norm = None,
    groups: Groups = None,
    scalenorm: ScaleNorm = None,
    placement: Placement = None,
    ws: WS = None,
    act: Act = None,
    data: Optional[str] = typer.Option(
        None, help="Use a real batch (digits | cifar10 | imagenette) instead of N(0,1) input."
    ),
    data_dir: Optional[Path] = typer.Option(None, help="Data folder for --data."),
    batch: int = typer.Option(256, help="Examples in the batch (N(0,1) or the first test images)."),
    resolution: int = typer.Option(32, help="Input size in px for N(0,1) input."),
    seed: int = typer.Option(0, help="Seed for the initialisation and the input."),
    as_json: bool = typer.Option(False, "--json", help="Also print the statistics as JSON."),
) -> None:
    """Plot the average squared channel mean, average channel variance and residual-branch
    variance after every residual addition, at initialisation (Brock et al. 2021)."""
    import torch

    from scalemix.data import load_data, normalize
    from scalemix.diagnostics.spp import plot_spp, signal_propagation
    from scalemix.models import create_model

    out = out or Path(f"spp-{model}.png")
    if out.suffix.lower() not in (".png", ".pdf"):
        raise ConfigError(f"--out {out}: give a .png or .pdf file")
    if batch < 2:
        raise ConfigError("--batch must be at least 2 (variances over the batch)")
    torch.manual_seed(seed)
    if data:
        d = load_data(data, data_dir)
        x = normalize(d.test_x[:batch], d.mean, d.std)
        in_ch, classes, source = d.in_channels, d.num_classes, f"{data} test images"
    else:
        x = torch.randn(
            batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)
        )
        in_ch, classes, source = 3, 10, "N(0,1) input"
    m = create_model(
        model,
        num_classes=classes,
        in_channels=in_ch,
        norm=norm,
        groups=groups,
        scalenorm=scalenorm,
        placement=placement,
        ws=ws,
        act=act,
    )
    rows = signal_propagation(m, x)
    a = m.axes
    label = f"{model} {a.norm}{'(' + str(a.groups) + ')' if a.norm == 'group' else ''} {a.placement} ws={a.ws} scalenorm={a.scalenorm}"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_spp(
        {label: rows}, str(out), f"Signal propagation at initialisation ({source}, batch {len(x)})"
    )
    if as_json:
        typer.echo(json.dumps({"model": model, "axes": a.as_dict(), "blocks": rows}))
    else:
        typer.echo(f"wrote {out}")
