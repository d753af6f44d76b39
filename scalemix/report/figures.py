"""The report's figures, one function per PDF page (matplotlib; pdf.py assembles them).

Every figure that shows accuracy shows each run as a point; configurations keep one look
throughout: colour = the primary axis (with any further axes), line style and marker =
the paired axis (dashed / circle: its first level; solid / triangle: its second).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from scalemix.report.analysis import SCALE_SUMMARY, Analysis
from scalemix.report.stats import describe

A4 = (8.27, 11.69)


class Look:
    """Colour, line style, marker and label of each configuration (axes except seed)."""

    def __init__(self, an: Analysis):
        import matplotlib.pyplot as plt

        self.an = an
        self.colour_axes = [a for a in an.axes if a != an.paired_axis]
        keys = list(
            dict.fromkeys(
                an.cells[self.colour_axes].itertuples(index=False, name=None)
                if self.colour_axes
                else [()]
            )
        )
        cmap = plt.get_cmap("viridis")
        self.colours = {k: cmap(0.9 * i / max(1, len(keys) - 1)) for i, k in enumerate(keys)}
        self.paired_levels = list(dict.fromkeys(an.cells[an.paired_axis])) if an.paired_axis else []

    def of(self, row) -> dict:
        ck = tuple(row[a] for a in self.colour_axes)
        style = {"color": self.colours.get(ck, "grey"), "linestyle": "-", "marker": "o"}
        if self.an.paired_axis:
            first = row[self.an.paired_axis] == self.paired_levels[0]
            style.update(linestyle="--" if first else "-", marker="o" if first else "^")
        return style

    def label(self, row) -> str:
        return ", ".join(f"{a}={row[a]}" for a in self.an.axes)

    def configurations(self, frame: pd.DataFrame):
        """(row of axis values, rows of ``frame`` for that configuration) in cell order."""
        for _, cell in self.an.cells.iterrows():
            mask = np.ones(len(frame), dtype=bool)
            for a in self.an.axes:
                mask &= (frame[a] == cell[a]).values
            yield cell, frame[mask]


def _save(pdf, fig) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    pdf.savefig(fig)
    plt.close(fig)


def _per_seed(ax, per_seed: pd.DataFrame, x: str, y: str, style: dict, label: str) -> None:
    """One thin line with markers per run (one seed of the configuration): every seed
    visible, none summarised away by a band."""
    first = True
    for _, g in per_seed.groupby("id", sort=False):
        g = g.sort_values(x)
        ax.plot(
            g[x].values,
            g[y].values,
            color=style["color"],
            linestyle=style["linestyle"],
            marker=style["marker"],
            markersize=2.5,
            lw=0.7,
            alpha=0.8,
            label=label if first else None,
        )
        first = False


def _legend(ax, n: int) -> None:
    """A legend below the axes, readable (8 pt), in as many columns as fit."""
    ax.legend(
        fontsize=8,
        ncol=min(4, max(1, n // 4 + 1)),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.18),
        frameon=False,
    )


CUT_LABELS = {
    "^": "interval cut at 100 % (its t interval reached past it)",
    "v": "interval cut at 0 % (its t interval reached past it)",
}


def _mark_cuts(ax, x, lo, hi, cuts) -> bool:
    """A small red triangle at the end of an interval that was cut at 0 or 100 %, named
    once in the legend; True if any was drawn."""
    drawn = set()
    for xi, lo_i, h, c in zip(x, lo, hi, cuts):
        for marker, end, hit in (("^", h, ("high", "both")), ("v", lo_i, ("low", "both"))):
            if c in hit:
                ax.plot(
                    [xi],
                    [100 * end],
                    marker=marker,
                    linestyle="none",
                    color="firebrick",
                    markersize=6,
                    zorder=4,
                    label=None if marker in drawn else CUT_LABELS[marker],
                )
                drawn.add(marker)
    return bool(drawn)


def _legend_below(ax, ncol: int = 2) -> None:
    """The axes' legend below it, outside the data (8 pt)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(
            fontsize=8,
            ncol=ncol,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.16),
            frameon=False,
        )


