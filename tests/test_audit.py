"""The one-run privacy audit: its statistics against hand-worked and independent
computations, and on real (tiny) training runs: it detects leaks, never accuses a correct
run, and shows what a known sampler gives away."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from scalemix.audit import bounds
from scalemix.audit.canaries import load as load_canaries
from scalemix.privacy import NoiseSource
from scalemix.train import Trainer
from scalemix.train.loop import Interrupted

# ---------------------------------------------------------------- the bounds


def test_all_guesses_right_hand_worked():
    """Steinke et al. 2023 (docs/sharp-edges.md, item 15): with all r guesses right and delta = 0 the 95 % bound is ln(p / (1 - p)),
    p = 0.05^(1/r): about 3.5 for r = 100 and 5.8 for r = 1000."""
    for r, approx in ((100, 3.5), (1000, 5.8)):
        p = 0.05 ** (1 / r)
        exact = math.log(p / (1 - p))
        assert bounds.steinke_bound(r, r, r, alpha=0.05, delta=0) == pytest.approx(exact, abs=1e-5)
        assert exact == pytest.approx(approx, abs=0.05)


def _p_value_by_hand(m, r, v, eps, delta):
    """Theorem 5.2 of Steinke et al. with explicit binomial sums (no scipy)."""
    p = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(r + 1)]
    tail = math.fsum(pmf[v:])
    worst = max(math.fsum(pmf[v - i : v]) / i for i in range(1, v + 1))
    return min(1.0, tail + 2 * m * delta * worst)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [(100, 40, 30, 0.5, 0.0), (1000, 200, 150, 1.0, 1e-5), (500, 60, 60, 3.0, 1e-4)],
)
def test_p_value_matches_an_independent_computation(m, r, v, eps, delta):
    assert bounds.steinke_p_value(m, r, v, eps, delta) == pytest.approx(
        _p_value_by_hand(m, r, v, eps, delta), rel=1e-9, abs=1e-15
    )


def test_bound_is_where_the_p_value_reaches_alpha():
    m, r, v = 1000, 200, 170
    e = bounds.steinke_bound(m, r, v, alpha=0.05, delta=1e-5)
    assert e > 0
    assert (
        _p_value_by_hand(m, r, v, e - 1e-3, 1e-5) < 0.05 < _p_value_by_hand(m, r, v, e + 1e-3, 1e-5)
    )


def test_gdp_curve_matches_dp_accounting():
    dp_accounting = pytest.importorskip("dp_accounting")
    for eps, delta in ((1.0, 1e-5), (4.0, 1e-5), (8.0, 1e-6)):
        mu = bounds.gdp_mu(eps, delta)
        assert mu == pytest.approx(1 / dp_accounting.get_sigma_gaussian(eps, delta), rel=1e-6)


def test_bounds_are_valid_for_an_exact_gdp_mechanism():
    """Scores from an exactly mu-GDP mechanism (Gaussian shift of the members): over 100
    simulated audits the 95 % bounds exceed the true epsilon at most 5 times."""
    rng = np.random.default_rng(0)
    eps_true, delta = 2.0, 1e-5
    mu = bounds.gdp_mu(eps_true, delta)
    over = {"steinke": 0, "fdp": 0}
    for _ in range(100):
        member = rng.random(500) < 0.5
        scores = rng.normal(mu * member, 1.0)
        b = bounds.one_run_bounds(scores, member, alpha=0.05, delta=delta)
        for k in over:
            over[k] += b[k]["epsilon"] > eps_true
    assert over["steinke"] <= 5 and over["fdp"] <= 5


def test_fixed_strategy_and_ceiling():
    member = np.array([True] * 50 + [False] * 50)
    scores = member.astype(float)  # a perfect attack
    fixed = bounds.one_run_bounds(scores, member, strategy=bounds.Fixed(40, 40), delta=0)
    assert fixed["steinke"]["correct"] == 80 and fixed["tests"] == 1
    assert fixed["steinke"]["epsilon"] == pytest.approx(
        bounds.steinke_bound(100, 80, 80, alpha=0.05, delta=0)
    )
    c = bounds.ceiling(100, delta=0)
    b = bounds.one_run_bounds(scores, member, delta=0)
    assert b["steinke"]["epsilon"] == pytest.approx(c["steinke"])  # perfect = the ceiling
    assert b["steinke"]["epsilon"] < fixed["steinke"]["epsilon"]  # Bonferroni costs a little
    # at delta = 0 the f-DP bound does not exist (it read 50 = EPS_MAX before)
    assert fixed["fdp"]["epsilon"] is None and c["fdp"] is None


# ---------------------------------------------------------------- on training runs


def _audited(tiny_cfg, tmp_path, name, **kw):
    cfg = tiny_cfg.replace(
        model="resnet9_tiny",
        groups=None,
        out=str(tmp_path / name),
        ema=None,
        diag_every=0,
        audit_canaries=1000,
        physical_batch=512,
        **kw,
    )
    return cfg


def _run(cfg, data, **kw):
    tr = Trainer(cfg, data=data, progress=False, log=lambda *_: None, **kw)
    return tr, tr.run()


def test_almost_no_noise_reaches_the_ceiling(tiny_cfg, digits8, tmp_path):
    cfg = _audited(tiny_cfg, tmp_path, "leak", sigma=0.05, epsilon=None, batch_size=512, epochs=6)
    cfg = cfg.replace(accountant="rdp")  # PRV is slow (and infinite) at sigma 0.05
    _, res = _run(cfg, digits8)
    audit = json.loads((tmp_path / "leak" / "audit" / "audit.json").read_text())
    ceiling = audit["ceiling"]["steinke"]
    assert res["epsilon_lower_bound"] >= 0.9 * ceiling
    assert audit["adversaries"]["white-box, known batches"]["steinke"]["epsilon"] == pytest.approx(
        ceiling
    )
    assert ceiling == pytest.approx(bounds.ceiling(1000)["steinke"])


def test_broken_mechanism_raises_the_alarm(tiny_cfg, digits8, tmp_path, monkeypatch, cli):
    """Noise at 0.3x while the accountant believes epsilon = 1."""
    real_add = NoiseSource.add_
    monkeypatch.setattr(NoiseSource, "add_", lambda self, t, std: real_add(self, t, 0.3 * std))
    cfg = _audited(tiny_cfg, tmp_path, "broken", sigma=None, epsilon=1.0, batch_size=512, epochs=8)
    cfg = cfg.replace(audit_canaries=5000)  # the audit vector makes many canaries cheap
    _, res = _run(cfg, digits8)
    assert res["epsilon"] <= 1.0
    assert res["epsilon_lower_bound"] > 1.0 and res["privacy_alarm"] is True
    # the stand-alone command recomputes the same bound and exits 3
    out = cli("audit", tmp_path / "broken", "--json")
    assert out.code == 3, out.err
    again = json.loads(out.out)
    assert again["epsilon_lower_bound"] == pytest.approx(res["epsilon_lower_bound"])
    assert "PRIVACY ALARM" in out.err


SEEDS = 20


@pytest.mark.slow
def test_correct_runs_are_never_accused_and_known_batches_leak_more(
    tiny_cfg, digits8, tmp_path, record_property
):
    """Correct runs at epsilon 1, 4 and 8, 20 seeds each: every lower bound (both methods)
    stays below the accountant's epsilon. The auditor who knows the batches (a seeded run
    whose seed key is published) gets measurably more."""
    table = {}
    for eps in (1.0, 4.0, 8.0):
        secret, known, fdp = [], [], []
        for seed in range(SEEDS):
            cfg = _audited(
                tiny_cfg,
                tmp_path,
                f"e{eps}-s{seed}",
                sigma=None,
                epsilon=eps,
                batch_size=256,
                epochs=2,
                seed=seed,
            )
            _, res = _run(cfg, digits8)
            assert not res["privacy_alarm"]
            assert res["epsilon_lower_bound"] < res["epsilon"], (eps, seed)
            assert res["epsilon_lower_bound_fdp"] < res["epsilon"], (eps, seed)
            secret.append(res["epsilon_lower_bound"])
            fdp.append(res["epsilon_lower_bound_fdp"])
            known.append(res["audit_known_batches_bound"])
        table[eps] = (np.mean(secret), np.max(secret), np.mean(fdp), np.mean(known))
        if eps >= 4:
            assert np.mean(known) > np.mean(secret) + 0.5
    record_property("audit_table", table)


def test_canary_records_survive_an_interruption(tiny_cfg, digits8, tmp_path):
    cfg = _audited(tiny_cfg, tmp_path, "full", sigma=1.0, epsilon=None, batch_size=256, epochs=2)
    full, _ = _run(cfg, digits8)
    cut = cfg.replace(out=str(tmp_path / "cut"))
    with pytest.raises(Interrupted):  # the same run as `full`, its noise reproduced
        Trainer(
            cut,
            data=digits8,
            progress=False,
            log=lambda *_: None,
            noise_nonce=full.rng.noise_nonce,
        ).run(stop_after=4)
    Trainer(cut, data=digits8, resume=True, progress=False, log=lambda *_: None).run()
    a, b = load_canaries(tmp_path / "full"), load_canaries(tmp_path / "cut")
    assert a["draws"].shape[0] == b["draws"].shape[0] == 11
    for k in ("member", "draws", "obs"):
        assert np.array_equal(a[k], b[k]), k


def test_input_canaries_are_ordinary_examples_and_rescored_from_the_model(
    tiny_cfg, digits8, tmp_path, cli
):
    cfg = _audited(tiny_cfg, tmp_path, "input", sigma=1.0, epsilon=None, batch_size=256, epochs=1)
    cfg = cfg.replace(audit_canaries=100, canary_kind="input")
    tr, res = _run(cfg, digits8)
    n = digits8.train_y.shape[0]
    assert tr.n == n - 100 and len(tr.train_y) == n  # 100 real examples became canaries
    c = load_canaries(tmp_path / "input")
    # the file holds no image and no label of a private example: indices and shifts only
    assert not {"x", "y", "source_index", "draws"} & set(c)  # nor which steps drew them
    assert int(c["steps_observed"]) == res["steps"]
    index, shift = torch.from_numpy(c["data_index"]), torch.from_numpy(c["shift"])
    assert ((shift >= 1) & (shift <= 9)).all()
    wrong = (digits8.train_y[index] + shift) % 10
    assert torch.equal(wrong, tr.canaries.y) and (wrong != digits8.train_y[index]).all()
    assert torch.equal(digits8.train_x[index], tr.canaries.x)
    assert not any(a.dtype == np.uint8 and a.size >= 64 for a in c.values() if hasattr(a, "dtype"))
    privacy = json.loads((tmp_path / "input" / "privacy.json").read_text())
    assert "100 training examples were input canaries" in privacy["canaries"]
    assert res["private_examples"] == n - 100
    out = cli("audit", tmp_path / "input", "--json")
    assert out.code == 0, out.err
    assert json.loads(out.out)["epsilon_lower_bound"] == pytest.approx(
        res["epsilon_lower_bound"]
    )
    assert torch.isfinite(torch.tensor(res["test_acc"]))


def test_gradient_canaries_leave_the_model_bit_identical(tiny_cfg, digits8, tmp_path):
    """The audit vector lies beside the model: a seeded run with gradient canaries trains
    exactly the model of the same run without them (same batches, same noise per weight)."""
    base = tiny_cfg.replace(model="resnet9_tiny", groups=None, ema=None, diag_every=0, epochs=0.5)
    plain, _ = _run(base.replace(out=str(tmp_path / "plain")), digits8)
    audited, res = _run(
        base.replace(out=str(tmp_path / "aud"), audit_canaries=2000),
        digits8,
        noise_nonce=plain.rng.noise_nonce,  # the same noise, so that models can be compared
    )
    for (n, a), (_, b) in zip(plain.model.state_dict().items(), audited.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert res["audit_canaries"] == 2000
