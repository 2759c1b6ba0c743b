"""Interactive reports: one self-contained HTML file per result or run (plotly, its script inlined once).

``trace_page`` and ``comparison_page`` build the pages behind ``Trace.to_html`` and
``Comparison.to_html``; :mod:`vlm_interp.runs` builds the page of a whole run folder from its
``run.json``. Why plotly: docs/report.md.
"""

from __future__ import annotations

from pathlib import Path

from .page import Page, Section, facts, table
from .sections import comparison_sections, labelled_sections, summary, trace_sections


def _written(page: Page, path: "str | Path | None") -> "str | Path":
    return page.html() if path is None else page.write(path)


def trace_page(trace, example=None, path: "str | Path | None" = None, title: str | None = None) -> "str | Path":
    """A trace's report: the HTML text, or the file written at ``path``. ``example`` (the traced example)
    adds the image with the effects of single image tokens over it."""
    page = Page(title or f"Trace: {trace.attrs.get('question', '')}")
    for section in trace_sections(trace, getattr(example, "image", None), getattr(example, "boxes", None)):
        page.add(section)
    return _written(page, path)


def comparison_page(table_rows: list[dict], test_rows: list[dict], path: "str | Path | None" = None,
                    title: str = "Comparison") -> "str | Path":
    """A comparison's report (its table with intervals, grouped plot and paired tests): HTML text or the file."""
    page = Page(title)
    for section in comparison_sections(table_rows, test_rows):
        page.add(section)
    return _written(page, path)


__all__ = ["Page", "Section", "facts", "table", "summary", "trace_sections", "labelled_sections",
           "comparison_sections", "trace_page", "comparison_page"]
