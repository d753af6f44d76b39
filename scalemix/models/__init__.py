"""The model family: one builder per architecture, every ablation axis an argument."""

from scalemix.choices import BATCH_COUPLED_NORMS
from scalemix.models.factory import LayerFactory, ModelAxes
from scalemix.models.layers import (
    ResidualBlock,
    Tap,
    has_public_bn,
    refresh_public_stats,
    residual_blocks,
)
from scalemix.models.registry import (
    create_model,
    describe_models,
    get_entry,
    list_models,
    register_model,
    resolve_axes,
)

__all__ = [
    "BATCH_COUPLED_NORMS",
    "LayerFactory",
    "ModelAxes",
    "ResidualBlock",
    "Tap",
    "create_model",
    "describe_models",
    "get_entry",
    "has_public_bn",
    "list_models",
    "refresh_public_stats",
    "register_model",
    "resolve_axes",
    "residual_blocks",
]
