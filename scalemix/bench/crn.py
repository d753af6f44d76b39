"""``scalemix bench crn``: how much of the paired-comparison correlation each shared
random stream buys.

A paired comparison of two cells (here: ScaleNorm on and off) over seeds gains from the
random streams the two cells of a seed share: the difference of two correlated runs
varies less than that of two independent ones, so fewer seeds resolve the same effect.
Each scheme below trains both cells for every seed and reports, over seeds, the
correlation of their test accuracies and losses, the SD of the paired difference, and
``(var A + var B) / var(A - B)``: how many times fewer seeds the pairing needs than two
independent samples would.

=======================  =================================================  ============
scheme                   what the two cells of a seed share                 DP of both
=======================  =================================================  ============
``init+batches+noise``   init, batches, augmentation, noise                 not DP
                         (``--noise seeded-shared``)                        together
``init+batches``         init, batches, augmentation (``--noise seeded``,   joint epsilon
                         the grid default)
``init``                 the model initialisation only (``--noise secure``) composition
``nothing``              nothing (secure, another seed for cell B)          composition
=======================  =================================================  ============
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

SCHEMES = {
    "init+batches+noise": ("seeded-shared", 0),
    "init+batches": ("seeded", 0),
    "init": ("secure", 0),
    "nothing": ("secure", 100_000),
}


def _stats(a: np.ndarray, b: np.ndarray) -> dict:
    d = a - b
    var_d = float(np.var(d, ddof=1)) if len(d) > 1 else float("nan")
    indep = float(np.var(a, ddof=1) + np.var(b, ddof=1)) if len(d) > 1 else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        r = float(np.corrcoef(a, b)[0, 1]) if len(d) > 2 else float("nan")
        gain = indep / var_d if var_d > 0 else float("inf")
    return {
        "corr": r,
        "sd_diff": var_d**0.5,
        "sd_a": float(np.std(a, ddof=1)) if len(a) > 1 else float("nan"),
        "mean_diff": float(d.mean()),
        "seed_gain": gain,
    }


def run_crn_bench(
    *,
    seeds: int = 8,
    model: str = "resnet9_tiny",
    image_size: int = 8,
    epochs: float = 2.0,
    batch_size: int = 128,
    sigma: float = 1.0,
    schemes: tuple[str, ...] = tuple(SCHEMES),
    progress=None,
) -> dict:
    """Train both cells under every scheme for ``seeds`` seeds (digits, CPU)."""
    from scalemix.data import load_data
    from scalemix.train import TrainConfig, Trainer

    data = load_data("digits", size=image_size)
    base = TrainConfig(
        model=model,
        data="digits",
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        physical_batch=batch_size,
        epsilon=None,
        sigma=sigma,
        diag_every=0,
        ema=None,
        device="cpu",
        checkpoint_every=10**6,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="scalemix-crn-") as tmp:
        for name in schemes:
            mode, offset = SCHEMES[name]
            acc = {"a": [], "b": []}
            loss = {"a": [], "b": []}
            for s in range(seeds):
                for cell, scalenorm, seed in (("a", True, s), ("b", False, s + offset)):
                    out = Path(tmp) / f"{name}-{s}-{cell}"
                    cfg = base.replace(noise=mode, seed=seed, scalenorm=scalenorm, out=str(out))
                    res = Trainer(cfg, data=data, progress=False, log=lambda *_: None).run()
                    acc[cell].append(res["test_acc"])
                    loss[cell].append(res["test_loss"])
                if progress:
                    progress(name, s + 1, seeds)
            a, b = np.array(acc["a"]), np.array(acc["b"])
            la, lb = np.array(loss["a"]), np.array(loss["b"])
            rows.append(
                {
                    "scheme": name,
                    "noise_mode": mode,
                    "seeds": seeds,
                    "acc": _stats(a, b),
                    "loss": _stats(la, lb),
                }
            )
    return {
        "model": model,
        "data": f"digits {image_size} px",
        "epochs": epochs,
        "batch_size": batch_size,
        "sigma": sigma,
        "pair": "ScaleNorm on (a) vs off (b)",
        "rows": rows,
    }
