"""``scalemix ablate``, ``scalemix grids`` and ``scalemix status``: ablation grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from scalemix.cli.options import WandbEntity, WandbProject
from scalemix.errors import ConfigError

SLURM, TRACK = "SLURM (--executor slurm)", "Weights & Biases"


def ablate(
    grid: str = typer.Option(
        ..., "--grid", "-g", help="Grid name (see 'scalemix grids') or path to a grid .toml file."
    ),
    preset: Optional[str] = typer.Option(
        None, help="Named preset of the grid, e.g. quick (embedded data, minutes on a CPU)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Grid directory (default runs/ablate/GRID[-PRESET])."
    ),
    workers: int = typer.Option(
        1, help="Cells trained at once (local: processes sharing the CPU threads, one per GPU)."
    ),
    executor: str = typer.Option("local", help="local (worker processes) | slurm (submitit)."),
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="Override a config field or replace an axis for every cell: --set epochs=2, "
        "--set data_dir=~/data, --set groups=[1,8], --set seeds=[0,1].",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells; run nothing."),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Run failed cells again (done/diverged never re-run)."
    ),
    replan: bool = typer.Option(
        False,
        "--replan",
        help="Accept a [report] (analysis plan) that differs from the one the grid's first "
        "run fixed, though runs have results; the report shows the change.",
    ),
    no_report: bool = typer.Option(
        False, "--no-report", help="Do not build the report at the end."
    ),
    wandb: bool = typer.Option(
        False,
        "--wandb",
        help="Every cell is a W&B run in group = job_type = the grid's name.",
        rich_help_panel=TRACK,
    ),
    wandb_project: WandbProject = "scalemix",
    wandb_entity: WandbEntity = None,
    slurm_partition: Optional[str] = typer.Option(
        None, help="SLURM partition.", rich_help_panel=SLURM
    ),
    slurm_time: int = typer.Option(
        240, help="Minutes per cell (job time limit).", rich_help_panel=SLURM
    ),
    slurm_gpus: int = typer.Option(1, help="GPUs per task.", rich_help_panel=SLURM),
    gpus_per_cell: int = typer.Option(
        1,
        "--gpus-per-cell",
        help="Data-parallel ranks per cell (SLURM: a G-task job, one GPU per task; the tasks "
        "form one torch.distributed group). Same epsilon as one rank.",
        rich_help_panel=SLURM,
    ),
    cells_per_gpu: int = typer.Option(
        1,
        "--cells-per-gpu",
        help="Local executor with GPUs: K small cells share each GPU (workers = GPUs x K).",
    ),
    slurm_cpus: int = typer.Option(8, help="CPUs per cell.", rich_help_panel=SLURM),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> int:
    """Run an ablation grid: every cell (axes x seeds) is a training run in its own directory.

    Cells are named by a hash of their resolved configuration. A finished cell is never
    re-run; a failed or diverged cell is recorded and the grid goes on. Kill it at any
    moment (kill -9 included) and run the same command again: interrupted cells resume
    from their checkpoint and nothing finished runs twice. At the end the statistical
    report is built (unless --no-report).
    """
    from scalemix.ablate.executors import EXECUTORS
    from scalemix.ablate.grid import load_grid, parse_sets
    from scalemix.ablate.runner import ablate as run_grid

    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r} is not one of: {', '.join(EXECUTORS)}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    g = load_grid(grid, preset, parse_sets(set_))
    cells = g.cells()
    out = out or Path("runs/ablate") / (g.name + (f"-{preset}" if preset else ""))
    log = (lambda *_: None) if quiet else (lambda m: typer.echo(m, err=True))
    if dry_run:
        from scalemix.ablate.store import GridDir

        gd = GridDir(out)
        exists = gd.read_plan() is not None
        typer.echo(
            f"grid {g.name}"
            + (f" (preset {preset})" if preset else "")
            + f": {len(cells)} cells -> {out}"
        )
        for c in cells:
            status = gd.status(c.id) if exists else "pending"
            typer.echo(f"  {c.id}  {status:<8}  {c.label}")
        return 0
    tracking = None
    if wandb:
        from scalemix.tracking import WandbSettings

        tracking = WandbSettings(
            project=wandb_project, entity=wandb_entity, group=g.name, job_type=g.name
        )
    slurm = {
        "partition": slurm_partition,
        "time_min": slurm_time,
        "gpus_per_task": slurm_gpus,
        "cpus_per_task": slurm_cpus,
        "tasks_per_cell": gpus_per_cell,
    }
    if gpus_per_cell < 1 or cells_per_gpu < 1:
        raise ConfigError("--gpus-per-cell and --cells-per-gpu are 1 or more")
    if gpus_per_cell > 1 and executor != "slurm":
        raise ConfigError(
            "--gpus-per-cell runs a cell as a multi-task SLURM job: add --executor slurm "
            "(for one run on this machine, use 'scalemix train --nproc N')"
        )
    log(
        f"grid {g.name}{f' (preset {preset})' if preset else ''}: {len(cells)} cells -> {out} ({executor}, {workers} worker(s))"
    )
    import signal
    import sys

    from scalemix.train.signals import interrupt_on_sigterm

    try:
        with interrupt_on_sigterm():
            c = run_grid(
                g,
                out,
                workers=workers,
                executor=executor,
                retry_failed=retry_failed,
                wandb=tracking,
                slurm=slurm,
                cells_per_gpu=cells_per_gpu,
                log=log,
                replan=replan,
            )
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the summary is not interrupted
        import shlex

        from scalemix.ablate.store import GridDir, counts

        c = counts(GridDir(out).table())
        typer.echo(
            f"interrupted: {c['done']} done, {c['failed']} failed, {c['diverged']} diverged, "
            f"{c['pending'] + c['running']} not finished (their checkpoints are kept).\n"
            f"Resume with: scalemix {shlex.join(sys.argv[1:])}",
            err=True,
        )
        return 130
    typer.echo(json.dumps({"grid": g.name, "out": str(out), "counts": c}))
    if c["failed"]:
        log(
            f"{c['failed']} cell(s) failed: 'scalemix status {out}' shows the errors; --retry-failed runs them again"
        )
    if not no_report and c["done"]:
        from scalemix.report import build_report

        try:
            build_report(out, log=log, wandb=tracking)  # it says "report: N pages -> PDF"
        except ConfigError:
            raise
        except Exception as e:  # the grid's runs are safe; say so and keep the traceback
            import traceback

            err = Path(out) / "report" / "error.log"
            err.parent.mkdir(parents=True, exist_ok=True)
            err.write_text(traceback.format_exc())
            log(
                f"error: the grid finished but its report failed ({type(e).__name__}: {e}); "
                f"traceback in {err}; retry with 'scalemix report {out}'"
            )
            return 1
    return 0 if c["pending"] == 0 and c["running"] == 0 else 1


def grids() -> None:
    """List the grids (ablations/*.toml) with their cell counts and presets."""
    from scalemix.ablate.grid import available_grids, load_grid

    found = available_grids()
    if not found:
        raise ConfigError("no grid files found (looked in $SCALEMIX_GRIDS and ablations/)")
    typer.echo(f"{'grid':<22}{'cells':>6}  presets (cells)")
    for name, path in found.items():
        g = load_grid(str(path))
        presets = ", ".join(f"{p} ({len(load_grid(str(path), p).cells())})" for p in g.presets)
        typer.echo(f"{name:<22}{len(g.cells()):>6}  {presets}")
        first = " ".join(g.description.split())
        typer.echo(f"    {first[:110]}{'...' if len(first) > 110 else ''}")


def status(
    out: Path = typer.Argument(..., help="A grid directory written by 'scalemix ablate'."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """Every cell of a grid: done, failed, diverged, running or pending, with axes and result."""
    from scalemix.ablate.store import GridDir, counts
    from scalemix.privacy.grid import grid_privacy_from_dir

    gd = GridDir(out)
    plan = gd.plan()
    rows = gd.table()
    c = counts(rows)
    joint = grid_privacy_from_dir(out)  # what every run published so far, together
    fixed = gd.analysis_plan()
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "grid": plan["grid"]["name"],
                    "cells": rows,
                    "counts": c,
                    "privacy": joint.as_dict(),
                    "analysis_plan": fixed,
                }
            )
        )
        return
    typer.echo(
        f"grid {plan['grid']['name']} in {out}: "
        + ", ".join(f"{v} {k}" for k, v in c.items())
        + f" (of {len(rows)})"
    )
    typer.echo(f"privacy of the whole grid: {joint.text}")
    if fixed is not None:
        late = [ch for ch in fixed.get("changes", []) if ch.get("results_when_changed")]
        typer.echo(
            f"analysis plan: fixed {fixed['fixed']} (hash {fixed['hash']})"
            + (
                f", after {fixed['results_when_fixed']} run(s) had results"
                if fixed.get("results_when_fixed")
                else ""
            )
            + (f"; changed {len(late)} time(s) after results existed" if late else "")
        )
    alarms = [r["id"] for r in rows if (r["result"] or {}).get("privacy_alarm")]
    if alarms:
        typer.echo(
            f"PRIVACY ALARM in {len(alarms)} cell(s): {', '.join(alarms)} "
            "(the audit's lower bound exceeds the accountant's epsilon: a privacy bug)",
            err=True,
        )
    for r in rows:
        axes = " ".join(f"{k}={v}" for k, v in r["axes"].items()) + f" seed={r['seed']}"
        res = r["result"] or {}
        if r["status"] == "done":
            info = f"acc {res.get('test_acc', 0):.4f} (raw), ema {res.get('test_acc_ema') or 0:.4f}  eps {res.get('epsilon') or 0:.3f}"
            if res.get("epsilon_lower_bound") is not None:
                info += f"  eps_lb {res['epsilon_lower_bound']:.3f}"
            if res.get("privacy_alarm"):
                info += "  PRIVACY ALARM"
        elif r["status"] in ("failed", "diverged"):
            info = str(res.get("error"))[:80]
        else:
            p = r["progress"]
            info = f"step {p['step']}/{p['steps'] or '?'}"
        typer.echo(f"  {r['id']}  {r['status']:<8}  {axes:<40}  {info}")
