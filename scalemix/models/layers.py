"""Building blocks shared by every architecture: each ablation axis is one argument.

- Normalisation (``make_norm``): GroupNorm with a group count (Wu & He 2018), LayerNorm
  and InstanceNorm as its 1-group and C-group cases, none, BatchNorm with statistics from
  a fixed public batch (Davody et al. 2020, arXiv 2006.10919), and plain BatchNorm for
  non-private baselines only.
- Weight standardisation (``make_conv``): plain WS (Qiao et al. 2019, as in BiT and
  De et al. 2022) and scaled WS (Brock et al. 2021, arXiv 2101.08692).
- Activations (``make_act``): relu, mish, silu, optionally multiplied by the gain that
  keeps unit variance on N(0, 1) input (the NF-ResNet gamma).
- ``ResidualBlock``: ``out = post(shortcut(x_s) + alpha * branch(x_b))`` with four
  ``Tap`` modules, so that forward hooks find the skip input, the branch output, the sum
  and the post-normalised output of every block in the same way (Klause et al. 2022,
  arXiv 2203.00324, for ScaleNorm = a norm right after the addition).
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from scalemix.choices import ACTS, NORMS, WS_MODES
from scalemix.errors import ConfigError

# --------------------------------------------------------------------------- norms


class PublicBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose statistics come from a fixed batch of public data only.

    Davody et al. (2020) keep BatchNorm under DP by normalising with statistics that no
    private example influences. Here the statistics are buffers (``public_mean``,
    ``public_var``) that ``refresh_public_stats`` recomputes from the public batch, with
    the current weights, before every step; private examples are then normalised with
    these constants, so each example's output (and gradient) is independent of the
    others. The statistics are treated as constants in the gradient (the public path's
    own gradient is not used). No running statistics are kept.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps, affine=True, track_running_stats=False)
        self.register_buffer("public_mean", torch.zeros(num_features))
        self.register_buffer("public_var", torch.ones(num_features))
        self.capturing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.capturing:
            self.public_mean.copy_(x.mean(dim=(0, 2, 3)))
            self.public_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
        return F.batch_norm(
            x, self.public_mean, self.public_var, self.weight, self.bias, False, 0.0, self.eps
        )


@torch.no_grad()
def refresh_public_stats(model: nn.Module, public_x: torch.Tensor) -> None:
    """Recompute every ``PublicBatchNorm``'s statistics from the public batch."""
    layers = [m for m in model.modules() if isinstance(m, PublicBatchNorm)]
    if not layers:
        return
    for m in layers:
        m.capturing = True
    try:
        model(public_x)
    finally:
        for m in layers:
            m.capturing = False


def has_public_bn(model: nn.Module) -> bool:
    return any(isinstance(m, PublicBatchNorm) for m in model.modules())


def group_count(groups: int, channels: int, where: str = "") -> int:
    """The group count used for ``channels`` channels: ``min(groups, channels)``.

    A count that does not divide the channels is an error (GroupNorm would refuse it
    deep inside the forward pass; we say which layer and what to use).
    """
    if groups < 1:
        raise ConfigError(f"--groups must be at least 1, got {groups}")
    g = min(groups, channels)
    if channels % g:
        divisors = [d for d in (1, 2, 4, 8, 16, 32, 64) if channels % d == 0]
        raise ConfigError(
            f"--groups {groups} does not divide the {channels} channels of {where or 'a layer'}; "
            f"use one of {divisors}"
        )
    return g


def _bf16_autocast(device_type: str) -> bool:
    try:
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: one flag and dtype per device kind
        cpu = device_type == "cpu"
        enabled = torch.is_autocast_cpu_enabled() if cpu else torch.is_autocast_enabled()
        dtype = torch.get_autocast_cpu_dtype() if cpu else torch.get_autocast_gpu_dtype()
    return enabled and dtype == torch.bfloat16


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that stays in bf16 under bf16 autocast (``--precision bf16``).

    Autocast runs GroupNorm in fp32, so every normalised activation (and the activation
    function after it) would be stored in fp32 between two bf16 convolutions. Here the
    input, gamma and beta are cast to bf16 and torch's GroupNorm kernel accumulates the
    statistics in fp32 and writes bf16: the activations flowing between layers, and
    those the backward pass and the DP engine keep, are bf16. The parameters stay fp32
    (the master weights); outside bf16 autocast this is ``nn.GroupNorm``. The DP engine
    takes every per-example gradient, norm and clipped sum in fp32 (engine/base.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if not _bf16_autocast(dev):
            return super().forward(x)
        bf16 = torch.bfloat16
        w = None if self.weight is None else self.weight.to(bf16)
        b = None if self.bias is None else self.bias.to(bf16)
        with torch.autocast(dev, enabled=False):
            return F.group_norm(x.to(bf16), self.num_groups, w, b, self.eps)


def make_norm(kind: str, channels: int, groups: int = 32, where: str = "") -> nn.Module:
    """One normalisation layer over ``channels`` channels (NCHW input)."""
    if kind == "group":
        return GroupNorm(group_count(groups, channels, where), channels)
    if kind == "layer":  # normalise over (C, H, W) per example
        return GroupNorm(1, channels)
    if kind == "instance":  # normalise over (H, W) per example and channel, affine
        return GroupNorm(channels, channels)
    if kind == "none":
        return nn.Identity()
    if kind == "public_batch":
        return PublicBatchNorm(channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ConfigError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")


# --------------------------------------------------------------------------- activations

_ACT_FNS = {"relu": F.relu, "mish": F.mish, "silu": F.silu}


@cache
def act_gain(name: str) -> float:
    """gamma with Var(gamma * g(z)) = 1 for z ~ N(0, 1), by quadrature (Brock et al. 2021).

    For relu this is sqrt(2 / (1 - 1/pi)) ~= 1.7129.
    """
    z = torch.linspace(-12.0, 12.0, 200_001, dtype=torch.float64, device="cpu")
    w = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    g = _ACT_FNS[name](z)
    mean = (w * g).sum()
    var = (w * g * g).sum() - mean**2
    return float(1.0 / var.sqrt())


class Act(nn.Module):
    def __init__(self, name: str, gain: float = 1.0):
        super().__init__()
        if name not in _ACT_FNS:
            raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(ACTS)}")
        self.name, self.gain, self.fn = name, gain, _ACT_FNS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fn(x)
        return y * self.gain if self.gain != 1.0 else y

    def extra_repr(self) -> str:
        return f"{self.name}, gain={self.gain:.4f}"


def make_act(name: str, scaled: bool = False) -> Act:
    if name not in _ACT_FNS:
        raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(ACTS)}")
    return Act(name, act_gain(name) if scaled else 1.0)


