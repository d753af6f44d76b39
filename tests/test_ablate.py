"""Ablation grids: expansion, hashing, the run loop (resume after kill -9, failure
isolation, locks), the submitit path, status and dry-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from scalemix.ablate import GridDir, ablate, cell_hash, load_grid
from scalemix.ablate.worker import run_cell
from scalemix.cli.app import app
from scalemix.errors import ConfigError
from scalemix.train import TrainConfig

TINY = """
name = "tiny"
description = "test grid"
seeds = [0]

[base]
model = "resnet9"
data = "digits"
image_size = 8
epochs = {epochs}
batch_size = 64
physical_batch = 64
sigma = 1.0
ema = 0.9
checkpoint_every = 1
diag_every = 2

[axes]
{axes}
"""


def _grid(tmp_path: Path, axes: str = "groups = [4, 8]", epochs: float = 0.15, name="g.toml"):
    p = tmp_path / name
    p.write_text(TINY.format(axes=axes, epochs=epochs))
    return p


def test_shipped_grids_expand_with_the_documented_cell_counts():
    assert len(load_grid("gn_groups").cells()) == 7 * 2 * 3
    assert len(load_grid("norm_placement").cells()) == 6 * 3
    assert len(load_grid("aug_mult").cells()) == 3 * 3
    assert len(load_grid("epsilon").cells()) == 4 * 3
    for name in ("gn_groups", "norm_placement", "aug_mult", "epsilon", "ws", "resnet50_imagenette"):
        cells = load_grid(name, "quick").cells()
        assert len({c.id for c in cells}) == len(cells)
        assert {c.config.data for c in cells} == {"digits"}  # quick presets run offline


def test_include_exclude_variants_and_sets(tmp_path):
    p = tmp_path / "v.toml"
    p.write_text(
        TINY.format(
            epochs=0.1,
            axes="scalenorm = [false, true]\n[axes.variant]\n"
            'gn = { norm = "group" }\nln = { norm = "layer" }',
        )
        + '\n[[exclude]]\nvariant = "ln"\nscalenorm = true\n'
        + '[[include]]\nvariant = "gn"\nscalenorm = true\ngroups = 16\n'
    )
    cells = load_grid(str(p)).cells()
    labels = sorted((c.axes["scalenorm"], c.axes["variant"], c.config.groups or 0) for c in cells)
    assert labels == [
        (False, "gn", 0),
        (False, "ln", 0),
        (True, "gn", 0),
        (True, "gn", 16),
    ]
    g = load_grid(str(p), sets={"seeds": [0, 1], "lr": 0.01})
    assert len(g.cells()) == 8 and {c.config.lr for c in g.cells()} == {0.01}
    with pytest.raises(ConfigError, match="no preset"):
        load_grid(str(p), "quick")
    with pytest.raises(ConfigError, match="unknown grid"):
        load_grid("no_such_grid")


def test_cell_hash_is_of_the_resolved_configuration():
    a = TrainConfig(model="resnet9")
    assert cell_hash(a) == cell_hash(a.replace(groups=32, act="mish"))  # resnet9's defaults
    assert cell_hash(a) == cell_hash(a.replace(out="elsewhere", threads=3))  # not results
    assert cell_hash(a) != cell_hash(a.replace(lr=2e-3))
    assert cell_hash(a) != cell_hash(a.replace(seed=1))


@pytest.mark.slow
def test_grid_runs_isolates_failures_and_never_reruns(tmp_path):
    # the "bad" cell fails when its trainer starts: its public images have the wrong shape
    np.save(tmp_path / "wrong-shape.npy", np.zeros((16, 3, 8, 8), dtype=np.uint8))
    axes = (
        '[axes.norm]\ngroup = { norm = "group" }\n'
        f'instance = {{ norm = "public_batch", public_size = 8, public_source = "{tmp_path / "wrong-shape.npy"}" }}'
    )
    grid = load_grid(str(_grid(tmp_path, axes)), sets={"groups": 8})
    out = tmp_path / "grid"
    counts = ablate(grid, out, workers=2, log=lambda *_: None)
    assert counts["done"] == 1 and counts["failed"] == 1
    gd = GridDir(out)
    rows = {r["axes"]["norm"]: r for r in gd.table()}
    assert "instance" in rows and rows["instance"]["result"]["error"]
    assert rows["group"]["result"]["test_acc"] > 0
    before = {r["id"]: len(gd.attempts(r["id"])) for r in gd.table()}
    ablate(grid, out, workers=1, log=lambda *_: None)  # nothing left to do
    assert {r["id"]: len(gd.attempts(r["id"])) for r in gd.table()} == before
    ablate(grid, out, workers=1, retry_failed=True, log=lambda *_: None)
    failed = rows["instance"]["id"]
    assert len(gd.attempts(failed)) == 2 and gd.status(failed) == "failed"
    assert len(gd.attempts(rows["group"]["id"])) == 1  # done is never re-run


def test_lock_keeps_two_workers_off_one_cell(tmp_path):
    grid = load_grid(str(_grid(tmp_path, "groups = [8]")))
    out = tmp_path / "grid"
    gd = GridDir(out)
    cells = grid.cells()
    gd.write_plan(grid, cells)
    cid = cells[0].id
    lock = gd.lock(cid)
    assert lock.acquire()
    try:
        assert gd.status(cid) == "running"
        assert run_cell(str(out), cid) == "taken"  # a second worker backs off
        assert not (gd.cell_dir(cid) / "config.json").exists()
    finally:
        lock.release()
    assert gd.status(cid) == "pending"
    assert run_cell(str(out), cid) == "done"


@pytest.mark.slow
def test_kill_9_then_rerun_finishes_with_nothing_lost_or_repeated(tmp_path):
    grid_file = _grid(tmp_path, "groups = [4, 8]", epochs=0.4)
    out = tmp_path / "grid"
    cmd = [
        sys.executable,
        "-m",
        "scalemix",
        "ablate",
        "--grid",
        str(grid_file),
        "--out",
        str(out),
        "--no-report",
        "--quiet",
    ]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    gd = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # wait until one cell is done and the next has a checkpoint
            time.sleep(0.5)
            if not (out / "grid.json").exists():
                continue
            gd = GridDir(out)
            ids = [c["id"] for c in gd.plan()["cells"]]
            done = [c for c in ids if gd.status(c) == "done"]
            mid = [
                c
                for c in ids
                if (gd.cell_dir(c) / "checkpoint.pt").exists() and gd.progress(c)[0] >= 2
            ]
            if done and mid:
                break
        else:
            pytest.fail("the grid did not reach a cell boundary in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_mid = mid[0]
    done_before = done[0]
    for _ in range(100):  # the worker processes die with their group, a moment later
        if gd.status(killed_mid) == "pending":
            break
        time.sleep(0.1)
    assert gd.status(killed_mid) == "pending"  # the OS released the dead worker's lock
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert all(gd.status(c) == "done" for c in ids)
    assert len(gd.attempts(done_before)) == 1  # finished work never repeated
    attempts = gd.attempts(killed_mid)
    assert len(attempts) == 2 and attempts[1]["resumed_from_step"] >= 1  # resumed, not restarted
    steps = pd.read_csv(gd.cell_dir(killed_mid) / "metrics.csv")["step"].tolist()
    assert steps == list(range(1, len(steps) + 1))  # every step exactly once


@pytest.mark.slow
def test_submitit_executor_runs_the_same_cells(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("SCALEMIX_SUBMITIT_CLUSTER", "local")
    grid = load_grid(str(_grid(tmp_path, "groups = [4, 8]")))
    out = tmp_path / "grid"
    counts = ablate(grid, out, workers=2, executor="slurm", log=lambda *_: None)
    assert counts["done"] == 2
    assert len((out / "slurm" / "jobs.txt").read_text().split()) == 2
    gd = GridDir(out)
    assert all(len(gd.attempts(r["id"])) == 1 for r in gd.table())


@pytest.mark.slow
def test_cli_dry_run_status_json_and_errors(tmp_path, cli):
    runner = CliRunner()
    grid_file = _grid(tmp_path, "groups = [4, 8]")
    out = tmp_path / "grid"
    res = runner.invoke(app, ["ablate", "--grid", str(grid_file), "--out", str(out), "--dry-run"])
    assert res.exit_code == 0 and "2 cells" in res.output and not out.exists()
    res = runner.invoke(app, ["grids"])
    assert res.exit_code == 0 and "gn_groups" in res.output and "quick (24)" in res.output
    grid = load_grid(str(grid_file))
    ablate(grid, out, log=lambda *_: None)
    res = runner.invoke(app, ["status", str(out), "--json"])
    data = json.loads(res.output)
    assert data["counts"]["done"] == 2 and len(data["cells"]) == 2
    assert {c["status"] for c in data["cells"]} == {"done"}
    assert {c["axes"]["groups"] for c in data["cells"]} == {4, 8}
    assert all(0 <= c["result"]["test_acc"] <= 1 for c in data["cells"])
    bad = cli("status", tmp_path)
    assert bad.code == 2 and "not a grid directory" in bad.err
    assert "Traceback" not in bad.err
    bad = cli("ablate", "--grid", "nope")
    assert bad.code == 2 and "unknown grid" in bad.err


@pytest.mark.slow
def test_wandb_cells_are_runs_in_the_grid_group(tmp_path, monkeypatch):
    from scalemix.tracking import WandbSettings
    from scalemix.tracking.wandb_file import find_run_files, read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    grid = load_grid(str(_grid(tmp_path, "groups = [8]")))
    out = tmp_path / "grid"
    settings = WandbSettings(project="p", group=grid.name, job_type=grid.name)
    assert ablate(grid, out, wandb=settings, log=lambda *_: None)["done"] == 1
    cid = grid.cells()[0].id
    run = read_offline_run(find_run_files(GridDir(out).cell_dir(cid))[0])
    assert run["run"]["group"] == "tiny" and run["run"]["job_type"] == "tiny"
    assert "groups=8" in run["run"]["tags"] and "seed=0" in run["run"]["tags"]
    assert run["config"]["axes"] == {"groups": 8} and run["config"]["cell"] == cid


@pytest.mark.slow
def test_ctrl_c_stops_the_grid_prints_the_resume_command_and_loses_nothing(tmp_path):
    """SIGINT to the whole process group (what a terminal's Ctrl-C sends) while the first
    cell trains and three are pending: the command ends within 15 s with exit 130, starts
    no new cell, prints the exact resume command; the rerun finishes every cell once."""
    grid_file = _grid(tmp_path, "groups = [1, 2, 4, 8]", epochs=0.4)
    out = tmp_path / "grid"
    args = ["ablate", "--grid", str(grid_file), "--out", str(out), "--no-report", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "scalemix", *args],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            time.sleep(0.3)
            if not (out / "grid.json").exists():
                continue
            gd = GridDir(out)
            ids = [c["id"] for c in gd.plan()["cells"]]
            if any(gd.progress(c)[0] >= 1 for c in ids):
                break
        else:
            pytest.fail("no cell started in time")
        started = {c for c in ids if gd.attempts(c)}
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=15)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert elapsed < 15
    assert f"Resume with: scalemix {' '.join(args)}" in err
    assert "Traceback" not in err
    assert {c for c in ids if gd.attempts(c)} == started  # nothing new started
    assert len(started) < len(ids)
    rerun = subprocess.run(
        [sys.executable, "-m", "scalemix", *args], capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr
    for c in ids:
        assert gd.status(c) == "done"
        steps = [
            int(r.split(",")[0])
            for r in (gd.cell_dir(c) / "metrics.csv").read_text().splitlines()[1:]
        ]
        assert steps == list(range(1, len(steps) + 1)), c  # every step exactly once
        assert len(gd.attempts(c)) == (2 if c in started else 1)
