"""``scalemix bench diagnostics``: the cost of recording diagnostics during training.

One Trainer, one process. A round is ``steps`` training steps; every mode takes each of
them from the same sampler state (so all modes see the same Poisson batches), the modes
one after the other in a rotating order, so that a drift in machine speed (frequent on a
shared machine) hits every mode alike instead of the one that ran during it:

    off               diagnostics off
    every_step        residual-block hooks on the training batch + gradient stats, every step
    every_10          the same every 10th step (the default cadence)
    probe_every_step  block statistics from a held-out batch (one extra forward), every step
    probe_every_10    the same every 10th step

A mode's time for a round is its mean step time; the result is the median over rounds,
and overhead = median(mode) / median(off) - 1, with each round's own overhead beside it
and a 95 % interval from the paired per-step differences (how well the run resolves it). The timed region is ``Trainer.train_step``
including the device->host transfer of the diagnostics, which is what training pays.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from scalemix.data import ImageData, normalize
from scalemix.diagnostics.recorder import TrainingDiagnostics
from scalemix.train import TrainConfig, Trainer

MODES = {
    "off": ("train", 0),
    "every_step": ("train", 1),
    "every_10": ("train", 10),
    "probe_every_step": ("probe", 1),
    "probe_every_10": ("probe", 10),
}


def synthetic_data(n: int, size: int, classes: int = 10, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    return ImageData(
        name="synthetic",
        train_x=torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
        train_y=torch.randint(0, classes, (n,), generator=g),
        test_x=torch.randint(0, 256, (512, 3, size, size), generator=g, dtype=torch.uint8),
        test_y=torch.randint(0, classes, (512,), generator=g),
        num_classes=classes,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        source="random uint8 (benchmark)",
    )


def run_diag_bench(
    *,
    model: str = "resnet9",
    batch: int = 64,
    size: int = 32,
    steps: int = 10,
    rounds: int = 3,
    modes: tuple[str, ...] = tuple(MODES),
    device: str = "auto",
    progress=None,
) -> dict:
    if "off" not in modes:
        modes = ("off", *modes)
    data = synthetic_data(max(16 * batch, 1024), size)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            model=model,
            data="digits",  # label only: the data object is passed in
            batch_size=batch,
            physical_batch=batch,
            epsilon=None,
            sigma=1.0,
            epochs=1000,
            ema=None,
            device=device,
            out=f"{tmp}/run",
            diag_every=0,
        )
        tr = Trainer(cfg, data=data, progress=False, log=lambda *_: None)
        probe_x = normalize(tr.test_x[: cfg.diag_probe_size], tr.mean, tr.std)
        recorders = {
            m: TrainingDiagnostics(
                tr.model,
                tr.engine,
                every=every,
                source=src,
                probe_x=probe_x,
                sigma=tr.sigma,
                clip=cfg.clip,
            )
            for m, (src, every) in MODES.items()
            if m in modes
        }
        order = list(recorders)
        times: dict[str, list[float]] = {m: [] for m in order}
        per_step: dict[str, list[float]] = {m: [] for m in order}  # same batches, same order
        tr.diag = recorders["off"]
        with tr.diag:
            tr.train_step()  # warm-up
        for r in range(rounds):
            spent = dict.fromkeys(order, 0.0)
            for j in range(steps):
                state = tr.sampler.state_dict()
                # every mode takes step j on the same batch, one after the other, in an
                # order that rotates, so that drifts in machine speed hit every mode alike
                shift = (r * steps + j) % len(order)
                for m in order[shift:] + order[:shift]:
                    tr.sampler.load_state_dict(state)
                    tr.step = r * steps + j  # each mode sees steps 1, 2, ... (its cadence)
                    rec = tr.diag = recorders[m]
                    with rec:
                        t0 = time.perf_counter()
                        tr.train_step()
                        if tr.device.type == "cuda":
                            torch.cuda.synchronize()
                        dt = time.perf_counter() - t0
                        spent[m] += dt
                        per_step[m].append(dt * 1000)
            for m in order:
                times[m].append(spent[m] / steps * 1000)
            if progress:
                progress(r + 1, rounds)
        threads = torch.get_num_threads()
        dev = str(tr.device)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {
        "model": model,
        "batch": batch,
        "image_size": size,
        "steps_per_round": steps,
        "rounds": rounds,
        "device": dev,
        "threads": threads,
        "median_ms": med,
        "overhead": {m: med[m] / med["off"] - 1 for m in med if m != "off"},
        # the overhead each round measured on its own: the spread a single round can show
        "overhead_per_round": {
            m: [t / o - 1 for t, o in zip(times[m], times["off"])] for m in med if m != "off"
        },
        "overhead_ci95": {m: _paired_ci(per_step[m], per_step["off"]) for m in med if m != "off"},
    }


def _paired_ci(mode_ms: list[float], off_ms: list[float]) -> list[float] | None:
    """95 % interval of the overhead from the per-step differences (each mode took every
    step on the same batch): the report's paired-t interval of the mean difference, over
    the mean step with diagnostics off."""
    from scalemix.report.stats import paired

    if len(off_ms) < 2:
        return None
    p = paired(off_ms, mode_ms)
    mean_off = statistics.fmean(off_ms)
    return [p.ci_low / mean_off, p.ci_high / mean_off]
