"""Residual-branch instrumentation: forward hooks on every residual block's taps.

``BlockProbe`` is a context manager: it registers one forward hook per tap (skip input,
branch output, sum, block output) of every ``ResidualBlock`` and removes every handle on
exit, exceptions included. While active, each forward pass reduces the four tensors of
each block to a few scalars **on the device** (no host sync); ``collect()`` fetches them
all in one transfer.

Per block (definitions in DESIGN.md, "What scale mixing is measured as"):
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


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.float().pow(2).mean().sqrt()


def channel_stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population variance over (N, H, W)."""
    dims = [0, *range(2, t.dim())]
    t = t.float()
    return t.mean(dims), t.var(dims, unbiased=False)


def block_stats(
    s: torch.Tensor, r: torch.Tensor, y: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """The METRICS of one block, as one tensor on the device (no host sync)."""
    eps = 1e-12
    rms_s, rms_r = _rms(s), _rms(r)
    ratio = rms_r / (rms_s + eps)
    var_s, var_r = s.float().var(unbiased=False), r.float().var(unbiased=False)
    sf, rf = s.float().flatten(1), r.float().flatten(1)
    cos = (nn.functional.cosine_similarity(sf, rf, dim=1, eps=1e-12)).mean()
    dims = [0, *range(2, s.dim())]
    ch_ratio = r.float().pow(2).mean(dims).sqrt() / (s.float().pow(2).mean(dims).sqrt() + eps)
    q = torch.quantile(ch_ratio, torch.tensor([0.25, 0.5, 0.75], device=ch_ratio.device))
    mean_o, var_o = channel_stats(y)
    _, var_r_c = channel_stats(r)
    return torch.stack(
        [
            rms_s,
            rms_r,
            _rms(y),
            _rms(out),
            ratio,
            torch.log2(ratio + eps),
            var_r / (var_s + var_r + eps),
            cos,
            q[1],
            q[2] - q[0],
            mean_o.pow(2).mean(),
            var_o.mean(),
            var_r_c.mean(),
        ]
    )


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
