"""``scalemix report DIR1 DIR2 ...``: configurations shared by several grids, side by side.

Two cells of different grids are the same configuration when their resolved training
configurations agree in everything but the seed (``collect.configuration_key``).

Two grids that run one configuration run the *same experiment*: a difference between
them is seed noise (or a change of code or hardware), never a treatment, so nothing is
tested between grids. A seed both grids ran shares its batches in both (seeded streams);
its noise is the same only where one run reproduced the other (--noise-nonce), and then
the runs are bit-identical. Either way the seed counts once.
The configuration's result is then given once, over the distinct seeds of all the grids
(each seed counted once: a reproduced run is not a second seed), with its t interval.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd

from scalemix.errors import ConfigError
from scalemix.report import stats as st
from scalemix.report.collect import collect
from scalemix.train.rundir import read_json


def _label(row, axes: list[str]) -> str:
    return ", ".join(f"{a}={row[a]}" for a in axes) or "(base)"


def shared_configurations(grid_dirs: list):
    """(per grid and configuration; per pair of grids and configuration, the reproductions
    at the seeds both ran; per configuration, the result over its distinct seeds; the
    grids' descriptions)."""
    frames, grids, metrics = [], [], set()
    for d in grid_dirs:
        runs, plan = collect(d)
        g = plan["grid"]
        fixed = read_json(Path(d) / "analysis-plan.json") or {}
        metrics.add(((fixed.get("report") or g.get("report") or {}).get("metric")) or "raw")
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
    # the grids' planned metric where they agree (EMA or raw weights), else the raw one
    metric = "test_acc_ema" if metrics == {"ema"} and "test_acc_ema" in runs else "test_acc"
    runs["metric"] = runs[metric].astype(float)
    for gd in grids:
        gd["metric"] = "EMA weights" if metric == "test_acc_ema" else "raw weights"
    in_grids = runs.groupby("config_key").grid.nunique()
    shared = runs[runs.config_key.isin(in_grids[in_grids >= 2].index)].copy()
    shared["seed"] = shared.seed.astype(int)
    if shared.empty:
        raise ConfigError(
            "these grids share no configuration (every cell differs in some setting besides "
            "the seed); nothing to put side by side. Compare grids that repeat a cell, e.g. "
            "gn_groups at groups=16, scalenorm=true and epsilon at epsilon=8"
        )
    rows = []
    for (key, grid), g in shared.groupby(["config_key", "grid"], sort=False):
        acc = g.metric.astype(float)
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
                "ci_cut": s.ci_cut,
                "ci_method": s.ci_method,
                "values": dict(zip(g.seed.astype(int), acc)),
            }
        )
    per_grid = pd.DataFrame(rows)
    diffs = []
    for key, g in per_grid.groupby("configuration", sort=False):
        for (_, a), (_, b) in itertools.combinations(g.iterrows(), 2):
            same = sorted(set(a["values"]) & set(b["values"]))
            gaps = [abs(a["values"][s] - b["values"][s]) for s in same]
            sub = shared[shared.config_key == key]
            ra = sub[sub.grid == a["grid"]].set_index("seed")
            rb = sub[sub.grid == b["grid"]].set_index("seed")
            identical = [s for s in same if _bit_identical(ra.loc[s], rb.loc[s])]
            diffs.append(
                {
                    "configuration": key,
                    "a": a["grid"],
                    "b": b["grid"],
                    "same_seeds": len(same),
                    "bit_identical": len(identical),
                    "max_gap_same_seed": max(gaps, default=math.nan),
                    "only_in_a": len(set(a["values"]) - set(b["values"])),
                    "only_in_b": len(set(b["values"]) - set(a["values"])),
                    "reproduced": bool(same) and len(identical) == len(same),
                }
            )
    pooled = []
    for key, g in shared.groupby("config_key", sort=False):
        # a seed counts once: the mean of its runs (bit-identical reproductions, or runs
        # that differ by their own noise draws) is one value
        by_seed = g.groupby("seed").metric.mean()
        s = st.describe(by_seed.astype(float))
        pooled.append(
            {
                "configuration": key,
                "grids": ", ".join(dict.fromkeys(g.grid)),
                "runs": len(g),
                "distinct_seeds": s.n,
                "mean": s.mean,
                "ci_low": s.ci_low,
                "ci_high": s.ci_high,
                "ci_cut": s.ci_cut,
                "ci_method": s.ci_method,
            }
        )
    return per_grid, pd.DataFrame(diffs), pd.DataFrame(pooled), grids


