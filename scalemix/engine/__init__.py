"""Gradient engines: per-example clipped gradient sums for one physical chunk."""

from scalemix.choices import DP_ENGINES
from scalemix.engine.base import ChunkResult, Engine, clip_factors
from scalemix.engine.ghost import GhostEngine
from scalemix.engine.nonprivate import NonPrivateEngine
from scalemix.engine.vmap import VmapEngine
from scalemix.errors import ConfigError

ENGINES = {"scalemix": GhostEngine, "vmap": VmapEngine, "nonprivate": NonPrivateEngine}


def make_engine(name: str, model, clip: float | None) -> Engine:
    try:
        return ENGINES[name](model, clip)
    except KeyError:
        raise ConfigError(
            f"unknown engine {name!r}; choose one of {', '.join(DP_ENGINES)}"
        ) from None


__all__ = [
    "DP_ENGINES",
    "ENGINES",
    "ChunkResult",
    "Engine",
    "NonPrivateEngine",
    "VmapEngine",
    "clip_factors",
    "make_engine",
]
