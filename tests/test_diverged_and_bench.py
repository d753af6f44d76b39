"""A non-finite loss stops the run as 'diverged' (never averaged in); the bench commands
run and print the JSON they promise."""

from __future__ import annotations

import json

import pytest
import torch

from scalemix.train import Trainer


def test_non_finite_loss_stops_as_diverged(tiny_cfg, digits8):
    trainer = Trainer(tiny_cfg, data=digits8, progress=False, log=lambda *_: None)
    with torch.no_grad():
        trainer.model.fc.weight[0, 0] = float("nan")
    result = trainer.run()
    assert result["status"] == "diverged" and "non-finite" in result["error"]
    assert result["steps"] == 0 and result["epsilon"] == 0.0  # no step was released
    saved = json.loads((trainer.run_dir.result).read_text())
    assert saved["status"] == "diverged"


def test_bench_dp_step_json(cli):
    r = cli(
        "bench",
        "dp-step",
        "--batch",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--engines",
        "nonprivate,opacus,opacus-ghost,vmap,scalemix",
        "--no-memory",
        "--json",
    )
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert set(res["engines"]) == {"nonprivate", "opacus", "opacus-ghost", "vmap", "scalemix"}
    for e in res["engines"].values():
        assert e["median_ms"] > 0 and e["ratio"] > 0
    assert res["engines"]["nonprivate"]["ratio"] == 1.0


@pytest.mark.slow
def test_bench_dp_step_memory_probe(cli):
    r = cli(
        "bench",
        "dp-step",
        "--batch",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--engines",
        "scalemix",
        "--memory-runs",
        "2",
        "--profile",
        "--json",
    )
    assert r.code == 0, r.err
    res = json.loads(r.out)
    for name in ("scalemix", "nonprivate"):
        e = res["engines"][name]
        assert e["peak_mb"] >= 0 and len(e["peak_mb_runs"]) == 2
        assert e["peak_mb"] == pytest.approx(sum(e["peak_mb_runs"]) / 2)  # median of two
        assert e["tensor_peak_mb"] > 0
    ops = {r["op"]: r for r in res["profile"]}  # the DP step's own work shows as extra time
    assert ops["aten::bmm"]["nonprivate_calls"] == 0 and ops["aten::bmm"]["dp_calls"] > 0
    held = res["scalemix_memory_mb"]
    assert held["largest per-example chunk"] > 0 and "layer inputs and output gradients" in held


def test_bench_unknown_engine_is_usage_error(cli):
    r = cli("bench", "dp-step", "--engines", "turbo", "--no-memory")
    assert r.code == 2 and "unknown engine" in r.err and "Traceback" not in r.err


@pytest.mark.slow
def test_bench_train_against_opacus_recipe_on_digits(cli):
    r = cli(
        "bench",
        "train",
        "--data",
        "digits",
        "--batch-size",
        "64",
        "--physical-batch",
        "32",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--non-private-baseline",
        "--json",
    )
    assert r.code == 0, r.err
    res = json.loads(r.out)
    ips = res["images_per_second"]
    assert ips["scalemix"] > 0 and ips["opacus"] > 0 and ips["non-private"] > 0
    assert res["speedup"] == ips["scalemix"] / ips["opacus"]
    assert res["share_of_non_private"] == ips["scalemix"] / ips["non-private"]
