"""Transcoders as the replacement of a layer's MLP: which layer each replaces, what it computes.

Shared by the attribution graph (:mod:`mishax_py.circuits.build`) and the replacement runs
(:mod:`mishax_py.circuits.replacement`), so both read a transcoder the same way: features are
``activation(pre_acts(x))`` in float32, and what it writes is ``decode(f)`` plus its skip
connection where it has one. Which sites a transcoder may read and write comes from the
model's family (``im.family.mlp_input_kinds`` / ``mlp_output_kind``).

Cross-layer transcoders (circuit-tracer's CLTs): a :class:`~mishax_py.circuits.dictionaries.
CrossLayerTranscoderLike` is taken apart into one transcoder per layer (:func:`transcoder_map`); a layer's
features write its own MLP output through ``W_dec``/``b_dec`` as any transcoder's do, and every later
layer's through ``cross_W_dec`` (:func:`cross_decoders`, :func:`cross_layer_writes`). What reaches a
layer's MLP output is then its own transcoder's output plus the cross-layer writes of earlier layers'
features (:func:`transcoder_outputs`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from mishax_py.circuits.dictionaries import CrossLayerTranscoderLike, TranscoderLike

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = [
    "TRANSCODER_MEMBERS",
    "TranscoderMap",
    "Transcoders",
    "cross_decoders",
    "cross_layer_writes",
    "skip_term",
    "transcoder_features",
    "transcoder_map",
    "transcoder_output",
    "transcoder_outputs",
]

#: What a transcoder is given as: ``{layer: transcoder}``, transcoders that name their sites, or a cross-layer
#: transcoder (its ``layer_transcoders()``).
Transcoders = Mapping[int, TranscoderLike] | Sequence[TranscoderLike] | CrossLayerTranscoderLike
#: ``{layer: (transcoder, canonical input site)}``, as :func:`transcoder_map` checks it.
TranscoderMap = dict[int, tuple[TranscoderLike, str]]
#: The members :func:`transcoder_map` checks for (a clear ``TypeError`` instead of a late ``AttributeError``).
TRANSCODER_MEMBERS = ("pre_acts", "activation", "W_enc", "W_dec", "b_dec")


def transcoder_map(im: InstrumentedModel, transcoders: Transcoders) -> TranscoderMap:
    """``{layer: (transcoder, input site)}`` from a mapping or a sequence of transcoders with ``site``/``output_site``.

    A transcoder must read one of the family's MLP input kinds and write its MLP output kind of
    one layer; a mapping's key must be that layer; at most one transcoder per layer.

    Raises:
        TypeError: an object without the members of :class:`TranscoderLike`.
        ValueError: sites that do not fit (naming them), two transcoders for one layer, none at all.
    """
    if isinstance(transcoders, CrossLayerTranscoderLike):
        return _checked_cross_layer(im, transcoder_map(im, transcoders.layer_transcoders()))
    fam = im.family
    in_kinds, out_kind = tuple(fam.mlp_input_kinds), fam.mlp_output_kind
    items: list[tuple[int | None, TranscoderLike]] = (
        [(int(k), t) for k, t in transcoders.items()] if isinstance(transcoders, Mapping)
        else [(None, t) for t in transcoders]
    )
    out: TranscoderMap = {}
    for key, tc in items:
        for attr in TRANSCODER_MEMBERS:
            if not hasattr(tc, attr):
                raise TypeError(f"transcoder {tc!r} has no {attr!r}: expected a saes.Transcoder (or a duck-typed one)")
        site = getattr(tc, "site", None)
        out_site = getattr(tc, "output_site", None)
        if site is None or out_site is None:
            if key is None:
                raise ValueError("transcoders given as a list need .site and .output_site; pass {layer: transcoder}")
            site = site or im.layer_site(key, in_kinds[0])
            out_site = out_site or im.layer_site(key, out_kind)
        site, out_site = im.resolve(site)[0], im.resolve(out_site)[0]
        layer = im.site_info(site).layer
        if key is not None and key != layer:
            raise ValueError(f"transcoder given for layer {key} reads {site!r} (layer {layer})")
        fits = layer is not None and site in {im.layer_site(layer, kind) for kind in in_kinds} \
            and out_site == im.layer_site(layer, out_kind)
        if layer is None or not fits:
            spelled = " (or " + ", ".join(in_kinds[1:]) + ")" if len(in_kinds) > 1 else ""
            raise ValueError(
                f"attribution graphs need transcoders reading a layer's {in_kinds[0]}{spelled} and writing its "
                f"{out_kind}; got {site!r} -> {out_site!r}"
            )
        if layer in out:
            raise ValueError(f"two transcoders for layer {layer}")
        out[layer] = (tc, site)
    if not out:
        raise ValueError("attribution_graph needs at least one transcoder")
    return _checked_cross_layer(im, out)


def _checked_cross_layer(im: InstrumentedModel, tcs: TranscoderMap) -> TranscoderMap:
    """``tcs``, after checking that every ``cross_W_dec`` writes later layers of the model with ``[d_sae, d_out]`` rows.

    Raises:
        ValueError: a cross-layer decoder for a layer that is not later than its own, or of the wrong shape.
    """
    for layer, (tc, _) in tcs.items():
        for target, W in cross_decoders(tc).items():
            if not layer < target < im.n_layers:
                raise ValueError(f"the transcoder of layer {layer} writes layer {target} through cross_W_dec; "
                                 f"cross-layer writes go to later layers ({layer + 1} .. {im.n_layers - 1})")
            if tuple(W.shape) != tuple(tc.W_dec.shape):
                raise ValueError(f"the transcoder of layer {layer}: cross_W_dec[{target}] has shape {tuple(W.shape)}, "
                                 f"W_dec {tuple(tc.W_dec.shape)}")
    return tcs


def transcoder_features(tc: TranscoderLike, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pre-activations, activations)`` ``[..., d_sae]`` of a transcoder on its input ``x`` (float32, on
    ``x``'s device: ``x`` goes to the transcoder's device and the features come back, so a transcoder kept
    on one device serves a layer on another)."""
    pre = tc.pre_acts(x.to(tc.W_enc.device)).float()
    return pre.to(x.device), tc.activation(pre.clone()).float().to(x.device)  # clone: an activation may work in place


