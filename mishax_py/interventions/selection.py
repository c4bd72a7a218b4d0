"""Selectors: which entries of a site's value a built-in edit touches, as a boolean mask.

Site layouts: residual-like sites ``[batch, pos, d]``, per-head sites ``[batch, pos, head, d_head]``,
attention maps (``attn.scores`` / ``attn.pattern``) ``[batch, head, q_pos, k_pos]``.

``rows=`` (dim 0), ``positions=`` (dim 1; the query dim 2 on attention maps), ``heads=`` (dim 2 on
per-head sites, dim 1 on maps) and ``index=`` (the last dim) are normalised once, when an edit is
built (:class:`Selector`), and turned into a mask per call (:meth:`Selector.build`): the product of
the selectors, plus for each selected dim the map from site index to selection index that lets a
value with one entry per selected index be matched to them (:mod:`.fitting`). No Python loop over rows,
heads or positions at run time. The rules for positions (absolute, ``"new"``, per-row lists) are
in :mod:`mishax_py.interventions`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from mishax_py.runtime import SiteEvent

__all__ = [
    "IndexLike",
    "PositionSpec",
    "Positions",
    "PositionsLike",
    "Scope",
    "Selection",
    "Selector",
    "SiteLayout",
    "format_shape",
    "normalize_index",
    "normalize_positions",
    "resolve_index",
    "site_layout",
]


class Positions(enum.Enum):
    """Symbolic position selectors: ``ALL`` (every position, the default) and ``NEW``
    (every position at or after the prompt length, i.e. the tokens ``model.generate`` adds)."""

    ALL = "all"
    NEW = "new"


#: A rows / heads / index selector: an int, a list or 1-D LongTensor of ints, a 1-D bool mask, or a slice.
IndexLike = int | slice | Sequence[int] | torch.Tensor
#: A ``positions=`` selector (see the package docs): also per-row lists, ``[batch, k]`` tensors, "all"/"new".
PositionsLike = IndexLike | Sequence[Sequence[int]] | Positions | str | None


@dataclass(frozen=True)
class SiteLayout:
    """Where the batch-independent selector dims of a site are."""

    pos_dim: int | None  # positions (query positions on attention maps)
    head_dim: int | None
    is_map: bool  # [batch, head, q_pos, k_pos]


def site_layout(site: str, ndim: int) -> SiteLayout:
    """The layout of a value of ``ndim`` dims at ``site`` (attention maps are the ``scores``/``pattern`` sites)."""
    if ndim == 4 and site.rsplit(".", 1)[-1] in ("scores", "pattern"):
        return SiteLayout(2, 1, True)
    if ndim == 4:
        return SiteLayout(1, 2, False)
    if ndim >= 2:
        return SiteLayout(1, None, False)
    return SiteLayout(None, None, False)


def format_shape(shape: Sequence[int | None] | torch.Size | None) -> str:
    """``(3, ?, 32)`` for error messages (``?`` where a size is unknown before the run)."""
    if shape is None:
        return "(unknown)"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def normalize_index(x: IndexLike | None, what: str) -> torch.Tensor | slice | None:
    """Normalise a rows/heads/index selector to a 1-D LongTensor or a slice."""
    if x is None or isinstance(x, slice):
        return x
    if isinstance(x, bool):
        raise TypeError(f"{what}= must be an int, a list of ints, a slice or a LongTensor, got a bool")
    if isinstance(x, int):
        return torch.tensor([x], dtype=torch.long)
    t = torch.as_tensor(x)
    if t.numel() == 0 and not isinstance(x, torch.Tensor):  # [] selects nothing (and is no float)
        t = t.long()
    if t.dtype == torch.bool:
        if t.ndim != 1:
            raise ValueError(f"a boolean {what}= mask must be 1-D, got shape {tuple(t.shape)}")
        return t.nonzero().flatten()
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{what}= must hold integers, got dtype {t.dtype}")
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1:
        raise ValueError(f"{what}= must be 1-D, got shape {tuple(t.shape)}")
    return t.long()


def resolve_index(sel: torch.Tensor | slice, size: int, what: str, site: str, shape: Sequence[int | None]
                  ) -> torch.Tensor:
    """Selected indices in ``range(size)`` (negatives from the end); IndexError when out of range."""
    if isinstance(sel, slice):
        return torch.arange(*sel.indices(size))
    bad = (sel < -size) | (sel >= size)
    if bool(bad.any()):
        raise IndexError(
            f"{what}={sel.tolist()} out of range at site {site!r} of shape {format_shape(shape)}: "
            f"{what} must be in [-{size}, {size})"
        )
    return torch.where(sel < 0, sel + size, sel)


@dataclass(frozen=True)
class PositionSpec:
    """A normalised ``positions=`` selector.

    ``kind``: ``"all"`` | ``"new"`` | ``"list"`` (``values`` ``[k]``) | ``"slice"`` (``values`` a slice) |
    ``"rows"`` (per-row: ``values`` ``[R, k]`` padded, ``valid`` ``[R, k]`` bool).
    """

    kind: str
    values: torch.Tensor | slice | None = None
    valid: torch.Tensor | None = None

    def describe(self) -> str | None:
        """How the selector reads in messages (``None`` for "all")."""
        if self.kind == "all":
            return None
        if self.kind == "new":
            return "'new'"
        if self.kind == "slice":
            return repr(self.values)
        assert isinstance(self.values, torch.Tensor)
        if self.kind == "list":
            return str(self.values.tolist())
        assert self.valid is not None
        return str([r[v].tolist() for r, v in zip(self.values, self.valid, strict=True)])


def normalize_positions(p: PositionsLike) -> PositionSpec:
    """Normalise a ``positions=`` selector once, at construction."""
    if p is None:
        return PositionSpec("all")
    if isinstance(p, Positions):
        return PositionSpec(p.value)  # "all" | "new"
    if isinstance(p, str) and p.lower() in ("all", "new"):
        return PositionSpec(p.lower())
    if isinstance(p, str):
        raise ValueError(f"positions={p!r}: expected 'all', 'new', an int, a list, a slice or a LongTensor")
    if isinstance(p, slice):
        return PositionSpec("slice", p)
    if isinstance(p, bool):
        raise TypeError("positions= must be an int, a list of ints, a slice or a LongTensor, got a bool")
    if isinstance(p, int):
        return PositionSpec("list", torch.tensor([p], dtype=torch.long))
    if isinstance(p, torch.Tensor):
        if p.dtype.is_floating_point or p.dtype == torch.bool:
            raise TypeError(f"positions= must hold integers, got dtype {p.dtype}")
        if p.ndim <= 1:
            return PositionSpec("list", p.long().reshape(-1))
        if p.ndim == 2:
            return PositionSpec("rows", p.long(), torch.ones(p.shape, dtype=torch.bool))
        raise ValueError(f"positions= tensor must be 1-D or [batch, k], got shape {tuple(p.shape)}")
    items = list(p)
    if items and all(isinstance(r, (list, tuple, range, torch.Tensor)) for r in items):
        rows = [torch.as_tensor(r if isinstance(r, torch.Tensor) else list(cast("Sequence[int]", r)),
                                dtype=torch.long).reshape(-1) for r in items]
        k = max((len(r) for r in rows), default=0)
        values = torch.zeros(len(rows), k, dtype=torch.long)
        valid = torch.zeros(len(rows), k, dtype=torch.bool)
        for i, r in enumerate(rows):  # once, at construction
            values[i, : len(r)] = r
            valid[i, : len(r)] = True
        return PositionSpec("rows", values, valid)
    return PositionSpec("list", torch.as_tensor(items, dtype=torch.long).reshape(-1))


@dataclass
class Scope:
    """What one application of an edit knows: site, absolute offset, and the sub-batch mapping."""

    site: str
    offset: int
    full_batch: int  # the run's batch (before restricting to event.rows)
    rows: torch.Tensor | None  # event.rows on the value's device, or None
    event: SiteEvent


@dataclass
class Selection:
    """A built selection: the mask (None = everything) and, per selected dim, (k, inverse map)."""

    mask: torch.Tensor | None
    maps: dict[int, tuple[int, torch.Tensor]]  # dim -> (number selected, map local index -> selection index)
    layout: SiteLayout


def _no_heads_message(site: str, shape: Sequence[int | None]) -> str:
    return (
        f"heads= given, but site {site!r} of shape {format_shape(shape)} has no head dim; heads= works on per-head "
        "sites [batch, pos, head, d_head] (attn.q/k/v/rot_q/rot_k/z) and attention maps [batch, head, q, k] "
        "(attn.scores/pattern)"
    )


def _rowwise(t: torch.Tensor, scope: Scope, batch: int, what: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A per-row tensor for this (sub-)batch: rows 1 or ``batch``, or the full run's rows read at ``rows``."""
    r = t.shape[0]
    if r == 1 or r == batch:
        return t
    if scope.rows is not None and r == scope.full_batch:
        return t.index_select(0, scope.rows.to(t.device))
    expected = f"1 or {batch}" + (f" (or the run's {scope.full_batch})" if scope.rows is not None else "")
    raise ValueError(f"{what} have {r} rows but site {scope.site!r} has shape {format_shape(shape)}: "
                     f"expected {expected}")


