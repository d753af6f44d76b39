"""``scalemix models``: the architectures and the axes each accepts."""

from __future__ import annotations

import json

import typer


def models(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the architectures, their default axes and the axes each accepts."""
    from scalemix.models import create_model, describe_models

    rows = describe_models()
    for r in rows:
        r["num_params"] = sum(p.numel() for p in create_model(r["name"]).parameters())
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=list))
        return
    for r in rows:
        d = r["defaults"]
        typer.echo(
            f"{r['name']:<10} {r['num_params'] / 1e6:6.2f} M  {r['description']}  [data: {r['data']}]"
        )
        typer.echo(
            f"{'':<12}defaults: norm={d['norm']} groups={d['groups']} scalenorm={d['scalenorm']} "
            f"placement={d['placement']} ws={d['ws']} act={d['act']}"
        )
        axes = "; ".join(
            f"{k}: {v if isinstance(v, str) else '|'.join(map(str, v))}"
            for k, v in r["axes"].items()
        )
        typer.echo(f"{'':<12}axes: {axes}")
