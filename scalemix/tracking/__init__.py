"""Experiment tracking: Weights & Biases runs (online, or offline to disk) and reading them back."""

from scalemix.tracking.wandb_run import WandbRun, WandbSettings, wandb_mode

__all__ = ["WandbRun", "WandbSettings", "wandb_mode"]
