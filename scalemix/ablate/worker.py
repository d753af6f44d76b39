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
from scalemix.train.rundir import RunDir, write_json_atomic


def run_cell(
    root: str,
    cid: str,
    *,
    threads: int | None = None,
    device: str | None = None,
    retry_failed: bool = False,
    wandb=None,
    on_decision=None,
) -> str:
    """Train one cell unless it is finished, taken or the grid is stopping.
    ``on_decision(train_it)`` (data-parallel jobs) is told once whether training starts."""
    decide = on_decision or (lambda _: None)
    gd = GridDir(root)
    if gd.stop_requested():  # the grid is being stopped: start nothing new
        decide(False)
        return "stopped"
    lock = gd.lock(cid)
    if not lock.acquire():
        decide(False)
        return "taken"
    decided = False
    try:
        res = gd.result(cid)
        if res is not None:
            if res.get("status") in ("done", "diverged"):
                return res["status"]
            if res.get("status") == "failed" and not retry_failed:
                return "failed"
            RunDir(gd.cell_dir(cid)).result.unlink(missing_ok=True)
        decide(True)
        decided = True
        man = gd.manifest(cid)
        d = gd.cell_dir(cid)
        rd = RunDir(d)
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
        if rd.checkpoint.exists():
            import torch

            try:
                resumed = torch.load(rd.checkpoint, map_location="cpu", weights_only=False)[
                    "step"
                ]
            except Exception:
                resumed = None
        gd.record_attempt(cid, resumed)
        log_path = rd.train_log
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
                    rd.error_log.write_text(traceback.format_exc())
                    write_json_atomic(
                        rd.result,
                        {
                            "status": "failed",
                            "error": f"{type(e).__name__}: {e}",
                            "pid": os.getpid(),
                        },
                    )
                return "failed"
        return result["status"]
    finally:
        if not decided:
            decide(False)
        lock.release()


def run_cell_job(root: str, cid: str, threads: int | None, retry_failed: bool, wandb) -> str:
    """The SLURM (submitit) entry point: one array job per cell. A job of several tasks
    (--gpus-per-cell G) trains its cell with G data-parallel ranks: the tasks form one
    torch.distributed group (rank and world size from submitit's JobEnvironment), rank 0
    takes the cell's lock and decides whether there is work, and tells the others."""
    from scalemix.runtime import keep_cpu_memory

    keep_cpu_memory()
    ranks = _job_ranks()
    if ranks is None:
        return run_cell(root, cid, threads=threads, retry_failed=retry_failed, wandb=wandb)
    import torch.distributed as dist

    rank = dist.get_rank()
    if rank == 0:
        return run_cell(
            root,
            cid,
            threads=threads,
            retry_failed=retry_failed,
            wandb=wandb,
            on_decision=_tell_ranks,
        )
    if not _tell_ranks(None):  # rank 0 found nothing to train
        return "skipped"
    d = GridDir(root).cell_dir(cid)
    cfg = TrainConfig.from_dict(GridDir(root).manifest(cid)["config"])
    cfg = cfg.replace(out=str(d), threads=threads)
    return train(cfg, resume=True, progress=False, log=lambda *_: None)["status"]


def _job_ranks():
    """Inside a submitit job of several tasks: join its process group; else None."""
    try:
        import submitit

        env = submitit.JobEnvironment()
    except (ImportError, RuntimeError):
        return None
    if env.num_tasks < 2:
        return None
    import torch
    import torch.distributed as dist
    from submitit.helpers import TorchDistributedEnvironment

    # RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT from SLURM's task; CUDA_VISIBLE_DEVICES
    # is left as SLURM set it (setting it here, after CUDA may have started in this
    # process, would be ignored): each rank takes cuda:LOCAL_RANK (train/setup.py)
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if torch.cuda.is_available():
        from scalemix.train.setup import resolve_device

        resolve_device("cuda")  # this rank's GPU, current before NCCL starts
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return env.num_tasks


def _tell_ranks(train_it: bool | None) -> bool:
    """Rank 0 broadcasts whether the cell trains; the other ranks receive it."""
    import torch.distributed as dist

    box = [train_it]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])
