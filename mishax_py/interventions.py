"""Interventions: what a run does to the value at a site.

An intervention is a callable ``(value, event) -> Tensor`` registered on a site; it
receives the site's value in the site's canonical layout (see the site catalogue)
and returns the value the model continues with. Interventions are plain tensor
operations over the whole batch, so gradients flow through them.

A list of interventions at one site composes: each receives the previous one's output.

Built-in edits
--------------
``Ablate()``                       zero the selection; ``Ablate(mean=cache_or_tensor)`` mean-ablate;
                                   ``Ablate(resample=True, seed=0)`` take the value of another batch row.
``Clamp(value)``                   set the selection to ``value`` (scalar or tensor).
``Patch(source)``                  copy the selection from another run (an ``ActivationCache`` or a tensor).
``Steer(vector, scale=1.0)``       add ``scale * vector`` to the selection.

Selectors (keyword arguments of every built-in edit; all default to "everything")
--------------------------------------------------------------------------------
Site layouts: residual-like sites ``[batch, pos, d]``, per-head sites ``[batch, pos, head, d_head]``,
attention maps (``attn.scores`` / ``attn.pattern``) ``[batch, head, q_pos, k_pos]``.

``rows=``       batch rows (dim 0): int, list, slice or 1-D LongTensor.
``positions=``  token positions (dim 1; the *query* dim 2 on attention maps):

                * ``None`` / ``"all"`` / ``Positions.ALL`` -- every position (the default);
                * an int, a list / 1-D tensor of ints, or a ``slice`` -- the same positions in every row;
                * a list of per-row lists (ragged allowed) or a 2-D LongTensor ``[batch, k]`` -- row ``b``
                  gets its own positions (row count ``batch``, or 1 to broadcast);
                * ``"new"`` / ``Positions.NEW`` -- every position at or after the prompt length (the tokens
                  that ``model.generate`` produces; in a plain run it selects nothing).

                Positions are **absolute**: the index in the full sequence seen so far, prompt (and left
                padding) included. During KV-cache generation each forward covers absolute positions
                ``[offset, offset + n)`` with ``offset = event.position_offset`` (the KV-cache length), so
                ``positions=7`` edits token 7 exactly once, in whichever forward computes it, just as a
                full re-run of the whole sequence would. Negative positions count from the end of the
                sequence seen so far (``offset + n``); they are re-resolved at every decoding step, so for
                generation prefer non-negative positions or ``"new"``. ``slice`` selectors resolve the same
                way (``slice(5, None)`` = position 5 onwards). A position beyond the current sequence
                simply is not selected yet. "The prompt length" for ``"new"`` is the length of the first
                forward of the sequence (a forward with offset 0 that is the first of the run or follows
                a KV-cache step); ``model.generate`` prefills the whole prompt in that forward.
                Caveat: ``generate`` computes the ``logits`` site of its prefill for the last prompt
                token only (``logits_to_keep=1``), so position selectors at ``logits`` see that row
                as position ``offset``; decoding steps (one token each) are exact.
``heads=``      heads (dim 2 on per-head sites, dim 1 on attention maps); an error elsewhere. On ``k``/``v``
                sites these are KV heads.
``index=``      units along the last dim (e.g. residual dims, MLP neurons, ``d_head`` dims; key columns of
                an attention map as computed, i.e. KV-cache slots during generation).

The selection is the product of the selectors. It is built once per call as a boolean mask
(plus index maps, below) and applied with ``torch.where`` over the whole batch: no Python loop
over rows, heads or positions, no in-place writes, so autograd sees every edit.

Values given to ``Clamp`` / ``Steer`` / a precomputed ``Ablate(mean=...)`` broadcast against the
site (numpy rules, right-aligned). Along a selected dim, a size equal to the number of selected
entries is matched to them in the order given (``Clamp(torch.tensor([1., 2.]), index=[7, 3])`` sets
unit 7 to 1 and unit 3 to 2). Along the position dim a longer size is read at the absolute
positions (a ``[P, d]`` steering tensor used during generation). Site-shaped sources (``Patch`` and
reference activations for ``Ablate(mean=...)``) must match the site in every dim except: batch may
be 1 (broadcast) and positions may be longer (read at the absolute positions).

Batch rows restricted by the run (``event.rows``, used by sweeps and ``InstrumentedModel.context(rows=)``)
---------------------------------------------------------------------------------------------------------
When a handler is registered with ``rows`` (a LongTensor), the edit is computed on the sub-batch
``value[rows]`` *as if it were the whole run*, and written back to those rows (``index_copy``,
differentiable); other rows pass through unchanged. So inside the edit, row ``j`` means run row
``rows[j]``: the ``rows=`` selector, per-row positions, a ``Patch`` source or per-row tensors with
``len(rows)`` rows, and resampling all work on the sub-batch (resampling never reads another
variant's rows). A per-row source whose batch is the *full* run's batch (and not ``len(rows)``)
is read at ``source[rows]``.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mishax_py.runtime import RunContext, SiteEvent

__all__ = ["Ablate", "Clamp", "Hook", "Intervention", "Patch", "Positions", "Steer"]


class Intervention:
    """Base class of all interventions.

    Subclasses implement :meth:`apply`. :meth:`check` is called once per site before
    the run starts, with the site's expected shape (``None`` where unknown), so bad
    input fails before any forward pass with an error naming the site and shapes.
    """

    def apply(self, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        raise NotImplementedError

    def check(self, site: str, shape: tuple[int | None, ...] | None) -> None:
        """Validate this intervention for ``site`` before the run (default: nothing to check)."""

    def __call__(self, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        return self.apply(value, event)


class Hook(Intervention):
    """A user function at a site: ``fn(value)`` or ``fn(value, event)``.

    ``fn`` gets the :class:`~mishax_py.runtime.SiteEvent` when it takes two positional
    parameters without defaults (or ``*args``); parameters with defaults do not count.
    ``fn`` returns the replacement value, or ``None`` to leave the value unchanged
    (useful for reading values, or for in-place edits you take responsibility for).
    """

    def __init__(self, fn: Callable[..., torch.Tensor | None]) -> None:
        self.fn = fn
        self._wants_event = _accepts_two_args(fn)

    def apply(self, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        out = self.fn(value, event) if self._wants_event else self.fn(value)
        return value if out is None else out

    def __repr__(self) -> str:
        return f"Hook({getattr(self.fn, '__qualname__', self.fn)!r})"


def _accepts_two_args(fn: Callable[..., object]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without signatures: assume fn(value)
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    # Only parameters without defaults count: `fn(v, src=cache, pos=3)` (defaults used to bind
    # loop variables) is a one-argument hook.
    required = [
        p for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is inspect.Parameter.empty
    ]
    return len(required) >= 2


# ---------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------


class Positions(enum.Enum):
    """Symbolic position selectors: ``ALL`` (every position, the default) and ``NEW``
    (every position at or after the prompt length, i.e. the tokens ``model.generate`` adds)."""

    ALL = "all"
    NEW = "new"


IndexLike = int | slice | Sequence[int] | torch.Tensor
PositionsLike = IndexLike | Sequence[Sequence[int]] | Positions | str | None


@dataclass(frozen=True)
class _Layout:
    """Where the batch-independent selector dims of a site are."""

    pos_dim: int | None  # positions (query positions on attention maps)
    head_dim: int | None
    is_map: bool  # [batch, head, q_pos, k_pos]


def _layout(site: str, ndim: int) -> _Layout:
    if ndim == 4 and site.rsplit(".", 1)[-1] in ("scores", "pattern"):
        return _Layout(2, 1, True)
    if ndim == 4:
        return _Layout(1, 2, False)
    if ndim >= 2:
        return _Layout(1, None, False)
    return _Layout(None, None, False)


def _fmt(shape: Sequence[int | None] | torch.Size | None) -> str:
    if shape is None:
        return "(unknown)"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _norm_index(x: IndexLike | None, what: str) -> torch.Tensor | slice | None:
    """Normalise a rows/heads/index selector to a 1-D LongTensor or a slice."""
    if x is None or isinstance(x, slice):
        return x
    if isinstance(x, bool):
        raise TypeError(f"{what}= must be an int, a list of ints, a slice or a LongTensor, got a bool")
    if isinstance(x, int):
        return torch.tensor([x], dtype=torch.long)
    t = torch.as_tensor(x)
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


def _resolve_index(sel: torch.Tensor | slice, size: int, what: str, site: str, shape: Sequence[int]) -> torch.Tensor:
    """Selected indices in ``range(size)`` (negatives from the end); IndexError when out of range."""
    if isinstance(sel, slice):
        return torch.arange(*sel.indices(size))
    bad = (sel < -size) | (sel >= size)
    if bool(bad.any()):
        raise IndexError(
            f"{what}={sel.tolist()} out of range at site {site!r} of shape {_fmt(shape)}: "
            f"{what} must be in [-{size}, {size})"
        )
    return torch.where(sel < 0, sel + size, sel)


@dataclass(frozen=True)
class _PosSpec:
    kind: str  # "all" | "new" | "list" | "slice" | "rows"
    values: torch.Tensor | slice | None = None  # list: [k]; rows: [R, k] (padded)
    valid: torch.Tensor | None = None  # rows: [R, k] bool


def _norm_positions(p: PositionsLike) -> _PosSpec:
    if p is None or p is Positions.ALL or (isinstance(p, str) and p.lower() == "all"):
        return _PosSpec("all")
    if p is Positions.NEW or (isinstance(p, str) and p.lower() == "new"):
        return _PosSpec("new")
    if isinstance(p, str):
        raise ValueError(f"positions={p!r}: expected 'all', 'new', an int, a list, a slice or a LongTensor")
    if isinstance(p, slice):
        return _PosSpec("slice", p)
    if isinstance(p, bool):
        raise TypeError("positions= must be an int, a list of ints, a slice or a LongTensor, got a bool")
    if isinstance(p, int):
        return _PosSpec("list", torch.tensor([p], dtype=torch.long))
    if isinstance(p, torch.Tensor):
        if p.dtype.is_floating_point or p.dtype == torch.bool:
            raise TypeError(f"positions= must hold integers, got dtype {p.dtype}")
        if p.ndim <= 1:
            return _PosSpec("list", p.long().reshape(-1))
        if p.ndim == 2:
            return _PosSpec("rows", p.long(), torch.ones(p.shape, dtype=torch.bool))
        raise ValueError(f"positions= tensor must be 1-D or [batch, k], got shape {tuple(p.shape)}")
    items = list(p)
    if items and all(isinstance(r, (list, tuple, range, torch.Tensor)) for r in items):
        rows = [torch.as_tensor(list(r) if not isinstance(r, torch.Tensor) else r, dtype=torch.long).reshape(-1)
                for r in items]
        k = max((len(r) for r in rows), default=0)
        values = torch.zeros(len(rows), k, dtype=torch.long)
        valid = torch.zeros(len(rows), k, dtype=torch.bool)
        for i, r in enumerate(rows):  # once, at construction
            values[i, : len(r)] = r
            valid[i, : len(r)] = True
        return _PosSpec("rows", values, valid)
    return _PosSpec("list", torch.as_tensor(items, dtype=torch.long).reshape(-1))


def _describe_positions(spec: _PosSpec) -> str | None:
    if spec.kind == "all":
        return None
    if spec.kind == "new":
        return "'new'"
    if spec.kind == "slice":
        return repr(spec.values)
    assert isinstance(spec.values, torch.Tensor)
    if spec.kind == "list":
        return str(spec.values.tolist())
    assert spec.valid is not None
    return str([r[v].tolist() for r, v in zip(spec.values, spec.valid, strict=True)])


_PROMPT_STATE = "_mishax_py_prompt_state"


def _prompt_length(context: RunContext, offset: int, n: int) -> int:
    """The prompt length of the sequence a forward belongs to (state kept on the run context).

    A sequence starts at a forward with offset 0 that is the first of the run or follows a
    forward with offset > 0 (a new ``generate`` call); its length is the prompt length. Later
    forwards (KV-cache steps, or full re-runs with ``use_cache=False``) keep it.
    """
    state = context.__dict__.get(_PROMPT_STATE)
    if state is None or (offset == 0 and state[0] > 0):
        state = [offset, n if offset == 0 else offset]
        context.__dict__[_PROMPT_STATE] = state
    state[0] = offset
    return int(state[1])


@dataclass
class _Scope:
    """What one application of an edit knows: site, absolute offset, and the sub-batch mapping."""

    site: str
    offset: int
    full_batch: int  # the run's batch (before restricting to event.rows)
    rows: torch.Tensor | None  # event.rows on the value's device, or None
    event: SiteEvent


@dataclass
class _Selection:
    """A built selection: the mask (None = everything) and, per selected dim, (k, inverse map)."""

    mask: torch.Tensor | None
    maps: dict[int, tuple[int, torch.Tensor]]  # dim -> (number selected, map local index -> selection index)
    layout: _Layout


class _Selective(Intervention):
    """An edit restricted to a selection (rows x positions x heads x units); see the module docs."""

    def __init__(
        self,
        *,
        positions: PositionsLike = None,
        heads: IndexLike | None = None,
        index: IndexLike | None = None,
        rows: IndexLike | None = None,
    ) -> None:
        self.positions = _norm_positions(positions)
        self.heads = _norm_index(heads, "heads")
        self.index = _norm_index(index, "index")
        self.rows = _norm_index(rows, "rows")

    # -- subclass hooks -----------------------------------------------------------------------
    def _edited(self, value: torch.Tensor, scope: _Scope, sel: _Selection) -> torch.Tensor:
        """The edited value (broadcastable to ``value``); applied only where the selection is."""
        raise NotImplementedError

    def _check_more(self, site: str, shape: tuple[int | None, ...], layout: _Layout) -> None:
        """Subclass-specific validation before the run."""

    # -- applying -----------------------------------------------------------------------------
    def apply(self, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        offset = int(event.position_offset)
        if event.rows is None:
            return self._apply_local(value, _Scope(event.site, offset, value.shape[0], None, event))
        rows = event.rows.to(device=value.device, dtype=torch.long)
        sub = value.index_select(0, rows)
        out = self._apply_local(sub, _Scope(event.site, offset, value.shape[0], rows, event))
        return value.index_copy(0, rows, out)

    def _apply_local(self, value: torch.Tensor, scope: _Scope) -> torch.Tensor:
        sel = self._select(value, scope)
        new = self._edited(value, scope, sel)
        if sel.mask is not None:
            return torch.where(sel.mask, new, value)
        if new.shape == value.shape:
            return new
        return new.expand(value.shape).contiguous()

    def _select(self, value: torch.Tensor, scope: _Scope) -> _Selection:
        shape, nd, dev, site = tuple(value.shape), value.ndim, value.device, scope.site
        lay = _layout(site, nd)
        masks: list[torch.Tensor] = []
        maps: dict[int, tuple[int, torch.Tensor]] = {}

        def view_at(m: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
            # m has one axis per entry of dims; place them there, 1 elsewhere.
            target = [1] * nd
            for axis, d in enumerate(dims):
                target[d] = m.shape[axis]
            return m.reshape(target)

        def flat(sel: torch.Tensor | slice, dim: int, what: str) -> None:
            idx = _resolve_index(sel, shape[dim], what, site, shape).to(dev)
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
                raise ValueError(f"positions= given, but site {site!r} of shape {_fmt(shape)} has no position dim")
            pm, pmap = self._position_mask(shape[0], shape[lay.pos_dim], scope, dev, shape)
            masks.append(view_at(pm, [0, lay.pos_dim]))
            if pmap is not None:
                maps[lay.pos_dim] = pmap
        mask = None
        for m in masks:
            mask = m if mask is None else mask & m
        return _Selection(mask, maps, lay)

    def _position_mask(
        self, batch: int, n: int, scope: _Scope, dev: torch.device, shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, tuple[int, torch.Tensor] | None]:
        """Mask ``[1 or batch, n]`` over this forward's positions, and the selection map if a list/slice."""
        spec, offset = self.positions, scope.offset
        total = offset + n
        local = torch.arange(n, device=dev)
        if spec.kind == "new":
            prompt = _prompt_length(scope.event.context, offset, n)
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
                        f"{_fmt(shape)} (sequence length so far {total})"
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
        values, valid = spec.values.to(dev), spec.valid.to(dev)
        values, valid = self._rowwise(values, scope, batch, "per-row positions", shape), self._rowwise(
            valid, scope, batch, "per-row positions", shape
        )
        absolute = torch.where(values < 0, values + total, values)
        if bool((valid & (absolute < 0)).any()):
            raise IndexError(
                f"positions={_describe_positions(spec)} out of range at site {scope.site!r} of shape "
                f"{_fmt(shape)} (sequence length so far {total})"
            )
        loc = absolute - offset
        ok = valid & (loc >= 0) & (loc < n)
        m = torch.zeros(values.shape[0], n + 1, dtype=torch.bool, device=dev)
        m.scatter_(1, torch.where(ok, loc, n), True)
        return m[:, :n], None

    @staticmethod
    def _rowwise(t: torch.Tensor, scope: _Scope, batch: int, what: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A per-row tensor for this (sub-)batch: rows 1 or ``batch``, or the full run's rows read at ``rows``."""
        r = t.shape[0]
        if r == 1 or r == batch:
            return t
        if scope.rows is not None and r == scope.full_batch:
            return t.index_select(0, scope.rows.to(t.device))
        expected = f"1 or {batch}" + (f" (or the run's {scope.full_batch})" if scope.rows is not None else "")
        raise ValueError(f"{what} have {r} rows but site {scope.site!r} has shape {_fmt(shape)}: expected {expected}")

    # -- fitting tensors to the site ---------------------------------------------------------
    def _fit(
        self,
        t: Any,
        value: torch.Tensor,
        scope: _Scope,
        sel: _Selection,
        what: str,
        *,
        site_shaped: bool,
    ) -> torch.Tensor:
        """Broadcast ``t`` against ``value`` following the module-doc rules (dtype/device of ``value``)."""
        t = torch.as_tensor(t).to(device=value.device, dtype=value.dtype)
        shape, nd = tuple(value.shape), value.ndim
        if t.ndim > nd:
            raise ValueError(f"{what} of shape {_fmt(t.shape)} has more dims than site {scope.site!r} {_fmt(shape)}")
        if site_shaped and t.ndim != nd:
            raise ValueError(
                f"{what} of shape {_fmt(t.shape)} does not match site {scope.site!r} of shape {_fmt(shape)}"
            )
        t = t.reshape((1,) * (nd - t.ndim) + tuple(t.shape))
        lay, offset = sel.layout, scope.offset
        for d in range(nd):
            s, full = t.shape[d], shape[d]
            positional = d == lay.pos_dim or (lay.is_map and d == 3)
            if s == 1 and (d == 0 or not site_shaped):
                continue  # broadcast (site-shaped sources must cover positions and units exactly)
            if not site_shaped and d in sel.maps and s == sel.maps[d][0]:
                t = t.index_select(d, sel.maps[d][1])  # one entry per selected index, in the order given
                continue
            if d == 0:
                if s == full:
                    continue
                if scope.rows is not None and s == scope.full_batch:
                    t = t.index_select(0, scope.rows)  # the full run's rows, read at event.rows
                    continue
            elif d == lay.pos_dim:
                if s >= offset + full:  # read at this forward's absolute positions
                    t = t.narrow(d, offset, full)
                    continue
            elif positional:  # key columns of an attention map: the ones present end at the newest position
                end = offset + shape[lay.pos_dim]  # type: ignore[index]
                if s == full:
                    continue
                if s >= end >= full:
                    t = t.narrow(d, end - full, full)
                    continue
            elif s == full:
                continue
            raise ValueError(self._misfit_message(what, t.shape, scope, shape, d, site_shaped))
        return t

    def _misfit_message(
        self, what: str, tshape: Sequence[int], scope: _Scope, shape: tuple[int, ...], d: int, site_shaped: bool
    ) -> str:
        sel = f" (selection: {self._describe_selection()})" if self._describe_selection() else ""
        rule = (
            "expected the site's shape, with batch 1 or the run's batch"
            if site_shaped
            else "each dim must be 1, the site's size, or the number of selected entries along it"
        )
        where = f" at position offset {scope.offset}" if scope.offset else ""
        return (
            f"{what} of shape {_fmt(tshape)} does not fit site {scope.site!r} of shape {_fmt(shape)}{where} "
            f"(dim {d}){sel}: {rule}"
        )

    # -- checking before the run ------------------------------------------------------------
    def check(self, site: str, shape: tuple[int | None, ...] | None) -> None:
        if shape is None:
            return
        nd = len(shape)
        lay = _layout(site, nd)
        if self.heads is not None and lay.head_dim is None:
            raise ValueError(_no_heads_message(site, shape))
        if self.positions.kind != "all" and lay.pos_dim is None:
            raise ValueError(f"positions= given, but site {site!r} of shape {_fmt(shape)} has no position dim")
        selectors = ((self.rows, 0, "rows"), (self.heads, lay.head_dim, "heads"), (self.index, nd - 1, "index"))
        for sel, dim, what in selectors:
            if sel is not None and dim is not None and shape[dim] is not None and isinstance(sel, torch.Tensor):
                _resolve_index(sel, int(shape[dim]), what, site, shape)  # type: ignore[arg-type]
        self._check_positions(site, shape, lay)
        self._check_more(site, shape, lay)

    def first_position(self, site: str, shape: tuple[int, ...]) -> int:
        """The earliest position this edit can change in a plain run of ``shape`` (``shape[pos]`` if none).

        Used by sweeps: under causal attention, positions before it are those of the clean run, so
        a sweep may compute them once (any intervention may define this method to opt in; it must
        then also honour ``event.position_offset``, as the built-in edits do).
        Conservative (0) where the answer depends on the run: ``"all"``/``"new"`` positions, and
        attention maps (an edit there can give weight to masked or out-of-window keys, which a KV
        cache of the earlier positions does not hold, or holds computed differently for padding).
        """
        lay = _layout(site, len(shape))
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

    def _check_positions(self, site: str, shape: tuple[int | None, ...], lay: _Layout) -> None:
        spec = self.positions
        if lay.pos_dim is None or spec.kind not in ("list", "rows"):
            return
        n, batch = shape[lay.pos_dim], shape[0]
        assert isinstance(spec.values, torch.Tensor)
        if spec.kind == "rows" and batch is not None and spec.values.shape[0] not in (1, batch):
            raise ValueError(
                f"per-row positions have {spec.values.shape[0]} rows but site {site!r} has shape {_fmt(shape)}: "
                f"expected 1 or {batch} rows"
            )
        if n is None:
            return
        vals = spec.values if spec.valid is None else spec.values[spec.valid]
        if bool(((vals < -n) | (vals >= n)).any()):
            raise IndexError(
                f"positions={_describe_positions(spec)} out of range at site {site!r} of shape {_fmt(shape)}: "
                f"positions must be in [-{n}, {n})"
            )

    # -- repr ---------------------------------------------------------------------------------
    def _describe_selection(self) -> str:
        parts = []
        for name, sel in (("rows", self.rows), ("heads", self.heads), ("index", self.index)):
            if sel is not None:
                parts.append(f"{name}={sel if isinstance(sel, slice) else sel.tolist()}")
        pos = _describe_positions(self.positions)
        if pos is not None:
            parts.append(f"positions={pos}")
        return ", ".join(parts)

    def _repr_args(self) -> list[str]:
        return []

    def __repr__(self) -> str:
        args = [*self._repr_args()]
        if self._describe_selection():
            args.append(self._describe_selection())
        return f"{type(self).__name__}({', '.join(args)})"


def _no_heads_message(site: str, shape: Sequence[int | None]) -> str:
    return (
        f"heads= given, but site {site!r} of shape {_fmt(shape)} has no head dim; heads= works on per-head "
        "sites [batch, pos, head, d_head] (attn.q/k/v/rot_q/rot_k/z) and attention maps [batch, head, q, k] "
        "(attn.scores/pattern)"
    )


def _site_shaped_check(
    what: str,
    tshape: Sequence[int],
    site: str,
    shape: tuple[int | None, ...],
    lay: _Layout,
    free_dims: Sequence[int] = (),
) -> None:
    """Before-the-run check of a site-shaped source: the site's shape, batch 1 or any (checked by the caller).

    Lengths are checked only where known: a plain run needs the run's positions exactly; during
    ``generate`` (positions unknown) a longer source is read at the absolute positions.
    """
    if len(tshape) != len(shape):
        raise ValueError(f"{what} of shape {_fmt(tshape)} does not match site {site!r} of shape {_fmt(shape)}")
    for d, (s, full) in enumerate(zip(tshape, shape, strict=True)):
        if full is None or s == full or d == 0 and s == 1 or d in free_dims:
            continue
        raise ValueError(
            f"{what} of shape {_fmt(tshape)} does not match site {site!r} of shape {_fmt(shape)} (dim {d}): "
            "expected the site's shape, with batch 1 or the run's batch"
        )


def _selection_shaped_check(
    iv: _Selective, what: str, tshape: Sequence[int], site: str, shape: tuple[int | None, ...], lay: _Layout
) -> None:
    """Before-the-run check of a value broadcast against the selection (Clamp / Steer / a mean vector)."""
    nd = len(shape)
    if len(tshape) > nd:
        raise ValueError(f"{what} of shape {_fmt(tshape)} has more dims than site {site!r} {_fmt(shape)}")
    padded = (1,) * (nd - len(tshape)) + tuple(tshape)
    counts: dict[int, int] = {}
    for sel, dim in ((iv.rows, 0), (iv.heads, lay.head_dim), (iv.index, nd - 1)):
        if isinstance(sel, torch.Tensor) and dim is not None:
            counts[dim] = sel.numel()
    if iv.positions.kind == "list" and lay.pos_dim is not None:
        assert isinstance(iv.positions.values, torch.Tensor)
        counts[lay.pos_dim] = iv.positions.values.numel()
    for d, (s, full) in enumerate(zip(padded, shape, strict=True)):
        if s == 1 or full is None or s == full or counts.get(d) == s:
            continue
        if isinstance(_sel_at(iv, d, lay, nd), slice):
            continue  # counted at run time
        sel = iv._describe_selection()
        raise ValueError(
            f"{what} of shape {_fmt(tshape)} does not fit site {site!r} of shape {_fmt(shape)} (dim {d})"
            f"{f' (selection: {sel})' if sel else ''}: each dim must be 1, the site's size, or the number of "
            "selected entries along it"
        )


def _sel_at(iv: _Selective, d: int, lay: _Layout, nd: int) -> torch.Tensor | slice | _PosSpec | None:
    if d == 0:
        return iv.rows
    if d == lay.head_dim:
        return iv.heads
    if d == nd - 1 and iv.index is not None:
        return iv.index
    if d == lay.pos_dim:
        return iv.positions.values if iv.positions.kind == "slice" else None
    return None


def _derangement(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of ``range(n)`` with no fixed point (one random cycle), loop-free."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


def _masked_mean(ref: torch.Tensor, mask: torch.Tensor | None, dims: tuple[int, ...], pos_dim: int | None
                 ) -> torch.Tensor:
    """``ref.mean(dims, keepdim=True)`` over the entries where ``mask`` (``[batch, pos]``, pos along the
    reference's ``pos_dim``) is non-zero; positions with no such entry take the plain mean."""
    plain = ref.mean(dim=dims, keepdim=True)
    if mask is None or pos_dim is None:
        return plain
    shape = [1] * ref.ndim
    shape[0], shape[pos_dim] = mask.shape[0], mask.shape[1]
    w = (mask != 0).to(device=ref.device, dtype=ref.dtype).view(shape)
    total = (ref * w).sum(dim=dims, keepdim=True)
    count = w.sum(dim=dims, keepdim=True)
    return torch.where(count > 0, total / count.clamp_min(1), plain)


def _lookup(source: Mapping[str, torch.Tensor], site: str, what: str) -> torch.Tensor:
    try:
        return source[site]
    except KeyError:
        keys = list(source)
        shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
        raise ValueError(
            f"{what}: the source cache has no entry for site {site!r} (it holds: {shown or 'nothing'}); "
            f"record it with run_with_cache(..., sites=[{site!r}])"
        ) from None


# ---------------------------------------------------------------------------------------------
# The edits
# ---------------------------------------------------------------------------------------------


class Ablate(_Selective):
    """Knock out the selection: zero it (default), replace it by a mean, or resample it.

    Args:
        mean: reference activations to mean-ablate with -- an ``ActivationCache`` (or any mapping;
            the site's own name is looked up) or a tensor. A tensor (or cache entry) with the site's
            number of dims is reference activations ``[batch_ref, pos_ref, ...]``: it is averaged over
            the batch (per position; ``pos_ref`` must cover the run's positions, and is read at the
            absolute positions) -- and also over positions when ``mean_over_positions=True`` (one
            vector for every position; on attention maps, over query positions). Padding is left out:
            a cache from ``run_with_cache(..., attention_mask=m)`` carries ``m``, and only entries
            with ``m == 1`` are averaged (a position with no such entry takes the plain mean). A
            tensor with fewer dims is a precomputed mean, broadcast like a ``Clamp`` value.
        mean_over_positions: see ``mean``.
        mean_mask: ``[batch_ref, pos_ref]``, 1 for the reference entries to average (default: the
            cache's ``attention_mask``; none for a tensor reference).
        resample: replace each row's selection by the same selection of another row of the run
            (a seeded derangement of the batch rows: one random cycle, so no row keeps its own
            value). Needs at least 2 rows; under ``event.rows`` (sweeps) only those rows are used.
        seed: the derangement's seed.
        positions, heads, index, rows: selectors (module docs).
    """

    def __init__(
        self,
        *,
        mean: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
        mean_over_positions: bool = False,
        mean_mask: torch.Tensor | None = None,
        resample: bool = False,
        seed: int = 0,
        positions: PositionsLike = None,
        heads: IndexLike | None = None,
        index: IndexLike | None = None,
        rows: IndexLike | None = None,
    ) -> None:
        super().__init__(positions=positions, heads=heads, index=index, rows=rows)
        if mean is not None and resample:
            raise ValueError("Ablate: give mean= or resample=True, not both")
        if mean_mask is not None and mean is None:
            raise ValueError("Ablate: mean_mask= applies to mean= reference activations")
        if mean_mask is not None and (not isinstance(mean_mask, torch.Tensor) or mean_mask.ndim != 2):
            raise ValueError("Ablate: mean_mask must be a [batch_ref, pos_ref] tensor")
        self.mean = mean
        self.mean_over_positions = mean_over_positions
        self.mean_mask = mean_mask
        self.resample = resample
        self.seed = seed

    def _reference(self, site: str) -> torch.Tensor:
        assert self.mean is not None
        if isinstance(self.mean, torch.Tensor):
            return self.mean
        return _lookup(self.mean, site, "Ablate(mean=...)")

    def _reference_mask(self, site: str, ref: torch.Tensor, pos_dim: int | None) -> torch.Tensor | None:
        """The reference's ``[batch_ref, pos_ref]`` mask of entries to average, or ``None`` (all)."""
        mask = self.mean_mask if self.mean_mask is not None else getattr(self.mean, "attention_mask", None)
        if mask is None or pos_dim is None:
            return None
        want = (ref.shape[0], ref.shape[pos_dim])
        if tuple(mask.shape) != want:
            raise ValueError(
                f"Ablate mean mask of shape {_fmt(mask.shape)} does not match the reference activations of "
                f"site {site!r} of shape {_fmt(ref.shape)}: it must be [batch_ref, pos_ref] = {_fmt(want)}"
            )
        return mask

    def _edited(self, value: torch.Tensor, scope: _Scope, sel: _Selection) -> torch.Tensor:
        if self.resample:
            n = value.shape[0]
            if n < 2:
                raise ValueError(
                    f"Ablate(resample=True) at site {scope.site!r} of shape {_fmt(value.shape)} needs at least "
                    "2 batch rows to resample from"
                )
            return value.index_select(0, _derangement(n, self.seed).to(value.device))
        if self.mean is None:
            return value.new_zeros(())
        ref = self._reference(scope.site)
        if ref.ndim == value.ndim:
            pos_dim = sel.layout.pos_dim
            dims = (0,) if not self.mean_over_positions or pos_dim is None else (0, pos_dim)
            ref = ref.to(device=value.device, dtype=torch.float32 if ref.dtype.is_floating_point else None)
            mean = _masked_mean(ref, self._reference_mask(scope.site, ref, pos_dim), dims, pos_dim)
            if len(dims) == 2:  # one mean for every position: cover this forward's absolute positions
                sizes = list(mean.shape)
                sizes[pos_dim] = scope.offset + value.shape[pos_dim]  # type: ignore[index]
                mean = mean.expand(sizes)
            return self._fit(mean, value, scope, sel, "Ablate mean", site_shaped=True)
        return self._fit(ref, value, scope, sel, "Ablate mean", site_shaped=False)

    def _check_more(self, site: str, shape: tuple[int | None, ...], layout: _Layout) -> None:
        if self.resample and shape[0] is not None and shape[0] < 2:
            raise ValueError(
                f"Ablate(resample=True) at site {site!r} of shape {_fmt(shape)} needs at least 2 batch rows"
            )
        if self.mean is None:
            return
        ref = self._reference(site)
        if ref.ndim == len(shape):  # reference activations: any batch; any positions if averaged over them
            free = [0] + ([layout.pos_dim] if self.mean_over_positions and layout.pos_dim is not None else [])
            _site_shaped_check("Ablate mean reference", tuple(ref.shape), site, shape, layout, free)
            self._reference_mask(site, ref, layout.pos_dim)  # a mask that does not fit fails before the run
        else:
            _selection_shaped_check(self, "Ablate mean", tuple(ref.shape), site, shape, layout)

    def _repr_args(self) -> list[str]:
        if self.resample:
            return [f"resample=True, seed={self.seed}"]
        if self.mean is not None:
            kind = "tensor" if isinstance(self.mean, torch.Tensor) else "cache"
            return [f"mean=<{kind}>" + (", mean_over_positions=True" if self.mean_over_positions else "")]
        return []


class Clamp(_Selective):
    """Set the selection to ``value`` (a scalar, or a tensor broadcast against the selection; module docs).

    Example: ``Clamp(5.0, index=[123], positions=-1)`` pins MLP neuron 123 at the last token.
    """

    def __init__(
        self,
        value: float | torch.Tensor,
        *,
        positions: PositionsLike = None,
        heads: IndexLike | None = None,
        index: IndexLike | None = None,
        rows: IndexLike | None = None,
    ) -> None:
        super().__init__(positions=positions, heads=heads, index=index, rows=rows)
        self.value = value

    def _edited(self, value: torch.Tensor, scope: _Scope, sel: _Selection) -> torch.Tensor:
        return self._fit(self.value, value, scope, sel, "Clamp value", site_shaped=False)

    def _check_more(self, site: str, shape: tuple[int | None, ...], layout: _Layout) -> None:
        _selection_shaped_check(self, "Clamp value", tuple(torch.as_tensor(self.value).shape), site, shape, layout)

    def _repr_args(self) -> list[str]:
        v = self.value
        return [f"<tensor {_fmt(v.shape)}>" if isinstance(v, torch.Tensor) and v.ndim else repr(float(v))]


class Patch(_Selective):
    """Copy the selection from another run.

    Args:
        source: an ``ActivationCache`` (or mapping) holding this site -- looked up by the site's own
            canonical name, so one cache serves a glob of sites -- or a tensor of the site's shape.
            Batch 1 broadcasts to every row; otherwise it must equal the run's batch (rows correspond).
            Positions must match the run's (or be longer: read at the absolute positions, e.g. a cache of
            the full sequence used during generation).
        positions, heads, index, rows: selectors (module docs).
    """

    def __init__(
        self,
        source: Mapping[str, torch.Tensor] | torch.Tensor,
        *,
        positions: PositionsLike = None,
        heads: IndexLike | None = None,
        index: IndexLike | None = None,
        rows: IndexLike | None = None,
    ) -> None:
        super().__init__(positions=positions, heads=heads, index=index, rows=rows)
        if not isinstance(source, (torch.Tensor, Mapping)):
            raise TypeError(f"Patch source must be an ActivationCache/mapping or a tensor, got {type(source).__name__}")
        self.source = source

    def _source(self, site: str) -> torch.Tensor:
        if isinstance(self.source, torch.Tensor):
            return self.source
        return _lookup(self.source, site, "Patch")

    def _edited(self, value: torch.Tensor, scope: _Scope, sel: _Selection) -> torch.Tensor:
        return self._fit(self._source(scope.site), value, scope, sel, "Patch source", site_shaped=True)

    def _check_more(self, site: str, shape: tuple[int | None, ...], layout: _Layout) -> None:
        src = self._source(site)
        _site_shaped_check("Patch source", tuple(src.shape), site, shape, layout)
        if shape[0] is not None and src.shape[0] not in (1, shape[0]):
            raise ValueError(
                f"Patch source of shape {_fmt(src.shape)} does not match site {site!r} of shape {_fmt(shape)}: "
                f"its batch must be 1 (broadcast) or the run's batch {shape[0]}"
            )

    def _repr_args(self) -> list[str]:
        src = self.source
        return [f"<tensor {_fmt(src.shape)}>" if isinstance(src, torch.Tensor) else "<cache>"]


class Steer(_Selective):
    """Add ``scale * vector`` to the selection.

    ``vector``: a ``[d]`` direction along the site's last dim (or ``[k]`` with ``index=`` of k units), or
    any tensor broadcast against the selection (module docs), e.g. ``[pos, d]`` per position or
    ``[head, d_head]`` per head. Gradients reach ``vector`` when it requires grad.
    """

    def __init__(
        self,
        vector: torch.Tensor | float,
        scale: float | torch.Tensor = 1.0,
        *,
        positions: PositionsLike = None,
        heads: IndexLike | None = None,
        index: IndexLike | None = None,
        rows: IndexLike | None = None,
    ) -> None:
        super().__init__(positions=positions, heads=heads, index=index, rows=rows)
        self.vector = vector
        self.scale = scale

    def _edited(self, value: torch.Tensor, scope: _Scope, sel: _Selection) -> torch.Tensor:
        delta = self._fit(self.vector, value, scope, sel, "Steer vector", site_shaped=False)
        scale = self.scale.to(value.device) if isinstance(self.scale, torch.Tensor) else self.scale
        return value + scale * delta

    def _check_more(self, site: str, shape: tuple[int | None, ...], layout: _Layout) -> None:
        vshape = tuple(torch.as_tensor(self.vector).shape)
        _selection_shaped_check(self, "Steer vector", vshape, site, shape, layout)

    def _repr_args(self) -> list[str]:
        v = self.vector
        args = [f"<tensor {_fmt(v.shape)}>" if isinstance(v, torch.Tensor) else repr(v)]
        if not (isinstance(self.scale, (int, float)) and self.scale == 1.0):
            args.append(f"scale={float(self.scale)}")
        return args
