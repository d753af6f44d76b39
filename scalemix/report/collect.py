"""Load every cell of a grid directory into one pandas DataFrame.

One row per planned cell: its id, status, axes (one column per axis), seed, the privacy
settings and results from ``result.json`` (the epsilon a run spent is ``epsilon_spent``,
so that it never collides with an ``epsilon`` axis holding the target), and summaries of its diagnostics: per block,
the final log2 scale ratio and its mean over training (``final_log2_ratio:<block>``,
``mean_log2_ratio:<block>``), their means over blocks, and the final clip fraction and
gradient SNR. ``config_key`` names the configuration without its seed (the same key in
two grids is the same experiment). ``trajectories`` returns the scale-ratio rows of every
cell for plots, ``learning_curves`` each evaluation (step, epsilon spent, accuracy), and
``test_outcomes`` a run's per-example predictions and labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from scalemix.ablate.store import GridDir
from scalemix.diagnostics.recorder import MODEL_ROW
from scalemix.diagnostics.table import read_diagnostics
from scalemix.errors import ConfigError
from scalemix.train.rundir import read_json

RESULT_KEYS = (
    "test_acc",
    "test_acc_ema",
    "test_loss",
    "epsilon",
    "delta",
    "sigma",
    "clip",
    "expected_batch_size",
    "sample_rate",
    "steps",
    "planned_steps",
    "accountant",
    "sampler",
    "noise",
    "epsilon_assumes",
    "epsilon_lower_bound",
    "epsilon_lower_bound_fdp",
    "privacy_alarm",
    "audit_canaries",
    "private",
    "train_seconds",
    "images_per_second",
    "version",
    "error",
)


def _diag_summary(df: pd.DataFrame) -> dict:
    out: dict = {}
    if df.empty:
        return out
    ratio = df[(df.metric == "log2_scale_ratio") & (df.block != MODEL_ROW)]
    if not ratio.empty:
        last = ratio[ratio.step == ratio.step.max()].set_index("block").value
        mean = ratio.groupby("block").value.mean()
        for b in last.index:
            out[f"final_log2_ratio:{b}"] = float(last[b])
            out[f"mean_log2_ratio:{b}"] = float(mean[b])
        out["final_log2_ratio"] = float(last.mean())
        out["mean_log2_ratio"] = float(mean.mean())
        out["diag_source"] = ",".join(sorted(set(ratio.source)))
    model = df[df.block == MODEL_ROW]
    if not model.empty:
        last = model[model.step == model.step.max()].set_index("metric").value
        for m in ("clip_fraction", "grad_snr"):
            if m in last:
                out[f"final_{m}"] = float(last[m])
    return out


def collect(grid_dir) -> tuple[pd.DataFrame, dict]:
    """(runs, plan). ``plan`` is grid.json with, under ``analysis_plan``, the fixed
    analysis plan (analysis-plan.json; None for grids made before plans were fixed).
    Raises ConfigError when the directory has no finished run."""
    gd = GridDir(grid_dir)
    plan = gd.plan()
    plan["analysis_plan"] = gd.analysis_plan()
    axes = list(plan["grid"]["axes"])
    rows = []
    for c in plan["cells"]:
        cid = c["id"]
        d = gd.cell_dir(cid)
        res = read_json(d / "result.json") or {}
        row = {"id": cid, "status": gd.status(cid), "seed": c["seed"], "run_dir": str(d)}
        row.update({k: res.get(k) for k in RESULT_KEYS})
        row["epsilon_spent"] = row.pop("epsilon")  # never confused with an epsilon axis
        row.update({a: c["axes"].get(a) for a in axes})  # axis labels win over result fields
        cfg = (read_json(d / "config.json") or {}).get("resolved", {})
        row["model_axes"] = cfg.get("model_axes")
        row["image_shape"] = (cfg.get("data") or {}).get("shape")
        row["test_size"] = (cfg.get("data") or {}).get("test_size")
        row["train_size"] = cfg.get("train_size")
        row["data_name"] = (cfg.get("data") or {}).get("name")
        row["num_classes"] = (cfg.get("data") or {}).get("num_classes")
        config = (read_json(d / "config.json") or {}).get("config", {})
        row["model"] = config.get("model")
        row["config_key"] = configuration_key(config)
        row.update(_diag_summary(read_diagnostics(d)))
        rows.append(row)
    runs = pd.DataFrame(rows)
    if runs.empty or not (runs.status == "done").any():
        raise ConfigError(
            f"{grid_dir}: no finished run to report on yet ('scalemix status {grid_dir}' shows the cells)"
        )
    return runs, plan


def trajectories(grid_dir, runs: pd.DataFrame, metric: str = "log2_scale_ratio") -> pd.DataFrame:
    """Long rows (id, step, block, value) of one block metric for every finished cell."""
    gd = GridDir(grid_dir)
    parts = []
    for cid in runs.loc[runs.status == "done", "id"]:
        df = read_diagnostics(gd.cell_dir(cid))
        df = df[(df.metric == metric) & (df.block != MODEL_ROW)]
        if not df.empty:
            parts.append(df.assign(id=cid)[["id", "step", "block", "value", "source"]])
    if not parts:
        return pd.DataFrame(columns=["id", "step", "block", "value", "source"])
    return pd.concat(parts, ignore_index=True)


def configuration_key(config: dict) -> str | None:
    """The cell hash of a run's configuration with its seed fixed: equal keys are the
    same experiment in everything but the seed (``ablate.grid.cell_hash``)."""
    if not config:
        return None
    from scalemix.ablate.grid import cell_hash
    from scalemix.train.config import TrainConfig

    try:
        return cell_hash(TrainConfig.from_dict(config).replace(seed=0))
    except (TypeError, ValueError):
        return None


def learning_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Every evaluation of every finished run (epochs.csv): id, step, epsilon_spent,
    test_acc and, where the run kept an EMA, test_acc_ema."""
    parts = []
    for cid, d in runs.loc[runs.status == "done", ["id", "run_dir"]].itertuples(index=False):
        try:
            df = pd.read_csv(Path(d) / "epochs.csv")
        except (FileNotFoundError, pd.errors.EmptyDataError):
            continue
        df = df.rename(columns={"epsilon": "epsilon_spent"})  # never an epsilon axis
        cols = [c for c in ("step", "epsilon_spent", "test_acc", "test_acc_ema") if c in df]
        if "step" in cols and "test_acc" in cols:
            parts.append(df[cols].assign(id=cid))
    if not parts:
        return pd.DataFrame(columns=["id", "step", "epsilon_spent", "test_acc"])
    return pd.concat(parts, ignore_index=True)


def test_outcomes(run_dir, *, ema: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """(predicted class, true class) for every test example of a finished run (of its EMA
    weights with ``ema``), or None when the run did not store them."""
    name = "test_predictions_ema.npy" if ema else "test_predictions.npy"
    try:
        pred = np.load(Path(run_dir) / name)
        label = np.load(Path(run_dir) / "test_labels.npy")
    except (FileNotFoundError, ValueError, OSError):
        return None
    return (pred, label) if pred.shape == label.shape else None
