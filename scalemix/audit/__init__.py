"""Empirical privacy auditing in one training run: canaries, scores and epsilon lower bounds.

``bounds``: Steinke et al. 2023 and Mahloujifar et al. 2024 one-run bounds with explicit
threshold strategies; ``canaries``: gradient (white-box) and input (black-box) canaries
inside a normal run; ``audit``: scores per adversary, both bounds, and the alarm.
"""

from __future__ import annotations

import torch

from scalemix.audit.audit import audit as run_audit
from scalemix.audit.audit import summary_fields, write
from scalemix.audit.canaries import Canaries
from scalemix.audit.canaries import load as load_canaries
from scalemix.choices import CANARY_KINDS


@torch.no_grad()
def input_canary_scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Black-box scores: minus the final model's loss on each (mislabelled) canary."""
    model.eval()
    out = []
    for i in range(0, len(y), 500):
        logits = model(x[i : i + 500])
        out.append(-torch.nn.functional.cross_entropy(logits, y[i : i + 500], reduction="none"))
    return torch.cat(out).double().cpu().numpy()


__all__ = [
    "CANARY_KINDS",
    "Canaries",
    "input_canary_scores",
    "load_canaries",
    "run_audit",
    "summary_fields",
    "write",
]
