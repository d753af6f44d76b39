"""Non-private engine: one ordinary forward/backward pass over all B*K views.

Returns the sum over examples of the (view-averaged) per-example gradients, unclipped,
so the trainer's loop is the same as under DP. The only engine that accepts layers that
couple examples (plain BatchNorm).
"""

from __future__ import annotations

import torch

from scalemix.engine.base import ChunkResult, Engine, view_averaged_loss


class NonPrivateEngine(Engine):
    name = "nonprivate"
    private = False

    def __init__(self, model, clip: float | None = None):
        super().__init__(model, None)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> ChunkResult:
        b, k = x.shape[:2]
        if b == 0:
            return self.zero_result(x.device)
        logits = self.model(x.reshape(b * k, *x.shape[2:]))
        loss, correct = view_averaged_loss(logits, y, k)
        total = loss.sum()
        grads = torch.autograd.grad(total, self.params)
        return ChunkResult(list(grads), total.detach(), correct.sum(), b)
