"""The diagnostics table of a run directory, and its figure of scale ratios over training.

``diagnostics.csv`` is long format (``step, block, metric, value, source``), appended as
the run goes; ``diagnostics.json`` says where the statistics came from and carries the
DP caveat; ``diagnostics.png`` plots log2(rms(branch)/rms(skip)) per block over steps.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scalemix.diagnostics.recorder import CAVEAT, COLUMNS, MODEL_ROW

TABLE = "diagnostics.csv"
META = "diagnostics.json"
FIGURE = "diagnostics.png"


def read_diagnostics(run_dir: str | Path) -> pd.DataFrame:
    """The run's diagnostics rows (an empty frame with the columns when there are none)."""
    path = Path(run_dir) / TABLE
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(path)


def block_metric(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """A (step x block) frame of one residual-block metric."""
    rows = df[(df["metric"] == metric) & (df["block"] != MODEL_ROW)]
    if rows.empty:
        return pd.DataFrame()
    return rows.pivot_table(index="step", columns="block", values="value", aggfunc="last")


def caveat_for(df: pd.DataFrame) -> str | None:
    return CAVEAT if (df["source"] == "train").any() else None


def plot_scale_ratio(df: pd.DataFrame, path: str | Path, title: str = "") -> bool:
    """Figure of log2 scale ratio and branch variance share per block; False if no data."""
    ratio = block_metric(df, "log2_scale_ratio")
    if ratio.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = block_metric(df, "branch_var_share")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(ratio.columns):  # early blocks dark, late blocks light
        colour = cmap(i / max(1, len(ratio.columns) - 1) * 0.9)
        kw = dict(marker="o", ms=3.5, lw=1.3, color=colour, label=name)
        axes[0].plot(ratio.index, ratio[name], **kw)
        if name in share:
            axes[1].plot(share.index, share[name], **kw)
    axes[0].axhline(0, color="grey", lw=0.8, ls="--")
    axes[0].set(
        xlabel="step",
        ylabel="log2 rms(branch) / rms(skip)",
        title="log2 scale ratio per block (0: branch and skip equal)",
    )
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[1].set(
        xlabel="step",
        ylabel="var(branch) / (var(skip) + var(branch))",
        title="branch variance share per block",
        ylim=(0, 1),
    )
    for ax in axes:
        ax.legend(fontsize=7, title="residual block", title_fontsize=7, loc="best")
    src = set(df["source"])
    where = "held-out probe batch" if src == {"heldout"} else "training batches"
    fig.suptitle(f"{title}  (read from {where})".strip(), fontsize=10)
    notes = [
        "Scale mixing: each residual block adds its branch to the skip path. Ratio > 0: the "
        "branch dominates the block's output; < 0: the skip does (ratio -3 = branch 8x smaller).",
        "Look for: ratios drifting far from 0 or apart across blocks as training goes on.",
    ]
    if len(ratio.index) < 8:
        notes.append(
            f"Only {len(ratio.index)} steps recorded: --diag-every N records every N steps."
        )
    if caveat_for(df[df["block"].isin(ratio.columns)]):
        notes.append("Not covered by DP: these statistics are read from private training data.")
    fig.text(0.5, -0.01, "\n".join(notes), ha="center", va="top", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True
