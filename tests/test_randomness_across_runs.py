"""Randomness across runs (docs/sharp-edges.md, "Randomness across runs"): the attacker
reads every run of a grid. Two runs never share a noise draw; the runs of one seed share
their batches and augmentations, and the grid's joint epsilon accounts for that; each
example's augmentation is secret and its own; a crash never hides a released step; a
resumed audit keeps its coins; the seed key stays secret."""

from __future__ import annotations

import json
import math
import os
import threading

import numpy as np
import pytest
import torch

from scalemix.audit.bounds import fdp_bound
from scalemix.errors import ConfigError
from scalemix.privacy.accounting import Ledger
from scalemix.privacy.grid import Release, grid_privacy, grid_privacy_from_dir, sigma_eff
from scalemix.privacy.randomness import (
    RADIUS_MAX,
    AugStream,
    RunRandomness,
    SecretStream,
    load_seed_key,
    tail_delta,
)
from scalemix.train import Trainer
from tests.test_privacy_hardening import _first_step_draws


def _trainer(cfg, data, **kw):
    return Trainer(cfg, data=data, progress=False, log=lambda *_: None, **kw)


# ---------------------------------------------------------------- 1. noise per run


def test_two_cells_differing_in_one_axis_share_batches_but_never_noise(tiny_cfg, digits8, tmp_path):
    a = _trainer(tiny_cfg.replace(out=str(tmp_path / "a")), digits8)
    b = _trainer(tiny_cfg.replace(out=str(tmp_path / "b"), lr=2e-3), digits8)
    mask_a, z_a = _first_step_draws(a)
    mask_b, z_b = _first_step_draws(b)
    assert torch.equal(mask_a, mask_b)  # common random numbers: the same batches
    assert not torch.equal(z_a, z_b)  # never the same noise
    # the cancellation attack of the review: with equal sigma the difference of two cells'
    # noise is no longer zero, it has variance 2 per coordinate
    assert float((z_a - z_b).var()) == pytest.approx(2.0, rel=0.2)
    # the same configuration again draws its own noise (threads, plans, devices and
    # versions may change what it computes); reproducing a run's noise is explicit
    again = _trainer(tiny_cfg.replace(out=str(tmp_path / "again")), digits8)
    assert torch.equal(_first_step_draws(again)[0], mask_a) and not torch.equal(
        _first_step_draws(again)[1], z_a
    )
    twin = _trainer(
        tiny_cfg.replace(out=str(tmp_path / "twin")), digits8, noise_nonce=a.rng.noise_nonce
    )
    assert torch.equal(_first_step_draws(twin)[1], z_a)
    assert a.resolved_config()["resolved"]["randomness"]["run_identity"] == tiny_cfg.identity()


def test_seeded_shared_is_explicit_and_says_the_grid_is_not_dp(tiny_cfg, digits8, tmp_path):
    cfg = tiny_cfg.replace(noise="seeded-shared")
    a = _trainer(cfg.replace(out=str(tmp_path / "a")), digits8)
    b = _trainer(cfg.replace(out=str(tmp_path / "b"), lr=2e-3), digits8)
    assert torch.equal(_first_step_draws(a)[1], _first_step_draws(b)[1])
    assert "not DP at all" in a.rng.assumption


# ---------------------------------------------------------------- 2. the joint epsilon


def _rel(name, sigma, draws, *, seed=0, q=0.05, mode="seeded", private=True, **kw):
    return Release(
        name=name,
        private=private,
        mode=mode if private else None,
        seed=seed,
        seed_key_id="k",
        sigma=sigma,
        q=q,
        draws=draws,
        delta=1e-5 if private else None,
        accountant="rdp",
        epsilon=kw.pop("epsilon", 1.0),
        structure=kw.pop("structure", (1000, 0, 1, "digits")),
    )


def test_joint_epsilon_of_two_cells_of_one_seed_is_one_mechanism_with_sigma_eff():
    from dp_accounting import dp_event, rdp

    gp = grid_privacy([_rel("a", 1.0, 200), _rel("b", 2.0, 200)])
    s = (1.0**-2 + 2.0**-2) ** -0.5
    assert sigma_eff([1.0, 2.0]) == pytest.approx(s)
    direct = Ledger("rdp")
    direct.step(s, 0.05, count=200)
    assert gp.status == "dp" and gp.epsilon == pytest.approx(direct.epsilon(1e-5))
    # an independent accountant (Google's dp-accounting, RDP) on the same mechanism
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(s)), 200)
    assert gp.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=0.02)
    # more than one cell's epsilon, less than their sum when they share the batches
    one = Ledger("rdp")
    one.step(1.0, 0.05, count=200)
    assert one.epsilon(1e-5) < gp.epsilon
    # and what the same two runs would cost with batches of their own
    own = Ledger("rdp")
    own.step(1.0, 0.05, count=200)
    own.step(2.0, 0.05, count=200)
    assert gp.independent_epsilon == pytest.approx(own.epsilon(1e-5))


