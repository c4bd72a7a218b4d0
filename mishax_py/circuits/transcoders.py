"""Transcoders as the replacement of a layer's MLP: which layer each replaces, what it computes.

Shared by the attribution graph (:mod:`mishax_py.circuits.build`) and the replacement runs
(:mod:`mishax_py.circuits.replacement`), so both read a transcoder the same way: features are
``activation(pre_acts(x))`` in float32, and what it writes is ``decode(f)`` plus its skip
connection where it has one. Which sites a transcoder may read and write comes from the
model's family (``im.family.mlp_input_kinds`` / ``mlp_output_kind``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from mishax_py.circuits.dictionaries import TranscoderLike

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = [
    "TRANSCODER_MEMBERS",
    "TranscoderMap",
    "Transcoders",
    "skip_term",
    "transcoder_features",
    "transcoder_map",
    "transcoder_output",
]

#: What a transcoder is given as: ``{layer: transcoder}``, or transcoders that name their sites.
Transcoders = Mapping[int, TranscoderLike] | Sequence[TranscoderLike]
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
    return out


def transcoder_features(tc: TranscoderLike, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pre-activations, activations)`` ``[..., d_sae]`` of a transcoder on its input ``x`` (float32)."""
    pre = tc.pre_acts(x).float()
    return pre, tc.activation(pre.clone()).float()  # clone: an activation may work in place


def skip_term(tc: TranscoderLike, x: torch.Tensor) -> torch.Tensor | None:
    """The transcoder's skip connection on ``x`` (``[..., d_out]``), or ``None`` if it has none."""
    fn = getattr(tc, "skip_term", None)
    return None if fn is None else fn(x)


def transcoder_output(tc: TranscoderLike, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What a transcoder writes for activations ``f`` on input ``x``: decoder (+ skip connection), float32."""
    out = tc.decode(f.to(tc.W_dec.dtype)).float()
    skip = skip_term(tc, x)
    return out if skip is None else out + skip.float()
