"""``scalemix bench audit``: the one-run audit across settings, and what canaries cost.

Settings (each over ``seeds`` seeded runs of the same small configuration, gradient
canaries, 95 % confidence, Bonferroni over the fixed grid of guess counts):

- ``non-private``: no clipping noise at all; the bound should sit at the ceiling;
- ``broken``: the noise deliberately scaled by 0.3 while the accountant believes the
  target epsilon (1): the bound should exceed it (the alarm);
- ``eps=1 / 4 / 8``: correct runs; the bound must stay below the accountant's epsilon;
  the *known batches* column is the auditor who also knows the batches (a seeded run
  whose seed key is public).

Cost: the same configuration trained with and without canaries, median step time.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def _broken_noise(scale: float):
    """Deliberately wrong noise (scale x the calibrated std), for this benchmark only."""
    from scalemix.privacy import NoiseSource

    real = NoiseSource.add_
    NoiseSource.add_ = lambda self, t, std: real(self, t, scale * std)
    try:
        yield
    finally:
        NoiseSource.add_ = real


def run_audit_bench(
    *,
    seeds: int = 5,
    canaries: int = 1000,
    model: str = "resnet9_tiny",
    data: str = "digits",
    data_dir: str | None = None,
    image_size: int | None = 8,
    batch_size: int = 256,
    epochs: float = 2.0,
    progress=None,
) -> dict:
    from scalemix.data import load_data
    from scalemix.train import TrainConfig, Trainer

    ds = load_data(data, data_dir, size=image_size)
    base = TrainConfig(
        model=model,
        data=data,
        data_dir=data_dir,
        image_size=image_size,
        batch_size=batch_size,
        physical_batch=min(batch_size, 512),
        epochs=epochs,
        ema=None,
        diag_every=0,
        noise="seeded",
        audit_canaries=canaries,
    )
    settings = [
        ("non-private", dict(non_private=True, epsilon=None), None),
        ("broken (noise x0.3, eps=1)", dict(epsilon=1.0), 0.3),
        ("eps=1", dict(epsilon=1.0), None),
        ("eps=4", dict(epsilon=4.0), None),
        ("eps=8", dict(epsilon=8.0), None),
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="scalemix-audit-bench-") as tmp:
        for name, kw, broken in settings:
            res = []
            for seed in range(seeds):
                cfg = base.replace(seed=seed, out=str(Path(tmp) / f"{len(rows)}-{seed}"), **kw)
                ctx = _broken_noise(broken) if broken else contextlib.nullcontext()
                with ctx:
                    tr = Trainer(cfg, data=ds, progress=False, log=lambda *_: None)
                    res.append(tr.run())
                if progress:
                    progress(name, seed + 1, seeds)
            lb = np.array([r["epsilon_lower_bound"] for r in res])
            fdp = np.array([r["epsilon_lower_bound_fdp"] for r in res])
            known = np.array([r["audit_known_batches_bound"] for r in res])
            eps = res[0]["epsilon"]
            rows.append(
                {
                    "setting": name,
                    "accountant_epsilon": eps,
                    "steinke_mean": float(lb.mean()),
                    "steinke_max": float(lb.max()),
                    "fdp_mean": float(fdp.mean()),
                    "fdp_max": float(fdp.max()),
                    "known_batches_mean": float(known.mean()),
                    "alarms": int(sum(bool(r["privacy_alarm"]) for r in res)),
                    "seeds": seeds,
                    "test_acc_mean": float(np.mean([r["test_acc"] for r in res])),
                }
            )
        from scalemix.audit.bounds import ceiling

        cost = _canary_cost(base.replace(epsilon=8.0), ds, Path(tmp), canaries)
    return {
        "model": model,
        "data": data,
        "canaries": canaries,
        "batch_size": batch_size,
        "epochs": epochs,
        "ceiling": ceiling(canaries),
        "rows": rows,
        "cost": cost,
    }


def _canary_cost(cfg, ds, tmp: Path, canaries: int, rounds: int = 3) -> dict:
    """Median step time with and without canaries (same seeded configuration)."""
    from scalemix.train import Trainer

    times = {"without": [], "with": []}
    acc = {}
    for r in range(rounds):
        for label, m in (("without", 0), ("with", canaries)):
            c = cfg.replace(audit_canaries=m, out=str(tmp / f"cost-{label}-{r}"))
            tr = Trainer(c, data=ds, progress=False, log=lambda *_: None)
            t0 = time.perf_counter()
            res = tr.run()
            times[label].append((time.perf_counter() - t0) / res["steps"])
            acc[label] = res["test_acc"]
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {
        "step_ms_without": med["without"],
        "step_ms_with": med["with"],
        "ratio": med["with"] / med["without"],
        "test_acc_without": acc["without"],
        "test_acc_with": acc["with"],
    }
