"""Splicing SAEs into a run, and editing their features.

``Splice(sae, edit=None, keep_error=True, detach_error=False)`` is an
:class:`~mishax_py.interventions.Intervention`: at its site it encodes the value
``x`` to features ``f``, applies ``edit`` to get ``f'``, and returns

* ``keep_error=True`` (default): ``x_hat(f') + (x - x_hat(f))`` — the reconstruction plus
  the SAE's error term, so with no edit the value is unchanged (computed as
  ``x + (f' - f) @ W_dec``, which is exactly ``x`` with no edit, and cheap because
  ``f' - f`` is sparse);
* ``keep_error=False``: ``x_hat(f')`` — the pure reconstruction;
* ``detach_error=True``: as the default, but the error term is a constant for autograd
  (gradients reach upstream only through the SAE's features — for attribution).

Features are ``[batch, pos, d_sae]``; ``blocks.L.attn.z`` values ``[batch, pos, head, d_head]``
are flattened head-major to ``[batch, pos, head*d_head]`` and written back in the site's shape.
The run is offered ``f'`` as ``"sae.features"`` and the error ``x - x_hat(f)`` as ``"sae.error"``
(``im.run_with_cache(ids, sites=[f"{site}.sae.features"], interventions=...)`` stores them).

Edits act on the feature tensor, with no Python loop over rows:

* ``FeatureAblate(ids)`` sets features to 0,
* ``FeatureClamp(ids, value)`` sets them to ``value``,
* ``FeatureSteer(ids, scale)`` adds ``scale`` to them (moving the output by ``scale * W_dec[id]``),
* any callable ``f(features) -> features``, or a list of edits applied in order.

``ids`` is an int or a list / 1-D tensor (the same features in every row), or a 2-D
tensor ``[batch, k]`` (row ``b`` edits ``ids[b]``; ``-1`` pads rows with fewer ids), so
``FeatureAblate(torch.arange(256)[:, None])`` on a 256-row batch ablates feature ``i`` in row
``i``. ``positions=`` restricts an edit to absolute token positions (int, list, slice).
Under a run restricted to ``event.rows`` (sweeps), the splice works on the sub-batch
``value[rows]`` as if it were the whole run; per-row ids with the full run's row count are
read at ``ids[rows]``.

Transcoders read one site and write another: use :class:`TranscoderSplice` (or
:func:`splice`, which returns the ``{site: intervention}`` dict for either kind)::

    im.run(ids, interventions=saes.splice(transcoder, edit=saes.FeatureAblate([3])))
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mishax_py.interventions import Intervention
from mishax_py.runtime import RunContext, SiteEvent
from saes import kernels
from saes.base import SAE, Transcoder

__all__ = [
    "Edit",
    "FeatureAblate",
    "FeatureClamp",
    "FeatureEdit",
    "FeatureSteer",
    "Splice",
    "TranscoderSplice",
    "splice",
]

IdsLike = int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor
PositionsLike = int | Sequence[int] | slice | torch.Tensor | None


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

    def __init__(self, ids: IdsLike, *, positions: PositionsLike = None) -> None:
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

    def _values_for(self, value: Any, ids: torch.Tensor, f: torch.Tensor, scope: EditScope) -> torch.Tensor:
        """``[R, d_sae]`` tensor holding ``value`` (scalar, per-id, or per-row per-id) at ``ids``."""
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


class FeatureClamp(FeatureEdit):
    """Set features ``ids`` to ``value`` (a scalar, one value per id, or ``[batch, k]`` per row)."""

    def __init__(
        self, ids: IdsLike, value: float | Sequence[float] | torch.Tensor, *, positions: PositionsLike = None
    ):
        super().__init__(ids, positions=positions)
        self.value = value

    def _new(self, f: torch.Tensor, ids: torch.Tensor, scope: EditScope) -> torch.Tensor:
        return self._values_for(self.value, ids, f, scope)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", value={self.value!r})"


class FeatureSteer(FeatureEdit):
    """Add ``scale`` to features ``ids``: the output moves by ``scale * W_dec[id]``.

    ``scale`` is a scalar, one value per id, or ``[batch, k]`` per row.
    """

    def __init__(
        self,
        ids: IdsLike,
        scale: float | Sequence[float] | torch.Tensor = 1.0,
        *,
        positions: PositionsLike = None,
    ) -> None:
        super().__init__(ids, positions=positions)
        self.scale = scale

    def _new(self, f: torch.Tensor, ids: torch.Tensor, scope: EditScope) -> torch.Tensor:
        return f + self._values_for(self.scale, ids, f, scope)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", scale={self.scale!r})"


Edit = FeatureEdit | Callable[[torch.Tensor], torch.Tensor] | Sequence[Any] | None


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


# --------------------------------------------------------------------------- splices
class Splice(Intervention):
    """Replace a site's value by the SAE's reconstruction (plus error term); see the module docs.

    Args:
        sae: the SAE (its ``site`` is where it belongs; register the splice there).
        edit: a feature edit, a callable ``f -> f'``, a list of them, or ``None``.
        keep_error: add the error term ``x - x_hat(f)`` (default) so only the edit changes the value.
        detach_error: treat the error term as a constant for autograd.
        record: offer ``"sae.features"`` / ``"sae.error"`` to the run's cache.
    """

    def __init__(
        self,
        sae: SAE,
        edit: Edit = None,
        keep_error: bool = True,
        detach_error: bool = False,
        *,
        record: bool = True,
    ) -> None:
        if isinstance(sae, Transcoder) and type(self) is Splice:
            raise TypeError(
                "a Transcoder reads one site and writes another: use saes.TranscoderSplice(tc, ...) "
                "and register its .interventions() (or saes.splice(tc, ...)), which records the input site"
            )
        self.sae = sae
        self.edit = edit
        self.keep_error = keep_error
        self.detach_error = detach_error
        self.record = record

    def check(self, site: str, shape: tuple[int | None, ...] | None) -> None:
        what = "d_out" if self.sae.d_out != self.sae.d_in else "d_in"
        _check_width(self.sae.d_out, site, shape, type(self).__name__, what)

    def apply(self, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        offset = int(event.position_offset)
        if event.rows is None:
            return self._splice(value, event, EditScope(offset, None, value.shape[0]))
        rows = event.rows.to(device=value.device, dtype=torch.long)
        sub = value.index_select(0, rows)
        out = self._splice(sub, event, EditScope(offset, rows, value.shape[0]))
        return value.index_copy(0, rows, out)

    # The SAE input for this value (for a plain SAE, the value itself).
    def _input(self, value: torch.Tensor, event: SiteEvent, scope: EditScope) -> torch.Tensor:
        return value

    def _splice(self, value: torch.Tensor, event: SiteEvent, scope: EditScope) -> torch.Tensor:
        sae = self.sae
        x_in = self._input(value, event, scope).to(sae.device)
        x_flat = _flatten_to(value, sae.d_out, event.site)  # [..., d_out], value's dtype/device
        f = sae.encode(x_in)
        f_new = apply_edit(self.edit, f, scope)
        wants = self.record and _has_sinks(event.context)
        if wants:
            event.record("sae.features", f_new)
            err = x_flat.to(device=sae.device, dtype=sae.dtype) - self._predict(f, x_in)
            event.record("sae.error", err.detach() if self.detach_error else err)
        if not self.keep_error:
            out_flat = self._predict(f_new, x_in).to(device=value.device, dtype=value.dtype)
            return out_flat.reshape(value.shape)
        if self.edit is None and not self.detach_error:
            return value  # x_hat + (x - x_hat) with nothing edited: the value itself
        # x_hat(f') + (x - x_hat(f)) == x + (f' - f) @ W_dec; the skip term and b_dec cancel.
        base = f.detach() if self.detach_error else f
        x_base = value.detach() if self.detach_error else value
        delta = kernels.decode(f_new - base, sae.W_dec, torch.zeros_like(sae.b_dec), mode=_delta_mode(sae))
        return x_base + delta.to(device=value.device, dtype=value.dtype).reshape(value.shape)

    def _predict(self, f: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        """The SAE's output for features ``f`` (``[..., d_out]``)."""
        return self.sae.decode(f)

    def __repr__(self) -> str:
        args = [f"{type(self.sae).__name__}(d_sae={self.sae.d_sae}, site={self.sae.site!r})"]
        if self.edit is not None:
            args.append(f"edit={self.edit!r}")
        if not self.keep_error:
            args.append("keep_error=False")
        if self.detach_error:
            args.append("detach_error=True")
        return f"{type(self).__name__}({', '.join(args)})"


