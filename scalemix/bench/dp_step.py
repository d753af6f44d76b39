"""``scalemix bench dp-step``: one DP-SGD step per engine, same model, same batch.

Engines (each a complete step: gradients, clipping, noise, optimiser step):
- ``nonprivate``   plain forward/backward over all B*K views + SGD step (the baseline of
                   every ratio);
- ``opacus``       Opacus ``PrivacyEngine.make_private`` with per-sample hooks, as a user calls it;
- ``opacus-ghost`` the same with ``grad_sample_mode="ghost"`` (Opacus's fast gradient clipping);
- ``vmap``         scalemix's torch.func reference engine;
- ``scalemix``     scalemix's fast engine (book-keeping clipping with mixed ghost norms).

scalemix's engines add the secure noise of a real run (ChaCha20 keystream + Box--Muller,
``privacy/randomness.py``); ``noise`` in the result times it alone against torch.randn.

``aug_mult`` K: every example comes with K views (augmentation multiplicity), averaged
before clipping in the DP engines; the non-private step takes the mean loss over the
B*K views (the same gradient, unclipped). Opacus has no notion of views (it would clip
each view as an example), so it is measured at K = 1 only.

Timing: every engine in this process, interleaved round-robin over the repeats so that
drifts in machine speed hit all engines alike; warm-up steps are excluded; the median is
reported, with the ratio to the non-private median of the same run.

Peak memory, two ways:
- tensor peak: the most tensor memory alive at once during one step, counted exactly by
  ``bench/memory.py`` in this process (the same number on every run; what
  ``max_memory_allocated`` reports on a GPU);
- process peak: on the CPU a process's heap peak cannot be attributed to one engine once
  another has run, so each engine runs again in child processes (the median of
  ``memory_runs``; it moves by up to ±15 % between identical runs) and reports the growth
  of its peak resident set over the baseline after the model and batch exist, allocator
  fragmentation included. On CUDA the allocator's peak is read in-process.
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from scalemix.errors import ConfigError

ENGINE_NAMES = ("nonprivate", "opacus", "opacus-ghost", "vmap", "scalemix")
SIGMA, CLIP, LR = 1.0, 1.0, 0.01


def _setup(
    model_name: str,
    batch: int,
    device: torch.device,
    seed: int = 0,
    resolution: int = 32,
    aug_mult: int = 1,
):
    """The model and a batch: x (B, K, 3, H, W) random views, y (B,)."""
    from scalemix.models import create_model

    torch.manual_seed(seed)
    model = create_model(model_name).to(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, aug_mult, 3, resolution, resolution, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return model, x, y


def make_step(engine: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """A closure that runs one complete training step of ``engine`` on x (B, K, ...)."""
    import os

    from scalemix.engine import make_engine
    from scalemix.privacy import NoiseSource, SecretStream
    from scalemix.privacy.mechanism import noisy_mean

    model = copy.deepcopy(model)
    b, k = x.shape[:2]
    if engine == "nonprivate":
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        views, yk = x.flatten(0, 1), y.repeat_interleave(k)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(views), yk).backward()  # mean over B*K views
            opt.step()

        return step
    if engine in ("vmap", "scalemix"):
        e = make_engine(engine, model, CLIP)
        opt = torch.optim.SGD(e.params, lr=LR)
        noise = NoiseSource(SecretStream(os.urandom(32), "noise"))  # as in a secure run

        def step():
            r = e(x, y)
            grads = noisy_mean(r.grads, sigma=SIGMA, clip=CLIP, expected_batch_size=b, noise=noise)
            for p, g in zip(e.params, grads):
                p.grad = g
            opt.step()

        step.engine = e
        return step
    if engine in ("opacus", "opacus-ghost"):
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        if k != 1:
            raise ConfigError(
                f"{engine} has no augmentation multiplicity (it would clip each view as an "
                "example); measure it at --aug-mult 1, or choose nonprivate, vmap, scalemix"
            )
        x = x[:, 0]
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loader = DataLoader(TensorDataset(x, y), batch_size=b)
        pe = PrivacyEngine()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if engine == "opacus":
                model, opt, loader = pe.make_private(
                    module=model,
                    optimizer=opt,
                    data_loader=loader,
                    noise_multiplier=SIGMA,
                    max_grad_norm=CLIP,
                    poisson_sampling=False,
                    grad_sample_mode="hooks",
                )
                criterion = nn.CrossEntropyLoss()
            else:
                model, opt, criterion, loader = pe.make_private(
                    module=model,
                    optimizer=opt,
                    data_loader=loader,
                    criterion=nn.CrossEntropyLoss(),
                    noise_multiplier=SIGMA,
                    max_grad_norm=CLIP,
                    poisson_sampling=False,
                    grad_sample_mode="ghost",
                )

        def step():
            opt.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            opt.step()

        return step
    raise ConfigError(f"unknown engine {engine!r}; choose from {', '.join(ENGINE_NAMES)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_engines(
    engines: list[str],
    model_name: str,
    batch: int,
    repeats: int,
    warmup: int,
    device: torch.device,
    progress=None,
    profile: bool = False,
    aug_mult: int = 1,
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, int], list[dict], list[str]]:
    model, x, y = _setup(model_name, batch, device, aug_mult=aug_mult)
    steps = {e: make_step(e, model, x, y) for e in engines}
    for step in steps.values():
        for _ in range(warmup):
            step()
        _sync(device)
    times: dict[str, list[float]] = {e: [] for e in engines}
    for r in range(repeats):
        for e, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[e].append((time.perf_counter() - t0) * 1000)
        if progress:
            progress(r + 1, repeats)
    # memory after the timing (the tracking costs time): one more step per engine
    tensor_peaks = {e: tensor_peak_mb(step) for e, step in steps.items()}
    engine = getattr(steps.get("scalemix"), "engine", None)
    ledger = dict(engine.memory) if engine is not None else {}
    ways = plan_of(engine) if engine is not None else []
    prof = []
    if profile and device.type == "cpu":
        prof = profile_difference(steps, "scalemix" if "scalemix" in steps else engines[-1])
    return times, tensor_peaks, ledger, prof, ways


def plan_of(engine) -> list[str]:
    """The way each weight layer of the fast engine took in its last call, as text."""
    names = {id(m): n for n, m in engine.model.named_modules()}
    return [f"{names[id(lay.module)]}: {lay.used}" for lay in engine.layers if lay.used]


def profile_difference(steps: dict, engine: str) -> list[dict]:
    """Self CPU time by operator of one step of ``engine`` minus one non-private step (torch
    profiler): where the DP step's extra time goes. Rows sorted by the difference."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for name in ("nonprivate", engine):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps[name]()
        tables[name] = {e.key: (e.self_cpu_time_total / 1000, e.count) for e in prof.key_averages()}
    rows = []
    for op in set(tables["nonprivate"]) | set(tables[engine]):
        np_ms, np_n = tables["nonprivate"].get(op, (0.0, 0))
        dp_ms, dp_n = tables[engine].get(op, (0.0, 0))
        rows.append(
            {
                "op": op,
                "nonprivate_ms": np_ms,
                "nonprivate_calls": np_n,
                "dp_ms": dp_ms,
                "dp_calls": dp_n,
                "difference_ms": dp_ms - np_ms,
            }
        )
    rows.sort(key=lambda r: -abs(r["difference_ms"]))
    return rows


