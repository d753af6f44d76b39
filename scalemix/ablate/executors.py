"""Where cells run: a local pool of worker processes, or a SLURM job array (submitit).

Local: ``workers`` processes (spawned, so each starts clean), each with
``cpu threads // workers`` torch threads; where GPUs exist, one worker per GPU, each
seeing only its own (``CUDA_VISIBLE_DEVICES``). SLURM: one array task per cell through
submitit, with ``slurm_array_parallelism = workers``. Both call ``worker.run_cell`` and
return {cell id: status}; the caller watches progress from the files meanwhile.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from scalemix.ablate.worker import run_cell, run_cell_job
from scalemix.errors import ConfigError

EXECUTORS = ("local", "slurm")


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # pragma: no cover
        return 0


_worker_gpu: str | None = None


def _init_worker(counter, gpus: int) -> None:
    """Each worker ignores SIGINT: the parent decides how to stop (one SIGTERM each, which
    the trainer turns into checkpoint-and-stop; a second Ctrl-C kills them)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _worker_gpu
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
        _worker_gpu = "cuda"
    from scalemix.runtime import keep_cpu_memory

    keep_cpu_memory()


def _pool_task(root: str, cid: str, threads: int, retry_failed: bool, wandb) -> tuple[str, str]:
    status = run_cell(
        root, cid, threads=threads, device=_worker_gpu, retry_failed=retry_failed, wandb=wandb
    )
    return cid, status


def run_local(
    root, ids, *, workers: int, retry_failed: bool, wandb, tick, cells_per_gpu: int = 1
) -> dict[str, str]:
    gpus = gpu_count()
    if gpus:  # K small cells share each GPU (worker i gets GPU i mod gpus)
        workers = min(workers, gpus * cells_per_gpu)
    threads = max(1, cpu_threads() // workers)
    ctx = mp.get_context("spawn")
    counter = ctx.Value("i", 0)
    out: dict[str, str] = {}
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(counter, gpus)
    )
    try:
        pending = {
            pool.submit(_pool_task, str(root), cid, threads, retry_failed, wandb) for cid in ids
        }
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for f in done:
                cid, status = f.result()
                out[cid] = status
            tick()
    except BaseException:  # Ctrl-C, SIGTERM (as KeyboardInterrupt) or an error: stop cleanly
        stop_workers(pool, root)
        raise
    pool.shutdown(wait=True)
    return out


def stop_workers(pool: ProcessPoolExecutor, root, grace: float = 60.0) -> None:
    """No new cell starts; running cells checkpoint and stop (one SIGTERM each); a second
    Ctrl-C while waiting kills them at once (their last checkpoints stay)."""
    import signal

    from scalemix.ablate.store import GridDir

    GridDir(root).request_stop()
    procs = [p for p in list(getattr(pool, "_processes", {}).values()) if p.is_alive()]
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    try:
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        pass
    for p in procs:
        if p.is_alive():
            p.kill()


def run_slurm(
    root,
    ids,
    *,
    workers: int,
    retry_failed: bool,
    wandb,
    tick,
    partition: str | None = None,
    time_min: int = 240,
    gpus_per_task: int = 1,
    cpus_per_task: int = 8,
    tasks_per_cell: int = 1,
) -> dict[str, str]:
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            "--executor slurm needs submitit: pip install 'scalemix[slurm]' (or pip install submitit)"
        ) from None
    cluster = os.environ.get("SCALEMIX_SUBMITIT_CLUSTER", "slurm")  # tests: "local"
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError(
            "--executor slurm: no SLURM here (sbatch not found); use --executor local"
        )
    ex = submitit.AutoExecutor(folder=str(root / "slurm" / "%j"), cluster=cluster)
    params = {"timeout_min": time_min, "slurm_array_parallelism": workers}
    if tasks_per_cell > 1:  # one data-parallel rank per task (and per GPU on SLURM)
        params["tasks_per_node"] = tasks_per_cell
    if cluster == "slurm":
        params.update(
            slurm_partition=partition,
            gpus_per_node=gpus_per_task * tasks_per_cell,
            cpus_per_task=cpus_per_task,
            name="scalemix-ablate",
        )
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    threads = cpus_per_task if cluster == "slurm" else max(1, cpu_threads() // max(1, workers))
    n = len(ids)
    jobs = ex.map_array(
        run_cell_job, [str(root)] * n, list(ids), [threads] * n, [retry_failed] * n, [wandb] * n
    )
    (root / "slurm" / "jobs.txt").write_text("\n".join(j.job_id for j in jobs) + "\n")
    out: dict[str, str] = {}
    try:
        while len(out) < n:
            for cid, job in zip(ids, jobs):
                if cid in out or not job.done():
                    continue
                try:
                    out[cid] = job.result()
                except Exception as e:  # the job itself died (time limit, node failure)
                    out[cid] = f"failed: {type(e).__name__}"
            tick()
            time.sleep(1.0)
    except BaseException:  # Ctrl-C: nothing new starts; running jobs get SIGTERM (scancel)
        from scalemix.ablate.store import GridDir

        GridDir(root).request_stop()
        for job in jobs:
            if not job.done():
                try:
                    job.cancel(check=False)
                except Exception:  # pragma: no cover - best effort
                    pass
        raise
    return out
