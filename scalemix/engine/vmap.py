"""Reference DP engine: per-example gradients with torch.func (``vmap`` over ``grad``).

For each example the model runs on its K views as a batch of K, the loss is averaged
over the views, and ``grad`` gives that example's gradient; ``vmap`` does this for all
examples at once. Norms are taken over all parameters, each gradient is scaled by
``base.clip_factors`` (min(1, C (1 - m) / norm), m a rounding margin), and the scaled
gradients are summed; norms and sum come from the same stored gradients, with TF32 off
(``base.full_fp32_products``). Clear and obviously correct;
it materialises B x (number of parameters) floats, so the trainer bounds B by
``--physical-batch``.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from scalemix.engine.base import ChunkResult, Engine, clip_factors, full_fp32_products


class VmapEngine(Engine):
    name = "vmap"
    hooks_see_batch = False  # forward hooks run on per-example BatchedTensors under vmap

    def __init__(self, model, clip: float | None):
        super().__init__(model, clip)

        def loss_one(params: dict, buffers: dict, xk: torch.Tensor, yk: torch.Tensor):
            logits = functional_call(self.model, (params, buffers), (xk,))
            target = yk.expand(xk.shape[0])
            loss = torch.nn.functional.cross_entropy(logits, target)  # mean over the K views
            correct = (logits.argmax(1) == target).float().mean()
            return loss, (loss.detach(), correct)

        self._per_example = vmap(grad(loss_one, has_aux=True), in_dims=(None, None, 0, 0))

    def per_example_grads(self, x: torch.Tensor, y: torch.Tensor):
        """Per-example gradients {name: (B, *shape)}, losses (B,), correct (B,)."""
        params = {n: p.detach() for n, p in zip(self.names, self.params)}
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        grads, (loss, correct) = self._per_example(params, buffers, x, y)
        return grads, loss, correct

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> ChunkResult:
        if x.shape[0] == 0:
            return self.zero_result(x.device)
        grads, loss, correct = self.per_example_grads(x, y)
        g = [grads[n] for n in self.names]
        b = x.shape[0]
        # the norms and the clipped sum are taken of the same stored per-example gradients,
        # with the same full fp32 products (an einsum may be a TF32 matmul on CUDA)
        with full_fp32_products():
            layer_sq = torch.stack([gi.reshape(b, -1).pow(2).sum(1) for gi in g])  # (P, B)
            norms = layer_sq.sum(0).sqrt()
            if self.clip is None:
                factors = torch.ones_like(norms)
            else:
                factors = clip_factors(norms, self.clip)
            summed = [torch.einsum("b,b...->...", factors, gi) for gi in g]
        return ChunkResult(summed, loss.sum(), correct.sum(), b, norms, layer_sq)
