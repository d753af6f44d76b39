"""The fast engine ('scalemix', book-keeping with ghost norms) gives the same clipped,
noised update as the torch.func reference engine, for every model variant and K."""

from __future__ import annotations

import pytest
import torch

from scalemix.engine import GhostEngine, VmapEngine
from scalemix.engine.base import clip_margin
from scalemix.models import create_model, has_public_bn, refresh_public_stats
from scalemix.privacy import NoiseSource, SecretStream
from scalemix.privacy.mechanism import noisy_mean
from tests.test_per_example_grads import CASES, _ids


@pytest.mark.parametrize(("variant", "k"), CASES, ids=[f"{_ids(v)}-K{k}" for v, k in CASES])
def test_fast_engine_matches_reference(variant, k):
    name, axes = variant
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **axes).double()
    res = 32 if name in ("resnet18", "resnet50") else 16
    x = torch.randn(4, k, 3, res, res, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    if has_public_bn(model):
        refresh_public_stats(model, torch.randn(16, 3, res, res, dtype=torch.float64))
    ref = VmapEngine(model, clip=None)(x, y)
    clip = float(ref.norms.median())  # some examples clipped, some not
    ref = VmapEngine(model, clip=clip)(x, y)
    fast = GhostEngine(model, clip=clip)(x, y)
    assert torch.allclose(fast.norms, ref.norms, rtol=1e-10)
    assert torch.allclose(fast.layer_norms_sq, ref.layer_norms_sq, rtol=1e-9, atol=1e-20)
    updates = []
    for r in (ref, fast):
        noise = NoiseSource(SecretStream(bytes(32), "noise"))  # the same draw for both
        grads = [g.clone() for g in r.grads]
        updates.append(noisy_mean(grads, sigma=0.7, clip=clip, expected_batch_size=4, noise=noise))
    for a, b in zip(*updates):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-14)
    assert float(fast.loss_sum) == pytest.approx(float(ref.loss_sum), rel=1e-12)


@pytest.mark.parametrize(
    "model",
    [
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.PReLU()),
        torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),  # not zero padding
        torch.nn.Conv2d(3, 4, 3, padding="same"),
        torch.nn.Conv2d(4, 4, 3, groups=2),
    ],
)
def test_fast_engine_refuses_what_it_cannot_do(model):
    with pytest.raises(Exception, match="vmap"):
        GhostEngine(model, clip=1.0)


def test_fast_engine_empty_and_single_batches():
    torch.manual_seed(0)
    model = create_model("resnet9", num_classes=4, groups=8)
    e = GhostEngine(model, clip=0.1)
    empty = e(torch.zeros(0, 1, 3, 16, 16), torch.zeros(0, dtype=torch.long))
    assert empty.n == 0 and all(float(g.abs().sum()) == 0 for g in empty.grads)
    one = e(torch.randn(1, 1, 3, 16, 16), torch.tensor([2]))
    norm = torch.sqrt(sum(g.double().pow(2).sum() for g in one.grads))
    # clipped to C (1 - m): the rounding margin of base.clip_factors, never above C
    assert float(one.norms[0]) > 0.1 and float(norm) <= 0.1
    assert float(norm) == pytest.approx(0.1 * (1 - clip_margin(torch.float32)), rel=1e-5)


@pytest.mark.parametrize("chunk_floats", [1, 2**23])
def test_fast_engine_chunking_and_biases(monkeypatch, chunk_floats):
    """Chunked norms (one example at a time) and conv/linear biases match the reference."""
    import scalemix.engine.ghost as ghost

    monkeypatch.setattr(ghost, "CHUNK_FLOATS", chunk_floats)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=True),
        torch.nn.GroupNorm(4, 8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 5),
    ).double()
    x = torch.randn(5, 2, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (5,))
    ref = VmapEngine(model, clip=0.05)(x, y)
    fast = GhostEngine(model, clip=0.05)(x, y)
    assert torch.allclose(fast.norms, ref.norms, rtol=1e-10)
    for a, b in zip(ref.grads, fast.grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-14)


