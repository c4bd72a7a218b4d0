"""Run a prompt's *local replacement model*, to check an attribution graph's claims in the model it describes.

An attribution graph (:func:`mishax_py.circuits.build.attribution_graph`) is exact for the local
replacement model of its prompt: every MLP replaced by its transcoder plus the error it leaves on
that prompt, attention patterns and the family's norm scales frozen at their values there. A feature clamp in the
*real* model can disagree with the graph for reasons the graph cannot see (a norm rescaling
the change away, an attention pattern moving). :func:`replacement_interventions` builds the
interventions that make an ordinary run compute the replacement model -- optionally with
feature clamps, and with the attention or norm freezing switched off one at a time -- so a
study can tell "the graph is wrong about its own model" (it is not: it is linear there, up to
features switching on or off) from "the model does something the frozen parts hide".

.. code-block:: python

    ivs = replacement_interventions(im, ids, transcoders, clamps=[(layer, pos, feature, 0.0)])
    logits = im.run(ids, interventions=ivs)        # the replacement model, feature ablated
    im.run(ids, interventions=replacement_interventions(im, ids, transcoders))   # == im.run(ids)

Without clamps the run reproduces the model's own logits (every frozen value is the
prompt's own). Frozen values belong to ``ids``: the interventions refuse a run on inputs of
another shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.circuits.build import norm_scale
from mishax_py.circuits.dictionaries import TranscoderLike
from mishax_py.circuits.transcoders import (
    TranscoderMap,
    Transcoders,
    cross_decoders,
    cross_layer_writes,
    transcoder_features,
    transcoder_map,
    transcoder_output,
    transcoder_outputs,
)
from mishax_py.inputs import Ids, as_ids
from mishax_py.interventions import Hook

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["replacement_interventions"]

Clamp = tuple[int, int, int, float]  # (layer, position, feature, value)
# a hook function of one site: the value in, the new value (or None: unchanged) out
SiteFn = Callable[[torch.Tensor], torch.Tensor | None]


def replacement_interventions(
    im: InstrumentedModel,
    ids: Ids,
    transcoders: Transcoders,
    clamps: Sequence[Clamp] = (),
    *,
    freeze_attention: bool = True,
    freeze_norms: bool = True,
) -> dict[str, list[Hook]]:
    """Interventions that run ``ids`` through its local replacement model, with feature clamps.

    Args:
        im: the instrumented model.
        ids: the prompt (``[pos]`` or ``[batch, pos]``) whose replacement model to build.
        transcoders: as for :func:`~mishax_py.circuits.build.attribution_graph` (``{layer: tc}``,
            a list with ``site``/``output_site``, or a cross-layer transcoder, whose clamped features
            also change what they write to later layers). Layers without one keep their MLP output
            on ``ids`` as a constant (the graph's error node).
        clamps: ``(layer, position, feature, value)``: set that transcoder feature's activation
            at that position to ``value`` (0 ablates it), before decoding.
        freeze_attention: attention patterns fixed at their values on ``ids`` (as in the graph).
        freeze_norms: the scales of the norms the family lists (``im.family.frozen_norms``: every
            layer's pre-attention, post-attention and pre-MLP norms and the final norm, for
            instance) fixed at their values on ``ids`` (as in the graph): ``y = x * (y0 / x0)``.

    Returns:
        ``{site: [Hook, ...]}`` for ``im.run(ids, interventions=...)``.
    """
    ids = as_ids(ids, im)
    tcs = transcoder_map(im, transcoders)
    n_layers, n_pos = im.n_layers, ids.shape[1]
    checked = [_check_clamp(c, tcs, n_pos) for c in clamps]
    norms = list(im.family.frozen_norms)
    patterns = [im.layer_site(L, "attn.pattern") for L in range(n_layers)]
    mlp_outs = [im.layer_site(L, im.family.mlp_output_kind) for L in range(n_layers)]
    sites = {s for pair in norms for s in pair} | {site for _, site in tcs.values()} | {*patterns, *mlp_outs}
    with torch.no_grad():
        _, base = im.run_with_cache(ids, sites=sorted(sites))
        inputs = {L: base[site] for L, (_, site) in tcs.items()}
        written = transcoder_outputs(tcs, {L: transcoder_features(tc, inputs[L])[1] for L, (tc, _) in tcs.items()},
                                     inputs)  # a cross-layer transcoder's features also write later layers
        error = {L: base[mlp_outs[L]] - written[L].to(base[mlp_outs[L]].dtype) if L in written
                 else base[mlp_outs[L]] for L in range(n_layers)}
    current: dict[str, torch.Tensor] = {}  # this run's values of the sites other hooks read
    feats_now: dict[int, torch.Tensor] = {}  # this run's (clamped) features, for the later layers they write
    out: dict[str, list[Hook]] = {}

    def add(site: str, fn: SiteFn) -> None:
        out.setdefault(site, []).append(Hook(_shape_checked(fn, site, tuple(base[site].shape))))

    def keep(name: str) -> SiteFn:
        def fn(value: torch.Tensor) -> None:
            current[name] = value

        return fn

    def scaled(x_site: str, scale: torch.Tensor) -> SiteFn:
        return lambda value: current[x_site] * scale.to(value.dtype)

    def constant(frozen: torch.Tensor) -> SiteFn:
        return lambda value: frozen.to(value.dtype)

    if freeze_norms:
        for x_site, y_site in norms:
            add(x_site, keep(x_site))
            add(y_site, scaled(x_site, norm_scale(base[x_site], base[y_site])))
    if freeze_attention:
        for L in range(n_layers):
            add(patterns[L], constant(base[patterns[L]]))
    writers = {L: [S for S, (tc, _) in tcs.items() if L in cross_decoders(tc)] for L in range(n_layers)}
    for L in range(n_layers):
        if L not in tcs:
            if writers[L]:
                add(mlp_outs[L], _cross_written(tcs, feats_now, writers[L], L, error[L]))
            else:
                add(mlp_outs[L], constant(error[L]))
            continue
        tc, in_site = tcs[L]
        add(in_site, keep(in_site))
        edits = [(p, f, v) for layer, p, f, v in checked if layer == L]
        add(mlp_outs[L], _replaced_mlp(current, tc, in_site, edits, error[L], L, tcs, feats_now, writers[L]))
    return out


def _cross_writes(tcs: TranscoderMap, feats_now: dict[int, torch.Tensor], sources: list[int], layer: int
                  ) -> torch.Tensor | None:
    """What this run's features of the earlier layers ``sources`` write to ``layer``'s MLP output, or ``None``."""
    total = None
    for S in sources:
        w = cross_layer_writes(tcs[S][0], feats_now[S])[layer]
        total = w if total is None else total + w
    return total


def _cross_written(tcs: TranscoderMap, feats_now: dict[int, torch.Tensor], sources: list[int], layer: int,
                   err: torch.Tensor) -> SiteFn:
    """A layer without its own transcoder that earlier (cross-layer) features write: their writes + its error."""

    def mlp(value: torch.Tensor) -> torch.Tensor:
        w = _cross_writes(tcs, feats_now, sources, layer)
        assert w is not None
        return (w + err.float()).to(value.dtype)

    return mlp


def _replaced_mlp(current: dict[str, torch.Tensor], tc: TranscoderLike, in_site: str,
                  edits: list[tuple[int, int, float]], err: torch.Tensor, layer: int, tcs: TranscoderMap,
                  feats_now: dict[int, torch.Tensor], sources: list[int]) -> SiteFn:
    """The MLP output of the replacement model: the transcoder on this run's input (features clamped) + error,
    plus what earlier layers' (clamped) features of a cross-layer transcoder write here."""

    def mlp(value: torch.Tensor) -> torch.Tensor:
        x = current[in_site]
        f = transcoder_features(tc, x)[1]
        for p, i, v in edits:
            f[:, p, i] = v  # f is a fresh tensor
        feats_now[layer] = f
        out = transcoder_output(tc, f, x) + err.float()
        cross = _cross_writes(tcs, feats_now, sources, layer)
        return (out if cross is None else out + cross).to(value.dtype)

    return mlp


def _check_clamp(clamp: Any, tcs: TranscoderMap, n_pos: int) -> Clamp:
    try:
        layer, pos, feature, value = clamp
        layer, pos, feature, value = int(layer), int(pos), int(feature), float(value)
    except (TypeError, ValueError):
        raise ValueError(f"a clamp is (layer, position, feature, value), got {clamp!r}") from None
    if layer not in tcs:
        raise ValueError(f"clamp {clamp!r}: layer {layer} has no transcoder (layers with one: {sorted(tcs)})")
    if not 0 <= pos < n_pos:
        raise ValueError(f"clamp {clamp!r}: position {pos} is outside the prompt's {n_pos} positions")
    d_sae = tcs[layer][0].W_dec.shape[0]
    if not 0 <= feature < d_sae:
        raise ValueError(f"clamp {clamp!r}: feature {feature} is outside layer {layer}'s {d_sae} features")
    return layer, pos, feature, value


def _shape_checked(fn: SiteFn, site: str, shape: tuple[int, ...]) -> SiteFn:
    def checked(value: torch.Tensor) -> torch.Tensor | None:
        if tuple(value.shape) != shape:
            raise ValueError(
                f"replacement_interventions were built for a prompt with {site!r} of shape {shape}; this run has "
                f"{tuple(value.shape)} (build them for the ids you run)"
            )
        return fn(value)

    return checked
