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

from .report_helpers import GRID, SIM_PLAN, grid_runs, make_grid_dir, simulated, simulated_crn
from .report_helpers import GRID_N_TEST as N_TEST


def test_planted_effect_is_found_and_null_axis_is_not(tmp_path):
    root = make_grid_dir(tmp_path, effect=0.02)
    runs, plan = collect(root)
    an = analyse(runs, plan)
    comp = an.comparisons
    assert len(comp) == 3 and (comp.p_adj < 0.05).all() and (comp.verdict == "effect").all()
    assert comp.mean_diff.values == pytest.approx([0.02] * 3, abs=0.006)
    assert (comp.ci_low > 0).all() and (comp.wins == comp.n).all()
    assert (comp.win_low > 0.6).all()  # 8 of 8 seeds won: exact interval [0.63, 1]
    assert (comp.poi_cross > 0.8).all()  # rliable's estimand, from cross-seed pairs only
    assert (an.omnibus.p_adj > 0.05).all()  # groups: no planted effect, no finding
    assert (an.omnibus.verdict == "inconclusive").all()  # no sesoi in the plan
    text = " ".join(an.findings)
    assert "had the higher mean in 3 of 3 strata" in text and "24 of 24 seed-matched" in text
    assert "has an effect" in text and "is inconclusive" in text
    assert "no effect" not in text.replace("neither an effect", "")
    gm = an.grid_model.set_index("term")  # one model: scalenorm yes, groups and interaction no
    assert gm.loc["scalenorm", "p"] < 0.001
    assert an.power["seeds_for_1_point"] >= 2 and an.power["mde_points"] > 0
    assert not any("Too few seeds" in w for w in an.warnings)
    priv = privacy_settings(runs)  # small values keep their significant digits
    assert priv["delta"] == 1e-5 and priv["epsilon_spent"] == 7.99 and priv["accountant"] == "prv"
    # ScaleNorm raises both the scale ratio and accuracy: a positive association between
    # configurations; within a configuration the seeds' ratios are noise
    corr = an.correlations.set_index("part")
    assert corr.loc["between configurations", "rho"] > 0.5
    assert corr.loc["between configurations", "n"] == 6  # configurations, not 48 runs


def test_no_effect_no_finding_and_few_seeds_are_flagged(tmp_path):
    root = make_grid_dir(tmp_path, effect=0.0, seeds=3, fail_one=True)
    runs, plan = collect(root)
    an = analyse(runs, plan)
    assert not (an.comparisons.verdict == "effect").any()
    assert any("Too few seeds" in w for w in an.warnings)
    assert any("failed or diverged" in w for w in an.warnings)
    assert not an.sensitivity.empty  # the failed run, scored as chance, in a second analysis
    assert an.cells.failed.sum() == 1  # counted in its cell, not dropped


