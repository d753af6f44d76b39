"""The fast DP engine: book-keeping per-example clipping with mixed ghost norms.

Bu, Mao & Xu 2022 ("Scalable and efficient training of large convolutional neural
networks with differential privacy", arXiv 2205.10683), Li et al. 2021 (ghost norms).

One chunk costs one ordinary forward pass over all B*K views, one backward pass for the
*output* gradients only (no weight-gradient products), and per layer:

* the per-example gradient norm, by whichever way is cheaper for the layer's shape
  (T = positions per example, K views included; d = fan-in = C kh kw; p = outputs):
    - ghost:    ||g_i||^2 = sum((A_i A_i^T) * (G_i G_i^T)), where for a convolution
                A_i A_i^T comes without the unfold from the Gram matrix of the input's
                positions, its blocks summed over the kh kw kernel offsets
                (cost ~ (H W)^2 C + T^2 (kh kw + p); from the unfold ~ T^2 (d + p))
    - explicit: g_i = G_i^T A_i, then its norm                    cost ~ T d p
                for a convolution either by the unfold and a batched product or as one
                weight-gradient convolution with the examples as groups (no unfold)
  chosen by the FLOP count where it is clear and by timing where it is not, once per
  shape and machine (plans.py);
* the clipped sum sum_i c_i g_i: one more weight-gradient product with the output
  gradients scaled by c_i, or an einsum over the explicit g_i where keeping those takes
  at most KEEP_RATIO times the memory of the layer's input and output gradient.

Norms are computed inside the backward pass (a tensor hook on each layer's output), in
chunks of examples, so that output gradients and unfolded activations are freed as the
backward pass goes, as in a non-private backward.

The guard (docs/sharp-edges.md row 17). A Gram norm sums (K T)^2 products that cancel
when an example's per-position terms g_t a_t^T nearly cancel: in fp32 it can come out
far too small, negative or NaN, and the example would then be scaled by more than
C / ||g_i||. Likewise a clipped sum taken by a second product is a different rounding of
the example's gradient than the one its norm was taken of. Both errors are bounded by a
multiple of the example's per-position scale S_i = (sum_t |g_t| |(a_t, 1)|)^2 (an upper
bound on ||g_i||^2 itself), so each layer computes S_i beside the norm (from the Gram
matrices' diagonals or the rows, O(K T) per example) and marks the examples whose
estimated relative error could exceed the share of the clip margin given to it
(``_suspects``; the margin is ``base.clip_margin``), or whose squared norm is negative or
non-finite. Those examples alone are recomputed the explicit way: their per-example
gradients are materialised, their norms taken of them, and their terms of the clipped
sum summed from the same tensors (the second product leaves them out). Layers whose
norms and sums both come from kept per-example gradients need no guard. With no
suspect, the guard costs the scale and one host synchronisation per chunk.

The K views of an example are one example: their positions are stacked (K*T rows) so
the norm is taken of the gradient of the view-averaged loss, and the sensitivity stays
C. Weight-standardised convolutions take the explicit path and map the per-example
gradient of the standardised weight back to (weight, gain) with a batched vjp.
GroupNorm / LayerNorm / InstanceNorm (GroupNorm modules) and public-statistics BatchNorm
affine parameters are handled explicitly (their per-example gradients are tiny).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import vjp, vmap

from scalemix.engine import plans
from scalemix.engine.base import (
    MARGIN_EPS,
    ChunkResult,
    Engine,
    clip_factors,
    clip_margin,
    full_fp32_products,
    view_averaged_loss,
)
from scalemix.errors import ConfigError
from scalemix.models.layers import PublicBatchNorm, WSConv2d


class _Layer:
    """A module that owns trainable parameters, and what one forward pass left of it."""

    def __init__(self, module: nn.Module, kind: str, param_idx: list[int]):
        self.module, self.kind, self.param_idx = module, kind, param_idx
        self.a: torch.Tensor | None = None
        # conv / linear: None = planned per shape (plans.py); or forced: "ghost",
        # "explicit" (kept within KEEP_RATIO), "explicit-keep", "explicit-recompute", with the
        # per-example gradient by ``per_example``: "grouped" (convolutions' default) or
        # "matmul" (unfold and batched product; linear layers' only way)
        self.mode: str | None = None
        self.per_example: str | None = None
        self.used: str | None = None  # the way the last call took
        self.guarded = 0  # examples the last call recomputed the explicit way (the guard)
        self.calls = 0


def _kind(m: nn.Module) -> str:
    if isinstance(m, WSConv2d):
        kind = "wsconv"
    elif isinstance(m, nn.Conv2d):
        kind = "conv"
    elif isinstance(m, nn.Linear):
        kind = "linear"
    elif isinstance(m, PublicBatchNorm):
        kind = "pbn"
    elif isinstance(m, nn.GroupNorm):
        kind = "gn"
    else:
        raise ConfigError(
            f"engine 'scalemix' has no per-example rule for {type(m).__name__}; use --engine vmap"
        )
    if kind in ("conv", "wsconv") and m.groups != 1:
        raise ConfigError(
            "engine 'scalemix' supports ungrouped convolutions only; use --engine vmap"
        )
    if kind in ("conv", "wsconv") and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
        raise ConfigError(
            f"engine 'scalemix' supports numeric zero padding only (this convolution has "
            f"padding={m.padding!r}, padding_mode={m.padding_mode!r}); use --engine vmap"
        )
    return kind


def _part_order(m: nn.Module, kind: str) -> list[nn.Parameter]:
    """The parameters in the order the per-layer rules return their gradients: the
    standardised weight's inputs first (weight, and gain for scaled WS), then the bias.
    Matched to the model's parameters by identity, never by registration order."""
    if kind in ("gn", "pbn"):
        return [m.weight, m.bias]
    first = list(m.ws_params()) if kind == "wsconv" else [m.weight]
    return first + ([m.bias] if getattr(m, "bias", None) is not None else [])


