"""Ablation grids: TOML grid files expanded into hashed cells, run resumably in parallel."""

from scalemix.ablate.grid import Cell, Grid, available_grids, cell_hash, load_grid
from scalemix.ablate.runner import ablate
from scalemix.ablate.store import GridDir

__all__ = ["Cell", "Grid", "GridDir", "ablate", "available_grids", "cell_hash", "load_grid"]