@dataclass(frozen=True)
class Selector:
    """The normalised selectors of one edit: rows x positions x heads x units (``None``: every entry)."""

    positions: PositionSpec
    heads: torch.Tensor | slice | None
    index: torch.Tensor | slice | None
    rows: torch.Tensor | slice | None

    @classmethod
    def of(cls, *, positions: PositionsLike = None, heads: IndexLike | None = None, index: IndexLike | None = None,
           rows: IndexLike | None = None) -> Selector:
        """Normalise the user's selectors (errors for bad ones are raised here, at construction)."""
        return cls(normalize_positions(positions), normalize_index(heads, "heads"), normalize_index(index, "index"),
                   normalize_index(rows, "rows"))

    def describe(self) -> str:
        """``"heads=[1], positions=[3]"`` for messages and reprs ("" when everything is selected)."""
        parts = []
        for name, sel in (("rows", self.rows), ("heads", self.heads), ("index", self.index)):
            if sel is not None:
                parts.append(f"{name}={sel if isinstance(sel, slice) else sel.tolist()}")
        pos = self.positions.describe()
        if pos is not None:
            parts.append(f"positions={pos}")
        return ", ".join(parts)

    def at_dim(self, d: int, lay: SiteLayout, nd: int) -> torch.Tensor | slice | None:
        """The selector acting along dim ``d`` of an ``nd``-dim value (positions only when a slice)."""
        if d == 0:
            return self.rows
        if d == lay.head_dim:
            return self.heads
        if d == nd - 1 and self.index is not None:
            return self.index
        if d == lay.pos_dim:
            return self.positions.values if self.positions.kind == "slice" else None
        return None

    # -- at run time ---------------------------------------------------------------------------
    def build(self, value: torch.Tensor, scope: Scope) -> Selection:
        """The mask (broadcastable to ``value``) and index maps of this selection at one site call."""
        shape, nd, dev, site = tuple(value.shape), value.ndim, value.device, scope.site
        lay = site_layout(site, nd)
        masks: list[torch.Tensor] = []
        maps: dict[int, tuple[int, torch.Tensor]] = {}

        def view_at(m: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
            # m has one axis per entry of dims; place them there, 1 elsewhere.
            target = [1] * nd
            for axis, d in enumerate(dims):
                target[d] = m.shape[axis]
            return m.reshape(target)

        def flat(sel: torch.Tensor | slice, dim: int, what: str) -> None:
            idx = resolve_index(sel, shape[dim], what, site, shape).to(dev)
            m = torch.zeros(shape[dim], dtype=torch.bool, device=dev)
            m[idx] = True
            masks.append(view_at(m, [dim]))
            inv = torch.zeros(shape[dim], dtype=torch.long, device=dev)
            inv[idx] = torch.arange(idx.numel(), device=dev)
            maps[dim] = (idx.numel(), inv)

        if self.rows is not None:
            flat(self.rows, 0, "rows")
        if self.heads is not None:
            if lay.head_dim is None:
                raise ValueError(_no_heads_message(site, shape))
            flat(self.heads, lay.head_dim, "heads")
        if self.index is not None:
            flat(self.index, nd - 1, "index")
        if self.positions.kind != "all":
            if lay.pos_dim is None:
                raise ValueError(
                    f"positions= given, but site {site!r} of shape {format_shape(shape)} has no position dim"
                )
            pm, pmap = self._position_mask(shape[0], shape[lay.pos_dim], scope, dev, shape)
            masks.append(view_at(pm, [0, lay.pos_dim]))
            if pmap is not None:
                maps[lay.pos_dim] = pmap
        mask = None
        for m in masks:
            mask = m if mask is None else mask & m
        return Selection(mask, maps, lay)

    def _position_mask(
        self, batch: int, n: int, scope: Scope, dev: torch.device, shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, tuple[int, torch.Tensor] | None]:
        """Mask ``[1 or batch, n]`` over this forward's positions, and the selection map if a list/slice."""
        spec, offset = self.positions, scope.offset
        total = offset + n
        local = torch.arange(n, device=dev)
        if spec.kind == "new":
            prompt = scope.event.context.prompt.length(offset, n)
            return (local + offset >= prompt)[None], None
        if spec.kind in ("list", "slice"):
            if spec.kind == "slice":
                assert isinstance(spec.values, slice)
                absolute = torch.arange(*spec.values.indices(total), device=dev)
            else:
                assert isinstance(spec.values, torch.Tensor)
                absolute = spec.values.to(dev)
                absolute = torch.where(absolute < 0, absolute + total, absolute)
                if bool((absolute < 0).any()):
                    raise IndexError(
                        f"positions={spec.values.tolist()} out of range at site {scope.site!r} of shape "
                        f"{format_shape(shape)} (sequence length so far {total})"
                    )
            loc = absolute - offset
            ok = (loc >= 0) & (loc < n)
            k = absolute.numel()
            m = torch.zeros(n + 1, dtype=torch.bool, device=dev)
            m[torch.where(ok, loc, n)] = True
            inv = torch.zeros(n + 1, dtype=torch.long, device=dev)
            inv[torch.where(ok, loc, n)] = torch.arange(k, device=dev)
            return m[:n][None], (k, inv[:n])
        # per-row positions
        assert isinstance(spec.values, torch.Tensor) and spec.valid is not None
        values = _rowwise(spec.values.to(dev), scope, batch, "per-row positions", shape)
        valid = _rowwise(spec.valid.to(dev), scope, batch, "per-row positions", shape)
        absolute = torch.where(values < 0, values + total, values)
        if bool((valid & (absolute < 0)).any()):
            raise IndexError(
                f"positions={spec.describe()} out of range at site {scope.site!r} of shape "
                f"{format_shape(shape)} (sequence length so far {total})"
            )
        loc = absolute - offset
        ok = valid & (loc >= 0) & (loc < n)
        m = torch.zeros(values.shape[0], n + 1, dtype=torch.bool, device=dev)
        m.scatter_(1, torch.where(ok, loc, n), True)
        return m[:, :n], None

    # -- before the run ------------------------------------------------------------------------
    def check(self, site: str, shape: tuple[int | None, ...], lay: SiteLayout) -> None:
        """Fail before the run for selectors that do not fit a site of (partly known) ``shape``."""
        nd = len(shape)
        if self.heads is not None and lay.head_dim is None:
            raise ValueError(_no_heads_message(site, shape))
        if self.positions.kind != "all" and lay.pos_dim is None:
            raise ValueError(
                f"positions= given, but site {site!r} of shape {format_shape(shape)} has no position dim"
            )
        selectors = ((self.rows, 0, "rows"), (self.heads, lay.head_dim, "heads"), (self.index, nd - 1, "index"))
        for sel, dim, what in selectors:
            if sel is not None and dim is not None and isinstance(sel, torch.Tensor):
                size = shape[dim]
                if size is not None:
                    resolve_index(sel, size, what, site, shape)
        self._check_positions(site, shape, lay)

    def _check_positions(self, site: str, shape: tuple[int | None, ...], lay: SiteLayout) -> None:
        spec = self.positions
        if lay.pos_dim is None or spec.kind not in ("list", "rows"):
            return
        n, batch = shape[lay.pos_dim], shape[0]
        assert isinstance(spec.values, torch.Tensor)
        if spec.kind == "rows" and batch is not None and spec.values.shape[0] not in (1, batch):
            raise ValueError(
                f"per-row positions have {spec.values.shape[0]} rows but site {site!r} has shape "
                f"{format_shape(shape)}: expected 1 or {batch} rows"
            )
        if n is None:
            return
        vals = spec.values if spec.valid is None else spec.values[spec.valid]
        if bool(((vals < -n) | (vals >= n)).any()):
            raise IndexError(
                f"positions={spec.describe()} out of range at site {site!r} of shape {format_shape(shape)}: "
                f"positions must be in [-{n}, {n})"
            )

    def first_position(self, site: str, shape: tuple[int, ...]) -> int:
        """The earliest position this selection can hold in a plain run of ``shape`` (``shape[pos]`` if none);
        0 where that depends on the run (see :meth:`mishax_py.interventions.edits.SelectiveEdit.first_position`)."""
        lay = site_layout(site, len(shape))
        spec = self.positions
        if lay.pos_dim is None or spec.kind in ("all", "new") or lay.is_map:
            return 0
        n = shape[lay.pos_dim]
        if spec.kind == "slice":
            assert isinstance(spec.values, slice)
            chosen = torch.arange(*spec.values.indices(n))
        else:
            assert isinstance(spec.values, torch.Tensor)
            chosen = spec.values if spec.valid is None else spec.values[spec.valid]
            chosen = torch.where(chosen < 0, chosen + n, chosen)
        return int(chosen.min()) if chosen.numel() else n
