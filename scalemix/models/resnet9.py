"""The reference ResNet-9 of Klause et al. 2022 (arXiv 2203.00324).

conv1 3->64, conv2 64->128 + maxpool, res1 = x + two 128->128 conv blocks (+ ScaleNorm),
conv3 128->256 + maxpool, conv4 256->256 + maxpool, res2 = x + two 256->256 conv blocks
(+ ScaleNorm), AdaptiveMaxPool(2x2), flatten, Linear(1024 -> classes). A conv block is
Conv3x3 (no bias) -> GroupNorm(min(groups, C)) -> activation. About 2.45 M parameters.

With ``placement="preact"`` the residual branches become norm -> act -> conv (the
non-residual layers stay conv -> norm -> act).
"""

from __future__ import annotations

import torch.nn as nn

from scalemix.models.factory import LayerFactory, ModelAxes
from scalemix.models.layers import ResidualBlock


def _residual(f: LayerFactory, ch: int, where: str) -> ResidualBlock:
    if f.axes.placement == "preact":
        branch = nn.Sequential(
            f.conv(ch, ch), f.norm(ch, f"{where}.branch"), f.act(), f.conv(ch, ch)
        )
        pre = f.norm_act(ch, f"{where}.pre")
    else:
        branch = nn.Sequential(
            f.conv_norm_act(ch, ch, where=f"{where}.branch.0"),
            f.conv_norm_act(ch, ch, where=f"{where}.branch.1"),
        )
        pre = None
    return ResidualBlock(branch, pre=pre, post=f.scalenorm(ch, where))


class ResNet9(nn.Sequential):
    """``width`` is conv1's channel count (64 in the paper); the others scale with it."""

    def __init__(
        self, axes: ModelAxes, num_classes: int = 10, in_channels: int = 3, width: int = 64
    ):
        f = LayerFactory(axes)
        w1, w2, w4 = width, 2 * width, 4 * width
        super().__init__()
        self.conv1 = f.conv_norm_act(in_channels, w1, where="conv1")
        self.conv2 = nn.Sequential(f.conv_norm_act(w1, w2, where="conv2"), nn.MaxPool2d(2))
        self.res1 = _residual(f, w2, "res1")
        self.conv3 = nn.Sequential(f.conv_norm_act(w2, w4, where="conv3"), nn.MaxPool2d(2))
        self.conv4 = nn.Sequential(f.conv_norm_act(w4, w4, where="conv4"), nn.MaxPool2d(2))
        self.res2 = _residual(f, w4, "res2")
        self.pool = nn.AdaptiveMaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * w4, num_classes)
