"""Signal-propagation plots (Brock, De & Smith 2021, arXiv 2101.08692) at initialisation.

For each residual block, the statistics of the sum right after the addition (index 0 is
the stem output, i.e. the first block's input): the average squared channel mean, the
average channel variance, and the average channel variance of the residual branch.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from scalemix.diagnostics.hooks import BlockProbe, channel_stats
from scalemix.models import has_public_bn, refresh_public_stats


@torch.no_grad()
def signal_propagation(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """Rows {index, name, avg_sq_mean, avg_var, res_avg_var} for the stem and every block.

    The model runs in training mode (BatchNorm normalises with the batch's statistics, as
    in Brock et al.'s plots); its mode is restored afterwards.
    """
    was_training = model.training
    model.train()
    probe = BlockProbe(model)
    if not probe.blocks:
        raise ValueError("the model has no residual blocks to measure")
    stem: dict = {}
    first = probe.blocks[0][1]
    pre = first.register_forward_pre_hook(lambda m, inp: stem.setdefault("x", inp[0].detach()))
    try:
        if has_public_bn(model):
            refresh_public_stats(model, x)
        with probe:
            model(x)
            stats = probe.collect()
    finally:
        pre.remove()
        model.train(was_training)
    mean, var = channel_stats(stem["x"])
    rows = [
        {
            "index": 0,
            "name": "stem",
            "avg_sq_mean": float(mean.pow(2).mean()),
            "avg_var": float(var.mean()),
            "res_avg_var": None,
        }
    ]
    for i, (name, _) in enumerate(probe.blocks, start=1):
        s = stats[name]
        rows.append(
            {
                "index": i,
                "name": name,
                "avg_sq_mean": s["avg_sq_mean"],
                "avg_var": s["avg_var"],
                "res_avg_var": s["res_avg_var"],
            }
        )
    return rows


def plot_spp(curves: dict[str, list[dict]], path: str, title: str = "") -> None:
    """One panel per statistic, one line per model (``curves``: label -> rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as mticker

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for label, rows in curves.items():
        for ax, key in zip(axes, ("avg_sq_mean", "avg_var", "res_avg_var")):
            pts = [(r["index"], r[key]) for r in rows if r[key] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    first = next(iter(curves.values()))
    ticks = [r["index"] for r in first]
    names = [f"{r['index']}\n{r['name']}" if len(first) <= 8 else str(r["index"]) for r in first]
    for ax, key in zip(
        axes,
        (
            "average squared channel mean",
            "average channel variance",
            "residual branch: average channel variance",
        ),
    ):
        ax.set_title(key, fontsize=10)
        ax.set_xticks(ticks, names, fontsize=8, rotation=35, ha="right")
        ax.set_xlabel("block output after the addition (0 = stem output)", fontsize=9)
        ax.set_yscale("log")
        # Label 1-2-5 ticks: a range within a decade or two keeps readable numbers.
        ax.yaxis.set_minor_locator(mticker.LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.tick_params(axis="y", which="both", labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "Signal propagation at initialisation", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
