"""The frozen analysis plan (issue 22): the first 'ablate' of a grid fixes its [report]
with a hash and a time; a different one is refused once runs have results (exit 2, one
line), or recorded with --replan and shown on the title page; cell hashes do not move.
Also the title page of a preset, the tables that fit the page, the one "report:" line,
the privacy of the whole grid in the report and in 'scalemix status'."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from scalemix.ablate import GridDir, load_grid
from scalemix.errors import ConfigError
from scalemix.report.analysis import ReportPlan
from scalemix.train.rundir import write_json_atomic

GRID = """
name = "planned"
description = "THE FULL STUDY: CIFAR-10 at 32 px"
seeds = [0, 1]
[base]
model = "resnet9"
data = "digits"
image_size = 8
sigma = 1.0
epochs = 0.1
[axes]
groups = [1, 4]
scalenorm = [false, true]
[report]
primary = "groups"
paired = "scalenorm"
questions = ["scalenorm"]
{extra}
[presets.quick]
description = "the digits at 8 px, for plumbing"
[presets.quick.base]
lr = 0.01
"""


def _grid(tmp_path, extra: str = "", name: str = "g.toml"):
    p = tmp_path / name
    p.write_text(GRID.format(extra=extra))
    return p


def _finish_one(gd: GridDir, grid) -> None:
    cid = grid.cells()[0].id
    write_json_atomic(gd.cell_dir(cid) / "result.json", {"status": "done", "test_acc": 0.5})


def test_the_first_write_fixes_the_plan_and_a_change_after_results_is_refused(tmp_path):
    g1 = load_grid(str(_grid(tmp_path, "sesoi = 1.0")))
    gd = GridDir(tmp_path / "grid")
    gd.write_plan(g1, g1.cells())
    rec = gd.analysis_plan()
    assert rec["results_when_fixed"] == 0 and rec["changes"] == []
    blob = json.dumps(rec["report"], sort_keys=True, separators=(",", ":"))
    assert rec["hash"] == hashlib.sha256(blob.encode()).hexdigest()[:12]
    assert rec["report"]["metric"] == "raw" and rec["report"]["sesoi"] == 1.0
    gd.write_plan(g1, g1.cells())  # the same plan: nothing recorded
    assert gd.analysis_plan() == rec
    # a change before any result: allowed, recorded as harmless
    g2 = load_grid(str(_grid(tmp_path, "sesoi = 2.0", "g2.toml")))
    gd.write_plan(g2, g2.cells())
    ch = gd.analysis_plan()["changes"]
    assert len(ch) == 1 and ch[0]["keys"] == ["sesoi"] and ch[0]["results_when_changed"] == 0
    _finish_one(gd, g2)
    g3 = load_grid(str(_grid(tmp_path, 'sesoi = 2.0\nmetric = "ema"', "g3.toml")))
    with pytest.raises(ConfigError, match=r"differs in metric.*--replan"):
        gd.write_plan(g3, g3.cells())
    assert gd.analysis_plan()["report"]["metric"] == "raw"  # nothing written
    gd.write_plan(g3, g3.cells(), replan=True)
    rec = gd.analysis_plan()
    assert rec["report"]["metric"] == "ema" and rec["changes"][-1]["results_when_changed"] == 1
    lines = ReportPlan.from_plan({"grid": {"report": {}}, "analysis_plan": rec}).describe()
    assert any("CHANGED" in x and "AFTER 1 run(s) had results" in x for x in lines)
    assert "before any run had a result" in lines[0]
    # the cells are the same experiments whatever the plan says
    assert [c.id for c in g1.cells()] == [c.id for c in g3.cells()]


def test_a_grid_from_before_plans_were_fixed_says_its_plan_came_after_results(tmp_path):
    grid = load_grid(str(_grid(tmp_path)))
    gd = GridDir(tmp_path / "grid")
    gd.write_plan(grid, grid.cells())
    (gd.root / "analysis-plan.json").unlink()  # as an older scalemix left it
    _finish_one(gd, grid)
    plan = gd.plan()
    plan["analysis_plan"] = None
    assert "NOT FIXED" in ReportPlan.from_plan(plan).describe()[0]
    gd.write_plan(grid, grid.cells())
    rec = gd.analysis_plan()
    assert rec["results_when_fixed"] == 1
    plan["analysis_plan"] = rec
    assert "AFTER 1 run(s) had results" in ReportPlan.from_plan(plan).describe()[0]


def test_ablate_refuses_a_changed_plan_with_one_line_and_exit_2(tmp_path):
    grid = load_grid(str(_grid(tmp_path)))
    out = tmp_path / "grid"
    gd = GridDir(out)
    gd.write_plan(grid, grid.cells())
    _finish_one(gd, grid)
    changed = _grid(tmp_path, "alpha = 0.01", "changed.toml")
    res = subprocess.run(
        [sys.executable, "-m", "scalemix", "ablate", "--grid", str(changed), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "--replan" in res.stderr
    said = [x for x in res.stderr.splitlines() if "analysis plan" in x]
    assert len(said) == 1 and "differs in alpha" in said[0] and "--replan" in said[0]
    assert not (out / "cells" / grid.cells()[1].id / "config.json").exists()  # nothing ran


def test_plan_keys_are_validated(tmp_path):
    for extra, message in (
        ('metric = "best"', "metric"),
        ("alpha = 0.7", "alpha"),
        ('correction = "bonferroni"', "correction"),
        ('order = ["simple effects", "simple effects"]', "order"),
        ("sesoi = -1", "sesoi"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_grid(str(_grid(tmp_path, extra)))


def test_a_preset_may_set_its_description_and_report(tmp_path):
    p = _grid(tmp_path)
    p.write_text(p.read_text() + '[presets.quick.report]\nmetric = "ema"\n')
    g = load_grid(str(p), "quick")
    assert g.preset_description == "the digits at 8 px, for plumbing"
    assert g.report["metric"] == "ema" and g.report["questions"] == ["scalenorm"]
    assert load_grid(str(p)).report["metric"] == "raw"


def test_the_gn_groups_cells_keep_their_names():
    """A finished grid must still resume and report: the quick grid's cells are named as
    in the example report's runs (reports/gn_groups-quick/runs.csv)."""
    ids = sorted(c.id for c in load_grid("gn_groups", "quick").cells())
    digest = hashlib.sha256(",".join(ids).encode()).hexdigest()[:16]
    assert ids[:3] == ["00b0b0487e64", "1485d677bb38", "26fce9922d8d"]
    assert digest == hashlib.sha256(",".join(QUICK_IDS).encode()).hexdigest()[:16]


