"""The model registry: one-line variants, built by ``create_model(name, **axes)``.

Each entry names its default axes and the axes it fixes (the NF-ResNet is defined by
having no activation norm, so ``--norm group`` on it is refused rather than ignored).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch.nn as nn

from scalemix.errors import ConfigError
from scalemix.models.factory import ModelAxes
from scalemix.models.resnet import ResNet
from scalemix.models.resnet9 import ResNet9


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[..., nn.Module]  # (axes, num_classes, in_channels) -> module
    defaults: ModelAxes
    fixed: dict = field(default_factory=dict)  # axes this model does not let vary
    description: str = ""
    data: str = "cifar10"  # the data set it was designed for


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} is registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; choose one of {', '.join(list_models())} "
            "(see 'scalemix models')"
        ) from None


def resolve_axes(name: str, **overrides) -> ModelAxes:
    """The model's default axes with the user's overrides (``None`` = keep default)."""
    entry = get_entry(name)
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - set(ModelAxes.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown model axes: {', '.join(sorted(unknown))}")
    for k, v in given.items():
        if k in entry.fixed and entry.fixed[k] != v:
            raise ConfigError(
                f"model {name} fixes {k}={entry.fixed[k]!r} (asked for {v!r}); "
                "pick another model to vary this axis"
            )
    return replace(entry.defaults, **given).validate()


def create_model(name: str, *, num_classes: int = 10, in_channels: int = 3, **axes) -> nn.Module:
    """Build a model of the family; ``axes`` are ``ModelAxes`` fields (None = default)."""
    resolved = resolve_axes(name, **axes)
    model = get_entry(name).build(resolved, num_classes=num_classes, in_channels=in_channels)
    model.axes = resolved
    model.arch = name
    return model


# --------------------------------------------------------------------------- the family

register_model(
    ModelEntry(
        "resnet9",
        lambda a, **kw: ResNet9(a, **kw),
        ModelAxes(norm="group", groups=32, scalenorm=True, act="mish"),
        description="reference ResNet-9 of Klause et al. 2022 (~2.45 M params)",
    )
)
register_model(
    ModelEntry(
        "resnet9_small",
        lambda a, **kw: ResNet9(a, width=16, **kw),
        ModelAxes(norm="group", groups=16, scalenorm=True, act="mish"),
        description="ResNet-9 at 1/4 width (~155 k params): CIFAR-10 grids on a laptop CPU",
    )
)
register_model(
    ModelEntry(
        "resnet9_tiny",
        lambda a, **kw: ResNet9(a, width=8, **kw),
        ModelAxes(norm="group", groups=4, scalenorm=True, act="mish"),
        description="ResNet-9 at 1/8 width (~39 k params): CPU smoke tests and privacy audits",
        data="digits",
    )
)
register_model(
    ModelEntry(
        "resnet18",
        lambda a, **kw: ResNet(
            a, depths=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem="imagenet", **kw
        ),
        ModelAxes(norm="group", groups=32, act="relu"),
        description="ResNet-18, ImageNet stem (ImageNette, 160 px)",
        data="imagenette",
    )
)
register_model(
    ModelEntry(
        "resnet50",
        lambda a, **kw: ResNet(
            a,
            depths=(3, 4, 6, 3),
            widths=(256, 512, 1024, 2048),
            bottleneck=True,
            stem="imagenet",
            **kw,
        ),
        ModelAxes(norm="group", groups=32, scalenorm=True, act="relu"),
        description="ResNet-50, GN everywhere + ScaleNorm after every addition (Klause et al.)",
        data="imagenette",
    )
)
for _depth, _blocks in ((16, 2), (40, 6)):
    register_model(
        ModelEntry(
            f"wrn{_depth}_4",
            lambda a, _b=_blocks, **kw: ResNet(
                a, depths=(_b, _b, _b), widths=(64, 128, 256), stem_width=16, **kw
            ),
            ModelAxes(norm="group", groups=16, placement="preact", ws="plain", act="relu"),
            description=f"WRN-{_depth}-4, pre-activation, GN(16) + WS (De et al. 2022)",
        )
    )
register_model(
    ModelEntry(
        "nf_resnet",
        lambda a, **kw: ResNet(
            a, depths=(2, 2, 2), widths=(64, 128, 256), stem_width=16, nf_alpha=0.2, **kw
        ),
        ModelAxes(norm="none", groups=1, placement="preact", ws="scaled", act="relu"),
        fixed={"norm": "none", "ws": "scaled", "placement": "preact", "scalenorm": False},
        description="NF-ResNet (WRN-16-4 layout), scaled WS, alpha=0.2 (Brock et al. 2021)",
    )
)


def describe_models() -> list[dict]:
    """One row per architecture: name, parameters, defaults, fixed axes, what it is."""
    from scalemix.choices import ACTS, NORMS, PLACEMENTS, WS_MODES

    rows = []
    for name in list_models():
        e = _REGISTRY[name]
        free = {
            "norm": NORMS,
            "groups": "1-64 (must divide the channels)",
            "scalenorm": (False, True),
            "placement": PLACEMENTS,
            "ws": WS_MODES,
            "act": ACTS,
        }
        axes = {k: (f"{e.fixed[k]} (fixed)" if k in e.fixed else v) for k, v in free.items()}
        rows.append(
            {
                "name": name,
                "description": e.description,
                "data": e.data,
                "defaults": e.defaults.as_dict(),
                "axes": axes,
            }
        )
    return rows
