"""The result every study returns: the metric per patched element, with named axes, usable as a tensor.

A :class:`PatchingResult` holds ``values`` (a float32 tensor on the CPU), the names of its
``axes`` and tick ``labels``, the patched ``site``, the ``direction`` and the metric on the
unpatched ``clean`` and ``corrupt`` runs; :meth:`PatchingResult.plot` (or :func:`plot`) draws it
as a labelled heatmap.

It also behaves as its ``values`` tensor, so code written the TransformerLens way (where
``get_act_patch_*`` return tensors) runs unchanged:

* ``torch.as_tensor(res)`` / ``torch.tensor(res)`` (DLPack: ``as_tensor`` shares the memory),
  ``np.asarray(res)`` (``__array__``), ``float(res)`` for a one-element result;
* ``res.shape``, ``len(res)``, iteration, ``res[0]`` and every other index (tensors back);
* arithmetic and comparisons with tensors, numbers and other results (``res - est``,
  ``2 * res``, ``-res``, ``res > 0``), all returning tensors;
* tensor methods (``res.argmax()``, ``res.topk(3)``, ``res.max()``, ``res.abs()``, ``res.sum()``,
  ``res.float()``, ``res.numpy()``, ``res.tolist()``, ...): the common ones are written out
  below, any other public ``torch.Tensor`` attribute is read from ``values``;
* torch functions (``torch.stack([res, res])``, ``torch.allclose(res, t)``, ``torch.where``):
  ``__torch_function__`` replaces every result among the arguments by its ``values``.

Subclasses (e.g. ``AttributionResult``) add fields; they should be declared with
``@dataclass(eq=False)`` so that ``==`` stays elementwise (a generated ``__eq__`` would compare
the fields as a tuple).
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["PatchingResult", "plot"]


def _unwrap(x: object) -> Any:
    """``x`` with every :class:`PatchingResult` (also inside lists, tuples and dicts) replaced by its ``values``."""
    if isinstance(x, PatchingResult):
        return x.values
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _binary(name: str) -> Callable[[PatchingResult, object], torch.Tensor]:
    """The dunder ``name`` of ``values`` applied with the other operand unwrapped."""

    def op(self: PatchingResult, other: object) -> torch.Tensor:
        return getattr(self.values, name)(_unwrap(other))

    op.__name__ = name
    return op


@dataclass(eq=False)
class PatchingResult:
    """The metric for every patch, with its axes; behaves as the ``values`` tensor (see the module docs).

    Attributes:
        values: float32 tensor on the CPU, e.g. ``[n_layers, n_pos]``; 0-dim for a study with one
            number (``path_patching``).
        axes: the axis names, e.g. ``("layer", "pos")``; ``()`` for a 0-dim result.
        labels: tick labels per axis (layer and head indices, positions or token strings).
        site: the patched site kind, e.g. ``"resid_pre"`` (``"path"`` for path patching).
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

    # -- the study's own view -------------------------------------------------------------------
    def normalized(self) -> torch.Tensor:
        """``(values - base) / (source - base)``: 1 where a patch moves the metric all the way to the
        source run's (for denoising, the fraction of the clean metric recovered)."""
        base, source = (self.corrupt, self.clean) if self.direction == "denoise" else (self.clean, self.corrupt)
        return (self.values - base) / (source - base)

    def plot(self, path: str | os.PathLike[str], title: str | None = None, **kwargs: Any) -> str:
        """Write a labelled heatmap PNG to ``path`` (keywords as for :func:`plot`: ``normalized=``,
        ``cmap=``, ``dpi=``); returns the path."""
        return plot(self, path, title, **kwargs)

    def __repr__(self) -> str:
        dims = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.values.shape, strict=True))
        value = f"value={builtins.float(self.values):.4g}, " if self.values.ndim == 0 else ""
        return (f"PatchingResult({self.site!r}, {self.direction}, [{dims}], {value}clean={self.clean:.4g}, "
                f"corrupt={self.corrupt:.4g})")

    # -- conversion ---------------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func: Callable[..., Any], types: object, args: Sequence[object] = (),
                           kwargs: Mapping[str, object] | None = None) -> Any:
        return func(*_unwrap(tuple(args)), **_unwrap(dict(kwargs or {})))

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return self.values.detach().__dlpack__(*args, **kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.values.__dlpack_device__()

    def __array__(self, dtype: np.dtype[Any] | None = None, copy: bool | None = None) -> np.ndarray[Any, Any]:
        out = self.values.detach().cpu().numpy()
        return out if dtype is None else out.astype(dtype)

    def __float__(self) -> builtins.float:
        return builtins.float(self.values)

    def __int__(self) -> int:
        return int(self.values)

    def __bool__(self) -> bool:
        return bool(self.values)

    def __format__(self, spec: str) -> str:
        if spec and self.values.numel() == 1:
            return format(builtins.float(self.values), spec)
        return super().__format__(spec)

    # -- container ----------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.values)

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.values[_unwrap(index)]

    def __setitem__(self, index: Any, value: object) -> None:
        self.values[_unwrap(index)] = _unwrap(value)

    # -- arithmetic and comparisons: tensors back ---------------------------------------------------
    __add__ = _binary("__add__")
    __radd__ = _binary("__radd__")
    __sub__ = _binary("__sub__")
    __rsub__ = _binary("__rsub__")
    __mul__ = _binary("__mul__")
    __rmul__ = _binary("__rmul__")
    __truediv__ = _binary("__truediv__")
    __rtruediv__ = _binary("__rtruediv__")
    __floordiv__ = _binary("__floordiv__")
    __rfloordiv__ = _binary("__rfloordiv__")
    __mod__ = _binary("__mod__")
    __rmod__ = _binary("__rmod__")
    __pow__ = _binary("__pow__")
    __rpow__ = _binary("__rpow__")
    __matmul__ = _binary("__matmul__")
    __rmatmul__ = _binary("__rmatmul__")
    __lt__ = _binary("__lt__")
    __le__ = _binary("__le__")
    __gt__ = _binary("__gt__")
    __ge__ = _binary("__ge__")
    __eq__ = _binary("__eq__")  # type: ignore[assignment]
    __ne__ = _binary("__ne__")  # type: ignore[assignment]
    __hash__ = object.__hash__  # by identity, as tensors

    def __neg__(self) -> torch.Tensor:
        return -self.values

    def __pos__(self) -> torch.Tensor:
        return +self.values

    def __abs__(self) -> torch.Tensor:
        return self.values.abs()

    # -- the common tensor methods (any other public Tensor attribute: __getattr__) --------------
    def argmax(self, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
        return self.values.argmax(dim, keepdim)

    def argmin(self, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
        return self.values.argmin(dim, keepdim)

    def topk(self, k: int, dim: int = -1, largest: bool = True, sorted: bool = True) -> Any:
        """``values.topk(...)``: a ``(values, indices)`` named tuple."""
        return self.values.topk(k, dim, largest, sorted)

    def max(self, *args: Any, **kwargs: Any) -> Any:
        """``values.max(...)``: a tensor, or with ``dim`` a ``(values, indices)`` named tuple."""
        return self.values.max(*args, **_unwrap(kwargs))

    def min(self, *args: Any, **kwargs: Any) -> Any:
        """``values.min(...)``: a tensor, or with ``dim`` a ``(values, indices)`` named tuple."""
        return self.values.min(*args, **_unwrap(kwargs))

    def abs(self) -> torch.Tensor:
        return self.values.abs()

    def sum(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.values.sum(*args, **kwargs)

    def mean(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.values.mean(*args, **kwargs)

    def item(self) -> builtins.float:
        return builtins.float(self.values.item())

    def numpy(self) -> np.ndarray[Any, Any]:
        return self.values.detach().cpu().numpy()

    def tolist(self) -> Any:
        return self.values.tolist()

    def float(self) -> torch.Tensor:
        return self.values.float()

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the result lacks; never for private names or before ``values`` is set
        # (copy/pickle probe ``__setstate__`` and friends on a bare instance).
        if not name.startswith("_") and name != "values" and hasattr(torch.Tensor, name):
            return getattr(self.values, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


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
    vmax = builtins.float(finite.abs().max()) if finite.numel() else 1.0
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
