"""One self-contained HTML page: plotly's script inlined once, every figure, table and image inside the file.

The page opens from disk, offline, and survives being sent by e-mail: it loads nothing (no CDN, no
fonts, no MathJax). Figures keep their data as JSON in the page, so a test can read back what is drawn.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from ..files import atomic_write

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
p.note { color: #555; font-size: .9em; }
.figure { margin: 1em 0; }
"""


def esc(text) -> str:
    return html.escape(str(text))


def facts(items: dict) -> str:
    """A definition list of ``{label: value}`` (values escaped; None left out)."""
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items.items() if v is not None and v != "")
    return f'<dl class="facts">{rows}</dl>'


def table(rows: list[dict], columns: list[str] | None = None, digits: int = 3, caption: str = "") -> str:
    """An HTML table of ``rows`` (dicts); floats shown to ``digits`` places, text columns left-aligned."""
    if not rows:
        return "<p class='note'>(no rows)</p>"
    columns = columns or list(rows[0])

    def cell(v, tag="td"):
        text = f"{v:.{digits}f}" if isinstance(v, float) else esc(v)
        cls = "" if isinstance(v, (int, float)) else ' class="text"'
        return f"<{tag}{cls}>{text}</{tag}>"

    head = "".join(f'<th class="text">{esc(c)}</th>' for c in columns)
    body = "".join("<tr>" + "".join(cell(r.get(c, "")) for c in columns) + "</tr>" for r in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Section:
    """A titled part of the page: HTML blocks and figures, in order."""

    title: str
    parts: list = field(default_factory=list)  # str (HTML) or plotly figures

    def add(self, part) -> "Section":
        self.parts.append(part)
        return self


@dataclass
class Page:
    """A report page: a title and sections; :meth:`html` renders it, :meth:`write` writes it atomically."""

    title: str
    sections: list[Section] = field(default_factory=list)

    def add(self, section: Section) -> "Page":
        self.sections.append(section)
        return self

    def figures(self) -> list:
        return [p for s in self.sections for p in s.parts if not isinstance(p, str)]

    def html(self) -> str:
        from plotly.offline import get_plotlyjs

        config = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png"}}
        body = [f"<h1>{esc(self.title)}</h1>"]
        n = 0
        for section in self.sections:
            body.append(f"<h2>{esc(section.title)}</h2>")
            for part in section.parts:
                if isinstance(part, str):
                    body.append(part)
                    continue
                n += 1
                body.append('<div class="figure">' + part.to_html(full_html=False, include_plotlyjs=False,
                                                                  include_mathjax=False, config=config,
                                                                  div_id=f"figure-{n}") + "</div>")
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{esc(self.title)}</title><style>{STYLE}</style>"
                f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head>\n<body>\n"
                + "\n".join(body) + "\n</body></html>\n")

    def write(self, path: "str | Path") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, self.html())