class _InputRecorder(Intervention):
    """Remembers a transcoder's input-site value for the splice at its output site (per run)."""

    def __init__(self, owner: TranscoderSplice) -> None:
        self.owner = owner

    def check(self, site: str, shape: tuple[int | None, ...] | None) -> None:
        _check_width(self.owner.sae.d_in, site, shape, "TranscoderSplice (input)", "d_in")

    def apply(self, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        self.owner._inputs[event.context] = value  # the whole batch; the splice picks its rows
        return value

    def __repr__(self) -> str:
        return f"TranscoderInput({self.owner.sae.site!r})"


class TranscoderSplice(Splice):
    """Splice a :class:`~saes.base.Transcoder` at its output site, reading its input site.

    ``im.run(ids, interventions={tc.output_site: ts})`` is enough: the splice names its
    input-site recorder in :meth:`companions`, which the model registers first.
    ``ts.interventions()`` (``{tc.site: recorder, tc.output_site: splice}``) also works.
    The output becomes ``pred(f') + (y - pred(f))`` with ``y`` the output site's value,
    ``pred(f) = decode(f) (+ x @ W_skip)`` (``keep_error=True``), or ``pred(f')``.
    Use one ``TranscoderSplice`` per variant in a sweep.

    Args:
        transcoder: the transcoder (``site``: input, ``output_site``: output).
        edit, keep_error, detach_error, record: as for :class:`Splice`.
        input_site, output_site: override the transcoder's sites.
    """

    def __init__(
        self,
        transcoder: Transcoder,
        edit: Edit = None,
        keep_error: bool = True,
        detach_error: bool = False,
        *,
        record: bool = True,
        input_site: str | None = None,
        output_site: str | None = None,
    ) -> None:
        super().__init__(transcoder, edit, keep_error, detach_error, record=record)
        self.input_site = input_site or transcoder.site
        self.output_site = output_site or transcoder.output_site
        if self.input_site is None or self.output_site is None:
            raise ValueError(
                "TranscoderSplice needs the transcoder's input and output sites "
                f"(got site={self.input_site!r}, output_site={self.output_site!r}); "
                "pass input_site= / output_site="
            )
        self.recorder = _InputRecorder(self)
        self._inputs: weakref.WeakKeyDictionary[RunContext, torch.Tensor] = weakref.WeakKeyDictionary()

    def interventions(self) -> dict[str, Intervention]:
        """``{input_site: recorder, output_site: this splice}`` for ``im.run(..., interventions=...)``."""
        return {self.input_site: self.recorder, self.output_site: self}

    def companions(self) -> dict[str, Intervention]:
        """The input-site recorder: ``{tc.output_site: TranscoderSplice(tc)}`` alone registers it too."""
        return {self.input_site: self.recorder}

    def _input(self, value: torch.Tensor, event: SiteEvent, scope: EditScope) -> torch.Tensor:
        got = self._inputs.get(event.context)
        if got is None:
            raise RuntimeError(
                f"TranscoderSplice at {event.site!r} has no value from its input site {self.input_site!r}: "
                "register both parts with interventions=ts.interventions() (or saes.splice(tc))"
            )
        x_in = got
        if scope.rows is not None:
            x_in = x_in.index_select(0, scope.rows.to(x_in.device))
        if x_in.shape[0] != value.shape[0]:
            raise RuntimeError(
                f"TranscoderSplice: input site value has batch {x_in.shape[0]} but output site "
                f"{event.site!r} has {value.shape[0]} (use one TranscoderSplice per sweep variant)"
            )
        return x_in

    def _predict(self, f: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        out = self.sae.decode(f)
        skip = self.sae.skip_term(x_in)  # type: ignore[attr-defined]
        return out if skip is None else out + skip

    def _splice(self, value: torch.Tensor, event: SiteEvent, scope: EditScope) -> torch.Tensor:
        try:
            return super()._splice(value, event, scope)
        finally:
            self._inputs.pop(event.context, None)


def splice(
    sae: SAE, edit: Edit = None, keep_error: bool = True, detach_error: bool = False, **kwargs: Any
) -> dict[str, Intervention]:
    """``{site: intervention}`` splicing ``sae`` (an SAE or a transcoder) into a run.

    ``im.run(ids, interventions=saes.splice(sae, edit=saes.FeatureClamp([123], 8.0)))``.
    """
    if isinstance(sae, Transcoder):
        return TranscoderSplice(sae, edit, keep_error, detach_error, **kwargs).interventions()
    site = kwargs.pop("site", None) or sae.site
    if site is None:
        raise ValueError("this SAE has no site; pass site=... (or register Splice(sae) at a site yourself)")
    return {site: Splice(sae, edit, keep_error, detach_error, **kwargs)}


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
        if items and all(isinstance(r, (list, tuple, range, torch.Tensor)) for r in items):
            rows = [
                torch.as_tensor(list(r) if not isinstance(r, torch.Tensor) else r, dtype=torch.long).reshape(
                    -1
                )
                for r in items
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


def _position_mask(positions: PositionsLike, n: int, offset: int, device: torch.device) -> torch.Tensor:
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


def _flatten_to(x: torch.Tensor, width: int, site: str) -> torch.Tensor:
    if x.shape[-1] == width:
        return x
    if x.dim() >= 2 and x.shape[-1] * x.shape[-2] == width:
        return x.reshape(*x.shape[:-2], width)
    raise ValueError(f"site {site!r} value of shape {tuple(x.shape)} does not flatten to width {width}")


def _check_width(width: int, site: str, shape: tuple[int | None, ...] | None, who: str, what: str) -> None:
    if shape is None or len(shape) == 0:
        return
    last = shape[-1]
    if last is None or last == width:
        return
    if len(shape) >= 2 and shape[-2] is not None and shape[-2] * last == width:
        return
    raise ValueError(
        f"{who}: SAE {what}={width} does not match site {site!r} of shape {tuple(shape)} "
        "(the last dim, or head*d_head for per-head sites, must equal it)"
    )


def _has_sinks(ctx: RunContext) -> bool:
    return bool(getattr(ctx, "derived_sinks", True))


def _delta_mode(sae: SAE) -> str:
    if sae.device.type == "cpu" and sae.dtype in (torch.bfloat16, torch.float16):
        return "sparse"  # CPU half GEMMs are slow; deltas are sparse anyway
    return "auto"
