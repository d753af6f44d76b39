"""Statistical ablation reports: ``scalemix report DIR``.

One module per concern:

* ``collect.py``: a grid directory into one DataFrame of runs (and curves, trajectories,
  per-example predictions).
* ``stats.py``: the named estimators (t intervals, paired tests, TOST, Holm, Friedman,
  Spearman, repeated-measures ANOVA, power, variance components), each tested against
  scipy / statsmodels.
* ``plan.py``: the analysis plan (metric, primary questions, alpha, correction, smallest
  effect of interest), the multiplicity it prescribes and each test's verdict.
* ``gridmodel.py``: the grid model over seeds (complete block, repeated-measures ANOVA,
  equivalence per term), spread at the seed level, variance components, power.
* ``analysis.py``: assembles the analysis: runs and plan in, an ``Analysis`` out.
* ``findings.py``: the findings, warnings and caveats in words.
* ``tables.py``: the display tables and their footnotes; Markdown.
* ``figures.py``: one function per figure page; ``pdf.py``: the title, table and text
  pages, and the PDF.
* ``build.py``: ``build_report``, the report folder; ``compare.py``: grids side by side.

This module only re-exports (lazily: ``scalemix --help`` imports no pandas or matplotlib).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_report": "scalemix.report.build",
    "code_version": "scalemix.report.build",
    "findings_markdown": "scalemix.report.build",
    "display_tables": "scalemix.report.tables",
    "table_notes": "scalemix.report.tables",
    "md_table": "scalemix.report.tables",
    "analyse": "scalemix.report.analysis",
    "Analysis": "scalemix.report.analysis",
    "ReportPlan": "scalemix.report.plan",
    "compare_grids": "scalemix.report.compare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
