"""What circuit tracing uses of an SAE and of a transcoder, as structural types.

The circuits package takes its sparse dictionaries as arguments and never imports ``saes``:
``saes.SAE`` (and its families) satisfies :class:`SAELike`, ``saes.Transcoder`` satisfies
:class:`TranscoderLike`, and so does any object with the same members (a dictionary from
another library wrapped in a few lines). Widths: ``d_in`` is the width of the site read
(``n_heads * d_head`` for an ``attn.z`` SAE, whose value is flattened), ``d_sae`` the number
of features, ``d_out`` the width of the site written (``d_in`` for an SAE).

Members a transcoder may have besides these: ``skip_term(x) -> [.., d_out] | None``, a linear
skip connection added to what it writes (:func:`mishax_py.circuits.transcoders.skip_term`
reads it where present); ``cross_W_dec``: ``{later layer: [d_sae, d_out]}``, what its features also
write to the MLP outputs of later layers (one layer of a cross-layer transcoder;
:func:`mishax_py.circuits.transcoders.cross_decoders` reads it where present).

A cross-layer transcoder (``saes.CrossLayerTranscoder``) satisfies :class:`CrossLayerTranscoderLike`:
its ``layer_transcoders()`` gives ``{layer: transcoder}``, each layer's encoder and decoders as a
:class:`TranscoderLike` with ``cross_W_dec``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

__all__ = ["CrossLayerTranscoderLike", "SAELike", "TranscoderLike", "decode_at", "encode_at"]


def encode_at(sae: SAELike, x: torch.Tensor) -> torch.Tensor:
    """``sae.encode(x)`` computed on the SAE's device (``W_dec``'s) and returned on ``x``'s: an SAE kept on one
    device serves a site on another (a layer of a model split by accelerate). Differentiable."""
    return sae.encode(x.to(sae.W_dec.device)).to(x.device)


def decode_at(sae: SAELike, f: torch.Tensor) -> torch.Tensor:
    """``sae.decode(f)`` in the SAE's dtype, computed on its device and returned on ``f``'s. Differentiable."""
    return sae.decode(f.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)).to(f.device)


@runtime_checkable
class SAELike(Protocol):
    """An SAE at one site, as feature circuits use it: encode a site value, decode features.

    Attributes:
        site: the canonical site it reads and writes (``None`` when unknown: then give the SAEs
            as ``{site: sae}``).
        W_dec: ``[d_sae, d_in]`` decoder rows (what feature ``i`` adds per unit of activation).
    """

    @property
    def site(self) -> str | None: ...

    @property
    def W_dec(self) -> torch.Tensor: ...

    def encode(self, x: torch.Tensor, /) -> torch.Tensor:
        """Features ``[..., d_sae]`` of site values ``[..., d_in]``."""
        ...

    def decode(self, f: torch.Tensor, /) -> torch.Tensor:
        """Reconstruction ``[..., d_in]`` of features ``[..., d_sae]`` (``f @ W_dec + b_dec``)."""
        ...


@runtime_checkable
class TranscoderLike(Protocol):
    """A transcoder replacing one layer's MLP, as attribution graphs and replacement runs use it.

    It reads ``site`` (an MLP input kind of the model's family) and predicts ``output_site``
    (the family's MLP output kind) of the same layer.

    Attributes:
        site: the input site (``None``: give the transcoders as ``{layer: transcoder}``).
        output_site: the output site (``None`` likewise).
        W_enc: ``[d_in, d_sae]`` encoder; a feature's pre-activation is ``x . W_enc[:, i] + const``.
        W_dec: ``[d_sae, d_out]`` decoder rows.
        b_dec: ``[d_out]`` decoder bias.
    """

    @property
    def site(self) -> str | None: ...

    @property
    def output_site(self) -> str | None: ...

    @property
    def W_enc(self) -> torch.Tensor: ...

    @property
    def W_dec(self) -> torch.Tensor: ...

    @property
    def b_dec(self) -> torch.Tensor: ...

    def pre_acts(self, x: torch.Tensor, /) -> torch.Tensor:
        """Encoder pre-activations ``[..., d_sae]`` of inputs ``[..., d_in]`` (affine in ``x``)."""
        ...

    def activation(self, pre: torch.Tensor, /) -> torch.Tensor:
        """Features ``[..., d_sae]`` from pre-activations (linear with slope 1 where a feature is active)."""
        ...

    def decode(self, f: torch.Tensor, /) -> torch.Tensor:
        """What the features write, ``[..., d_out]`` (``f @ W_dec + b_dec``; no skip connection)."""
        ...


@runtime_checkable
class CrossLayerTranscoderLike(Protocol):
    """A cross-layer transcoder: features of each layer read that layer's MLP input and write to the MLP
    outputs of that layer and every later one. Attribution graphs take it as ``transcoders=``."""

    def layer_transcoders(self) -> Mapping[int, TranscoderLike]:
        """``{layer: transcoder}``: each layer's features as a :class:`TranscoderLike` whose ``W_dec``/``b_dec``
        write its own layer and whose ``cross_W_dec`` (``{later layer: [d_sae, d_out]}``) the later ones."""
        ...
