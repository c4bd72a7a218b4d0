"""Feature edits: what a :class:`~saes.splicing.Splice` does to an SAE's features.

Edits act on the feature tensor, with no Python loop over rows:

* ``FeatureAblate(ids)`` sets features to 0,
* ``FeatureClamp(ids, value)`` sets them to ``value``,
* ``FeatureSteer(ids, scale)`` adds ``scale`` to them (moving the output by ``scale * W_dec[id]``),
* any callable ``f(features) -> features``, or a list of edits applied in order.

``ids`` is an int or a list / 1-D tensor (the same features in every row), or a 2-D
tensor ``[batch, k]`` (row ``b`` edits ``ids[b]``; ``-1`` pads rows with fewer ids), so
``FeatureAblate(torch.arange(256)[:, None])`` on a 256-row batch ablates feature ``i`` in row
``i``. ``positions=`` restricts an edit to absolute token positions (int, list, slice).
An edit sees the features of the (sub-)batch it runs on and an :class:`EditScope`: under a
run restricted to some rows (sweeps), per-row ids with the full run's row count are read at
``ids[rows]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch

__all__ = [
    "Edit",
    "EditScope",
    "FeatureAblate",
    "FeatureClamp",
    "FeatureEdit",
    "FeatureSteer",
    "IdsLike",
    "EditPositions",
    "ValuesLike",
    "apply_edit",
]

#: feature ids an edit touches: one id, a list, one list per row, or a LongTensor.
IdsLike = int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor
#: the positions a feature edit applies to (absolute, as in generation): the int / list / slice / LongTensor
#: forms of the interventions' ``positions=`` (``mishax_py.interventions.PositionsLike``); ``None`` = all.
EditPositions = int | Sequence[int] | slice | torch.Tensor | None
#: values a clamp sets or a steer adds: a scalar, one per id ``[k]``, or per row ``[batch, k]``.
ValuesLike = float | Sequence[float] | torch.Tensor


@dataclass
class EditScope:
    """What an edit knows about where it runs.

    Attributes:
        offset: absolute index of the first position of this forward (KV-cache decoding).
        rows: the run's batch rows this (sub-)batch holds, or ``None`` for all rows.
        full_batch: the run's batch size.
    """

    offset: int = 0
    rows: torch.Tensor | None = None
    full_batch: int | None = None


class FeatureEdit:
    """Base class of feature edits: ``edit(f, scope) -> f'`` with ``f`` ``[batch, pos, d_sae]``.

    Args:
        ids: features to edit (see the module docstring for per-row forms).
        positions: absolute positions to edit (int, list, 1-D tensor or slice; negatives
            count from the end of the sequence so far); ``None`` = all.
    """

    def __init__(self, ids: IdsLike, *, positions: EditPositions = None) -> None:
        self.ids = _norm_ids(ids)
        self.positions = positions

    # subclasses: the new values (broadcastable to f), used where the mask is set
    def _new(self, f: torch.Tensor, ids: torch.Tensor, scope: EditScope) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, f: torch.Tensor, scope: EditScope | None = None) -> torch.Tensor:
        scope = scope or EditScope(full_batch=f.shape[0])
        ids = self._ids_for(f, scope)
        mask = _feature_mask(ids, f.shape[-1], f.device)  # [R, d_sae], R in (1, batch)
        mask = _expand_rows(mask, f)  # broadcastable to f
        if self.positions is not None:
            if f.dim() < 3:
                raise ValueError(f"positions= needs features [batch, pos, d_sae], got {tuple(f.shape)}")
            pm = _position_mask(self.positions, f.shape[1], scope.offset, f.device)  # [pos]
            mask = mask & pm.view(1, -1, *([1] * (f.dim() - 2)))
        return torch.where(mask, self._new(f, ids, scope), f)

    def _ids_for(self, f: torch.Tensor, scope: EditScope) -> torch.Tensor:
        ids = self.ids.to(f.device)
        d_sae = f.shape[-1]
        if bool(((ids >= d_sae) | (ids < -1)).any()):
            raise IndexError(
                f"{type(self).__name__}: feature ids {self._describe()} out of range for d_sae={d_sae}"
            )
        if ids.dim() == 1:
            return ids[None]
        return _rowwise(ids, f.shape[0], scope, f"{type(self).__name__} ids")

    def table(
        self, shape: tuple[int, ...], scope: EditScope | None = None, *, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This edit as per-row ``(ids [R, k], values [R, k], positions [pos] bool or None)`` for features of
        ``shape`` ``[batch, (pos,) d_sae]``, without a dense feature tensor (the sparse splice kernels).

        ``R`` is 1 or ``batch``; ids ``-1`` pad; values are what :meth:`_new` sets (ablate 0, clamp) or
        adds (steer, :attr:`sets` False); the position mask is ``None`` when every position is edited.
        """
        probe = torch.zeros((), device=device).expand(shape)  # the shape and device alone
        scope = scope or EditScope(full_batch=shape[0])
        ids, v = self._broadcast_values(self._table_value(), self._ids_for(probe, scope), probe, scope)
        if self.positions is None:
            return ids, v, None
        if len(shape) < 3:
            raise ValueError(f"positions= needs features [batch, pos, d_sae], got {tuple(shape)}")
        return ids, v, _position_mask(self.positions, shape[1], scope.offset, probe.device)

    #: whether :meth:`table`'s values replace the features (ablate, clamp) or are added to them (steer).
    sets: bool = True

    def _table_value(self) -> ValuesLike:
        """The value :meth:`table` gives each id (subclasses without one are applied densely only)."""
        raise NotImplementedError

    def _broadcast_values(
        self, value: ValuesLike, ids: torch.Tensor, f: torch.Tensor, scope: EditScope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, values)`` broadcast to one shape ``[R, k]`` (``value``: scalar, per id, or per row per id)."""
        v = torch.as_tensor(value, dtype=f.dtype, device=f.device)
        if v.dim() > 2:
            raise ValueError(
                f"{type(self).__name__}: values must be a scalar, [k] or [batch, k]; got {tuple(v.shape)}"
            )
        if v.dim() == 2 and v.shape[0] not in (1, ids.shape[0]):
            v = _rowwise(v, f.shape[0], scope, f"{type(self).__name__} values")
        rows = max(ids.shape[0], v.shape[0] if v.dim() == 2 else 1)
        try:
            ids = ids.expand(rows, ids.shape[1])
            v = torch.broadcast_to(v, ids.shape)
        except RuntimeError:
            raise ValueError(
                f"{type(self).__name__}: values of shape {tuple(v.shape)} do not fit ids {tuple(ids.shape)}"
            ) from None
        return ids, v

    def _values_for(self, value: ValuesLike, ids: torch.Tensor, f: torch.Tensor, scope: EditScope) -> torch.Tensor:
        """``[R, d_sae]`` tensor holding ``value`` (scalar, per-id, or per-row per-id) at ``ids``."""
        ids, v = self._broadcast_values(value, ids, f, scope)
        out = torch.zeros(ids.shape[0], f.shape[-1] + 1, dtype=f.dtype, device=f.device)
        out = out.scatter(1, torch.where(ids < 0, f.shape[-1], ids), v)
        return _expand_rows(out[:, :-1], f)

    def _describe(self) -> str:
        return (
            str(self.ids.tolist()) if self.ids.numel() <= 16 else f"tensor of shape {tuple(self.ids.shape)}"
        )

    def __repr__(self) -> str:
        pos = f", positions={self.positions!r}" if self.positions is not None else ""
        return f"{type(self).__name__}({self._describe()}{pos})"


class FeatureAblate(FeatureEdit):
    """Set features ``ids`` to zero (per row with a 2-D ``ids``)."""

    def _new(self, f: torch.Tensor, ids: torch.Tensor, scope: EditScope) -> torch.Tensor:
        return torch.zeros((), dtype=f.dtype, device=f.device)

    def _table_value(self) -> ValuesLike:
        return 0.0


class FeatureClamp(FeatureEdit):
    """Set features ``ids`` to ``value`` (a scalar, one value per id, or ``[batch, k]`` per row)."""

    def __init__(self, ids: IdsLike, value: ValuesLike, *, positions: EditPositions = None) -> None:
        super().__init__(ids, positions=positions)
        self.value = value

    def _new(self, f: torch.Tensor, ids: torch.Tensor, scope: EditScope) -> torch.Tensor:
        return self._values_for(self.value, ids, f, scope)

    def _table_value(self) -> ValuesLike:
        return self.value

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", value={self.value!r})"


class FeatureSteer(FeatureEdit):
    """Add ``scale`` to features ``ids``: the output moves by ``scale * W_dec[id]``.

    ``scale`` is a scalar, one value per id, or ``[batch, k]`` per row.
    """

    def __init__(
        self,
        ids: IdsLike,
        scale: ValuesLike = 1.0,
        *,
        positions: EditPositions = None,
    ) -> None:
        super().__init__(ids, positions=positions)
        self.scale = scale

    sets = False

    def _new(self, f: torch.Tensor, ids: torch.Tensor, scope: EditScope) -> torch.Tensor:
        return f + self._values_for(self.scale, ids, f, scope)

    def _table_value(self) -> ValuesLike:
        return self.scale

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", scale={self.scale!r})"


#: a feature edit: a :class:`FeatureEdit`, a callable ``f -> f'``, a list of edits applied in order, or ``None``.
Edit: TypeAlias = FeatureEdit | Callable[[torch.Tensor], torch.Tensor] | Sequence["Edit"] | None


def apply_edit(edit: Edit, f: torch.Tensor, scope: EditScope | None = None) -> torch.Tensor:
    """Apply an edit (FeatureEdit, callable ``f -> f'``, list of them, or ``None``) to ``f``."""
    if edit is None:
        return f
    if isinstance(edit, FeatureEdit):
        return edit(f, scope)
    if isinstance(edit, (list, tuple)):
        for e in edit:
            f = apply_edit(e, f, scope)
        return f
    if callable(edit):
        out = edit(f)
        if not isinstance(out, torch.Tensor) or out.shape != f.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"feature edit {edit!r} returned {got}, expected features of shape {tuple(f.shape)}"
            )
        return out
    raise TypeError(
        f"edit must be a FeatureEdit, a callable f -> f', or a list of them; got {type(edit).__name__}"
    )