def accuracy_page(pdf, an: Analysis, plan: dict) -> None:
    """Accuracy against each axis. The primary axis with a paired axis: each cell's mean
    with its t interval over seeds, and each seed as a thin line. Every other view: each
    level's mean of seed means with the t interval over them (n = seeds), each seed's mean
    over the other axes as a thin line. A red triangle marks an interval cut at 0 or 100 %,
    named in the legend of the panel that has one. Legends sit below their panel."""
    import matplotlib.pyplot as plt

    cells = an.cells
    axes = an.axes
    done = an.runs[an.runs.status == "done"]
    fig, axs = plt.subplots(len(axes), 1, figsize=A4, squeeze=False)
    any_cut = False
    for ax, axis in zip(axs[:, 0], axes):
        levels = list(plan["grid"]["axes"][axis])
        x = np.arange(len(levels))
        hue = an.paired_axis if axis == an.primary and an.paired_axis else None
        if hue:
            others = [a for a in axes if a not in (axis, hue)]
            for j, h in enumerate(plan["grid"]["axes"][hue]):
                sub = cells[cells[hue] == h]
                shift = x + (j - 0.5) * 0.12
                _errorbars(ax, sub, axis, levels, shift, f"{hue}={h}: mean, 95 % t CI")
                runs_h = done[done[hue] == h]
                per = runs_h.groupby(["seed", axis])[an.metric].mean().unstack(axis)
                for seed, row in per.iterrows():
                    vals = [row.get(lvl, np.nan) for lvl in levels]
                    ax.plot(
                        shift,
                        100 * np.asarray(vals, dtype=float),
                        lw=0.6,
                        marker="o" if j == 0 else "^",
                        markersize=2.5,
                        color="grey",
                        alpha=0.6,
                        linestyle="--" if j == 0 else "-",
                        label="one seed" + (f" (mean over {', '.join(others)})" if others else "")
                        if (j == 0 and seed == per.index[0])
                        else None,
                    )
        else:
            marg = an.marginals[an.marginals.axis == axis] if not an.marginals.empty else None
            if marg is None or marg.empty:
                continue
            by = {lvl: r for lvl, r in zip(marg.level, marg.itertuples())}
            m = np.array([by[lvl].mean if lvl in by else np.nan for lvl in levels])
            lo = np.array([by[lvl].ci_low if lvl in by else np.nan for lvl in levels])
            hi = np.array([by[lvl].ci_high if lvl in by else np.nan for lvl in levels])
            cut = [by[lvl].ci_cut if lvl in by else "" for lvl in levels]
            n = int(marg.seeds.min())
            ax.errorbar(
                x,
                100 * m,
                yerr=100 * _yerr(m, lo, hi),
                fmt="o-",
                capsize=4,
                zorder=3,
                label=f"mean of seed means, 95 % t CI over {n} seeds",
            )
            any_cut |= _mark_cuts(ax, x, lo, hi, cut)
            seeds = sorted({s for r in marg.itertuples() for s in range(len(r.seed_means))})
            for k in seeds:  # each seed's mean over the other axes, level by level
                vals = [
                    by[lvl].seed_means[k] if lvl in by and k < len(by[lvl].seed_means) else np.nan
                    for lvl in levels
                ]
                ax.plot(
                    x + 0.06,
                    100 * np.asarray(vals, dtype=float),
                    lw=0.6,
                    marker="o",
                    markersize=2.5,
                    color="grey",
                    alpha=0.7,
                    label="one seed (mean over the other axes)" if k == seeds[0] else None,
                )
        if hue:
            any_cut |= _mark_cuts(
                ax,
                np.concatenate([x + (j - 0.5) * 0.12 for j in range(2)]),
                np.concatenate(
                    [
                        _cell_stat(cells, hue, h, axis, levels, "ci_low")
                        for h in plan["grid"]["axes"][hue]
                    ]
                ),
                np.concatenate(
                    [
                        _cell_stat(cells, hue, h, axis, levels, "ci_high")
                        for h in plan["grid"]["axes"][hue]
                    ]
                ),
                sum(
                    (
                        list(_cell_cut(cells, hue, h, axis, levels))
                        for h in plan["grid"]["axes"][hue]
                    ),
                    [],
                ),
            )
        ax.set_xticks(x, [str(v) for v in levels])
        ax.set_xlabel(axis)
        ax.set_ylabel(f"{'EMA ' if an.metric == 'test_acc_ema' else ''}test accuracy (%)")
        _legend_below(ax)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{an.metric_label[0].upper() + an.metric_label[1:]} against each axis: the seed is the "
        "unit\n(intervals over seeds; thin grey lines: single seeds"
        + ("; red triangle: an interval cut at 0 or 100 %" if any_cut else "")
        + ")",
        fontsize=10,
    )
    fig.tight_layout()
    pdf.savefig(fig)
    plt.close(fig)


