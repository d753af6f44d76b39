"""The fast engine ('scalemix', book-keeping with ghost norms) gives the same clipped,
noised update as the torch.func reference engine, for every model variant and K."""

from __future__ import annotations

import pytest
import torch

from scalemix.engine import GhostEngine, VmapEngine
from scalemix.engine.base import clip_margin
from scalemix.engine.ways import EXPLICIT, GHOST, GROUPED, MATMUL, Way
from scalemix.models import create_model, has_public_bn, refresh_public_stats
from scalemix.privacy import NoiseSource, SecretStream
from scalemix.privacy.mechanism import noisy_mean
from tests.test_per_example_grads import CASES, _ids


@pytest.mark.slow
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
    "force",
    [
        None,  # planned
        Way(GHOST),
        Way(EXPLICIT),  # the kind's product, kept within KEEP_RATIO
        Way(EXPLICIT, GROUPED, kept=True),
        Way(EXPLICIT, MATMUL, kept=True),
        Way(EXPLICIT, GROUPED, kept=False),
        Way(EXPLICIT, MATMUL, kept=False),
    ],
    ids=str,
)
@pytest.mark.parametrize("k", [1, 2])
def test_every_parameter_tensor_matches_reference(force, k):
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
    if force is not None:
        for layer in engine.layers:
            if layer.kind in ("conv", "wsconv", "linear"):
                layer.force = force
    fast = engine(x, y)
    if force is not None and force.product:  # the forced way was taken (linear layers
        keep = ", kept" if force.kept else ""  # have only the batched product)
        for lay in engine.layers:
            if lay.kind in ("conv", "wsconv", "linear"):
                way = "matmul" if lay.kind == "linear" else force.product
                assert str(lay.used) == f"explicit, {way}{keep}", (lay.used, lay.kind)
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

    from scalemix.engine.rules import ConvRule

    torch.manual_seed(0)
    m = torch.nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False).double()
    nb = 3
    x = torch.randn(k * nb, cin, *hw, dtype=torch.float64)  # view-major: row v * nb + i
    out_hw = m(x).shape[2:]
    got = ConvRule.shifted_gram(m, x.view(k, nb, cin, *hw), out_hw)
    cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)
    d, t = cols.shape[1:]
    a2 = cols.view(k, nb, d, t).permute(1, 0, 3, 2).reshape(nb, k * t, d)
    assert torch.allclose(got, torch.bmm(a2, a2.transpose(1, 2)), rtol=1e-12, atol=1e-12)


@CONV_GEOMETRIES
def test_explicit_per_example_gradients_equal_one_example_at_a_time(
    cin, cout, kernel, stride, padding, dilation, hw, k
):
    """The explicit per-example gradients, as one grouped weight gradient or by the unfold
    and a batched product, equal torch's weight gradient of each example alone (its K
    views summed)."""
    from scalemix.engine.rules import ConvRule

    torch.manual_seed(0)
    m = torch.nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False).double()
    nb = 3
    a = torch.randn(k, nb, cin, *hw, dtype=torch.float64)  # (views, examples, ...)
    out = m(a.flatten(0, 1))
    g = torch.randn_like(out).view(k, nb, *out.shape[1:])
    for product in (GROUPED, MATMUL):
        got = ConvRule().per_example(m, a, g, product)
        for i in range(nb):
            want = torch.nn.grad.conv2d_weight(
                a[:, i], m.weight.shape, g[:, i], m.stride, m.padding, m.dilation
            )
            assert torch.allclose(got[i], want, rtol=1e-10, atol=1e-12), product


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k,groups,channels_last", [(1, 2, False), (3, 4, False), (2, 1, True)])
def test_group_norm_per_example_gradients_equal_one_example_at_a_time(
    dtype, k, groups, channels_last
):
    """GroupNorm's gamma and beta per example, from torch's fused GroupNorm backward over
    rows folded into channels, equal torch's gradient of each example alone (K views)."""
    from scalemix.engine.rules import AffineNormRule

    torch.manual_seed(0)
    m = torch.nn.GroupNorm(groups, 4).to(dtype)
    with torch.no_grad():
        m.weight.add_(torch.randn(4, dtype=dtype))
        m.bias.add_(torch.randn(4, dtype=dtype))
    nb = 3
    a = 3 * torch.randn(k * nb, 4, 5, 5, dtype=dtype) + 1  # view-major: row v * nb + i
    g = torch.randn(k * nb, 4, 5, 5, dtype=dtype)
    if channels_last:
        a, g = (t.to(memory_format=torch.channels_last) for t in (a, g))
    gamma, beta = AffineNormRule().per_example(m, a, g, k)
    # the reference in torch's default layout (its CPU GroupNorm backward crashes on
    # channels_last float64 input, torch 2.13)
    a, g = a.contiguous(), g.contiguous()
    for i in range(nb):
        rows = [v * nb + i for v in range(k)]
        m.zero_grad()
        (m(a[rows]) * g[rows]).sum().backward()
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        assert torch.allclose(gamma[i], m.weight.grad, **tol)
        assert torch.allclose(beta[i], m.bias.grad, **tol)


