"""The fast DP engine: book-keeping per-example clipping with mixed ghost norms.

Bu, Mao & Xu 2022 ("Scalable and efficient training of large convolutional neural
networks with differential privacy", arXiv 2205.10683), Li et al. 2021 (ghost norms).

One chunk costs one ordinary forward pass over all B*K views, one backward pass for the
*output* gradients only (no weight-gradient products), and per layer:

* the per-example gradient norm, from whichever is cheaper for the layer's shape
  (T = positions per example, K views included; d = fan-in; p = outputs):
    - ghost:    ||g_i||^2 = sum((A_i A_i^T) * (G_i G_i^T))      cost ~ T^2 (d + p)
    - explicit: g_i = G_i^T A_i, then its norm                    cost ~ T d p
* the clipped sum sum_i c_i g_i: one more weight-gradient product with the output
  gradients scaled by c_i, or an einsum over the explicit g_i where keeping those takes
  less memory than keeping the layer's input and output gradient.

Norms are computed inside the backward pass (a tensor hook on each layer's output), in
chunks of examples, so that output gradients and unfolded activations are freed as the
backward pass goes, as in a non-private backward.

The K views of an example are one example: their positions are stacked (K*T rows) so
the norm is taken of the gradient of the view-averaged loss, and the sensitivity stays
C. Weight-standardised convolutions take the explicit path and map the per-example
gradient of the standardised weight back to (weight, gain) with a batched vjp.
GroupNorm / LayerNorm / InstanceNorm (GroupNorm modules) and public-statistics BatchNorm
affine parameters are handled explicitly (their per-example gradients are tiny).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import vjp, vmap

from scalemix.engine.base import ChunkResult, Engine, clip_factors, view_averaged_loss
from scalemix.errors import ConfigError
from scalemix.models.layers import PublicBatchNorm, WSConv2d


class _Layer:
    """A module that owns trainable parameters, and what one forward pass left of it."""

    def __init__(self, module: nn.Module, kind: str, param_idx: list[int]):
        self.module, self.kind, self.param_idx = module, kind, param_idx
        self.a: torch.Tensor | None = None
        self.mode: str | None = None  # "ghost" | "explicit" for conv / linear
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
    return kind


def _part_order(m: nn.Module, kind: str) -> list[nn.Parameter]:
    """The parameters in the order the per-layer rules return their gradients: the
    standardised weight's inputs first (weight, and gain for scaled WS), then the bias.
    Matched to the model's parameters by identity, never by registration order."""
    if kind in ("gn", "pbn"):
        return [m.weight, m.bias]
    first = list(m.ws_params()) if kind == "wsconv" else [m.weight]
    return first + ([m.bias] if getattr(m, "bias", None) is not None else [])