def _cell_stat(cells, hue, h, axis, levels, col):
    sub = cells[cells[hue] == h].groupby(axis)[col].mean()
    return np.array([sub.get(lvl, np.nan) for lvl in levels], dtype=float)


def _cell_cut(cells, hue, h, axis, levels):
    if "ci_cut" not in cells:
        return [""] * len(levels)
    sub = cells[cells[hue] == h]
    out = []
    for lvl in levels:
        c = set(sub[sub[axis] == lvl]["ci_cut"].astype(str))
        high, low = bool(c & {"high", "both"}), bool(c & {"low", "both"})
        out.append("both" if high and low else "high" if high else "low" if low else "")
    return out


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


def differences_page(pdf, an: Analysis) -> None:
    """Each paired comparison: the mean difference with its paired-t interval, each seed's
    difference as a dot, the verdict as colour; the legend below the plot names only the
    verdicts present."""
    import matplotlib.pyplot as plt

    comp = an.comparisons
    if comp.empty:
        return
    fig, ax = plt.subplots(figsize=(A4[0], min(A4[1], 3.2 + 0.45 * len(comp))))
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
    ax.errorbar(m, y, xerr=err, fmt="none", ecolor="grey", capsize=3, label="95 % paired-t CI")
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
    verdicts = comp.verdict.values
    sig = verdicts == "effect"
    equiv = verdicts == "equivalent"
    for mask, colour, label in (
        (sig, "firebrick", "effect (as the plan corrects)"),
        (equiv, "seagreen", "equivalent (TOST)"),
        (~sig & ~equiv, "steelblue", "inconclusive (or not tested)"),
    ):
        if mask.any():
            ax.scatter(m[mask], y[mask], color=colour, zorder=3, label=label)
    if an.plan.sesoi:
        for i, v in enumerate((-an.plan.sesoi, an.plan.sesoi)):
            ax.axvline(
                v,
                color="seagreen",
                lw=0.8,
                ls=":",
                label=f"± the smallest effect of interest ({an.plan.sesoi:g})" if i else None,
            )
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_ylim(y.min() - 0.6, y.max() + 0.6)
    ax.set_xlabel("difference b - a (accuracy points), matched on seed", fontsize=9)
    fig.suptitle(
        "Paired differences (matched on seed): mean with the 95 % paired-t CI over seeds\n"
        "(uncorrected); colour: the verdict under the plan (corrected p and TOST)",
        fontsize=10,
    )
    ax.grid(alpha=0.3, axis="x")
    height = fig.get_size_inches()[1]
    fig.legend(
        *ax.get_legend_handles_labels(), fontsize=8, ncol=3, loc="lower center", frameon=False
    )
    fig.tight_layout(rect=(0, 0.75 / height, 1, 1))  # the legend's rows below the plot
    pdf.savefig(fig)
    plt.close(fig)


def spp_page(pdf, an: Analysis) -> None:
    """Signal propagation at initialisation for each distinct model configuration."""
    import matplotlib.pyplot as plt
    import torch

    from scalemix.diagnostics import signal_propagation
    from scalemix.models import create_model

    done = an.runs[an.runs.status == "done"].drop_duplicates(subset=[a for a in an.axes])
    if done.empty or done.model_axes.isna().all():
        return
    fig, axs = plt.subplots(3, 1, figsize=A4, sharex=True)
    look = Look(an)
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
            ax.plot(idx, vals, label=label, lw=1, **look.of(r))
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
    axs[0].legend(fontsize=7, ncol=2)
    fig.suptitle(
        "Signal propagation at initialisation, N(0, 1) input, per configuration", fontsize=11
    )
    fig.tight_layout()
    pdf.savefig(fig)
    plt.close(fig)


