"""--precision bf16: the forward and backward passes run under bf16 autocast (on the CPU
here), while per-example norms, clip factors, the clipped sum and the noise stay fp32:
the step is close to the fp32 step and every clipped per-example gradient is <= C."""

from __future__ import annotations

import pytest
import torch

from scalemix.engine import make_engine
from scalemix.models import create_model
from scalemix.train import TrainConfig, Trainer


def _setup(clip: float):
    torch.manual_seed(0)
    model = create_model("resnet9_tiny", num_classes=10, in_channels=1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 1, 8, 8, generator=g)  # (B, K, C, H, W)
    y = torch.randint(0, 10, (8,), generator=g)
    return make_engine("scalemix", model, clip), x, y


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def test_bf16_step_is_close_to_fp32_and_stays_fp32():
    engine, x, y = _setup(clip=1.0)
    ref = _flat(engine(x, y).grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = engine(x, y)
    got = _flat(r.grads)
    assert got.dtype == torch.float32 and r.norms.dtype == torch.float32
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.05  # bf16 changes the numbers (it ran), but only by rounding


def test_every_clipped_per_example_gradient_is_within_c_under_bf16():
    clip = 1e-3  # far below every norm: each example is clipped
    engine, x, y = _setup(clip)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(len(y)):  # one example: its clipped sum is its clipped gradient
            r = engine(x[i : i + 1], y[i : i + 1])
            assert float(r.norms[0]) > clip
            # within C exactly (the clip rule's rounding margin, engine.base.clip_factors)
            assert float(_flat(r.grads).double().norm()) <= clip


def test_a_bf16_training_step_runs_and_the_vmap_engine_is_refused(tmp_path):
    cfg = TrainConfig(
        model="resnet9_tiny",
        data="digits",
        image_size=8,
        batch_size=64,
        physical_batch=64,
        epochs=0.1,
        precision="bf16",
        out=str(tmp_path / "run"),
        ema=None,
        diag_every=0,
    )
    row = Trainer(cfg, progress=False, log=lambda *_: None).train_step()
    assert row["batch"] > 0 and row["loss"] > 0
    from scalemix.errors import ConfigError

    with pytest.raises(ConfigError, match="needs --engine scalemix"):
        cfg.replace(engine="vmap").validate()


def test_group_norm_stays_bf16_under_bf16_autocast_with_fp32_master_weights():
    """CUDA's autocast runs GroupNorm in fp32, so every normalised activation between two
    bf16 convolutions would be stored in fp32; the family's GroupNorm casts to bf16 and
    lets torch's kernel accumulate its statistics in fp32 (models/layers.py)."""
    from scalemix.models.layers import GroupNorm, make_norm

    norm = make_norm("group", 8, groups=2)
    assert isinstance(norm, GroupNorm) and isinstance(norm, torch.nn.GroupNorm)
    x = 3 * torch.randn(4, 8, 5, 5) + 1  # an fp32 input, as autocast's fp32 policy would give
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
        plain = torch.nn.GroupNorm(2, 8)(x)
    assert out.dtype == torch.bfloat16 and plain.dtype == torch.float32
    assert torch.allclose(out.float(), plain, atol=0.05)  # bf16 rounding, fp32 statistics
    out.float().square().sum().backward()
    assert norm.weight.dtype == norm.weight.grad.dtype == torch.float32  # fp32 master weights
    assert norm(x).dtype == torch.float32  # outside autocast: nn.GroupNorm


def test_resnet9_activations_between_layers_are_bf16():
    """Under --precision bf16 every tensor the forward pass saves for the backward pass,
    but the input image's, is bf16 (half the activation memory of fp32)."""
    model = create_model("resnet9_tiny", num_classes=10, in_channels=3)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 3, 8, 8)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    params = {p.data_ptr() for p in model.parameters()}
    fp32 = [
        t for t in saved
        if t.dtype == torch.float32 and t.numel() > 64 and t.data_ptr() not in params
        and t.data_ptr() != x.data_ptr()
    ]  # fmt: skip
    assert not fp32, [tuple(t.shape) for t in fp32]
