"""The ablation axes of a model as one frozen value, and the layers they produce.

Every architecture takes a ``ModelAxes`` and builds its layers only through
``LayerFactory``, so that one flag means the same thing in every model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn as nn

from scalemix.choices import ACTS, NORMS, PLACEMENTS, WS_MODES
from scalemix.errors import ConfigError
from scalemix.models.layers import make_act, make_conv, make_norm


@dataclass(frozen=True)
class ModelAxes:
    """The ablation axes shared by the model family."""

    norm: str = "group"  # group | layer | instance | none | public_batch | batch
    groups: int = 32  # GroupNorm groups (min(groups, C) per layer); 1..64
    scalenorm: bool = False  # extra norm right after every residual addition
    placement: str = "standard"  # standard: conv->norm->act; preact: norm->act->conv
    ws: str = "none"  # weight standardisation: none | plain | scaled
    act: str = "relu"  # relu | mish | silu

    def validate(self) -> ModelAxes:
        for value, allowed, flag in (
            (self.norm, NORMS, "--norm"),
            (self.placement, PLACEMENTS, "--placement"),
            (self.ws, WS_MODES, "--ws"),
            (self.act, ACTS, "--act"),
        ):
            if value not in allowed:
                raise ConfigError(f"{flag} {value!r} is not one of: {', '.join(allowed)}")
        if not 1 <= self.groups <= 64:
            raise ConfigError(f"--groups must be between 1 and 64, got {self.groups}")
        if self.scalenorm and self.norm == "none":
            raise ConfigError("--scalenorm needs a norm; with --norm none use --no-scalenorm")
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    def short(self) -> str:
        """A compact label, e.g. 'GN32+ScaleNorm standard mish'."""
        names = {
            "group": f"GN{self.groups}",
            "layer": "LN",
            "instance": "IN",
            "none": "no-norm",
            "public_batch": "publicBN",
            "batch": "BN",
        }
        label = names.get(self.norm, self.norm) + ("+ScaleNorm" if self.scalenorm else "")
        ws = "" if self.ws == "none" else f" WS-{self.ws}"
        return f"{label} {self.placement}{ws} {self.act}"


class LayerFactory:
    """Makes convs, norms and activations according to the axes."""

    def __init__(self, axes: ModelAxes):
        self.axes = axes.validate()
        # Without any activation normalisation, scaled WS needs variance-preserving
        # activations (NF-ResNet); elsewhere the activation is plain.
        self.scaled_act = axes.norm == "none" and axes.ws == "scaled"

    def conv(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Module:
        return make_conv(cin, cout, kernel, stride, ws=self.axes.ws)

    def norm(self, channels: int, where: str = "") -> nn.Module:
        return make_norm(self.axes.norm, channels, self.axes.groups, where)

    def act(self) -> nn.Module:
        return make_act(self.axes.act, scaled=self.scaled_act)

    def conv_norm_act(
        self,
        cin: int,
        cout: int,
        kernel: int = 3,
        stride: int = 1,
        where: str = "",
        act: bool = True,
    ) -> nn.Sequential:
        """conv -> norm -> act: the standard conv block (placement does not apply)."""
        layers = [self.conv(cin, cout, kernel, stride), self.norm(cout, where)]
        if act:
            layers.append(self.act())
        return nn.Sequential(*layers)

    def norm_act(self, channels: int, where: str = "") -> nn.Sequential:
        return nn.Sequential(self.norm(channels, where), self.act())

    def scalenorm(self, channels: int, where: str = "") -> nn.Module | None:
        if not self.axes.scalenorm:
            return None
        return make_norm(self.axes.norm, channels, self.axes.groups, where + " (ScaleNorm)")
