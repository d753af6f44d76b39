"""The multi-page PDF (matplotlib): the title page, the figures (figures.py), the tables
(tables.py, laid out to fit the page), the findings and the caveats (findings.py).
``text_page`` and ``table_page`` draw any such page (compare.py uses them too)."""

from __future__ import annotations

import textwrap
import time

import pandas as pd

from scalemix.report import figures
from scalemix.report.analysis import Analysis, privacy_settings
from scalemix.report.findings import caveats, privacy_summary
from scalemix.report.tables import table_notes

A4 = (8.27, 11.69)
LANDSCAPE = (11.69, 8.27)


def text_page(pdf, title: str, paragraphs: list[str], size=A4) -> None:
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size)
    fig.text(0.08, 0.95, title, fontsize=16, weight="bold", va="top")
    y = 0.91
    for para in paragraphs:
        bullet = para.startswith("- ")
        heading = para.endswith(":") and len(para) < 60
        lines = textwrap.wrap(para, 92 if size == A4 else 130)
        for i, line in enumerate(lines):
            fig.text(
                0.10 if bullet and i else 0.08,
                y,
                line,
                fontsize=9.5,
                va="top",
                family="DejaVu Sans",
                weight="bold" if heading else "normal",
            )
            y -= 0.019
            if y < 0.05 and i < len(lines) - 1:
                pdf.savefig(fig)
                plt.close(fig)
                fig = plt.figure(figsize=size)
                y = 0.95
        y -= 0.012
        if y < 0.05:
            pdf.savefig(fig)
            plt.close(fig)
            fig = plt.figure(figsize=size)
            y = 0.95
    pdf.savefig(fig)
    plt.close(fig)


def title_lines(an: Analysis, plan: dict, version: str) -> list[str]:
    """The title page's paragraphs: what was run (the preset, as run), the analysis plan
    as fixed, privacy, runs and compute; the grid's full study last, when a preset ran."""
    runs = an.runs
    c = runs.status.value_counts().to_dict()
    priv = privacy_settings(runs)
    secs = float(runs.train_seconds.fillna(0).sum()) if "train_seconds" in runs else 0.0
    g = plan["grid"]
    desc = " ".join(g.get("description", "").split())
    if an.preset:
        what = (
            f"This report: preset {an.preset!r} of grid {an.grid}: "
            + (
                g.get("preset_description") or "the grid's study with the preset's settings below"
            ).rstrip(".")
            + "."
        )
    else:
        what = f"This report: grid {an.grid}: {desc}"
    lines = [what]
    if g.get("sets"):  # --set overrides: the preset's own description may no longer hold
        lines.append(
            "Changed with --set on top of the "
            + ("preset" if an.preset else "grid file")
            + ": "
            + ", ".join(f"{k} = {v}" for k, v in g["sets"].items())
            + " (the description above predates them; the lines below are what ran)."
        )
    lines += [
        "As run: " + as_run(runs, an.axes),
        f"Made: {time.strftime('%Y-%m-%d %H:%M')}   scalemix {version}",
        "Shared by every cell"
        + (f" (preset {an.preset} applied)" if an.preset else "")
        + ": "
        + (", ".join(f"{k} = {v}" for k, v in g.get("base", {}).items()) or "-"),
        "Axes: " + "; ".join(f"{a} = {g['axes'][a]}" for a in an.axes) + f"; seeds = {g['seeds']}",
        "Pre-registration:",
        *an.plan.describe(),
        "The seed is the unit: the cells of one seed share their random streams (common "
        "random numbers), so every interval, test and count is over seeds (seed means, "
        "per-seed differences, the grid model with seed as block), and n is a number of seeds.",
        "Privacy settings: "
        + ", ".join(f"{k} = {v}" for k, v in priv.items())
        + ". Poisson sampling; epsilon_spent is what each run's accountant says it spent alone.",
        *[f"Epsilon assumes: {a}." for a in epsilon_assumptions(runs)],
    ]
    if an.grid_privacy is not None:
        lines.append(
            f"Privacy of the whole grid: {privacy_summary(an.grid_privacy)} (In full under "
            "Caveats, with what choosing a configuration costs.)"
        )
    lines += [
        f"Runs: {len(runs)} planned; done {c.get('done', 0)}, failed {c.get('failed', 0)}, "
        f"diverged {c.get('diverged', 0)}, pending/running {c.get('pending', 0) + c.get('running', 0)}.",
        f"Compute: {secs / 60:.1f} min of training in total"
        + (
            f", {runs.images_per_second.dropna().median():.0f} images/s median"
            if "images_per_second" in runs and runs.images_per_second.notna().any()
            else ""
        )
        + ".",
    ]
    if an.warnings:
        lines += ["Warnings:"] + [f"- {w}" for w in an.warnings]
    if an.preset and desc:
        lines.append(f"The grid's full study (NOT what this preset ran): {desc}")
    return lines


def as_run(runs, axes: list | None = None) -> str:
    """Data, resolution, sizes, steps and model the finished runs actually used, and how
    many configurations and seeds finished."""
    done = runs[runs.status == "done"]
    if done.empty:
        return "no finished run"

    def one(col):
        vals = sorted({str(v) for v in done[col].dropna()}) if col in done else []
        return vals[0] if len(vals) == 1 else (", ".join(vals) if vals else "?")

    shape = one("image_shape")
    return (
        f"data {one('data_name')} ({one('train_size')} train / {one('test_size')} test examples, "
        f"image {shape}), model {one('model')}, {one('steps')} steps per run"
        + (
            f"; {done.groupby(axes, dropna=False).ngroups} configurations x "
            f"{done.seed.nunique()} seeds finished."
            if axes and "seed" in done
            else "."
        )
    )


