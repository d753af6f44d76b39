"""Canaries inside a normal training run, for a one-run privacy audit.

``--audit-canaries M`` adds M canaries to the run, each *included* independently with
probability 1/2 (the coins come from the run's own ``canary`` stream). Included canaries
are examples like any other: the Poisson sampler draws each of them with probability q at
every step, their gradients are clipped to C by the engine's clip rule, and the step's one
Gaussian noise draw covers them. Nothing about them is a side path of the mechanism.

- ``gradient`` (white box, Nasr et al. 2023): canary c is a Dirac gradient 2C e_c on a
  coordinate of its own; clipping makes it C e_c. The coordinates form an *audit vector*
  of M entries beside the model's parameters that no real example's gradient touches
  (the worst case of the DP-SGD proof: a gradient orthogonal to everything else), and
  the step's one noise draw covers it like every parameter. The auditor observes every
  step's noisy sum on it (what DP-SGD releases) and scores each canary by the
  log-likelihood ratio of "in". The model itself is untouched: only the noise draw is
  M numbers longer.
- ``input`` (black box): M examples taken out of the training split, each relabelled with
  a random wrong class, appended to the training data when included; scored after
  training by the final model's loss on them. The run's files hold no image or label of
  them: ``audit/canaries.npz`` keeps their indices in the data set and the label shifts
  (functions of the secret canary stream alone), and ``scalemix audit`` re-reads the
  images from the data set.

The sampler draws a uniform for every canary at every step, included or not, so the
"would-have-been-drawn" steps of excluded canaries exist too: the *known batches*
auditor (the adversary of a run whose sampler is not secret) uses them.

Everything the audit needs is stored in ``audit/canaries.npz``; ``scalemix audit``
recomputes the bounds from it (and, for input canaries, from ``model.pt`` and the data
set). A checkpoint holds the whole canary set (coins, picks, shifts), so a resumed run --
secure mode included, whose streams restart under a new key -- scores its observations
against the coins they were made with.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from scalemix.choices import CANARY_KINDS
from scalemix.engine.base import clip_factors
from scalemix.errors import ConfigError

FILE = "audit/canaries.npz"


class Canaries:
    """The canary set of one run and what the run recorded about it."""

    def __init__(
        self,
        kind: str,
        member: torch.Tensor,
        *,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        source_index: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        data_index: torch.Tensor | None = None,
    ):
        if kind not in CANARY_KINDS:
            raise ConfigError(f"--canary-kind {kind!r} is not one of: {', '.join(CANARY_KINDS)}")
        self.kind, self.member = kind, member.bool().cpu()
        self.m = len(self.member)
        # input canaries: images and wrong labels (memory only), their index among the
        # run's private examples and in the data set's training split, the label shifts
        self.x, self.y, self.source_index = x, y, source_index
        self.shift, self.data_index = shift, data_index
        self.draws: list[torch.Tensor] = []  # per step (gradient): bool (m,) drawn
        self.steps = 0  # steps recorded
        self.obs: list[torch.Tensor] = []  # per step (gradient): the noisy audit vector

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(cls, kind: str, m: int, stream, *, data=None) -> Canaries:
        """Draw the coins (and the input examples) from the run's ``canary`` stream.

        ``data = (train_x, train_y, num_classes, data_index)`` for input canaries, where
        ``data_index[i]`` is private example i's index in the data set's training split."""
        if m < 2:
            raise ConfigError(f"--audit-canaries needs at least 2 canaries, got {m}")
        member = stream.uniform(m) < 0.5
        if kind == "gradient":
            return cls(kind, member)
        train_x, train_y, num_classes, data_index = data
        n = len(train_y)
        if m > n // 4:
            raise ConfigError(
                f"--audit-canaries {m} input canaries would take more than a quarter of the "
                f"{n} training examples; use fewer, or --canary-kind gradient"
            )
        pick = torch.topk(stream.uniform(n), m, largest=False).indices.sort().values
        shift = 1 + (stream.uniform(m) * (num_classes - 1)).long().clamp(max=num_classes - 2)
        return cls.restore(
            {"kind": kind, "member": member, "source_index": pick, "shift": shift},
            data=(train_x, train_y, num_classes, data_index),
        )

    @classmethod
    def restore(cls, state: dict, *, data=None) -> Canaries:
        """The canary set a checkpoint holds (``set_state``), with the input canaries'
        images re-read from ``data`` (as in ``create``)."""
        kind, member = state["kind"], torch.as_tensor(state["member"]).bool()
        if kind == "gradient":
            return cls(kind, member)
        train_x, train_y, num_classes, data_index = data
        pick = torch.as_tensor(state["source_index"]).long()
        shift = torch.as_tensor(state["shift"]).long()
        wrong = (train_y[pick].cpu() + shift) % num_classes  # never the true class
        return cls(
            kind,
            member,
            x=train_x[pick].cpu(),
            y=wrong,
            source_index=pick,
            shift=shift,
            data_index=torch.as_tensor(data_index)[pick],
        )

    def set_state(self) -> dict:
        """What the canary set is (coins; for input canaries the picks and label shifts):
        no image, no label. A checkpoint holds it so that a resume keeps the coins."""
        state = {"kind": self.kind, "member": self.member}
        if self.kind == "input":
            state.update(source_index=self.source_index, shift=self.shift)
        return state

    # ------------------------------------------------------------------ during training

    def split(self, idx: torch.Tensor, n_real: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """From the sampler's draw over n_real + m examples: the examples the engine sees
        (real ones, plus included input canaries) and the included gradient canaries drawn
        (None for input canaries, which are ordinary examples)."""
        drawn = torch.zeros(self.m, dtype=torch.bool)
        is_canary = idx >= n_real
        drawn[(idx[is_canary] - n_real).cpu()] = True
        self._step_draws = drawn
        included = drawn & self.member
        if self.kind == "input":
            keep = ~is_canary | self.member.to(idx.device)[(idx - n_real).clamp(min=0)]
            return idx[keep], None
        return idx[~is_canary], included

    def audit_vector(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A fresh clipped-sum entry for the audit coordinates (zeros: no real gradient)."""
        return torch.zeros(self.m, device=device, dtype=dtype)

    def add_gradients(self, vector: torch.Tensor, included: torch.Tensor, clip: float) -> None:
        """Add each drawn, included canary's clipped Dirac gradient to the clipped sum."""
        dev, dt = vector.device, vector.dtype  # made on the run's device, not copied there
        raw = torch.full((self.m,), 2.0 * clip, device=dev, dtype=dt)  # each norm >= C
        clipped = raw * clip_factors(raw, clip)  # the engine's clip rule: C (1 - m)
        vector.add_(clipped * included.to(dev, dt))

    def observe(self, noisy_vector: torch.Tensor) -> torch.Tensor:
        """The noisy sum on the audit vector (what a white-box auditor sees), kept on its
        device: it reaches the host with the checkpoint or the final file, not every step."""
        return noisy_vector.detach().float()

    def record(self, observed: torch.Tensor | None) -> None:
        """Called in the step's commit block: one row of draws (and observations) for
        gradient canaries. Input canaries are private training examples: which batches drew
        them is never kept (it would undo their amplification by sampling); only the count."""
        self.steps += 1
        if self.kind == "gradient":
            self.draws.append(self._step_draws)
        if observed is not None:
            self.obs.append(observed)

    # ------------------------------------------------------------------ state and file

    def state_dict(self) -> dict:
        return {
            "set": self.set_state(),
            "steps": self.steps,
            "draws": torch.stack(self.draws) if self.draws else None,
            "obs": torch.stack(self.obs).cpu() if self.obs else None,
        }

    def load_state_dict(self, state: dict, steps: int) -> None:
        self.steps = steps
        draws = state.get("draws") if self.kind == "gradient" else None
        self.draws = list(draws[:steps]) if draws is not None else []
        self.obs = list(state["obs"][:steps]) if state.get("obs") is not None else []

    def save(self, root: Path, **meta) -> Path:
        path = Path(root) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "kind": np.array(self.kind),
            "member": self.member.numpy(),
            "steps_observed": np.array(self.steps),
        }
        if self.kind == "gradient":
            arrays["draws"] = (
                torch.stack(self.draws).numpy() if self.draws else np.zeros((0, self.m), bool)
            )
            arrays["obs"] = (
                torch.stack(self.obs).cpu().numpy()
                if self.obs
                else np.zeros((0, self.m), np.float32)
            )
        else:  # no image and no label of a private example: indices and shifts only
            arrays["data_index"] = self.data_index.numpy()
            arrays["shift"] = self.shift.numpy()
        for k, v in meta.items():
            arrays[k] = np.array(v)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
        return path


