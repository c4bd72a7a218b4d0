"""Figures of the demo report: heatmaps, attention maps and bar charts as PNG files.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state, no display
needed). Each ``draw_*`` function returns the :class:`~matplotlib.figure.Figure` (tests measure
its text), each ``*_figure`` function draws and writes one PNG and returns its path. Used by
:mod:`mishax_py.zoo.report`.

Sized for the report page (``PAGE_WIDTH_PX``, about the page's text width): a figure is at most
that many pixels wide at its resolution, so it is shown at its own size and its tick labels
(at least ``MIN_FONT`` points) stay legible. Grids whose cells would all be one colour are
detected by :func:`looks_constant`; the report writes a sentence instead of drawing them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "DPI",
    "MIN_FONT",
    "PAGE_WIDTH_PX",
    "attention_figure",
    "bar_figure",
    "draw_attention",
    "draw_bars",
    "draw_heatmaps",
    "heatmap_figure",
    "looks_constant",
]

PAGE_WIDTH_PX = 1000  # the report page's text is about 1040 px wide (page.py: max-width 1100px, 2em padding)
DPI = 100
MIN_FONT = 8.0  # points: tick labels are never smaller


# ---------------------------------------------------------------------------------- helpers
def _figure(width: float, height: float, dpi: int = DPI) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> str:
    fig.savefig(os.fspath(path), dpi=fig.dpi)
    return os.fspath(path)


def looks_constant(values: torch.Tensor, vrange: tuple[float, float] | None = None, *, rtol: float = 0.02,
                   atol: float = 0.0) -> bool:
    """Whether a heatmap of ``values`` would show one colour, so drawing it would say nothing.

    True when the finite values span at most ``rtol`` of the colour scale (the width of
    ``vrange`` when given, else the largest ``|value|``) or at most ``atol``, or when no value
    is finite. Example: induction accuracy 0.9994..1.0 on a 0..1 scale is constant; 0..0.1 is not.
    """
    v = values.detach().double().flatten()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return True
    span = float(v.max() - v.min())
    scale = (vrange[1] - vrange[0]) if vrange is not None else float(v.abs().max())
    return span <= atol or span <= rtol * abs(scale)


def _ticks(n: int, length_in: float, font: float) -> list[int]:
    """Every label index when they fit side by side along ``length_in`` inches at ``font`` points, else every k-th."""
    per = font * 1.2 / 72.0  # one label's line height, inches
    step = max(1, math.ceil(n * per / max(length_in, 1e-6)))
    return list(range(0, n, step))


def _colour_range(values: Sequence[torch.Tensor], symmetric: bool,
                  vrange: tuple[float, float] | None) -> tuple[float, float]:
    if vrange is not None:
        return vrange
    finite = torch.cat([v[torch.isfinite(v)].flatten() for v in values]) if values else torch.zeros(0)
    if symmetric:
        vmax = float(finite.abs().max()) if finite.numel() else 1.0
        return -(vmax or 1.0), vmax or 1.0
    vmin = float(finite.min()) if finite.numel() else 0.0
    vmax = float(finite.max()) if finite.numel() else 1.0
    return vmin, (vmax if vmax > vmin else vmin + 1.0)


# ---------------------------------------------------------------------------------- heatmaps
def draw_heatmaps(
    panels: Sequence[tuple[torch.Tensor, str]],
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
    dpi: int = DPI,
) -> Figure:
    """Labelled heatmaps ``[rows, cols]`` (each ``(values, panel title)``) on one colour scale with one colourbar.

    Panels sit side by side when they fit the page width with cells at least 0.3 inch wide,
    else one above the other (wide grids: one row per layer, a column per position). The
    colour range is symmetric around 0 (``symmetric``), the data's range, or ``vrange``;
    ``annotate`` writes each value in its cell (when cells are wide enough); ``highlight`` outlines
    cells in every panel. Too many rows or columns to label each: every k-th is labelled.
    """
    from matplotlib.patches import Rectangle

    vals = [v.detach().float().cpu() for v, _ in panels]
    n_rows, n_cols = vals[0].shape
    k = len(vals)
    max_w = PAGE_WIDTH_PX / dpi
    left, right, cbar = 1.0, 0.25, 1.05  # inches: row labels; margin; colourbar and its label
    label_font = max(MIN_FONT, 9.0 if n_cols <= 12 else MIN_FONT)
    longest = max((len(str(c)) for c in col_labels), default=1)
    rotate = n_cols > 8 or longest > 4
    bottom = 0.5 + (0.075 * label_font / 8 * longest if rotate else 0.15)
    cell_w = min(0.75, (max_w - left - right - cbar - 0.35 * (k - 1)) / (k * n_cols))
    side_by_side = k == 1 or cell_w >= 0.3
    if not side_by_side:
        cell_w = min(0.75, (max_w - left - right - cbar) / n_cols)
    cell_h = max(0.3, min(0.6, cell_w)) if annotate else max(0.28, min(0.5, cell_w))
    panel_w, panel_h = n_cols * cell_w, n_rows * cell_h
    top_title = 0.55
    sub_title = 0.3 if any(t for _, t in panels) else 0.0
    if side_by_side:
        width = left + k * panel_w + (k - 1) * 0.35 + cbar + right
        height = top_title + sub_title + panel_h + bottom
    else:
        width = left + panel_w + cbar + right
        height = top_title + k * (sub_title + panel_h) + (k - 1) * 0.12 + bottom
    fig = _figure(width, height, dpi)
    vmin, vmax = _colour_range(vals, symmetric, vrange)
    axes: list[Axes] = []
    image = None
    for i, (v, (_, sub)) in enumerate(zip(vals, panels, strict=True)):
        if side_by_side:
            x0, y0 = left + i * (panel_w + 0.35), bottom
        else:
            x0 = left
            y0 = height - top_title - (i + 1) * (sub_title + panel_h) - i * 0.12
        ax = fig.add_axes((x0 / width, y0 / height, panel_w / width, panel_h / height))
        axes.append(ax)
        image = ax.imshow(v.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        xt = _ticks(n_cols, panel_w, label_font) if rotate else list(range(n_cols))
        ax.set_xticks(xt, labels=[str(col_labels[j]) for j in xt], fontsize=label_font, rotation=90 if rotate else 0)
        last_row = side_by_side or i == k - 1
        if not last_row:  # stacked panels share the column labels of the lowest
            ax.set_xticklabels([])
        yt = _ticks(n_rows, panel_h, label_font)
        if i == 0 or not side_by_side:
            ax.set_yticks(yt, labels=[str(row_labels[j]) for j in yt], fontsize=label_font)
            if ylabel:
                ax.set_ylabel(ylabel, fontsize=9)
        else:
            ax.set_yticks(yt, labels=[])
        if xlabel and last_row:
            ax.set_xlabel(xlabel, fontsize=9)
        if sub:
            ax.set_title(sub, fontsize=9)
        if annotate and cell_w >= 0.4:  # room for "-0.00" at 8 points
            rgba = image.to_rgba(v.numpy())  # [rows, cols, 4]
            for r in range(n_rows):
                for c in range(n_cols):
                    x = float(v[r, c])
                    if x == x:  # not NaN: white text on dark cells, black on light ones
                        cr, cg, cb = (float(q) for q in rgba[r, c, :3])
                        dark = 0.299 * cr + 0.587 * cg + 0.114 * cb < 0.5
                        ax.text(c, r, f"{x:.2f}", ha="center", va="center", fontsize=8,
                                color="white" if dark else "black")  # fmt: skip
        for r, c in highlight:
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.5))
    assert image is not None
    cax = fig.add_axes(((width - cbar - right + 0.2) / width, bottom / height, 0.15 / width,
                        (height - bottom - top_title) / height))  # fmt: skip
    colourbar = fig.colorbar(image, cax=cax)
    colourbar.ax.tick_params(labelsize=MIN_FONT)
    if colorbar_label:
        colourbar.set_label(colorbar_label, fontsize=9)
    fig.suptitle(title, fontsize=10.5, y=1 - 0.18 / height)
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
    panels: Sequence[tuple[torch.Tensor, str]] = (),
    panel_title: str = "",
    dpi: int = DPI,
) -> str:
    """A labelled heatmap of ``values [rows, cols]`` as a PNG (:func:`draw_heatmaps`); returns the path.

    ``panels``: more grids ``(values, title)`` of the same shape drawn next to it on the same
    colour scale (e.g. estimates next to the exact grid); ``panel_title`` titles ``values``' panel.
    """
    fig = draw_heatmaps([(values, panel_title), *panels], title=title, row_labels=row_labels, col_labels=col_labels,
                        xlabel=xlabel, ylabel=ylabel, cmap=cmap, symmetric=symmetric, annotate=annotate,
                        colorbar_label=colorbar_label, highlight=highlight, vrange=vrange, dpi=dpi)  # fmt: skip
    return _save(fig, path)


# ---------------------------------------------------------------------------------- attention
def draw_attention(
    patterns: Sequence[torch.Tensor],
    titles: Sequence[str],
    tokens: Sequence[str],
    *,
    suptitle: str = "",
    boundaries: Sequence[int] = (),
    dpi: int = DPI,
) -> Figure:
    """Attention maps ``[q_pos, k_pos]`` in a grid of two columns (queries down, keys across), one colourbar.

    Each map is about 4 inches square, so at the page's width every token is labelled (up to
    about 45 tokens; beyond, every k-th) at ``MIN_FONT`` points on both axes of every map.
    ``boundaries``: positions where a new segment starts (e.g. the repeated half), drawn as
    dashed lines on both axes. Light grid lines separate every fifth position.
    """
    n = max(1, len(patterns))
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    T = len(tokens)
    longest = max((len(str(t)) for t in tokens), default=1)
    lab = 0.15 + 0.075 * longest  # inches taken by the (rotated) token labels
    gap_x, cbar, right = lab + 0.25, 0.95, 0.1
    side = min(4.2, (PAGE_WIDTH_PX / dpi - lab - 0.35 - (cols - 1) * gap_x - cbar - right) / cols)
    title_h, sup_h = 0.35, 0.45 if suptitle else 0.1
    row_h = title_h + side + lab + 0.3
    width = lab + 0.35 + cols * side + (cols - 1) * gap_x + cbar + right
    height = sup_h + rows * row_h
    fig = _figure(width, height, dpi)
    ticks = _ticks(T, side, MIN_FONT)
    labels = [str(tokens[i]) for i in ticks]
    image = None
    for k, (pat, title) in enumerate(zip(patterns, titles, strict=True)):
        r, c = divmod(k, cols)
        x0 = lab + 0.35 + c * (side + gap_x)
        y0 = height - sup_h - r * row_h - title_h - side
        ax = fig.add_axes((x0 / width, y0 / height, side / width, side / height))
        image = ax.imshow(pat.detach().float().cpu().numpy(), cmap="Blues", vmin=0.0, vmax=1.0,
                          interpolation="nearest", aspect="auto")  # fmt: skip
        for p in range(4, T - 1, 5):
            ax.axhline(p + 0.5, color="#000000", alpha=0.08, linewidth=0.6)
            ax.axvline(p + 0.5, color="#000000", alpha=0.08, linewidth=0.6)
        for b in boundaries:
            ax.axhline(b - 0.5, color="#d1495b", linestyle="--", linewidth=0.9)
            ax.axvline(b - 0.5, color="#d1495b", linestyle="--", linewidth=0.9)
        ax.set_xticks(ticks, labels=labels, fontsize=MIN_FONT, rotation=90)
        ax.set_yticks(ticks, labels=labels, fontsize=MIN_FONT)
        ax.set_xlabel("key", fontsize=9, labelpad=2)
        ax.set_ylabel("query", fontsize=9, labelpad=2)
        ax.set_title(title, fontsize=10)
    if image is not None:
        top = height - sup_h - title_h
        cax = fig.add_axes(((width - cbar - right + 0.25) / width, (top - min(side, 3.0)) / height, 0.15 / width,
                            min(side, 3.0) / height))  # fmt: skip
        cb = fig.colorbar(image, cax=cax)
        cb.ax.tick_params(labelsize=MIN_FONT)
        cb.set_label("attention weight", fontsize=9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11, y=1 - 0.12 / height)
    return fig


def attention_figure(
    patterns: Sequence[torch.Tensor],
    titles: Sequence[str],
    tokens: Sequence[str],
    path: str | os.PathLike[str],
    *,
    suptitle: str = "",
    boundaries: Sequence[int] = (),
    dpi: int = DPI,
) -> str:
    """Attention maps as a PNG (:func:`draw_attention`); returns the path."""
    return _save(draw_attention(patterns, titles, tokens, suptitle=suptitle, boundaries=boundaries, dpi=dpi), path)


# ---------------------------------------------------------------------------------- bars
def draw_bars(
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    *,
    title: str,
    ylabel: str,
    hline: float | None = None,
    ylim: tuple[float, float] | None = None,
    dpi: int = DPI,
) -> Figure:
    """Grouped bars (one group per label, one bar per series), values written on the bars; ``hline``: a dashed line.

    Group labels are rotated (anchored at their group) when they would not fit side by side.
    """
    n_groups, n_series = len(groups), max(1, len(series))
    longest = max((len(str(g)) for g in groups), default=1)
    width = min(PAGE_WIDTH_PX / dpi, 2.5 + 0.9 * n_groups * max(1, n_series / 2))
    slot = (width - 1.2) / max(n_groups, 1)  # inches per group
    rotate = longest * 0.075 > slot * 0.95
    bottom = 0.4 + (0.065 * longest * 0.72 if rotate else 0.1)  # a 45° label's height: its length x sin 45°
    height = 3.0 + bottom
    fig = _figure(width, height, dpi)
    ax = fig.add_axes((0.9 / width, bottom / height, (width - 1.1) / width, (height - bottom - 0.45) / height))
    bar_w = 0.8 / n_series
    colors = ["#3b6ea5", "#d1495b", "#66a182", "#edae49", "#8d6a9f", "#00798c"]
    for k, (name, vals) in enumerate(series.items()):
        xs = [i - 0.4 + bar_w * (k + 0.5) for i in range(n_groups)]
        bars = ax.bar(xs, list(vals), width=bar_w, label=name, color=colors[k % len(colors)])
        for b, val in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{val:.2f}", ha="center", va="bottom",
                    fontsize=MIN_FONT)  # fmt: skip
    if rotate:
        ax.set_xticks(range(n_groups), labels=list(groups), fontsize=MIN_FONT, rotation=45, ha="right",
                      rotation_mode="anchor")  # fmt: skip
    else:
        ax.set_xticks(range(n_groups), labels=list(groups), fontsize=MIN_FONT)
    ax.tick_params(axis="y", labelsize=MIN_FONT)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(fontsize=MIN_FONT)
    return fig


def bar_figure(
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str,
    ylabel: str,
    hline: float | None = None,
    ylim: tuple[float, float] | None = None,
    dpi: int = DPI,
) -> str:
    """Grouped bars as a PNG (:func:`draw_bars`); returns the path."""
    return _save(draw_bars(groups, series, title=title, ylabel=ylabel, hline=hline, ylim=ylim, dpi=dpi), path)
