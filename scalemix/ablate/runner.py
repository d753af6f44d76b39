"""``scalemix ablate``: expand a grid, run the cells that are not finished, show progress.

Every decision is read from the grid directory (store.py), so the command can be killed
at any moment and run again: finished cells are skipped, interrupted ones resume from
their checkpoint, cells another process is training are waited for, never run twice.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from scalemix.ablate.executors import run_local, run_slurm
from scalemix.ablate.grid import Grid
from scalemix.ablate.store import GridDir, counts

FINAL = ("done", "diverged", "failed")


class Monitor:
    """One overall bar (cells finished / total, failures, time left) and a line per running cell."""

    def __init__(self, gd: GridDir, ids: list[str], labels: dict[str, str], slots: int, log):
        self.gd, self.ids, self.labels, self.log = gd, ids, labels, log
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.last_line = 0.0
        self.last_counts: dict | None = None
        self.bar, self.lines = None, []
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=len(ids), unit="cell", desc="grid", dynamic_ncols=True)
            self.lines = [
                tqdm(total=0, position=i + 1, bar_format="{desc}", dynamic_ncols=True)
                for i in range(slots)
            ]

    def tick(self) -> None:
        statuses = {cid: self.gd.status(cid) for cid in self.ids}
        c = counts([{"status": s} for s in statuses.values()])
        finished = sum(c[s] for s in FINAL)
        running = [cid for cid, s in statuses.items() if s == "running"]
        if self.bar is not None:
            self.bar.n = finished
            self.bar.set_postfix(failed=c["failed"], diverged=c["diverged"], running=len(running))
            self.bar.refresh()
            for i, line in enumerate(self.lines):
                line.set_description_str(self._cell_line(running[i]) if i < len(running) else "")
            return
        now = time.monotonic()
        if c != self.last_counts or now - self.last_line > 30:
            self.last_counts, self.last_line = c, now
            self.log(
                f"cells {finished}/{len(self.ids)} finished (done {c['done']}, failed {c['failed']}, "
                f"diverged {c['diverged']}), running: "
                + (", ".join(self._cell_line(cid) for cid in running) or "none")
            )

    def _cell_line(self, cid: str) -> str:
        step, steps = self.gd.progress(cid)
        where = f"step {step}/{steps}" if steps else "starting (data, sigma calibration)"
        return f"  {cid} {self.labels.get(cid, '')}: {where}"

    def close(self) -> None:
        for b in [*self.lines, self.bar]:
            if b is not None:
                b.close()


def preflight(grid: Grid, cells) -> None:
    """Refuse, before any cell starts, what would make every cell fail the same way."""
    from scalemix.errors import DataError

    for data, data_dir, download in {
        (c.config.data, c.config.data_dir, c.config.download) for c in cells
    }:
        if data == "digits":
            continue
        if data_dir is None:
            raise DataError(
                f"grid {grid.name} trains on {data}: add --set data_dir=DIR "
                f"(and --set download=true to fetch it there), or use --preset quick"
            )
        if not download and not Path(data_dir).expanduser().is_dir():
            raise DataError(
                f"grid {grid.name}: data_dir {data_dir} does not exist; "
                "point --set data_dir= at the data, or add --set download=true"
            )


def ablate(
    grid: Grid,
    out: str | Path,
    *,
    workers: int = 1,
    executor: str = "local",
    retry_failed: bool = False,
    wandb=None,
    slurm: dict | None = None,
    cells_per_gpu: int = 1,
    log=print,
    max_rounds: int = 100,
    replan: bool = False,
) -> dict:
    """Run every unfinished cell of ``grid`` into ``out``; return the status counts. The
    first call fixes the grid's analysis plan ([report]); a later call with a different
    one is refused once runs have results, unless ``replan`` (store.fix_analysis_plan)."""
    gd = GridDir(out)
    cells = grid.cells()
    preflight(grid, cells)
    gd.write_plan(grid, cells, replan=replan)
    gd.clear_stop()
    ids = [c.id for c in cells]
    labels = {c.id: c.label for c in cells}
    todo_status = ("pending", "running") + (("failed",) if retry_failed else ())
    monitor = Monitor(gd, ids, labels, workers, log)
    retried: set[str] = set()
    try:
        for _ in range(max_rounds):
            statuses = {cid: gd.status(cid) for cid in ids}
            todo = [
                cid
                for cid in ids
                if statuses[cid] in todo_status
                and not (statuses[cid] == "failed" and cid in retried)
            ]
            if not todo:
                break
            runnable = [cid for cid in todo if statuses[cid] != "running"]
            if not runnable:  # only cells another process is training: wait for them
                monitor.tick()
                time.sleep(2.0)
                continue
            kw = dict(workers=workers, retry_failed=retry_failed, wandb=wandb, tick=monitor.tick)
            if executor == "slurm":
                res = run_slurm(gd.root, runnable, **kw, **(slurm or {}))
            else:
                res = run_local(gd.root, runnable, **kw, cells_per_gpu=cells_per_gpu)
            retried.update(cid for cid, s in res.items() if s == "failed")
            if gd.stop_requested():
                raise KeyboardInterrupt("stop requested")
            if all(s == "taken" for s in res.values()):
                time.sleep(2.0)
        monitor.tick()
    finally:
        monitor.close()
    return counts(gd.table())
