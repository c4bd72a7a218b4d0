"""Values against a selection: how ``Clamp`` / ``Steer`` values, ``Patch`` sources and ``Ablate`` means are
broadcast to a site (at run time, :func:`fit`) and checked before the run (:func:`check_site_shaped`,
:func:`check_selection_shaped`); the rules are in :mod:`mishax_py.interventions`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mishax_py.interventions.selection import Scope, Selection, Selector, SiteLayout, format_shape

__all__ = ["check_selection_shaped", "check_site_shaped", "fit"]


def fit(t: torch.Tensor | float, value: torch.Tensor, scope: Scope, sel: Selection, selector: Selector, what: str, *,
        site_shaped: bool) -> torch.Tensor:
    """Broadcast ``t`` against ``value`` following the package-doc rules (dtype/device of ``value``).

    ``site_shaped``: ``t`` is a source of the site's own shape (``Patch``, reference activations),
    else a value broadcast against the selection (``Clamp`` / ``Steer`` / a precomputed mean).
    """
    t = torch.as_tensor(t).to(device=value.device, dtype=value.dtype)
    shape, nd = tuple(value.shape), value.ndim
    if t.ndim > nd:
        raise ValueError(
            f"{what} of shape {format_shape(t.shape)} has more dims than site {scope.site!r} {format_shape(shape)}"
        )
    if site_shaped and t.ndim != nd:
        raise ValueError(
            f"{what} of shape {format_shape(t.shape)} does not match site {scope.site!r} of shape "
            f"{format_shape(shape)}"
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
            assert lay.pos_dim is not None
            end = offset + shape[lay.pos_dim]
            if s == full:
                continue
            if s >= end >= full:
                t = t.narrow(d, end - full, full)
                continue
        elif s == full:
            continue
        raise ValueError(_misfit_message(selector, what, t.shape, scope, shape, d, site_shaped))
    return t


def _misfit_message(selector: Selector, what: str, tshape: Sequence[int], scope: Scope, shape: tuple[int, ...],
                    d: int, site_shaped: bool) -> str:
    described = selector.describe()
    sel = f" (selection: {described})" if described else ""
    rule = (
        "expected the site's shape, with batch 1 or the run's batch"
        if site_shaped
        else "each dim must be 1, the site's size, or the number of selected entries along it"
    )
    where = f" at position offset {scope.offset}" if scope.offset else ""
    return (
        f"{what} of shape {format_shape(tshape)} does not fit site {scope.site!r} of shape {format_shape(shape)}"
        f"{where} (dim {d}){sel}: {rule}"
    )


def check_site_shaped(
    what: str,
    tshape: Sequence[int],
    site: str,
    shape: tuple[int | None, ...],
    free_dims: Sequence[int] = (),
) -> None:
    """Before-the-run check of a site-shaped source: the site's shape, batch 1 or any (checked by the caller).

    Lengths are checked only where known: a plain run needs the run's positions exactly; during
    ``generate`` (positions unknown) a longer source is read at the absolute positions.
    """
    if len(tshape) != len(shape):
        raise ValueError(
            f"{what} of shape {format_shape(tshape)} does not match site {site!r} of shape {format_shape(shape)}"
        )
    for d, (s, full) in enumerate(zip(tshape, shape, strict=True)):
        if full is None or s == full or d == 0 and s == 1 or d in free_dims:
            continue
        raise ValueError(
            f"{what} of shape {format_shape(tshape)} does not match site {site!r} of shape {format_shape(shape)} "
            f"(dim {d}): expected the site's shape, with batch 1 or the run's batch"
        )


def check_selection_shaped(
    selector: Selector, what: str, tshape: Sequence[int], site: str, shape: tuple[int | None, ...], lay: SiteLayout
) -> None:
    """Before-the-run check of a value broadcast against the selection (Clamp / Steer / a mean vector)."""
    nd = len(shape)
    if len(tshape) > nd:
        raise ValueError(
            f"{what} of shape {format_shape(tshape)} has more dims than site {site!r} {format_shape(shape)}"
        )
    padded = (1,) * (nd - len(tshape)) + tuple(tshape)
    counts: dict[int, int] = {}
    for sel, dim in ((selector.rows, 0), (selector.heads, lay.head_dim), (selector.index, nd - 1)):
        if isinstance(sel, torch.Tensor) and dim is not None:
            counts[dim] = sel.numel()
    if selector.positions.kind == "list" and lay.pos_dim is not None:
        assert isinstance(selector.positions.values, torch.Tensor)
        counts[lay.pos_dim] = selector.positions.values.numel()
    for d, (s, full) in enumerate(zip(padded, shape, strict=True)):
        if s == 1 or full is None or s == full or counts.get(d) == s:
            continue
        if isinstance(selector.at_dim(d, lay, nd), slice):
            continue  # counted at run time
        described = selector.describe()
        raise ValueError(
            f"{what} of shape {format_shape(tshape)} does not fit site {site!r} of shape {format_shape(shape)} "
            f"(dim {d}){f' (selection: {described})' if described else ''}: each dim must be 1, the site's size, "
            "or the number of selected entries along it"
        )
