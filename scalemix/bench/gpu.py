"""``scalemix bench gpu``: the one prepared device check, measured through the trainer a
user runs (``Trainer.train_step``: sampling, augmentation, the engine, the finiteness
vote, noise, optimiser, EMA), not a stripped-down step.

It prints, and writes as JSON:

* the environment and the precision defaults (TF32 per product, cuDNN benchmark,
  ``precision_policy``);
* ``pytest -m gpu`` (the GPU tests: the CUDA step against the CPU step, ...);
* the DP step against the non-private step of the same trainer at K = 1 and 16,
  physical batch 128 and 512, fp32 and bf16 (medians over steps after warm-up);
* the host synchronisations of one step, by the source line that asked for them;
* the peak device memory of each configuration;
* the projected CIFAR-10 epoch of the ``gn_groups`` recipe and the grid's GPU-hours;
* a short profile's top operators.

On a machine without CUDA it runs the same code at tiny sizes (``--tiny``, what CI runs),
so that the command never rots; its numbers then say nothing about a GPU.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

SYNCING = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")

# The gn_groups recipe (ablations/gn_groups.toml): CIFAR-10, 50,000 examples, B = 4096,
# K = 16, 60 epochs, 7 group counts x ScaleNorm off / on x 3 seeds.
CIFAR_TRAIN = 50_000
RECIPE = {"batch_size": 4096, "aug_mult": 16, "epochs": 60, "cells": 7 * 2 * 3}


def _environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(
            gpu=p.name,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    from scalemix.engine.base import precision_policy

    env["precision_policy"] = precision_policy()
    return env


def _trainer(device, *, private, k, physical, precision, model, size, batch, n, out):
    from scalemix.bench.diagnostics import synthetic_data
    from scalemix.train import TrainConfig, Trainer

    cfg = TrainConfig(
        model=model,
        norm="group",
        groups=16 if model == "resnet9" else 4,
        data="cifar10",
        aug="crop-flip",
        aug_mult=k,
        batch_size=batch,
        physical_batch=physical,
        epochs=1000,  # never reached: the benchmark takes a few steps
        sigma=1.0,
        epsilon=None,
        non_private=not private,
        noise="secure",
        diag_every=0,
        ema=0.999,
        precision=precision,
        device=str(device),
        out=str(out),
    )
    return Trainer(cfg, data=synthetic_data(n, size), progress=False, log=lambda *_: None)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(tr, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        tr.train_step()
    times = []
    for _ in range(steps):
        _sync(tr.device)
        t0 = time.perf_counter()
        row = tr.train_step()
        _sync(tr.device)
        times.append((time.perf_counter() - t0) / max(row["batch"], 1))  # per example
    return times


def count_syncs(tr) -> Counter:
    """Host reads during one step, by the scalemix source line that asked (file:line).
    On a GPU only reads of device tensors count (a CPU tensor's .tolist() waits for
    nothing); on a CPU run every read counts, those of CPU-side streams included."""
    import scalemix

    package = str(Path(scalemix.__file__).parent)
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def wrap(name, original):
        def wrapped(self, *a, **k):
            f = sys._getframe(1)
            on_device = self.device.type != "cpu" or tr.device.type == "cpu"
            if on_device and f.f_code.co_filename.startswith(package):
                where = f"{Path(f.f_code.co_filename).relative_to(package)}:{f.f_lineno}"
                counts[f"{where} .{name}"] += 1
            return original(self, *a, **k)

        return wrapped

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        tr.train_step()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return counts


def time_keystream(
    device: torch.device, normals: int, examples: int, k: int, reps: int = 3
) -> dict:
    """One step's secure randomness, made both ways (privacy/chacha.py): the noise draw
    (``normals`` Gaussians) and the augmentation words (``examples`` x K views), by the
    ChaCha20 kernel on ``device`` and by OpenSSL on the host (copied to ``device``);
    medians in ms, the same bits either way."""
    from scalemix.privacy.randomness import AugStream, SecretStream

    stream, aug = SecretStream(b"b" * 32, "noise"), AugStream(b"a" * 32)
    index = torch.randperm(CIFAR_TRAIN)[:examples].to(device)
    jobs = {
        "noise": lambda: stream.normal(normals, device),
        "aug": lambda: aug.words(1, index if SecretStream.on_device(device) else index.cpu(), k),
    }
    out = {"normals": normals, "examples": examples, "aug_mult": k}
    saved = SecretStream.device_kernel
    try:
        for where, kernel in (("kernel", True), ("host", False)):
            SecretStream.device_kernel = kernel
            for name, job in jobs.items():
                times = []
                for _ in range(reps + 1):  # the first is a warm-up
                    _sync(device)
                    t0 = time.perf_counter()
                    job()
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                out[f"{name}_{where}_ms"] = round(statistics.median(times[1:]) * 1e3, 3)
    finally:
        SecretStream.device_kernel = saved
    return out


def _profile(tr, top: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tr.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        tr.train_step()
        _sync(tr.device)
    key = "self_cuda_time_total" if tr.device.type == "cuda" else "self_cpu_time_total"
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -getattr(e, key, 0))[:top]:
        rows.append({"op": e.key, "calls": e.count, "self_ms": round(getattr(e, key, 0) / 1e3, 3)})
    return rows


def _run_gpu_tests() -> dict:
    t0 = time.perf_counter()
    tests = Path(__file__).resolve().parents[2] / "tests"
    if not tests.is_dir():
        return {"skipped": "no tests/ beside the package (installed without the repository)"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(tests)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    last = (r.stdout.strip().splitlines() or [""])[-1]
    return {
        "exit_code": r.returncode,
        "summary": last,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run_gpu_bench(
    *,
    device: torch.device,
    out_dir: Path,
    tiny: bool,
    steps: int = 5,
    warmup: int = 2,
    run_tests: bool = True,
    log=print,
) -> dict:
    """Every configuration of the grid below, DP and non-private, through the trainer."""
    if tiny:
        model, size, batch, n = "resnet9_tiny", 8, 16, 256
        grid = [(k, p, prec) for k in (1, 2) for p in (8,) for prec in ("fp32", "bf16")]
    else:
        model, size, batch, n = "resnet9", 32, 1024, 8192
        grid = [(k, p, prec) for k in (1, 16) for p in (128, 512) for prec in ("fp32", "bf16")]
    report: dict = {"environment": _environment(device), "tiny": tiny, "model": model}
    report["settings"] = {"image_size": size, "batch_size": batch, "steps": steps, "warmup": warmup}
    log(json.dumps(report["environment"]))
    if run_tests:
        report["gpu_tests"] = _run_gpu_tests()
        log(f"pytest -m gpu: {report['gpu_tests']}")
    rows = []
    for i, (k, physical, precision) in enumerate(grid):
        row = {"aug_mult": k, "physical_batch": physical, "precision": precision}
        for private in (False, True):
            name = "dp" if private else "nonprivate"
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            tr = _trainer(
                device,
                private=private,
                k=k,
                physical=physical,
                precision=precision,
                model=model,
                size=size,
                batch=batch,
                n=n,
                out=out_dir / f"run-{i}-{name}",
            )
            per_example = _time_steps(tr, steps, warmup)
            row[f"{name}_ms_per_example"] = round(statistics.median(per_example) * 1e3, 4)
            if device.type == "cuda":
                row[f"{name}_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if private:
                syncs = count_syncs(tr)
                row["dp_host_syncs"] = sum(syncs.values())
                row["dp_host_syncs_by_source"] = dict(syncs.most_common())
                if i == 0:
                    report["profile_top_ops"] = _profile(tr)
            del tr
        row["dp_over_nonprivate"] = round(
            row["dp_ms_per_example"] / row["nonprivate_ms_per_example"], 3
        )
        # the gn_groups recipe: one epoch = N examples x K views through the same step
        epoch_s = CIFAR_TRAIN * row["dp_ms_per_example"] / 1e3 * (RECIPE["aug_mult"] / k)
        row["projected_cifar10_epoch_s"] = round(epoch_s, 1)
        row["projected_gn_groups_gpu_hours"] = round(
            epoch_s * RECIPE["epochs"] * RECIPE["cells"] / 3600, 2
        )
        rows.append(row)
        log(
            f"K={k:<2} physical={physical:<3} {precision}: DP {row['dp_ms_per_example']:.3f} ms/ex, "
            f"non-private {row['nonprivate_ms_per_example']:.3f} ms/ex, ratio "
            f"{row['dp_over_nonprivate']:.2f}, host syncs {row['dp_host_syncs']}, projected "
            f"CIFAR-10 epoch {epoch_s:.1f} s"
        )
    report["configurations"] = rows
    from scalemix.models import create_model

    n_params = sum(p.numel() for p in create_model(model, num_classes=10).parameters())
    report["keystream"] = time_keystream(
        device, n_params, batch if tiny else 512, 2 if tiny else RECIPE["aug_mult"]
    )
    log(f"keystream per step (ms): {report['keystream']}")
    report["projection_note"] = (
        "projected from the per-example time at this K, scaled to K = 16 (the gn_groups "
        "recipe: 50,000 examples, B = 4096, 60 epochs, 42 cells); the tiny CPU run's "
        "projection says nothing about a GPU"
    )
    return report
