"""Reports built from generated grid directories: a planted effect is found, a null axis
is not, the PDF has its pages (rendered with pdftoppm where installed), bad input errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from scalemix.ablate import GridDir, load_grid
from scalemix.report import build_report
from scalemix.report.analysis import analyse, privacy_settings
from scalemix.report.collect import collect
from scalemix.train.rundir import write_json_atomic

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


def make_grid_dir(
    tmp_path, effect: float, seeds: int = 8, fail_one: bool = False, single_axis: bool = False
):
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


def test_planted_effect_is_found_and_null_axis_is_not(tmp_path):
    root = make_grid_dir(tmp_path, effect=0.02)
    runs, plan = collect(root)
    an = analyse(runs, plan)
    comp = an.comparisons
    assert len(comp) == 3 and (comp.p_holm < 0.05).all()
    assert comp.mean_diff.values == pytest.approx([0.02] * 3, abs=0.006)
    assert (comp.ci_low > 0).all() and (comp.prob_improvement == 1.0).all()
    assert (an.omnibus.p_holm > 0.05).all()  # groups: no planted effect, no finding
    text = " ".join(an.findings)
    assert "raised accuracy in 3 of 3" in text and "holds after Holm correction" in text
    assert "shows no detectable difference" in text
    assert not any("Too few seeds" in w for w in an.warnings)
    priv = privacy_settings(runs)  # small values keep their significant digits
    assert priv["delta"] == 1e-5 and priv["epsilon_spent"] == 7.99 and priv["accountant"] == "prv"
    # ScaleNorm raises both the scale ratio and accuracy: a positive association
    corr = an.correlations.set_index("summary")
    assert corr.loc["final_log2_ratio", "rho"] > 0.5


def test_no_effect_no_finding_and_few_seeds_are_flagged(tmp_path):
    root = make_grid_dir(tmp_path, effect=0.0, seeds=3, fail_one=True)
    runs, plan = collect(root)
    an = analyse(runs, plan)
    assert not (an.comparisons.p_holm < 0.05).any()
    assert any("Too few seeds" in w for w in an.warnings)
    assert any("failed or diverged" in w for w in an.warnings)


def test_report_files_and_pdf_pages(tmp_path):
    root = make_grid_dir(tmp_path, effect=0.02, seeds=4)
    pdf = build_report(root, log=lambda *_: None)
    folder = pdf.parent
    for name in (
        "runs.csv",
        "cells.csv",
        "cells.md",
        "comparisons.csv",
        "comparisons.md",
        "tests.csv",
        "findings.md",
        "report.json",
    ):
        assert (folder / name).stat().st_size > 0, name
    assert "Holm" in (folder / "findings.md").read_text()
    assert "NOT covered by the DP guarantee" in (folder / "findings.md").read_text()
    data = pdf.read_bytes()
    pages = len(re.findall(rb"/Type /Page\b", data))
    assert (
        pages >= 9
    )  # title, accuracy, differences, trajectories, SPP, 3 tables, findings, caveats
    if shutil.which("pdftoppm"):
        subprocess.run(
            ["pdftoppm", "-r", "30", "-png", str(pdf), str(tmp_path / "page")], check=True
        )
        assert len(list(tmp_path.glob("page*.png"))) == pages


def test_report_cli_refuses_a_directory_without_finished_runs(tmp_path):
    p = tmp_path / "g.toml"
    p.write_text(GRID.format(effect=0, seeds=[0]))
    grid = load_grid(str(p))
    GridDir(tmp_path / "grid").write_plan(grid, grid.cells())
    res = subprocess.run(
        [sys.executable, "-m", "scalemix", "report", str(tmp_path / "grid")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "no finished run" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "scalemix", "report", str(tmp_path)], capture_output=True, text=True
    )
    assert res.returncode == 2 and "not a grid directory" in res.stderr


def test_report_logs_its_tables_to_the_grid_group(tmp_path, monkeypatch):
    from scalemix.tracking import WandbSettings
    from scalemix.tracking.wandb_file import find_run_files, read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    root = make_grid_dir(tmp_path, effect=0.02, seeds=4)
    pdf = build_report(root, log=lambda *_: None, wandb=WandbSettings(group="planted"))
    run = read_offline_run(find_run_files(pdf.parent)[0])
    assert run["run"]["group"] == "planted" and run["run"]["job_type"] == "report"
    logged = set().union(*run["history"])
    for table in ("report/cells", "report/comparisons"):  # wandb.Table: stored as nested keys
        assert any(k.startswith(table) for k in logged), (table, logged)
    assert any(str(v).startswith("Best mean accuracy") for v in run["summary"].values())


def test_single_axis_grid_compares_each_level_with_the_first(tmp_path):
    root = make_grid_dir(tmp_path, effect=0.02, seeds=6, single_axis=True)
    runs, plan = collect(root)
    an = analyse(runs, plan)
    comp = an.comparisons.set_index("groups")
    assert list(comp.index) == [4, 16] and set(comp.a) == {"groups=1"}
    assert comp.loc[16, "p_holm"] < 0.05 and comp.loc[4, "p_holm"] > 0.05
    assert an.omnibus.iloc[0].test == "Friedman" and an.omnibus.iloc[0].p_holm < 0.05
    pdf = build_report(root, log=lambda *_: None)
    assert len(re.findall(rb"/Type /Page\b", pdf.read_bytes())) >= 9


def test_an_epsilon_axis_is_not_confused_with_the_epsilon_spent(tmp_path):
    p = tmp_path / "eps.toml"
    p.write_text(
        GRID.format(effect=0, seeds=[0, 1])
        .replace("groups = [1, 4, 16]\nscalenorm = [false, true]", "epsilon = [1.0, 8.0]")
        .replace('primary = "groups"\npaired = "scalenorm"', 'primary = "epsilon"')
        .replace("sigma = 1.0\n", "")
    )
    grid = load_grid(str(p))
    gd = GridDir(tmp_path / "grid")
    gd.write_plan(grid, grid.cells())
    for c in grid.cells():
        spent = c.axes["epsilon"] * 0.999
        write_json_atomic(
            gd.cell_dir(c.id) / "result.json",
            {"status": "done", "test_acc": 0.5 + spent / 100, "epsilon": spent},
        )
    runs, plan = collect(gd.root)
    assert sorted(set(runs.epsilon)) == [1.0, 8.0]
    assert (runs.epsilon_spent == runs.epsilon * 0.999).all()
    an = analyse(runs, plan)
    assert list(an.comparisons.epsilon) == [8.0]
