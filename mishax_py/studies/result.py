"""The result every study returns: the metric per patched element, with named axes.

A :class:`PatchingResult` holds ``values`` (a float32 tensor on the CPU), the names of its
``axes`` and tick ``labels``; :func:`plot` draws it as a labelled heatmap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PatchingResult", "plot"]


# ---------------------------------------------------------------------------------------------
@dataclass
class PatchingResult:
    """The metric for every patch, with its axes.

    Attributes:
        values: float32 tensor on the CPU, e.g. ``[n_layers, n_pos]``.
        axes: the axis names, e.g. ``("layer", "pos")``.
        labels: tick labels per axis (layer and head indices, positions or token strings).
        site: the patched site kind, e.g. ``"resid_pre"``.
        direction: ``"denoise"`` (clean into corrupted) or ``"noise"`` (corrupted into clean).
        clean, corrupt: the metric on the unpatched clean and corrupted runs.
    """

    values: torch.Tensor
    axes: tuple[str, ...]
    labels: dict[str, list[str]] = field(default_factory=dict)
    site: str = ""
    direction: str = "denoise"
    clean: float = float("nan")
    corrupt: float = float("nan")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.values[index]

    def normalized(self) -> torch.Tensor:
        """``(values - base) / (source - base)``: 1 where a patch moves the metric all the way to the
        source run's (for denoising, the fraction of the clean metric recovered)."""
        base, source = (self.corrupt, self.clean) if self.direction == "denoise" else (self.clean, self.corrupt)
        return (self.values - base) / (source - base)

    def __repr__(self) -> str:
        dims = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.values.shape, strict=True))
        return (f"PatchingResult({self.site!r}, {self.direction}, [{dims}], clean={self.clean:.4g}, "
                f"corrupt={self.corrupt:.4g})")


def plot(result: PatchingResult, path: str | os.PathLike[str], title: str | None = None, *,
         normalized: bool = False, cmap: str = "RdBu", dpi: int = 120) -> str:
    """Write a labelled heatmap PNG of ``result`` to ``path`` (matplotlib, Agg; pyplot state untouched).

    Layers (and heads) run down, positions across; ``[L, H, P]`` grids get one row per
    ``(layer, head)``. The colour scale is symmetric around 0. Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = result.normalized() if normalized else result.values
    v = values.detach().float().cpu()
    axes = result.axes
    if v.ndim == 1:
        grid, rows, cols = v[:, None], _tick(result, axes[0]), [""]
        xlabel, ylabel = "", axes[0]
    elif v.ndim == 2:
        grid, rows, cols = v, _tick(result, axes[0]), _tick(result, axes[1])
        ylabel, xlabel = axes
    elif v.ndim == 3:
        a, b = _tick(result, axes[0]), _tick(result, axes[1])
        grid = v.reshape(v.shape[0] * v.shape[1], v.shape[2])
        rows = [f"L{x} {axes[1][0].upper()}{y}" for x in a for y in b]
        cols, ylabel, xlabel = _tick(result, axes[2]), f"{axes[0]}, {axes[1]}", axes[2]
    else:
        raise ValueError(f"plot() needs a 1-, 2- or 3-axis result, got axes {axes}")
    finite = grid[torch.isfinite(grid)]
    vmax = float(finite.abs().max()) if finite.numel() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    n_rows, n_cols = grid.shape
    fig = Figure(figsize=(min(2.5 + 0.35 * n_cols, 30), min(1.8 + 0.28 * n_rows, 60)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid.numpy(), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(n_rows), labels=rows, fontsize=7)
    ax.set_xticks(range(n_cols), labels=cols, fontsize=7, rotation=90 if n_cols > 1 else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    what = "normalized metric" if normalized else "metric"
    ax.set_title(title or f"{result.direction} patching of {result.site} ({what})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=dpi)
    return os.fspath(path)


def _tick(result: PatchingResult, axis: str) -> list[str]:
    return result.labels.get(axis) or [str(i) for i in range(result.values.shape[result.axes.index(axis)])]