CHUNK_FLOATS = 2**21  # bound on one chunk's unfolded activations (8 MB in float32)
# Keeping a layer's explicit per-example gradients saves the clipped sum's second
# weight-gradient product; it is allowed while they take at most KEEP_RATIO times the
# layer input and output gradient that the second product would keep instead. Measured on
# ResNet-9, batch 64 (the engine call): at 2.5 it keeps its two 32 px and two
# 128-channel 16 px convolutions, 1055 ms against 1103 ms keeping only the first two, and
# the step's tensor peak stays 1.02x non-private; at 3 the 128 -> 256 convolution is kept
# too, for no measurable time at batch 64 (1052 ms), 1.4 % at batch 256, and a 1.16x peak.
KEEP_RATIO = 2.5


def _frob(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over (i, j) of x[b, i, j] * y[b, i, j] per b, without forming the product."""
    n = x.shape[0]
    return torch.linalg.vecdot(x.reshape(n, -1), y.reshape(n, -1))


# The guard's rounding-error model. With u the unit roundoff and S_i the example's
# per-position scale (module docstring), a Gram squared norm is within nu_gram u S_i of
# the exact one, and a second product's share of example i within nu_product u sqrt(S_i)
# of the example's exact gradient. Each Gram entry is an inner product of d (input side)
# or p (output side) terms, whose rounding error is of order sqrt(n) u times the product
# of the two rows' norms (the probabilistic bound of Higham & Mary 2019, lambda = 1); the
# entries' errors are added with their weights (|entry of the other Gram| <= the rows'
# norms) as if every entry erred in the same direction, which near-constant positions can
# bring about: that gives S_i. The two Grams' roundings, and the blocked or pairwise sum of
# the (K T)^2 products (2 log2(K T) in the same sense), are independent and add in
# quadrature; a few more roundings add 2. The worst case of deterministic analysis
# ((d + p + (K T)^2) u S_i) would mark every example of a layer with more than a few
# positions, and is not attained: the largest error we could provoke, on adversarial
# near-constant, sign-alternating, all-positive and low-rank positions, was 1.2 u S_i
# (below 1e-3 (d + p) u S_i), 40 to 200 times below nu_gram u S_i for d + p from 100 to
# 5000 (CPU, MKL; tests/test_fp_clipping.py::test_the_gram_error_model_covers_adversarial_
# positions checks a factor of 8 on the machine it runs on).
def _nu_gram(d: int, p: int, rows: int) -> float:
    """Gram norm's error, in units of u S_i (see above)."""
    return math.sqrt(d + p + 2 * math.log2(max(rows, 2))) + 2


def _nu_product(rows: int) -> float:
    """A weight-gradient product's error on one example's share, in units of u sqrt(S_i):
    its K T positions summed per entry (the same model)."""
    return math.sqrt(rows) + 2


def ghost_ratio_limit(d: int, p: int, rows: int) -> float:
    """The largest S_i / ||g_i||^2 a Gram norm may have and stay within its share m of the
    clip margin (on the squared norm): m / (nu_gram u) = 2^14 / nu_gram, the same in fp32
    and fp64 (m / u = 2 MARGIN_EPS)."""
    return 2 * MARGIN_EPS / _nu_gram(d, p, rows)


def typical_ratio(rows: int, k: int) -> float:
    """S_i / ||g_i||^2 of an ordinary example: near its number of positions T where their
    terms are unrelated (measured on ResNet-9: 1.0 to 1.3 T), and, the K views of one image
    being alike, near T sqrt(K) rather than K T (1.5 to 2 T at K = 4). The planner takes
    ghost norms only where this is within ``ghost_ratio_limit``: beyond it most examples
    would be recomputed the explicit way."""
    return rows / math.sqrt(k)


def _scale(row_a: torch.Tensor, row_g: torch.Tensor, bias: bool) -> torch.Tensor:
    """S_i = (sum_t |g_t| |(a_t, 1 if bias)|)^2 from (b, rows) squared row norms: the
    per-position scale the guard's errors are measured in, >= ||g_i||^2 (bias included)."""
    return ((row_a + float(bias)).sqrt() * row_g.sqrt()).sum(1).square()


def _suspects(
    sq: torch.Tensor,
    scale: torch.Tensor,
    *,
    gram: bool,
    d: int,
    p: int,
    rows: int,
    amplify: float = 1.0,
) -> torch.Tensor:
    """(b,) bool: examples whose norm may be off by more than its share of the clip margin.

    ``sq``: the layer's squared per-example norm (weight and bias), ``scale``: S_i;
    ``gram``: the norm is a Gram norm (share m of the squared norm, i.e. m / 2 of the
    norm), else it is exact for the tensor it was taken of; either way the clipped sum is
    a second product (share m / 4 of the norm), whose error a pullback may ``amplify``
    (its operator norm). Negative, NaN and inf values are suspects (every comparison
    with NaN is false).
    """
    m = clip_margin(sq.dtype)
    u = torch.finfo(sq.dtype).eps / 2
    nu = _nu_product(rows) * u * amplify
    ok = nu * scale.sqrt() <= (m / 4) * sq.sqrt()
    if gram:
        ok &= _nu_gram(d, p, rows) * u * scale <= m * sq
    return ~ok


class GhostEngine(Engine):
    name = "scalemix"

    def __init__(self, model: nn.Module, clip: float | None):
        super().__init__(model, clip)
        index = {id(p): i for i, p in enumerate(self.params)}
        self.layers: list[_Layer] = []
        for m in model.modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if own:
                kind = _kind(m)
                order = _part_order(m, kind)
                if {id(p) for p in order} != {id(p) for p in own}:
                    raise ConfigError(
                        f"engine 'scalemix' cannot attribute the parameters of {type(m).__name__} "
                        "(frozen or extra parameters); use --engine vmap"
                    )
                self.layers.append(_Layer(m, kind, [index[id(p)] for p in order]))
        self.memory: dict[str, int] = {}  # what the last call held, by kind (bytes)
        covered = sorted(i for layer in self.layers for i in layer.param_idx)
        if covered != list(range(len(self.params))):  # pragma: no cover - defensive
            raise ConfigError("engine 'scalemix' could not attribute every parameter to a layer")

    # ------------------------------------------------------------------ per layer

    @staticmethod
    def _positions(layer: _Layer, a: torch.Tensor, g: torch.Tensor, b: int, k: int):
        """(A, G) as (b, K*T, d) and (b, K*T, p): each example's rows, views stacked."""
        m = layer.module
        if layer.kind == "linear":
            return a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
        cols = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # (N, d, T)
        _, d, t = cols.shape
        a2 = cols.view(b, k, d, t).permute(0, 1, 3, 2).reshape(b, k * t, d)
        p = g.shape[1]
        g2 = g.reshape(b, k, p, t).permute(0, 1, 3, 2).reshape(b, k * t, p)
        return a2, g2

    @staticmethod
    def _costs(layer: _Layer, a: torch.Tensor, g: torch.Tensor, k: int) -> dict:
        """Per-example multiply-adds of each way to the norm (K views stacked), and whether
        the ghost way takes the input's Gram matrix by shifts (see ``_shifted_gram``)."""
        m = layer.module
        d, p = m.weight[0].numel(), m.weight.shape[0]
        rows = g[0].numel() // p * k
        out = {"ghost": rows * rows * (d + p), "explicit": rows * d * p, "shifted": False}
        if layer.kind == "conv":  # numeric zero padding (``_kind``)
            kh, kw = m.kernel_size
            positions = k * a.shape[2] * a.shape[3]
            shifted = positions * positions * a.shape[1] + rows * rows * kh * kw
            if shifted < rows * rows * d:
                out["ghost"], out["shifted"] = shifted + rows * rows * p, True
        return out

    @staticmethod
    def _ghost_way(costs: dict, rows: int) -> str:
        """Ghost norms with the input Gram by shifts where that is cheaper, else unfolded."""
        return "ghost, shifted" if rows > 1 and costs["shifted"] else "ghost"

    @staticmethod
    def _shifted_gram(layer: _Layer, x: torch.Tensor, nb: int, k: int, out_hw) -> torch.Tensor:
        """Each example's Gram matrix of its unfolded input, (nb, K*T, K*T), without the
        unfold: a patch is C channels at kh*kw shifted positions, so
        (A A^T)[t, t'] = sum over kernel offsets o of X^T X [t*stride + o - pad, t'*stride + o - pad],
        where a position in the padding contributes zero: the Gram matrix of the input's
        positions (C per entry), and for each offset its strided block of the positions
        that offset reads inside the input, added into the block of the output positions
        that read them. (K H W)^2 C + (K T)^2 kh kw multiply-adds instead of (K T)^2 C kh kw.
        """
        m = layer.module
        (ph, pw), (kh, kw) = m.padding, m.kernel_size
        (sh, sw), (dh, dw) = m.stride, m.dilation
        ho, wo = out_hw
        c, h, w = x.shape[1:]
        xs = x.reshape(nb, k, c, h * w).transpose(1, 2).reshape(nb, c, k * h * w)
        gx = torch.bmm(xs.transpose(1, 2), xs).view(nb, k, h, w, k, h, w)

        def reads(offset: int, step: int, dil: int, pad: int, size: int, out: int):
            """Output positions [o0, o1) whose tap ``offset`` falls inside the input, and
            the strided input slice they read."""
            shift = offset * dil - pad  # input index of output 0's tap
            o0 = max(0, -(shift // step) if shift < 0 else 0)
            o1 = min(out, (size - 1 - shift) // step + 1) if size - 1 - shift >= 0 else 0
            first = o0 * step + shift
            return o0, o1, slice(first, first + step * (o1 - o0 - 1) + 1, step)

        aa = gx.new_zeros(nb, k, ho, wo, k, ho, wo)
        for i in range(kh):
            r0, r1, rs = reads(i, sh, dh, ph, h, ho)
            if r0 >= r1:
                continue
            for j in range(kw):
                c0, c1, cs = reads(j, sw, dw, pw, w, wo)
                if c0 >= c1:
                    continue
                aa[:, :, r0:r1, c0:c1, :, r0:r1, c0:c1] += gx[:, :, rs, cs, :, rs, cs]
        return aa.reshape(nb, k * ho * wo, k * ho * wo)

    def _matmul_layer(self, layer: _Layer, a: torch.Tensor, g: torch.Tensor, b: int, k: int):
        """Per-example squared norms of conv / linear parameters, and the clipped-sum finisher."""
        m = layer.module
        d, p = m.weight[0].numel(), m.weight.shape[0]
        rows = g[0].numel() // p * k  # positions per example, its K views stacked
        bias_numel = p if getattr(m, "bias", None) is not None else 0
        # keeping the explicit per-example gradients instead of the layer input and output
        # gradient that the clipped sum's second product needs: within KEEP_RATIO of them
        can_keep = (d * p + bias_numel) * b <= KEEP_RATIO * (a.numel() + g.numel())
        costs = self._costs(layer, a, g, k)
        if layer.mode is None:
            way = self._plan(layer, a, g, b, k, rows, costs, can_keep)
            keep = way.startswith("explicit") and can_keep
        elif layer.mode == "ghost" and layer.kind != "wsconv":
            way, keep = "ghost", False
        else:  # forced explicit (always for weight standardisation, whose pullback needs
            # it), by the forced per-example way or the layer kind's default
            impl = "matmul" if layer.kind == "linear" else layer.per_example or "grouped"
            way = f"explicit, {impl}"
            keep = layer.mode == "explicit-keep" or (layer.mode == "explicit" and can_keep)
        if way == "ghost":
            way = self._ghost_way(costs, rows)
        layer.used = way + (", kept" if keep else "")
        pullback = None
        if layer.kind == "wsconv":  # the standardised weight's vjp, for norms and sum alike
            _, pullback = vjp(m.standardize, *(t.detach() for t in m.ws_params()))
        sq, kept, chunk_bytes, suspect = self._norms(layer, a, g, b, k, way, keep, pullback)
        self._note_chunk(chunk_bytes)
        if kept is not None:
            self._note_held("per-example gradients kept", [t for *_, ts in kept for t in ts])
        else:
            self._note_held("layer inputs and output gradients", [a, g])
        rescued: dict = {}  # the guard's explicit per-example gradients, by ``rescue``

        def rescue(idx: torch.Tensor) -> list[torch.Tensor]:
            """Explicit per-example gradients of the examples ``idx``: kept for the clipped
            sum, and their squared norms (per parameter) returned for the clip factors."""
            parts = self._explicit_parts(layer, a, g, b, k, idx, pullback)
            rescued["idx"], rescued["parts"] = idx, parts
            self._note_held("per-example gradients of guarded examples", parts)
            return [_frob(t, t) for t in parts]

        guard = None if suspect is None else (suspect, rescue)
        return sq, self._clipped(layer, a, g, b, kept, pullback, rescued), guard

    def _plan(self, layer: _Layer, a, g, b: int, k: int, rows: int, costs: dict, can_keep):
        """The way to this layer's norms for its shapes: "ghost", or the explicit
        per-example gradient by "explicit, matmul" (unfold and batched product) or
        "explicit, grouped" (a convolution's weight gradient with the examples as groups,
        no unfold). Ghost or explicit by FLOPs where clear; the two explicit ways have the
        same FLOPs, so between them, and wherever FLOPs do not decide, by timing."""
        if rows == 1 and layer.kind != "wsconv":
            return "ghost"  # one position: the norm is a product of two vector norms
        explicit = ["explicit, matmul"]
        if layer.kind != "linear":
            explicit.insert(0, "explicit, grouped")
        ratio = costs["ghost"] / costs["explicit"]
        m = layer.module
        if layer.kind == "wsconv":  # the standardised weight's pullback needs the explicit gradient
            options = explicit
        elif typical_ratio(rows, k) > ghost_ratio_limit(
            m.weight[0].numel(), m.weight.shape[0], rows
        ):
            options = explicit  # Gram norms too inexact for most examples (the guard)
        elif ratio < 1 / plans.CLEAR:
            options = ["ghost"]
        elif ratio > plans.CLEAR:
            options = explicit
        else:
            options = ["ghost", *explicit]
        if len(options) == 1:
            return options[0]
        if os.environ.get("SCALEMIX_ENGINE_PLAN") == "flops":
            # equal FLOPs: the grouped way, which needs no unfold memory
            return "ghost" if "ghost" in options and ratio < 1 else explicit[0]
        geometry = (
            f"stride {m.stride} padding {m.padding} dilation {m.dilation}"
            if layer.kind != "linear"
            else "linear"
        )
        key = (
            f"{layer.kind} {tuple(m.weight.shape)} {geometry} bias {m.bias is not None} | "
            f"input {tuple(a.shape[1:])} output {tuple(g.shape[1:])} K {k} | {a.dtype} | "
            f"per-example gradients kept {can_keep}"  # the explicit ways' timing differs
        )

        def candidates():
            ra, rg = torch.randn_like(a), torch.randn_like(g)  # timing never reads training data
            c = torch.rand(b, dtype=a.dtype, device=a.device)

            def run(way: str):
                keep = way.startswith("explicit") and can_keep
                if way == "ghost":
                    way = self._ghost_way(costs, rows)

                def go():
                    kept = self._norms(layer, ra, rg, b, k, way, keep, None)[1]
                    self._clipped(layer, ra, rg, b, kept, None, {})(c)

                return go

            return {way: run(way) for way in options}

        return plans.choose(key, a.device, tuple(options), candidates)

    @staticmethod
    def _grouped_per_example(layer: _Layer, a_c, g_c, nb: int, k: int) -> torch.Tensor:
        """(nb, *weight.shape): each example's weight gradient, its K views summed, as one
        convolution weight gradient with the examples as groups (views as the batch)."""
        m = layer.module
        c, p = a_c.shape[1], g_c.shape[1]
        x = a_c.view(nb, k, *a_c.shape[1:]).transpose(0, 1).reshape(k, nb * c, *a_c.shape[2:])
        gy = g_c.view(nb, k, *g_c.shape[1:]).transpose(0, 1).reshape(k, nb * p, *g_c.shape[2:])
        w = torch.nn.grad.conv2d_weight(
            x, (nb * p, *m.weight.shape[1:]), gy, m.stride, m.padding, m.dilation, groups=nb
        )
        return w.view(nb, *m.weight.shape)

    def _norms(self, layer: _Layer, a, g, b: int, k: int, way: str, keep: bool, pullback):
        """Per-parameter squared per-example norms, the per-example gradients if ``keep``,
        the bytes of the largest chunk's working tensors, and the guard's (b,) suspects
        (None where norm and clipped sum come from the same kept tensors, or where the norm
        is a product of two sums of squares). ``way``: "ghost, shifted", "ghost" (from the
        unfold), "explicit, matmul" or "explicit, grouped"."""
        m = layer.module
        has_bias = getattr(m, "bias", None) is not None
        d, p = m.weight[0].numel(), m.weight.shape[0]
        rows = g[0].numel() // p * k
        shifted = way == "ghost, shifted"
        gram = way.startswith("ghost")
        guarded = not keep and rows > 1
        amplify = self._pullback_bound(layer) if guarded and pullback is not None else 1.0
        per_example = rows * max(d, p)
        if shifted:  # the input positions' Gram matrix, the input's and the output's
            positions = k * a.shape[2] * a.shape[3]
            per_example = positions * (positions + a.shape[1]) + rows * (2 * rows + p)
        elif way == "explicit, grouped":  # the per-example gradients, and the views' copies
            per_example = d * p + (a[0].numel() + g[0].numel()) * k * (k > 1)
        chunk = max(1, CHUNK_FLOATS // per_example)
        sq_chunks: list[list[torch.Tensor]] = []
        part_chunks: list[list[torch.Tensor]] = []
        suspects: list[torch.Tensor] = []
        largest = 0
        for s in range(0, b, chunk):
            e = min(b, s + chunk)
            a_c, g_c = a[s * k : e * k], g[s * k : e * k]
            sq: list[torch.Tensor] = []
            rows_sq = None  # (row_a, row_g): squared norms of each position's input and output
            if shifted:
                # (nb, p, K*T): a view for K = 1 (positions along the last axis)
                g3 = g_c.reshape(e - s, k, p, -1).transpose(1, 2).reshape(e - s, p, rows)
                aa = self._shifted_gram(layer, a_c, e - s, k, g_c.shape[2:])
                gg = torch.bmm(g3.transpose(1, 2), g3)
                sq.append(_frob(aa, gg))
                rows_sq = (aa.diagonal(0, 1, 2), gg.diagonal(0, 1, 2))
                parts = []
                work = (e - s) * per_example  # everything: there is no unfold
            elif way == "ghost":
                a2, g2 = self._positions(layer, a_c, g_c, e - s, k)
                if rows == 1:  # a product of two sums of squares: nothing cancels
                    sq.append(a2.pow(2).sum((1, 2)) * g2.pow(2).sum((1, 2)))
                else:
                    aa = torch.bmm(a2, a2.transpose(1, 2))
                    gg = torch.bmm(g2, g2.transpose(1, 2))
                    sq.append(_frob(aa, gg))
                    rows_sq = (aa.diagonal(0, 1, 2), gg.diagonal(0, 1, 2))
                parts = []
                work = a2.numel() + g2.numel() + 2 * (e - s) * rows * rows  # unfold, 2 Grams
            else:
                if way == "explicit, grouped":
                    per_ex = self._grouped_per_example(layer, a_c, g_c, e - s, k)
                    work = (e - s) * per_example
                    if guarded:
                        rows_sq = self._patch_rows_sq(layer, a_c, g_c, e - s)
                else:
                    a2, g2 = self._positions(layer, a_c, g_c, e - s, k)
                    per_ex = torch.bmm(g2.transpose(1, 2), a2).reshape(e - s, *m.weight.shape)
                    work = a2.numel() + g2.numel() + (e - s) * d * p
                    if guarded:
                        rows_sq = (a2.pow(2).sum(2), g2.pow(2).sum(2))
                parts = list(vmap(pullback)(per_ex)) if pullback is not None else [per_ex]
                sq += [_frob(t, t) for t in parts]
            if has_bias:  # (nb, p): the output gradient summed over positions and views
                if layer.kind == "linear":
                    bias_g = g_c.reshape(e - s, -1, p).sum(1)
                else:
                    bias_g = g_c.reshape(e - s, k, p, -1).sum((1, 3))
                sq.append(bias_g.pow(2).sum(1))
                parts = parts + [bias_g]
            if guarded and rows_sq is not None:
                suspects.append(
                    _suspects(
                        sum(sq),
                        _scale(*rows_sq, has_bias),
                        gram=gram,
                        d=d,
                        p=p,
                        rows=rows,
                        amplify=amplify,
                    )
                )
            sq_chunks.append(sq)
            if keep:
                part_chunks.append((s, e, parts))
            largest = max(largest, work * a.element_size())
        sq_all = [torch.cat(c) for c in zip(*sq_chunks)]
        suspect = torch.cat(suspects) if suspects else None
        # kept per-example gradients stay in their chunks: no concatenation, no second copy
        return sq_all, part_chunks if keep else None, largest, suspect

    @staticmethod
    def _patch_rows_sq(layer: _Layer, a_c, g_c, nb: int):
        """(nb, K*T) squared norms of each unfolded input patch and output-gradient
        position, without the unfold: the channels' sum of squares summed over the kernel's
        window (zero padding reads zeros) by a convolution with a kernel of ones."""
        m = layer.module
        x2 = a_c.pow(2).sum(1, keepdim=True)
        ones = x2.new_ones(1, 1, *m.kernel_size)
        row_a = F.conv2d(x2, ones, None, m.stride, m.padding, m.dilation)
        return row_a.reshape(nb, -1), g_c.pow(2).sum(1).reshape(nb, -1)

    @staticmethod
    def _pullback_bound(layer: _Layer) -> float:
        """An upper bound on the operator norm of weight standardisation's pullback, which
        maps the error of a second product's weight gradient into the parameters'. Per
        filter o, the weight's part is (scale_o) times a projection (norm <= 1), scale_o =
        1 / sqrt(var_o + eps) (plain) or gain_o / sqrt(fan_in var_o + eps) (scaled), and the
        gain's is the inner product with (w_o - mean_o) / sqrt(fan_in var_o + eps)."""
        m = layer.module
        with torch.no_grad():
            w = m.weight.detach().to(torch.float64)
            mean = w.mean(dim=(1, 2, 3))
            var = w.var(dim=(1, 2, 3), unbiased=False)
            if m.mode == "scaled":
                den = torch.sqrt(var * m.fan_in + m.eps)
                gain = m.gain.detach().to(torch.float64).reshape(-1)
                centred = (w - mean.view(-1, 1, 1, 1)).flatten(1).norm(dim=1)
                bound = torch.sqrt((gain / den) ** 2 + (centred / den) ** 2)
            else:
                bound = 1 / torch.sqrt(var + m.eps)
            return float(bound.max())

    def _explicit_parts(self, layer: _Layer, a, g, b: int, k: int, idx: torch.Tensor, pullback):
        """The guard's fallback: explicit per-example gradients of the examples ``idx`` (per
        parameter, in ``_part_order``), in chunks, from the layer input and output gradient
        the clipped sum's second product keeps."""
        m = layer.module
        d, p = m.weight[0].numel(), m.weight.shape[0]
        has_bias = getattr(m, "bias", None) is not None
        n = a.shape[0] // b  # K rows of the batch per example
        per_example = d * p + (a[0].numel() + g[0].numel()) * n
        chunk = max(1, CHUNK_FLOATS // per_example)
        out: list[list[torch.Tensor]] = []
        for s in range(0, idx.numel(), chunk):
            sel = idx[s : s + chunk]
            nb = sel.numel()
            a_c = a.unflatten(0, (b, n))[sel].flatten(0, 1)
            g_c = g.unflatten(0, (b, n))[sel].flatten(0, 1)
            if layer.kind == "linear":
                a2, g2 = self._positions(layer, a_c, g_c, nb, k)
                per_ex = torch.bmm(g2.transpose(1, 2), a2).reshape(nb, *m.weight.shape)
            else:
                per_ex = self._grouped_per_example(layer, a_c, g_c, nb, k)
            parts = list(vmap(pullback)(per_ex)) if pullback is not None else [per_ex]
            if has_bias:
                if layer.kind == "linear":
                    parts.append(g_c.reshape(nb, -1, p).sum(1))
                else:
                    parts.append(g_c.reshape(nb, k, p, -1).sum((1, 3)))
            out.append(parts)
        return [torch.cat(ts) for ts in zip(*out)]

    def _clipped(self, layer: _Layer, a, g, b: int, kept: list | None, pullback, rescued: dict):
        """sum_i c_i g_i: an einsum over the kept per-example gradients, or one more
        weight-gradient product with the output gradients scaled by c_i, leaving out the
        examples the guard rescued (``rescued``: their indices and explicit gradients, filled
        in before the call), whose terms come from those gradients."""
        m = layer.module
        if kept is not None:

            def from_kept(c: torch.Tensor) -> list[torch.Tensor]:
                out: list[torch.Tensor] = []
                for s, e, parts in kept:
                    got = [torch.einsum("b,b...->...", c[s:e], t) for t in parts]
                    out = [o.add_(t) for o, t in zip(out, got)] if out else got
                return out

            return from_kept
        has_bias = getattr(m, "bias", None) is not None
        n, p = a.shape[0], m.weight.shape[0]

        def recompute(c: torch.Tensor) -> list[torch.Tensor]:
            idx = rescued.get("idx")
            c_all = c
            if idx is not None:  # exactly zero in the product: their terms are added below
                c = c.index_fill(0, idx, 0.0)
            cr = c.repeat_interleave(n // b)
            # sum_i c_i G_i^T A_i: scale whichever of A and G is smaller (the bias needs G's)
            scale_a = a.numel() < g.numel() and not has_bias
            a_s = a * cr.view(-1, *[1] * (a.dim() - 1)) if scale_a else a
            gs = g if scale_a else g * cr.view(-1, *[1] * (g.dim() - 1))
            if layer.kind == "linear":
                w = torch.einsum("...p,...d->pd", gs, a_s)
            else:
                w = torch.nn.grad.conv2d_weight(
                    a_s, m.weight.shape, gs, m.stride, m.padding, m.dilation, m.groups
                )
            out = list(pullback(w)) if pullback is not None else [w]
            if has_bias:
                per_out = (
                    gs.reshape(-1, p)
                    if layer.kind == "linear"
                    else gs.transpose(0, 1).reshape(p, -1).T
                )
                out.append(per_out.sum(0))
            if idx is not None:
                ci = c_all[idx]
                out = [
                    o + torch.einsum("b,b...->...", ci, t) for o, t in zip(out, rescued["parts"])
                ]
            return out

        return recompute

    # ------------------------------------------------------------------ memory ledger

    def _note_chunk(self, nbytes: int) -> None:
        self.memory["largest per-example chunk"] = max(
            self.memory.get("largest per-example chunk", 0), nbytes
        )

    def _note_held(self, what: str, tensors: list[torch.Tensor]) -> None:
        self.memory[what] = self.memory.get(what, 0) + sum(
            t.numel() * t.element_size() for t in tensors
        )

    @staticmethod
    def _norm_layer(layer: _Layer, a: torch.Tensor, g: torch.Tensor, b: int, k: int):
        """Affine parameters of GroupNorm / public BatchNorm: explicit per-example grads."""
        m = layer.module
        if layer.kind == "gn":
            xhat = F.group_norm(a, m.num_groups, eps=m.eps)
        else:
            shape = (1, -1, 1, 1)
            xhat = (a - m.public_mean.view(shape)) / torch.sqrt(m.public_var.view(shape) + m.eps)
        dims = tuple(range(2, a.dim()))
        gamma = (g * xhat).sum(dims).view(b, k, -1).sum(1)  # (b, C)
        beta = g.sum(dims).view(b, k, -1).sum(1)
        parts = [gamma, beta]  # module parameter order: weight, bias
        sq = [t.pow(2).sum(1) for t in parts]

        def clipped(c: torch.Tensor) -> list[torch.Tensor]:
            return [c @ t for t in parts]

        return sq, clipped, parts

    # ------------------------------------------------------------------ one chunk

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> ChunkResult:
        b, k = x.shape[:2]
        if b == 0:
            return self.zero_result(x.device)
        layer_sq: list[torch.Tensor | None] = [None] * len(self.params)
        finishers = []
        guards = []

        def on_grad(layer: _Layer, g: torch.Tensor) -> None:
            # under bf16 autocast: norms, clip factors and the clipped sum in fp32, and
            # never TF32 (base.full_fp32_products)
            a, g = layer.a.to(self.sum_dtype), g.detach().to(self.sum_dtype)
            layer.a = None  # from here on only what the clipped sum needs is kept
            layer.guarded = 0
            with torch.autocast(a.device.type, enabled=False), full_fp32_products():
                if layer.kind in ("conv", "wsconv", "linear"):
                    sq, fin, guard = self._matmul_layer(layer, a, g, b, k)
                    if guard is not None:
                        guards.append((layer, *guard))
                else:
                    sq, fin, parts = self._norm_layer(layer, a, g, b, k)
                    self._note_held("per-example gradients kept", parts)
            for i, s in zip(layer.param_idx, sq):
                layer_sq[i] = s
            finishers.append((layer, fin))

        def forward_hook(layer: _Layer):
            def hook(module, inputs, output):
                layer.calls += 1
                if layer.calls > 1:
                    raise ConfigError(
                        f"engine 'scalemix' needs each layer to run once per forward pass; "
                        f"{type(module).__name__} ran twice (weight sharing): use --engine vmap"
                    )
                layer.a = inputs[0].detach()
                output.register_hook(lambda g: on_grad(layer, g))

            return hook

        self.memory = {}  # bytes, this call (the memory ledger)
        for layer in self.layers:
            layer.a, layer.calls = None, 0
        handles = [layer.module.register_forward_hook(forward_hook(layer)) for layer in self.layers]
        self.sum_dtype = self.params[0].dtype  # the parameters' precision, never lower
        xin = x.reshape(b * k, *x.shape[2:]).detach().requires_grad_(True)
        try:
            logits = self.model(xin)
        finally:
            for h in handles:
                h.remove()
        loss, correct = view_averaged_loss(logits, y, k)
        total = loss.sum()
        # The gradient w.r.t. the input runs the backward pass through every layer (and
        # its hooks) without forming any weight gradient.
        torch.autograd.grad(total, xin)
        missing = [layer for layer in self.layers if layer_sq[layer.param_idx[0]] is None]
        if missing:  # pragma: no cover - a layer whose output does not reach the loss
            raise ConfigError(
                f"engine 'scalemix': {type(missing[0].module).__name__} got no gradient; use --engine vmap"
            )
        with torch.autocast(x.device.type, enabled=False), full_fp32_products():
            self._rescue(layer_sq, guards)
            return self._finish(layer_sq, finishers, loss, correct, b)

    @staticmethod
    def _rescue(layer_sq: list, guards: list) -> None:
        """The guard's fallback: each layer's suspect examples (``_suspects``) take their
        squared norms from their explicit per-example gradients, which their terms of the
        clipped sum will then come from. One host synchronisation per chunk, to know
        whether there is any (there almost never is)."""
        if not guards or not bool(torch.stack([s for _, s, _ in guards]).any()):
            return
        for layer, suspect, rescue in guards:
            idx = suspect.nonzero().squeeze(1)
            layer.guarded = idx.numel()
            if layer.guarded:
                for i, sq in zip(layer.param_idx, rescue(idx)):
                    layer_sq[i] = layer_sq[i].index_copy(0, idx, sq)

    def _finish(self, layer_sq, finishers, loss, correct, b) -> ChunkResult:
        """Norms, clip factors and the clipped sum, in the parameters' precision."""
        layer_sq_t = torch.stack(layer_sq)  # (P, b)
        norms = layer_sq_t.sum(0).sqrt()
        c = torch.ones_like(norms) if self.clip is None else clip_factors(norms, self.clip)
        grads: list[torch.Tensor | None] = [None] * len(self.params)
        while finishers:  # each layer's inputs / output gradients are freed once used
            layer, fin = finishers.pop()
            for i, t in zip(layer.param_idx, fin(c)):
                grads[i] = t.reshape(self.params[i].shape)
            del fin
        return ChunkResult(
            grads, loss.detach().sum(), correct.sum(), b, norms.detach(), layer_sq_t.detach()
        )
