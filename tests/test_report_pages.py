"""What the report's pages say and show, checked without reading pixels: each SD with its
interval, the grid's privacy stated in full once, legends that name what is drawn and
stay off the data, footnotes that name only the columns shown, every p-value with its
correction, a light package import."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sps

from scalemix.report import figures
from scalemix.report.analysis import analyse
from scalemix.report.findings import caveats
from scalemix.report.pdf import title_lines
from scalemix.report.tables import (
    IQM_COLUMN,
    POI_COLUMN,
    SD_COLUMN,
    WILCOXON_COLUMN,
    display_tables,
    table_notes,
)

from .report_helpers import SIM_PLAN, quick_plan, quick_runs, simulated

PLAN = {"grid": {**SIM_PLAN["grid"], "report": {**SIM_PLAN["grid"]["report"], "sesoi": 1.0}}}


class Pages:
    """Stands in for PdfPages: keeps the figures a page function saves."""

    def __init__(self):
        self.figs = []

    def savefig(self, fig):
        fig.canvas.draw()  # lay out (legends, tight_layout) as the PDF would
        self.figs.append(fig)


class GridPrivacyStub:
    text = (
        "Everything published (24 private run(s)) is (137, 1e-05)-DP together (PRV "
        "accountant): the runs of each of 3 seed(s) share their Poisson batches and form one "
        "subsampled Gaussian mechanism per draw. (The runs' own epsilons add up to 192.) The "
        "noise's cut tails add at most 1 to delta (a vacuous bound at this epsilon)."
    )


def test_the_package_import_is_light_and_re_exports():
    code = (
        "import sys, scalemix.report as r; "
        "print(sorted(m for m in ('pandas', 'matplotlib', 'torch', 'scipy') if m in sys.modules)); "
        "from scalemix.report import build_report, display_tables, analyse; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "ok"


def test_each_cell_sd_carries_its_chi_square_interval():
    an = analyse(quick_runs(), quick_plan(metric="ema"))
    c = an.cells.iloc[0]
    chi = sps.chi2.ppf([0.975, 0.025], 2)  # n - 1 = 2 df
    assert (c.sd_low, c.sd_high) == pytest.approx(tuple(c["std"] * np.sqrt(2 / chi)))
    shown = display_tables(an)["cells"][SD_COLUMN].iloc[0]
    assert shown == f"{100 * c['std']:.1f} [{100 * c.sd_low:.1f}, {100 * c.sd_high:.1f}]"
    pages = Pages()
    figures.dispersion_page(pages, an)
    (fig,) = pages.figs
    ax = fig.axes[0]
    bars = [b for b in ax.containers if type(b).__name__ == "ErrorbarContainer"]
    assert len(bars) == 1 and "chi-square" in bars[0].get_label()
    segs = bars[0].lines[2][0].get_segments()  # one vertical segment per cell
    ends = np.array([[s[0][1], s[1][1]] for s in segs])
    assert ends == pytest.approx(100 * an.cells[["sd_low", "sd_high"]].values)
    assert "uncorrected" in ax.get_title()


def test_the_grids_privacy_is_stated_in_full_once():
    an = analyse(quick_runs(), quick_plan(metric="ema"), grid_privacy=GridPrivacyStub())
    full = "subsampled Gaussian mechanism per draw"
    title = title_lines(an, quick_plan(), "test")
    everything = " ".join(title + an.findings + caveats(an))
    assert everything.count(full) == 1 and sum(full in c for c in caveats(an)) == 1
    short = [f for f in an.findings if f.startswith("Privacy of the whole grid")]
    assert len(short) == 1 and "(137, 1e-05)-DP together" in short[0]
    assert "vacuous bound" in short[0] and "under Caveats" in short[0]
    assert any(t.startswith("Privacy of the whole grid") and "Caveats" in t for t in title)
    advice = "whatever data scores the choice"
    assert everything.count(advice) == 1


def _legend_texts(fig) -> list[str]:
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    return [t.get_text() for lg in legends for t in lg.get_texts()]


@pytest.mark.parametrize("metric, cut", [("raw", True), ("ema", False)])
def test_a_cut_interval_is_named_in_the_legend_only_when_drawn(metric, cut):
    """The raw metric's scalenorm = False interval over seed means reaches past 100 %
    (62-101, cut): its red triangle is named once in that panel's legend and in the title; the
    EMA metric cuts nothing, and then neither mentions one."""
    an = analyse(quick_runs(), quick_plan(metric=metric))
    assert (an.marginals.ci_cut == "high").any() == cut
    pages = Pages()
    figures.accuracy_page(pages, an, quick_plan())
    (fig,) = pages.figs
    per_panel = [
        sum("interval cut at 100 %" in t.get_text() for t in ax.get_legend().get_texts())
        for ax in fig.axes
        if ax.get_legend() is not None
    ]
    assert max(per_panel) == (1 if cut else 0)  # named once in a panel that draws one
    assert ("red triangle" in fig._suptitle.get_text()) == cut
    for ax in fig.axes:  # every legend below its panel, off the data
        lg = ax.get_legend()
        if lg is not None:
            assert lg.get_window_extent().y1 <= ax.get_window_extent().y0


def test_the_differences_legend_is_off_the_data_and_names_only_what_is_drawn():
    an = analyse(quick_runs(), quick_plan(metric="ema", sesoi=1.0))
    assert set(an.comparisons.verdict) == {"inconclusive"}
    pages = Pages()
    figures.differences_page(pages, an)
    (fig,) = pages.figs
    (ax,) = fig.axes
    assert ax.get_legend() is None and len(fig.legends) == 1
    box, data = fig.legends[0].get_window_extent(), ax.get_window_extent()
    assert box.y1 <= data.y0  # below the axes
    labels = _legend_texts(fig)
    assert any(t.startswith("inconclusive") for t in labels)
    assert not any(t.startswith(("effect", "equivalent")) for t in labels)


def _shown_vs_noted(an):
    tables = display_tables(an)
    notes = table_notes(an, tables)
    checks = [
        ("cells", IQM_COLUMN, "IQM"),
        ("comparisons", WILCOXON_COLUMN, "Wilcoxon"),
        ("comparisons", POI_COLUMN, "P(X_b > X_a)"),
    ]
    return [(col in tables[t], word in notes[t]) for t, col, word in checks], tables, notes


def test_footnotes_name_only_the_columns_shown():
    """3 seeds show no IQM, Wilcoxon or cross-seed P(X > Y) columns, and the footnotes do
    not name them; 8 seeds show all three, and the footnotes explain each."""
    few = analyse(quick_runs(), quick_plan(metric="ema"))
    many = analyse(
        simulated(8, {(g, sn): 0.8 + 0.02 * sn for g in (1, 4, 16) for sn in (False, True)}, 1),
        PLAN,
    )
    pairs, _, notes = _shown_vs_noted(few)
    assert pairs == [(False, False)] * 3
    assert "^" not in notes["cells"] and "^" not in notes["marginals"]  # nothing cut
    pairs, _, _ = _shown_vs_noted(many)
    assert pairs == [(True, True)] * 3
    raw = analyse(quick_runs(), quick_plan())  # the raw metric: scalenorm = False cut
    assert "^" in display_tables(raw)["marginals"].to_string()
    assert "cut at 0 or 100 %" in table_notes(raw, display_tables(raw))["marginals"]
    weights = table_notes(few, display_tables(few))["per_example"]
    assert "EMA weights'" in weights and "raw weights'" not in weights


P_VALUE = re.compile(r"\bp = ([0-9][0-9.e+-]*)")
CORRECTION = re.compile(r" (uncorrected|\(Holm over )")


def _unlabelled(text: str) -> list[str]:
    return [
        text[max(0, m.start() - 40) : m.end() + 20]
        for m in P_VALUE.finditer(text)
        if not CORRECTION.match(text, m.end())
    ]


@pytest.mark.parametrize("correction", ["holm", "gatekeeping"])
def test_every_p_value_is_followed_by_its_correction(correction):
    """Every "p = x" in the findings, the warnings and the figure pages' text reads
    "p = x uncorrected" or "p = x (Holm over ...)"; every table column of p-values says
    in its header whether it is uncorrected or adjusted (and how)."""
    runs = quick_runs()
    runs["final_log2_ratio"] = np.linspace(-1, 0, 24)
    an = analyse(runs, quick_plan(sesoi=1.0, correction=correction))
    texts = an.findings + an.warnings
    pages = Pages()
    figures.dispersion_page(pages, an)
    figures.scale_vs_accuracy_page(pages, an)
    for fig in pages.figs:
        texts += [t.get_text() for ax in fig.axes for t in (ax.title, ax.xaxis.label)]
    for t in texts:
        assert not _unlabelled(t), _unlabelled(t)
    assert sum(len(P_VALUE.findall(t)) for t in texts) > 20
    for name, table in display_tables(an).items():
        for col in table.columns:
            if re.search(r"(^|\W)p\b", col):
                assert re.search(r"uncorrected|adjusted|Holm", col), (name, col)


def test_the_title_page_says_what_finished_and_what_was_overridden():
    plan = quick_plan()
    plan["grid"]["sets"] = {"epochs": 1}
    an = analyse(quick_runs(), plan)
    lines = title_lines(an, plan, "test")
    assert any(x.startswith("Changed with --set") and "epochs = 1" in x for x in lines)
    as_run = next(x for x in lines if x.startswith("As run:"))
    assert "8 configurations x 3 seeds finished" in as_run
    assert not math.isnan(an.cells.sd_low.iloc[0])
