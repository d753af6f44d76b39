"""Training: configuration, the DP-SGD loop, checkpoints and the run directory."""

from scalemix.train.config import TrainConfig
from scalemix.train.loop import Trainer, resolve_device, train
from scalemix.train.rundir import RunDir

__all__ = ["RunDir", "TrainConfig", "Trainer", "resolve_device", "train"]
