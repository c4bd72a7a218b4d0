"""The built-in edits: ``Ablate``, ``Clamp``, ``Patch``, ``Steer`` and their common base.

Each edit holds a :class:`~mishax_py.interventions.selection.Selector` (``positions=``, ``heads=``,
``index=``, ``rows=``; everything by default) and computes its new value over the whole batch; the
new value replaces the old one where the selection is (``torch.where``: differentiable, no in-place
writes). The rules for selectors and for the shapes of values and sources are in
:mod:`mishax_py.interventions`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mishax_py.interventions.base import Intervention
from mishax_py.interventions.fitting import check_selection_shaped, check_site_shaped, fit
from mishax_py.interventions.selection import (
    IndexLike,
    PositionsLike,
    Scope,
    Selection,
    Selector,
    SiteLayout,
    format_shape,
    site_layout,
)
from mishax_py.interventions.watch import note_selection
from mishax_py.runtime import SiteEvent

__all__ = ["Ablate", "Clamp", "Patch", "SelectiveEdit", "Steer"]


class SelectiveEdit(Intervention):
    """An edit restricted to a selection (rows x positions x heads x units); see the package docs.

    Subclasses implement :meth:`edited` (the new value, broadcastable to the site's value) and may
    add checks in :meth:`check_value`.
    """

    def __init__(
        self,
        *,
        positions: PositionsLike = None,
        heads: IndexLike | None = None,
        index: IndexLike | None = None,
        rows: IndexLike | None = None,
    ) -> None:
        self.selector = Selector.of(positions=positions, heads=heads, index=index, rows=rows)

    # -- subclass hooks -----------------------------------------------------------------------
    def edited(self, value: torch.Tensor, scope: Scope, sel: Selection) -> torch.Tensor:
        """The edited value (broadcastable to ``value``); applied only where the selection is."""
        raise NotImplementedError

    def check_value(self, site: str, shape: tuple[int | None, ...], layout: SiteLayout) -> None:
        """Subclass-specific validation before the run (the edit's values and sources against the site)."""

    def repr_args(self) -> list[str]:
        """The edit's own arguments as they read in its repr (selectors are added after them)."""
        return []

    # -- applying -----------------------------------------------------------------------------
    def apply(self, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        offset = int(event.position_offset)
        if event.rows is None:
            return self._apply_local(value, Scope(event.site, offset, value.shape[0], None, event))
        rows = event.rows.to(device=value.device, dtype=torch.long)
        sub = value.index_select(0, rows)
        out = self._apply_local(sub, Scope(event.site, offset, value.shape[0], rows, event))
        return value.index_copy(0, rows, out)

    def _apply_local(self, value: torch.Tensor, scope: Scope) -> torch.Tensor:
        sel = self.selector.build(value, scope)
        note_selection(self, scope.site, sel)  # an edit that selects nothing in a whole run warns (watch.py)
        new = self.edited(value, scope, sel)
        if sel.mask is not None:
            return torch.where(sel.mask, new, value)
        if new.shape == value.shape:
            return new
        return new.expand(value.shape).contiguous()

    def fit(self, t: torch.Tensor | float, value: torch.Tensor, scope: Scope, sel: Selection, what: str, *,
            site_shaped: bool) -> torch.Tensor:
        """``t`` broadcast against ``value`` and this selection (:func:`~mishax_py.interventions.fitting.fit`)."""
        return fit(t, value, scope, sel, self.selector, what, site_shaped=site_shaped)

    # -- checking before the run ------------------------------------------------------------
    def check(self, site: str, shape: tuple[int | None, ...] | None) -> None:
        if shape is None:
            return
        lay = site_layout(site, len(shape))
        self.selector.check(site, shape, lay)
        self.check_value(site, shape, lay)

    def first_position(self, site: str, shape: tuple[int, ...]) -> int:
        """The earliest position this edit can change in a plain run of ``shape`` (``shape[pos]`` if none).

        Used by sweeps: under causal attention, positions before it are those of the clean run, so
        a sweep may compute them once (any intervention may define this method to opt in; it must
        then also honour ``event.position_offset``, as the built-in edits do).
        Conservative (0) where the answer depends on the run: ``"all"``/``"new"`` positions, and
        attention maps (an edit there can give weight to masked or out-of-window keys, which a KV
        cache of the earlier positions does not hold, or holds computed differently for padding).
        """
        return self.selector.first_position(site, shape)

    # -- repr ---------------------------------------------------------------------------------
    def __repr__(self) -> str:
        args = [*self.repr_args()]
        described = self.selector.describe()
        if described:
            args.append(described)
        return f"{type(self).__name__}({', '.join(args)})"


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


class Ablate(SelectiveEdit):
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
                f"Ablate mean mask of shape {format_shape(mask.shape)} does not match the reference activations of "
                f"site {site!r} of shape {format_shape(ref.shape)}: it must be [batch_ref, pos_ref] = "
                f"{format_shape(want)}"
            )
        return mask

    def edited(self, value: torch.Tensor, scope: Scope, sel: Selection) -> torch.Tensor:
        if self.resample:
            n = value.shape[0]
            if n < 2:
                raise ValueError(
                    f"Ablate(resample=True) at site {scope.site!r} of shape {format_shape(value.shape)} needs at least "
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
            return self.fit(mean, value, scope, sel, "Ablate mean", site_shaped=True)
        return self.fit(ref, value, scope, sel, "Ablate mean", site_shaped=False)

    def check_value(self, site: str, shape: tuple[int | None, ...], layout: SiteLayout) -> None:
        if self.resample and shape[0] is not None and shape[0] < 2:
            raise ValueError(
                f"Ablate(resample=True) at site {site!r} of shape {format_shape(shape)} needs at least 2 batch rows"
            )
        if self.mean is None:
            return
        ref = self._reference(site)
        if ref.ndim == len(shape):  # reference activations: any batch; any positions if averaged over them
            free = [0] + ([layout.pos_dim] if self.mean_over_positions and layout.pos_dim is not None else [])
            check_site_shaped("Ablate mean reference", tuple(ref.shape), site, shape, free)
            self._reference_mask(site, ref, layout.pos_dim)  # a mask that does not fit fails before the run
        else:
            check_selection_shaped(self.selector, "Ablate mean", tuple(ref.shape), site, shape, layout)

    def repr_args(self) -> list[str]:
        if self.resample:
            return [f"resample=True, seed={self.seed}"]
        if self.mean is not None:
            kind = "tensor" if isinstance(self.mean, torch.Tensor) else "cache"
            return [f"mean=<{kind}>" + (", mean_over_positions=True" if self.mean_over_positions else "")]
        return []


class Clamp(SelectiveEdit):
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

    def edited(self, value: torch.Tensor, scope: Scope, sel: Selection) -> torch.Tensor:
        return self.fit(self.value, value, scope, sel, "Clamp value", site_shaped=False)

    def check_value(self, site: str, shape: tuple[int | None, ...], layout: SiteLayout) -> None:
        vshape = tuple(torch.as_tensor(self.value).shape)
        check_selection_shaped(self.selector, "Clamp value", vshape, site, shape, layout)

    def repr_args(self) -> list[str]:
        v = self.value
        return [f"<tensor {format_shape(v.shape)}>" if isinstance(v, torch.Tensor) and v.ndim else repr(float(v))]


class Patch(SelectiveEdit):
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

    def edited(self, value: torch.Tensor, scope: Scope, sel: Selection) -> torch.Tensor:
        return self.fit(self._source(scope.site), value, scope, sel, "Patch source", site_shaped=True)

    def check_value(self, site: str, shape: tuple[int | None, ...], layout: SiteLayout) -> None:
        src = self._source(site)
        check_site_shaped("Patch source", tuple(src.shape), site, shape)
        if shape[0] is not None and src.shape[0] not in (1, shape[0]):
            raise ValueError(
                f"Patch source of shape {format_shape(src.shape)} does not match site {site!r} of shape "
                f"{format_shape(shape)}: its batch must be 1 (broadcast) or the run's batch {shape[0]}"
            )

    def repr_args(self) -> list[str]:
        src = self.source
        return [f"<tensor {format_shape(src.shape)}>" if isinstance(src, torch.Tensor) else "<cache>"]


class Steer(SelectiveEdit):
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

    def edited(self, value: torch.Tensor, scope: Scope, sel: Selection) -> torch.Tensor:
        delta = self.fit(self.vector, value, scope, sel, "Steer vector", site_shaped=False)
        scale = self.scale.to(value.device) if isinstance(self.scale, torch.Tensor) else self.scale
        return value + scale * delta

    def check_value(self, site: str, shape: tuple[int | None, ...], layout: SiteLayout) -> None:
        vshape = tuple(torch.as_tensor(self.vector).shape)
        check_selection_shaped(self.selector, "Steer vector", vshape, site, shape, layout)

    def repr_args(self) -> list[str]:
        v = self.vector
        args = [f"<tensor {format_shape(v.shape)}>" if isinstance(v, torch.Tensor) else repr(v)]
        if not (isinstance(self.scale, (int, float)) and self.scale == 1.0):
            args.append(f"scale={float(self.scale)}")
        return args
