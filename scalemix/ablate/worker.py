"""Run one cell of a grid: take its lock, train (resuming a checkpoint), record the outcome.

``run_cell`` is what every executor calls (a local worker process or a SLURM array task).
It returns the cell's status, or ``"taken"`` when another worker holds the cell. A
finished (done / diverged) cell is never trained again; a failed one only with
``retry_failed``. Any error is recorded in the cell's ``result.json`` and ``error.log``
and does not stop the grid.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import replace

from scalemix.ablate.store import GridDir
from scalemix.train import TrainConfig, train
from scalemix.train.rundir import write_json_atomic


def run_cell(
    root: str,
    cid: str,
    *,
    threads: int | None = None,
    device: str | None = None,
    retry_failed: bool = False,
    wandb=None,
) -> str:
    gd = GridDir(root)
    if gd.stop_requested():  # the grid is being stopped: start nothing new
        return "stopped"
    lock = gd.lock(cid)
    if not lock.acquire():
        return "taken"
    try:
        res = gd.result(cid)
        if res is not None:
            if res.get("status") in ("done", "diverged"):
                return res["status"]
            if res.get("status") == "failed" and not retry_failed:
                return "failed"
            (gd.cell_dir(cid) / "result.json").unlink(missing_ok=True)
        man = gd.manifest(cid)
        d = gd.cell_dir(cid)
        cfg = TrainConfig.from_dict(man["config"]).replace(out=str(d), threads=threads)
        if device:
            cfg = cfg.replace(device=device)
        if wandb is not None:
            wandb = replace(
                wandb,
                name=f"{man['grid']}-{cid}",
                tags=tuple(f"{k}={v}" for k, v in man["axes"].items()) + (f"seed={man['seed']}",),
                extra_config={"grid": man["grid"], "cell": cid, "axes": man["axes"]},
            )
        resumed = None
        if (d / "checkpoint.pt").exists():
            import torch

            try:
                resumed = torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=False)[
                    "step"
                ]
            except Exception:
                resumed = None
        gd.record_attempt(cid, resumed)
        log_path = d / "train.log"
        with open(log_path, "a") as fh:

            def log(msg: str) -> None:
                fh.write(msg + "\n")
                fh.flush()

            try:
                result = train(cfg, resume=True, progress=False, log=log, wandb=wandb)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                log(traceback.format_exc())
                if gd.result(cid) is None:  # failed before the trainer could record it
                    (d / "error.log").write_text(traceback.format_exc())
                    write_json_atomic(
                        d / "result.json",
                        {
                            "status": "failed",
                            "error": f"{type(e).__name__}: {e}",
                            "pid": os.getpid(),
                        },
                    )
                return "failed"
        return result["status"]
    finally:
        lock.release()


def run_cell_job(root: str, cid: str, threads: int | None, retry_failed: bool, wandb) -> str:
    """The SLURM (submitit) entry point: one array task per cell."""
    from scalemix.runtime import keep_cpu_memory

    keep_cpu_memory()
    return run_cell(root, cid, threads=threads, retry_failed=retry_failed, wandb=wandb)
