"""GPU-ready by construction, checked on the CPU: a training step synchronises with the
host once, whatever the number of physical chunks (the floating-point guard's question
joins the step's read), no per-layer sync; every tensor the step makes lives on the run's device. The ``gpu`` tests (skipped
without CUDA) compare the CUDA step with the CPU step for the reference ResNet-9."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import scalemix
from scalemix.bench.gpu import SYNCING  # the Tensor methods that read a value to the host
from scalemix.engine import ghost
from scalemix.train import Trainer, loop


def _count_syncs(monkeypatch) -> dict:
    """Wrap every Tensor method that moves a value to the host; count the calls made by
    scalemix's own code (torch's optimisers read their step counters, CPU tensors even
    on a GPU, with .item(): no device synchronisation)."""
    counts = {"n": 0}
    package = str(Path(scalemix.__file__).parent)
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, _original=original, **k):
            if sys._getframe(1).f_code.co_filename.startswith(package):
                counts["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    # a tensor made from host values on the device is a host-to-device copy: on a GPU a
    # synchronisation too (the normalisation constants were one per chunk)
    make = torch.tensor

    def tensor(*a, _make=make, **k):
        if k.get("device") is not None and sys._getframe(1).f_code.co_filename.startswith(package):
            counts["n"] += 1
        return _make(*a, **k)

    monkeypatch.setattr(torch, "tensor", tensor)
    return counts


def _syncs_per_step(tiny_cfg, tmp_path, physical: int, monkeypatch) -> tuple[int, int]:
    """Host reads of one step, and the step's number of physical chunks."""
    cfg = tiny_cfg.replace(
        physical_batch=physical, diag_every=0, ema=None, out=str(tmp_path / f"p{physical}")
    )
    tr = Trainer(cfg, progress=False, log=lambda *_: None)
    tr.train_step()  # warm-up (first-call work)
    with monkeypatch.context() as m:
        counts = _count_syncs(m)
        row = tr.train_step()
    return counts["n"], -(-row["batch"] // physical)


def test_one_host_sync_per_step_whatever_the_number_of_chunks(tiny_cfg, tmp_path, monkeypatch):
    """One host read per step, for one physical chunk or eight: the finiteness vote, the
    fast engine's floating-point guard (docs/sharp-edges.md, item 17; deferred to the
    step's read, Engine.defer_guard) and the logged row (loss, accuracy, median norm,
    clip fraction) come back together. No per-layer or per-chunk sync."""
    one, chunks_one = _syncs_per_step(tiny_cfg, tmp_path, 256, monkeypatch)
    many, chunks_many = _syncs_per_step(tiny_cfg, tmp_path, 8, monkeypatch)  # ~8 chunks of 8
    assert chunks_one == 1 and chunks_many >= 6
    assert one == many == 1


def test_without_deferral_the_guard_reads_once_per_chunk(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "DEFER_GUARD", False)
    many, chunks_many = _syncs_per_step(tiny_cfg, tmp_path, 8, monkeypatch)
    assert chunks_many >= 6 and many == 1 + chunks_many


def _run(cfg, out):
    tr = Trainer(cfg.replace(out=str(out)), progress=False, log=lambda *_: None)
    tr.run()
    return tr


def test_a_step_the_deferred_guard_flags_is_computed_again_synchronously(
    tiny_cfg, tmp_path, monkeypatch
):
    """Every example made a suspect: the deferred guard flags every step, which is
    computed again with the guard synchronous (every example rescued explicitly), and
    the run ends bit for bit where the run with the guard synchronous throughout ends."""
    cfg = tiny_cfg.replace(epochs=0.1, diag_every=1, physical_batch=16)
    real = ghost._suspects
    monkeypatch.setattr(ghost, "_suspects", lambda sq, *a, **k: torch.ones_like(real(sq, *a, **k)))
    monkeypatch.setattr(loop, "DEFER_GUARD", False)
    sync = _run(cfg, tmp_path / "sync")
    assert sync.guard_redone == 0
    monkeypatch.setattr(loop, "DEFER_GUARD", True)
    deferred = Trainer(  # the same seeded run, its noise reproduced
        cfg.replace(out=str(tmp_path / "deferred")),
        progress=False,
        log=lambda *_: None,
        noise_nonce=sync.rng.noise_nonce,
    )
    deferred.run()
    assert deferred.guard_redone == deferred.step >= 2
    assert any(layer.guarded for layer in deferred.engine.layers)  # the redo rescued them
    for (n, x), (_, y) in zip(sync.model.state_dict().items(), deferred.model.state_dict().items()):
        assert torch.equal(x, y), n
    read = {
        name: [pd.read_csv(tmp_path / run / name) for run in ("sync", "deferred")]
        for name in ("metrics.csv", "diagnostics.csv")
    }
    assert list(read["metrics.csv"][0]["step"]) == list(read["metrics.csv"][1]["step"])
    assert read["metrics.csv"][0]["loss"].tolist() == read["metrics.csv"][1]["loss"].tolist()
    pd.testing.assert_frame_equal(*read["diagnostics.csv"])  # each step logged once


def test_an_ordinary_run_is_never_computed_twice(tiny_cfg, tmp_path):
    tr = _run(tiny_cfg.replace(epochs=0.1), tmp_path / "run")
    assert tr.step >= 2 and tr.guard_redone == 0


def test_the_step_makes_its_tensors_on_the_run_device(tiny_cfg):
    tr = Trainer(
        tiny_cfg.replace(diag_every=0, aug="crop", aug_mult=2), progress=False, log=lambda *_: None
    )
    tr.train_step()
    for p in tr.engine.params:
        assert p.device == tr.device and p.grad.device == tr.device
    idx = torch.arange(5)
    ((x, y),) = list(tr._chunks(idx.to(tr.device), idx))
    assert x.device == tr.device and y.device == tr.device  # augmented views on the device


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_cuda_step_matches_the_cpu_step_for_the_reference_resnet9():
    from scalemix.engine import make_engine
    from scalemix.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet9").double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (16,), generator=g)
    cpu = make_engine("scalemix", model, 1.0)(x, y)
    gpu_model = create_model("resnet9").double().cuda()
    gpu_model.load_state_dict(model.state_dict())
    gpu = make_engine("scalemix", gpu_model, 1.0)(x.cuda(), y.cuda())
    for a, b in zip(cpu.grads, gpu.grads):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gpu.norms.cpu(), cpu.norms, rtol=1e-7, atol=1e-9)
