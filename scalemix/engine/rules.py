"""One rule per layer kind: what the fast engine does with a module that owns parameters.

A registry from module type to a small rule object, as Opacus's ``grad_sample``
registry (a type registered twice is refused; a module is looked up along its class's
MRO, so ``WSConv2d`` finds its own rule before ``nn.Conv2d``'s, and a module with no rule
is refused with the way out). A rule knows its layer's parameters in the order it returns
their per-example gradients, what it refuses, and the per-example work:

* ``AffineNormRule`` (GroupNorm, which also serves LayerNorm and InstanceNorm, and
  public-statistics BatchNorm): per-example gradients of the affine parameters (tiny);
* ``LinearRule``, ``ConvRule``, ``WSConvRule``: a weight applied at positions, for ghost
  norms (``positions``, ``ConvRule.shifted_gram``), explicit per-example gradients
  (``per_example``) and the clipped sum's second product (``weight_product``).

The batch layout (ghost.py): the fast engine runs the forward pass view-major, row
``v * B + i`` holding view v of example i, so a layer's input and output gradient are
(K, B, ...) views, and a chunk of examples ``[:, s:e]`` of them is a view too. Every
per-example tensor here stacks an example's rows view by view (K*T rows).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import vjp

from scalemix.engine.ways import GROUPED, MATMUL
from scalemix.errors import ConfigError
from scalemix.models.layers import PublicBatchNorm, WSConv2d

RULES: dict[type[nn.Module], Rule] = {}


def register(*types: type[nn.Module]):
    """Class decorator: one instance of the rule serves every module of ``types``."""

    def deco(cls):
        for t in types:
            if t in RULES:
                raise ValueError(f"a per-example rule for {t.__name__} is registered already")
        rule = cls()
        RULES.update(dict.fromkeys(types, rule))
        return cls

    return deco


def rule_for(m: nn.Module) -> Rule:
    """The rule of ``m``'s class (or nearest registered base class), after its checks."""
    for t in type(m).__mro__:
        if t in RULES:
            rule = RULES[t]
            rule.check(m)
            return rule
    raise ConfigError(
        f"engine 'scalemix' has no per-example rule for {type(m).__name__}; use --engine vmap"
    )


class Rule:
    name = "?"  # short name, for plan keys and messages
    matmul = False  # a weight applied at positions (ghost or explicit ways)

    def check(self, m: nn.Module) -> None:
        """Refuse a module this rule cannot treat exactly (ConfigError naming the way out)."""

    def params(self, m: nn.Module) -> list[nn.Parameter]:
        """The parameters in the order the rule returns their per-example gradients."""
        raise NotImplementedError


# ---------------------------------------------------------------------- affine norms


@register(nn.GroupNorm)
class AffineNormRule(Rule):
    """GroupNorm's (and LayerNorm's, InstanceNorm's) affine parameters: gamma_i =
    sum over positions and views of g * xhat, beta_i = sum of g, per example."""

    name = "gn"

    def params(self, m):
        return [m.weight, m.bias]  # the module's own order

    def normalized(self, m, a: torch.Tensor) -> torch.Tensor:
        return F.group_norm(a, m.num_groups, eps=m.eps)

    def per_example(self, m, a: torch.Tensor, g: torch.Tensor, k: int) -> list[torch.Tensor]:
        """(B, C) per-example gradients of weight and bias, from view-major (K B, C, ...)."""
        if type(self) is AffineNormRule and a.dtype == g.dtype:
            return self._fused(m, a, g, k)
        xhat = self.normalized(m, a)
        dims = tuple(range(2, a.dim()))
        c = a.shape[1]
        gamma = (g * xhat).sum(dims).view(k, -1, c).sum(0)
        beta = g.sum(dims).view(k, -1, c).sum(0)
        return [gamma, beta]

    @staticmethod
    def _fused(m, a: torch.Tensor, g: torch.Tensor, k: int) -> list[torch.Tensor]:
        """GroupNorm's two sums from torch's own GroupNorm backward kernel, half the memory
        passes of normalising a copy and multiplying it: the N rows are folded into one
        sample of N C channels and N G groups, so each (row, group) keeps its own
        statistics, and the kernel's gamma and beta sums over "the batch" (of one) are the
        per-row, per-channel sums. Only gamma and beta are asked for, so the weight passed
        (ones) is never read into a result. The kernel forms gamma as (sum g x - mean sum
        g) rstd, which loses digits where a group's mean dwarfs its spread (as the
        normalise-and-multiply way does, less so); the clip bound does not depend on it:
        norm and clipped sum come from these same per-example tensors."""
        n, c = a.shape[:2]
        hw = a[0, 0].numel()
        groups = n * m.num_groups
        x = a.reshape(1, n * c, hw)
        _, mean, rstd = torch.native_group_norm(x, None, None, 1, n * c, hw, groups, m.eps)
        ones = torch.ones(n * c, dtype=a.dtype, device=a.device)
        _, gamma, beta = torch.ops.aten.native_group_norm_backward(
            g.reshape(1, n * c, hw), x, mean, rstd, ones, 1, n * c, hw, groups, [False, True, True]
        )
        return [gamma.view(k, -1, c).sum(0), beta.view(k, -1, c).sum(0)]