# ---------------------------------------------------------------------------- helpers
def _norm_ids(ids: IdsLike) -> torch.Tensor:
    if isinstance(ids, bool):
        raise TypeError("feature ids must be ints, got a bool")
    if isinstance(ids, int):
        return torch.tensor([ids], dtype=torch.long)
    if isinstance(ids, torch.Tensor):
        t = ids
    else:
        items = list(ids)
        per_row = [r for r in items if isinstance(r, (list, tuple, range, torch.Tensor))]
        if items and len(per_row) == len(items):
            rows = [
                torch.as_tensor(r if isinstance(r, torch.Tensor) else list(r), dtype=torch.long).reshape(-1)
                for r in per_row
            ]
            k = max((len(r) for r in rows), default=0)
            t = torch.full((len(rows), max(k, 1)), -1, dtype=torch.long)
            for i, r in enumerate(rows):  # once, at construction
                t[i, : len(r)] = r
            return t
        t = torch.as_tensor(items, dtype=torch.long)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"feature ids must be integers, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t[None]
    if t.dim() > 2:
        raise ValueError(f"feature ids must be 1-D or [batch, k], got shape {tuple(t.shape)}")
    return t.long()


def _feature_mask(ids: torch.Tensor, d_sae: int, device: torch.device) -> torch.Tensor:
    """``[R, d_sae]`` bool mask with ``ids`` (``[R, k]``, ``-1`` = padding) set."""
    m = torch.zeros(ids.shape[0], d_sae + 1, dtype=torch.bool, device=device)
    m.scatter_(1, torch.where(ids < 0, d_sae, ids), True)
    return m[:, :d_sae]


