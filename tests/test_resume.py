"""A run interrupted and resumed ends exactly where an uninterrupted seeded run ends
(docs/sharp-edges.md, item 7): model, optimiser, EMA, ledger, sampler and RNG all restored."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from scalemix.errors import ConfigError
from scalemix.train import Trainer
from scalemix.train.loop import Interrupted


def _quiet(cfg, data, resume=False, **kw):
    return Trainer(cfg, data=data, resume=resume, progress=False, log=lambda *_: None, **kw)


@pytest.mark.slow
def test_resume_matches_uninterrupted(tiny_cfg, digits8, tmp_path):
    tiny_cfg = tiny_cfg.replace(diag_every=2)
    full_cfg = tiny_cfg.replace(out=str(tmp_path / "full"))
    full = _quiet(full_cfg, digits8)
    res_full = full.run()
    assert res_full["status"] == "done" and res_full["steps"] >= 5

    cfg = tiny_cfg.replace(out=str(tmp_path / "cut"))
    with pytest.raises(Interrupted):  # the same run as `full`, its noise reproduced
        _quiet(cfg, digits8, noise_nonce=full.rng.noise_nonce).run(stop_after=3)
    assert not (tmp_path / "cut" / "result.json").exists()  # nothing claims success
    with pytest.raises(ConfigError, match="--resume"):
        _quiet(cfg, digits8)  # an unfinished run is not silently overwritten
    resumed = _quiet(cfg, digits8, resume=True)
    assert resumed.step == 3 and resumed.ledger.steps == 3
    res_cut = resumed.run()

    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    for a, b in zip(full.ema.model.parameters(), resumed.ema.model.parameters()):
        assert torch.equal(a, b)
    for k in ("test_acc", "test_acc_ema", "epsilon", "steps", "sigma"):
        assert res_full[k] == res_cut[k], k
    # the metrics table has each step exactly once, as in the uninterrupted run
    m_full = pd.read_csv(tmp_path / "full" / "metrics.csv")
    m_cut = pd.read_csv(tmp_path / "cut" / "metrics.csv")
    assert list(m_cut["step"]) == list(m_full["step"])
    assert m_cut["loss"].tolist() == pytest.approx(m_full["loss"].tolist())
    d_full = pd.read_csv(tmp_path / "full" / "diagnostics.csv")
    d_cut = pd.read_csv(tmp_path / "cut" / "diagnostics.csv")
    assert sorted(set(d_full["step"])) == [1, 2, 4, 6][: len(set(d_full["step"]))]
    pd.testing.assert_frame_equal(d_cut, d_full)  # no step logged twice or lost


def test_resume_refuses_a_changed_configuration(tiny_cfg, digits8):
    with pytest.raises(Interrupted):
        _quiet(tiny_cfg, digits8).run(stop_after=2)
    with pytest.raises(ConfigError, match="differs"):
        _quiet(tiny_cfg.replace(clip=0.5), digits8, resume=True)


def test_finished_run_is_not_overwritten(tiny_cfg, digits8):
    _quiet(tiny_cfg.replace(epochs=0.05), digits8).run()
    with pytest.raises(ConfigError, match="finished"):
        _quiet(tiny_cfg.replace(epochs=0.05), digits8)
