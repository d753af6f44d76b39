"""``scalemix bench gpu`` runs on the CPU at tiny sizes, so the device command never rots:
every configuration is timed through the real trainer, DP against non-private, with the
host synchronisations of a DP step counted by source."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_bench_gpu_runs_tiny_on_the_cpu_and_writes_its_json(cli, tmp_path):
    out = tmp_path / "bench.json"
    r = cli(
        "bench", "gpu", "--device", "cpu", "--steps", "1", "--warmup", "0", "--no-tests", "-o", out
    )
    assert r.code == 0, r.err
    rep = json.loads(out.read_text())
    assert rep["tiny"] is True and rep["environment"]["device"] == "cpu"
    assert "precision_policy" in rep["environment"]
    rows = rep["configurations"]
    assert {(c["aug_mult"], c["precision"]) for c in rows} == {
        (k, p) for k in (1, 2) for p in ("fp32", "bf16")
    }
    for c in rows:
        assert c["dp_ms_per_example"] > 0 and c["nonprivate_ms_per_example"] > 0
        assert c["dp_over_nonprivate"] == pytest.approx(
            c["dp_ms_per_example"] / c["nonprivate_ms_per_example"], rel=1e-2
        )
        # one read for the step (vote + logged row), plus the guard's, by source line
        assert c["dp_host_syncs"] == sum(c["dp_host_syncs_by_source"].values()) >= 1
        assert any("train/loop.py" in k for k in c["dp_host_syncs_by_source"])
    assert rep["profile_top_ops"] and rep["profile_top_ops"][0]["self_ms"] >= 0
    ks = rep["keystream"]
    assert ks["normals"] > 10_000 and ks["aug_mult"] == 2
    for name in ("noise_kernel_ms", "noise_host_ms", "aug_kernel_ms", "aug_host_ms"):
        assert ks[name] > 0


def test_bench_gpu_refuses_the_full_sizes_on_the_cpu(cli, tmp_path):
    r = cli("bench", "gpu", "--device", "cpu", "--full", "-o", tmp_path / "x.json")
    assert r.code == 2 and "--tiny" in r.err and "Traceback" not in r.err
