"""``scalemix privacy epsilon|sigma``: the accountant on its own.

The sampling rate and step count come either directly (``--sample-rate``, ``--steps``) or,
as users think of a run, from ``--batch-size``, ``--dataset-size`` and ``--epochs``
(q = batch size / dataset size, steps = round(epochs / q), as ``scalemix train`` does).
``--json`` repeats every input, the derived q and steps, and the accountant.

The accountants need neither torch nor Opacus, the sigma search computes PRV's reported
bound once or twice (after a few cheaper coarse ones), and every epsilon is kept in
``$SCALEMIX_CACHE_DIR/privacy`` (default ``~/.cache/scalemix/privacy``) for the next call and
for the training run's own calibration (see ``scalemix.privacy.accounting``).
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from scalemix.choices import ACCOUNTANTS
from scalemix.errors import ConfigError

app = typer.Typer(
    help="Privacy accounting for Poisson-subsampled Gaussian DP-SGD (the PRV and RDP "
    "accountants of Opacus, ported; epsilons cached in $SCALEMIX_CACHE_DIR/privacy, default "
    "~/.cache/scalemix/privacy). Give --sample-rate and --steps, or --batch-size, "
    "--dataset-size and --epochs.",
    no_args_is_help=True,
)

SampleRate = typer.Option(
    None, "--sample-rate", help="Poisson sampling rate q = expected batch size / N."
)
Steps = typer.Option(None, "--steps", "-T", help="Number of noisy steps.")
BatchSize = typer.Option(None, "--batch-size", help="Expected batch size (with --dataset-size).")
DatasetSize = typer.Option(None, "--dataset-size", "-N", help="Training examples N.")
Epochs = typer.Option(
    None, "--epochs", help="Expected passes over the data: steps = round(epochs / q)."
)
Delta = typer.Option(..., "--delta", help="Target delta (well below 1/N).")
Accountant = typer.Option("prv", "--accountant", help="prv (tight, default) or rdp.")
Json = typer.Option(False, "--json", help="Print a JSON object with the inputs and the result.")


def _rate_and_steps(sample_rate, steps, batch_size, dataset_size, epochs) -> dict:
    """q and T from either form; one error line naming what is missing or inconsistent."""
    inputs: dict = {}
    if batch_size is not None or dataset_size is not None:
        if batch_size is None or dataset_size is None:
            raise ConfigError("--batch-size and --dataset-size go together (q = B / N)")
        if sample_rate is not None:
            raise ConfigError("give --sample-rate or --batch-size/--dataset-size, not both")
        if not 0 < batch_size <= dataset_size:
            raise ConfigError(
                f"--batch-size {batch_size} must be in 1..--dataset-size ({dataset_size})"
            )
        sample_rate = batch_size / dataset_size
        inputs.update(batch_size=batch_size, dataset_size=dataset_size)
    if epochs is not None:
        if steps is not None:
            raise ConfigError("give --steps or --epochs, not both")
        if sample_rate is None:
            raise ConfigError("--epochs needs the sampling rate: --batch-size and --dataset-size")
        if not epochs > 0:
            raise ConfigError(f"--epochs must be positive, got {epochs}")
        steps = max(1, round(epochs / sample_rate))
        inputs["epochs"] = epochs
    if sample_rate is None or steps is None:
        raise ConfigError(
            "give the sampling rate (--sample-rate, or --batch-size with --dataset-size) and the "
            "length (--steps, or --epochs)"
        )
    return {"sample_rate": sample_rate, "steps": int(steps), **inputs}


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"--accountant {accountant!r} is not one of: {', '.join(ACCOUNTANTS)}")


@app.command("epsilon")
def epsilon(
    sigma: float = typer.Option(..., "--sigma", help="Noise multiplier (noise std / clip norm)."),
    sample_rate: Optional[float] = SampleRate,
    steps: Optional[int] = Steps,
    batch_size: Optional[int] = BatchSize,
    dataset_size: Optional[int] = DatasetSize,
    epochs: Optional[float] = Epochs,
    delta: float = Delta,
    accountant: str = Accountant,
    as_json: bool = Json,
) -> None:
    """The epsilon spent at noise multiplier SIGMA over the given steps and sampling rate."""
    from scalemix.privacy.accounting import epsilon_for

    _check_accountant(accountant)
    run = _rate_and_steps(sample_rate, steps, batch_size, dataset_size, epochs)
    eps = epsilon_for(
        sigma=sigma,
        sample_rate=run["sample_rate"],
        steps=run["steps"],
        delta=delta,
        accountant=accountant,
    )
    out = {"epsilon": eps, "sigma": sigma, "delta": delta, "accountant": accountant, **run}
    typer.echo(json.dumps(out) if as_json else f"{eps:.6g}")


@app.command("sigma")
def sigma(
    epsilon: float = typer.Option(..., "--epsilon", help="Target epsilon."),
    sample_rate: Optional[float] = SampleRate,
    steps: Optional[int] = Steps,
    batch_size: Optional[int] = BatchSize,
    dataset_size: Optional[int] = DatasetSize,
    epochs: Optional[float] = Epochs,
    delta: float = Delta,
    accountant: str = Accountant,
    as_json: bool = Json,
) -> None:
    """The noise multiplier that spends at most EPSILON (and at least 99.5% of it) over the
    given steps."""
    from scalemix.privacy.accounting import epsilon_for, sigma_for

    _check_accountant(accountant)
    run = _rate_and_steps(sample_rate, steps, batch_size, dataset_size, epochs)
    s = sigma_for(
        epsilon=epsilon,
        sample_rate=run["sample_rate"],
        steps=run["steps"],
        delta=delta,
        accountant=accountant,
    )
    spent = epsilon_for(
        sigma=s,
        sample_rate=run["sample_rate"],
        steps=run["steps"],
        delta=delta,
        accountant=accountant,
    )
    out = {
        "sigma": s,
        "target_epsilon": epsilon,
        "epsilon": spent,
        "delta": delta,
        "accountant": accountant,
        **run,
    }
    typer.echo(json.dumps(out) if as_json else f"{s:.6g}")