@pytest.mark.slow
def test_report_files_and_pdf_pages(tmp_path):
    root = make_grid_dir(tmp_path, effect=0.02, seeds=4)
    pdf = build_report(root, log=lambda *_: None)
    folder = pdf.parent
    for name in (
        "runs.csv",
        "cells.csv",
        "cells.md",
        "marginals.csv",
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
    # title, accuracy, differences, stability, learning curves, trajectories, scale vs
    # accuracy, SPP, 4 tables, findings, caveats
    assert pages >= 14
    if shutil.which("pdftoppm"):
        subprocess.run(
            ["pdftoppm", "-r", "30", "-png", str(pdf), str(tmp_path / "page")], check=True
        )
        assert len(list(tmp_path.glob("page*.png"))) == pages


@pytest.mark.slow
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
    assert any(str(v).startswith("Highest mean") for v in run["summary"].values())


def test_single_axis_grid_compares_each_level_with_the_first(tmp_path):
    root = make_grid_dir(tmp_path, effect=0.02, seeds=6, single_axis=True)
    runs, plan = collect(root)
    an = analyse(runs, plan)
    comp = an.comparisons.set_index("groups")
    assert list(comp.index) == [4, 16] and set(comp.a) == {"groups=1"}
    assert comp.loc[16, "p_adj"] < 0.05 and comp.loc[4, "p_adj"] > 0.05
    assert an.omnibus.iloc[0].test.startswith("Friedman (permutation")
    assert an.omnibus.iloc[0].p_adj < 0.05
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
        pd.DataFrame(  # learning curves carry an "epsilon" column of their own
            {"step": [5, 10], "epsilon": [spent / 2, spent], "test_acc": [0.4, 0.5]}
        ).to_csv(gd.cell_dir(c.id) / "epochs.csv", index=False)
    runs, plan = collect(gd.root)
    assert sorted(set(runs.epsilon)) == [1.0, 8.0]
    assert (runs.epsilon_spent == runs.epsilon * 0.999).all()
    an = analyse(runs, plan)
    assert list(an.comparisons.epsilon) == [8.0]
    from scalemix.report.collect import learning_curves

    assert set(learning_curves(runs).columns) == {"id", "step", "epsilon_spent", "test_acc"}
    from scalemix.report import figures

    class Pages:  # counts the pages a figure function saves
        n = 0

        def savefig(self, fig):
            self.n += 1

    pages = Pages()
    figures.privacy_utility_page(pages, an)
    assert pages.n == 1  # an epsilon axis gets its privacy-utility curve
    build_report(gd.root, log=lambda *_: None)


PLAN = SIM_PLAN


def test_planted_interaction_is_found_by_the_grid_model_and_the_findings():
    """ScaleNorm helps only at small group counts: the model's interaction term finds it,
    and the findings say so; the paired comparisons show where."""
    means = {
        (g, sn): 0.80 + (0.03 if sn and g == 1 else 0.0) for g in (1, 4, 16) for sn in (False, True)
    }
    an = analyse(simulated(6, means, seed=3), PLAN)
    gm = an.grid_model.set_index("term")
    assert gm.loc["groups x scalenorm", "p"] < 0.01
    text = " ".join(an.findings)
    assert "groups x scalenorm has an effect" in text
    comp = an.comparisons.set_index("groups")
    assert comp.loc[1, "p_adj"] < 0.05 and comp.loc[16, "p_adj"] > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("crn", [False, True], ids=["independent", "common-random-numbers"])
def test_a_null_grid_yields_no_primary_finding_beyond_the_level(crn):
    """400 simulated null grids of 3 seeds, with and without planted common random
    numbers across the cells of a seed: the rate of any confirmatory finding (a primary
    test whose verdict is "effect") stays at or below 5 % plus Monte Carlo error."""
    means = {(g, sn): 0.80 for g in (1, 4, 16) for sn in (False, True)}
    hits = 0
    sims = 400
    for i in range(sims):
        runs = simulated_crn(3, 100 + i) if crn else simulated(3, means, seed=100 + i)
        an = analyse(runs, PLAN, descriptive=False)
        verdicts = (
            list(an.comparisons.verdict)
            + list(an.omnibus.get("verdict", []))
            + list(an.grid_model[an.grid_model.primary].verdict)
        )
        assert len(verdicts) == len(an.comparisons) + len(an.omnibus) + 3
        hits += "effect" in verdicts
    assert hits / sims <= 0.05 + 2 * (0.05 * 0.95 / sims) ** 0.5, hits / sims


def test_diverged_runs_stay_in_the_tables_and_move_the_sensitivity_analysis():
    means = {(g, sn): 0.80 + 0.02 * sn for g in (1, 4, 16) for sn in (False, True)}
    runs = simulated(4, means, seed=5)
    bad = (runs.groups == 1) & runs.scalenorm  # this cell diverges in every seed
    runs.loc[bad, "status"] = "diverged"
    runs.loc[bad, "test_acc"] = None
    runs["num_classes"] = 10
    an = analyse(runs, PLAN)
    cell = an.cells[(an.cells.groups == 1) & an.cells.scalenorm].iloc[0]
    assert cell.n == 0 and cell.diverged == 4 and cell.divergence_rate == 1.0
    assert any("no finished run" in w for w in an.warnings)
    sens = an.sensitivity.set_index("groups")
    assert sens.loc[1, "mean_diff"] < -0.5  # chance accuracy (0.1) against 0.8
    assert 1 not in set(an.comparisons.groups)  # complete-case analysis cannot compare it


def test_audit_bounds_per_cell_and_the_alarm_on_the_first_page():
    from scalemix.report import display_tables

    means = {(g, sn): 0.80 for g in (1, 4, 16) for sn in (False, True)}
    runs = simulated(3, means, seed=9)
    runs["epsilon_spent"], runs["delta"] = 8.0, 1e-5
    runs["epsilon_lower_bound"] = 1.2
    runs["privacy_alarm"] = False
    runs.loc[0, ["epsilon_lower_bound", "privacy_alarm"]] = [9.5, True]
    an = analyse(runs, PLAN)
    assert an.warnings[0].startswith("PRIVACY ALARM: in 1 run(s)")
    cells = display_tables(an)["cells"]
    assert "eps lower bound (audit, max over seeds)" in cells and "9.50 (acct 8.00)" in set(
        cells["eps lower bound (audit, max over seeds)"]
    )
    assert any("largest one-run lower bound on epsilon is 9.50" in f for f in an.findings)


def test_per_example_evidence_from_stored_predictions(tmp_path):
    """Every paired comparison is scored again example by example on the shared test set;
    the McNemar p-value matches statsmodels called directly on the pooled table."""
    from statsmodels.stats.contingency_tables import mcnemar

    root = make_grid_dir(tmp_path, effect=0.05, seeds=4)
    runs, plan = collect(root)
    an = analyse(runs, plan)
    comp = an.comparisons
    assert (comp.ex_seeds == 4).all() and (comp.ex_examples == N_TEST).all()
    r = comp.iloc[0]
    dirs = runs.set_index("id").run_dir
    a = np.stack(
        [np.load(f"{dirs[i]}/test_predictions.npy") == np.arange(N_TEST) % 10 for i in r.ids_a]
    )
    b = np.stack(
        [np.load(f"{dirs[i]}/test_predictions.npy") == np.arange(N_TEST) % 10 for i in r.ids_b]
    )
    table = [[(a & b).sum(), (a & ~b).sum()], [(~a & b).sum(), (~a & ~b).sum()]]
    assert r.ex_p_mcnemar == pytest.approx(mcnemar(table, exact=True).pvalue)
    assert r.ex_diff == pytest.approx(b.mean() - a.mean())
    assert r.ex_ci_low < r.ex_diff < r.ex_ci_high
    assert (comp.ex_p_mcnemar < 0.05).sum() >= 2  # 5 points over 4 x 600 examples: visible
    assert any(f.startswith("Per test example") for f in an.findings)
    tables = build_report(root, log=lambda *_: None).parent
    assert "McNemar" in (tables / "findings.md").read_text()


def test_runs_without_stored_predictions_are_reported_without_per_example_columns(tmp_path):
    root = make_grid_dir(tmp_path, effect=0.02, seeds=3)
    for f in root.glob("cells/*/test_labels.npy"):
        f.unlink()  # runs from before the per-example report
    an = analyse(*collect(root))
    assert "ex_p_mcnemar" not in an.comparisons or an.comparisons.ex_p_mcnemar.isna().all()


def test_primary_questions_join_the_report_wide_correction(tmp_path):
    """Terms named in [report] questions are primary (Holm with the comparisons); the
    rest of the grid model is exploratory and shown as uncorrected."""
    plan = {
        "grid": {
            **PLAN["grid"],
            "report": {**PLAN["grid"]["report"], "questions": ["scalenorm x groups"]},
        }
    }
    means = {
        (g, sn): 0.80 + (0.03 if sn and g == 1 else 0.0) for g in (1, 4, 16) for sn in (False, True)
    }
    an = analyse(simulated(6, means, seed=3), plan)
    gm = an.grid_model.set_index("term")
    assert gm.loc["groups x scalenorm", "primary"] and not gm.loc["groups", "primary"]
    k = len(an.comparisons) + len(an.omnibus) + 1  # the family: comparisons, omnibus, question
    inter = gm.loc["groups x scalenorm"]
    assert inter.p_verdict == inter.p_gg  # 2 df: the Greenhouse-Geisser p enters
    assert inter.p_verdict <= inter.p_adj <= k * inter.p_verdict + 1e-12
    assert inter.adj == f"Holm over {k} primary tests"
    assert np.isnan(gm.loc["groups", "p_adj"]) and gm.loc["groups", "adj"].startswith("explor")
    text = " ".join(an.findings)
    assert "groups x scalenorm has an effect" in text and "a primary question" in text
    assert "exploratory, uncorrected" in text  # the other terms say what they are


@pytest.mark.parametrize(
    "report, message",
    [
        ('questions = ["depth"]', "is not a grid-model term"),
        ('questions = "groups"', "questions is a list of terms"),
        ('primary = "depth"', "is not an axis"),
        ('focus = "groups"', "unknown keys focus"),
    ],
)
def test_a_bad_report_table_is_refused_with_one_line(tmp_path, report, message):
    from scalemix.errors import ConfigError

    p = tmp_path / "g.toml"
    text = GRID.format(effect=0, seeds=[0])
    key = report.split(" =")[0]
    old = 'primary = "groups"' if key == "primary" else 'paired = "scalenorm"'
    p.write_text(text.replace(old, report))
    with pytest.raises(ConfigError, match=message):
        load_grid(str(p))


def test_a_configuration_that_is_unstable_across_seeds_is_found_by_brown_forsythe():
    rng = np.random.default_rng(0)
    runs = grid_runs(  # ScaleNorm: same mean, ten times steadier
        lambda scalenorm, groups, seed: 0.8 + rng.normal(0, 0.005 if scalenorm else 0.05),
        8,
        {"scalenorm": (False, True), "groups": (1, 4, 16)},
    )
    an = analyse(runs, PLAN)
    disp = an.dispersion.set_index("axis")
    assert disp.loc["scalenorm", "p"] < 0.001 and disp.loc["groups", "p"] > 0.01
    sd = disp.loc["scalenorm", "pooled_sd"]
    assert sd["False"] > 5 * sd["True"]
    assert any("Spread across seeds by scalenorm" in f and "differs" in f for f in an.findings)


@pytest.mark.slow
def test_grids_side_by_side_share_a_configuration(tmp_path):
    """Two grids that repeat a cell: the shared configuration is found, the same seed is
    a reproducibility check (gap 0 for the same computation), the CLI writes the PDF."""
    a = make_grid_dir(tmp_path / "a", effect=0.02, seeds=3)
    b_dir = tmp_path / "b"
    b = make_grid_dir(b_dir, effect=0.02, seeds=3)  # same generator: same numbers, same cells
    from scalemix.report.compare import shared_configurations

    per_grid, diffs, pooled, grids = shared_configurations([a, b])
    assert per_grid.configuration.nunique() == 6 and len(grids) == 2
    assert (diffs.same_seeds == 3).all() and (diffs.max_gap_same_seed == 0).all()
    assert (diffs.bit_identical == 3).all() and diffs.reproduced.all()
    assert "p_welch" not in diffs  # the same experiment twice: reproduced, never tested
    assert (pooled.runs == 6).all() and (pooled.distinct_seeds == 3).all()
    # one shared seed that does not reproduce: the gap is reported, nothing is tested
    import json

    gb = GridDir(b)
    res = gb.cell_dir(gb.plan()["cells"][0]["id"]) / "result.json"
    r = json.loads(res.read_text())
    r["test_acc"] += 0.01
    res.write_text(json.dumps(r))
    _, diffs2, _, _ = shared_configurations([a, b])
    changed = diffs2[diffs2.bit_identical < 3]
    assert len(changed) == 1 and not changed.reproduced.iloc[0]
    assert changed.bit_identical.iloc[0] == 2
    assert changed.max_gap_same_seed.iloc[0] == pytest.approx(0.01)
    out = tmp_path / "cmp.pdf"
    res = subprocess.run(
        [sys.executable, "-m", "scalemix", "report", str(a), str(b), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 0 and (tmp_path / "shared.csv").exists()


def test_grids_that_share_nothing_are_refused(tmp_path):
    a = make_grid_dir(tmp_path / "a", effect=0.02, seeds=2)
    b = make_grid_dir(tmp_path / "b", effect=0.02, seeds=2, single_axis=True)
    for c in GridDir(b).plan()["cells"]:  # another model everywhere: nothing shared
        f = GridDir(b).cell_dir(c["id"]) / "config.json"
        d = __import__("json").loads(f.read_text())
        d["config"]["lr"] = 0.5
        f.write_text(__import__("json").dumps(d))
    res = subprocess.run(
        [sys.executable, "-m", "scalemix", "report", str(a), str(b)], capture_output=True, text=True
    )
    assert res.returncode == 2 and "share no configuration" in res.stderr
    assert "Traceback" not in res.stderr


def test_ema_predictions_are_stored_and_scored_when_ema_is_the_metric(tiny_cfg, digits8):
    """A run stores its EMA weights' test predictions beside the raw ones; their accuracy
    is result.json's test_acc_ema, and the report reads them when the plan's metric is
    the EMA accuracy."""
    from scalemix.report.collect import test_outcomes
    from scalemix.train import Trainer

    res = Trainer(tiny_cfg, data=digits8, progress=False, log=lambda *_: None).run()
    out = test_outcomes(tiny_cfg.out, ema=True)
    raw = test_outcomes(tiny_cfg.out)
    assert out is not None and raw is not None
    assert float((out[0] == out[1]).mean()) == pytest.approx(res["test_acc_ema"])
    assert float((raw[0] == raw[1]).mean()) == pytest.approx(res["test_acc"])