def _expand_rows(m: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """View a per-row ``[R, d_sae]`` tensor so it broadcasts against ``f`` ``[batch, ..., d_sae]``."""
    if f.dim() <= 2:
        return m
    return m.view(m.shape[0], *([1] * (f.dim() - 2)), m.shape[-1])


def _rowwise(t: torch.Tensor, batch: int, scope: EditScope, what: str) -> torch.Tensor:
    r = t.shape[0]
    if r in (1, batch):
        return t
    if scope.rows is not None and scope.full_batch == r:
        return t.index_select(0, scope.rows.to(t.device))
    full = f" (or the run's {scope.full_batch})" if scope.rows is not None else ""
    raise ValueError(f"{what} have {r} rows but the features have batch {batch}; expected 1 or {batch}{full}")


def _position_mask(positions: EditPositions, n: int, offset: int, device: torch.device) -> torch.Tensor:
    """Bool ``[n]`` mask of this forward's positions that are selected (absolute positions)."""
    total = offset + n
    if isinstance(positions, slice):
        absolute = torch.arange(*positions.indices(total), device=device)
    else:
        absolute = torch.as_tensor(positions, dtype=torch.long, device=device).reshape(-1)
        absolute = torch.where(absolute < 0, absolute + total, absolute)
    loc = absolute - offset
    ok = (loc >= 0) & (loc < n)
    m = torch.zeros(n + 1, dtype=torch.bool, device=device)
    m[torch.where(ok, loc, n)] = True
    return m[:n]
