"""The fast engine's per-layer plans: FLOP formula where clear, timed in between, cached
per shape and machine so that every process on a machine takes the same ways."""

from __future__ import annotations

import json

import pytest
import torch

from scalemix.engine import GhostEngine, VmapEngine, plans

NAMES = ("ghost", "explicit")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALEMIX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(plans, "_MEMORY", {})
    return tmp_path / "engine-plans.json"


def _counting(names):
    calls = dict.fromkeys(names, 0)

    def make(n):
        def fn():
            calls[n] += 1

        return fn

    return calls, {n: make(n) for n in names}


def test_choice_is_timed_once_then_read_from_the_cache(cache):
    calls, cands = _counting(["ghost", "explicit"])
    dev = torch.device("cpu")
    first = plans.choose("layer A", dev, NAMES, lambda: cands)
    assert first in cands and all(v >= 3 for v in calls.values())  # warm-up + 2 timings
    stored = json.loads(cache.read_text())
    assert list(stored.values()) == [first] and "layer A" in next(iter(stored))
    plans._MEMORY.clear()  # a new process on this machine: no timing, the same choice
    calls2, cands2 = _counting(["ghost", "explicit"])
    assert plans.choose("layer A", dev, NAMES, lambda: cands2) == first
    assert set(calls2.values()) == {0}


def test_a_stored_choice_wins_and_a_broken_cache_is_measured_again(cache):
    dev = torch.device("cpu")
    key = f"{plans.machine_key(dev)} | layer B"
    cache.write_text(json.dumps({key: "explicit"}))
    _, cands = _counting(["ghost", "explicit"])
    assert plans.choose("layer B", dev, NAMES, lambda: cands) == "explicit"
    plans._MEMORY.clear()
    cache.write_text(json.dumps({key: "no such way"}))  # not a way: timed again
    calls, cands = _counting(["ghost", "explicit"])
    assert plans.choose("layer B", dev, NAMES, lambda: cands) in cands and calls["ghost"] > 0
    plans._MEMORY.clear()
    cache.write_text("{not json")
    calls, cands = _counting(["ghost", "explicit"])
    assert plans.choose("layer B", dev, NAMES, lambda: cands) in cands and calls["ghost"] > 0
    assert json.loads(cache.read_text())  # rewritten whole


def test_flop_formula_decides_ghost_or_explicit_and_timing_the_explicit_way(cache, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),  # rows 64, d 27, p 8: explicit by far
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 64, 5),  # one row: ghost
    ).double()
    x, y = torch.randn(6, 1, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    e = GhostEngine(model, clip=0.5)
    fast = e(x, y)
    # ghost is out of the question for the convolution, but its two explicit ways have the
    # same FLOPs: timed, stored; the one-row linear layer is never timed
    stored = json.loads(cache.read_text())
    assert len(stored) == 1 and "conv (8, 3, 3, 3)" in next(iter(stored))
    assert set(stored.values()) <= {"explicit, grouped", "explicit, matmul"}
    assert [str(lay.used) for lay in e.layers] == [next(iter(stored.values())) + ", kept", "ghost"]
    ref = VmapEngine(model, clip=0.5)(x, y)
    for a, b in zip(fast.grads, ref.grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)
    monkeypatch.setenv("SCALEMIX_ENGINE_PLAN", "flops")  # equal FLOPs: the one with no unfold
    plans._MEMORY.clear()
    cache.unlink()
    e2 = GhostEngine(model, clip=0.5)
    e2(x, y)
    assert not cache.exists() and str(e2.layers[0].used) == "explicit, grouped, kept"


def test_planned_layers_in_the_band_are_timed_and_match_the_reference(cache, monkeypatch):
    torch.manual_seed(0)
    # 16 channels at 4 px, K 2: rows 32, d 144, p 16 -> ghost (input Gram by shifts) /
    # explicit FLOPs = 0.57 (in the band)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(16, 16, 3, padding=1, bias=False),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 16, 3),
    ).double()
    x, y = torch.randn(5, 2, 16, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    e = GhostEngine(model, clip=0.3)
    fast = e(x, y)
    stored = json.loads(cache.read_text())  # the linear layer too: K 2 rows, FLOPs 0.67
    assert len(stored) == 2
    for layer in e.layers:
        kind = "conv (16, 16, 3, 3)" if layer.kind == "conv" else "linear (3, 256)"
        (choice,) = [v for key, v in stored.items() if kind in key]
        assert str(layer.used).startswith(choice)
    assert e.memory["largest per-example chunk"] > 0  # the ledger is the step's, not timing's
    ref = VmapEngine(model, clip=0.3)(x, y)
    for a, b in zip(fast.grads, ref.grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)
    monkeypatch.setenv("SCALEMIX_ENGINE_PLAN", "flops")  # the formula alone
    plans._MEMORY.clear()
    cache.unlink()
    e2 = GhostEngine(model, clip=0.3)
    e2(x, y)
    assert not cache.exists() and str(e2.layers[0].used) == "ghost, shifted"  # fewer FLOPs


def test_no_home_to_keep_choices_in_still_chooses(cache, monkeypatch):
    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("SCALEMIX_CACHE_DIR")
    monkeypatch.setattr(plans.Path, "home", classmethod(no_home))
    assert plans.cache_file() is None
    calls, cands = _counting(["ghost", "explicit"])
    first = plans.choose("layer C", torch.device("cpu"), NAMES, lambda: cands)
    assert first in cands and calls["ghost"] > 0 and not cache.exists()
    calls2, cands2 = _counting(["ghost", "explicit"])  # remembered by this process
    assert plans.choose("layer C", torch.device("cpu"), NAMES, lambda: cands2) == first
    assert set(calls2.values()) == {0}
