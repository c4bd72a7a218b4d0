"""Figures of the demo report: heatmaps, attention maps and bar charts as PNG files.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state, no display
needed); each function writes one PNG and returns its path. Used by :mod:`mishax_py.zoo.report`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["attention_figure", "bar_figure", "heatmap_figure"]


# ---------------------------------------------------------------------------------- figures
def _figure(width: float, height: float) -> Figure:
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
        rgba = im.to_rgba(v.numpy())  # [rows, cols, 4]
        for i in range(n_rows):
            for j in range(n_cols):
                x = float(v[i, j])
                if x == x:  # not NaN: white text on dark cells, black on light ones
                    r, g, b = (float(c) for c in rgba[i, j, :3])
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