# --------------------------------------------------------------------------- convolutions


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardisation.

    plain:  W_hat = (W - mean) / sqrt(var + eps)                (Qiao et al.; BiT)
    scaled: W_hat = gain * (W - mean) / sqrt(var * fan_in + eps) (Brock et al. 2021)
    Statistics are over each output filter (in_channels x kh x kw), population variance.
    """

    def __init__(self, *args, mode: str = "plain", eps: float = 1e-5, **kw):
        super().__init__(*args, **kw)
        self.mode, self.eps = mode, eps
        self.fan_in = self.weight[0].numel()
        if mode == "scaled":
            self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def ws_params(self) -> tuple[torch.Tensor, ...]:
        """The parameters the standardised weight is a function of."""
        return (self.weight, self.gain) if self.mode == "scaled" else (self.weight,)

    def standardize(self, w: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        """The standardised weight as a pure function of (weight, gain)."""
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        if self.mode == "scaled":
            return gain * (w - mean) / torch.sqrt(var * self.fan_in + self.eps)
        return (w - mean) / torch.sqrt(var + self.eps)

    def standardized_weight(self) -> torch.Tensor:
        return self.standardize(*self.ws_params())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ws={self.mode}"


def make_conv(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, ws: str = "none", bias: bool = False
) -> nn.Conv2d:
    if ws not in WS_MODES:
        raise ConfigError(
            f"unknown weight standardisation {ws!r}; choose one of {', '.join(WS_MODES)}"
        )
    kw = dict(kernel_size=kernel, stride=stride, padding=kernel // 2, bias=bias)
    if ws == "none":
        return nn.Conv2d(cin, cout, **kw)
    return WSConv2d(cin, cout, mode=ws, **kw)


# --------------------------------------------------------------------------- block pieces


class Tap(nn.Identity):
    """An identity that marks a tensor for forward hooks (skip, branch, sum, out)."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def extra_repr(self) -> str:
        return self.role


class ResidualBlock(nn.Module):
    """``out = post(shortcut(x_s) + alpha * branch(pre(x / beta)))``.

    ``pre`` is the pre-activation (norm -> act) shared by the branch and, when the
    shortcut is a projection, by the shortcut too (He et al. 2016 v2; Brock et al. feed
    ``x / beta`` to the projection of NF transition blocks). An identity shortcut always
    reads the raw input ``x``. ``post`` is ScaleNorm and/or the activation after the
    addition, or nothing.

    Taps: ``tap_skip`` (skip input to the sum), ``tap_branch`` (branch output, after
    alpha), ``tap_sum`` (the sum), ``tap_out`` (the block's output).
    """

    is_residual_block = True

    def __init__(
        self,
        branch: nn.Module,
        shortcut: nn.Module | None = None,
        pre: nn.Module | None = None,
        post: nn.Module | None = None,
        alpha: float = 1.0,
        beta: float = 1.0,
    ):
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.projection = shortcut is not None
        self.pre = pre if pre is not None else nn.Identity()
        self.post = post if post is not None else nn.Identity()
        self.alpha, self.beta = alpha, beta
        self.tap_skip, self.tap_branch = Tap("skip"), Tap("branch")
        self.tap_sum, self.tap_out = Tap("sum"), Tap("out")

    @property
    def has_scalenorm(self) -> bool:
        return any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in self.post.modules())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x / self.beta if self.beta != 1.0 else x
        h = self.pre(h)
        s = self.tap_skip(self.shortcut(h) if self.projection else x)
        r = self.branch(h)
        if self.alpha != 1.0:
            r = r * self.alpha
        r = self.tap_branch(r)
        y = self.tap_sum(s + r)
        return self.tap_out(self.post(y))


def residual_blocks(model: nn.Module) -> list[tuple[str, ResidualBlock]]:
    """Every residual block of a model, in forward order, with its qualified name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ResidualBlock)]
