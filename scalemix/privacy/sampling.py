"""Batch samplers and the noise source, each driven by a stream of ``RunRandomness``.

- ``PoissonSampler``: every example joins a step's batch independently with probability
  ``q`` (realised batch sizes vary; empty batches happen). The only sampler allowed
  under DP, because it is what the accountants analyse. Its uniforms come from the
  secret ``sampler`` stream (one draw per step, one uniform per example).
- ``ShuffleSampler``: fixed-size batches from a reshuffled permutation, for non-private
  baselines only (a torch generator from the public seed).
- ``NoiseSource``: Gaussian noise from the secret ``noise`` stream, one draw per step for
  all parameters together.

The modes and who holds which key: ``scalemix/privacy/randomness.py``.
"""

from __future__ import annotations

import torch

from scalemix.choices import NOISE_MODES, SAMPLERS
from scalemix.privacy.randomness import SecretStream

__all__ = ["NOISE_MODES", "SAMPLERS", "NoiseSource", "PoissonSampler", "ShuffleSampler"]


class PoissonSampler:
    kind = "poisson"

    def __init__(self, n: int, sample_rate: float, stream: SecretStream):
        self.n, self.q, self.stream = n, sample_rate, stream

    def next(self) -> torch.Tensor:
        mask = self.stream.uniform(self.n) < self.q
        return torch.nonzero(mask).flatten()

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


class ShuffleSampler:
    kind = "shuffle"

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.b = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
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
    """N(0, std^2) for every coordinate of a list of tensors, from one secret draw."""

    def __init__(self, stream: SecretStream):
        self.stream = stream

    def add_(self, tensors: list[torch.Tensor], std: float) -> None:
        """Add independent N(0, std^2) noise to every element of ``tensors`` in place.

        One draw, read piece by piece: the working memory is one piece and one tensor's
        noise, not a copy of the whole model in float64."""
        if not tensors:
            return
        total = sum(t.numel() for t in tensors)
        pieces = self.stream.normal_blocks(total, tensors[0].device, tensors[0].dtype)
        buf: torch.Tensor | None = None  # the current piece, what is left of it
        for t in tensors:
            need, parts = t.numel(), []
            while need:
                if buf is None or not len(buf):
                    buf = next(pieces)
                take = min(need, len(buf))
                parts.append(buf[:take])
                buf, need = buf[take:], need - take
            if parts:
                z = parts[0] if len(parts) == 1 else torch.cat(parts)
                t.add_(z.view_as(t).to(t.dtype), alpha=std)
