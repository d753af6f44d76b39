"""Training: configuration, the DP-SGD loop, EMA, optimisers and the run directory.

Attributes load lazily, so that ``scalemix.train.config`` (and the command line's help)
does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "scalemix.train.config",
    "Trainer": "scalemix.train.loop",
    "resolve_device": "scalemix.train.loop",
    "train": "scalemix.train.loop",
    "RunDir": "scalemix.train.rundir",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'scalemix.train' has no attribute {name!r}")
