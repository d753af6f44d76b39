"""``scalemix report DIR1 DIR2 ...``: configurations shared by several grids, side by side.

Two cells of different grids are the same configuration when their resolved training
configurations agree in everything but the seed (``collect.configuration_key``). For each
shared configuration the comparison gives, per grid, n, the mean and its 95 % t interval,
and between grids the difference in means with Welch's t test (different grids are
different experiments: unpaired). Runs with the same seed and the same seeded streams are
the same computation: where the grids hold such a pair, their difference is a
reproducibility check and is reported as such.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from scalemix.errors import ConfigError
from scalemix.report import stats as st
from scalemix.report.collect import collect


def _label(row, axes: list[str]) -> str:
    return ", ".join(f"{a}={row[a]}" for a in axes) or "(base)"


def shared_configurations(grid_dirs: list) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """(per grid and configuration, between-grid differences, the grids' descriptions)."""
    frames, grids = [], []
    for d in grid_dirs:
        runs, plan = collect(d)
        g = plan["grid"]
        name = g["name"] + (f" ({g['preset']})" if g.get("preset") else "")
        if any(x["name"] == name for x in grids):
            name = f"{name} [{Path(d).name}]"
        axes = list(g["axes"])
        runs = runs[runs.status == "done"].copy()
        runs["grid"] = name
        runs["label"] = [_label(r, axes) for _, r in runs.iterrows()]
        frames.append(runs)
        grids.append({"name": name, "dir": str(d), "axes": axes, "runs": int(len(runs))})
    runs = pd.concat(frames, ignore_index=True)
    runs = runs[runs.config_key.notna()]
    in_grids = runs.groupby("config_key").grid.nunique()
    shared = runs[runs.config_key.isin(in_grids[in_grids >= 2].index)]
    if shared.empty:
        raise ConfigError(
            "these grids share no configuration (every cell differs in some setting besides "
            "the seed); nothing to put side by side. Compare grids that repeat a cell, e.g. "
            "gn_groups at groups=16, scalenorm=true and epsilon at epsilon=8"
        )
    rows = []
    for (key, grid), g in shared.groupby(["config_key", "grid"], sort=False):
        acc = g.test_acc.astype(float)
        s = st.describe(acc)
        rows.append(
            {
                "configuration": key,
                "grid": grid,
                "cell": g.label.iloc[0],
                "n": s.n,
                "seeds": sorted(int(x) for x in g.seed),
                "mean": s.mean,
                "ci_low": s.ci_low,
                "ci_high": s.ci_high,
                "ci_method": s.ci_method,
                "values": dict(zip(g.seed.astype(int), acc)),
            }
        )
    per_grid = pd.DataFrame(rows)
    diffs = []
    for key, g in per_grid.groupby("configuration", sort=False):
        for (_, a), (_, b) in itertools.combinations(g.iterrows(), 2):
            va, vb = np.array(list(a["values"].values())), np.array(list(b["values"].values()))
            p = (
                float(stats.ttest_ind(vb, va, equal_var=False).pvalue)
                if len(va) >= 2 and len(vb) >= 2 and (va.std() > 0 or vb.std() > 0)
                else math.nan
            )
            same = sorted(set(a["values"]) & set(b["values"]))
            gap = max((abs(a["values"][s] - b["values"][s]) for s in same), default=math.nan)
            diffs.append(
                {
                    "configuration": key,
                    "a": a["grid"],
                    "b": b["grid"],
                    "diff": float(vb.mean() - va.mean()),
                    "p_welch": p,
                    "same_seeds": len(same),
                    "max_gap_same_seed": gap,
                }
            )
    return per_grid, pd.DataFrame(diffs), grids


def compare_grids(grid_dirs: list, out_pdf=None, *, log=print) -> Path:
    """Write the side-by-side PDF and its tables (shared.csv, differences.csv)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    from scalemix.report import _md_table, code_version
    from scalemix.report.pdf import A4, _table_page, _text_page

    per_grid, diffs, grids = shared_configurations(grid_dirs)
    first = Path(grid_dirs[0])
    pdf_path = (
        Path(out_pdf)
        if out_pdf
        else first.parent / ("compare-" + "-".join(Path(d).name for d in grid_dirs)) / "report.pdf"
    )
    folder = pdf_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    per_grid.drop(columns=["values"]).to_csv(folder / "shared.csv", index=False)
    diffs.to_csv(folder / "differences.csv", index=False)
    show = pd.DataFrame(
        {
            "configuration": per_grid.configuration,
            "grid": per_grid.grid,
            "cell in that grid": per_grid.cell,
            "n": per_grid.n,
            "mean %": per_grid["mean"].map(lambda v: f"{100 * v:.1f}"),
            "95% CI": [
                "" if math.isnan(lo) else f"{100 * lo:.1f}-{100 * hi:.1f}"
                for lo, hi in zip(per_grid.ci_low, per_grid.ci_high)
            ],
            "CI method": per_grid.ci_method,
        }
    )
    show_d = pd.DataFrame(
        {
            "configuration": diffs.configuration,
            "b vs a": diffs.b + " vs " + diffs.a,
            "diff (pts)": diffs["diff"].map(lambda v: f"{100 * v:+.2f}"),
            "p (Welch), uncorr.": diffs.p_welch.map(lambda v: "" if math.isnan(v) else f"{v:.3g}"),
            "same seeds": diffs.same_seeds,
            "largest gap at a shared seed (pts)": diffs.max_gap_same_seed.map(
                lambda v: "" if math.isnan(v) else f"{100 * v:.2f}"
            ),
        }
    )
    (folder / "shared.md").write_text(_md_table(show) + "\n" + _md_table(show_d))
    tmp = pdf_path.with_name(f".{pdf_path.name}.tmp")
    with PdfPages(tmp) as pdf:
        _text_page(
            pdf,
            "scalemix: grids side by side",
            [
                "Grids: "
                + "; ".join(f"{g['name']} ({g['runs']} finished runs, {g['dir']})" for g in grids),
                f"Configurations shared by two or more grids: {per_grid.configuration.nunique()} "
                "(same resolved training configuration except the seed).",
                "Between grids the runs are different experiments: differences are tested with "
                "Welch's t test (unpaired), uncorrected. Where two grids ran the same seed of the "
                "same configuration with seeded streams, the runs are the same computation: the "
                "largest gap at a shared seed is a reproducibility check (0 on the same hardware "
                "and software).",
                f"Made with scalemix {code_version()}.",
            ],
        )
        keys = list(dict.fromkeys(per_grid.configuration))
        fig, axs = plt.subplots(len(keys), 1, figsize=(A4[0], 1.2 + 1.6 * len(keys)), squeeze=False)
        for ax, key in zip(axs[:, 0], keys):
            g = per_grid[per_grid.configuration == key].reset_index(drop=True)
            y = np.arange(len(g))[::-1]
            m = 100 * g["mean"].values
            lo = 100 * np.where(np.isfinite(g.ci_low), g.ci_low, g["mean"])
            hi = 100 * np.where(np.isfinite(g.ci_high), g.ci_high, g["mean"])
            ax.errorbar(m, y, xerr=[m - lo, hi - m], fmt="o", capsize=4, color="steelblue")
            for yi, vals in zip(y, g["values"]):
                v = 100 * np.array(list(vals.values()))
                ax.scatter(v, np.full(len(v), yi - 0.15), s=10, color="grey")
            ax.set_yticks(y, [f"{r.grid}\n{r.cell}" for r in g.itertuples()], fontsize=7)
            ax.set_title(f"configuration {key}", fontsize=9, loc="left")
            ax.grid(alpha=0.3, axis="x")
        axs[-1, 0].set_xlabel("test accuracy (%): mean, 95 % t CI over seeds; grey: single runs")
        fig.tight_layout()
        pdf.savefig(fig)
        plt.close(fig)
        _table_page(pdf, "Shared configurations per grid", show)
        _table_page(pdf, "Between grids", show_d)
    tmp.replace(pdf_path)
    log(
        f"comparison of {len(grids)} grids: {per_grid.configuration.nunique()} shared configurations -> {pdf_path}"
    )
    return pdf_path
