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

Edits (:mod:`saes.edits`, whose edit classes this module re-exports) act on the feature
tensor, with no Python loop over rows: ``FeatureAblate(ids)``, ``FeatureClamp(ids, value)``,
``FeatureSteer(ids, scale)``, any callable ``f(features) -> features``, or a list of edits
applied in order.
Under a run restricted to ``event.rows`` (sweeps), the splice works on the sub-batch
``value[rows]`` as if it were the whole run; per-row ids with the full run's row count are
read at ``ids[rows]``.

Kernels: encode and decode go through :mod:`saes.kernels` (torch or Triton backend). With the
Triton backend, a splice with ``FeatureAblate``/``FeatureClamp``/``FeatureSteer`` edits (or
``keep_error=False``), run without autograd and without recording its features, is one fused
kernel pass over each token's active features (:func:`saes.kernels.splice_rows`); otherwise
the steps above run, each through the backend.

Transcoders read one site and write another: use :class:`TranscoderSplice` (or
:func:`splice`, which returns the ``{site: intervention}`` dict for either kind)::

    im.run(ids, interventions=saes.splice(transcoder, edit=saes.FeatureAblate([3])))
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from mishax_py.interventions import Intervention
from mishax_py.runtime import RunContext, SiteEvent
from saes import kernels
from saes.base import SAE, Transcoder, fold_to_width
from saes.edits import Edit, EditScope, FeatureAblate, FeatureClamp, FeatureEdit, FeatureSteer, apply_edit

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

    def peak_bytes(self, rows: int, pos: int) -> int:
        """The transient bytes one application allocates at its site for ``rows x pos`` tokens (read by
        :func:`mishax_py.memory.estimate_memory` and the runs' memory checks): the pre-activations, features
        and edited features ``[N, d_sae]`` and the reconstruction and error ``[N, d_out]``, in fp32 at most, and
        for a CPU half-precision SAE the fp32 copy of ``W_enc`` or ``W_dec`` its GEMMs run with
        (:func:`saes.kernels.linear`)."""
        sae, n = self.sae, int(rows) * int(pos)
        out = 3 * n * sae.d_sae * 4 + 2 * n * sae.d_out * 4
        if kernels.is_cpu_half(sae.W_enc):
            out += max(sae.d_in, sae.d_out) * sae.d_sae * 4
        return out

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
        fused = self._fused(value, x_in, x_flat, event, scope)
        if fused is not None:
            return fused
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

    def _skip(self, x_in: torch.Tensor) -> torch.Tensor | None:
        """What the output adds besides ``decode(f)`` (a transcoder's skip term), ``[..., d_out]``, or ``None``."""
        return None

    def _fused(
        self, value: torch.Tensor, x_in: torch.Tensor, x_flat: torch.Tensor, event: SiteEvent, scope: EditScope
    ) -> torch.Tensor | None:
        """The splice as one Triton pass over the active features (:func:`saes.kernels.splice_rows`), or ``None``
        where the general path runs instead: the torch backend, no edit with the error kept (the value
        itself), recorded features, autograd (something requires gradients under grad mode: the kernel has
        no backward), or an edit that is not a list of ``FeatureAblate``/``FeatureClamp``/``FeatureSteer``."""
        sae = self.sae
        if kernels.resolve_backend(sae.device) != "triton":
            return None
        if (self.keep_error and self.edit is None) or (self.record and _has_sinks(event.context)):
            return None
        if torch.is_grad_enabled() and (
            value.requires_grad or x_in.requires_grad or any(p.requires_grad for p in sae.parameters())
        ):
            return None
        table = _edit_table(self.edit, (*x_flat.shape[:-1], sae.d_sae), scope, sae.device)
        if table is None:
            return None
        skip = None if self.keep_error else self._skip(x_in)
        out, _ = kernels.splice_rows(
            x_flat.reshape(-1, sae.d_out).to(sae.device), sae.encode_sparse(x_in), sae.W_dec, sae.b_dec, table,
            keep_error=self.keep_error, skip=None if skip is None else skip.reshape(-1, sae.d_out),
            out_dtype=value.dtype,
        )
        return out.to(value.device).reshape(value.shape)

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
        self.transcoder = transcoder
        reads = input_site or transcoder.site
        writes = output_site or transcoder.output_site
        if reads is None or writes is None:
            raise ValueError(
                "TranscoderSplice needs the transcoder's input and output sites "
                f"(got site={reads!r}, output_site={writes!r}); "
                "pass input_site= / output_site="
            )
        self.input_site: str = reads
        self.output_site: str = writes
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
        skip = self.transcoder.skip_term(x_in)
        return out if skip is None else out + skip

    def _skip(self, x_in: torch.Tensor) -> torch.Tensor | None:
        return self.transcoder.skip_term(x_in)

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
def _flatten_to(x: torch.Tensor, width: int, site: str) -> torch.Tensor:
    folded = fold_to_width(x, width)
    if folded is not None:
        return folded
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


def _edit_table(
    edit: Edit, shape: tuple[int, ...], scope: EditScope, device: torch.device
) -> kernels.EditTable | None:
    """``edit`` as a per-token :class:`saes.kernels.EditTable` for features of ``shape`` ``[batch, ..., d_sae]``
    (rows: the leading dims flattened), or ``None`` for edits only the dense path applies (callables, edit
    classes without a table; a ``FeatureSteer`` naming a feature twice in a row, which the dense path adds once)."""
    edits: list[FeatureEdit] = []
    stack: list[Any] = [edit]
    while stack:
        e = stack.pop(0)
        if e is None:
            continue
        if isinstance(e, FeatureEdit):
            edits.append(e)
        elif isinstance(e, (list, tuple)):
            stack[:0] = list(e)
        else:
            return None
    if not edits:
        return kernels.EditTable.empty(device)
    lead = shape[:-1]
    parts: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
    per_token = False
    for e in edits:
        try:
            ids, vals, pos = e.table(shape, scope, device=device)
        except NotImplementedError:  # a FeatureEdit subclass of the user's, known only densely
            return None
        if not e.sets and ids.shape[1] > 1:
            srt = ids.sort(dim=1).values
            if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
                return None
        if ids.shape[0] > 1 or pos is not None:
            per_token = True
            k = ids.shape[1]
            view = (ids.shape[0], *([1] * (len(lead) - 1)), k)
            ids = ids.reshape(view).expand(*lead, k)
            vals = vals.reshape(view).expand(*lead, k)
            if pos is not None:
                ids = torch.where(pos.view(1, -1, *([1] * (len(lead) - 1))), ids, -1)
        parts.append((ids, vals, e.sets))
    rows = math.prod(lead) if per_token else 1
    flat = [(i.reshape(-1, i.shape[-1]).expand(rows, -1), v.reshape(-1, v.shape[-1]).expand(rows, -1), s)
            for i, v, s in parts]
    ids = torch.cat([i for i, _, _ in flat], dim=1)
    vals = torch.cat([v.float() for _, v, _ in flat], dim=1)
    sets = torch.cat([torch.full(i.shape, s, dtype=torch.bool, device=device) for i, _, s in flat], dim=1)
    return kernels.EditTable(ids, vals, sets)


def _has_sinks(ctx: RunContext) -> bool:
    return bool(getattr(ctx, "derived_sinks", True))


def _delta_mode(sae: SAE) -> str:
    if kernels.is_cpu_half(sae.W_enc):
        return "sparse"  # CPU half GEMMs are slow; deltas are sparse anyway
    return "auto"
