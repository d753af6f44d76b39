"""Batched augmentation on the device: reflect-pad crop (and horizontal flip), K views.

``augment(x, k, gen)`` takes a float batch (B, C, H, W) and returns (B, K, C, H, W): K
independently augmented views of every example (augmentation multiplicity, De et al.
2022). All views come from one gather, with no Python loop over images.

Training passes ``views``: each example's offsets and flips from the run's secret
augmentation stream, keyed by (step, example index) (``privacy.randomness.AugStream``),
so one example's views never depend on which other examples were drawn. ``gen`` (a torch
generator, drawn by position in the batch) serves benchmarks and tests only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(
    x: torch.Tensor,
    k: int,
    gen: torch.Generator | None,
    mode: str = "crop-flip",
    pad: int = 4,
    *,
    views: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """K views of every example; ``views = (dy, dx, flip)``, each (B * K,), fixes them."""
    b, c, h, w = x.shape
    if mode == "none" or b == 0:
        return x.unsqueeze(1).expand(b, k, c, h, w)
    n = b * k
    xs = x.unsqueeze(1).expand(b, k, c, h, w).reshape(n, c, h, w)
    padded = F.pad(xs, (pad, pad, pad, pad), mode="reflect")
    dev = x.device
    if views is not None:
        dy, dx, flip = (v.to(dev, non_blocking=True) for v in views)
    else:
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
        flip = torch.rand(n, generator=gen, device=dev) < 0.5  # drawn in both modes
    if mode == "crop":
        flip = torch.zeros_like(flip)
    rows = dy[:, None] + torch.arange(h, device=dev)  # (n, h)
    cols = dx[:, None] + torch.arange(w, device=dev)  # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=dev)[:, None, None, None]
    idx_c = torch.arange(c, device=dev)[None, :, None, None]
    out = padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]
    return out.reshape(b, k, c, h, w)
