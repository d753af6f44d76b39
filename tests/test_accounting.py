"""epsilon agrees with an independent accountant (Google's dp-accounting) within 1 %."""

from __future__ import annotations

import json
import subprocess
import sys

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from scalemix.errors import ConfigError, PrivacyError
from scalemix.privacy import Ledger, epsilon_for, sigma_for

CASES = [  # (sigma, q, steps)
    (1.0, 0.02, 2500),
    (2.0, 1024 / 50_000, 500),
    (0.8, 256 / 1438, 30),
    (1.1, 0.004, 10_000),
]
DELTA = 1e-5


def _event(sigma, q, steps):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )


@pytest.mark.parametrize(("sigma", "q", "steps"), CASES)
def test_prv_matches_independent_pld(sigma, q, steps):
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(_event(sigma, q, steps))
    ref = acc.get_epsilon(DELTA)
    ours = epsilon_for(sigma=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="prv")
    assert abs(ours - ref) / ref < 0.01


@pytest.mark.parametrize(("sigma", "q", "steps"), CASES)
def test_rdp_matches_independent_rdp(sigma, q, steps):
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(_event(sigma, q, steps))
    ref = acc.get_epsilon(DELTA)
    ours = epsilon_for(sigma=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="rdp")
    assert abs(ours - ref) / ref < 0.01
    # PRV is the tighter analysis: never above RDP
    assert epsilon_for(sigma=sigma, sample_rate=q, steps=steps, delta=DELTA) <= ours * 1.001


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_calibrated_sigma_spends_at_most_target(target):
    q, steps = 1024 / 50_000, 500
    s = sigma_for(epsilon=target, sample_rate=q, steps=steps, delta=DELTA)
    eps = epsilon_for(sigma=s, sample_rate=q, steps=steps, delta=DELTA)
    assert 0.99 * target <= eps <= target
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(_event(s, q, steps))
    assert acc.get_epsilon(DELTA) <= target


def test_ledger_counts_steps_like_one_shot():
    led = Ledger("prv")
    for _ in range(300):
        led.step(1.0, 0.02)
    assert led.steps == 300 and led.history == [(1.0, 0.02, 300)]
    assert led.epsilon(DELTA) == pytest.approx(
        epsilon_for(sigma=1.0, sample_rate=0.02, steps=300, delta=DELTA)
    )
    state = led.state_dict()
    other = Ledger("prv")
    other.load_state_dict(state)
    assert other.epsilon(DELTA) == led.epsilon(DELTA)


def test_sampler_mismatch_refused():
    with pytest.raises(PrivacyError, match="Poisson"):
        Ledger("prv", sampler_kind="shuffle")


@pytest.mark.parametrize(
    "kw",
    [
        dict(sample_rate=0.0),
        dict(sample_rate=1.5),
        dict(steps=0),
        dict(delta=0.0),
        dict(sigma=-1.0),
    ],
)
def test_bad_privacy_arguments(kw):
    args = dict(sigma=1.0, sample_rate=0.01, steps=10, delta=1e-5) | kw
    with pytest.raises(ConfigError):
        epsilon_for(**args)


def test_cli_privacy_json_agrees_with_library():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalemix",
            "privacy",
            "epsilon",
            "--sigma",
            "1.0",
            "--sample-rate",
            "0.02",
            "--steps",
            "2500",
            "--delta",
            "1e-5",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    eps = json.loads(out.stdout)["epsilon"]
    assert eps == pytest.approx(epsilon_for(sigma=1.0, sample_rate=0.02, steps=2500, delta=DELTA))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalemix",
            "privacy",
            "sigma",
            "--epsilon",
            str(eps),
            "--sample-rate",
            "0.02",
            "--steps",
            "2500",
            "--delta",
            "1e-5",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["sigma"] == pytest.approx(1.0, rel=0.02)
