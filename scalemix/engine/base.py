"""The interface every gradient engine implements.

An engine takes one physical chunk of a logical batch, ``x`` of shape (B, K, C, H, W)
(K augmented views per example) and labels ``y`` (B,), and returns the **sum over
examples** of each example's clipped gradient, where an example's gradient is the
gradient of its loss averaged over its K views (so one example's sensitivity stays C,
DESIGN.md sharp edge 3). Noise and the division by the expected batch size happen once
per logical batch, in the trainer, never in an engine.

Engines: ``vmap`` (torch.func per-example gradients; the reference) and ``nonprivate``
(one ordinary backward pass, no clipping).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class ChunkResult:
    grads: list[torch.Tensor]  # per trainable parameter: sum over examples of clipped grads
    loss_sum: torch.Tensor  # scalar: sum over examples of the per-example (view-averaged) loss
    correct: torch.Tensor  # scalar: views classified correctly / K, summed over examples
    n: int  # examples in the chunk
    norms: torch.Tensor | None = None  # (B,) per-example gradient norms before clipping
    layer_norms_sq: torch.Tensor | None = None  # (P, B) squared per-example norm per parameter


class Engine:
    """Base class: holds the model and the list of trainable parameters."""

    name = "base"
    private = True
    hooks_see_batch = True  # module forward hooks see the whole chunk as one plain tensor

    def __init__(self, model: nn.Module, clip: float | None):
        self.model = model
        self.clip = clip
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]

    def zero_result(self, device: torch.device) -> ChunkResult:
        z = torch.zeros((), device=device)
        return ChunkResult(
            [torch.zeros_like(p) for p in self.params],
            z,
            z.clone(),
            0,
            torch.zeros(0, device=device),
            torch.zeros(len(self.params), 0, device=device),
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> ChunkResult:
        raise NotImplementedError


def clip_factors(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """min(1, C / ||g||): the factor that scales each per-example gradient to norm <= C."""
    return (clip / (norms + 1e-6)).clamp(max=1.0)


def view_averaged_loss(
    logits: torch.Tensor, y: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example loss averaged over its K views, and correct views / K, from (B*K, classes)."""
    b = y.shape[0]
    yk = y.repeat_interleave(k)
    loss = nn.functional.cross_entropy(logits, yk, reduction="none").view(b, k).mean(1)
    correct = (logits.argmax(1) == yk).float().view(b, k).mean(1)
    return loss, correct
