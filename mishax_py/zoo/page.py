"""The HTML page of the demo report: sections, tables, and a fixed-width text table for the terminal.

The page is self-contained (inline CSS, no external resources) and references its figures by
relative path, so the report folder can be moved, zipped or served as is. A small inline
script marks every image that failed to decode (``data-broken="1"``) and sets
``data-report-ready`` on ``<body>`` once the page has loaded, which the browser test reads
back with ``chromium --dump-dom``. Paragraphs are HTML: callers escape text they interpolate.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Cell", "Section", "Table", "fmt", "render_html", "text_table"]

Cell = str | int | float | None


# ------------------------------------------------------------------------------------ pages
@dataclass
class Table:
    """A table for the page: ``header`` and ``rows`` of cells (str/int/float; floats shown to 4 digits)."""

    header: list[str]
    rows: list[list[Cell]]
    caption: str = ""


@dataclass
class Section:
    """One section of the report: a title, paragraphs (HTML allowed), tables and figures (relative paths)."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (relative path, caption)
    anchor: str = ""


def fmt(x: object) -> str:
    """A cell's text: floats to 4 significant digits (NaN and ``None`` as a dash), everything else ``str``."""
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != x:
            return "–"
        return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def _cell(x: object) -> str:
    return html.escape(fmt(x))


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    cap = f"<caption>{html.escape(t.caption)}</caption>" if t.caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1.5em 2em 4em; color: #1d1d1f; background: #fff; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.sub { color: #555; margin-top: 0; } nav a { margin-right: 1em; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0 1.2em; font-size: 0.88em; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f4f6; } tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1em 0 1.5em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #444; margin-top: 0.3em; }
code { background: #f3f4f6; padding: 0 0.25em; border-radius: 3px; }
.na { color: #8a6d00; background: #fff8e1; padding: 0.5em 0.8em; border-left: 3px solid #e0b000; }
"""

_CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var broken = 0;
  document.querySelectorAll('img').forEach(function (img) {
    var ok = img.complete && img.naturalWidth > 0;
    img.setAttribute(ok ? 'data-loaded' : 'data-broken', '1');
    if (!ok) { broken += 1; }
  });
  document.body.setAttribute('data-broken-images', String(broken));
  document.body.setAttribute('data-report-ready', '1');
});
"""


def render_html(
    path: str | os.PathLike[str], *, title: str, subtitle: str, sections: Sequence[Section], footer: str = ""
) -> str:
    """Write the report page to ``path`` (figures referenced by relative paths). Returns the path."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        f"<script>{_CHECK_SCRIPT}</script>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="sub">{subtitle}</p>',
        "<nav>" + "".join(
            f'<a href="#{s.anchor or _slug(s.title)}">{html.escape(s.title)}</a>' for s in sections
        ) + "</nav>",
    ]
    for s in sections:
        parts.append(f'<section id="{s.anchor or _slug(s.title)}"><h2>{html.escape(s.title)}</h2>')
        parts.extend(f"<p>{p}</p>" for p in s.paragraphs)
        parts.extend(_table_html(t) for t in s.tables)
        for src, cap in s.figures:
            parts.append(
                f'<figure><img src="{html.escape(src)}" alt="{html.escape(cap)}">'
                f"<figcaption>{html.escape(cap)}</figcaption></figure>"
            )
        parts.append("</section>")
    if footer:
        parts.append(f'<hr><p class="sub">{footer}</p>')
    parts.append("</body></html>")
    Path(path).write_text("\n".join(parts) + "\n", encoding="utf-8")
    return os.fspath(path)


def _slug(text: str) -> str:
    return "".join(c.lower() if c.isalnum() else "-" for c in text).strip("-")


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A fixed-width text table (for the terminal summary)."""
    cells = [[str(h) for h in header]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
