"""A run directory: every file a run writes, named here once, written so that a crash
loses nothing.

    config.json                the configuration as given and as resolved (data set, sigma,
                               q, steps, engine, device, world size, version)
    privacy.json               what epsilon covers and assumes, and what it does not cover
    metrics.csv                one row per step (appended and flushed as the run goes)
    epochs.csv                 one row per evaluation (end of each epoch, last step)
    diagnostics.csv / .json    scale-mixing rows every --diag-every steps, and their meaning
    diagnostics.png            the scale-ratio figure (written at the end, also on failure)
    released.json              what the run has released: committed steps and stream draws,
                               written in every step's commit block (a resume counts it)
    checkpoint.pt              the latest checkpoint (train/checkpoint.py lists what it holds)
    model.pt                   the final weights (and the EMA's), with the configuration
    test_predictions.npy       the final model's class for every test example (int16), and
    test_predictions_ema.npy   the EMA weights' (when --ema), beside
    test_labels.npy            the test labels
    audit/                     canaries and the one-run audit (--audit-canaries only)
    result.json                written once, last, with the final status
    divergence.json            where a diverged attempt stopped and what it had released
    error.log                  the traceback of an unexpected failure
    ranks/<r>/                 rank r's logs in a data-parallel run (r > 0)
    train.log                  the console output of a grid cell (scalemix ablate)
    manifest.json              a grid cell's axes and seed (scalemix ablate)

JSON and checkpoints are written atomically (temporary file + ``os.replace``), so a
reader never sees a half-written file. ``result.json`` exists only for a run that ended.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from pathlib import Path

FINAL_STATUSES = ("done", "diverged", "failed")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_json_atomic(path: Path, data: dict, *, fsync: bool = True) -> None:
    """Write JSON so that a reader sees the old file or the new one, never a mix;
    ``fsync=False`` where surviving the process (not the machine) is enough."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(_clean(data), fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def save_atomic(obj, path: Path) -> None:
    import torch

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CsvLog:
    """An append-only CSV table with a fixed header; ``truncate_after(step)`` for resume."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        self._fh = None

    def truncate_after(self, step: int) -> None:
        """Drop rows of steps after ``step`` (work a resumed run will redo)."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        keep = [
            r for r in rows if r.get("step") not in (None, "") and int(float(r["step"])) <= step
        ]
        with open(self.path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.columns)
            w.writeheader()
            w.writerows({c: r.get(c, "") for c in self.columns} for r in keep)

    def append(self, row: dict) -> None:
        self.extend([row])

    def extend(self, rows: list[dict]) -> None:
        """Append rows and flush once (a step's rows reach the disk together)."""
        if not rows:
            return
        if self._fh is None:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._fh = open(self.path, "a", newline="")
            self._writer = csv.DictWriter(self._fh, fieldnames=self.columns)
            if new:
                self._writer.writeheader()
        self._writer.writerows({c: _fmt(row.get(c)) for c in self.columns} for row in rows)
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


class RunDir:
    """The path of every file a run writes (see the module docstring)."""

    def __init__(self, root: str | Path):
        from scalemix.diagnostics.table import FIGURE, META, TABLE

        self.root = Path(root)
        self.config = self.root / "config.json"
        self.privacy = self.root / "privacy.json"
        self.metrics_path = self.root / "metrics.csv"
        self.epochs_path = self.root / "epochs.csv"
        self.diagnostics = self.root / TABLE
        self.diagnostics_meta = self.root / META
        self.diagnostics_figure = self.root / FIGURE
        self.released = self.root / "released.json"
        self.checkpoint = self.root / "checkpoint.pt"
        self.model = self.root / "model.pt"
        self.test_predictions = self.root / "test_predictions.npy"
        self.test_predictions_ema = self.root / "test_predictions_ema.npy"
        self.test_labels = self.root / "test_labels.npy"
        self.audit = self.root / "audit"
        self.result = self.root / "result.json"
        self.divergence = self.root / "divergence.json"
        self.error_log = self.root / "error.log"
        self.train_log = self.root / "train.log"
        self.manifest = self.root / "manifest.json"

    def rank(self, r: int) -> Path:
        """Where rank r > 0 of a data-parallel run keeps its logs."""
        return self.root / "ranks" / str(r)

    def read_result(self) -> dict | None:
        return read_json(self.result)

    def read_config(self) -> dict | None:
        return read_json(self.config)
