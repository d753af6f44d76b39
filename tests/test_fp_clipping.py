"""The bound C in floating point, for any input (docs/sharp-edges.md row 17).

A Gram (ghost) norm sums products that cancel when an example's per-position gradient
terms g_t a_t^T nearly cancel: in fp32 it came out too small, negative or NaN, and the
fast engine released such an example with a norm of many times C, or stopped the run
as diverged. The crafted input: Linear(512 -> 512) applied at 16 near-constant positions,
its outputs summed with alternating signs. Every check here is against an obviously
correct reference: one example at a time with torch.autograd, in float64 (the fp32
model's and inputs' exact values), scaled by the engine's own clip factor; or against
what the engine releases for one example alone (its clipped sum is that example's
clipped gradient), measured in float64 -- which must be <= C, with no tolerance.

Also: the clip rule's rounding margin, and TF32 off around the DP products
(engine.base.full_fp32_products), on the CPU and, with a CUDA device, on the device.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scalemix.engine import GhostEngine, clip_factors, make_engine
from scalemix.engine.ways import EXPLICIT, GHOST, Way

D, T = 512, 16  # the crafted layer: Linear(D -> D) at T positions


class _Cancelling(nn.Module):
    """Linear(D -> D) at T positions, outputs summed with signs ``out_signs`` (alternating
    by default) into D logits; ``in_signs`` flips the positions' inputs first. With
    near-constant positions an example's weight gradient sum_t s_t g a_t^T nearly cancels
    (or, with flipped inputs, sum_t g (s_t a)^T), and its Gram norm with it."""

    def __init__(self, bias: bool = True, in_signs=None, out_signs=None):
        super().__init__()
        self.lin = nn.Linear(D, D, bias=bias)
        alternating = torch.tensor([(-1.0) ** t for t in range(T)])
        ones = torch.ones(T)
        self.register_buffer("in_signs", ones if in_signs is None else in_signs)
        self.register_buffer("out_signs", alternating if out_signs is None else out_signs)

    def forward(self, x):  # (N, T, D) -> (N, D)
        return torch.einsum("ntp,t->np", self.lin(x * self.in_signs[:, None]), self.out_signs)


class _CancellingConv(nn.Module):
    """Conv2d(32 -> 32, 3x3) on a 4x4 image, output positions summed with a checkerboard
    of signs: the same cancellation through the input Gram by shifts."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        board = torch.tensor([[(-1.0) ** (i + j) for j in range(4)] for i in range(4)])
        self.register_buffer("board", board)

    def forward(self, x):  # (N, 32, 4, 4) -> (N, 32)
        return (self.conv(x) * self.board).sum((2, 3))