RESULT_FIELDS = ("test_acc", "test_acc_ema", "test_loss", "steps", "epsilon_spent")


def _bit_identical(a, b) -> bool:
    """Two runs of one seed agree to the last bit in every result they both report (and in
    their per-example predictions where both stored them)."""
    import numpy as np

    from scalemix.report.collect import test_outcomes

    for f in RESULT_FIELDS:
        va, vb = a.get(f), b.get(f)
        if va is None or vb is None or (isinstance(va, float) and math.isnan(va)):
            continue
        if va != vb:
            return False
    if "run_dir" in a and "run_dir" in b:
        oa, ob = test_outcomes(a["run_dir"]), test_outcomes(b["run_dir"])
        if oa is not None and ob is not None and not np.array_equal(oa[0], ob[0]):
            return False
    return True


def compare_grids(grid_dirs: list, out_pdf=None, *, log=print) -> Path:
    """Write the side-by-side PDF and its tables (shared.csv, differences.csv)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    from scalemix.privacy.grid import grid_privacy_from_dirs
    from scalemix.report.build import code_version
    from scalemix.report.pdf import A4, table_page, text_page
    from scalemix.report.tables import ci_pct, md_table

    per_grid, diffs, pooled, grids = shared_configurations(grid_dirs)
    first = Path(grid_dirs[0])
    pdf_path = (
        Path(out_pdf)
        if out_pdf
        else first.parent / ("compare-" + "-".join(Path(d).name for d in grid_dirs)) / "report.pdf"
    )
    folder = pdf_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    per_grid.drop(columns=["values"]).to_csv(folder / "shared.csv", index=False)
    diffs.to_csv(folder / "reproductions.csv", index=False)
    pooled.to_csv(folder / "pooled.csv", index=False)
    show = pd.DataFrame(
        {
            "configuration": per_grid.configuration,
            "grid": per_grid.grid,
            "cell in that grid": per_grid.cell,
            "n (seeds)": per_grid.n,
            "seeds": per_grid.seeds.map(lambda v: ", ".join(map(str, v))),
            "mean (%)": per_grid["mean"].map(lambda v: f"{100 * v:.1f}"),
            "95% CI (%)": [
                ci_pct(lo, hi, c)
                for lo, hi, c in zip(per_grid.ci_low, per_grid.ci_high, per_grid.ci_cut)
            ],
            "CI method": per_grid.ci_method,
        }
    )
    show_d = pd.DataFrame(
        {
            "configuration": diffs.configuration,
            "grids": diffs.b + " / " + diffs.a,
            "seeds in both (runs)": diffs.same_seeds,
            "bit-identical (runs)": diffs.bit_identical,
            "largest gap at a shared seed (pts)": diffs.max_gap_same_seed.map(
                lambda v: "" if math.isnan(v) else f"{100 * v:.2f}"
            ),
            "seeds only in one grid": [
                f"{a} / {b}" for a, b in zip(diffs.only_in_b, diffs.only_in_a)
            ],
            "reproduction": [
                ("reproduced (same computation)" if r else "same seed, own noise: counted once")
                if s
                else "no shared seed"
                for r, s in zip(diffs.reproduced, diffs.same_seeds)
            ],
        }
    )
    show_p = pd.DataFrame(
        {
            "configuration": pooled.configuration,
            "grids": pooled.grids,
            "runs": pooled.runs,
            "n (distinct seeds)": pooled.distinct_seeds,
            "mean (%)": pooled["mean"].map(lambda v: f"{100 * v:.1f}"),
            "95% CI (%)": [
                ci_pct(lo, hi, c) for lo, hi, c in zip(pooled.ci_low, pooled.ci_high, pooled.ci_cut)
            ],
            "CI method": pooled.ci_method,
        }
    )
    (folder / "shared.md").write_text(
        md_table(show) + "\n" + md_table(show_d) + "\n" + md_table(show_p)
    )
    tmp = pdf_path.with_name(f".{pdf_path.name}.tmp")
    with PdfPages(tmp) as pdf:
        text_page(
            pdf,
            "scalemix: grids side by side",
            [
                "Grids: "
                + "; ".join(f"{g['name']} ({g['runs']} finished runs, {g['dir']})" for g in grids),
                "Privacy of the grids together: " + grid_privacy_from_dirs(grid_dirs).text,
                "Metric: final test accuracy of the "
                + grids[0].get("metric", "raw weights")
                + " (the grids' planned metric where they agree, else the raw weights').",
                f"Configurations shared by two or more grids: {per_grid.configuration.nunique()} "
                "(same resolved training configuration except the seed).",
                "Two grids that run one configuration run the same experiment: a difference "
                "between them is seed noise, not a treatment, so nothing is tested between "
                "grids. A seed both grids ran shares its batches in both (seeded streams); its "
                "runs are the same computation only where one reproduced the other's noise "
                "(--noise-nonce), and are then bit-identical; with noise of their own they "
                "differ by the noise alone. Either way the seed counts once: each "
                "configuration's result is given once, over its distinct seeds.",
                *[
                    f"Configuration {r.configuration}: {r.same_seeds} seed(s) in both "
                    f"{r.a} and {r.b}, {r.bit_identical} bit-identical"
                    + (
                        " (reproduced)"
                        if r.reproduced
                        else f", largest gap {100 * r.max_gap_same_seed:.2f} points (own noise)"
                        if r.same_seeds
                        else ""
                    )
                    + "."
                    for r in diffs.itertuples()
                ],
                f"Made with scalemix {code_version()}.",
            ],
        )
        keys = list(dict.fromkeys(per_grid.configuration))
        cut_drawn = False
        fig, axs = plt.subplots(len(keys), 1, figsize=(A4[0], 1.2 + 1.6 * len(keys)), squeeze=False)
        for ax, key in zip(axs[:, 0], keys):
            g = per_grid[per_grid.configuration == key].reset_index(drop=True)
            y = np.arange(len(g))[::-1]
            m = 100 * g["mean"].values
            lo = 100 * np.where(np.isfinite(g.ci_low), g.ci_low, g["mean"])
            hi = 100 * np.where(np.isfinite(g.ci_high), g.ci_high, g["mean"])
            ax.errorbar(m, y, xerr=[m - lo, hi - m], fmt="o", capsize=4, color="steelblue")
            for yi, c, end_lo, end_hi in zip(y, g.ci_cut, lo, hi):  # an interval cut at 0 / 100 %
                for marker, end, hit in (
                    (">", end_hi, ("high", "both")),
                    ("<", end_lo, ("low", "both")),
                ):
                    if c in hit:
                        ax.plot(
                            [end], [yi], marker=marker, color="firebrick", markersize=6, zorder=4
                        )
                        cut_drawn = True
            for yi, vals in zip(y, g["values"]):
                v = 100 * np.array(list(vals.values()))
                ax.scatter(v, np.full(len(v), yi - 0.15), s=10, color="grey")
            ax.set_yticks(y, [f"{r.grid}\n{r.cell}" for r in g.itertuples()], fontsize=7)
            ax.set_title(f"configuration {key}", fontsize=9, loc="left")
            ax.grid(alpha=0.3, axis="x")
        axs[-1, 0].set_xlabel(
            f"test accuracy, {grids[0].get('metric', 'raw weights')} (%): mean, 95 % t CI "
            "over seeds; grey: single runs"
            + (
                "\nred triangle: an interval cut at 0 or 100 % (its t interval reached past it)"
                if cut_drawn
                else ""
            )
        )
        fig.tight_layout()
        pdf.savefig(fig)
        plt.close(fig)
        cut_note = "^ marks an interval cut at 0 or 100 % (the t interval reached past it)."
        table_page(
            pdf,
            "Shared configurations per grid",
            show,
            "Each grid's runs of the configuration, one per seed; t interval over its seeds."
            + (" " + cut_note if any(c for c in per_grid.ci_cut) else ""),
        )
        table_page(
            pdf,
            "Reproductions: the seeds both grids ran",
            show_d,
            "Runs of one configuration and seed in two grids share their batches; they are "
            "the same computation only when one reproduced the other's noise (--noise-nonce). "
            "bit-identical: every reported result (and the per-example predictions where "
            "stored) equal to the last bit.",
        )
        table_page(
            pdf,
            "Each shared configuration over its distinct seeds",
            show_p,
            "Every seed counted once, whichever grids ran it; t interval over the seeds."
            + (" " + cut_note if any(c for c in pooled.ci_cut) else ""),
        )
    tmp.replace(pdf_path)
    log(
        f"comparison of {len(grids)} grids: {per_grid.configuration.nunique()} shared configurations -> {pdf_path}"
    )
    return pdf_path