def tensor_peak_mb(step) -> float:
    """The most tensor memory alive at once during one step (bench/memory.py): exact and
    the same on every run; on a GPU what ``max_memory_allocated`` would report."""
    from scalemix.bench.memory import TensorMemory

    with TensorMemory() as mem:
        step()
    return mem.peak_bytes / 2**20


def peak_memory_mb(
    engine: str, model_name: str, batch: int, device: torch.device, aug_mult: int = 1
) -> float:
    """The step's peak memory above the model-and-batch baseline (see module docstring)."""
    if device.type == "cuda":
        model, x, y = _setup(model_name, batch, device, aug_mult=aug_mult)
        step = make_step(engine, model, x, y)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalemix.bench.dp_step",
            engine,
            model_name,
            str(batch),
            str(aug_mult),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"memory probe for {engine} failed: {out.stderr.strip().splitlines()[-1:]}"
        )
    return float(json.loads(out.stdout)["peak_mb"])


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(engine: str, model_name: str, batch: int, aug_mult: int = 1) -> None:
    """Peak resident memory of two steps above the baseline after setup.

    Read from this process's own VmHWM (reset through clear_refs after setup): getrusage's
    ru_maxrss would carry the parent's high-water mark across execve on Linux.
    """
    from scalemix.runtime import keep_cpu_memory

    keep_cpu_memory()
    model, x, y = _setup(model_name, batch, torch.device("cpu"), aug_mult=aug_mult)
    step = make_step(engine, model, x, y)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    step()
    step()
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_mb": (peak - base) / 1024}))


