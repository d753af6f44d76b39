"""Scale-mixing diagnostics: residual-branch hooks and signal-propagation plots."""

from scalemix.diagnostics.hooks import METRICS, BlockProbe, block_stats
from scalemix.diagnostics.spp import signal_propagation

__all__ = ["METRICS", "BlockProbe", "block_stats", "signal_propagation"]
