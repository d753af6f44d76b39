"""Runs and grid directories for the report tests, built in one place.

``grid_runs`` is the one builder of a runs table (one finished run per configuration and
seed); ``simulated`` and ``simulated_crn`` draw such tables around given cell means;
``quick_runs`` / ``quick_plan`` are the example grid's 24 runs (reports/gn_groups-quick);
``make_grid_dir`` writes a whole grid directory of generated runs for build_report.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from scalemix.ablate import GridDir, load_grid
from scalemix.train.rundir import write_json_atomic

GROUPS_X_SCALENORM = {"groups": (1, 4, 16), "scalenorm": (False, True)}


def grid_runs(values, seeds, axes: dict | None = None, **extra) -> pd.DataFrame:
    """One finished run per configuration (the product of ``axes``, in order) and seed
    (``seeds``: a count or a list), the seed innermost. ``values(**axes, seed=s)`` returns
    the run's test accuracy, or a dict of result columns; it is called in row order, so a
    random generator inside it draws in that order. ``extra`` columns go on every row."""
    axes = axes or GROUPS_X_SCALENORM
    seed_list = range(seeds) if isinstance(seeds, int) else seeds
    rows = []
    for cell in itertools.product(*axes.values()):
        named = dict(zip(axes, cell))
        for s in seed_list:
            v = values(**named, seed=s)
            rows.append(
                {
                    "id": "-".join(map(str, (*cell, s))),
                    "status": "done",
                    "seed": s,
                    **named,
                    **(v if isinstance(v, dict) else {"test_acc": v}),
                    **extra,
                }
            )
    return pd.DataFrame(rows)


def simulated(n_seeds, cell_means, seed, sd=0.005, seed_sd=0.01) -> pd.DataFrame:
    """Runs of a groups x scalenorm grid with the given cell means {(groups, scalenorm):
    mean}, a shift per seed (common to its cells) and independent noise per run."""
    rng = np.random.default_rng(seed)
    seed_eff = rng.normal(0, seed_sd, n_seeds)
    axes = {
        "groups": tuple(dict.fromkeys(g for g, _ in cell_means)),
        "scalenorm": tuple(dict.fromkeys(sn for _, sn in cell_means)),
    }
    return grid_runs(
        lambda groups, scalenorm, seed: (
            cell_means[(groups, scalenorm)] + seed_eff[seed] + rng.normal(0, sd)
        ),
        n_seeds,
        axes,
    )


def simulated_crn(n_seeds, seed, sd=0.005) -> pd.DataFrame:
    """A null groups x scalenorm grid whose cells of one seed share random streams in the
    ways the example grid showed: a seed shift in every cell, one pattern shared by the
    cells of each ScaleNorm level (the no-ScaleNorm cells of a seed correlate ~0.95), and
    a seed x groups pattern whose size grows with the group count (no sphericity)."""
    rng = np.random.default_rng(seed)
    shift = rng.normal(0, 0.02, n_seeds)
    by_sn = rng.normal(0, 0.03, (n_seeds, 2))
    by_g = rng.normal(0, 1.0, n_seeds)[:, None] * np.array([0.002, 0.01, 0.03])
    gi = {1: 0, 4: 1, 16: 2}
    return grid_runs(
        lambda groups, scalenorm, seed: (
            0.8
            + shift[seed]
            + by_sn[seed, int(scalenorm)]
            + by_g[seed, gi[groups]]
            + rng.normal(0, sd)
        ),
        n_seeds,
    )


# ------------------------------------------------------------------ the example grid

# reports/gn_groups-quick (2026-11-23): correct test predictions of 359, seeds 0, 1, 2,
# of the raw weights and of the EMA weights
QUICK = {
    (1, False): ([281, 322, 258], [327, 315, 301]),
    (1, True): ([316, 329, 305], [323, 330, 310]),
    (4, False): ([302, 324, 267], [322, 318, 307]),
    (4, True): ([323, 317, 293], [323, 328, 323]),
    (16, False): ([287, 327, 267], [332, 317, 302]),
    (16, True): ([311, 324, 294], [329, 326, 325]),
    (64, False): ([291, 319, 273], [323, 322, 310]),
    (64, True): ([284, 307, 309], [311, 299, 305]),
}
QUICK_N_TEST = 359
QUICK_AXES = {"groups": (1, 4, 16, 64), "scalenorm": (False, True)}


def quick_runs() -> pd.DataFrame:
    """The example grid's 24 runs (raw and EMA accuracy, test size)."""
    return grid_runs(
        lambda groups, scalenorm, seed: {
            "test_acc": QUICK[(groups, scalenorm)][0][seed] / QUICK_N_TEST,
            "test_acc_ema": QUICK[(groups, scalenorm)][1][seed] / QUICK_N_TEST,
            "test_size": QUICK_N_TEST,
        },
        3,
        QUICK_AXES,
    )


