"""The multi-page PDF (matplotlib): title, accuracy per axis, paired differences, scale
ratio trajectories, signal propagation per cell, test tables, findings and caveats."""

from __future__ import annotations

import textwrap
import time

import numpy as np
import pandas as pd

from scalemix.report.analysis import Analysis, privacy_settings
from scalemix.report.stats import ALPHA

A4 = (8.27, 11.69)
LANDSCAPE = (11.69, 8.27)

CAVEATS = [
    "Choosing a configuration from these results spends privacy that the reported epsilon does "
    "not count: every run saw the same private training data, so the selected model's guarantee "
    "is weaker than the epsilon of one run (Papernot & Steinke 2022). Select on public data, or "
    "account for the selection.",
    "Diagnostics read from training batches (source = train: scale ratios, gradient norms, clip "
    "fractions, SNR) are computed from private examples without noise and are NOT covered by "
    "the DP guarantee. Do not publish them as private.",
    "Accuracy is each run's final test accuracy, never its best epoch.",
]


def _text_page(pdf, title: str, paragraphs: list[str], size=A4) -> None:
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size)
    fig.text(0.08, 0.95, title, fontsize=16, weight="bold", va="top")
    y = 0.91
    for para in paragraphs:
        bullet = para.startswith("- ")
        lines = textwrap.wrap(para, 92 if size == A4 else 130)
        for i, line in enumerate(lines):
            fig.text(
                0.10 if bullet and i else 0.08,
                y,
                line,
                fontsize=9.5,
                va="top",
                family="DejaVu Sans",
            )
            y -= 0.019
        y -= 0.012
        if y < 0.05:
            pdf.savefig(fig)
            plt.close(fig)
            fig = plt.figure(figsize=size)
            y = 0.95
    pdf.savefig(fig)
    plt.close(fig)


def _title_page(pdf, an: Analysis, plan: dict, version: str) -> None:
    runs = an.runs
    c = runs.status.value_counts().to_dict()
    priv = privacy_settings(runs)
    secs = float(runs.train_seconds.fillna(0).sum())
    lines = [
        f"Grid: {an.grid}" + (f" (preset {an.preset})" if an.preset else ""),
        "Grid description (the full study; a preset changes it as below): "
        + " ".join(plan["grid"].get("description", "").split()),
        "As run: " + as_run(runs),
        f"Made: {time.strftime('%Y-%m-%d %H:%M')}   scalemix {version}",
        "Shared by every cell"
        + (f" (preset {an.preset} applied)" if an.preset else "")
        + ": "
        + (", ".join(f"{k} = {v}" for k, v in plan["grid"].get("base", {}).items()) or "-"),
        "Axes: "
        + "; ".join(f"{a} = {plan['grid']['axes'][a]}" for a in an.axes)
        + f"; seeds = {plan['grid']['seeds']}",
        f"Metric: final test accuracy. Primary axis: {an.primary}"
        + (f"; paired axis: {an.paired_axis} (matched on seed)" if an.paired_axis else ""),
        "Privacy: "
        + ", ".join(f"{k} = {v}" for k, v in priv.items())
        + ". Poisson sampling; epsilon is what each run's accountant says it spent.",
        *[f"Epsilon assumes: {a}." for a in epsilon_assumptions(runs)],
        f"Runs: {len(runs)} planned; done {c.get('done', 0)}, failed {c.get('failed', 0)}, "
        f"diverged {c.get('diverged', 0)}, pending/running {c.get('pending', 0) + c.get('running', 0)}.",
        f"Compute: {secs / 60:.1f} min of training in total"
        + (
            f", {runs.images_per_second.dropna().median():.0f} images/s median"
            if runs.images_per_second.notna().any()
            else ""
        )
        + ".",
        "Contents: accuracy per axis; paired differences; scale-ratio trajectories per block; "
        "signal propagation at initialisation per configuration; tables of tests (Holm-corrected); "
        "findings; caveats.",
    ]
    if an.warnings:
        lines += ["Warnings:"] + [f"- {w}" for w in an.warnings]
    _text_page(pdf, f"scalemix ablation report: {an.grid}", lines)