def time_noise(model_name: str, device: torch.device, repeats: int = 10) -> dict[str, float]:
    """Per-step cost of the noise for every parameter of the model: torch's generator (a
    32-bit-seeded Mersenne Twister on the CPU: what scalemix used before) against the
    secure ChaCha20 + Box--Muller noise of every scalemix run; medians in ms."""
    import os

    from scalemix.models import create_model
    from scalemix.privacy import NoiseSource, SecretStream

    params = [torch.zeros_like(p) for p in create_model(model_name).to(device).parameters()]
    noise = NoiseSource(SecretStream(os.urandom(32), "noise"))
    gen = torch.Generator(device=device).manual_seed(0)

    def plain():
        for t in params:
            t.add_(torch.randn(t.shape, generator=gen, device=device), alpha=SIGMA * CLIP)

    def secure():
        noise.add_(params, SIGMA * CLIP)

    out = {"numel": sum(t.numel() for t in params)}
    for name, fn in (("torch_randn_ms", plain), ("secure_chacha20_ms", secure)):
        fn()
        ts = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append((time.perf_counter() - t0) * 1000)
        out[name] = statistics.median(ts)
    return out


def run_bench(
    engines: list[str],
    model_name: str,
    batch: int,
    repeats: int = 10,
    warmup: int = 2,
    device: torch.device | None = None,
    memory: bool = True,
    memory_runs: int = 3,
    progress=None,
    profile: bool = False,
    aug_mult: int = 1,
) -> dict:
    device = device or torch.device("cpu")
    if device.type == "cpu":
        from scalemix.runtime import keep_cpu_memory

        keep_cpu_memory()
    unknown = [e for e in engines if e not in ENGINE_NAMES]
    if unknown:
        raise ConfigError(
            f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINE_NAMES)}"
        )
    if aug_mult < 1:
        raise ConfigError(f"--aug-mult must be at least 1 (got {aug_mult})")
    if aug_mult > 1 and {"opacus", "opacus-ghost"} & set(engines):
        raise ConfigError(
            "Opacus has no augmentation multiplicity (it would clip each view as an "
            "example): with --aug-mult > 1 choose from nonprivate, vmap, scalemix"
        )
    if "nonprivate" not in engines:
        engines = ["nonprivate", *engines]
    times, tensor_peaks, ledger, prof, ways = time_engines(
        engines, model_name, batch, repeats, warmup, device, progress, profile, aug_mult
    )
    base = statistics.median(times["nonprivate"])
    runs = {}
    if memory:  # a process's resident peak moves between identical runs: the median of several
        n = 1 if device.type == "cuda" else max(1, memory_runs)
        runs = {
            e: [peak_memory_mb(e, model_name, batch, device, aug_mult) for _ in range(n)]
            for e in engines
        }
    peaks = {e: statistics.median(v) for e, v in runs.items()}
    base_mem = peaks.get("nonprivate")
    result = {
        "model": model_name,
        "batch": batch,
        "aug_mult": aug_mult,
        "repeats": repeats,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "engines": {},
        "noise": time_noise(model_name, device, repeats),
        # bytes the fast engine held at the end of its backward pass, by what they are
        "scalemix_memory_mb": {k: v / 2**20 for k, v in ledger.items()},
        # the way each weight layer of the fast engine took (engine/ways.py)
        "scalemix_plan": ways,
        "profile": prof,
    }
    for e in engines:
        med = statistics.median(times[e])
        # the ratio in each round (engine and baseline timed back to back): its spread is
        # how far one run of this benchmark can move the headline ratio
        per_round = sorted(t / b for t, b in zip(times[e], times["nonprivate"]))
        result["engines"][e] = {
            "median_ms": med,
            "min_ms": min(times[e]),
            "max_ms": max(times[e]),
            "ratio": med / base,
            "ratio_rounds_median": statistics.median(per_round),
            "ratio_rounds_min": per_round[0],
            "ratio_rounds_max": per_round[-1],
            "peak_mb": peaks.get(e),
            "peak_mb_runs": runs.get(e),
            "memory_ratio": (peaks[e] / base_mem) if memory and base_mem else None,
            "tensor_peak_mb": tensor_peaks[e],
            "tensor_memory_ratio": tensor_peaks[e] / tensor_peaks["nonprivate"],
        }
    return result


if __name__ == "__main__":  # child process of peak_memory_mb
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
