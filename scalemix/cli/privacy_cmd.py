"""``scalemix privacy epsilon|sigma``: the accountant on its own."""

from __future__ import annotations

import json

import typer

from scalemix.privacy import epsilon_for, sigma_for

app = typer.Typer(
    help="Privacy accounting for Poisson-subsampled Gaussian DP-SGD (Opacus's PRV and RDP accountants).",
    no_args_is_help=True,
)

SampleRate = typer.Option(
    ..., "--sample-rate", "-q", help="Poisson sampling rate q = expected batch size / N."
)
Steps = typer.Option(..., "--steps", "-T", help="Number of noisy steps.")
Delta = typer.Option(..., "--delta", help="Target delta (well below 1/N).")
Accountant = typer.Option("prv", "--accountant", help="prv (tight, default) or rdp.")
Json = typer.Option(False, "--json", help="Print a JSON object instead of the bare number.")


@app.command("epsilon")
def epsilon(
    sigma: float = typer.Option(..., "--sigma", help="Noise multiplier (noise std / clip norm)."),
    sample_rate: float = SampleRate,
    steps: int = Steps,
    delta: float = Delta,
    accountant: str = Accountant,
    as_json: bool = Json,
) -> None:
    """epsilon spent by STEPS steps at noise multiplier SIGMA and sampling rate Q."""
    eps = epsilon_for(
        sigma=sigma, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant
    )
    typer.echo(json.dumps({"epsilon": eps}) if as_json else f"{eps:.6g}")


@app.command("sigma")
def sigma(
    epsilon: float = typer.Option(..., "--epsilon", help="Target epsilon."),
    sample_rate: float = SampleRate,
    steps: int = Steps,
    delta: float = Delta,
    accountant: str = Accountant,
    as_json: bool = Json,
) -> None:
    """The noise multiplier that spends at most EPSILON in STEPS steps."""
    s = sigma_for(
        epsilon=epsilon, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant
    )
    typer.echo(json.dumps({"sigma": s}) if as_json else f"{s:.6g}")
