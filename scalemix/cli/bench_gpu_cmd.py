"""``scalemix bench gpu``: the one prepared device check (scalemix/bench/gpu.py)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer

from scalemix.errors import ConfigError


def gpu(
    device: str = typer.Option("auto", help="auto | cuda | cuda:N | cpu."),
    out: Path = typer.Option(
        Path("bench-gpu.json"), "--out", "-o", help="Where the JSON report is written."
    ),
    tiny: bool = typer.Option(
        None,
        "--tiny/--full",
        help="Tiny sizes (ResNet-9 tiny, 8 px, batch 16: a check that the command works, "
        "what CI runs) or the real ones (ResNet-9, 32 px, batch 1024, K = 1 and 16, "
        "physical 128 and 512, fp32 and bf16). Default: full on CUDA, tiny on the CPU.",
    ),
    steps: int = typer.Option(5, min=1, help="Timed steps per configuration (after warm-up)."),
    warmup: int = typer.Option(2, min=0, help="Untimed steps first (autotuning, caches)."),
    tests: bool = typer.Option(True, "--tests/--no-tests", help="Run pytest -m gpu first."),
) -> None:
    """The device benchmark in one command (<= 8 minutes on one GPU): environment and
    precision defaults, the GPU tests, the DP step against non-private through the real
    trainer at K = 1 and 16, physical 128 and 512, fp32 and bf16, host syncs per step by
    source, peak memory, the projected CIFAR-10 epoch and gn_groups grid GPU-hours, and a
    short profile. Prints a line per configuration and writes everything as JSON."""
    from scalemix.bench.gpu import run_gpu_bench
    from scalemix.train import resolve_device

    dev = resolve_device(device)
    if tiny is None:
        tiny = dev.type != "cuda"
    if not tiny and dev.type == "cpu":
        raise ConfigError("--full on the CPU would take hours; use --tiny (or a CUDA device)")
    with tempfile.TemporaryDirectory(prefix="scalemix-bench-gpu-") as tmp:
        report = run_gpu_bench(
            device=dev,
            out_dir=Path(tmp),
            tiny=tiny,
            steps=steps,
            warmup=warmup,
            run_tests=tests,
            log=lambda m: typer.echo(m, err=True),
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(f"bench gpu: {len(report['configurations'])} configurations -> {out}", err=True)
