"""The fast DP engine: book-keeping per-example clipping with mixed ghost norms.

Bu, Mao & Xu 2022 ("Scalable and efficient training of large convolutional neural
networks with differential privacy", arXiv 2205.10683), Li et al. 2021 (ghost norms).

One chunk costs one ordinary forward pass over all B*K views, one backward pass for the
*output* gradients only (no weight-gradient products), and per layer:

* the per-example gradient norm, from whichever is cheaper for the layer's shape
  (T = positions per example, K views included; d = fan-in; p = outputs):
    - ghost:    ||g_i||^2 = sum((A_i A_i^T) * (G_i G_i^T))      cost ~ T^2 (d + p)
    - explicit: g_i = G_i^T A_i, then its norm                    cost ~ T d p
* the clipped sum sum_i c_i g_i: an einsum over the explicit g_i, or one more
  weight-gradient product with the output gradients scaled by c_i (ghost layers).

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
from scalemix.errors import ConfigError, Diverged
from scalemix.models.layers import PublicBatchNorm, WSConv2d


class _Layer:
    """A module that owns trainable parameters, and what one forward pass left of it."""

    def __init__(self, module: nn.Module, kind: str, param_idx: list[int]):
        self.module, self.kind, self.param_idx = module, kind, param_idx
        self.a = self.z = None
        self.mode: str | None = None  # "ghost" | "explicit" for conv / linear

    def capture(self, module, inputs, output):
        if self.z is not None:
            raise ConfigError(
                f"engine 'scalemix' needs each layer to run once per forward pass; "
                f"{type(module).__name__} ran twice (weight sharing): use --engine vmap"
            )
        self.a, self.z = inputs[0].detach(), output


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


class GhostEngine(Engine):
    name = "scalemix"

    def __init__(self, model: nn.Module, clip: float | None):
        super().__init__(model, clip)
        index = {id(p): i for i, p in enumerate(self.params)}
        self.layers: list[_Layer] = []
        for m in model.modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if own:
                self.layers.append(_Layer(m, _kind(m), [index[id(p)] for p in own]))
        covered = sorted(i for layer in self.layers for i in layer.param_idx)
        if covered != list(range(len(self.params))):  # pragma: no cover - defensive
            raise ConfigError("engine 'scalemix' could not attribute every parameter to a layer")

    # ------------------------------------------------------------------ per layer

    @staticmethod
    def _positions(layer: _Layer, b: int, k: int, g: torch.Tensor):
        """(A, G) as (b, K*T, d) and (b, K*T, p): each example's rows, views stacked."""
        m, a = layer.module, layer.a
        if layer.kind == "linear":
            a2 = a.reshape(b, -1, a.shape[-1])
            g2 = g.reshape(b, -1, g.shape[-1])
            return a2, g2
        cols = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # (N, d, T)
        n, d, t = cols.shape
        a2 = cols.view(b, k, d, t).permute(0, 1, 3, 2).reshape(b, k * t, d)
        p = g.shape[1]
        g2 = g.reshape(b, k, p, t).permute(0, 1, 3, 2).reshape(b, k * t, p)
        return a2, g2

    def _matmul_layer(self, layer: _Layer, b: int, k: int, g: torch.Tensor):
        """Per-example squared norms and a function giving the clipped sum, for conv/linear."""
        m = layer.module
        a2, g2 = self._positions(layer, b, k, g)
        rows, d, p = a2.shape[1], a2.shape[2], g2.shape[2]
        if layer.mode is None:
            ghost = rows * rows * (d + p) < rows * d * p and layer.kind != "wsconv"
            layer.mode = "ghost" if ghost else "explicit"
        sq: list[torch.Tensor] = []
        bias_g = g2.sum(1) if getattr(m, "bias", None) is not None else None  # (b, p)
        if layer.mode == "ghost":
            if rows == 1:
                w_sq = a2.pow(2).sum((1, 2)) * g2.pow(2).sum((1, 2))
            else:
                w_sq = (torch.bmm(a2, a2.transpose(1, 2)) * torch.bmm(g2, g2.transpose(1, 2))).sum(
                    (1, 2)
                )
            sq.append(w_sq)
            if bias_g is not None:
                sq.append(bias_g.pow(2).sum(1))

            def clipped(c: torch.Tensor) -> list[torch.Tensor]:
                w = torch.einsum("brp,brd->pd", g2 * c.view(-1, 1, 1), a2).reshape(m.weight.shape)
                out = [w]
                if bias_g is not None:
                    out.append(c @ bias_g)
                return out

            return sq, clipped

        per_ex = torch.bmm(g2.transpose(1, 2), a2)  # (b, p, d): explicit per-example grads
        parts = [per_ex.reshape(b, *m.weight.shape)]
        if layer.kind == "wsconv":
            _, pullback = vjp(m.standardize, *(t.detach() for t in m.ws_params()))
            parts = list(vmap(pullback)(parts[0]))
        if bias_g is not None:
            parts.append(bias_g)
        sq = [t.reshape(b, -1).pow(2).sum(1) for t in parts]

        def clipped(c: torch.Tensor) -> list[torch.Tensor]:
            return [torch.einsum("b,b...->...", c, t) for t in parts]

        return sq, clipped

    @staticmethod
    def _norm_layer(layer: _Layer, b: int, k: int, g: torch.Tensor):
        """Affine parameters of GroupNorm / public BatchNorm: explicit per-example grads."""
        m, a = layer.module, layer.a
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
        for layer in self.layers:
            layer.a = layer.z = None
        handles = [layer.module.register_forward_hook(layer.capture) for layer in self.layers]
        try:
            logits = self.model(x.reshape(b * k, *x.shape[2:]))
        finally:
            for h in handles:
                h.remove()
        loss, correct = view_averaged_loss(logits, y, k)
        total = loss.sum()
        out_grads = torch.autograd.grad(total, [layer.z for layer in self.layers])

        layer_sq = [None] * len(self.params)
        finishers = []
        for layer, g in zip(self.layers, out_grads):
            g = g.detach()
            if layer.kind in ("conv", "wsconv", "linear"):
                sq, fin = self._matmul_layer(layer, b, k, g)
            else:
                sq, fin = self._norm_layer(layer, b, k, g)
            for i, s in zip(layer.param_idx, sq):
                layer_sq[i] = s
            finishers.append((layer, fin))
            layer.a = layer.z = None  # free the activations as we go
        layer_sq_t = torch.stack(layer_sq)  # (P, b)
        norms = layer_sq_t.sum(0).sqrt()
        if not torch.isfinite(norms).all():
            raise Diverged("non-finite per-example gradient")
        c = torch.ones_like(norms) if self.clip is None else clip_factors(norms, self.clip)
        grads: list[torch.Tensor | None] = [None] * len(self.params)
        for layer, fin in finishers:
            for i, t in zip(layer.param_idx, fin(c)):
                grads[i] = t.reshape(self.params[i].shape)
        return ChunkResult(
            grads, loss.detach().sum(), correct.sum(), b, norms.detach(), layer_sq_t.detach()
        )
