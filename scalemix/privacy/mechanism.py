"""The Gaussian mechanism of DP-SGD, applied once per logical batch.

    update = (sum_i clip(g_i) + N(0, (sigma C)^2 I)) / B_expected

``B_expected`` is the expected batch size (q N), a public constant: dividing by the
realised batch size would leak it (docs/sharp-edges.md, item 2). With ``sigma = 0`` and no
clipping this is the ordinary mean gradient of a batch of the expected size. The noise
is added in the precision of the summed gradients (float32 or float64), never lower.
"""

from __future__ import annotations

import torch

from scalemix.privacy.sampling import NoiseSource


def noisy_mean(
    grad_sums: list[torch.Tensor],
    *,
    sigma: float,
    clip: float | None,
    expected_batch_size: float,
    noise: NoiseSource | None,
) -> list[torch.Tensor]:
    """Add N(0, (sigma*clip)^2) to each summed gradient (in place) and divide by B_expected."""
    if sigma > 0:
        if noise is None or clip is None:
            raise ValueError("noise needs a noise source and a clip norm")
        noise.add_(grad_sums, sigma * clip)
    scale = 1.0 / expected_batch_size
    for g in grad_sums:
        g.mul_(scale)
    return grad_sums