def load(root: str | Path) -> dict:
    """The stored canary file as a dict of numpy arrays (scalars unwrapped)."""
    path = Path(root) / FILE
    if not path.is_file():
        raise ConfigError(
            f"{root} has no {FILE}: it was not trained with --audit-canaries M; "
            "train with canaries to audit it"
        )
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    for k, v in list(out.items()):
        if v.ndim == 0:
            out[k] = v.item()
    return out


def llr_secret_sampler(obs: np.ndarray, q: float, signal: float, noise_std: float) -> np.ndarray:
    """Per-canary log-likelihood ratio of "in" against "out", summed over steps, when the
    auditor does not know the batches: each step is N(signal, s^2) with probability q
    (drawn) or N(0, s^2) (not drawn) if in, N(0, s^2) if out."""
    s2 = max(noise_std, 1e-6 * signal) ** 2
    z = (obs * signal - signal * signal / 2) / s2
    per_step = np.logaddexp(math.log1p(-q), math.log(q) + z) if q < 1 else z
    return per_step.sum(axis=0)


def llr_known_batches(obs: np.ndarray, draws: np.ndarray, signal: float, noise_std: float):
    """The same ratio when the auditor knows at which steps each canary was (or would have
    been) drawn: only those steps carry the signal."""
    s2 = max(noise_std, 1e-6 * signal) ** 2
    z = (obs * signal - signal * signal / 2) / s2
    return np.where(draws, z, 0.0).sum(axis=0)