# ---------------------------------------------------------------------- batched for any K

K16_FORCES = [
    None,  # planned
    Way(GHOST),
    Way(EXPLICIT, GROUPED, kept=True),
    Way(EXPLICIT, MATMUL, kept=True),
    Way(EXPLICIT, GROUPED, kept=False),
    Way(EXPLICIT, MATMUL, kept=False),
]


def _every_layer_case(k: int, b: int = 5):
    """_EveryLayer in float64 with gains and biases moved off 1 / 0, a batch of ``b``
    examples with ``k`` views, and the slow reference: each example's gradient, one example
    at a time with torch.autograd (tests/test_per_example_grads.reference_grads)."""
    from tests.test_per_example_grads import reference_grads

    torch.manual_seed(2)
    model = _EveryLayer().double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("weight") or p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    refresh_public_stats(model, torch.randn(16, 3, 6, 6, dtype=torch.float64))
    x = torch.randn(b, k, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (b,))
    return model, x, y, reference_grads(model, x, y)


@pytest.mark.parametrize("split", [False, True], ids=["one-chunk", "chunks-of-2"])
@pytest.mark.parametrize("force", K16_FORCES, ids=str)
def test_k16_batched_path_matches_one_example_at_a_time(monkeypatch, force, split):
    """K = 16 views: every parameter's clipped sum and every per-parameter squared norm
    equal the one-example-at-a-time reference, clipped by min(1, C (1 - m) / ||g_i||),
    for every way. ``chunks-of-2``: the chunk bound holds two examples for every layer and
    way (kept ones too), so 5 examples split 2 + 2 + 1 and every chunk boundary falls
    between two examples' K views."""
    import scalemix.engine.ghost as ghost

    if split:
        monkeypatch.setattr(ghost, "CHUNK_FLOATS", 2)
        monkeypatch.setattr(ghost.GhostEngine, "_working", staticmethod(lambda *_: 1))
    model, x, y, ref = _every_layer_case(k=16)
    norms = torch.sqrt(sum(r.flatten(1).pow(2).sum(1) for r in ref))
    clip = float(norms.median())  # some examples clipped, some not
    factors = torch.clamp(clip * (1 - clip_margin(torch.float64)) / norms, max=1.0)
    engine = GhostEngine(model, clip=clip)
    if force is not None:
        for layer in engine.layers:
            if layer.rule.matmul:
                layer.force = force
    fast = engine(x, y)
    assert torch.allclose(fast.norms, norms, rtol=1e-10)
    want_sq = torch.stack([r.flatten(1).pow(2).sum(1) for r in ref])
    assert torch.allclose(fast.layer_norms_sq, want_sq, rtol=1e-9, atol=1e-20)
    names = [n for n, _ in model.named_parameters()]
    for name, got, r in zip(names, fast.grads, ref):
        want = torch.einsum("b,b...->...", factors, r)
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-13), name
    assert 0 < int((norms > clip).sum()) < 5


def test_k16_kept_layers_take_every_example_in_one_call(monkeypatch):
    """No per-example loop on the hot path: at K = 16 with the CPU's chunk bound, each
    kept layer makes its per-example gradients in one call, and every layer's way is
    recorded as a value whose text is the old string."""
    from scalemix.engine.rules import ConvRule

    calls: dict[int, int] = {}
    real = ConvRule.per_example

    def counting(self, m, a_c, g_c, product):
        calls[id(m)] = calls.get(id(m), 0) + 1
        return real(self, m, a_c, g_c, product)

    monkeypatch.setattr(ConvRule, "per_example", counting)  # WS convolutions' too
    model, x, y, _ = _every_layer_case(k=16, b=8)
    engine = GhostEngine(model, clip=1.0)
    for layer in engine.layers:
        if layer.rule.matmul:
            layer.force = Way(EXPLICIT, kept=True)
    engine(x, y)
    for layer in engine.layers:
        if layer.rule.matmul:
            assert str(layer.used) in ("explicit, grouped, kept", "explicit, matmul, kept")
            if layer.used.product == GROUPED:
                assert calls[id(layer.module)] == 1, (layer.kind, calls[id(layer.module)])