def test_joint_epsilon_counts_unequal_lengths_seeds_and_secure_runs():
    # seed 0: a 300-draw and a 100-draw run (sigma_eff for 100 draws, then sigma_a alone);
    # seed 1: an independent copy; one secure run composes on its own
    rels = [
        _rel("a0", 1.0, 300),
        _rel("b0", 1.5, 100),
        _rel("a1", 1.0, 300, seed=1),
        _rel("b1", 1.5, 100, seed=1),
        _rel("s", 2.0, 50, mode="secure"),
    ]
    gp = grid_privacy(rels)
    ledger = Ledger("rdp")
    for _ in range(2):
        ledger.step(sigma_eff([1.0, 1.5]), 0.05, count=100)
        ledger.step(1.0, 0.05, count=200)
    ledger.step(2.0, 0.05, count=50)
    assert gp.epsilon == pytest.approx(ledger.epsilon(1e-5))
    assert [s["runs"] for s in gp.per_seed] == [2, 2]


def test_grid_privacy_refuses_what_it_cannot_bound():
    # another sampling rate in one seed: nested masks, bounded without amplification
    gp = grid_privacy([_rel("a", 1.0, 100), _rel("b", 1.0, 100, q=0.1)])
    loose = Ledger("rdp")
    loose.step(sigma_eff([1.0, 1.0]), 1.0, count=100)
    assert gp.status == "dp" and gp.epsilon == pytest.approx(loose.epsilon(1e-5))
    assert "without amplification" in gp.text
    # shared noise: only each cell alone is DP
    shared = grid_privacy(
        [_rel("a", 1.0, 100, mode="seeded-shared"), _rel("b", 2.0, 100, mode="seeded-shared")]
    )
    assert shared.status == "per_cell_only" and shared.epsilon is None
    assert "not differentially private" in shared.text
    # a non-private cell: the grid is not DP
    nd = grid_privacy([_rel("a", 1.0, 100), _rel("np", 0.0, 100, private=False)])
    assert nd.status == "not_dp" and "NOT differentially private" in nd.text


def test_joint_epsilon_reads_a_grid_directory_with_diverged_and_unfinished_cells(tmp_path):
    def cell(name, sigma, result=None, released=None, identity="", nonce=None):
        identity = name if identity == "" else identity
        d = tmp_path / "g" / "cells" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(
            json.dumps(
                {
                    "config": {"noise": "seeded", "seed": 0, "delta": 1e-5, "accountant": "rdp"},
                    "resolved": {
                        "private": True,
                        "sigma": sigma,
                        "sample_rate": 0.05,
                        "train_size": 1000,
                        "randomness": {
                            "seed_key_id": "k",
                            "run_identity": identity,
                            "noise_nonce": nonce or name,
                        },
                    },
                }
            )
        )
        if result is not None:
            (d / "result.json").write_text(json.dumps(result))
        if released is not None:
            (d / "released.json").write_text(json.dumps(released))

    cell("done", 1.0, {"status": "done", "steps": 100, "abandoned_steps": 0, "epsilon": 2.0})
    cell("diverged", 1.0, {"status": "diverged", "steps": 40, "abandoned_steps": 0})
    cell("running", 1.0, released={"steps_released": 70, "abandoned_steps": 5})
    gp = grid_privacy_from_dir(tmp_path / "g")
    ledger = Ledger("rdp")
    ledger.step(sigma_eff([1.0] * 3), 0.05, count=40)
    ledger.step(sigma_eff([1.0] * 2), 0.05, count=35)
    ledger.step(1.0, 0.05, count=25)
    assert gp.epsilon == pytest.approx(ledger.epsilon(1e-5))
    # a reproduction (the same identity and nonce) shares its noise: no joint guarantee
    cell("twin", 1.0, {"status": "done", "steps": 100}, identity="done", nonce="done")
    assert grid_privacy_from_dir(tmp_path / "g").status == "per_cell_only"
    import shutil

    shutil.rmtree(tmp_path / "g" / "cells" / "twin")
    # a run written before noise was keyed per run shared its noise with its seed
    cell("old", 1.0, {"status": "done", "steps": 100, "abandoned_steps": 0}, identity=None)
    cell("old2", 2.0, {"status": "done", "steps": 100, "abandoned_steps": 0}, identity=None)
    assert grid_privacy_from_dir(tmp_path / "g").status == "per_cell_only"


