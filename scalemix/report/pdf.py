"""The multi-page PDF (matplotlib): the title page, the figures (figures.py), the tables,
the findings and the caveats."""

from __future__ import annotations

import textwrap
import time

import pandas as pd

from scalemix.report import figures
from scalemix.report.analysis import Analysis, privacy_settings

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
        "Contents: accuracy per axis (privacy-utility curve for an epsilon axis); paired "
        "differences; stability across seeds; learning curves; scale-ratio trajectories; scale "
        "mixing against accuracy per run; signal propagation at initialisation; tables (cells, "
        "paired comparisons over seeds and per test example, tests with the multiplicity plan); "
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
    path,
    an: Analysis,
    plan: dict,
    traj: pd.DataFrame,
    curves: pd.DataFrame,
    tables: dict,
    version: str,
) -> int:
    """Write the report; return the number of pages."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_pdf import PdfPages

    with PdfPages(path) as pdf:
        _title_page(pdf, an, plan, version)
        figures.accuracy_page(pdf, an, plan)
        figures.privacy_utility_page(pdf, an)
        figures.differences_page(pdf, an)
        figures.dispersion_page(pdf, an)
        figures.learning_curves_page(pdf, an, curves)
        figures.trajectory_page(pdf, an, traj)
        figures.scale_vs_accuracy_page(pdf, an)
        figures.spp_page(pdf, an)
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
            "Differences b - a in accuracy points, matched on seed. p (t): paired t test (the primary test; "
            "its CI is the interval it inverts), uncorrected and with the report-wide Holm; p (W): exact "
            "Wilcoxon signed-rank, Holm over the Wilcoxon tests (robustness); g_z: Hedges' small-sample "
            "corrected effect size with a noncentral-t CI; P(b>a): probability of improvement over all "
            "pairs of runs (ties 1/2), Hanley-McNeil CI.",
        )
        _table_page(
            pdf,
            "Paired comparisons per test example (second source of evidence)",
            tables.get("per_example", pd.DataFrame()),
            "The same comparisons scored example by example on the shared test set, pooled over the "
            "matched seeds: McNemar's exact test on the discordant examples and a bootstrap over test "
            "examples (the same examples resampled for every seed). Both hold the trained models fixed: "
            "they measure test-set noise only, not seed-to-seed variation. Uncorrected.",
        )
        _table_page(
            pdf,
            "Omnibus tests, the grid model, and scale mixing vs accuracy",
            tables["omnibus_corr"],
            "Friedman (blocked by seed) with a permutation p-value, else Kruskal-Wallis; the grid model "
            "fits every axis and interaction with seed as block; the primary questions (the comparisons, "
            "the omnibus tests and the model terms named in the grid's [report] questions) are Holm-"
            "corrected report-wide; everything else is exploratory and uncorrected. Brown-Forsythe: "
            "ANOVA on each run's distance to its cell's median. Spearman rho with a 95 % Fisher-z CI.",
        )
        _text_page(
            pdf,
            "Findings",
            [f"- {f}" for f in an.findings]
            + (["Warnings:"] + [f"- {w}" for w in an.warnings] if an.warnings else []),
        )
        _text_page(pdf, "Caveats", [f"- {c}" for c in CAVEATS])
        return pdf.get_pagecount()