class _EveryLayer(torch.nn.Module):
    """One of every layer type the fast engine accepts, biases on and off, WS both modes."""

    def __init__(self):
        super().__init__()
        from scalemix.models.layers import PublicBatchNorm, WSConv2d

        nn = torch.nn
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=True),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            WSConv2d(4, 4, 3, padding=1, bias=True, mode="scaled"),
            PublicBatchNorm(4),
            nn.ReLU(),
            WSConv2d(4, 6, 3, padding=1, bias=False, mode="scaled"),
            nn.GroupNorm(3, 6),
            WSConv2d(6, 6, 3, padding=1, bias=True, mode="plain"),
            nn.Conv2d(6, 6, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(24, 8, bias=True),
            nn.ReLU(),
            nn.Linear(8, 5, bias=False),
        )

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize(
    "mode",
    [
        "auto",
        "ghost",
        "explicit",
        "explicit-keep/grouped",
        "explicit-keep/matmul",
        "explicit-recompute/grouped",
        "explicit-recompute/matmul",
    ],
)
@pytest.mark.parametrize("k", [1, 2])
def test_every_parameter_tensor_matches_reference(mode, k):
    """Per tensor, not only the norm: each parameter's clipped sum equals the reference's
    (a swapped gain/bias pair keeps every norm right and fails here)."""
    torch.manual_seed(1)
    model = _EveryLayer().double()
    with torch.no_grad():  # gains and biases away from their initial 1 / 0, so a swap shows
        for name, p in model.named_parameters():
            if not name.endswith("weight") or p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    refresh_public_stats(model, torch.randn(16, 3, 8, 8, dtype=torch.float64))
    x = torch.randn(5, k, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (5,))
    clip = float(VmapEngine(model, clip=None)(x, y).norms.median())
    ref = VmapEngine(model, clip=clip)(x, y)
    engine = GhostEngine(model, clip=clip)
    mode, _, impl = mode.partition("/")
    if mode != "auto":
        for layer in engine.layers:
            if layer.kind in ("conv", "wsconv", "linear"):
                layer.mode, layer.per_example = mode, impl or None
    fast = engine(x, y)
    if impl:  # the forced way was taken (linear layers have only the batched product)
        keep = ", kept" if mode == "explicit-keep" else ""
        for lay in engine.layers:
            if lay.kind in ("conv", "wsconv", "linear"):
                way = "matmul" if lay.kind == "linear" else impl
                assert lay.used == f"explicit, {way}{keep}", (lay.used, lay.kind)
    names = [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, fast.grads, ref.grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13), name
    assert torch.allclose(fast.layer_norms_sq, ref.layer_norms_sq, rtol=1e-9, atol=1e-20)


# convolution geometries for the per-layer ways: strides, dilations, rectangular
# kernels, K views
CONV_GEOMETRIES = pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "padding", "dilation", "hw", "k"),
    [
        (3, 4, 3, 1, 1, 1, (8, 8), 1),
        (3, 4, 3, 2, 1, 1, (9, 7), 2),
        (2, 3, (3, 1), (2, 1), (1, 0), 1, (6, 5), 1),
        (2, 3, 3, 1, 2, 2, (7, 7), 3),
        (4, 5, 1, 2, 0, 1, (8, 8), 1),
        (2, 2, 5, 3, 2, 1, (11, 10), 2),
        (2, 3, 3, 5, 2, 1, (3, 3), 2),  # two of the three taps read only padding
    ],
)


@CONV_GEOMETRIES
def test_shifted_gram_equals_the_unfolded_gram(cin, cout, kernel, stride, padding, dilation, hw, k):
    """The ghost norm's input Gram matrix from the input positions' Gram, each tap's block
    added where it reads inside the input, equals the one from the unfold."""
    import torch.nn.functional as F

    from scalemix.engine.ghost import _Layer

    torch.manual_seed(0)
    m = torch.nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False).double()
    nb = 3
    x = torch.randn(nb * k, cin, *hw, dtype=torch.float64)
    out_hw = m(x).shape[2:]
    got = GhostEngine._shifted_gram(_Layer(m, "conv", [0]), x, nb, k, out_hw)
    cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)
    d, t = cols.shape[1:]
    a2 = cols.view(nb, k, d, t).permute(0, 1, 3, 2).reshape(nb, k * t, d)
    assert torch.allclose(got, torch.bmm(a2, a2.transpose(1, 2)), rtol=1e-12, atol=1e-12)


@CONV_GEOMETRIES
def test_grouped_per_example_gradient_equals_one_example_at_a_time(
    cin, cout, kernel, stride, padding, dilation, hw, k
):
    """The explicit per-example gradient as one grouped weight gradient equals torch's
    weight gradient of each example alone (its K views summed)."""
    from scalemix.engine.ghost import _Layer

    torch.manual_seed(0)
    m = torch.nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False).double()
    nb = 3
    a = torch.randn(nb * k, cin, *hw, dtype=torch.float64)
    g = torch.randn_like(m(a))
    got = GhostEngine._grouped_per_example(_Layer(m, "conv", [0]), a, g, nb, k)
    for i in range(nb):
        rows = slice(i * k, (i + 1) * k)
        want = torch.nn.grad.conv2d_weight(
            a[rows], m.weight.shape, g[rows], m.stride, m.padding, m.dilation
        )
        assert torch.allclose(got[i], want, rtol=1e-10, atol=1e-12)