def epsilon_assumptions(runs) -> list[str]:
    """The distinct statements of what each run's epsilon assumes (seeded runs: a secret key)."""
    if "epsilon_assumes" not in runs:
        return []
    return sorted({a for a in runs.epsilon_assumes.dropna().tolist() if a})


# ------------------------------------------------------------------ tables that fit the page

TABLE_LEFT, TABLE_RIGHT, TABLE_TOP, TABLE_BOTTOM = 0.04, 0.96, 0.90, 0.12
MAX_COL_CHARS = 30  # a cell wraps at this many characters (headers at 16)


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(str(text), width, break_long_words=True) or [""]


def layout_table(frame: pd.DataFrame, size=LANDSCAPE):
    """Column widths (characters), wrapped cells and a font size such that the table fits
    the page width: every column as wide as its longest word or header word, at most
    MAX_COL_CHARS, the font shrunk (to 5 pt at least) until the sum fits. Returns
    (font size, widths, header lines, row lines)."""
    cols = list(frame.columns)
    widths = []
    for c in cols:
        longest = max([len(str(v)) for v in frame[c]] + [1])
        word = max([len(w) for w in str(c).split()] + [1])
        widths.append(max(min(longest, MAX_COL_CHARS), min(word, 16), 3))
    page_in = size[0] * (TABLE_RIGHT - TABLE_LEFT)
    font = 8.0
    while font > 5.0 and sum(w + 2 for w in widths) * 0.55 * font / 72 > page_in:
        font -= 0.25
    scale = page_in / (sum(w + 2 for w in widths) * 0.55 * font / 72)
    if scale < 1:  # still too wide at 5 pt: narrow the widest columns
        widths = [max(4, int(w * scale)) for w in widths]
    else:  # room to spare: every column wraps at the width it is drawn with
        widths = [int((w + 2) * scale) - 2 for w in widths]
    header = [_wrap(c, max(w, 4)) for c, w in zip(cols, widths)]
    rows = [[_wrap(v, w) for v, w in zip(r, widths)] for r in frame.astype(str).values]
    return font, widths, header, rows


def table_page(pdf, title: str, frame: pd.DataFrame, note: str = "", size=LANDSCAPE) -> int:
    """Draw ``frame`` on as many pages as it needs, every column inside the page, long
    cells wrapped; returns the pages drawn."""
    import matplotlib.pyplot as plt

    if frame.empty:
        return 0
    font, widths, header, rows = layout_table(frame, size)
    line_h = 1.3 * font / 72 / size[1]  # figure fraction per text line
    total = sum(w + 2 for w in widths)
    xs, x = [], TABLE_LEFT
    for w in widths:
        xs.append(x)
        x += (w + 2) / total * (TABLE_RIGHT - TABLE_LEFT)
    note_lines = textwrap.wrap(note, int(size[0] * 72 / (0.55 * 7.5) * 0.9)) if note else []
    pages, start = 0, 0
    while start < len(rows):
        fig = plt.figure(figsize=size)
        fig.text(TABLE_LEFT, 0.95, title + (" (continued)" if pages else ""), fontsize=12, va="top")
        y = TABLE_TOP
        h = max(len(c) for c in header)
        for xi, cell in zip(xs, header):
            fig.text(
                xi, y, "\n".join(cell), fontsize=font, weight="bold", va="top", linespacing=1.1
            )
        y -= h * line_h + 0.006
        fig.add_artist(
            plt.Line2D([TABLE_LEFT, TABLE_RIGHT], [y + 0.003] * 2, lw=0.8, color="black")
        )
        i = start
        while i < len(rows):
            rh = max(len(c) for c in rows[i])
            if y - rh * line_h < TABLE_BOTTOM and i > start:
                break
            for xi, cell in zip(xs, rows[i]):
                fig.text(xi, y, "\n".join(cell), fontsize=font, va="top", linespacing=1.1)
            y -= rh * line_h + 0.006
            fig.add_artist(
                plt.Line2D([TABLE_LEFT, TABLE_RIGHT], [y + 0.003] * 2, lw=0.3, color="grey")
            )
            i += 1
        if note_lines:
            fig.text(TABLE_LEFT, 0.02, "\n".join(note_lines), fontsize=7.5, va="bottom")
        pdf.savefig(fig)
        plt.close(fig)
        pages += 1
        start = i
    return pages


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

    notes = table_notes(an, tables)
    empty = pd.DataFrame()
    with PdfPages(path) as pdf:
        text_page(pdf, f"scalemix ablation report: {an.grid}", title_lines(an, plan, version))
        figures.accuracy_page(pdf, an, plan)
        figures.privacy_utility_page(pdf, an)
        figures.differences_page(pdf, an)
        figures.dispersion_page(pdf, an)
        figures.learning_curves_page(pdf, an, curves)
        figures.trajectory_page(pdf, an, traj)
        figures.scale_vs_accuracy_page(pdf, an)
        figures.spp_page(pdf, an)
        for key, title in (
            ("cells", f"Accuracy per cell ({an.metric_label})"),
            ("marginals", "Accuracy per level of each axis, over seed means"),
            ("comparisons", "Paired comparisons (simple effects, matched on seed)"),
            ("per_example", "Paired comparisons per test example (second source of evidence)"),
            ("omnibus_corr", "The grid model, omnibus tests, spread and scale mixing"),
        ):
            table_page(pdf, title, tables.get(key, empty), notes[key])
        text_page(
            pdf,
            "Findings",
            [f"- {f}" for f in an.findings]
            + (["Warnings:"] + [f"- {w}" for w in an.warnings] if an.warnings else []),
        )
        text_page(pdf, "Caveats", [f"- {c}" for c in caveats(an)])
        return pdf.get_pagecount()
