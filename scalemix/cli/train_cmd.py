"""``scalemix train``: one DP-SGD (or non-private) training run into a run directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from scalemix.cli._compat import ParameterSource
from scalemix.cli.options import (
    WS,
    Act,
    Groups,
    ModelName,
    Norm,
    Placement,
    ScaleNorm,
    WandbEntity,
    WandbProject,
)
from scalemix.errors import ConfigError
from scalemix.train.config import TrainConfig
from scalemix.train.rundir import RunDir

DATA, PRIVACY, OPTIM, RUN = "Data", "Privacy", "Optimisation", "Run"
DIAG, TRACK = "Diagnostics", "Weights & Biases"
TRACKING_FLAGS = ("wandb", "wandb_project", "wandb_entity", "wandb_group")
_DEF = TrainConfig()


def train(
    ctx: typer.Context,
    model: ModelName = _DEF.model,
    norm: Norm = None,
    groups: Groups = None,
    scalenorm: ScaleNorm = None,
    placement: Placement = None,
    ws: WS = None,
    act: Act = None,
    data: str = typer.Option(
        _DEF.data,
        help="digits (embedded in scikit-learn, offline) | cifar10 | imagenette.",
        rich_help_panel=DATA,
    ),
    data_dir: Optional[Path] = typer.Option(
        None,
        help="Folder with cifar-10-batches-py/ (CIFAR-10) or train/ and val/ (ImageNette).",
        rich_help_panel=DATA,
    ),
    download: bool = typer.Option(
        False,
        "--download",
        help="Download CIFAR-10 / ImageNette into --data-dir when missing.",
        rich_help_panel=DATA,
    ),
    image_size: Optional[int] = typer.Option(
        None,
        help="ImageNette size in px (default 160); digits upsampling (default 16).",
        rich_help_panel=DATA,
    ),
    aug: str = typer.Option(
        _DEF.aug,
        help="Augmentation: none | crop (reflect-pad 4 crop) | crop-flip (crop + horizontal flip); on the device.",
        rich_help_panel=DATA,
    ),
    aug_mult: int = typer.Option(
        _DEF.aug_mult,
        help="K augmented views per example, averaged before clipping.",
        rich_help_panel=DATA,
    ),
    public_size: int = typer.Option(
        _DEF.public_size,
        help="Public examples for --norm public_batch statistics (NOT protected by DP; "
        "recorded in result.json).",
        rich_help_panel=DATA,
    ),
    public_source: str = typer.Option(
        _DEF.public_source,
        help="Where the public examples come from: split (held out of the training split) or "
        "a .npy/.pt file of uint8 images N x C x H x W from outside the private data.",
        rich_help_panel=DATA,
    ),
    non_private: bool = typer.Option(
        False,
        "--non-private",
        help="Same loop without clipping and noise; reports no epsilon.",
        rich_help_panel=PRIVACY,
    ),
    epsilon: float = typer.Option(
        _DEF.epsilon,
        help="Target epsilon; the noise multiplier is calibrated to it.",
        rich_help_panel=PRIVACY,
    ),
    sigma: Optional[float] = typer.Option(
        None,
        help="Use this noise multiplier instead; the epsilon spent is reported.",
        rich_help_panel=PRIVACY,
    ),
    delta: float = typer.Option(
        _DEF.delta, help="Target delta (must be below 1/N).", rich_help_panel=PRIVACY
    ),
    clip: float = typer.Option(
        _DEF.clip, help="Per-example gradient norm bound C.", rich_help_panel=PRIVACY
    ),
    accountant: str = typer.Option(
        _DEF.accountant, help="prv (default) | rdp.", rich_help_panel=PRIVACY
    ),
    sampler: str = typer.Option(
        _DEF.sampler,
        help="poisson (required under DP) | shuffle (non-private only).",
        rich_help_panel=PRIVACY,
    ),
    noise: str = typer.Option(
        _DEF.noise,
        help="secure (default: batches and noise from a 256-bit OS-CSPRNG key that is never "
        "written) | seeded (reproducible: keyed by --seed and a secret seed key kept outside "
        "the run, $SCALEMIX_SEED_KEY or ~/.config/scalemix/seed-key; epsilon assumes that key "
        "stays secret).",
        rich_help_panel=PRIVACY,
    ),
    audit_canaries: int = typer.Option(
        _DEF.audit_canaries,
        help="Add M canaries (each included with probability 1/2) and audit the run: an "
        "empirical lower bound on epsilon beside the accountant's ('scalemix audit').",
        rich_help_panel=PRIVACY,
    ),
    canary_kind: str = typer.Option(
        _DEF.canary_kind,
        help="gradient (white-box Dirac gradients, observed at every step) | input "
        "(mislabelled training examples, scored by the final model).",
        rich_help_panel=PRIVACY,
    ),
    engine: str = typer.Option(
        _DEF.engine,
        help="Per-example clipping engine: scalemix (fast: book-keeping with ghost norms) | vmap (torch.func reference).",
        rich_help_panel=PRIVACY,
    ),
    precision: str = typer.Option(
        _DEF.precision,
        help="fp32 | bf16: forward and backward under bf16 autocast; per-example norms, clip "
        "factors, the clipped sum and the noise stay fp32, so the bound C holds exactly.",
        rich_help_panel=RUN,
    ),
    epochs: float = typer.Option(
        _DEF.epochs,
        help="Expected passes over the data (steps = round(epochs / q)); may be fractional.",
        rich_help_panel=OPTIM,
    ),
    batch_size: int = typer.Option(
        _DEF.batch_size,
        help="Expected logical batch size (Poisson: q = batch_size / N).",
        rich_help_panel=OPTIM,
    ),
    physical_batch: int = typer.Option(
        _DEF.physical_batch,
        help="Examples per forward/backward chunk (bounds memory).",
        rich_help_panel=OPTIM,
    ),
    lr: float = typer.Option(_DEF.lr, help="Learning rate.", rich_help_panel=OPTIM),
    optimizer: str = typer.Option(
        _DEF.optimizer, help="sgd | momentum (0.9, Nesterov) | nadam.", rich_help_panel=OPTIM
    ),
    weight_decay: float = typer.Option(
        _DEF.weight_decay, help="Weight decay.", rich_help_panel=OPTIM
    ),
    lr_schedule: str = typer.Option(
        _DEF.lr_schedule, help="constant | cosine.", rich_help_panel=OPTIM
    ),
    ema: Optional[float] = typer.Option(
        _DEF.ema, help="EMA decay of the parameters.", rich_help_panel=OPTIM
    ),
    no_ema: bool = typer.Option(False, "--no-ema", help="Keep no EMA.", rich_help_panel=OPTIM),
    diag_every: int = typer.Option(
        _DEF.diag_every,
        help="Steps between diagnostics rows in diagnostics.csv (0: off; step 1 always).",
        rich_help_panel=DIAG,
    ),
    diag_source: str = typer.Option(
        _DEF.diag_source,
        help="train: read the step's own batch (free, but NOT covered by DP) | probe: a fixed "
        "held-out batch in one extra forward pass.",
        rich_help_panel=DIAG,
    ),
    diag_probe_size: int = typer.Option(
        _DEF.diag_probe_size,
        help="--diag-source probe: test-split examples in the probe batch.",
        rich_help_panel=DIAG,
    ),
    wandb: bool = typer.Option(
        False,
        "--wandb",
        help="Log config, metrics and diagnostics to W&B (offline to OUT/wandb without an API key).",
        rich_help_panel=TRACK,
    ),
    wandb_project: WandbProject = "scalemix",
    wandb_entity: WandbEntity = None,
    wandb_group: Optional[str] = typer.Option(None, help="W&B group.", rich_help_panel=TRACK),
    seed: int = typer.Option(
        _DEF.seed,
        help="Public seed of model init and augmentation; in --noise seeded mode it also keys "
        "(with the secret seed key) the batches and noise.",
        rich_help_panel=RUN,
    ),
    device: str = typer.Option(
        _DEF.device, help="auto (a GPU when there is one) | cpu | cuda.", rich_help_panel=RUN
    ),
    out: Path = typer.Option(
        Path(_DEF.out),
        "--out",
        "-o",
        help="Run directory (config.json, metrics.csv, epochs.csv, result.json).",
        rich_help_panel=RUN,
    ),
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
    checkpoint_every: int = typer.Option(
        _DEF.checkpoint_every,
        help="Steps between checkpoints (also at each epoch end).",
        rich_help_panel=RUN,
    ),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch.", rich_help_panel=RUN),
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
    values = dict(ctx.params)
    values.pop("nproc")
    for k in (
        "resume",
        "resume_diverged",
        "quiet",
        "noise_nonce",
        "no_ema",
        "config",
        "set_",
        *TRACKING_FLAGS,
    ):
        values.pop(k)
    if no_ema:
        values["ema"] = None
    for k in ("data_dir", "out"):
        values[k] = None if values[k] is None else str(values[k])
    if sigma is not None:
        values["epsilon"] = None
    if non_private:
        values["epsilon"] = None
    if config is not None or set_:
        values = _layered(ctx, values, config, set_, quiet)
    cfg = TrainConfig.from_dict(values).validate()

    from scalemix.train.loop import train as run_training

    resume = resume or resume_diverged
    if resume:
        saved = RunDir(out).read_config()
        if saved is None:
            raise ConfigError(
                f"--resume: no run in {out} (config.json is missing); drop --resume to start one"
            )
        stored = TrainConfig.from_dict(saved["config"])
        given = {
            p.name
            for p in ctx.command.params
            if ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE
        }
        given -= {"resume", "resume_diverged", "quiet", "noise_nonce", "out", *TRACKING_FLAGS}
        if no_ema:
            given.add("ema")
        mine, theirs = cfg.as_dict(), stored.as_dict()
        clash = sorted(k for k in given if k in mine and mine[k] != theirs[k])
        if clash:
            raise ConfigError(
                f"--resume: {', '.join('--' + k.replace('_', '-') for k in clash)} differ from the run in {out}; "
                "resume with no options but --out, or the same ones"
            )
        cfg = stored.replace(out=str(out), threads=cfg.threads)
    log = (lambda *a, **k: None) if quiet else (lambda msg: typer.echo(msg, err=True))
    if noise_nonce is not None:
        import re

        if cfg.non_private or cfg.noise != "seeded":
            raise ConfigError(
                "--noise-nonce reproduces a seeded run's noise: use it with --noise seeded"
            )
        if not re.fullmatch(r"[0-9a-f]{32}", noise_nonce):
            raise ConfigError(
                f"--noise-nonce {noise_nonce!r} is not 32 hex digits; copy it from the run's "
                "config.json (resolved.randomness.noise_nonce)"
            )
        log(
            "reproducing the noise of the run with nonce "
            f"{noise_nonce}: the two runs share their noise, so publish only one of them"
        )
    elif config is not None and not resume and not quiet:
        from scalemix.train.rundir import read_json

        nonce = ((read_json(Path(config).expanduser()) or {}).get("resolved") or {}).get(
            "randomness", {}
        )
        if isinstance(nonce, dict) and nonce.get("noise_nonce"):
            log(
                "note: this run draws its own noise; to reproduce the noise of the run in "
                f"{config} bit for bit, add --noise-nonce {nonce['noise_nonce']} (then publish "
                "only one of the two)"
            )
    from scalemix.data.datasets import check_available

    check_available(cfg.data, cfg.data_dir, cfg.download)  # errors before any header
    if not quiet:
        log(_describe(cfg))
    tracking = None
    if wandb:
        from scalemix.tracking import WandbSettings

        tracking = WandbSettings(
            project=wandb_project, entity=wandb_entity, group=wandb_group, job_type="train"
        )
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
        ckpt = RunDir(cfg.out).checkpoint
        where = "a checkpoint is saved" if ckpt.exists() else "no step was finished"
        typer.echo(
            f"interrupted; {where}. Resume with: scalemix train --out {cfg.out} --resume",
            err=True,
        )
        return 130
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


def _layered(ctx: typer.Context, flags: dict, config: Path | None, sets: list[str], quiet: bool):
    """defaults < --config FILE < flags given on the command line < --set; says which
    fields each layer set."""
    from scalemix.ablate.grid import parse_sets

    values = TrainConfig().as_dict()
    layers = []
    if config is not None:
        from_file = load_config_file(config)
        # the file's values are checked on their own, even where a later layer overrides them
        TrainConfig.from_dict({**values, **from_file}).check_types()
        values.update(from_file)
        layers.append(f"{config} ({len(from_file)} fields)")
    given = {
        p.name
        for p in ctx.command.params
        if ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE and p.name in flags
    }
    if "sigma" in given or "non_private" in given:
        given.add("epsilon")
    if ctx.get_parameter_source("no_ema") == ParameterSource.COMMANDLINE:
        given.add("ema")
    values.update({k: flags[k] for k in given})
    if given:
        layers.append("flags " + ", ".join(sorted(given)))
    if sets:
        overrides = parse_sets(sets)
        values.update(overrides)
        layers.append("--set " + ", ".join(overrides))
    if not quiet:
        typer.echo("configuration: defaults < " + " < ".join(layers), err=True)
    return values


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