def as_run(runs) -> str:
    """Data, resolution, sizes, steps and model the finished runs actually used."""
    done = runs[runs.status == "done"]
    if done.empty:
        return "no finished run"

    def one(col):
        vals = sorted({str(v) for v in done[col].dropna()}) if col in done else []
        return vals[0] if len(vals) == 1 else (", ".join(vals) if vals else "?")

    shape = one("image_shape")
    return (
        f"data {one('data_name')} ({one('train_size')} train / {one('test_size')} test examples, "
        f"image {shape}), model {one('model')}, {one('steps')} steps per run."
    )


def epsilon_assumptions(runs) -> list[str]:
    """The distinct statements of what each run's epsilon assumes (seeded runs: a secret key)."""
    if "epsilon_assumes" not in runs:
        return []
    return sorted({a for a in runs.epsilon_assumes.dropna().tolist() if a})


def _accuracy_page(pdf, an: Analysis, plan: dict) -> None:
    import matplotlib.pyplot as plt

    cells = an.cells
    axes = an.axes
    n_plots = len(axes)
    fig, axs = plt.subplots(n_plots, 1, figsize=A4, squeeze=False)
    for ax, axis in zip(axs[:, 0], axes):
        levels = list(plan["grid"]["axes"][axis])
        x = np.arange(len(levels))
        hue = an.paired_axis if axis == an.primary and an.paired_axis else None
        if hue:
            done = an.runs[an.runs.status == "done"]
            for j, h in enumerate(plan["grid"]["axes"][hue]):
                sub = cells[cells[hue] == h]
                shift = x + (j - 0.5) * 0.12
                _errorbars(ax, sub, axis, levels, shift, f"{hue}={h}")
                for i, lvl in enumerate(levels):
                    pts = done[(done[axis] == lvl) & (done[hue] == h)][an.metric].astype(float)
                    ax.scatter(np.full(len(pts), shift[i]), 100 * pts, s=8, color="grey", alpha=0.6)
        else:
            done = an.runs[an.runs.status == "done"]
            from scalemix.report.stats import describe

            rows = [describe(done[done[axis] == lvl][an.metric].astype(float)) for lvl in levels]
            m = np.array([r.mean for r in rows])
            lo = np.array([r.ci_low for r in rows])
            hi = np.array([r.ci_high for r in rows])
            ax.errorbar(
                x,
                100 * m,
                yerr=100 * _yerr(m, lo, hi),
                fmt="o-",
                capsize=4,
                label="mean over all other axes and seeds",
            )
            for i, lvl in enumerate(levels):
                pts = done[done[axis] == lvl][an.metric].astype(float)
                ax.scatter(np.full(len(pts), x[i]) + 0.08, 100 * pts, s=8, color="grey", alpha=0.6)
        ax.set_xticks(x, [str(v) for v in levels])
        ax.set_xlabel(axis)
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        "Accuracy against each axis (mean, 95 % t CI over seeds; grey: single runs)", fontsize=11
    )
    fig.tight_layout()
    pdf.savefig(fig)
    plt.close(fig)


def _yerr(m, lo, hi):
    lo = np.where(np.isfinite(lo), lo, m)
    hi = np.where(np.isfinite(hi), hi, m)
    return np.vstack([m - lo, hi - m])


def _errorbars(ax, sub: pd.DataFrame, axis: str, levels: list, x, label: str) -> None:
    by = sub.groupby(axis)[["mean", "ci_low", "ci_high"]].mean()
    m = np.array([by["mean"].get(lvl, np.nan) for lvl in levels])
    lo = np.array([by["ci_low"].get(lvl, np.nan) for lvl in levels])
    hi = np.array([by["ci_high"].get(lvl, np.nan) for lvl in levels])
    ax.errorbar(x, 100 * m, yerr=100 * _yerr(m, lo, hi), fmt="o-", capsize=4, label=label)


