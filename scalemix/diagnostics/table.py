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
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for name in ratio.columns:
        axes[0].plot(ratio.index, ratio[name], marker=".", label=name)
        if name in share:
            axes[1].plot(share.index, share[name], marker=".", label=name)
    axes[0].axhline(0, color="grey", lw=0.8, ls="--")
    axes[0].set(xlabel="step", ylabel="log2 rms(branch) / rms(skip)", title="scale ratio per block")
    axes[1].set(
        xlabel="step",
        ylabel="var(branch) / (var(skip) + var(branch))",
        title="branch variance share",
        ylim=(0, 1),
    )
    axes[0].legend(fontsize=8)
    src = set(df["source"])
    where = "held-out probe batch" if src == {"heldout"} else "training batches"
    fig.suptitle(f"{title}  (read from {where})".strip(), fontsize=10)
    if caveat_for(df[df["block"].isin(ratio.columns)]):
        fig.text(
            0.5,
            -0.02,
            "Not covered by DP: these statistics are read from private training data.",
            ha="center",
            fontsize=8,
            color="firebrick",
        )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True