QUICK_IDS = [
    "00b0b0487e64", "1485d677bb38", "26fce9922d8d", "2d369720d534", "3047cdc59464",
    "3305b16712e1", "387486c202ae", "3ab1c2d6f91e", "52f60d1f224d", "5b3f2ba9577e",
    "60752cb8c69e", "6eb1c18a9371", "80a72844c463", "8b5a75b4c140", "a3cf6304614c",
    "a655bea88864", "abd93e840237", "b12fe84b623d", "bfbe2b3d55c7", "cb730cd6edf6",
    "d8ea691d5363", "da0b055b9af8", "e9187f5dd05e", "fdc45efe154c",
]  # fmt: skip


def test_the_title_page_describes_the_preset_that_ran(tmp_path):
    from scalemix.report.analysis import analyse
    from scalemix.report.pdf import title_lines

    from .report_helpers import quick_plan, quick_runs

    plan = quick_plan()
    plan["grid"]["preset_description"] = "the embedded digits at 8 px, 2 epochs"
    plan["grid"]["description"] = "THE FULL STUDY on CIFAR-10"
    plan["grid"]["base"] = {"data": "digits"}
    an = analyse(quick_runs(), plan)
    lines = title_lines(an, plan, "test")
    assert lines[0].startswith("This report: preset 'quick' of grid gn_groups: the embedded")
    full = [i for i, x in enumerate(lines) if "THE FULL STUDY" in x]
    assert len(full) == 1 and "NOT what this preset ran" in lines[full[0]]
    assert full[0] == len(lines) - 1  # last, after what was run
    assert "Pre-registration:" in lines and any(x.startswith("Analysis plan:") for x in lines)


