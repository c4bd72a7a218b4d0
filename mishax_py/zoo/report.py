"""Figures and the HTML page of the demo report (``mishax-py demo``).

Everything here is presentation: the numbers come from :mod:`mishax_py.zoo.demo`. Figures
are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state, no
display needed) and written as PNG files next to ``index.html``, which references them by
relative path, so the folder can be moved, zipped or served as is. The page is
self-contained otherwise (inline CSS, no external resources); a small inline script marks
every image that failed to decode (``data-broken="1"``) and sets ``data-report-ready`` on
``<body>`` once the page has loaded, which the browser test reads back with
``chromium --dump-dom``.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Section",
    "Table",
    "attention_figure",
    "bar_figure",
    "fmt",
    "heatmap_figure",
    "render_html",
    "text_table",
]


# ---------------------------------------------------------------------------------- figures
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def heatmap_figure(
    values: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    title: str,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    xlabel: str = "",
    ylabel: str = "",
    cmap: str = "RdBu",
    symmetric: bool = True,
    annotate: bool = False,
    colorbar_label: str = "",
    highlight: Sequence[tuple[int, int]] = (),
    vrange: tuple[float, float] | None = None,
    dpi: int = 110,
) -> str:
    """A labelled heatmap of ``values [rows, cols]`` as a PNG; ``highlight`` outlines cells. Returns the path.

    The colour range is symmetric around 0 (``symmetric``), the data's range, or ``vrange``.
    """
    v = values.detach().float().cpu()
    n_rows, n_cols = v.shape
    fig = _figure(min(3.0 + 0.32 * n_cols, 16), min(2.0 + 0.42 * n_rows, 14))
    ax = fig.add_subplot(1, 1, 1)
    finite = v[torch.isfinite(v)]
    if vrange is not None:
        vmin, vmax = vrange
    elif symmetric:
        vmax = float(finite.abs().max()) if finite.numel() else 1.0
        vmin, vmax = -(vmax or 1.0), vmax or 1.0
    else:
        vmin = float(finite.min()) if finite.numel() else 0.0
        vmax = float(finite.max()) if finite.numel() else 1.0
        vmax = vmax if vmax > vmin else vmin + 1.0
    im = ax.imshow(v.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(n_rows), labels=list(row_labels), fontsize=8)
    ax.set_xticks(range(n_cols), labels=list(col_labels), fontsize=7, rotation=90 if n_cols > 8 else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if annotate:
        for i in range(n_rows):
            for j in range(n_cols):
                x = float(v[i, j])
                if x == x:  # not NaN: white text on dark cells, black on light ones
                    r, g, b, _ = im.cmap(im.norm(x))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")  # fmt: skip
    from matplotlib.patches import Rectangle

    for i, j in highlight:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.5))
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if colorbar_label:
        cb.set_label(colorbar_label, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=dpi)
    return os.fspath(path)


def attention_figure(
    patterns: Sequence[torch.Tensor],
    titles: Sequence[str],
    tokens: Sequence[str],
    path: str | os.PathLike[str],
    *,
    suptitle: str = "",
    dpi: int = 100,
) -> str:
    """Attention maps ``[q_pos, k_pos]`` side by side (queries down, keys across) as a PNG.

    Token labels are drawn once per axis direction (keys under every map, queries left of the
    first), with a fixed layout: tick labels dominate matplotlib's drawing time.
    """
    n = max(1, len(patterns))
    T = len(tokens)
    side = min(max(3.0, 0.13 * T), 5.0)
    left, right, gap = 0.8, 0.2, 0.25
    bottom, top = 0.75, 0.55 if suptitle else 0.35
    width = left + n * side + (n - 1) * gap + right
    height = bottom + side + top
    fig = _figure(width, height)
    step = 1 if T <= 48 else max(1, T // 48)
    ticks = list(range(0, T, step))
    labels = [tokens[i] for i in ticks]
    for k, (pat, title) in enumerate(zip(patterns, titles, strict=True)):
        ax = fig.add_axes(((left + k * (side + gap)) / width, bottom / height, side / width, side / height))
        ax.imshow(pat.detach().float().cpu().numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest",
                  aspect="auto")  # fmt: skip
        ax.set_xticks(ticks, labels=labels, fontsize=5.5, rotation=90)
        if k == 0:
            ax.set_yticks(ticks, labels=labels, fontsize=5.5)
            ax.set_ylabel("query", fontsize=8)
        else:
            ax.set_yticks([])
        ax.set_title(title, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10, y=1 - 0.12 / height)
    fig.savefig(os.fspath(path), dpi=dpi)
    return os.fspath(path)


def bar_figure(
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str,
    ylabel: str,
    hline: float | None = None,
    ylim: tuple[float, float] | None = None,
    dpi: int = 110,
) -> str:
    """Grouped bars (one group per label, one bar per series) as a PNG; ``hline`` draws a dashed line."""
    n_groups, n_series = len(groups), max(1, len(series))
    fig = _figure(min(2.5 + 0.9 * n_groups * max(1, n_series / 2), 12), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / n_series
    colors = ["#3b6ea5", "#d1495b", "#66a182", "#edae49", "#8d6a9f", "#00798c"]
    for k, (name, vals) in enumerate(series.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(n_groups)]
        bars = ax.bar(xs, list(vals), width=width, label=name, color=colors[k % len(colors)])
        for b, val in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{val:.2f}", ha="center", va="bottom",
                    fontsize=7)  # fmt: skip
    ax.set_xticks(range(n_groups), labels=list(groups), fontsize=8, rotation=20 if n_groups > 6 else 0)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=dpi)
    return os.fspath(path)


# ------------------------------------------------------------------------------------ pages
@dataclass
class Table:
    """A table for the page: ``header`` and ``rows`` of cells (str/int/float; floats shown to 4 digits)."""

    header: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Section:
    """One section of the report: a title, paragraphs (HTML allowed), tables and figures (relative paths)."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (relative path, caption)
    anchor: str = ""


def fmt(x: Any) -> str:
    """A cell's text: floats to 4 significant digits (NaN as a dash), everything else ``str``."""
    if isinstance(x, float):
        if x != x:
            return "–"
        return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def _cell(x: Any) -> str:
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


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width text table (for the terminal summary)."""
    cells = [[str(h) for h in header]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