# ---------------------------------------------------------------- 3. augmentation


def test_other_examples_views_are_unchanged_when_one_example_is_added():
    aug = AugStream(bytes(range(32)))
    idx = torch.tensor([3, 17, 40, 41, 99])
    plus = torch.tensor([3, 17, 25, 40, 41, 99])  # example 25 joins the batch
    a = torch.stack(aug.views(7, idx, 4, 4), 1).view(5, 4, 3)
    b = torch.stack(aug.views(7, plus, 4, 4), 1).view(6, 4, 3)
    assert torch.equal(a, b[[0, 1, 3, 4, 5]])
    # order does not matter either; other steps and other keys give other views
    rev = torch.stack(aug.views(7, idx.flip(0), 4, 4), 1).view(5, 4, 3)
    assert torch.equal(rev, a.flip(0))
    assert not torch.equal(torch.stack(aug.views(8, idx, 4, 4), 1).view(5, 4, 3), a)
    other = AugStream(bytes(32))
    assert not torch.equal(torch.stack(other.views(7, idx, 4, 4), 1).view(5, 4, 3), a)
    # offsets cover 0..2 pad, flips are fair
    dy, dx, flip = aug.views(1, torch.arange(2000), 4, 4)
    assert set(dy.tolist()) == set(range(9)) and set(dx.tolist()) == set(range(9))
    assert abs(float(flip.float().mean()) - 0.5) < 0.02


def test_the_trainer_augments_each_example_from_its_own_key(tiny_cfg, digits8, tmp_path):
    cfg = tiny_cfg.replace(aug="crop", aug_mult=3, physical_batch=64)
    tr = _trainer(cfg, digits8)
    idx = torch.tensor([5, 9, 30])
    plus = torch.tensor([5, 7, 9, 30])
    ((xa, _),) = list(tr._chunks(idx, idx))
    ((xb, _),) = list(tr._chunks(plus, plus))
    assert torch.equal(xa, xb[[0, 2, 3]])
    other = _trainer(cfg.replace(out=str(tmp_path / "o"), lr=5e-3), digits8)
    ((xo, _),) = list(other._chunks(idx, idx))
    assert torch.equal(xa, xo)  # the cells of one seed share augmentations (CRN)


# ---------------------------------------------------------------- 4. every released step


def test_a_kill_after_released_steps_beyond_the_checkpoint_counts_them(tiny_cfg, digits8, tmp_path):
    """SIGKILL after a released step beyond the checkpoint, then resume: a secure run
    (a fresh key on resume) counts the released steps in epsilon and never redoes them
    uncounted. The first trainer is abandoned mid-run, as a kill leaves it."""
    cfg = tiny_cfg.replace(noise="secure", epochs=0.5, checkpoint_every=100)
    first = _trainer(cfg, digits8)
    first.train_step()
    first.save_checkpoint()
    first.train_step()
    first.train_step()  # steps 2 and 3 released (W&B, logs), no checkpoint: then killed
    released = json.loads(first.run_dir.released.read_text())
    assert released["steps_released"] == 3
    del first
    resumed = _trainer(cfg, digits8, resume=True)
    assert resumed.step == 1 and resumed.abandoned_steps == 2
    assert resumed.ledger.steps == 3
    res = resumed.run()
    assert res["abandoned_steps"] == 2
    full = Ledger(cfg.accountant)
    full.step(resumed.sigma, resumed.q, count=res["steps"] + 2)
    assert res["epsilon"] == pytest.approx(full.epsilon(cfg.delta))
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert privacy["abandoned_steps_counted"] == 2


def test_a_seeded_run_counts_its_released_steps_too(tiny_cfg, digits8):
    """A seeded run does not redo released steps with their old draws (a redo is the same
    release only if it is bit for bit the same computation): it counts them and goes on."""
    cfg = tiny_cfg.replace(checkpoint_every=100)
    first = _trainer(cfg, digits8)
    first.train_step()
    first.save_checkpoint()
    first.train_step()
    draws = (first.rng.sampler.draws, first.rng.noise.draws)
    del first
    resumed = _trainer(cfg, digits8, resume=True)
    assert resumed.step == 1 and resumed.abandoned_steps == 1 and resumed.ledger.steps == 2
    assert (resumed.rng.sampler.draws, resumed.rng.noise.draws) == draws


