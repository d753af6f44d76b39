"""epsilon agrees with an independent accountant (Google's dp-accounting) within 1 % and with
Opacus's accountants (which scalemix ports); sigma_for returns a sigma that spends at most the
target and nearly all of it; the on-disk cache never answers for other inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from scalemix.errors import ConfigError, PrivacyError
from scalemix.privacy import Ledger, accounting, epsilon_for, sigma_for

CASES = [  # (sigma, q, steps)
    (1.0, 0.02, 2500),
    (2.0, 1024 / 50_000, 500),
    (0.8, 256 / 1438, 30),
    (1.1, 0.004, 10_000),
]
DELTA = 1e-5
# the settings users type: CIFAR-10 (B 4096, 60 epochs), digits (B 256, 3 epochs), q=0.02 x 2500
USER = [
    (4096 / 50_000, round(60 / (4096 / 50_000))),
    (256 / 1438, round(3 / (256 / 1438))),
    (0.02, 2500),
]


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


def _pld(sigma, q, steps):
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(_event(sigma, q, steps))
    return acc.get_epsilon(DELTA)


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_calibrated_sigma_spends_at_most_target(target):
    q, steps = 1024 / 50_000, 500
    s = sigma_for(epsilon=target, sample_rate=q, steps=steps, delta=DELTA)
    eps = epsilon_for(sigma=s, sample_rate=q, steps=steps, delta=DELTA)
    assert 0.995 * target <= eps <= target
    assert _pld(s, q, steps) <= target


@pytest.mark.slow
@pytest.mark.parametrize(("q", "steps"), USER)
@pytest.mark.parametrize("target", [1.0, 8.0])
def test_sigma_for_user_settings_is_tight_and_safe(q, steps, target):
    """As the run reports it (its Ledger), the calibrated sigma spends at most the target
    and at least 99.5 % of it; the independent PLD accountant agrees that it is enough and
    that 2 % less noise would not be."""
    s = sigma_for(epsilon=target, sample_rate=q, steps=steps, delta=DELTA)
    led = Ledger("prv")
    led.step(s, q, count=steps)
    assert 0.995 * target <= led.epsilon(DELTA) <= target
    if target == 8.0:  # PLD is slow at small sigma's neighbours only: one target is enough
        assert _pld(s, q, steps) <= target < _pld(0.98 * s, q, steps)


@pytest.mark.parametrize(("q", "steps"), USER)
def test_sigma_for_rdp_is_tight_and_safe(q, steps):
    s = sigma_for(epsilon=4.0, sample_rate=q, steps=steps, delta=DELTA, accountant="rdp")
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(_event(s, q, steps))
    assert acc.get_epsilon(DELTA) <= 4.0 * 1.01
    led = Ledger("rdp")
    led.step(s, q, count=steps)
    assert 0.995 * 4.0 <= led.epsilon(DELTA) <= 4.0


def test_sigma_for_takes_few_accountant_calls(monkeypatch):
    """The search's cost: a handful of PRV computations, at most two with the reported
    (fine, expensive) error bound; a bisection takes 15-20."""
    calls = []
    real = accounting._prv_epsilon

    def counting(history, delta, eps_error):
        calls.append(eps_error)
        return real(history, delta, eps_error)

    monkeypatch.setattr(accounting, "_prv_epsilon", counting)
    for q, steps in USER:
        for target in (2.0, 8.0):
            calls.clear()
            accounting._epsilon_memo.cache_clear()
            sigma_for(epsilon=target * 1.0001, sample_rate=q, steps=steps, delta=DELTA)
            assert len(calls) <= 6, calls
            assert calls.count(accounting.PRV_EPS_ERROR) <= 2, calls


def test_sigma_for_refuses_an_unreachable_target():
    with pytest.raises(PrivacyError, match="raise epsilon"):  # PRV's bound is >= its error
        sigma_for(epsilon=0.002, sample_rate=0.01, steps=100, delta=DELTA)


HISTORIES = [
    [(1.0, 0.02, 2500)],
    [(0.8, 256 / 1438, 30)],
    [(1.53, 4096 / 50_000, 732)],
    [(5.0, 1.0, 10)],
    [(1.0, 0.02, 1000), (1.5, 0.02, 500)],
    [(1.0, 0.02, 100), (2.0, 0.01, 300), (0.9, 0.05, 50)],
]


@pytest.mark.slow
@pytest.mark.parametrize("history", HISTORIES)
def test_accountants_match_opacus(history):
    """The port computes what Opacus's accountants do: RDP exactly; PRV on a domain widened
    to a fast FFT length, which moves the bound by ~1e-9 only."""
    import warnings

    from opacus.accountants import PRVAccountant, RDPAccountant

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for err in (accounting.PRV_EPS_ERROR, accounting.PRV_EPS_ERROR_CALIBRATION):
            prv = PRVAccountant()
            prv.history = list(history)
            ref = prv.get_epsilon(DELTA, eps_error=err)
            ours = accounting._epsilon(history, DELTA, "prv", err)
            assert ours == pytest.approx(ref, rel=1e-7, abs=0)
        rdp = RDPAccountant()
        rdp.history = list(history)
        assert accounting._epsilon(history, DELTA, "rdp") == pytest.approx(
            rdp.get_epsilon(DELTA), rel=1e-12, abs=0
        )


# ---------------------------------------------------------------------------- the cache

A = dict(sigma=1.3, sample_rate=0.02, steps=300, delta=DELTA)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SCALEMIX_CACHE_DIR", str(root))
    accounting._epsilon_memo.cache_clear()
    yield root / "privacy"
    accounting._epsilon_memo.cache_clear()


def _fresh(sigma, sample_rate, steps, delta, accountant="prv", eps_error=accounting.PRV_EPS_ERROR):
    """Computed now, without either cache."""
    if accountant == "prv":
        return accounting._prv_epsilon([(sigma, sample_rate, steps)], delta, eps_error)
    return accounting._rdp_epsilon([(sigma, sample_rate, steps)], delta)


def _poison(path, value=123.0):
    data = json.loads(path.read_text())
    data["epsilon"] = value
    path.write_text(json.dumps(data))


def test_cache_serves_a_later_process_and_only_its_own_inputs(cache, monkeypatch):
    eps = epsilon_for(**A)
    (path,) = cache.glob("*.json")
    assert json.loads(path.read_text())["epsilon"] == eps
    _poison(path)  # a value no accountant gives: where it shows up, the cache answered
    accounting._epsilon_memo.cache_clear()
    assert epsilon_for(**A) == 123.0
    others = [
        dict(A, sigma=float(np.nextafter(A["sigma"], 2.0))),
        dict(A, sample_rate=0.0201),
        dict(A, steps=301),
        dict(A, delta=1.1e-5),
        dict(A, accountant="rdp"),
        dict(A, eps_error=accounting.PRV_EPS_ERROR_CALIBRATION),
    ]
    for kw in others:
        got = epsilon_for(**kw)
        assert got != 123.0 and got == pytest.approx(_fresh(**kw), rel=1e-12), kw
    # the same inputs under another version of the code: not served either
    monkeypatch.setattr(accounting, "ALGORITHM", accounting.ALGORITHM + " (changed)")
    accounting._epsilon_memo.cache_clear()
    assert epsilon_for(**A) == pytest.approx(eps, rel=1e-12)


def test_cache_file_of_other_inputs_is_never_read_as_ours(cache):
    """A file whose stored key is not ours (a hash collision, a copied or damaged file)
    is ignored and replaced."""
    epsilon_for(**A)
    (path_a,) = cache.glob("*.json")
    _poison(path_a)
    b = dict(A, steps=400)
    path_b = accounting._cache_path(
        accounting._cache_key([(b["sigma"], b["sample_rate"], b["steps"])], DELTA, "prv", 0.003)
    )
    assert path_b != path_a and not path_b.exists()
    path_b.write_text(path_a.read_text())  # A's key and value at B's address
    assert epsilon_for(**b) == pytest.approx(_fresh(**b), rel=1e-12)
    assert json.loads(path_b.read_text())["epsilon"] == pytest.approx(_fresh(**b), rel=1e-12)
    path_b.write_text("{not json")
    accounting._epsilon_memo.cache_clear()
    assert epsilon_for(**b) == pytest.approx(_fresh(**b), rel=1e-12)


def test_sigma_for_is_served_by_the_cache(cache, monkeypatch):
    q, steps = USER[0]
    s = sigma_for(epsilon=8.0, sample_rate=q, steps=steps, delta=DELTA)
    accounting._epsilon_memo.cache_clear()

    def refuse(*a):
        raise AssertionError("computed again")

    monkeypatch.setattr(accounting, "_prv_epsilon", refuse)
    assert sigma_for(epsilon=8.0, sample_rate=q, steps=steps, delta=DELTA) == s


def test_cache_without_a_writable_place_is_memory_only(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SCALEMIX_CACHE_DIR", str(blocker / "cache"))
    accounting._epsilon_memo.cache_clear()
    assert epsilon_for(**A) == pytest.approx(_fresh(**A), rel=1e-12)
    assert blocker.is_file()

    monkeypatch.delenv("SCALEMIX_CACHE_DIR", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(accounting.Path, "home", staticmethod(no_home))
    accounting._epsilon_memo.cache_clear()
    assert accounting.cache_dir() is None
    assert epsilon_for(**A) == pytest.approx(_fresh(**A), rel=1e-12)
    accounting._epsilon_memo.cache_clear()


def test_cache_defaults_to_home(tmp_path, monkeypatch):
    monkeypatch.delenv("SCALEMIX_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    accounting._epsilon_memo.cache_clear()
    epsilon_for(**A)
    assert len(list((tmp_path / ".cache" / "scalemix" / "privacy").glob("*.json"))) == 1
    accounting._epsilon_memo.cache_clear()


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


def test_cli_privacy_json_agrees_with_library(cli):
    out = cli("privacy", "epsilon", "--sigma", "1.0", "--sample-rate", "0.02", "--steps", "2500", "--delta", "1e-5", "--json")
    assert out.code == 0, out.err
    eps = json.loads(out.out)["epsilon"]
    assert eps == pytest.approx(epsilon_for(sigma=1.0, sample_rate=0.02, steps=2500, delta=DELTA))
    out = cli("privacy", "sigma", "--epsilon", str(eps), "--sample-rate", "0.02", "--steps", "2500", "--delta", "1e-5", "--json")
    assert out.code == 0, out.err
    assert json.loads(out.out)["sigma"] == pytest.approx(1.0, rel=0.02)


def test_cli_privacy_does_not_import_opacus():
    """Opacus's import (with torch's) costs ~2 s: the privacy command does without it."""
    code = (
        "import sys\n"
        "from scalemix.cli import main\n"
        "sys.argv = ['scalemix', 'privacy', 'epsilon', '--sigma', '2', '--sample-rate', '0.5',"
        " '--steps', '3', '--delta', '1e-5']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'opacus' not in sys.modules, 'opacus imported'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(  # printed to 6 digits
        epsilon_for(sigma=2.0, sample_rate=0.5, steps=3, delta=DELTA), rel=1e-5
    )