def _model(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return _Cancelling(**kw)


def _inputs(b: int, delta: float, scale: float, seed: int):
    """(b, 1, T, D): every position of an example near one vector (relative spread
    ``delta``), times ``scale``; labels."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 1, 1, D, generator=g)
    x = scale * (base + delta * torch.randn(b, 1, T, D, generator=g))
    return x, torch.randint(0, D, (b,), generator=g)


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, P) float64: each example's gradient, one example at a time with torch.autograd on
    the fp32 model (the per-example gradient the model has in its own precision; a float64
    forward pass would be a different computation, whose logits differ by the fp32
    rounding of outputs that cancel)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i]), y[i].expand(x.shape[1]))
        out.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]))
    return torch.stack(out).double()


def _clip_below_every_norm(model, x, y) -> float:
    """A tenth of the smallest non-zero reference norm: every example is clipped."""
    norms = _reference(model, x, y).norm(dim=1)
    return float(norms[norms > 0].min()) / 10


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads]).double()


def _released_one(engine, x, y, i) -> float:
    """The norm of what the engine releases for example i alone (its clipped sum)."""
    r = engine(x[i : i + 1], y[i : i + 1])
    assert torch.isfinite(r.norms).all()
    return float(_flat(r.grads).norm())


# ---------------------------------------------------------------------- the crafted input


@pytest.mark.parametrize("engine_name", ["scalemix", "vmap"])
@pytest.mark.parametrize(
    ("delta", "scale"),
    [(1e-2, 1.0), (1e-3, 1.0), (1e-2, 1e3), (1e-3, 1e3)],
    ids=["1e-2", "1e-3", "1e-2-scaled-up", "1e-3-scaled-up"],
)
def test_crafted_cancellation_is_clipped_within_c(engine_name, delta, scale):
    """Every example clipped (C a tenth of the smallest reference norm): each clipped
    gradient c_i g_i (g_i from the one-at-a-time reference, c_i the engine's) has norm
    <= C, no norm is NaN or negative, and the engine's clipped sum is the reference's
    sum_i c_i g_i. Scaled up: the activations, so the layer's outputs, x 1000. Before the
    guard the fast engine gave max ||c_i g_i|| / C = 1.0035 and 1.27 (delta 1e-2 and
    1e-3), and NaN or negative norms scaled up; the reference engine, with no rounding
    margin, 1.0000x."""
    model = _model()
    x, y = _inputs(16, delta, scale, seed=1)
    ref = _reference(model, x, y)
    clip = _clip_below_every_norm(model, x, y)
    r = make_engine(engine_name, model, clip)(x, y)
    assert torch.isfinite(r.norms).all() and (r.norms > 0).all(), r.norms
    c = clip_factors(r.norms, clip).double()
    ratio = c * ref.norm(dim=1) / clip
    assert float(ratio.max()) <= 1.0, f"max ||c_i g_i|| / C = {float(ratio.max()):.6g}"
    want = (c[:, None] * ref).sum(0)
    # two fp32 computations of a gradient whose terms cancel to delta: ~ u / delta apart
    assert float((_flat(r.grads) - want).norm()) <= 1e-3 * clip


@pytest.mark.parametrize("delta", [1e-2, 1e-3, 1e-4, 1e-5])
@pytest.mark.parametrize("scale", [1.0, 1e3, 1e17], ids=["1", "1e3", "1e17"])
def test_what_one_example_releases_is_within_c(delta, scale):
    """The fast engine on one crafted example at a time: the clipped sum it releases has
    norm <= C exactly (measured in float64), and its norm is finite. At 1e17 the scale
    S_i overflows fp32 (the example is recomputed). Before the guard: up to 1.0016 C,
    3.98 C (delta 1e-3), NaN norms (delta 1e-4, 1e-5)."""
    model = _model()
    x, y = _inputs(8, delta, scale, seed=2)
    clip = _clip_below_every_norm(model, x, y)
    engine = GhostEngine(model, clip)
    worst = max(_released_one(engine, x, y, i) for i in range(len(y)))
    assert worst <= clip, f"released {worst / clip:.6g} C"


def test_cancelling_examples_are_recomputed_and_the_others_are_not():
    """The guard marks the crafted examples of a batch, and only those: ordinary
    examples (random positions) keep their Gram norms."""
    model = _model()
    x, y = _inputs(8, 1e-3, 1.0, seed=3)
    x[4:] = torch.randn(4, 1, T, D)  # ordinary examples
    engine = GhostEngine(model, clip=1e-3)
    r = engine(x, y)
    assert str(engine.layers[0].used) == "ghost" and engine.layers[0].guarded == 4
    assert torch.allclose(r.norms.double(), _reference(model, x, y).norm(dim=1), rtol=1e-3)


def test_ordinary_resnet9_batch_guards_nothing(monkeypatch):
    """On ordinary data (smooth random images) of ResNet-9's shapes no example is
    recomputed, with ghost norms on every layer the FLOP formula gives them (the 16, 8 and
    4 px convolutions): the guard costs its scale only. Their S_i / ||g_i||^2 came to at
    most 1.3 T, against ``ghost.ghost_ratio_limit`` 311-431."""
    from scalemix.models import create_model

    monkeypatch.setenv("SCALEMIX_ENGINE_PLAN", "flops")
    torch.manual_seed(0)
    model = create_model("resnet9", num_classes=10)
    x = F.avg_pool2d(torch.randn(8, 3, 36, 36), 5, 1).view(8, 1, 3, 32, 32) * 3
    engine = GhostEngine(model, clip=1.0)
    r = engine(x, torch.randint(0, 10, (8,)))
    assert torch.isfinite(r.norms).all()
    ghost = [lay for lay in engine.layers if lay.kind == "conv" and lay.used.gram]
    assert len(ghost) == 6
    assert [layer.guarded for layer in engine.layers] == [0] * len(engine.layers)


# ---------------------------------------------------------------------- randomised


def _adversarial(trial: int):
    """One random adversarial case: a model, its inputs, and the way forced on the layer."""
    g = torch.Generator().manual_seed(1000 + trial)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    delta = 10 ** float(torch.empty(1).uniform_(-6, -1, generator=g))
    scale = 10 ** float(torch.empty(1).uniform_(-1, 18, generator=g))
    kind = pick(["out-alternating", "in-alternating", "random-signs", "conv"])
    if kind == "conv":  # near-constant over the positions, not over the channels
        torch.manual_seed(trial)
        model = _CancellingConv()
        base = torch.randn(6, 1, 32, 1, 1, generator=g)
        x = scale * (base + delta * torch.randn(6, 1, 32, 4, 4, generator=g))
        y = torch.randint(0, 32, (6,), generator=g)
    else:
        signs = torch.tensor([(-1.0) ** t for t in range(T)])
        if kind == "random-signs":  # balanced, in a random order
            signs = signs[torch.randperm(T, generator=g)]
        if kind == "in-alternating":  # the inputs alternate, the output gradients do not
            model = _model(seed=trial, in_signs=signs, out_signs=torch.ones(T))
        else:
            model = _model(seed=trial, out_signs=signs, bias=bool(trial % 2))
        x, y = _inputs(6, delta, scale, seed=trial)
    way = pick([Way(GHOST), Way(EXPLICIT, kept=False), None])
    return model, x, y, way, (kind, delta, scale, way)


@pytest.mark.parametrize("block", range(4))
def test_randomised_adversarial_inputs_are_released_within_c(block):
    """40 random cases (10 per block): sign patterns on the outputs or the inputs, random
    balanced signs, a convolution with a checkerboard; spreads 1e-6..1e-1 and scales
    0.1..1e18 (the scale S_i overflows fp32 above ~1e17); the layer's way planned, or forced to ghost norms, or to explicit norms with
    the clipped sum by a second product. Every example alone is released within C, every
    norm of the batch is finite and non-negative."""
    for trial in range(10 * block, 10 * block + 10):
        model, x, y, way, label = _adversarial(trial)
        clip = _clip_below_every_norm(model, x, y)
        engine = GhostEngine(model, clip)
        if way is not None:
            engine.layers[0].force = way
        r = engine(x, y)
        assert torch.isfinite(r.norms).all() and (r.norms >= 0).all(), label
        for i in range(len(y)):
            assert _released_one(engine, x, y, i) <= clip, label


# ---------------------------------------------------------------------- non-finite inputs


def test_a_non_finite_example_still_stops_the_run_and_the_others_are_finite():
    """A genuinely non-finite per-example gradient keeps the existing policy (the trainer
    stops the run when a norm is not finite, docs/sharp-edges.md row 6): its norm comes out
    non-finite, the other examples' norms stay finite."""
    model = _model()
    x, y = _inputs(4, 1e-2, 1.0, seed=4)
    x[1, 0, 3, 7] = float("nan")
    for name in ("scalemix", "vmap"):
        r = make_engine(name, model, 1e-3)(x, y)
        finite = torch.isfinite(r.norms)
        assert finite.tolist() == [True, False, True, True], name


# ---------------------------------------------------------------------- the clip rule


def test_clip_factors_keep_a_rounding_margin():
    """c = min(1, C (1 - m) / norm): after rounding, c * norm <= C for any norm, with
    m = 2^-10 in fp32; zero norms give 1, non-finite norms no finite scaled gradient."""
    from scalemix.engine.base import clip_margin

    assert clip_margin(torch.float32) == 2.0**-10
    assert clip_margin(torch.float64) == 2.0**-39
    g = torch.Generator().manual_seed(5)
    norms = torch.exp(torch.empty(100_000).uniform_(-30, 30, generator=g))
    for clip in (1e-3, 0.7, 1.0, 3.3):
        c = clip_factors(norms, clip)
        assert float((c.double() * norms.double()).max()) <= clip
        big = norms > clip
        assert torch.allclose(
            (c * norms)[big].double(),
            torch.full((int(big.sum()),), clip * (1 - 2.0**-10)).double(),
            rtol=1e-6,
        )
    assert clip_factors(torch.zeros(1), 1.0).item() == 1.0
    bad = clip_factors(torch.tensor([float("nan"), float("inf")]), 1.0)
    assert math.isnan(bad[0]) and bad[1] == 0
    with pytest.raises(ValueError, match="fp32 or fp64"):
        clip_factors(torch.ones(2, dtype=torch.bfloat16), 1.0)


# ---------------------------------------------------------------------- TF32


def _settings():
    from scalemix.engine.base import tf32_settings

    return tf32_settings()


def _all_off(s: dict) -> bool:
    legacy = [s["cuda_matmul_allow_tf32"], s["cudnn_allow_tf32"]]
    new = [v for k, v in s.items() if k.endswith(".fp32_precision")]
    return (
        all(v in (False, None) for v in legacy)
        and s["float32_matmul_precision"] in ("highest", None)
        and all(v == "ieee" for v in new)
    )


def _restore(snapshot: dict) -> None:
    """Put back the settings ``_settings()`` read (legacy first, then per-operation)."""
    from scalemix.engine.base import _fp32_precision_leaves

    if snapshot["float32_matmul_precision"] is not None:
        torch.set_float32_matmul_precision(snapshot["float32_matmul_precision"])
    if snapshot["cudnn_allow_tf32"] is not None:
        torch.backends.cudnn.allow_tf32 = snapshot["cudnn_allow_tf32"]
    for name, obj in _fp32_precision_leaves():
        obj.fp32_precision = snapshot[f"{name}.fp32_precision"]


@pytest.mark.parametrize("start", ["default", "legacy-on", "new-on", "matmul-high"])
def test_full_fp32_products_sets_and_restores_the_tf32_flags(start):
    """Inside: TF32 off for cuBLAS and cuDNN (and oneDNN's reduced fp32 modes), by both of
    torch's interfaces; after, even on an exception, every setting exactly as before,
    whichever interface the run used to allow TF32."""
    from scalemix.engine.base import full_fp32_products

    b = torch.backends
    session = _settings()
    try:
        if start == "legacy-on":
            b.cuda.matmul.allow_tf32 = True
            b.cudnn.allow_tf32 = True
        elif start == "new-on":
            if "cudnn.conv.fp32_precision" not in session:
                pytest.skip("torch without the per-operation fp32_precision settings")
            b.cuda.matmul.fp32_precision = "tf32"
            b.cudnn.conv.fp32_precision = "tf32"
        elif start == "matmul-high":
            torch.set_float32_matmul_precision("high")
        before = _settings()
        with full_fp32_products():
            inside = _settings()
        assert _all_off(inside), inside
        assert _settings() == before
        with pytest.raises(KeyError), full_fp32_products():
            raise KeyError("inside")
        assert _settings() == before
    finally:
        _restore(session)
    assert _settings() == session


def _spy_on_products(monkeypatch, seen: list):
    """Record the TF32 settings each time an engine takes norms or clip factors."""
    import scalemix.engine.ghost as ghost
    import scalemix.engine.vmap as vmap_mod

    real_layer, real_factors = ghost.GhostEngine._matmul_layer, ghost.clip_factors

    def layer(self, *args, **kw):
        seen.append(_settings())
        return real_layer(self, *args, **kw)

    def factors(*args, **kw):
        seen.append(_settings())
        return real_factors(*args, **kw)

    monkeypatch.setattr(ghost.GhostEngine, "_matmul_layer", layer)
    monkeypatch.setattr(ghost, "clip_factors", factors)
    monkeypatch.setattr(vmap_mod, "clip_factors", factors)


def test_engines_take_norms_and_sums_with_tf32_off(monkeypatch):
    """Both DP engines enter full_fp32_products around their norms, clip factors and
    clipped sums, and leave the run's settings as they were."""
    seen: list = []
    _spy_on_products(monkeypatch, seen)
    before = _settings()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    x, y = torch.randn(3, 1, 3, 4, 4), torch.tensor([0, 1, 2])
    for name in ("scalemix", "vmap"):
        seen.clear()
        make_engine(name, model, 0.1)(x, y)
        assert seen and all(_all_off(s) for s in seen), name
        assert _settings() == before


def test_precision_policy_is_recordable():
    import json

    from scalemix.engine.base import precision_policy

    policy = json.loads(json.dumps(precision_policy()))
    assert policy["clip_margin_fp32"] == 2.0**-10 and "TF32" in policy["dp_products"]
    assert "tf32_outside_dp_products" in policy


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_cuda_engine_runs_its_products_without_tf32(monkeypatch):
    """With TF32 allowed for the run (legacy flags on, as many training scripts set them),
    the fast engine's norms and clipped sum on the device are those of full fp32 products
    of the layer inputs and output gradients it was given: within 1e-5 of float64 (TF32,
    a 10-bit mantissa, errs by ~1e-3), and the settings are back on after."""
    captured: list = []
    seen: list = []
    _spy_on_products(monkeypatch, seen)
    real = GhostEngine._norms

    def norms(self, layer, a, g, b, k, *rest):
        captured.append((layer, a.detach().double().cpu(), g.detach().double().cpu()))
        return real(self, layer, a, g, b, k, *rest)

    monkeypatch.setattr(GhostEngine, "_norms", norms)
    b_ = torch.backends
    old = (b_.cuda.matmul.allow_tf32, b_.cudnn.allow_tf32)
    b_.cuda.matmul.allow_tf32, b_.cudnn.allow_tf32 = True, True
    try:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(16, 64, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 64, 10),
        ).cuda()
        x = torch.randn(8, 1, 16, 8, 8, device="cuda")
        y = torch.randint(0, 10, (8,), device="cuda")
        engine = GhostEngine(model, clip=1e-3)
        for layer in engine.layers:
            layer.force = Way(GHOST)
        r = engine(x, y)
        assert seen and all(_all_off(s) for s in seen)
        assert (b_.cuda.matmul.allow_tf32, b_.cudnn.allow_tf32) == (True, True)
    finally:
        b_.cuda.matmul.allow_tf32, b_.cudnn.allow_tf32 = old
    per_layer = []
    for layer, a, g in captured:  # the explicit per-example gradients, in float64
        m = layer.module
        if layer.kind == "linear":
            w = torch.einsum("np,nd->npd", g, a)
            per_layer += [w, g]
        else:
            w = torch.stack(
                [
                    torch.nn.grad.conv2d_weight(
                        a[i : i + 1], m.weight.shape, g[i : i + 1], m.stride, m.padding
                    )
                    for i in range(a.shape[0])
                ]
            )
            per_layer.append(w)
    per_ex = torch.cat([t.flatten(1) for t in per_layer], 1)
    ref_norms = per_ex.norm(dim=1)
    torch.testing.assert_close(r.norms.double().cpu(), ref_norms, rtol=1e-5, atol=0)
    c = clip_factors(r.norms, 1e-3).double().cpu()
    want = (c[:, None] * per_ex).sum(0)
    got = torch.cat([r.grads[i].double().cpu().reshape(-1) for i in _order(captured)])
    assert float((got - want).norm() / want.norm()) < 1e-5


def _order(captured):
    """Parameter indices in the order of the captured layers' parts."""
    out = []
    for layer, *_ in captured:
        out += layer.param_idx
    return out


# ---------------------------------------------------------------------- the error model


def _positions(family: str, b: int, t: int, d: int, p: int, delta: float, seed: int):
    """(a, g): (b, t, d) layer inputs and (b, t, p) output gradients whose per-position
    terms nearly cancel, in one of several adversarial ways."""
    g_ = torch.Generator().manual_seed(seed)
    signs = torch.tensor([(-1.0) ** i for i in range(t)]).view(1, t, 1)
    a0, g0 = torch.randn(b, 1, d, generator=g_), torch.randn(b, 1, p, generator=g_)
    a = a0 + delta * torch.randn(b, t, d, generator=g_)
    if family == "alternating":  # near-constant inputs, sign-alternating output gradients
        g = signs * g0
    elif family == "positive":  # everything positive but the signs: coherent rounding
        a = a0.abs() + delta * torch.rand(b, t, d, generator=g_)
        g = signs * g0.abs() * (1 + delta * torch.rand(b, t, 1, generator=g_))
    elif family == "inputs-alternating":  # the inputs alternate, the gradients do not
        a = signs * a0 + delta * torch.randn(b, t, d, generator=g_)
        g = g0 + delta * torch.randn(b, t, p, generator=g_)
    else:  # "low-rank": rank-one gradients whose position weights sum to ~ delta
        w = torch.randn(b, t, 1, generator=g_)
        g = (w - w.mean(1, keepdim=True) * (1 - delta)) * g0
    return a, g


@pytest.mark.parametrize(
    ("t", "d", "p"), [(16, 512, 512), (4, 2048, 8), (64, 256, 64), (256, 64, 32), (16, 4608, 512)]
)
def test_the_gram_error_model_covers_adversarial_positions(t, d, p):
    """The guard's model (ghost._nu_gram): a Gram squared norm is within nu_gram u S_i of
    the exact one. On adversarial positions (near-constant, sign-alternating, all-positive,
    low-rank) the fast engine's own Gram norm errs by at most an eighth of that (measured
    on the CPU: at most 1.2 u S_i, 40 to 200 times below)."""
    from scalemix.engine.ghost import _nu_gram, _scale

    engine = GhostEngine(nn.Linear(d, p, bias=False), clip=1.0)
    layer = engine.layers[0]
    u = 2.0**-24
    worst = 0.0
    for family in ("alternating", "positive", "inputs-alternating", "low-rank"):
        for seed, delta in enumerate((1e-2, 1e-4)):
            a, g = _positions(family, 8, t, d, p, delta, seed)
            sq = engine._norms(layer, a, g, 8, 1, Way(GHOST), None)[0][0]
            a64, g64 = a.double(), g.double()
            exact = (a64 @ a64.transpose(1, 2) * (g64 @ g64.transpose(1, 2))).sum((1, 2))
            scale = _scale(a64.pow(2).sum(2), g64.pow(2).sum(2), False)
            worst = max(worst, float(((sq.double() - exact).abs() / (u * scale)).max()))
    assert worst <= _nu_gram(d, p, t) / 8, (worst, _nu_gram(d, p, t))