def test_way_text_and_values():
    """Ways print as the strings they replaced (the plan cache keeps them), and a way that
    cannot exist is refused when it is made."""
    assert str(Way(GHOST)) == "ghost"
    assert str(Way(GHOST, shifted=True)) == "ghost, shifted"
    assert str(Way(EXPLICIT, GROUPED, kept=False)) == "explicit, grouped"
    assert str(Way(EXPLICIT, MATMUL, kept=True)) == "explicit, matmul, kept"
    assert Way(GHOST) == Way(GHOST, kept=False) and Way(GHOST).gram and not Way(GHOST).kept
    for bad in (
        dict(method="unfold"),
        dict(method=GHOST, product=GROUPED),
        dict(method=GHOST, kept=True),
        dict(method=EXPLICIT, shifted=True),
        dict(method=EXPLICIT, product="im2col"),
    ):
        with pytest.raises(ValueError):
            Way(**bad)


def test_rules_registry_looks_up_the_class_and_refuses_duplicates():
    from scalemix.engine.rules import (
        AffineNormRule,
        ConvRule,
        PublicBatchNormRule,
        WSConvRule,
        register,
        rule_for,
    )
    from scalemix.errors import ConfigError
    from scalemix.models.layers import PublicBatchNorm, WSConv2d

    class MyConv(torch.nn.Conv2d):
        pass

    assert type(rule_for(WSConv2d(3, 4, 3))) is WSConvRule  # before nn.Conv2d's rule
    assert type(rule_for(MyConv(3, 4, 3))) is ConvRule
    assert type(rule_for(PublicBatchNorm(4))) is PublicBatchNormRule
    assert type(rule_for(torch.nn.GroupNorm(2, 4))) is AffineNormRule
    with pytest.raises(ConfigError, match="vmap"):
        rule_for(torch.nn.BatchNorm2d(4))  # couples the examples: no rule
    with pytest.raises(ValueError, match="registered already"):
        register(torch.nn.Linear)(ConvRule)


def test_chunk_bound_is_the_cache_on_the_cpu_and_a_share_of_free_memory_on_cuda(monkeypatch):
    """The guarded CUDA branch only chooses a size: a quarter of the memory free to the
    process (driver free + the allocator's unused reserve), never below the CPU bound."""
    import scalemix.engine.ghost as ghost

    assert ghost.chunk_floats(torch.device("cpu")) == ghost.CHUNK_FLOATS
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * gib)
    cuda = torch.device("cuda", 0)
    assert ghost.chunk_floats(cuda, 4) == int(ghost.CUDA_FREE_SHARE * 10 * gib) // 4
    assert ghost.chunk_floats(cuda, 8) == int(ghost.CUDA_FREE_SHARE * 10 * gib) // 8
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    assert ghost.chunk_floats(cuda, 4) == ghost.CHUNK_FLOATS


def test_dp_step_benchmark_measures_k_views_against_non_private_at_the_same_k():
    """`scalemix bench dp-step --aug-mult K`: the DP engines take (B, K, ...) batches, the
    non-private baseline the mean over the same B*K views; Opacus (no views) is refused."""
    from scalemix.bench.dp_step import run_bench
    from scalemix.errors import ConfigError

    res = run_bench(
        ["nonprivate", "scalemix"],
        "resnet9_tiny",
        2,
        repeats=1,
        warmup=0,
        memory=False,
        aug_mult=3,
    )
    assert res["aug_mult"] == 3 and res["engines"]["scalemix"]["ratio"] > 0
    assert res["scalemix_plan"] and all(": " in line for line in res["scalemix_plan"])
    with pytest.raises(ConfigError, match="Opacus"):
        run_bench(["opacus"], "resnet9_tiny", 2, repeats=1, warmup=0, memory=False, aug_mult=2)
