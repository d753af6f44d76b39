"""``scalemix audit``: recompute a run's one-run privacy audit from what it stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

ALARM_EXIT = 3


def audit(
    run_dir: Path = typer.Argument(..., help="A run directory trained with --audit-canaries M."),
    confidence: float = typer.Option(0.95, help="Confidence of the lower bounds (0.5-0.999)."),
    k_plus: Optional[int] = typer.Option(
        None,
        "--k-plus",
        help="Guess 'in' for exactly this many top-scored canaries (fixed in advance). "
        "Default: Bonferroni over a fixed grid of guess counts.",
    ),
    k_minus: int = typer.Option(
        0, "--k-minus", help="With --k-plus: also guess 'out' for this many lowest-scored."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the audit as JSON only."),
) -> int:
    """Empirical lower bounds on epsilon from the run's canaries, beside the accountant's
    epsilon: Steinke, Nasr & Jagielski 2023 and the f-DP bound of Mahloujifar et al.
    2024, for every adversary the canaries allow (white-box with a secret sampler, white-box
    with known batches, black-box). Exits 3 if a bound exceeds the accountant's epsilon
    at the stated confidence: that is a privacy bug."""
    from scalemix.audit import load_canaries, run_audit, write
    from scalemix.audit.bounds import Bonferroni, Fixed
    from scalemix.errors import ConfigError

    if not 0.5 <= confidence < 1:
        raise ConfigError(f"--confidence must be in [0.5, 1), got {confidence}")
    canaries = load_canaries(run_dir)
    m = len(canaries["member"])
    strategy = Bonferroni()
    if k_plus is not None:
        if k_plus < 1 or k_minus < 0 or k_plus + k_minus > m:
            raise ConfigError(
                f"--k-plus {k_plus} --k-minus {k_minus}: need k+ >= 1, k- >= 0 and k+ + k- <= {m}"
            )
        strategy = Fixed(k_plus, k_minus)
    model_scores = _input_scores(run_dir, canaries) if canaries["kind"] == "input" else None
    eps = canaries.get("epsilon")
    result = run_audit(
        canaries,
        q=float(canaries["q"]),
        sigma=float(canaries["sigma"]),
        clip=float(canaries["clip"]),
        epsilon=None if eps is None or eps != eps else float(eps),  # NaN: non-private
        delta=float(canaries["delta"]),
        confidence=confidence,
        strategy=strategy,
        model_scores=model_scores,
    )
    write(run_dir, result)
    if as_json:
        typer.echo(json.dumps(result, default=float))
    else:
        _print(result)
    if result["alarm"]:
        typer.echo(result["alarm_message"], err=True)
        return ALARM_EXIT
    return 0


def _input_scores(run_dir: Path, canaries: dict):
    import numpy as np
    import torch

    from scalemix.audit import input_canary_scores
    from scalemix.data import load_data, normalize
    from scalemix.errors import ConfigError
    from scalemix.models import create_model
    from scalemix.train import RunDir

    saved = RunDir(run_dir).read_config() or {}
    cfg = saved.get("config")
    state_path = RunDir(run_dir).model
    if cfg is None or not state_path.is_file():
        raise ConfigError(f"{run_dir}: input canaries are scored by model.pt, which is missing")
    if "data_index" not in canaries:
        raise ConfigError(
            f"{run_dir}: its canary file predates index-only input canaries; re-run the audit "
            "with this version"
        )
    # The run's files hold no canary image or label: re-read them from the data set.
    try:
        data = load_data(cfg["data"], cfg.get("data_dir"), size=cfg.get("image_size"))
    except Exception as e:  # no data here: say what to do
        raise ConfigError(
            f"{run_dir}: input canaries are re-read from the {cfg['data']} data set, which "
            f"could not be loaded ({e}); pass the run's data where its config.json says"
        ) from None
    index = torch.from_numpy(np.asarray(canaries["data_index"])).long()
    shift = torch.from_numpy(np.asarray(canaries["shift"])).long()
    num_classes = int(canaries["num_classes"])
    x = data.train_x[index]
    y = (data.train_y[index] + shift) % num_classes
    axes = (saved.get("resolved") or {}).get("model_axes") or {
        k: cfg[k] for k in ("norm", "groups", "scalenorm", "placement", "ws", "act")
    }
    model = create_model(cfg["model"], num_classes=num_classes, in_channels=x.shape[1], **axes)
    model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=False)["model"])
    xn = normalize(x, tuple(canaries["mean"]), tuple(canaries["std"]))
    return input_canary_scores(model, xn, y)


def _print(r: dict) -> None:
    acc = r["accountant_epsilon"]
    typer.echo(
        f"{r['canaries']} {r['kind']} canaries ({r['included']} included), "
        f"{r['steps_observed']} steps, delta {r['delta']:g}, {r['confidence']:.0%} confidence; "
        f"accountant epsilon {'-' if acc is None else f'{acc:.3f}'}"
    )
    typer.echo(f"{'adversary':<28}{'Steinke':>10}{'f-DP':>8}{'k+':>6}{'k-':>5}{'correct':>9}")
    for name, b in r["adversaries"].items():
        s, f = b["steinke"], b["fdp"]
        typer.echo(
            f"{name:<28}{s['epsilon']:>10.3f}{f['epsilon']:>8.3f}"
            f"{s['k_plus'] or '-':>6}{s['k_minus'] if s['k_plus'] else '-':>5}"
            f"{s['correct'] if s['correct'] is not None else '-':>9}"
        )
    c = r["ceiling"]
    typer.echo(
        f"ceiling of {r['canaries']} canaries (all guesses right): Steinke {c['steinke']:.2f}, "
        f"f-DP {c['fdp']:.2f}. Alarm rule: the {r['primary_adversary']} Steinke bound "
        "above the accountant's epsilon."
    )