# ---------------------------------------------------------------- 5. audits keep their coins


@pytest.mark.parametrize("kind", ["gradient", "input"])
def test_secure_resume_keeps_the_canary_coins(tiny_cfg, digits8, tmp_path, kind):
    cfg = tiny_cfg.replace(
        noise="secure", audit_canaries=40, canary_kind=kind, checkpoint_every=100, diag_every=0
    )
    first = _trainer(cfg, digits8)
    first.train_step()
    first.save_checkpoint()
    member = first.canaries.member.clone()
    picks = None if kind == "gradient" else first.canaries.data_index.clone()
    del first
    resumed = _trainer(cfg, digits8, resume=True)
    assert torch.equal(resumed.canaries.member, member)
    if picks is not None:
        assert torch.equal(resumed.canaries.data_index, picks)
    fresh = _trainer(cfg.replace(out=str(tmp_path / "fresh")), digits8)
    assert not torch.equal(fresh.canaries.member, member)  # a new key draws other coins


# ---------------------------------------------------------------- 6. the noise's tails


def test_box_muller_reaches_past_the_old_8_57_sigma_cut():
    """A 53-bit uniform stops the radius at sqrt(2 ln 2^53) = 8.57; the 96-bit one at 11.5,
    with the delta that adds bounded far below any delta used."""

    def zero(first, n):  # a keystream of zero words: the smallest uniform there is
        return torch.zeros(n, dtype=torch.int64)

    z = next(SecretStream._normal_pieces(zero, 1, 2, torch.float64, block=8))
    assert float(z.norm()) == pytest.approx(RADIUS_MAX) and RADIUS_MAX > 11.5
    assert tail_delta(8.0, 10_000, 2_450_000) < 1e-12
    assert tail_delta(8.0, 10_000, 2_450_000) > 0


def test_fdp_bound_refuses_delta_zero():
    with pytest.raises(ValueError, match="delta > 0"):
        fdp_bound(10, 10, 10, delta=0.0)


# ---------------------------------------------------------------- 7. the seed key


def test_seed_key_refused_inside_the_run_or_readable_by_others(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("SCALEMIX_SEED_KEY", str(out / "seed-key"))
    with pytest.raises(ConfigError, match="inside the run directory"):
        load_seed_key(run_dir=out)
    path = tmp_path / "keys" / "seed-key"
    monkeypatch.setenv("SCALEMIX_SEED_KEY", str(path))
    load_seed_key()
    assert (path.stat().st_mode & 0o777) == 0o600
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_seed_key()
    with pytest.raises(ConfigError, match="chmod 600"):
        RunRandomness("seeded", 0, identity="x")


def test_seed_key_creation_is_race_free(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALEMIX_SEED_KEY", str(tmp_path / "k" / "seed-key"))
    keys, errors = [], []

    def worker():
        try:
            keys.append(load_seed_key())
        except Exception as e:  # pragma: no cover - the failure this test catches
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(keys)) == 1
    assert not [p for p in (tmp_path / "k").iterdir() if p.name != "seed-key"]  # no leftovers


def test_noise_tail_delta_is_in_privacy_json(tiny_cfg, digits8):
    tr = _trainer(tiny_cfg, digits8)
    assert not tr.run_dir.privacy.exists()  # setting a run up writes nothing
    tr.open()  # the run directory opens (run() and the first step do it)
    p = json.loads(tr.run_dir.privacy.read_text())
    assert 0 < p["noise_tail_delta"] < 1e-12
    assert math.isfinite(p["noise_tail_delta"]) and "grid" in p
    assert np.isfinite(tr.sigma)
    policy = json.loads(tr.run_dir.config.read_text())["resolved"]["precision_policy"]
    assert policy["clip_margin_fp32"] == 2.0**-10 and "TF32" in policy["dp_products"]


def test_a_restart_without_resume_still_counts_what_was_released(tiny_cfg, digits8):
    """Killed before its first checkpoint, then started again in the same directory: the
    steps the first attempt released are counted."""
    cfg = tiny_cfg.replace(noise="secure", checkpoint_every=100)
    first = _trainer(cfg, digits8)
    first.train_step()
    first.train_step()
    del first
    again = _trainer(cfg, digits8)
    assert again.step == 0 and again.abandoned_steps == 2 and again.ledger.steps == 2