def trajectory_page(pdf, an: Analysis, traj: pd.DataFrame) -> None:
    """Scale ratio per block against step: one thin line with markers per seed."""
    import matplotlib.pyplot as plt

    if traj.empty:
        return
    look = Look(an)
    traj = traj.join(an.runs.set_index("id")[an.axes], on="id")
    blocks = list(dict.fromkeys(traj.block))
    fig, axs = plt.subplots(len(blocks), 1, figsize=A4, squeeze=False, sharex=True)
    for ax, block in zip(axs[:, 0], blocks):
        tb = traj[traj.block == block]
        for cell, g in look.configurations(tb):
            if not g.empty:
                _per_seed(ax, g, "step", "value", look.of(cell), look.label(cell))
        ax.set_title(block, fontsize=10, loc="left")
        ax.set_ylabel("log2 rms(branch) / rms(skip)", fontsize=8)
        ax.grid(alpha=0.3)
    axs[-1, 0].set_xlabel("step")
    _legend(axs[-1, 0], len(an.cells))
    source = set(traj.source)
    note = (
        "read from training batches: NOT covered by DP"
        if "train" in source
        else "read from a held-out probe batch"
    )
    fig.suptitle(
        f"Scale ratio per block ({note})\nthin lines: one seed each; "
        "0 would be branch and skip at the same scale",
        fontsize=10,
    )
    _save(pdf, fig)


def learning_curves_page(pdf, an: Analysis, curves: pd.DataFrame) -> None:
    """The plan's metric at every evaluation against step and against the epsilon spent:
    one thin line with markers per run (seed)."""
    import matplotlib.pyplot as plt

    col = an.metric if an.metric in curves else "test_acc"
    if curves.empty or col not in curves or curves.groupby("id").size().max() < 2:
        return
    look = Look(an)
    curves = curves.join(an.runs.set_index("id")[an.axes], on="id")
    has_eps = "epsilon_spent" in curves and curves.epsilon_spent.notna().any()
    fig, axs = plt.subplots(2 if has_eps else 1, 1, figsize=A4, squeeze=False)
    for ax, x, xlabel in (
        (axs[0, 0], "step", "step"),
        *([(axs[1, 0], "epsilon_spent", "epsilon spent (accountant, one run)")] if has_eps else []),
    ):
        for cell, g in look.configurations(curves):
            g = g.dropna(subset=[x, col])
            if not g.empty:
                g = g.assign(acc=100 * g[col].astype(float))
                _per_seed(ax, g, x, "acc", look.of(cell), look.label(cell))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{'EMA ' if col == 'test_acc_ema' else ''}test accuracy (%)")
        ax.grid(alpha=0.3)
    _legend(axs[-1, 0], len(an.cells))
    evals = int(curves.groupby("id").size().median())
    fig.suptitle(
        f"Learning curves: test accuracy ({'EMA' if col == 'test_acc_ema' else 'raw'} weights) "
        f"at each evaluation ({evals} per run)\n"
        "thin lines: one seed each (colour: configuration; dashed: the paired axis' first level)",
        fontsize=10,
    )
    _save(pdf, fig)