@register(PublicBatchNorm)
class PublicBatchNormRule(AffineNormRule):
    """BatchNorm normalised by statistics of public data only: no example couples another."""

    name = "pbn"

    def normalized(self, m, a):
        shape = (1, -1, 1, 1)
        return (a - m.public_mean.view(shape)) / torch.sqrt(m.public_var.view(shape) + m.eps)


# ---------------------------------------------------------------------- weights at positions


class Sizes:
    """A weight layer's sizes for one call: fan-in d, outputs p, rows = K T per example."""

    __slots__ = ("d", "p", "rows", "bias")

    def __init__(self, m: nn.Module, g: torch.Tensor, k: int):
        self.d, self.p = m.weight[0].numel(), m.weight.shape[0]
        self.rows = g[0].numel() // self.p * k
        self.bias = getattr(m, "bias", None) is not None


@register(nn.Linear)
class LinearRule(Rule):
    """A linear layer: its positions are the rows of its input (beyond the batch axis)."""

    name = "linear"
    matmul = True
    products: tuple[str, ...] = (MATMUL,)  # explicit ways; the first is the default
    ghost = True  # ghost norms allowed

    def params(self, m):
        return [m.weight] + ([m.bias] if m.bias is not None else [])

    def pullback(self, m):
        """The vjp from the applied weight's gradient to the parameters' (None: identity)."""
        return None

    def geometry(self, m) -> str:
        return "linear"

    def costs(self, m, a: torch.Tensor, g: torch.Tensor, k: int) -> dict:
        """Per-example multiply-adds of each way to the norm (K views stacked), and whether
        the ghost way takes the input's Gram matrix by shifts (``ConvRule.shifted_gram``)."""
        s = Sizes(m, g, k)
        return {
            "ghost": s.rows * s.rows * (s.d + s.p),
            "explicit": s.rows * s.d * s.p,
            "shifted": False,
        }

    def positions(self, m, a_c: torch.Tensor, g_c: torch.Tensor):
        """(A, G) as (nb, K*T, d) and (nb, K*T, p) from the (K, nb, ...) views of a chunk."""
        nb = a_c.shape[1]
        return (
            a_c.movedim(0, 1).reshape(nb, -1, a_c.shape[-1]),
            g_c.movedim(0, 1).reshape(nb, -1, g_c.shape[-1]),
        )

    def per_example(self, m, a_c, g_c, product: str) -> torch.Tensor:
        """(nb, p, d): each example's weight gradient, its K views summed."""
        a2, g2 = self.positions(m, a_c, g_c)
        return torch.bmm(g2.transpose(1, 2), a2)

    def explicit_rows_sq(self, m, a_c, g_c, product: str):
        """(nb, K*T) squared norms of each position's input and output gradient (the guard's
        per-position scale, in the row order of ``positions``)."""
        a2, g2 = self.positions(m, a_c, g_c)
        return a2.pow(2).sum(2), g2.pow(2).sum(2)

    def bias_per_example(self, m, g_c: torch.Tensor) -> torch.Tensor:
        """(nb, p): the output gradient summed over views and positions."""
        return g_c.movedim(0, 1).reshape(g_c.shape[1], -1, g_c.shape[-1]).sum(1)

    def weight_product(self, m, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """sum over every row of g^T a: the weight gradient of the whole (scaled) batch."""
        return torch.einsum("...p,...d->pd", g, a)

    def bias_sum(self, m, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(-1, g.shape[-1]).sum(0)


@register(nn.Conv2d)
class ConvRule(LinearRule):
    """An ungrouped 2-d convolution with numeric zero padding."""

    name = "conv"
    products = (GROUPED, MATMUL)

    def check(self, m):
        if m.groups != 1:
            raise ConfigError(
                "engine 'scalemix' supports ungrouped convolutions only; use --engine vmap"
            )
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ConfigError(
                f"engine 'scalemix' supports numeric zero padding only (this convolution has "
                f"padding={m.padding!r}, padding_mode={m.padding_mode!r}); use --engine vmap"
            )

    def geometry(self, m) -> str:
        return f"stride {m.stride} padding {m.padding} dilation {m.dilation}"

    def costs(self, m, a, g, k):
        out = super().costs(m, a, g, k)
        s = Sizes(m, g, k)
        kh, kw = m.kernel_size
        positions = k * a.shape[2] * a.shape[3]
        shifted = positions * positions * a.shape[1] + s.rows * s.rows * kh * kw
        if shifted < s.rows * s.rows * s.d:
            out["ghost"], out["shifted"] = shifted + s.rows * s.rows * s.p, True
        return out

    def positions(self, m, a_c, g_c):
        k, nb = a_c.shape[:2]
        cols = F.unfold(
            a_c.reshape(k * nb, *a_c.shape[2:]), m.kernel_size, m.dilation, m.padding, m.stride
        )
        d, t = cols.shape[1:]
        p = g_c.shape[2]
        a2 = cols.view(k, nb, d, t).permute(1, 0, 3, 2).reshape(nb, k * t, d)
        g2 = g_c.reshape(k, nb, p, t).permute(1, 0, 3, 2).reshape(nb, k * t, p)
        return a2, g2

    def per_example(self, m, a_c, g_c, product):
        """(nb, *weight.shape). GROUPED: one weight-gradient convolution with the examples as
        groups and the views as its batch, on views of the chunk (no copy, no unfold);
        MATMUL: the unfold and a batched product."""
        k, nb = a_c.shape[:2]
        if product == MATMUL:
            return super().per_example(m, a_c, g_c, product).view(nb, *m.weight.shape)
        x = a_c.reshape(k, nb * a_c.shape[2], *a_c.shape[3:])
        gy = g_c.reshape(k, nb * g_c.shape[2], *g_c.shape[3:])
        w = torch.nn.grad.conv2d_weight(
            x,
            (nb * m.weight.shape[0], *m.weight.shape[1:]),
            gy,
            m.stride,
            m.padding,
            m.dilation,
            groups=nb,
        )
        return w.view(nb, *m.weight.shape)

    def explicit_rows_sq(self, m, a_c, g_c, product):
        if product == MATMUL:
            return super().explicit_rows_sq(m, a_c, g_c, product)
        # without the unfold: each patch's sum of squares is the channels' sum of squares
        # summed over the kernel's window (zero padding reads zeros), a convolution with ones
        k, nb = a_c.shape[:2]
        x2 = a_c.pow(2).sum(2).reshape(k * nb, 1, *a_c.shape[3:])
        ones = x2.new_ones(1, 1, *m.kernel_size)
        row_a = F.conv2d(x2, ones, None, m.stride, m.padding, m.dilation)
        row_g = g_c.pow(2).sum(2)
        return _by_example(row_a.view(k, nb, -1)), _by_example(row_g.reshape(k, nb, -1))

    def bias_per_example(self, m, g_c):
        return g_c.sum((0, 3, 4))

    def weight_product(self, m, a, g):
        return torch.nn.grad.conv2d_weight(
            a, m.weight.shape, g, m.stride, m.padding, m.dilation, m.groups
        )

    def bias_sum(self, m, g):
        return g.transpose(0, 1).reshape(g.shape[1], -1).T.sum(0)

    @staticmethod
    def shifted_gram(m, x: torch.Tensor, out_hw) -> torch.Tensor:
        """Each example's Gram matrix of its unfolded input, (nb, K*T, K*T), from the
        (K, nb, C, H, W) views of a chunk, without the unfold: a patch is C channels at
        kh*kw shifted positions, so
        (A A^T)[t, t'] = sum over kernel offsets o of X^T X [t*stride + o - pad, t'*stride + o - pad],
        where a position in the padding contributes zero: the Gram matrix of the input's
        positions (C per entry), and for each offset its strided block of the positions
        that offset reads inside the input, added into the block of the output positions
        that read them. (K H W)^2 C + (K T)^2 kh kw multiply-adds instead of (K T)^2 C kh kw.
        """
        (ph, pw), (kh, kw) = m.padding, m.kernel_size
        (sh, sw), (dh, dw) = m.stride, m.dilation
        ho, wo = out_hw
        k, nb, c, h, w = x.shape
        xs = x.permute(1, 2, 0, 3, 4).reshape(nb, c, k * h * w)
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

    @staticmethod
    def output_rows(g_c: torch.Tensor) -> torch.Tensor:
        """(nb, p, K*T): a chunk's output gradient per example, positions view by view."""
        k, nb, p = g_c.shape[:3]
        return g_c.reshape(k, nb, p, -1).permute(1, 2, 0, 3).reshape(nb, p, -1)


@register(WSConv2d)
class WSConvRule(ConvRule):
    """A weight-standardised convolution: explicit per-example gradients of the
    standardised weight, mapped back to (weight, gain) by the standardisation's vjp."""

    name = "wsconv"
    ghost = False  # the pullback needs the explicit gradient

    def params(self, m):
        return list(m.ws_params()) + ([m.bias] if m.bias is not None else [])

    def pullback(self, m):
        _, pull = vjp(m.standardize, *(t.detach() for t in m.ws_params()))
        return pull

    @staticmethod
    def pullback_bound(m) -> float:
        """An upper bound on the operator norm of weight standardisation's pullback, which
        maps the error of a second product's weight gradient into the parameters'. Per
        filter o, the weight's part is (scale_o) times a projection (norm <= 1), scale_o =
        1 / sqrt(var_o + eps) (plain) or gain_o / sqrt(fan_in var_o + eps) (scaled), and the
        gain's is the inner product with (w_o - mean_o) / sqrt(fan_in var_o + eps)."""
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


def _by_example(t: torch.Tensor) -> torch.Tensor:
    """(K, nb, T) -> (nb, K*T): an example's positions view by view."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)
