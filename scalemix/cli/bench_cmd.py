"""``scalemix bench``: benchmarks that print medians of repeated runs and ratios."""

from __future__ import annotations

import json
import platform
from typing import Optional

import typer

app = typer.Typer(
    help="Benchmarks: medians of repeated runs, ratios to a baseline measured in the same run.",
    no_args_is_help=True,
)


@app.command("dp-step")
def dp_step(
    model: str = typer.Option("resnet9", help="Architecture (see 'scalemix models')."),
    batch: int = typer.Option(64, help="Examples per step (one physical batch)."),
    aug_mult: int = typer.Option(
        1,
        "--aug-mult",
        help="Views per example K (augmentation multiplicity): the DP engines average each "
        "example's K views before clipping, the non-private step takes the mean over all "
        "B*K views. Opacus runs at K = 1 only.",
    ),
    engines: str = typer.Option(
        "nonprivate,opacus,opacus-ghost,vmap,scalemix",
        help="Comma-separated: nonprivate, opacus, opacus-ghost, vmap, scalemix (with "
        "--aug-mult > 1 the default leaves Opacus out).",
    ),
    repeats: int = typer.Option(10, help="Timed steps per engine (after warm-up)."),
    warmup: int = typer.Option(2, help="Untimed warm-up steps per engine."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    memory: bool = typer.Option(
        True,
        "--memory/--no-memory",
        help="Also measure each engine's process peak memory (child processes); the tensor "
        "peak is always measured.",
    ),
    memory_runs: int = typer.Option(
        3, help="Child processes per engine for the process peak (the median is reported)."
    ),
    profile: bool = typer.Option(
        False,
        "--profile",
        help="Also profile one step (CPU, torch.profiler) and list the operators where the "
        "DP step spends more or less than the non-private one.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """Time one DP-SGD step (clipping, noise, optimiser) per engine on the same model and batch.

    Memory two ways: the tensor peak (every tensor alive at once during a step, counted
    exactly: the same on every run, what a GPU's max_memory_allocated reports) and the
    process peak (resident memory of a fresh process, allocator fragmentation included;
    the median of --memory-runs, as it moves between identical runs).
    """
    from scalemix.bench.dp_step import run_bench
    from scalemix.errors import ConfigError
    from scalemix.train import resolve_device

    if batch < 1 or repeats < 1 or warmup < 0 or memory_runs < 1 or aug_mult < 1:
        raise ConfigError(
            "--batch, --aug-mult, --repeats and --memory-runs must be positive, --warmup >= 0"
        )
    names = [e.strip() for e in engines.split(",") if e.strip()]
    if aug_mult > 1 and engines == "nonprivate,opacus,opacus-ghost,vmap,scalemix":
        names = [e for e in names if not e.startswith("opacus")]  # the default, without Opacus
    dev = resolve_device(device)

    def progress(done, total):
        if not as_json:
            typer.echo(f"  repeat {done}/{total}", err=True)

    res = run_bench(
        names, model, batch, repeats, warmup, dev, memory, memory_runs, progress, profile, aug_mult
    )
    res["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    if as_json:
        typer.echo(json.dumps(res))
        return
    typer.echo(
        f"{model}, batch {batch}, K {aug_mult}, {res['device']}, {res['threads']} threads, "
        f"median of {repeats}"
    )
    typer.echo(
        f"{'engine':<14}{'median ms':>11}{'min-max ms':>15}{'ratio':>8}{'ratio per round':>18}"
        f"{'tensor MB':>11}{'ratio':>7}{'process MB':>12}{'runs':>13}{'ratio':>7}"
    )
    for name, r in res["engines"].items():
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        mr = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
        runs = r.get("peak_mb_runs") or []
        run_range = f"{min(runs):.0f}-{max(runs):.0f}" if runs else "-"
        spread = f"{r['min_ms']:.0f}-{r['max_ms']:.0f}"
        rounds = f"{r['ratio_rounds_min']:.2f}-{r['ratio_rounds_max']:.2f}"
        typer.echo(
            f"{name:<14}{r['median_ms']:>11.1f}{spread:>15}{r['ratio']:>8.2f}{rounds:>18}"
            f"{r['tensor_peak_mb']:>11.0f}{r['tensor_memory_ratio']:>7.2f}{peak:>12}"
            f"{run_range:>13}{mr:>7}"
        )
    typer.echo(
        "ratio: median step / median non-private step; ratio per round: the range of the "
        "ratio between steps timed back to back; tensor MB: most tensor memory alive at "
        "once in a step (exact); process MB: median growth of a fresh process's resident "
        "peak over --memory-runs runs (their range beside it)"
    )
    if res.get("scalemix_plan"):
        typer.echo("scalemix engine, each layer's way: " + "; ".join(res["scalemix_plan"]))
    held = res.get("scalemix_memory_mb") or {}
    if held:
        typer.echo(
            "scalemix engine, what it holds at the end of the backward pass: "
            + "; ".join(f"{k} {v:.1f} MB" for k, v in held.items())
        )
    if res["profile"]:
        typer.echo("one step profiled, self CPU ms by operator (DP minus non-private), top 12:")
        for r in res["profile"][:12]:
            typer.echo(
                f"  {r['difference_ms']:+8.1f}  {r['op'][:48]:<48} non-private "
                f"{r['nonprivate_ms']:7.1f} ({r['nonprivate_calls']})  DP {r['dp_ms']:7.1f} "
                f"({r['dp_calls']})"
            )
    nz = res["noise"]
    share = nz["secure_chacha20_ms"] / res["engines"].get("scalemix", r)["median_ms"]
    typer.echo(
        f"noise for {nz['numel']:,} parameters: secure (ChaCha20) {nz['secure_chacha20_ms']:.1f} ms, "
        f"torch.randn {nz['torch_randn_ms']:.1f} ms per step ({share:.1%} of the scalemix step)"
    )


@app.command("train")
def train_e2e(
    data: str = typer.Option("cifar10", help="digits | cifar10 | imagenette."),
    data_dir: str = typer.Option(None, help="Data folder (as for 'scalemix train')."),
    model: str = typer.Option("resnet9", help="Architecture."),
    batch_size: int = typer.Option(512, help="Expected logical batch size (both pipelines)."),
    physical_batch: int = typer.Option(32, help="Physical batch (both pipelines)."),
    epsilon: float = typer.Option(
        8.0, help="Target epsilon used to calibrate sigma (both pipelines)."
    ),
    epochs: float = typer.Option(1.0, help="Epochs used to calibrate sigma."),
    steps: int = typer.Option(3, help="Logical steps per pipeline per round."),
    rounds: int = typer.Option(2, help="Alternating rounds."),
    engine: str = typer.Option("scalemix", help="scalemix engine to compare."),
    non_private_baseline: bool = typer.Option(
        False,
        "--non-private-baseline",
        help="Also time 'scalemix train --non-private' (same loop, no clipping, no noise) "
        "and report the DP pipeline's images/s as a share of it.",
    ),
    opacus: bool = typer.Option(
        True, "--opacus/--no-opacus", help="Time the Opacus recipe (needs opacus installed)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """images/s of 'scalemix train' vs the founding paper's recipe on Opacus (same data, model,
    batches), and optionally vs the same loop without DP."""
    import tempfile

    from scalemix.bench.e2e import run_e2e
    from scalemix.train import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            data=data,
            data_dir=data_dir,
            model=model,
            batch_size=batch_size,
            physical_batch=physical_batch,
            epsilon=epsilon,
            epochs=epochs,
            engine=engine,
            out=f"{tmp}/run",
            ema=None,
        ).validate()
        res = run_e2e(
            cfg,
            steps,
            rounds,
            log=(lambda *_: None) if as_json else (lambda m: typer.echo(m, err=True)),
            non_private=non_private_baseline,
            opacus=opacus,
        )
    if as_json:
        typer.echo(json.dumps(res))
        return
    ips = res["images_per_second"]
    line = (
        f"{model} on {data}, logical batch {batch_size}, physical {physical_batch}: "
        f"scalemix {ips['scalemix']:.1f} img/s"
    )
    if "opacus" in ips:
        line += f", Opacus recipe {ips['opacus']:.1f} img/s (speed-up {res['speedup']:.2f}x)"
    if "non-private" in ips:
        line += (
            f", non-private {ips['non-private']:.1f} img/s "
            f"(DP at {res['share_of_non_private']:.2f}x of non-private)"
        )
    typer.echo(line)


@app.command("diagnostics")
def diagnostics(
    model: str = typer.Option("resnet9", help="Architecture."),
    batch: int = typer.Option(64, help="Examples per step (one physical batch)."),
    image_size: int = typer.Option(32, help="Synthetic image size in px (CIFAR-10: 32)."),
    steps: int = typer.Option(10, help="Training steps per mode per round."),
    rounds: int = typer.Option(3, help="Rounds (the median is over rounds)."),
    modes: str = typer.Option(
        "off,every_step,every_10,probe_every_step,probe_every_10",
        help="Comma-separated modes; 'off' is always measured (the baseline).",
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """Step time with diagnostics off, every step and every 10 steps (training batch or held-out probe)."""
    from scalemix.bench.diagnostics import MODES, run_diag_bench
    from scalemix.errors import ConfigError

    names = tuple(m.strip() for m in modes.split(",") if m.strip())
    bad = [m for m in names if m not in MODES]
    if bad:
        raise ConfigError(f"--modes: unknown {', '.join(bad)}; choose from {', '.join(MODES)}")
    if min(batch, steps, rounds, image_size) < 1:
        raise ConfigError("--batch, --steps, --rounds and --image-size must be positive")

    def progress(done, total):
        if not as_json:
            typer.echo(f"  round {done}/{total}", err=True)

    res = run_diag_bench(
        model=model,
        batch=batch,
        size=image_size,
        steps=steps,
        rounds=rounds,
        modes=names,
        device=device,
        progress=progress,
    )
    res["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    if as_json:
        typer.echo(json.dumps(res))
        return
    typer.echo(
        f"{model}, batch {batch}, {image_size} px, {res['device']}, {res['threads']} threads, "
        f"median over {rounds} rounds of {steps} steps"
    )
    typer.echo(f"{'mode':<18}{'median ms':>11}{'overhead':>10}{'95% CI':>18}  per round")
    for m, ms in res["median_ms"].items():
        ov = "-" if m == "off" else f"{100 * res['overhead'][m]:+.1f}%"
        ci = res["overhead_ci95"].get(m)
        ci_s = f"{100 * ci[0]:+.1f}% to {100 * ci[1]:+.1f}%" if ci else "-"
        per = ", ".join(f"{100 * o:+.1f}%" for o in res["overhead_per_round"].get(m, []))
        typer.echo(f"{m:<18}{ms:>11.1f}{ov:>10}{ci_s:>18}  {per}")


@app.command("audit")
def audit_bench(
    seeds: int = typer.Option(5, help="Seeded runs per setting."),
    canaries: int = typer.Option(1000, help="Gradient canaries per run (M)."),
    model: str = typer.Option("resnet9_tiny", help="Architecture (small: many runs)."),
    data: str = typer.Option("digits", help="digits | cifar10 | imagenette."),
    data_dir: Optional[str] = typer.Option(None, help="Data folder (as for 'scalemix train')."),
    image_size: Optional[int] = typer.Option(8, help="Digits upsampling / ImageNette size."),
    batch_size: int = typer.Option(256, help="Expected batch size."),
    epochs: float = typer.Option(2.0, help="Epochs per run."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """The one-run privacy audit across settings (non-private, a deliberately broken
    mechanism, correct runs at epsilon 1/4/8, the known-batches auditor) and what
    canaries cost per step."""
    from scalemix.bench.audit import run_audit_bench
    from scalemix.errors import ConfigError

    if seeds < 1 or canaries < 2:
        raise ConfigError("--seeds must be >= 1 and --canaries >= 2")

    def progress(name, done, total):
        if not as_json:
            typer.echo(f"  {name}: seed {done}/{total}", err=True)

    res = run_audit_bench(
        seeds=seeds,
        canaries=canaries,
        model=model,
        data=data,
        data_dir=data_dir,
        image_size=image_size,
        batch_size=batch_size,
        epochs=epochs,
        progress=progress,
    )
    res["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    if as_json:
        typer.echo(json.dumps(res, default=float))
        return
    c = res["ceiling"]
    typer.echo(
        f"{model} on {data}, B={batch_size}, {epochs:g} epochs, M={canaries} gradient canaries, "
        f"{seeds} seeds; 95 % bounds; ceiling Steinke {c['steinke']:.2f}, f-DP {c['fdp']:.2f}"
    )
    typer.echo(
        f"{'setting':<28}{'acct eps':>9}{'Steinke mean/max':>18}{'f-DP mean/max':>16}"
        f"{'known batches':>15}{'alarms':>8}"
    )
    for r in res["rows"]:
        acct = "-" if r["accountant_epsilon"] is None else f"{r['accountant_epsilon']:.2f}"
        typer.echo(
            f"{r['setting']:<28}{acct:>9}{r['steinke_mean']:>10.2f} / {r['steinke_max']:<5.2f}"
            f"{r['fdp_mean']:>8.2f} / {r['fdp_max']:<5.2f}{r['known_batches_mean']:>13.2f}"
            f"{r['alarms']:>8}/{r['seeds']}"
        )
    k = res["cost"]
    typer.echo(
        f"cost: {k['step_ms_with']:.1f} ms per step with canaries vs {k['step_ms_without']:.1f} "
        f"without ({k['ratio']:.2f}x, whole run incl. the audit); test accuracy "
        f"{k['test_acc_with']:.4f} vs {k['test_acc_without']:.4f}"
    )


@app.command("crn")
def crn_bench(
    seeds: int = typer.Option(8, help="Seeds per scheme (each trains two cells)."),
    model: str = typer.Option("resnet9_tiny", help="Architecture (small: many runs)."),
    image_size: int = typer.Option(8, help="Digits upsampling."),
    epochs: float = typer.Option(2.0, help="Epochs per run."),
    batch_size: int = typer.Option(128, help="Expected batch size."),
    sigma: float = typer.Option(1.0, help="Noise multiplier."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """How much of a paired comparison's correlation each shared random stream buys
    (init, batches and augmentation, noise): ScaleNorm on vs off, over seeds."""
    from scalemix.bench.crn import run_crn_bench
    from scalemix.errors import ConfigError

    if seeds < 3:
        raise ConfigError("--seeds must be >= 3 (a correlation needs three pairs)")

    def progress(name, done, total):
        if not as_json:
            typer.echo(f"  {name}: seed {done}/{total}", err=True)

    res = run_crn_bench(
        seeds=seeds,
        model=model,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        sigma=sigma,
        progress=progress,
    )
    res["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    if as_json:
        typer.echo(json.dumps(res, default=float))
        return
    typer.echo(
        f"{model}, digits {image_size} px, {epochs:g} epochs, B={batch_size}, sigma {sigma:g}, "
        f"{seeds} seeds; pair: {res['pair']}"
    )
    typer.echo(
        f"{'shared streams':<22}{'corr acc':>9}{'sd diff':>9}{'gain':>7}"
        f"{'corr loss':>11}{'sd diff':>9}{'gain':>7}"
    )
    for r in res["rows"]:
        a, lo = r["acc"], r["loss"]
        typer.echo(
            f"{r['scheme']:<22}{a['corr']:>9.2f}{100 * a['sd_diff']:>8.2f}p{a['seed_gain']:>7.1f}"
            f"{lo['corr']:>11.2f}{lo['sd_diff']:>9.4f}{lo['seed_gain']:>7.1f}"
        )
    typer.echo(
        "gain = (var a + var b) / var(a - b): how many times fewer seeds the pairing needs "
        "than two independent samples"
    )
