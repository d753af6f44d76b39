"""Residual-branch instrumentation: forward hooks on every residual block's taps.

``BlockProbe`` is a context manager: it registers one forward hook per tap (skip input,
branch output, sum, block output) of every ``ResidualBlock`` and removes every handle on
exit, exceptions included. While active, each forward pass reduces the four tensors of
each block to a few scalars **on the device** (no host sync); ``collect()`` fetches them
all in one transfer.

Per block (the definitions docs/training.md gives under "Diagnostics while training"):
  rms_skip, rms_branch, rms_sum, rms_out; scale_ratio = rms(branch)/rms(skip) and its
  log2; branch_var_share = var(r) / (var(s) + var(r)); cosine(s, r) (flattened per
  example, averaged over examples); the per-channel ratio rms_c(r)/rms_c(s): median and
  interquartile range over channels; and the signal-propagation statistics (Brock et
  al. 2021) of the sum right after the addition: avg_sq_mean = mean_C(mean_NHW(y)^2),
  avg_var = mean_C(var_NHW(y)) (ddof 0), and res_avg_var = avg_var of the branch output.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from scalemix.models.layers import ResidualBlock, residual_blocks

METRICS = (
    "rms_skip",
    "rms_branch",
    "rms_sum",
    "rms_out",
    "scale_ratio",
    "log2_scale_ratio",
    "branch_var_share",
    "cosine",
    "channel_ratio_median",
    "channel_ratio_iqr",
    "avg_sq_mean",
    "avg_var",
    "res_avg_var",
)


def channel_stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population variance over (N, H, W)."""
    dims = [0, *range(2, t.dim())]
    t = t.float()
    return t.mean(dims), t.var(dims, unbiased=False)


def _nc_sums(*pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per (example, channel) sums over positions of each product ``a * b``, in float64.

    One pass over the operands per product (``einsum`` reduces without materialising the
    product); the positions of one channel (at most H*W) are summed in the tensors' own
    precision, everything after that in float64.
    """
    out = []
    for a, b in pairs:
        a3, b3 = a.float().flatten(2), b.float().flatten(2)  # (N, C, positions)
        out.append(torch.einsum("ncp,ncp->nc", a3, b3) if b is not a else a3.pow(2).sum(2))
    return torch.stack(out).double()


def block_stats(
    s: torch.Tensor, r: torch.Tensor, y: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """The METRICS of one block, as one tensor on the device (no host sync).

    Every metric is a function of eight per-(example, channel) sums (of s, r, y and of
    s^2, r^2, y^2, s*r, out^2), so the four tensors are read a handful of times, not once
    per metric. Variances are E[x^2] - E[x]^2 in float64 over those sums.
    """
    eps = 1e-12
    if s.dim() == 2:  # (N, D) features: every feature is a channel of one position
        s, r, y, out = (t[:, :, None] for t in (s, r, y, out))
    n, c = s.shape[:2]
    positions = s[0, 0].numel()
    first = torch.stack([t.float().flatten(2).sum(2) for t in (s, r, y)]).double()
    ss, rr, yy, sr, oo = _nc_sums((s, s), (r, r), (y, y), (s, r), (out, out))
    sum_s, sum_r, sum_y = first
    count = n * positions  # elements per channel
    mean_all = lambda t: t.sum() / (count * c)  # noqa: E731  (over every element)
    rms_s, rms_r = mean_all(ss).sqrt(), mean_all(rr).sqrt()
    ratio = rms_r / (rms_s + eps)
    var_s = mean_all(ss) - mean_all(sum_s) ** 2
    var_r = mean_all(rr) - mean_all(sum_r) ** 2
    # cosine per example over the flattened tensors, as F.cosine_similarity, then the mean
    norm_prod = (ss.sum(1) * rr.sum(1)).sqrt()
    cos = (sr.sum(1) / norm_prod.clamp(min=eps)).mean()
    ch_ratio = (rr.sum(0) / count).sqrt() / ((ss.sum(0) / count).sqrt() + eps)
    q = torch.quantile(
        ch_ratio, torch.tensor([0.25, 0.5, 0.75], device=ch_ratio.device, dtype=ch_ratio.dtype)
    )
    mean_y_c = sum_y.sum(0) / count
    var_y_c = yy.sum(0) / count - mean_y_c**2
    var_r_c = rr.sum(0) / count - (sum_r.sum(0) / count) ** 2
    return torch.stack(
        [
            rms_s,
            rms_r,
            mean_all(yy).sqrt(),
            mean_all(oo).sqrt(),
            ratio,
            torch.log2(ratio + eps),
            var_r / (var_s + var_r + eps),
            cos,
            q[1],
            q[2] - q[0],
            mean_y_c.pow(2).mean(),
            var_y_c.mean(),
            var_r_c.mean(),
        ]
    ).float()


class BlockProbe:
    """Hooks on every residual block; ``collect()`` returns {block name: {metric: value}}."""

    def __init__(self, model: nn.Module):
        self.blocks: list[tuple[str, ResidualBlock]] = residual_blocks(model)
        self._handles: list = []
        self._seen: dict[str, dict[str, torch.Tensor]] = {}
        self._stats: dict[str, torch.Tensor] = {}
        self.enabled = True

    def __enter__(self) -> BlockProbe:
        for name, block in self.blocks:
            for role in ("skip", "branch", "sum", "out"):
                tap = getattr(block, f"tap_{role}")
                self._handles.append(tap.register_forward_hook(self._hook(name, role)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def active_handles(self) -> int:
        return len(self._handles)

    def _hook(self, name: str, role: str):
        def hook(module, inputs, output):
            if not self.enabled:
                return
            seen = self._seen.setdefault(name, {})
            seen[role] = output.detach()
            if role == "out":  # the last tap of the block: reduce and drop the tensors
                self._stats[name] = block_stats(
                    seen["skip"], seen["branch"], seen["sum"], seen["out"]
                )
                self._seen.pop(name)

        return hook

    def take(self) -> tuple[list[str], torch.Tensor | None]:
        """The block names and their (blocks, METRICS) statistics, still on the device."""
        if not self._stats:
            return [], None
        names = list(self._stats)
        stacked = torch.stack([self._stats[n] for n in names])
        self._stats.clear()
        return names, stacked

    def collect(self) -> dict[str, dict[str, float]]:
        """Fetch every block's statistics of the last forward pass in one transfer."""
        names, stacked = self.take()
        if stacked is None:
            return {}
        return {n: dict(zip(METRICS, v)) for n, v in zip(names, stacked.cpu().tolist())}