def _differences_page(pdf, an: Analysis) -> None:
    import matplotlib.pyplot as plt

    comp = an.comparisons
    if comp.empty:
        return
    fig, ax = plt.subplots(figsize=(A4[0], min(A4[1], 2.2 + 0.45 * len(comp))))
    strata = [a for a in an.axes if a in comp.columns and a != an.paired_axis]
    labels = [
        f"{r['b']} vs {r['a']}"
        + (
            "  |  "
            + ", ".join(
                f"{a}={r[a]}"
                for a in strata
                if a in r and str(r[a]) not in (r["b"].split("=")[-1],)
            )
            if strata
            else ""
        )
        for _, r in comp.iterrows()
    ]
    y = np.arange(len(comp))[::-1]
    m = comp.mean_diff.values * 100
    err = _yerr(comp.mean_diff.values, comp.ci_low.values, comp.ci_high.values) * 100
    sig = comp.p_holm.values < ALPHA
    ax.errorbar(m, y, xerr=err, fmt="none", ecolor="grey", capsize=3)
    if "diffs" in comp:  # each seed's difference, as a dot on its row
        for yi, ds in zip(y, comp.diffs):
            ax.scatter(
                np.asarray(ds) * 100,
                np.full(len(ds), yi - 0.18),
                s=9,
                color="black",
                alpha=0.6,
                zorder=2,
                label="one seed" if yi == y[0] else None,
            )
    ax.scatter(m[sig], y[sig], color="firebrick", zorder=3, label=f"Holm p < {ALPHA}")
    ax.scatter(m[~sig], y[~sig], color="steelblue", zorder=3, label="not significant")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel(
        "difference b - a (points); bar: 95 % paired-t CI\n"
        "(the t test's own interval); colour: report-wide Holm;\ndots: each seed's difference"
    )
    ax.set_title("Paired differences (matched on seed)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    pdf.savefig(fig)
    plt.close(fig)


def _trajectory_page(pdf, an: Analysis, traj: pd.DataFrame) -> None:
    import matplotlib.pyplot as plt

    if traj.empty:
        return
    runs = an.runs.set_index("id")
    traj = traj.join(runs[an.axes], on="id")
    blocks = list(dict.fromkeys(traj.block))
    fig, axs = plt.subplots(len(blocks), 1, figsize=A4, squeeze=False)
    group_axes = [a for a in an.axes]
    cmap = plt.get_cmap("viridis")
    keys = list(dict.fromkeys(traj[group_axes].itertuples(index=False, name=None)))
    for ax, block in zip(axs[:, 0], blocks):
        tb = traj[traj.block == block]
        for key, g in tb.groupby(group_axes, sort=False):
            key = key if isinstance(key, tuple) else (key,)
            mean = g.groupby("step").value.mean()
            style = "-"
            if an.paired_axis:
                lv = list(dict.fromkeys(an.runs[an.paired_axis]))
                style = "-" if key[group_axes.index(an.paired_axis)] == lv[-1] else "--"
            ax.plot(
                mean.index,
                mean.values,
                style,
                color=cmap(keys.index(key) / max(1, len(keys) - 1)),
                label=", ".join(f"{a}={v}" for a, v in zip(group_axes, key)),
                lw=1.2,
            )
        ax.set_title(f"{block}: log2 rms(branch) / rms(skip), mean over seeds", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axs[0, 0].legend(fontsize=6, ncol=2, loc="best", framealpha=0.6)
    source = set(traj.source)
    note = (
        "read from training batches: NOT covered by DP"
        if "train" in source
        else "read from a held-out probe batch"
    )
    fig.suptitle(f"Scale-ratio trajectories per block ({note})", fontsize=11)
    fig.tight_layout()
    pdf.savefig(fig)
    plt.close(fig)


def _spp_page(pdf, an: Analysis) -> None:
    """Signal propagation at initialisation for each distinct model configuration."""
    import matplotlib.pyplot as plt
    import torch

    from scalemix.diagnostics import signal_propagation
    from scalemix.models import create_model

    done = an.runs[an.runs.status == "done"].drop_duplicates(subset=[a for a in an.axes])
    if done.empty or done.model_axes.isna().all():
        return
    fig, axs = plt.subplots(3, 1, figsize=A4, sharex=True)
    seen = {}
    for _, r in done.iterrows():
        axes_d, shape = r.model_axes, r.image_shape
        if not isinstance(axes_d, dict) or not shape:
            continue
        key = (r.model, tuple(sorted(axes_d.items())))
        label = ", ".join(f"{a}={r[a]}" for a in an.axes)
        if key in seen:
            continue
        torch.manual_seed(0)
        model = create_model(r.model, num_classes=10, in_channels=shape[0], **axes_d)
        x = torch.randn(64, *shape)
        seen[key] = signal_propagation(model, x)
        rows = seen[key]
        idx = [row["index"] for row in rows]
        for ax, stat in zip(axs, ("avg_sq_mean", "avg_var", "res_avg_var")):
            vals = [np.nan if row[stat] is None else row[stat] for row in rows]
            ax.plot(idx, vals, marker="o", label=label, lw=1)
    for ax, stat in zip(
        axs,
        ("average squared channel mean", "average channel variance", "residual-branch variance"),
    ):
        ax.set_ylabel(stat, fontsize=9)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axs[-1].set_xlabel("residual block (0 = stem)")
    from matplotlib.ticker import MaxNLocator

    axs[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axs[0].legend(fontsize=6, ncol=2)
    fig.suptitle(
        "Signal propagation at initialisation, N(0, 1) input, per configuration", fontsize=11
    )
    fig.tight_layout()
    pdf.savefig(fig)
    plt.close(fig)


def _table_page(pdf, title: str, frame: pd.DataFrame, note: str = "") -> None:
    import matplotlib.pyplot as plt

    if frame.empty:
        return
    per_page = 32
    for start in range(0, len(frame), per_page):
        part = frame.iloc[start : start + per_page]
        fig, ax = plt.subplots(figsize=LANDSCAPE)
        ax.axis("off")
        ax.set_title(title + ("" if start == 0 else " (continued)"), fontsize=12, loc="left")
        tbl = ax.table(
            cellText=part.values, colLabels=list(part.columns), loc="upper center", cellLoc="center"
        )
        tbl.auto_set_font_size(False)
        tbl.set_fontsize(8)
        tbl.auto_set_column_width(list(range(len(part.columns))))
        tbl.scale(1, 1.4)
        if note:
            fig.text(0.05, 0.03, "\n".join(textwrap.wrap(note, 170)), fontsize=8)
        pdf.savefig(fig)
        plt.close(fig)


def write_pdf(
    path, an: Analysis, plan: dict, traj: pd.DataFrame, tables: dict, version: str
) -> int:
    """Write the report; return the number of pages."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_pdf import PdfPages

    with PdfPages(path) as pdf:
        _title_page(pdf, an, plan, version)
        _accuracy_page(pdf, an, plan)
        _differences_page(pdf, an)
        _trajectory_page(pdf, an, traj)
        _spp_page(pdf, an)
        _table_page(
            pdf,
            "Accuracy per cell",
            tables["cells"],
            "n: finished seeds; CI: 95 % of the mean by the named method (t below 20 seeds); "
            "IQM: interquartile mean (n >= 4).",
        )
        _table_page(
            pdf,
            "Paired comparisons",
            tables["comparisons"],
            "Differences b - a in accuracy points, matched on seed. p (t): paired t test, the primary test, "
            "Holm-corrected within each family; p (W): Wilcoxon signed-rank as a robustness check; d_z: mean/sd "
            "of the differences; P(b>a): probability of improvement.",
        )
        _table_page(
            pdf,
            "Omnibus tests, the grid model, and scale mixing vs accuracy",
            tables["omnibus_corr"],
            "Friedman (blocked by seed) with a permutation p-value, else Kruskal-Wallis; the grid model "
            "fits every axis and interaction with seed as block; primary p-values are Holm-corrected "
            "report-wide; Spearman rho (95 % Fisher-z CI) is exploratory and uncorrected.",
        )
        _text_page(
            pdf,
            "Findings",
            [f"- {f}" for f in an.findings]
            + (["Warnings:"] + [f"- {w}" for w in an.warnings] if an.warnings else []),
        )
        _text_page(pdf, "Caveats", [f"- {c}" for c in CAVEATS])
        return pdf.get_pagecount()
