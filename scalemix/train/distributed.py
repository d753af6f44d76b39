"""Data-parallel DP-SGD on torch.distributed (gloo on CPU, NCCL on GPUs).

``torchrun --nproc-per-node N -m scalemix train ...`` (or ``scalemix train --nproc N``,
which launches exactly that) runs N ranks of one training run:

* Data: rank r owns the examples r, r + N, r + 2N, ... and samples them by Poisson with
  the run's q from its own secret stream. The union of N independent Poisson samples of
  disjoint shards is a Poisson sample of the whole set with the same q, so the
  accountant's assumption and the ε are unchanged.
* Clipping: each rank runs the same engine on its own examples; its clipped sum is a sum
  of per-example gradients of norm <= C.
* Noise, added exactly once in total, in shares: each rank adds N(0, σ²C²/N) to its own
  clipped sum *before* the one all-reduce; the reduced sum carries N(0, σ²C²) per
  coordinate. Shares (rather than one rank adding all of it) mean that no rank ever holds
  the un-noised total. They do not protect against a curious rank: a ring all-reduce
  shows each rank partial sums, and a neighbour's single share carries noise of variance
  σ²C²/N only. The reported ε holds against everyone who reads the run's outputs, not
  against a rank (docs/sharp-edges.md, item 16).
* Each rank's sampler and noise streams are derived from the run key under their own
  names (rank 0 keeps the single-process names, so one rank is the single-process run).
* Rank 0 writes the run directory and the one checkpoint, which holds every rank's
  stream counters (gathered at each checkpoint), so a checkpoint is all ranks or none;
  on --resume each rank takes its own counters from it. Rank r > 0 keeps its logs under
  ``ranks/<r>/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from scalemix.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, device: torch.device) -> World:
        """The world torchrun describes in the environment (one rank when it does not)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def shard(self, n: int) -> torch.Tensor:
        """The global indices of this rank's examples."""
        return torch.arange(self.rank, n, self.size)

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place, with one collective."""
        if not self.distributed:
            return
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        self.all_reduce_([t])
        return bool(t.item() > 0)

    def agree(self, value: int, what: str, device: torch.device) -> None:
        """Refuse to go on unless every rank holds the same ``value``."""
        if not self.distributed:
            return
        import torch.distributed as dist

        both = torch.tensor([float(value), -float(value)], device=device)
        dist.all_reduce(both, op=dist.ReduceOp.MIN)  # (smallest, -largest) in one call
        lo, hi = both[0].item(), -both[1].item()
        if lo != hi:
            raise ConfigError(
                f"the ranks disagree on {what} ({lo:g} to {hi:g}): a rank's "
                "checkpoint is older than the others'; start the run again without --resume"
            )


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command that runs ``scalemix train`` (argv without --nproc) on nproc ranks."""
    import sys

    if nproc < 2:
        raise ConfigError(f"--nproc {nproc}: give 2 or more ranks (1 is a plain run)")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "scalemix",
        "train",
        *argv,
    ]
