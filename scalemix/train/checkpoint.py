"""What a checkpoint holds, listed once: ``save`` and ``load`` both read ``PARTS``.

A checkpoint is the state at the start of the next step: the model, the optimiser, the
schedule, the EMA, the privacy ledger, the random streams' *committed* state (draw
counters and public generator states, never a key: privacy/randomness.py), the step
counters, the audit's canary set and observations, and the last evaluation. In a
data-parallel run one file, written by rank 0, holds every rank's streams (``rng_ranks``),
so a checkpoint is all ranks or none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from scalemix import __version__
from scalemix.errors import ConfigError
from scalemix.train.rundir import save_atomic

if TYPE_CHECKING:
    from scalemix.train.loop import Trainer


@dataclass(frozen=True)
class Part:
    """One thing a checkpoint holds: how to take it from the trainer and give it back."""

    key: str
    save: Callable[[Trainer], Any]
    load: Callable[[Trainer, Any], None] | None  # None: written for readers, not restored


def _set(attr: str) -> Callable[[Trainer, Any], None]:
    return lambda tr, v: setattr(tr, attr, v)


def _load_if(obj: str) -> Callable[[Trainer, Any], None]:
    """Restore ``tr.<obj>`` from its state dict when both exist."""

    def load(tr: Trainer, v) -> None:
        target = getattr(tr, obj)
        if target is not None and v is not None:
            target.load_state_dict(v)

    return load


def _load_canaries(tr: Trainer, v) -> None:
    if tr.canaries is not None and v is not None:
        tr.canaries.load_state_dict(v, tr.step)


PARTS: tuple[Part, ...] = (
    Part("step", lambda tr: tr.step, _set("step")),
    Part("config", lambda tr: tr.cfg.as_dict(), None),  # compared on --resume (config.json)
    Part("model", lambda tr: tr.model.state_dict(), lambda tr, v: tr.model.load_state_dict(v)),
    Part("optimizer", lambda tr: tr.optimizer.state_dict(), _load_if("optimizer")),
    Part("schedule", lambda tr: tr.schedule.state_dict(), _load_if("schedule")),
    Part("ema", lambda tr: tr.ema.state_dict() if tr.ema else None, _load_if("ema")),
    Part("ledger", lambda tr: tr.ledger.state_dict() if tr.ledger else None, _load_if("ledger")),
    Part("train_seconds", lambda tr: tr.train_seconds, _set("train_seconds")),
    Part("images_seen", lambda tr: tr.images_seen, _set("images_seen")),
    Part("abandoned_steps", lambda tr: tr.abandoned_steps, _set("abandoned_steps")),
    # after "step": the canaries' observations are cut at the step the checkpoint holds
    Part(
        "audit",
        lambda tr: tr.canaries.state_dict() if tr.canaries is not None else None,
        _load_canaries,
    ),
    Part("last_eval", lambda tr: tr.last_eval, lambda tr, v: _set("last_eval")(tr, v or {})),
    Part("version", lambda tr: __version__, None),
)
# The random streams' committed state (``Trainer.committed_rng``: "rng", and "sampler" for
# a non-Poisson sampler) is spread into the checkpoint beside PARTS; a data-parallel run
# adds every rank's under "rng_ranks".


def save(tr: Trainer) -> None:
    """Write the checkpoint atomically (rank 0; every rank takes part in the gather)."""
    state = {p.key: p.save(tr) for p in PARTS}
    state.update(tr.committed_rng)
    if tr.world.distributed:
        state["rng_ranks"] = tr.world.gather_object(tr.committed_rng)
        if tr.world.rank > 0:
            return
    save_atomic(state, tr.run_dir.checkpoint)


def read(path, device: torch.device) -> dict | None:
    """The checkpoint at ``path``, or None when there is none."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {path}: {e}") from None


def load(tr: Trainer, state: dict, path) -> None:
    """Restore every part (this rank's own streams from ``rng_ranks``)."""
    ranks = state.get("rng_ranks")
    written_by = len(ranks) if ranks else 1
    if written_by != tr.world.size:
        raise ConfigError(
            f"--resume: {path} was written by {written_by} rank(s); "
            f"resume with the same --nproc ({written_by})"
        )
    if ranks:
        state.update(ranks[tr.world.rank])
    for p in PARTS:
        if p.load is not None and p.key in state:
            p.load(tr, state[p.key])
    tr.rng.load_state_dict(state["rng"])
    if "sampler" in state:
        tr.sampler.load_state_dict(state["sampler"])
    tr.committed_rng = tr.rng_state()
    tr.resumed_from = tr.step