def test_tables_fit_the_page_width():
    """The tests table ran off the page ('exploratory, uncorrect...'): every column now
    fits inside the page, long cells wrapped, at 5 pt or more."""
    import pandas as pd

    from scalemix.report.pdf import LANDSCAPE, TABLE_LEFT, TABLE_RIGHT, layout_table

    frame = pd.DataFrame(
        {
            "test": ["grid model: groups x scalenorm (primary)"] * 3,
            "where": ["all (repeated-measures ANOVA over seeds), " * 3] * 3,
            "statistic": ["F 3.35 (df 3, 6; crit 4.76)"] * 3,
            "p, sphericity-free": ["GG 0.204 (eps 0.35); LB 0.209"] * 3,
            "p, adjusted (correction)": ["exploratory: none"] * 3,
            **{f"extra column {i} (pts)": ["+12.34 to +56.78"] * 3 for i in range(6)},
        }
    )
    font, widths, header, rows = layout_table(frame)
    width_in = sum(w + 2 for w in widths) * 0.55 * font / 72
    assert font >= 5 and width_in <= LANDSCAPE[0] * (TABLE_RIGHT - TABLE_LEFT) + 1e-9
    assert all(len(line) <= w for row in rows for cell, w in zip(row, widths) for line in cell)
    assert "".join(rows[0][1]).replace(" ", "") == frame["where"][0].replace(" ", "")


def test_ablate_prints_one_report_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import scalemix.ablate.runner as runner
    import scalemix.report as report
    from scalemix.cli.app import app

    counts = {"done": 4, "failed": 0, "diverged": 0, "pending": 0, "running": 0}
    monkeypatch.setattr(runner, "ablate", lambda *a, **k: counts)

    def fake_report(out, log=print, wandb=None):
        log(f"report: 3 pages -> {out}/report/report.pdf")
        return tmp_path / "report.pdf"

    monkeypatch.setattr(report, "build_report", fake_report)
    res = CliRunner().invoke(
        app, ["ablate", "--grid", str(_grid(tmp_path)), "--out", str(tmp_path / "grid")]
    )
    assert res.exit_code == 0, res.output
    assert sum(line.startswith("report:") for line in res.output.splitlines()) == 1


@pytest.mark.slow
def test_the_report_and_status_give_the_privacy_of_the_whole_grid(tmp_path):
    from scalemix.report import build_report

    from .report_helpers import make_grid_dir

    root = make_grid_dir(tmp_path, effect=0.02, seeds=3)
    pdf = build_report(root, log=lambda *_: None)
    text = (pdf.parent / "findings.md").read_text()
    assert "Privacy of the whole grid" in text or "Privacy of everything the grid" in text
    assert "whatever data scores the choice" in text
    assert "avoid the cost" not in text and "Select on public data" not in text
    assert "## Analysis plan" in text
    meta = json.loads((pdf.parent / "report.json").read_text())
    assert meta["grid_privacy"]["status"] in (
        "dp",
        "per_cell_only",
        "not_dp",
        "no_private_cells",
        "no_steps",
    )
    res = subprocess.run(
        [sys.executable, "-m", "scalemix", "status", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "privacy of the whole grid:" in res.stdout and "analysis plan: fixed" in res.stdout


def test_equivalence_of_primary_tests_is_corrected_like_their_difference():
    """The plan's Holm covers the TOSTs of the primary family too: "equivalent" is a claim,
    and a per-test TOST at alpha over 5 tests would let one in ~4 false claims through.
    Hand-worked: TOST p 0.006, 0.018, 0.019, 0.022, 0.27 -> Holm 0.03, 0.072, 0.072,
    0.072, 0.27: only the first is equivalent; an exploratory test keeps its raw TOST."""
    import pandas as pd

    from scalemix.report.plan import multiplicity

    rp = ReportPlan(primary="groups", paired="scalenorm", sesoi=1.0, correction="holm")
    model = pd.DataFrame(
        {
            "axes": [("groups",), ("scalenorm",), ("groups", "scalenorm"), ("lr",)],
            "primary": [True, True, True, False],
            "df1": [1, 1, 1, 1],
            "p": [0.015, 0.052, 0.61, 0.5],
            "p_gg": [float("nan")] * 4,
            "p_lb": [float("nan")] * 4,
            "p_tost": [0.27, 0.006, 0.018, 0.01],
        }
    )
    comp = pd.DataFrame({"p_t": [0.038, 0.27], "p_tost": [0.019, 0.022]})
    multiplicity(rp, model, comp, pd.DataFrame())
    assert model.p_tost_adj.iloc[:3].tolist() == pytest.approx([0.27, 0.03, 0.072])
    assert comp.p_tost_adj.tolist() == pytest.approx([0.072, 0.072])
    assert model.verdict.tolist() == ["inconclusive", "equivalent", "inconclusive", "equivalent"]
    assert comp.verdict.tolist() == ["inconclusive", "inconclusive"]
