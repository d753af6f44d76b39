"""Staged residual networks: ResNet-18/50 (He et al. 2016), WRN-16-4 / WRN-40-4
(Zagoruyko & Komodakis 2016, in the DP recipe of De et al. 2022, arXiv 2204.13650) and
the NF-ResNet (Brock et al. 2021, arXiv 2101.08692).

One builder serves all of them; the architecture differs only in stem, block type,
depths and widths, and the ablation axes come from ``ModelAxes``.

Block layouts (``f`` = the layer factory of the axes):
- standard basic:       conv3x3 -> norm -> act -> conv3x3 -> norm; projection = conv1x1 -> norm;
                        after the addition: [ScaleNorm] -> act.
- pre-activation basic: pre = norm -> act; conv3x3 -> norm -> act -> conv3x3; projection =
                        conv1x1 of the pre-activated input; after the addition: [ScaleNorm].
- bottleneck: the same with conv1x1 -> conv3x3 -> conv1x1 (x4 expansion).
- NF (norm none, scaled WS, pre-activation): ``x + alpha * f(x / beta)`` with
  beta_i = sqrt(expected variance of the block's input): the variance grows by alpha^2 per
  block and resets to 1 + alpha^2 after each transition block, whose projection reads
  ``x / beta``.
"""

from __future__ import annotations

import math

import torch.nn as nn

from scalemix.models.factory import LayerFactory, ModelAxes
from scalemix.models.layers import ResidualBlock


def _branch(f: LayerFactory, cin: int, cout: int, stride: int, bottleneck: bool, where: str):
    preact = f.axes.placement == "preact"
    if bottleneck:
        mid = cout // 4
        convs = [(cin, mid, 1, 1), (mid, mid, 3, stride), (mid, cout, 1, 1)]
    else:
        convs = [(cin, cout, 3, stride), (cout, cout, 3, 1)]
    layers: list[nn.Module] = []
    for i, (a, b, k, s) in enumerate(convs):
        last = i == len(convs) - 1
        layers.append(f.conv(a, b, k, s))
        if preact and not last:
            layers += [f.norm(b, f"{where}.branch.{i}"), f.act()]
        elif not preact:
            layers.append(f.norm(b, f"{where}.branch.{i}"))
            if not last:
                layers.append(f.act())
    return nn.Sequential(*layers)


def _block(
    f: LayerFactory,
    cin: int,
    cout: int,
    stride: int,
    bottleneck: bool,
    where: str,
    alpha: float = 1.0,
    beta: float = 1.0,
    force_projection: bool = False,
) -> ResidualBlock:
    preact = f.axes.placement == "preact"
    shortcut = None
    if stride != 1 or cin != cout or force_projection:
        shortcut = f.conv(cin, cout, 1, stride)
        if not preact:
            shortcut = nn.Sequential(shortcut, f.norm(cout, f"{where}.shortcut"))
    pre = f.norm_act(cin, f"{where}.pre") if preact else None
    post_layers = [m for m in (f.scalenorm(cout, where),) if m is not None]
    if not preact:
        post_layers.append(f.act())
    post = nn.Sequential(*post_layers) if post_layers else None
    return ResidualBlock(
        _branch(f, cin, cout, stride, bottleneck, where),
        shortcut=shortcut,
        pre=pre,
        post=post,
        alpha=alpha,
        beta=beta,
    )


class ResNet(nn.Module):
    """A staged ResNet: stem, stages of residual blocks, head.

    ``nf_alpha`` turns on the NF-ResNet signal-propagation scaling (requires
    ``norm="none"``, ``ws="scaled"``, ``placement="preact"``).
    """

    def __init__(
        self,
        axes: ModelAxes,
        *,
        depths: tuple[int, ...],
        widths: tuple[int, ...],
        bottleneck: bool = False,
        stem: str = "cifar",
        stem_width: int = 64,
        num_classes: int = 10,
        in_channels: int = 3,
        nf_alpha: float | None = None,
    ):
        super().__init__()
        f = LayerFactory(axes)
        preact = axes.placement == "preact"
        if stem == "imagenet":
            self.stem = nn.Sequential(
                f.conv(in_channels, stem_width, 7, 2),
                *(() if preact else (f.norm(stem_width, "stem"), f.act())),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = (
                f.conv(in_channels, stem_width, 3, 1)
                if preact
                else f.conv_norm_act(in_channels, stem_width, where="stem")
            )
        stages: list[nn.Module] = []
        cin = stem_width
        expected_var = 1.0  # NF: expected variance of the signal entering the block
        for s, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for i in range(depth):
                where = f"stages.{s}.{i}"
                stride = 2 if (i == 0 and s > 0) else 1
                if nf_alpha is not None:
                    beta = math.sqrt(expected_var)
                    transition = i == 0
                    blocks.append(
                        _block(f, cin, width, stride, bottleneck, where, nf_alpha, beta, transition)
                    )
                    # A transition block's shortcut sees x / beta (variance 1).
                    expected_var = (1.0 if transition else expected_var) + nf_alpha**2
                else:
                    blocks.append(_block(f, cin, width, stride, bottleneck, where))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        head: list[nn.Module] = []
        if preact:
            head += [f.norm(cin, "head"), f.act()]
        self.head = nn.Sequential(*head, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.head(self.stages(self.stem(x))))