def skip_term(tc: TranscoderLike, x: torch.Tensor) -> torch.Tensor | None:
    """The transcoder's skip connection on ``x`` (``[..., d_out]``), or ``None`` if it has none."""
    fn = getattr(tc, "skip_term", None)
    out = None if fn is None else fn(x.to(tc.W_dec.device))
    return None if out is None else out.to(x.device)


def transcoder_output(tc: TranscoderLike, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What a transcoder writes for activations ``f`` on input ``x``: decoder (+ skip connection), float32, on
    ``x``'s device."""
    out = tc.decode(f.to(device=tc.W_dec.device, dtype=tc.W_dec.dtype)).float().to(x.device)
    skip = skip_term(tc, x)
    return out if skip is None else out + skip.float()


def cross_decoders(tc: TranscoderLike) -> dict[int, torch.Tensor]:
    """``{later layer: [d_sae, d_out]}``: what a transcoder's features also write to later layers' MLP outputs
    (a cross-layer transcoder's layer: its ``cross_W_dec``); ``{}`` for a single-layer transcoder."""
    got = getattr(tc, "cross_W_dec", None)
    return {} if got is None else {int(k): v for k, v in got.items()}


def cross_layer_writes(tc: TranscoderLike, f: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{later layer: f @ cross_W_dec[layer]}`` (``[..., d_out]``, float32 on ``f``'s device): what activations
    ``f`` of a cross-layer transcoder's layer write to each later layer's MLP output; ``{}`` for others."""
    return {target: (f.to(device=W.device, dtype=W.dtype) @ W).float().to(f.device)
            for target, W in cross_decoders(tc).items()}


def transcoder_outputs(tcs: TranscoderMap, feats: Mapping[int, torch.Tensor], inputs: Mapping[int, torch.Tensor]
                       ) -> dict[int, torch.Tensor]:
    """``{layer: what the transcoders write to its MLP output}`` (float32): each layer's own
    :func:`transcoder_output` on ``feats[layer]``/``inputs[layer]``, plus the :func:`cross_layer_writes` of
    earlier layers' features. A layer without its own transcoder appears when an earlier one writes to it."""
    out = {layer: transcoder_output(tc, feats[layer], inputs[layer]) for layer, (tc, _) in tcs.items()}
    for layer, (tc, _) in tcs.items():
        for target, w in cross_layer_writes(tc, feats[layer]).items():
            out[target] = out[target] + w.to(out[target].device) if target in out else w
    return out