def scale_vs_accuracy_page(pdf, an: Analysis) -> None:
    """One point per run (final scale ratio, accuracy); large outlined: configuration means."""
    import matplotlib.pyplot as plt

    done = an.runs[an.runs.status == "done"]
    if SCALE_SUMMARY not in done or done[SCALE_SUMMARY].isna().all():
        return
    look = Look(an)
    fig, ax = plt.subplots(figsize=(A4[0], A4[0] * 0.85))
    for cell, g in look.configurations(done):
        g = g.dropna(subset=[SCALE_SUMMARY])
        if g.empty:
            continue
        st_ = look.of(cell)
        x, y = g[SCALE_SUMMARY].astype(float), 100 * g[an.metric].astype(float)
        ax.scatter(x, y, color=st_["color"], marker=st_["marker"], s=22, alpha=0.7)
        ax.scatter(
            x.mean(),
            y.mean(),
            color=st_["color"],
            marker=st_["marker"],
            s=140,
            edgecolors="black",
            label=look.label(cell),
        )
    parts = []
    for _, r in an.correlations.iterrows():
        parts.append(
            f"{r.part}: rho {r.rho:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}], n_eff = {r.n}"
        )
    ax.set_xlabel("final log2 scale ratio (mean over blocks)")
    ax.set_ylabel(f"{'EMA ' if an.metric == 'test_acc_ema' else ''}test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, framealpha=0.6)
    ax.set_title(
        "Scale mixing against accuracy: small = one run, large = configuration mean\n"
        + "\n".join(parts)
        + "\n(Spearman, exploratory; between = configuration means, within = two-way "
        "residuals: configuration and seed removed)",
        fontsize=9,
    )
    _save(pdf, fig)


def dispersion_page(pdf, an: Analysis) -> None:
    """Spread across seeds: each cell's SD over its seeds with the SD's 95 % chi-square
    interval (n - 1 df: with 3 seeds it spans about 0.5x to 6x the SD), and the seed-level
    test of each axis (exploratory)."""
    import matplotlib.pyplot as plt

    cells = an.cells[an.cells.n >= 2]
    if cells.empty or an.dispersion.empty:
        return
    look = Look(an)
    fig, ax = plt.subplots(figsize=(A4[0], 6.0))
    x = np.arange(len(cells))
    sd = 100 * cells["std"].values.astype(float)
    lo = 100 * cells.get("sd_low", cells["std"]).values.astype(float)
    hi = 100 * cells.get("sd_high", cells["std"]).values.astype(float)
    for i, (_, c) in enumerate(cells.iterrows()):
        st_ = look.of(c)
        ax.bar(
            i,
            sd[i],
            color=st_["color"],
            hatch="//" if st_["linestyle"] == "--" else None,
            edgecolor="black",
            lw=0.5,
        )
    ns = sorted({int(n) for n in cells.n})
    ax.errorbar(
        x,
        sd,
        yerr=_yerr(sd, lo, hi),
        fmt="none",
        ecolor="black",
        capsize=4,
        lw=1,
        label="95 % chi-square CI of the SD ("
        + ", ".join(f"{n - 1} df" for n in ns)
        + f": {', '.join(map(str, ns))} seeds)",
    )
    ax.set_xticks(x, [look.label(c).replace(", ", "\n") for _, c in cells.iterrows()], fontsize=6)
    ax.set_ylabel("SD of test accuracy across seeds (points)")
    ax.set_ylim(0, None)
    tests = "; ".join(
        f"{r.axis}: F({r.df}) = {r.F:.2g}, p = {r.p:.2g} uncorrected"
        for _, r in an.dispersion.iterrows()
    )
    ax.set_title(
        "Stability: spread across seeds per configuration"
        + (" (hatched: " + f"{an.paired_axis}={look.paired_levels[0]})" if an.paired_axis else "")
        + f"\nseed-level test (each seed's mean absolute deviation, levels compared within "
        f"seed, n = {int(an.dispersion.n_seeds.iloc[0])} seeds; exploratory):\n{tests}",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    ax.grid(alpha=0.3, axis="y")
    _save(pdf, fig)


def privacy_utility_page(pdf, an: Analysis) -> None:
    """For a grid with an epsilon axis: accuracy against the epsilon each run spent."""
    import matplotlib.pyplot as plt

    if "epsilon" not in an.axes:
        return
    done = an.runs[(an.runs.status == "done") & an.runs.epsilon_spent.notna()]
    if done.empty:
        return
    look = Look(an)
    others = [a for a in an.axes if a != "epsilon"]
    fig, ax = plt.subplots(figsize=(A4[0], A4[0] * 0.8))
    keys = done.groupby(others, sort=False).groups if others else {(): done.index}
    for key, idx in keys.items():
        g = done.loc[idx]
        pts = g.groupby("epsilon")
        eps = pts.epsilon_spent.mean().astype(float)
        rows = [describe(v.astype(float)) for _, v in pts[an.metric]]
        m = np.array([r.mean for r in rows])
        lo = np.array([r.ci_low for r in rows])
        hi = np.array([r.ci_high for r in rows])
        st_ = look.of(g.iloc[0])
        label = ", ".join(f"{a}={v}" for a, v in zip(others, np.atleast_1d(key))) or "all"
        ax.errorbar(
            eps.values,
            100 * m,
            yerr=100 * _yerr(m, lo, hi),
            color=st_["color"],
            fmt="o" + st_["linestyle"],
            capsize=4,
            label=label,
        )
        ax.scatter(
            g.epsilon_spent.astype(float),
            100 * g[an.metric].astype(float),
            s=10,
            color="grey",
            alpha=0.6,
        )
    ax.set_xscale("log")
    ax.set_xlabel("epsilon spent (accountant; delta fixed)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(
        "Privacy-utility curve: mean with 95 % t CI over seeds; grey: single runs", fontsize=10
    )
    _save(pdf, fig)
