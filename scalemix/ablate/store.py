"""A grid directory on disk: the plan, one run directory per cell, locks, statuses.

    DIR/grid.json               the expanded grid: name, preset, axes, the cells (id, axes, seed)
    DIR/analysis-plan.json      the [report] table as fixed by the first 'ablate' (hash, time,
                                runs with results by then) and every later change to it
    DIR/cells/<id>/manifest.json  the cell: grid, axes, seed, the full configuration
    DIR/cells/<id>/.lock        held (fcntl.flock) by the worker training the cell
    DIR/cells/<id>/attempts.jsonl one line per time a worker started the cell
    DIR/cells/<id>/...          the run directory (config.json, metrics.csv, result.json, ...)

A cell's status comes from the files alone, so it survives any crash: ``result.json``
says done / diverged / failed; otherwise a held lock means running, else pending (a
pending cell with a checkpoint resumes from it). The OS releases a lock when its process
dies, ``kill -9`` included.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from scalemix import __version__
from scalemix.errors import ConfigError
from scalemix.train.rundir import RunDir, read_json, write_json_atomic

PLAN = "grid.json"
ANALYSIS_PLAN = "analysis-plan.json"
STATUSES = ("done", "failed", "diverged", "running", "pending")


class CellLock:
    """An exclusive, non-blocking file lock (released by the OS if the holder dies)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def held_elsewhere(self) -> bool:
        if not self.path.exists():
            return False
        if self.acquire():
            self.release()
            return False
        return True


class GridDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.cells_root = self.root / "cells"

    # ------------------------------------------------------------------ the plan

    def write_plan(self, grid, cells, *, replan: bool = False) -> None:
        old = self.read_plan()
        if old is not None and old["grid"]["name"] != grid.name:
            raise ConfigError(
                f"{self.root} holds grid {old['grid']['name']!r}, not {grid.name!r}; choose another --out"
            )
        self.fix_analysis_plan(grid.report, replan=replan)
        for cell in cells:
            man = RunDir(self.cell_dir(cell.id)).manifest
            if not man.exists():
                write_json_atomic(
                    man,
                    {
                        "id": cell.id,
                        "grid": grid.name,
                        "axes": cell.axes,
                        "seed": cell.seed,
                        "config": cell.config.as_dict(),
                    },
                )
        write_json_atomic(
            self.root / PLAN,
            {
                "grid": grid.summary(),
                "cells": [{"id": c.id, "axes": c.axes, "seed": c.seed} for c in cells],
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "version": __version__,
            },
        )

    def read_plan(self) -> dict | None:
        return read_json(self.root / PLAN)

    # ------------------------------------------------------------------ the analysis plan

    def analysis_plan(self) -> dict | None:
        """The fixed analysis plan (analysis-plan.json), or None for a grid directory made
        before plans were fixed."""
        return read_json(self.root / ANALYSIS_PLAN)

    def results_count(self) -> int:
        """Cells whose run has finished with a result (done or diverged)."""
        n = 0
        for path in self.cells_root.glob("*/result.json") if self.cells_root.is_dir() else []:
            if (read_json(path) or {}).get("status") in ("done", "diverged"):
                n += 1
        return n

    def fix_analysis_plan(self, report: dict, *, replan: bool = False) -> dict:
        """Fix the grid's analysis plan (its [report] table) the first time, with a hash,
        the time and how many runs had results by then; afterwards refuse a different one
        once any run has a result, unless ``replan``: then the change is recorded (the
        report's title page shows it as made after results existed). A change before any
        result is recorded too, and harmless."""
        from scalemix.ablate.grid import normalise_report

        new = normalise_report(report)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        results = self.results_count()
        rec = self.analysis_plan()
        if rec is None:
            rec = {
                "report": new,
                "hash": plan_hash(new),
                "fixed": now,
                "results_when_fixed": results,
                "changes": [],
                "version": __version__,
            }
            prev = ((self.read_plan() or {}).get("grid") or {}).get("report")
            if results and prev is not None and normalise_report(prev) != new:
                rec["changes"].append(  # a grid from before plans were fixed
                    {
                        "time": now,
                        "from": normalise_report(prev),
                        "keys": _changed(normalise_report(prev), new),
                        "results_when_changed": results,
                        "note": "grid.json's [report] before this plan was fixed",
                    }
                )
            write_json_atomic(self.root / ANALYSIS_PLAN, rec)
            return rec
        current = normalise_report(rec["report"])
        if current == new:
            return rec
        keys = _changed(current, new)
        if results and not replan:
            raise ConfigError(
                f"{self.root}: the analysis plan ([report]) was fixed on {rec['fixed']} (hash "
                f"{rec['hash']}) and {results} run(s) have results; the grid's [report] now "
                f"differs in {', '.join(keys)}. Restore it, use a new --out, or add --replan to "
                "record the change (the report will show it as made after results existed)"
            )
        rec["changes"].append(
            {
                "time": now,
                "from": current,
                "from_hash": rec["hash"],
                "to_hash": plan_hash(new),
                "keys": keys,
                "results_when_changed": results,
            }
        )
        rec["report"], rec["hash"] = new, plan_hash(new)
        write_json_atomic(self.root / ANALYSIS_PLAN, rec)
        return rec

    def plan(self) -> dict:
        plan = self.read_plan()
        if plan is None:
            if not self.root.exists():
                raise ConfigError(f"{self.root} does not exist; give a grid directory")
            if RunDir(self.root).config.exists() or RunDir(self.root).result.exists():
                raise ConfigError(
                    f"{self.root} is a single training run, not a grid: its result is in "
                    f"{RunDir(self.root).result} (and 'scalemix audit {self.root}' for an "
                    "audited run); reports compare the cells of a grid made by 'scalemix ablate'"
                )
            raise ConfigError(
                f"{self.root} is not a grid directory (no {PLAN}); grids are made by "
                "'scalemix ablate --grid NAME' (see 'scalemix grids')"
            )
        return plan

    # ------------------------------------------------------------------ cells

    # A stop request: set on Ctrl-C / SIGTERM of 'scalemix ablate'; no worker starts a new
    # cell while it stands; the next 'scalemix ablate' clears it.
    @property
    def stop_file(self) -> Path:
        return self.root / "STOP"

    def request_stop(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.stop_file.write_text("stop requested: no new cell starts\n")

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def clear_stop(self) -> None:
        self.stop_file.unlink(missing_ok=True)

    def cell_dir(self, cid: str) -> Path:
        return self.cells_root / cid

    def lock(self, cid: str) -> CellLock:
        return CellLock(self.cell_dir(cid) / ".lock")

    def manifest(self, cid: str) -> dict:
        man = read_json(RunDir(self.cell_dir(cid)).manifest)
        if man is None:
            raise ConfigError(f"cell {cid}: manifest.json is missing in {self.cell_dir(cid)}")
        return man

    def result(self, cid: str) -> dict | None:
        return RunDir(self.cell_dir(cid)).read_result()

    def status(self, cid: str) -> str:
        res = self.result(cid)
        if res is not None and res.get("status") in ("done", "diverged", "failed"):
            return res["status"]
        return "running" if self.lock(cid).held_elsewhere() else "pending"

    def record_attempt(self, cid: str, resumed_from: int | None) -> None:
        with open(self.cell_dir(cid) / "attempts.jsonl", "a") as fh:
            fh.write(
                json.dumps(
                    {
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "host": socket.gethostname(),
                        "pid": os.getpid(),
                        "resumed_from_step": resumed_from,
                    }
                )
                + "\n"
            )

    def attempts(self, cid: str) -> list[dict]:
        path = self.cell_dir(cid) / "attempts.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def progress(self, cid: str) -> tuple[int, int | None]:
        """(steps done, planned steps) of a cell, from its metrics table and config."""
        rd = RunDir(self.cell_dir(cid))
        cfg = rd.read_config() or {}
        planned = cfg.get("resolved", {}).get("steps")
        last = 0
        path = rd.metrics_path
        if path.exists():
            try:
                with open(path, newline="") as fh:
                    for row in csv.DictReader(fh):
                        if row.get("step"):
                            last = int(float(row["step"]))
            except (OSError, ValueError):
                pass
        return last, planned

    def table(self) -> list[dict]:
        """Every planned cell: id, status, axes, seed, result."""
        rows = []
        for c in self.plan()["cells"]:
            res = self.result(c["id"])
            status = self.status(c["id"])
            done, planned = self.progress(c["id"])
            rows.append(
                {
                    "id": c["id"],
                    "status": status,
                    "axes": c["axes"],
                    "seed": c["seed"],
                    "progress": {"step": done, "steps": planned},
                    "result": _brief(res) if res else None,
                }
            )
        return rows


def plan_hash(report: dict) -> str:
    """SHA-256 (12 hex digits) of a normalised [report] table."""
    import hashlib

    blob = json.dumps(report, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _changed(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _brief(res: dict) -> dict:
    keys = ("test_acc", "test_acc_ema", "epsilon", "sigma", "steps", "train_seconds", "error")
    return {k: res.get(k) for k in keys}


def counts(rows: list[dict]) -> dict:
    out = dict.fromkeys(STATUSES, 0)
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out