def quick_plan(**report) -> dict:
    """The example grid's plan, with ``report`` keys over its [report]."""
    rep = {
        "primary": "groups",
        "paired": "scalenorm",
        "questions": ["groups", "scalenorm", "groups x scalenorm"],
        **report,
    }
    return {
        "grid": {
            "name": "gn_groups",
            "preset": "quick",
            "axes": {"groups": [1, 4, 16, 64], "scalenorm": [False, True]},
            "seeds": [0, 1, 2],
            "report": rep,
        }
    }


# ------------------------------------------------------------------ grid directories

GRID = """
name = "planted"
description = "generated runs: ScaleNorm adds {effect} points, groups add nothing"
seeds = {seeds}
[base]
model = "resnet9"
data = "digits"
image_size = 8
sigma = 1.0
[axes]
groups = [1, 4, 16]
scalenorm = [false, true]
[report]
primary = "groups"
paired = "scalenorm"
"""

GRID_N_TEST = 600


def make_grid_dir(
    tmp_path, effect: float, seeds: int = 8, fail_one: bool = False, single_axis: bool = False
):
    """A grid directory of generated runs (results, per-example predictions, learning
    curves, diagnostics): ScaleNorm (or, on one axis, groups = 16) adds ``effect``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "planted.toml"
    text = GRID.format(effect=effect, seeds=list(range(seeds)))
    if single_axis:  # one axis, no paired axis: each level against the first
        text = text.replace("scalenorm = [false, true]\n", "").replace('paired = "scalenorm"\n', "")
    p.write_text(text)
    grid = load_grid(str(p))
    cells = grid.cells()
    gd = GridDir(tmp_path / "grid")
    gd.write_plan(grid, cells)
    rng = np.random.default_rng(7)
    seed_effect = rng.normal(0, 0.01, seeds)
    for i, c in enumerate(cells):
        d = gd.cell_dir(c.id)
        boost = c.axes["scalenorm"] if "scalenorm" in c.axes else c.axes["groups"] == 16
        acc = 0.80 + seed_effect[c.seed] + effect * boost + rng.normal(0, 0.004)
        status = "failed" if fail_one and i == 0 else "done"
        write_json_atomic(
            d / "config.json",
            {
                "config": c.config.as_dict(),
                "resolved": {
                    "model_axes": c.config.model_axes().as_dict(),
                    "data": {"shape": [1, 8, 8]},
                    "steps": 20,
                },
            },
        )
        write_json_atomic(
            d / "result.json",
            {
                "status": status,
                "test_acc": acc if status == "done" else None,
                "epsilon": 7.99,
                "delta": 1e-5,
                "sigma": 1.0,
                "clip": 1.5,
                "expected_batch_size": 256,
                "accountant": "prv",
                "sampler": "poisson",
                "noise": "seeded",
                "train_seconds": 10.0,
                "error": "boom" if status == "failed" else None,
            },
        )
        if status == "done":  # per example: each test example right with probability acc
            labels = np.arange(GRID_N_TEST) % 10
            right = rng.random(GRID_N_TEST) < acc
            np.save(d / "test_labels.npy", labels.astype(np.int16))
            np.save(d / "test_predictions.npy", np.where(right, labels, (labels + 1) % 10))
            pd.DataFrame(
                {
                    "step": [10, 20],
                    "epoch": [0.5, 1.0],
                    "epsilon": [5.0, 7.99],
                    "test_acc": [acc - 0.1, acc],
                }
            ).to_csv(d / "epochs.csv", index=False)
        ratio = -1.0 + (0.5 if boost else 0.0)
        rows = [
            {
                "step": s,
                "block": b,
                "metric": "log2_scale_ratio",
                "value": ratio + 0.01 * s + rng.normal(0, 0.05),
                "source": "train",
            }
            for s in (1, 10, 20)
            for b in ("res1", "res2")
        ]
        pd.DataFrame(rows).to_csv(d / "diagnostics.csv", index=False)
    return gd.root


# The plan of the simulated 3 x 2 grid (groups x scalenorm) the report tests analyse.
SIM_PLAN = {
    "grid": {
        "name": "sim",
        "axes": {"groups": [1, 4, 16], "scalenorm": [False, True]},
        "report": {
            "primary": "groups",
            "paired": "scalenorm",
            "questions": ["groups", "scalenorm", "groups x scalenorm"],
        },
    }
}
