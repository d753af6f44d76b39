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
  shape and machine (plans.py); the way is a value (``ways.Way``), and what each kind of
  layer does is its rule (``rules.py``, a registry from module type to rule);
* the clipped sum sum_i c_i g_i: one more weight-gradient product with the output
  gradients scaled by c_i, or one product c^T [g_1; ...; g_B] over the explicit
  per-example gradients where keeping those takes at most KEEP_RATIO times the memory of
  the layer's input and output gradient.

Norms are computed inside the backward pass (a tensor hook on each layer's output), so
that output gradients and unfolded activations are freed as the backward pass goes, as
in a non-private backward.

Batched for any K. The forward pass runs view-major (row v * B + i is view v of example
i), so a layer's input and output gradient are (K, B, ...) tensors and any run of
examples [s, e) of them is a *view*: the grouped weight-gradient convolution takes the
examples as groups and the views as its batch with no copy. The explicit per-example
gradients of a layer come out of one call as one flat (B, numel) tensor per parameter,
so their squared norms are one reduction and the clipped sum one product. Only working
tensors (unfolds, Gram matrices, per-example gradients that are not kept) are bounded,
per chunk of examples, by ``chunk_floats``: a cache-sized 8 MB on the CPU, a share of the
free memory on CUDA; kept per-example gradients are the layer's store, not working
memory, so those layers take every example in one call.

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
suspect, the guard costs the scale and one host synchronisation per chunk; in training
none (``Engine.defer_guard``: the flags join the step's one host read, and a flagged
step is computed again with the guard synchronous).

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
from dataclasses import replace

import torch
import torch.nn as nn
from torch.func import vmap

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
from scalemix.engine.rules import ConvRule, Rule, Sizes, rule_for
from scalemix.engine.ways import EXPLICIT, GHOST, MATMUL, Way
from scalemix.errors import ConfigError


class _Layer:
    """A module that owns trainable parameters, its rule, and what one forward pass left."""

    def __init__(self, module: nn.Module, rule: Rule, param_idx: list[int]):
        self.module, self.rule, self.param_idx = module, rule, param_idx
        self.a: torch.Tensor | None = None
        # weight layers: None = planned per shape (plans.py); or a forced way, which may
        # leave the explicit product (the kind's default) and keeping (within KEEP_RATIO)
        # open; a WS convolution forced to ghost norms takes explicit norms, recomputed
        self.force: Way | None = None
        self.used: Way | None = None  # the way the last call took
        self.guarded = 0  # examples the last call recomputed the explicit way (the guard)
        self.calls = 0

    @property
    def kind(self) -> str:
        return self.rule.name


# A chunk's *working* tensors (unfolds, Gram matrices, per-example gradients that are not
# kept) are bounded per device (``chunk_floats``): on the CPU by a cache-sized 8 MB, on
# CUDA by a share of the memory free when the backward pass starts.
CHUNK_FLOATS = 2**21  # elements (8 MB in float32)
CUDA_FREE_SHARE = 0.25
# Keeping a layer's explicit per-example gradients saves the clipped sum's second
# weight-gradient product; it is allowed while they take at most KEEP_RATIO times the
# layer input and output gradient that the second product would keep instead. Measured on
# ResNet-9, batch 64 (the engine call): at 2.5 it keeps its two 32 px and two
# 128-channel 16 px convolutions, 1055 ms against 1103 ms keeping only the first two, and
# the step's tensor peak stays 1.02x non-private; at 3 the 128 -> 256 convolution is kept
# too, for no measurable time at batch 64 (1052 ms), 1.4 % at batch 256, and a 1.16x peak.
KEEP_RATIO = 2.5


def chunk_floats(device: torch.device, element_size: int = 4) -> int:
    """The bound, in elements, on one chunk's working tensors on ``device`` now: the
    cache-sized ``CHUNK_FLOATS`` on the CPU; on CUDA ``CUDA_FREE_SHARE`` of the memory
    free to this process (the driver's free memory and the caching allocator's unused
    reserve), never less than ``CHUNK_FLOATS``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(CHUNK_FLOATS, int(CUDA_FREE_SHARE * free) // element_size)
    return CHUNK_FLOATS


def _frob(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over (i, j) of x[b, i, j] * y[b, i, j] per b (a pairwise sum of the products; a
    temporary of their size, which the chunk bound covers for Gram matrices)."""
    n = x.shape[0]
    return torch.linalg.vecdot(x.reshape(n, -1), y.reshape(n, -1))


def _sq_norms(t: torch.Tensor) -> torch.Tensor:
    """(n,) squared norms of the per-example tensors t[i] (n, out, ...): one reduction over
    each output's fan-in (a few thousand serial terms at most), squared, then a pairwise sum
    over the outputs. No temporary of t's size (a whole layer's per-example gradients are
    one tensor), 2 to 4 u from the exact value on ResNet shapes, and 5 to 7 times faster
    than a sum of the squares."""
    n = t.shape[0]
    rows = t.reshape(n, t.shape[1] if t.dim() > 2 else 1, -1)
    return torch.linalg.vector_norm(rows, dim=2).square().sum(1)


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


def _views(t: torch.Tensor, k: int) -> torch.Tensor:
    """(K B, ...) view-major rows -> the (K, B, ...) view."""
    return t.view(k, t.shape[0] // k, *t.shape[1:])


class GhostEngine(Engine):
    name = "scalemix"

    def __init__(self, model: nn.Module, clip: float | None):
        super().__init__(model, clip)
        index = {id(p): i for i, p in enumerate(self.params)}
        self.layers: list[_Layer] = []
        for m in model.modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if own:
                rule = rule_for(m)
                order = rule.params(m)
                if {id(p) for p in order} != {id(p) for p in own}:
                    raise ConfigError(
                        f"engine 'scalemix' cannot attribute the parameters of {type(m).__name__} "
                        "(frozen or extra parameters); use --engine vmap"
                    )
                self.layers.append(_Layer(m, rule, [index[id(p)] for p in order]))
        self.memory: dict[str, int] = {}  # what the last call held, by kind (bytes)
        self._bound: int | None = None  # this call's chunk bound (``chunk_floats``)
        covered = sorted(i for layer in self.layers for i in layer.param_idx)
        if covered != list(range(len(self.params))):  # pragma: no cover - defensive
            raise ConfigError("engine 'scalemix' could not attribute every parameter to a layer")

    # ------------------------------------------------------------------ the way

    def _chunk_bound(self, a: torch.Tensor) -> int:
        """This call's bound on a chunk's working tensors, read once (at the first layer of
        the backward pass, when the forward pass's activations are held)."""
        if self._bound is None:
            self._bound = chunk_floats(a.device, a.element_size())
        return self._bound

    @staticmethod
    def _resolve(way: Way, rule: Rule, s: Sizes, costs: dict, can_keep: bool) -> Way:
        """A complete way: ghost norms with the input Gram by shifts where that is cheaper;
        explicit gradients kept within KEEP_RATIO where keeping is left open."""
        if way.gram:
            return Way(GHOST, shifted=s.rows > 1 and costs["shifted"])
        if way.product not in rule.products:  # open, or not the kind's: its default
            way = replace(way, product=rule.products[0])
        return way if way.kept is not None else replace(way, kept=can_keep)

    def _way(self, layer: _Layer, a, g, b: int, k: int, s: Sizes, costs: dict, can_keep: bool):
        force = layer.force
        if force is None:
            way = self._plan(layer, a, g, b, k, s, costs, can_keep)
        elif force.gram and not layer.rule.ghost:
            way = Way(EXPLICIT, kept=False)  # a WS convolution's pullback needs the gradient
        else:
            way = force
        return self._resolve(way, layer.rule, s, costs, can_keep)

    def _plan(self, layer: _Layer, a, g, b: int, k: int, s: Sizes, costs: dict, can_keep):
        """The way to this layer's norms for its shapes: ghost norms, or the explicit
        per-example gradient by one of the kind's products (``Rule.products``: a
        convolution's weight gradient with the examples as groups, or the unfold and a
        batched product). Ghost or explicit by FLOPs where clear; the explicit ways have the
        same FLOPs, so between them, and wherever FLOPs do not decide, by timing. The plan
        cache stores ``str`` of the chosen (unresolved) way."""
        rule, m = layer.rule, layer.module
        ghost = Way(GHOST)
        if s.rows == 1 and rule.ghost:
            return ghost  # one position: the norm is a product of two vector norms
        explicit = [Way(EXPLICIT, product) for product in rule.products]
        ratio = costs["ghost"] / costs["explicit"]
        if not rule.ghost:  # the standardised weight's pullback needs the explicit gradient
            options = explicit
        elif typical_ratio(s.rows, k) > ghost_ratio_limit(s.d, s.p, s.rows):
            options = explicit  # Gram norms too inexact for most examples (the guard)
        elif ratio < 1 / plans.CLEAR:
            options = [ghost]
        elif ratio > plans.CLEAR:
            options = explicit
        else:
            options = [ghost, *explicit]
        if len(options) == 1:
            return options[0]
        if os.environ.get("SCALEMIX_ENGINE_PLAN") == "flops":
            # equal FLOPs: the first explicit way (grouped for a convolution: no unfold)
            return ghost if ghost in options and ratio < 1 else explicit[0]
        key = (
            f"{rule.name} {tuple(m.weight.shape)} {rule.geometry(m)} bias {s.bias} | "
            f"input {tuple(a.shape[1:])} output {tuple(g.shape[1:])} K {k} | {a.dtype} | "
            f"per-example gradients kept {can_keep}"  # the explicit ways' timing differs
        )

        def candidates():
            ra, rg = torch.randn_like(a), torch.randn_like(g)  # timing never reads training data
            c = torch.rand(b, dtype=a.dtype, device=a.device)

            def run(way: Way):
                way = self._resolve(way, rule, s, costs, can_keep)

                def go():
                    kept = self._norms(layer, ra, rg, b, k, way, None)[1]
                    self._clipped(layer, ra, rg, b, k, kept, None, {})(c)

                return go

            return {str(way): run(way) for way in options}

        by_name = {str(way): way for way in options}
        return by_name[plans.choose(key, a.device, tuple(by_name), candidates)]

    # ------------------------------------------------------------------ weight layers

    def _matmul_layer(self, layer: _Layer, a: torch.Tensor, g: torch.Tensor, b: int, k: int):
        """Per-example squared norms of conv / linear parameters, and the clipped-sum finisher."""
        rule, m = layer.rule, layer.module
        s = Sizes(m, g, k)
        # keeping the explicit per-example gradients instead of the layer input and output
        # gradient that the clipped sum's second product needs: within KEEP_RATIO of them
        can_keep = (s.d * s.p + s.p * s.bias) * b <= KEEP_RATIO * (a.numel() + g.numel())
        costs = rule.costs(m, a, g, k)
        way = self._way(layer, a, g, b, k, s, costs, can_keep)
        layer.used = way
        pullback = rule.pullback(m)  # the standardised weight's vjp, for norms and sum alike
        sq, kept, chunk_bytes, suspect = self._norms(layer, a, g, b, k, way, pullback)
        self._note_chunk(chunk_bytes)
        if kept is not None:
            self._note_held("per-example gradients kept", kept)
        else:
            self._note_held("layer inputs and output gradients", [a, g])
        rescued: dict = {}  # the guard's explicit per-example gradients, by ``rescue``

        def rescue(idx: torch.Tensor) -> list[torch.Tensor]:
            """Explicit per-example gradients of the examples ``idx``: kept for the clipped
            sum, and their squared norms (per parameter) returned for the clip factors."""
            parts = self._explicit_parts(layer, a, g, b, k, idx, pullback)
            rescued["idx"], rescued["parts"] = idx, parts
            self._note_held("per-example gradients of guarded examples", parts)
            return [_sq_norms(t) for t in parts]

        guard = None if suspect is None else (suspect, rescue)
        return sq, self._clipped(layer, a, g, b, k, kept, pullback, rescued), guard

    @staticmethod
    def _working(a: torch.Tensor, k: int, way: Way, s: Sizes) -> int:
        """Elements of the working tensors one example adds to a chunk: what the chunk bound
        limits. Kept per-example gradients are the layer's store, not working memory; a
        grouped convolution reads views of the layer's input and output gradient."""
        if way.shifted:  # the input positions' Gram matrix, the input's and the output's
            positions = k * a.shape[2] * a.shape[3]
            return positions * (positions + a.shape[1]) + s.rows * (2 * s.rows + s.p)
        if way.gram:  # the unfolded positions, and their two Gram matrices
            return s.rows * (s.d + s.p) + (2 * s.rows * s.rows if s.rows > 1 else 0)
        out = 0 if way.kept else s.d * s.p
        return out + (s.rows * (s.d + s.p) if way.product == MATMUL else 0)

    def _norms(self, layer: _Layer, a, g, b: int, k: int, way: Way, pullback):
        """Per-parameter squared per-example norms, the per-example gradients if
        ``way.kept`` (one (B, ...) tensor per parameter), the bytes of the largest chunk's
        working tensors, and the guard's (b,) suspects (None where norm and clipped sum come
        from the same kept tensors, or where the norm is a product of two sums of squares).
        ``a`` and ``g`` are view-major (K B, ...)."""
        rule, m = layer.rule, layer.module
        s = Sizes(m, g, k)
        guarded = not way.kept and s.rows > 1
        amplify = rule.pullback_bound(m) if guarded and pullback is not None else 1.0
        per_example = self._working(a, k, way, s)
        chunk = max(1, self._chunk_bound(a) // per_example) if per_example else b
        av, gv = _views(a, k), _views(g, k)
        sq_chunks: list[list[torch.Tensor]] = []
        store: list[torch.Tensor] | None = None  # kept per-example gradients, (b, ...) each
        suspects: list[torch.Tensor] = []
        for s0 in range(0, b, chunk):
            e = min(b, s0 + chunk)
            a_c, g_c = av[:, s0:e], gv[:, s0:e]  # views: (K, nb, ...)
            sq: list[torch.Tensor] = []
            parts: list[torch.Tensor] = []
            rows_sq = None  # (row_a, row_g): squared norms of each position's input and output
            if way.gram:
                if way.shifted:
                    g3 = ConvRule.output_rows(g_c)  # (nb, p, K*T)
                    aa = ConvRule.shifted_gram(m, a_c, g_c.shape[3:])
                    gg = torch.bmm(g3.transpose(1, 2), g3)
                else:
                    a2, g2 = rule.positions(m, a_c, g_c)
                    if s.rows == 1:  # a product of two sums of squares: nothing cancels
                        aa = gg = None
                        sq.append(a2.pow(2).sum((1, 2)) * g2.pow(2).sum((1, 2)))
                    else:
                        aa = torch.bmm(a2, a2.transpose(1, 2))
                        gg = torch.bmm(g2, g2.transpose(1, 2))
                if aa is not None:
                    sq.append(_frob(aa, gg))
                    rows_sq = (aa.diagonal(0, 1, 2), gg.diagonal(0, 1, 2))
            else:
                per_ex = rule.per_example(m, a_c, g_c, way.product)
                if guarded:
                    rows_sq = rule.explicit_rows_sq(m, a_c, g_c, way.product)
                parts = list(vmap(pullback)(per_ex)) if pullback is not None else [per_ex]
            if s.bias:  # (nb, p): the output gradient summed over positions and views
                parts.append(rule.bias_per_example(m, g_c))
            if way.kept:  # the norms are taken of the stored tensors the sum will read
                if s0 == 0 and e == b:
                    store = parts
                else:
                    if store is None:
                        store = [t.new_empty(b, *t.shape[1:]) for t in parts]
                    for dst, t in zip(store, parts):
                        dst[s0:e] = t
                    parts = [t[s0:e] for t in store]
            sq += [_sq_norms(t) for t in parts]  # ghost ways: the bias's only
            if guarded and rows_sq is not None:
                suspects.append(
                    _suspects(
                        sum(sq),
                        _scale(*rows_sq, s.bias),
                        gram=way.gram,
                        d=s.d,
                        p=s.p,
                        rows=s.rows,
                        amplify=amplify,
                    )
                )
            sq_chunks.append(sq)
        sq_all = [c[0] if len(c) == 1 else torch.cat(c) for c in zip(*sq_chunks)]
        suspect = torch.cat(suspects) if suspects else None
        largest = min(chunk, b) * per_example * a.element_size()
        return sq_all, store, largest, suspect

    def _explicit_parts(self, layer: _Layer, a, g, b: int, k: int, idx: torch.Tensor, pullback):
        """The guard's fallback: explicit per-example gradients of the examples ``idx`` (per
        parameter, in the rule's order), in chunks, from the layer input and output gradient
        the clipped sum's second product keeps."""
        rule, m = layer.rule, layer.module
        s = Sizes(m, g, k)
        product = rule.products[0]
        per_example = s.d * s.p + (a[0].numel() + g[0].numel()) * k  # the gathered rows too
        chunk = max(1, self._chunk_bound(a) // per_example)
        av, gv = _views(a, k), _views(g, k)
        out: list[list[torch.Tensor]] = []
        for s0 in range(0, idx.numel(), chunk):
            sel = idx[s0 : s0 + chunk]
            a_c, g_c = av[:, sel], gv[:, sel]
            per_ex = rule.per_example(m, a_c, g_c, product)
            parts = list(vmap(pullback)(per_ex)) if pullback is not None else [per_ex]
            if s.bias:
                parts.append(rule.bias_per_example(m, g_c))
            out.append(parts)
        return [torch.cat(ts) for ts in zip(*out)]

    def _clipped(self, layer: _Layer, a, g, b: int, k: int, kept, pullback, rescued: dict):
        """sum_i c_i g_i: one product c^T [g_1; ...; g_B] per parameter over the kept
        per-example gradients, or one more weight-gradient product with the output
        gradients scaled by c_i, leaving out the examples the guard rescued (``rescued``:
        their indices and explicit gradients, filled in before the call), whose terms come
        from those gradients."""
        rule, m = layer.rule, layer.module
        if kept is not None:

            def from_kept(c: torch.Tensor) -> list[torch.Tensor]:
                return [c @ t.reshape(b, -1) for t in kept]

            return from_kept
        has_bias = getattr(m, "bias", None) is not None

        def recompute(c: torch.Tensor) -> list[torch.Tensor]:
            idx = rescued.get("idx")
            c_all = c
            if idx is not None:  # exactly zero in the product: their terms are added below
                c = c.index_fill(0, idx, 0.0)
            cr = c.repeat(k)  # view-major rows: row v * B + i is example i's
            # sum_i c_i G_i^T A_i: scale whichever of A and G is smaller (the bias needs G's)
            scale_a = a.numel() < g.numel() and not has_bias
            a_s = a * cr.view(-1, *[1] * (a.dim() - 1)) if scale_a else a
            gs = g if scale_a else g * cr.view(-1, *[1] * (g.dim() - 1))
            w = rule.weight_product(m, a_s, gs)
            out = list(pullback(w)) if pullback is not None else [w]
            if has_bias:
                out.append(rule.bias_sum(m, gs))
            if idx is not None:
                ci = c_all[idx]
                out = [
                    o + (ci @ t.reshape(ci.numel(), -1)).view(o.shape)
                    for o, t in zip(out, rescued["parts"])
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

    # ------------------------------------------------------------------ affine norms

    @staticmethod
    def _norm_layer(layer: _Layer, a: torch.Tensor, g: torch.Tensor, b: int, k: int):
        """Affine parameters of GroupNorm / public BatchNorm: explicit per-example grads,
        one (B, C) tensor per parameter; norms and clipped sum from those tensors."""
        parts = layer.rule.per_example(layer.module, a, g, k)
        sq = [_sq_norms(t) for t in parts]

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
                if layer.rule.matmul:
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
        self._bound = None
        for layer in self.layers:
            layer.a, layer.calls = None, 0
        handles = [layer.module.register_forward_hook(forward_hook(layer)) for layer in self.layers]
        self.sum_dtype = self.params[0].dtype  # the parameters' precision, never lower
        # view-major: row v * B + i is view v of example i (every layer acts per row)
        xin = x.transpose(0, 1).reshape(b * k, *x.shape[2:]).detach().requires_grad_(True)
        try:
            logits = self.model(xin)
        finally:
            for h in handles:
                h.remove()
        logits = logits.view(k, b, -1).transpose(0, 1).reshape(b * k, -1)  # example-major
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

    def _rescue(self, layer_sq: list, guards: list) -> None:
        """The guard's fallback: each layer's suspect examples (``_suspects``) take their
        squared norms from their explicit per-example gradients, which their terms of the
        clipped sum will then come from. One host synchronisation per chunk, to know
        whether there is any (there almost never is); none with ``defer_guard``, where the
        chunk only leaves its flag and the trainer redoes a flagged step synchronously
        (its result, possibly clipped by inexact norms, is never released)."""
        if not guards:
            return
        any_suspect = torch.stack([s for _, s, _ in guards]).any()
        if self.defer_guard:
            self.pending_guard.append(any_suspect)
            return
        if not bool(any_suspect):
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
