"""Batch samplers and the noise source, each with a state that a checkpoint restores.

- ``PoissonSampler``: every example joins a step's batch independently with probability
  ``q`` (realised batch sizes vary; empty batches happen). The only sampler allowed
  under DP, because it is what the accountants analyse.
- ``ShuffleSampler``: fixed-size batches from a reshuffled permutation, for non-private
  baselines only.
- ``NoiseSource``: Gaussian noise, either ``seeded`` (reproducible research; every output
  says so) or ``secure`` (a fresh seed from the OS entropy pool, ``os.urandom``, for every
  draw; not reproducible; floating-point side channels as in Mironov 2012 are not
  mitigated).
"""

from __future__ import annotations

import os

import torch

SAMPLERS = ("poisson", "shuffle")
NOISE_MODES = ("seeded", "secure")


def _entropy_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


class PoissonSampler:
    kind = "poisson"

    def __init__(self, n: int, sample_rate: float, seed: int | None):
        self.n, self.q = n, sample_rate
        self.gen = torch.Generator().manual_seed(_entropy_seed() if seed is None else seed)

    def next(self) -> torch.Tensor:
        mask = torch.rand(self.n, generator=self.gen) < self.q
        return torch.nonzero(mask).flatten()

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


class ShuffleSampler:
    kind = "shuffle"

    def __init__(self, n: int, batch_size: int, seed: int | None):
        self.n, self.b = n, batch_size
        self.gen = torch.Generator().manual_seed(_entropy_seed() if seed is None else seed)
        self.perm = torch.randperm(n, generator=self.gen)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.b > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos : self.pos + self.b]
        self.pos += self.b
        return idx

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.perm, self.pos = state["perm"], state["pos"]


class NoiseSource:
    def __init__(self, mode: str, seed: int | None, device: torch.device):
        if mode not in NOISE_MODES:
            raise ValueError(f"noise mode must be one of {NOISE_MODES}, got {mode!r}")
        self.mode, self.device = mode, torch.device(device)
        self.gen = torch.Generator(device=self.device)
        if mode == "seeded":
            if seed is None:
                raise ValueError("seeded noise needs a seed")
            self.gen.manual_seed(seed)

    @property
    def label(self) -> str:
        return (
            "seeded (reproducible; for research, not for deployment)"
            if self.mode == "seeded"
            else "secure (OS entropy, not reproducible)"
        )

    def gaussian_like(self, t: torch.Tensor, std: float) -> torch.Tensor:
        if self.mode == "secure":
            self.gen.manual_seed(_entropy_seed())
        return torch.randn(t.shape, generator=self.gen, device=t.device, dtype=t.dtype) * std

    def state_dict(self) -> dict:
        return {"mode": self.mode, "gen": self.gen.get_state() if self.mode == "seeded" else None}

    def load_state_dict(self, state: dict) -> None:
        if self.mode == "seeded" and state.get("gen") is not None:
            self.gen.set_state(state["gen"])
