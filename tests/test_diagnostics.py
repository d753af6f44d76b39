"""Residual-branch hooks and signal-propagation plots, against direct computation and
the analytic behaviour of Brock et al. 2021."""

from __future__ import annotations

import json

import pytest
import torch

from scalemix.diagnostics import BlockProbe, signal_propagation
from scalemix.models import create_model


def test_probe_statistics_match_direct_computation():
    torch.manual_seed(0)
    model = create_model("resnet9", groups=8).eval()
    x = torch.randn(8, 3, 16, 16)
    seen = {}
    b = model.res1
    hs = [
        getattr(b, f"tap_{r}").register_forward_hook(lambda m, i, o, r=r: seen.__setitem__(r, o))
        for r in ("skip", "branch", "sum", "out")
    ]
    with BlockProbe(model) as probe, torch.no_grad():
        assert probe.active_handles == 8
        model(x)
        stats = probe.collect()["res1"]
    for h in hs:
        h.remove()
    s, r, y = seen["skip"], seen["branch"], seen["sum"]
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    assert stats["scale_ratio"] == pytest.approx(rms(r) / rms(s), rel=1e-5)
    assert stats["log2_scale_ratio"] == pytest.approx(
        torch.log2(torch.tensor(rms(r) / rms(s))).item(), rel=1e-5
    )
    assert stats["branch_var_share"] == pytest.approx(
        float(r.var(unbiased=False) / (s.var(unbiased=False) + r.var(unbiased=False))), rel=1e-5
    )
    cos = torch.nn.functional.cosine_similarity(s.flatten(1), r.flatten(1), dim=1).mean()
    assert stats["cosine"] == pytest.approx(float(cos), rel=1e-5, abs=1e-7)
    assert stats["avg_var"] == pytest.approx(
        float(y.var(dim=(0, 2, 3), unbiased=False).mean()), rel=1e-5
    )
    assert stats["rms_out"] == pytest.approx(rms(seen["out"]), rel=1e-5)


def test_probe_removes_every_handle_also_on_exceptions():
    model = create_model("resnet9", groups=8)
    with pytest.raises(RuntimeError):
        with BlockProbe(model):
            raise RuntimeError("boom")
    for _, m in model.named_modules():
        assert not m._forward_hooks


def test_nf_resnet_spp_follows_analytic_variance():
    """Inside each stage the average channel variance is 1 + i alpha^2 (within 10 %)."""
    torch.manual_seed(0)
    rows = signal_propagation(create_model("nf_resnet"), torch.randn(64, 3, 64, 64))
    var = [r["avg_var"] for r in rows[1:]]
    for stage in range(3):
        for i in range(2):
            assert var[2 * stage + i] == pytest.approx(1 + (i + 1) * 0.2**2, rel=0.1)


def test_bn_relu_conv_preact_grows_inside_stage_and_drops_at_transitions():
    torch.manual_seed(0)
    model = create_model("wrn40_4", norm="batch", ws="none")
    var = [r["avg_var"] for r in signal_propagation(model, torch.randn(64, 3, 16, 16))]
    stages = [var[1:7], var[7:13], var[13:19]]
    for st in stages:
        assert all(b > a for a, b in zip(st, st[1:]))  # grows inside the stage
        assert st[-1] > 2 * st[0]
    assert var[7] < 0.5 * var[6] and var[13] < 0.5 * var[12]  # drops at each transition


def test_spp_cli_writes_figure_and_json(tmp_path, cli):
    out = tmp_path / "spp.png"
    r = cli("spp", "--model", "resnet9", "--batch", "16", "--out", str(out), "--json")
    assert r.code == 0, r.err
    rows = json.loads(r.out)["blocks"]
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert {"avg_sq_mean", "avg_var", "res_avg_var"} <= set(rows[1])
    assert out.stat().st_size > 1000


def test_probe_reads_blocks_during_a_fast_engine_step():
    """The diagnostics hooks see the training batch as the fast DP engine passes it."""
    from scalemix.engine import GhostEngine

    torch.manual_seed(0)
    model = create_model("resnet9", groups=8)
    engine = GhostEngine(model, clip=1.0)
    x, y = torch.randn(4, 2, 3, 16, 16), torch.randint(0, 10, (4,))
    with BlockProbe(model) as probe:
        res = engine(x, y)
        stats = probe.collect()
    assert set(stats) == {"res1", "res2"} and res.n == 4
    with torch.no_grad(), BlockProbe(model) as probe:
        model(x.reshape(8, 3, 16, 16))
        direct = probe.collect()
    assert stats["res1"]["scale_ratio"] == pytest.approx(direct["res1"]["scale_ratio"], rel=1e-5)
