"""``scalemix train``: one DP-SGD (or non-private) training run into a run directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from scalemix.cli.options import TRACK_PANEL as TRACK
from scalemix.cli.options import WandbEntity, WandbProject, config_options
from scalemix.errors import ConfigError
from scalemix.train.config import RUN, TrainConfig, with_implied
from scalemix.train.rundir import RunDir


@config_options  # a flag for every TrainConfig field, from its declaration: they fill `given`
def train(
    ctx: typer.Context,
    given: dict,
    wandb: bool = typer.Option(
        False,
        "--wandb",
        help="Log config, metrics and diagnostics to W&B (offline to OUT/wandb without an API key).",
        rich_help_panel=TRACK,
    ),
    wandb_project: WandbProject = "scalemix",
    wandb_entity: WandbEntity = None,
    wandb_group: Optional[str] = typer.Option(None, help="W&B group.", rich_help_panel=TRACK),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in --out from its last checkpoint.",
        rich_help_panel=RUN,
    ),
    resume_diverged: bool = typer.Option(
        False,
        "--resume-diverged",
        help="Resume a run that diverged: fresh randomness, and the steps the diverged attempt "
        "released are added to epsilon.",
        rich_help_panel=RUN,
    ),
    config: Optional[Path] = typer.Option(
        None,
        "--config",
        help="Start from a configuration file: a run's config.json (re-run it) or a TOML of "
        "fields (top level or a grid's [base] table). Precedence: defaults < --config < "
        "flags given < --set.",
        rich_help_panel=RUN,
    ),
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="Override any field: --set lr=2e-3 --set aug=crop (TOML values; last wins).",
        rich_help_panel=RUN,
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress bar or epoch lines.", rich_help_panel=RUN
    ),
    noise_nonce: Optional[str] = typer.Option(
        None,
        "--noise-nonce",
        help="Reproduce the noise of the seeded run whose config.json records this nonce "
        "(resolved.randomness.noise_nonce). The two runs then share their noise: publish "
        "only one of them.",
        rich_help_panel=RUN,
    ),
    nproc: int = typer.Option(
        1,
        "--nproc",
        help="Data-parallel ranks on this machine (launches torchrun; gloo on CPU, NCCL on "
        "GPUs): each rank samples its shard with the same q and adds its share of the noise; "
        "one all-reduce per step. Same epsilon, same result directory.",
        rich_help_panel=RUN,
    ),
) -> int:
    """Train one model with DP-SGD (or --non-private) and write a run directory.

    Poisson sampling, per-example clipping at C with the K views averaged first, Gaussian
    noise sigma*C on the sum, division by the expected batch size; sigma is calibrated to
    (--epsilon, --delta, --epochs) with the PRV accountant unless --sigma is given. The
    reported accuracy is the final step's, never the best epoch's.
    """
    if nproc != 1:
        return _launch_ranks(nproc)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 speaks
    quiet = quiet or rank > 0
    cfg = configure(given, config, set_, quiet)
    resume = resume or resume_diverged
    if resume:
        cfg = _resumed(cfg, given)
    log = (lambda *a, **k: None) if quiet else (lambda msg: typer.echo(msg, err=True))
    _check_nonce(noise_nonce, cfg, config if not resume else None, log)
    from scalemix.data.datasets import check_available

    check_available(cfg.data, cfg.data_dir, cfg.download)  # errors before any header
    log(_describe(cfg))
    tracking = None
    if wandb:
        from scalemix.tracking import WandbSettings

        tracking = WandbSettings(
            project=wandb_project, entity=wandb_entity, group=wandb_group, job_type="train"
        )
    from scalemix.train.loop import train as run_training

    try:
        result = run_training(
            cfg,
            resume=resume,
            resume_diverged=resume_diverged,
            progress=not quiet,
            log=log,
            wandb=tracking,
            noise_nonce=noise_nonce,
        )
    except KeyboardInterrupt:
        return _interrupted(cfg.out)
    return _finish(result, cfg.out, rank)


def configure(given: dict, config: Path | None, sets: list[str], quiet: bool) -> TrainConfig:
    """The validated configuration: defaults < --config FILE < the flags given (and what
    they imply: ``with_implied``) < --set. With a file or a --set, says which fields each
    layer set."""
    values, layers = TrainConfig().as_dict(), []
    if config is not None:
        from_file = load_config_file(config)
        # the file's values are checked on their own, even where a later layer overrides them
        TrainConfig.from_dict({**values, **from_file}).check_types()
        values.update(from_file)
        layers.append(f"{config} ({len(from_file)} fields)")
    flags = with_implied(given)
    values.update(flags)
    if flags:
        layers.append("flags " + ", ".join(sorted(flags)))
    if sets:
        from scalemix.ablate.grid import parse_sets

        overrides = parse_sets(sets)
        values.update(overrides)
        layers.append("--set " + ", ".join(overrides))
    if (config is not None or sets) and not quiet:
        typer.echo("configuration: defaults < " + " < ".join(layers), err=True)
    return TrainConfig.from_dict(values).validate()


def _resumed(cfg: TrainConfig, given: dict) -> TrainConfig:
    """The configuration of the run in ``cfg.out``; the fields given as flags must match it."""
    saved = RunDir(cfg.out).read_config()
    if saved is None:
        raise ConfigError(
            f"--resume: no run in {cfg.out} (config.json is missing); drop --resume to start one"
        )
    stored = TrainConfig.from_dict(saved["config"])
    mine, theirs = cfg.as_dict(), stored.as_dict()
    clash = sorted(k for k in given if k != "out" and mine[k] != theirs[k])
    if clash:
        raise ConfigError(
            f"--resume: {', '.join('--' + k.replace('_', '-') for k in clash)} differ from the run in {cfg.out}; "
            "resume with no options but --out, or the same ones"
        )
    return stored.replace(out=cfg.out, threads=cfg.threads)


def _check_nonce(nonce: str | None, cfg: TrainConfig, config: Path | None, log) -> None:
    """--noise-nonce reproduces a seeded run's noise (and says so); a run re-made from a
    seeded run's config.json without it is told how to reproduce that run's noise."""
    if nonce is not None:
        import re

        if cfg.non_private or cfg.noise != "seeded":
            raise ConfigError(
                "--noise-nonce reproduces a seeded run's noise: use it with --noise seeded"
            )
        if not re.fullmatch(r"[0-9a-f]{32}", nonce):
            raise ConfigError(
                f"--noise-nonce {nonce!r} is not 32 hex digits; copy it from the run's "
                "config.json (resolved.randomness.noise_nonce)"
            )
        log(
            "reproducing the noise of the run with nonce "
            f"{nonce}: the two runs share their noise, so publish only one of them"
        )
    elif config is not None:
        from scalemix.train.rundir import read_json

        theirs = ((read_json(Path(config).expanduser()) or {}).get("resolved") or {}).get(
            "randomness", {}
        )
        if isinstance(theirs, dict) and theirs.get("noise_nonce"):
            log(
                "note: this run draws its own noise; to reproduce the noise of the run in "
                f"{config} bit for bit, add --noise-nonce {theirs['noise_nonce']} (then publish "
                "only one of the two)"
            )


def _interrupted(out: str) -> int:
    where = "a checkpoint is saved" if RunDir(out).checkpoint.exists() else "no step was finished"
    typer.echo(f"interrupted; {where}. Resume with: scalemix train --out {out} --resume", err=True)
    return 130


def _finish(result: dict, out: str, rank: int) -> int:
    """Print the summary line; the exit code (1: not done, ALARM_EXIT: privacy alarm)."""
    if rank > 0:
        return 0 if result["status"] == "done" else 1
    # rounded for people; result.json has the full numbers
    typer.echo(json.dumps({k: _round(result[k]) for k in _SHOWN if k in result}))
    if result["status"] != "done":
        typer.echo(
            f"run {result['status']}: {result.get('error')} (see {out}/result.json)", err=True
        )
        return 1
    if result.get("privacy_alarm"):
        from scalemix.cli.audit_cmd import ALARM_EXIT

        typer.echo(f"{'!' * 78}\nPRIVACY ALARM ({out}/audit/audit.json)\n{'!' * 78}", err=True)
        return ALARM_EXIT
    return 0


_SHOWN = (
    "status",
    "test_acc",
    "test_acc_ema",
    "epsilon",
    "delta",
    "noise",
    "epsilon_assumes",
    "sigma",
    "steps",
    "abandoned_steps",
    "epsilon_lower_bound",
    "epsilon_lower_bound_fdp",
    "privacy_alarm",
    "images_per_second",
    "train_seconds",
)


def _round(v, digits: int = 4):
    """A float to ``digits`` significant digits (the printed summary only)."""
    if isinstance(v, float) and v == v and v not in (float("inf"), float("-inf")) and v != 0:
        from math import floor, log10

        return round(v, max(0, digits - 1 - floor(log10(abs(v)))))
    return v


def load_config_file(path: Path) -> dict:
    """Fields from a run's config.json ({"config": {...}}) or a TOML file (top level or
    a grid's [base] table)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file")
    try:
        if p.suffix == ".json":
            raw = json.loads(p.read_text())
            raw = raw.get("config", raw) if isinstance(raw, dict) else raw
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            raw = tomllib.loads(p.read_text())
            raw = raw.get("base", raw)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--config {p}: cannot read it ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {p}: expected a table of configuration fields")
    return raw


def _describe(cfg: TrainConfig) -> str:
    axes = cfg.model_axes()
    mode = (
        "non-private"
        if cfg.non_private
        else (
            f"DP-SGD eps={cfg.epsilon} delta={cfg.delta:g}"
            if cfg.sigma is None
            else f"DP-SGD sigma={cfg.sigma}"
        )
    )
    return (
        f"scalemix train: {cfg.model} norm={axes.norm} groups={axes.groups} scalenorm={axes.scalenorm} "
        f"placement={axes.placement} ws={axes.ws} act={axes.act} | data={cfg.data} | {mode} "
        f"C={cfg.clip} B={cfg.batch_size} K={cfg.aug_mult} epochs={cfg.epochs:g} noise={cfg.noise} -> {cfg.out}"
    )


def _launch_ranks(nproc: int) -> int:
    """Run this same command on ``nproc`` ranks through torchrun; return its exit code."""
    import subprocess
    import sys

    from scalemix.train.distributed import launch_command

    argv = sys.argv[sys.argv.index("train") + 1 :]
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = launch_command(nproc, rest)
    try:
        return subprocess.run(cmd).returncode
    except KeyboardInterrupt:
        return 130