CHUNK_FLOATS = 2**23  # bound on one chunk's unfolded activations (32 MB in float32)


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

    def _matmul_layer(self, layer: _Layer, a: torch.Tensor, g: torch.Tensor, b: int, k: int):
        """Per-example squared norms of conv / linear parameters, and the clipped-sum finisher."""
        m = layer.module
        has_bias = getattr(m, "bias", None) is not None
        n = a.shape[0]
        d, p = m.weight[0].numel(), m.weight.shape[0]
        rows = g[0].numel() // p * k  # positions per example, its K views stacked
        if layer.mode is None:
            ghost = rows * rows * (d + p) < rows * d * p and layer.kind != "wsconv"
            layer.mode = "ghost" if ghost else "explicit"
        pullback = None
        if layer.kind == "wsconv":
            _, pullback = vjp(m.standardize, *(t.detach() for t in m.ws_params()))
        per_example_numel = (d * p + (p if has_bias else 0)) * b
        keep_parts = layer.mode == "explicit" and per_example_numel <= a.numel() + g.numel()
        chunk = max(1, CHUNK_FLOATS // max(1, rows * max(d, p)))
        sq_chunks: list[list[torch.Tensor]] = []
        part_chunks: list[list[torch.Tensor]] = []
        for s in range(0, b, chunk):
            e = min(b, s + chunk)
            a2, g2 = self._positions(layer, a[s * k : e * k], g[s * k : e * k], e - s, k)
            sq: list[torch.Tensor] = []
            if layer.mode == "ghost":
                if rows == 1:
                    sq.append(a2.pow(2).sum((1, 2)) * g2.pow(2).sum((1, 2)))
                else:
                    aa = torch.bmm(a2, a2.transpose(1, 2))
                    sq.append((aa * torch.bmm(g2, g2.transpose(1, 2))).sum((1, 2)))
                parts = []
            else:
                per_ex = torch.bmm(g2.transpose(1, 2), a2).reshape(e - s, *m.weight.shape)
                parts = list(vmap(pullback)(per_ex)) if pullback is not None else [per_ex]
                sq += [t.reshape(e - s, -1).pow(2).sum(1) for t in parts]
            if has_bias:
                bias_g = g2.sum(1)
                sq.append(bias_g.pow(2).sum(1))
                parts = parts + [bias_g]
            sq_chunks.append(sq)
            if keep_parts:
                part_chunks.append(parts)
        sq_all = [torch.cat(c) for c in zip(*sq_chunks)]

        if keep_parts:
            kept = [torch.cat(c) for c in zip(*part_chunks)]

            def clipped(c: torch.Tensor) -> list[torch.Tensor]:
                return [torch.einsum("b,b...->...", c, t) for t in kept]

            return sq_all, clipped

        def clipped(c: torch.Tensor) -> list[torch.Tensor]:
            """One weight-gradient product with per-example scaled output gradients."""
            cr = c.repeat_interleave(n // b).view(-1, *[1] * (g.dim() - 1))
            gs = g * cr
            if layer.kind == "linear":
                w = torch.einsum("...p,...d->pd", gs, a)
            else:
                w = torch.nn.grad.conv2d_weight(
                    a, m.weight.shape, gs, m.stride, m.padding, m.dilation, m.groups
                )
            out = list(pullback(w)) if pullback is not None else [w]
            if has_bias:
                per_out = (
                    gs.reshape(-1, p)
                    if layer.kind == "linear"
                    else gs.transpose(0, 1).reshape(p, -1).T
                )
                out.append(per_out.sum(0))
            return out

        return sq_all, clipped

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

        return sq, clipped

    # ------------------------------------------------------------------ one chunk

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> ChunkResult:
        b, k = x.shape[:2]
        if b == 0:
            return self.zero_result(x.device)
        layer_sq: list[torch.Tensor | None] = [None] * len(self.params)
        finishers = []

        def on_grad(layer: _Layer, g: torch.Tensor) -> None:
            # under bf16 autocast: norms, clip factors and the clipped sum in fp32
            a, g = layer.a.to(self.sum_dtype), g.detach().to(self.sum_dtype)
            layer.a = None  # from here on only what the clipped sum needs is kept
            with torch.autocast(a.device.type, enabled=False):
                if layer.kind in ("conv", "wsconv", "linear"):
                    sq, fin = self._matmul_layer(layer, a, g, b, k)
                else:
                    sq, fin = self._norm_layer(layer, a, g, b, k)
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
        with torch.autocast(x.device.type, enabled=False):
            return self._finish(layer_sq, finishers, loss, correct, b)

    def _finish(self, layer_sq, finishers, loss, correct, b) -> ChunkResult:
        """Norms, clip factors and the clipped sum, in the parameters' precision."""
        layer_sq_t = torch.stack(layer_sq)  # (P, b)
        norms = layer_sq_t.sum(0).sqrt()
        c = torch.ones_like(norms) if self.clip is None else clip_factors(norms, self.clip)
        grads: list[torch.Tensor | None] = [None] * len(self.params)
        for layer, fin in finishers:
            for i, t in zip(layer.param_idx, fin(c)):
                grads[i] = t.reshape(self.params[i].shape)
        return ChunkResult(
            grads, loss.detach().sum(), correct.sum(), b, norms.detach(), layer_sq_t.detach()
        )
