"""Cross-layer transcoders (CLTs) and multi-layer crosscoders: the model, and splicing it into a run.

A cross-layer transcoder replaces every MLP of a model at once. Its features come in one group per
layer: the features of layer ``L`` read that layer's MLP input ``x_L`` (Gemma 3: ``blocks.L.ln2``,
the ``pre_feedforward_layernorm`` output) and write to the MLP outputs of layer ``L`` *and every
later layer* (``blocks.L'.mlp_out``, ``L' >= L``). With ``n`` layers, per source layer ``L`` and
output layer ``L'``::

    f_L      = JumpReLU_L(x_L @ W_enc[L] + b_enc[L])   (f = (pre > threshold[L]) * relu(pre))
    y_hat_L' = sum_{L <= L'} f_L @ W_dec[L -> L']  +  b_dec[L']  (+ x_L' @ W_skip[L'] for affine CLTs)

A crosscoder of the same file format reads and writes residual streams at a few layers
(Gemma Scope 2: ``resid_post`` of four layers at 25/50/65/85% depth, "weakly causal": the features
of its ``k``-th layer read that layer and write to it and its later layers), and is the same
:class:`CrossLayerTranscoder` with ``input_kind = output_kind = "resid_post"`` and its four layers.

The published format (Gemma Scope 2, ``google/gemma-scope-2-{270m,1b}-{pt,it}/clt/...`` and
``google/gemma-scope-2-*/crosscoder/...``), and where each fact comes from:

* one folder per model: ``clt/width_{W}_l0_{L0}[_affine]`` (e.g. ``clt/width_262k_l0_medium_affine``)
  and ``crosscoder/layer_{a}_{b}_{c}_{d}_width_{W}_l0_{L0}``, holding ``config.json`` and
  ``params_layer_{k}.safetensors`` for ``k = 0 .. n-1`` (the ``k``-th layer of the model's list: every
  decoder layer for a CLT, 18 for 270M and 26 for 1B; the four named layers for a crosscoder). ``W``
  counts the features of all layers together ("262k" = 262,080 = 26 x 10,080 on 1B);
* per file, the layer's parameters (Google's ``JumpReLUMultiLayerSAE`` of the Gemma Scope 2 tutorial
  stacks the files along a leading layer axis): ``w_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
  ``threshold [d_sae]``, ``b_dec [d_out]`` (the bias of *this* layer's output), ``w_dec [d_sae, n,
  d_out]`` (row ``i``, slot ``k'``: what feature ``i`` of this layer writes to the ``k'``-th layer),
  and for ``_affine`` CLTs ``affine_skip_connection [d_in, d_out]``, applied as ``x_k @ A_k`` to the
  same layer's output;
* decoding is all-to-all in that tutorial (``... layer_in d_sae, layer_in d_sae layer_out d_out``),
  causality being in the weights: ``w_dec[:, k' < k]`` of file ``k`` should be zero. circuit-tracer keeps
  only ``w_dec[:, k:]`` (the slots of this layer and later ones); so do we, and the loader warns (naming
  the file) when the dropped slots are not all zero;
* ``config.json``: ``hf_hook_point_in`` / ``hf_hook_point_out`` with a layer placeholder
  (``model.layers.{all}.pre_feedforward_layernorm.output`` / ``...post_feedforward_layernorm.output``
  for a CLT; ``model.layers.{5,9,12,15}.output`` for a crosscoder), ``type`` (``"clt"`` /
  ``"crosscoder"``), ``architecture`` (``"jump_relu"``), ``width``, ``l0``, ``affine_connection``,
  ``model_name``.

Sources (facts and ideas only): circuit-tracer (``decoderesearch/circuit-tracer`` @
``4bb8c0ea10bde09727e14565ec8469656880da53``, ``circuit_tracer/transcoder/cross_layer_transcoder.py``:
``load_gemma_scope_2_clt`` stacks the per-layer files, keeps ``w_dec[i, :, i:, :]``, uses file ``i``'s
``b_dec`` as layer ``i``'s output bias, ``x @ affine_skip_connection[i]`` as the skip; its
``compute_attribution_components`` / ``select_decoder_vectors`` give a feature one decoder vector per
later layer; ``utils/caching.py`` / ``hf_utils.py``: the CLT is listed per layer in a ``config.yaml``
of ``mwhanna/gemma-scope-2-*`` repos pointing at ``hf://google/gemma-scope-2-*/clt/.../params_layer_*``);
SAELens (``decoderesearch/SAELens`` @ ``e05f04416f43c62ef2cb42414e3f846312710553``,
``sae_lens/loading/pretrained_sae_loaders.py``, ``gemma_3_sae_huggingface_loader``: reads one CLT
layer file as a single-layer skip transcoder at ``ln2``, summing ``w_dec`` over the output layers --
a lossy reading we do not follow); the Gemma Scope 2 announcement (LessWrong, "Announcing Gemma Scope
2": CLTs for 270M and 1B, weakly causal crosscoders on four layers of every model, all JumpReLU);
and third-party code that reads the released files (``params_layer_{k}.safetensors``, the
``JumpReLUMultiLayerSAE`` of the tutorial with the shapes above, a transcription of
``clt/width_262k_l0_big/config.json`` and ``crosscoder/layer_5_9_12_15_width_1m_l0_big/config.json``
of ``google/gemma-scope-2-270m-pt``). The release's model cards and files themselves were not
readable here; the shapes agree across all the sources above. Single-layer Gemma Scope 2 files:
:mod:`saes.gemma_scope_2`.

Splicing (:class:`CLTSplice`): interventions at every input site record ``x_L`` and encode ``f_L``
(edited to ``f'_L`` by per-layer feature edits of :mod:`saes.edits`), and at every output site write
``y_hat_L'(f') + (y_L' - y_hat_L'(f))``: the reconstruction of the edited features plus the
per-layer error term on the unedited ones, so with no edit the run is the model's own.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mishax_py.interventions import Intervention
from mishax_py.naming import layer_site
from mishax_py.runtime import RunContext, SiteEvent
from saes import kernels
from saes.edits import Edit, EditScope, apply_edit
from saes.files import write_json_atomic, write_safetensors_atomic
from saes.gemma_scope_2 import GS2_CONFIG, GS2_SKIP_KEY, layer_params_name

__all__ = ["CLTLayer", "CLTSplice", "CrossLayerTranscoder"]

#: the transformers module path of each site kind a multi-layer model reads or writes (config.json).
_HF_HOOK_KINDS = {
    "ln2": "pre_feedforward_layernorm.output",
    "mlp_out": "post_feedforward_layernorm.output",
    "resid_post": "output",
}


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder (or a multi-layer crosscoder): see the module docs for the formula.

    Args:
        layers: the model layers it covers, increasing (an int ``n``: ``0 .. n-1``, a CLT's usual set).
        d_in: input width (the MLP input's, ``d_model``).
        d_sae: features per layer.
        d_out: output width (default ``d_in``).
        input_kind, output_kind: the site kinds read and written at each layer (``blocks.L.<kind>``):
            ``"ln2"`` and ``"mlp_out"`` for Gemma Scope 2 CLTs (Gemma 2 transcoders read
            ``"ln2_normalized"``); ``"resid_post"`` twice for a crosscoder.
        skip: a per-layer affine skip connection ``W_skip [n, d_in, d_out]``.
        dtype, device: of the parameters.

    Parameters (``n = len(layers)``, ``j`` the index of a layer in ``layers``):
        ``W_enc [n, d_in, d_sae]``, ``b_enc [n, d_sae]``, ``threshold [n, d_sae]``,
        ``W_dec``: a list, ``W_dec[j]`` ``[n - j, d_sae, d_out]`` (slot ``k``: what layer ``layers[j]``'s
        features write to layer ``layers[j + k]``), ``b_dec [n, d_out]`` (each output layer's bias),
        ``W_skip [n, d_in, d_out]`` or ``None``.

    Attributes:
        metadata: free-form dict (source folder, hub reference, config values).
    """

    architecture: ClassVar[str] = "clt"

    def __init__(
        self,
        layers: int | Sequence[int],
        d_in: int,
        d_sae: int,
        *,
        d_out: int | None = None,
        input_kind: str = "ln2",
        output_kind: str = "mlp_out",
        skip: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        layer_list = list(range(layers)) if isinstance(layers, int) else [int(v) for v in layers]
        if not layer_list or any(b <= a for a, b in zip(layer_list, layer_list[1:], strict=False)) \
                or layer_list[0] < 0:
            raise ValueError(f"layers must be a non-empty increasing list of layer indices >= 0, got {layers!r}")
        if d_in <= 0 or d_sae <= 0 or (d_out is not None and d_out <= 0):
            raise ValueError(f"widths must be positive, got d_in={d_in}, d_sae={d_sae}, d_out={d_out}")
        d_out = d_in if d_out is None else d_out
        n = len(layer_list)
        kw: dict[str, Any] = {"dtype": dtype or torch.float32, "device": device}
        self.layers: tuple[int, ...] = tuple(layer_list)
        self.input_kind = input_kind
        self.output_kind = output_kind
        self.W_enc = nn.Parameter(torch.zeros(n, d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(n, d_sae, **kw))
        self.threshold = nn.Parameter(torch.zeros(n, d_sae, **kw))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.zeros(n - j, d_sae, d_out, **kw)) for j in range(n)])
        self.b_dec = nn.Parameter(torch.zeros(n, d_out, **kw))
        self.W_skip = nn.Parameter(torch.zeros(n, d_in, d_out, **kw)) if skip else None
        self.metadata: dict[str, Any] = {}

    # ------------------------------------------------------------------ shapes and sites
    @property
    def n_layers(self) -> int:
        """Number of layers covered."""
        return len(self.layers)

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_sae(self) -> int:
        """Features per layer."""
        return int(self.W_enc.shape[2])

    @property
    def d_out(self) -> int:
        return int(self.b_dec.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def index(self, layer: int) -> int:
        """The position of model layer ``layer`` in :attr:`layers`.

        Raises:
            ValueError: a layer the CLT does not cover (names it and the covered ones).
        """
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise ValueError(f"layer {layer} is not one of this {type(self).__name__}'s layers {list(self.layers)}"
                             ) from None

    def site(self, layer: int) -> str:
        """The site layer ``layer``'s features read (``blocks.L.<input_kind>``)."""
        self.index(layer)
        return layer_site(layer, self.input_kind)

    def output_site(self, layer: int) -> str:
        """The site written at layer ``layer`` (``blocks.L.<output_kind>``)."""
        self.index(layer)
        return layer_site(layer, self.output_kind)

    def writes_to(self, layer: int) -> tuple[int, ...]:
        """The layers whose output layer ``layer``'s features write: itself and every later covered layer."""
        return self.layers[self.index(layer):]

    # ------------------------------------------------------------------ computation
    def _input(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"{type(self).__name__} layer {layer} expects inputs [..., {self.d_in}] "
                             f"(site {self.site(layer)!r}), got shape {tuple(x.shape)}")
        return x.to(self.dtype)

    def pre_acts(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Encoder pre-activations ``[..., d_sae]`` of layer ``layer``'s input ``x [..., d_in]``."""
        j = self.index(layer)
        return kernels.linear(self._input(x, layer), self.W_enc[j], self.b_enc[j])

    def activation(self, pre: torch.Tensor, layer: int) -> torch.Tensor:
        """JumpReLU with layer ``layer``'s thresholds: ``(pre > threshold) * relu(pre)``."""
        return kernels.jumprelu(pre, self.threshold[self.index(layer)])

    def encode(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Features ``[..., d_sae]`` of layer ``layer`` from its input ``x [..., d_in]``."""
        return self.activation(self.pre_acts(x, layer), layer)

    def decoder(self, source: int, target: int) -> torch.Tensor:
        """``[d_sae, d_out]``: what layer ``source``'s features write to layer ``target``'s output.

        Raises:
            ValueError: ``target`` before ``source`` (a feature writes only to its layer and later ones),
                or a layer not covered.
        """
        j, k = self.index(source), self.index(target)
        if k < j:
            raise ValueError(f"layer {source}'s features write to layers {list(self.writes_to(source))}, "
                             f"not to layer {target}")
        return self.W_dec[j][k - j]

    def decode(self, features: Mapping[int, torch.Tensor], target: int, *, bias: bool = True) -> torch.Tensor:
        """What features ``{source layer: [..., d_sae]}`` write to layer ``target``'s output, ``[..., d_out]``:
        ``sum_{source <= target} f_source @ W_dec[source -> target] (+ b_dec[target])``; no skip term.

        Sources after ``target`` are ignored (they do not write there); at least one source must be given.
        """
        k = self.index(target)
        out: torch.Tensor | None = None
        for source, f in features.items():
            if self.index(source) > k:
                continue
            if f.shape[-1] != self.d_sae:
                raise ValueError(f"layer {source}'s features must be [..., {self.d_sae}], got {tuple(f.shape)}")
            W = self.decoder(source, target)
            part = kernels.decode(f.to(self.dtype), W, torch.zeros_like(self.b_dec[k]))
            out = part if out is None else out + part
        if out is None:
            raise ValueError(f"no features of a layer <= {target} given (got layers {sorted(features)})")
        return out + self.b_dec[k] if bias else out

    def skip_term(self, x: torch.Tensor, layer: int) -> torch.Tensor | None:
        """``x @ W_skip[layer]`` (``[..., d_out]``) on layer ``layer``'s input, or ``None`` without skips."""
        if self.W_skip is None:
            return None
        return kernels.linear(self._input(x, layer), self.W_skip[self.index(layer)])

    def reconstruct(self, features: Mapping[int, torch.Tensor],
                    inputs: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """``{layer: y_hat}`` at every covered layer from ``features`` of (some) layers: the decoders
        (:meth:`decode`) plus, with skip connections, ``inputs[layer] @ W_skip[layer]``.

        Raises:
            ValueError: skip connections without ``inputs`` for a layer (names it), no feature for a layer.
        """
        out = {}
        for target in self.layers:
            y = self.decode(features, target)
            if self.W_skip is not None:
                if inputs is None or target not in inputs:
                    raise ValueError(f"this CLT has skip connections: reconstruct needs the input of layer {target}")
                skip = self.skip_term(inputs[target], target)
                assert skip is not None
                y = y + skip
            out[target] = y
        return out

    def forward(self, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``{layer: y_hat}`` from every covered layer's input ``{layer: x [..., d_in]}``.

        Raises:
            ValueError: an input missing for a covered layer (names them).
        """
        missing = [L for L in self.layers if L not in inputs]
        if missing:
            raise ValueError(f"CrossLayerTranscoder.forward needs the inputs of every layer; missing {missing}")
        feats = {L: self.encode(inputs[L], L) for L in self.layers}
        return self.reconstruct(feats, inputs)

    def layer_transcoders(self) -> dict[int, CLTLayer]:
        """``{layer: CLTLayer}``: each layer's encoder and decoders as a single-layer transcoder view (what
        :func:`mishax_py.circuits.attribution_graph` takes, as ``transcoders=clt`` or this mapping)."""
        return {L: CLTLayer(self, L) for L in self.layers}

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the Gemma Scope 2 layout (module docs) into folder ``path``; returns the folder.

        ``config.json`` plus ``params_layer_{k}.safetensors`` per covered layer, with the full ``w_dec
        [d_sae, n, d_out]`` (zeros before the layer), each written atomically. :func:`saes.load` reads it.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        n = self.n_layers
        for j in range(n):
            w_dec = torch.zeros(self.d_sae, n, self.d_out, dtype=self.dtype)
            w_dec[:, j:] = self.W_dec[j].detach().to("cpu").permute(1, 0, 2)
            tensors = {
                "w_enc": self.W_enc[j], "b_enc": self.b_enc[j], "threshold": self.threshold[j],
                "b_dec": self.b_dec[j], "w_dec": w_dec,
            }  # fmt: skip
            if self.W_skip is not None:
                tensors[GS2_SKIP_KEY] = self.W_skip[j]
            write_safetensors_atomic({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()},
                                     folder / layer_params_name(j))
        if self.input_kind == self.output_kind:
            placeholder = "{" + ",".join(str(v) for v in self.layers) + "}"
        else:
            placeholder = "{all}" if self.layers == tuple(range(n)) else "{" + ",".join(map(str, self.layers)) + "}"
        cfg: dict[str, Any] = {
            "architecture": "jump_relu",
            "type": "crosscoder" if self.input_kind == self.output_kind else "clt",
            "width": n * self.d_sae,
            "affine_connection": self.W_skip is not None,
        }
        for key, kind in (("hf_hook_point_in", self.input_kind), ("hf_hook_point_out", self.output_kind)):
            if kind in _HF_HOOK_KINDS:
                cfg[key] = f"model.layers.{placeholder}.{_HF_HOOK_KINDS[kind]}"
            else:
                cfg[f"mishax_{key.removeprefix('hf_')}_kind"] = kind
        for key in ("model_name", "l0"):
            if key in self.metadata:
                cfg[key] = self.metadata[key]
        write_json_atomic(folder / GS2_CONFIG, cfg, sort_keys=True)
        return folder

    def extra_repr(self) -> str:
        return (f"layers={list(self.layers)}, d_in={self.d_in}, d_sae={self.d_sae}, d_out={self.d_out}, "
                f"reads={self.input_kind!r}, writes={self.output_kind!r}, skip={self.W_skip is not None}, "
                f"dtype={self.dtype}")


class CLTLayer:
    """One layer of a :class:`CrossLayerTranscoder` seen as a single-layer transcoder (sharing its tensors).

    It has the members attribution graphs read of a transcoder (``mishax_py.circuits.dictionaries.
    TranscoderLike``): ``site``/``output_site`` of its layer, ``W_enc [d_in, d_sae]``, ``W_dec [d_sae,
    d_out]`` (what its features write to *its own* layer), ``b_dec`` (its layer's output bias),
    ``pre_acts``, ``activation``, ``decode`` (``f @ W_dec + b_dec``), ``skip_term`` -- plus
    ``cross_W_dec``: ``{later layer: [d_sae, d_out]}``, what its features write to each later layer.
    """

    def __init__(self, clt: CrossLayerTranscoder, layer: int) -> None:
        self.clt = clt
        self.layer = int(layer)
        self._j = clt.index(layer)

    @property
    def site(self) -> str:
        return self.clt.site(self.layer)

    @property
    def output_site(self) -> str:
        return self.clt.output_site(self.layer)

    @property
    def W_enc(self) -> torch.Tensor:
        return self.clt.W_enc[self._j]

    @property
    def W_dec(self) -> torch.Tensor:
        return self.clt.W_dec[self._j][0]

    @property
    def b_dec(self) -> torch.Tensor:
        return self.clt.b_dec[self._j]

    @property
    def threshold(self) -> torch.Tensor:
        return self.clt.threshold[self._j]

    @property
    def cross_W_dec(self) -> dict[int, torch.Tensor]:
        """``{later layer L': [d_sae, d_out]}``: what this layer's features write to layer ``L'``'s output."""
        W = self.clt.W_dec[self._j]
        return {L: W[k] for k, L in enumerate(self.clt.layers[self._j:]) if k > 0}

    @property
    def d_sae(self) -> int:
        return self.clt.d_sae

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return self.clt.pre_acts(x, self.layer)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return self.clt.activation(pre, self.layer)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.clt.encode(x, self.layer)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """What the features write to this layer's own output (``f @ W_dec + b_dec``; no skip term)."""
        return self.clt.decode({self.layer: f}, self.layer)

    def skip_term(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.clt.skip_term(x, self.layer)

    def __repr__(self) -> str:
        return f"CLTLayer(layer={self.layer}, site={self.site!r}, d_sae={self.d_sae})"


# ------------------------------------------------------------------------------ splicing
class _RunState:
    """One run's features at the CLT's input sites: ``{layer: (f, f')}`` and the inputs ``{layer: x}``."""

    __slots__ = ("feats", "inputs")

    def __init__(self) -> None:
        self.feats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.inputs: dict[int, torch.Tensor] = {}


class _CLTEncode(Intervention):
    """At layer ``layer``'s input site: encode (and edit) the features, keep them for the output sites."""

    def __init__(self, owner: CLTSplice, layer: int) -> None:
        self.owner, self.layer = owner, layer

    def check(self, site: str, shape: tuple[int | None, ...] | None) -> None:
        if shape and shape[-1] is not None and shape[-1] != self.owner.clt.d_in:
            raise ValueError(f"CLTSplice: the CLT's d_in={self.owner.clt.d_in} does not match site {site!r} of "
                             f"shape {tuple(shape)}")

    def apply(self, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        self.owner.encode_at(self.layer, value, event)
        return value

    def __repr__(self) -> str:
        return f"CLTEncode(layer={self.layer})"


class _CLTWrite(Intervention):
    """At layer ``layer``'s output site: the reconstruction of the edited features plus the error term."""

    def __init__(self, owner: CLTSplice, layer: int) -> None:
        self.owner, self.layer = owner, layer

    def check(self, site: str, shape: tuple[int | None, ...] | None) -> None:
        if shape and shape[-1] is not None and shape[-1] != self.owner.clt.d_out:
            raise ValueError(f"CLTSplice: the CLT's d_out={self.owner.clt.d_out} does not match site {site!r} of "
                             f"shape {tuple(shape)}")

    def apply(self, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        return self.owner.write_at(self.layer, value, event)

    def __repr__(self) -> str:
        return f"CLTWrite(layer={self.layer})"


class CLTSplice:
    """Replace every covered layer's output by the CLT's reconstruction plus its per-layer error term.

    At layer ``L``'s input site the features ``f_L`` are encoded and edited (``edits[L]``, any edit of
    :mod:`saes.edits`: ``FeatureClamp``, ``FeatureAblate``, ``FeatureSteer``, a callable or a list); at
    each output site ``L'`` the value becomes (``y`` the site's value in this run)

    * ``keep_error=True`` (default): ``y_hat_L'(f') + (y - y_hat_L'(f))``, computed as
      ``y + sum_{L <= L'} (f'_L - f_L) @ W_dec[L -> L']`` (biases and skip terms cancel); with no edit,
      ``y`` itself;
    * ``keep_error=False``: ``y_hat_L'(f')``, the pure reconstruction;
    * ``detach_error=True``: as the default with the error term a constant for autograd (gradients
      reach upstream only through the features).

    Register it with ``im.run(ids, interventions=splice.interventions())`` (one entry per input and
    output site; combine with other interventions by putting both in a list at a shared site). The
    run is offered ``f'_L`` as ``"{input site}.sae.features"`` and the error ``y - y_hat(f)`` as
    ``"{output site}.sae.error"``. Use one splice per sweep variant.

    Args:
        clt: the cross-layer transcoder.
        edits: ``{layer: edit}`` (layers the CLT covers).
        keep_error, detach_error, record: as for :class:`saes.Splice`.
    """

    def __init__(self, clt: CrossLayerTranscoder, edits: Mapping[int, Edit] | None = None, keep_error: bool = True,
                 detach_error: bool = False, *, record: bool = True) -> None:
        self.clt = clt
        self.edits = {int(L): e for L, e in (edits or {}).items()}
        for L in self.edits:
            clt.index(L)  # raises naming the layer
        self.keep_error = keep_error
        self.detach_error = detach_error
        self.record = record
        self._runs: weakref.WeakKeyDictionary[RunContext, _RunState] = weakref.WeakKeyDictionary()

    def interventions(self) -> dict[str, Intervention | list[Intervention]]:
        """``{input site: encoder, output site: writer}`` for every covered layer (a crosscoder, reading and
        writing one site, gets ``[encoder, writer]`` there)."""
        out: dict[str, Intervention | list[Intervention]] = {}
        for L in self.clt.layers:
            enc, wr = _CLTEncode(self, L), _CLTWrite(self, L)
            s_in, s_out = self.clt.site(L), self.clt.output_site(L)
            if s_in == s_out:
                out[s_in] = [enc, wr]
            else:
                out[s_in], out[s_out] = enc, wr
        return out

    def _scope(self, value: torch.Tensor, event: SiteEvent) -> tuple[torch.Tensor, EditScope]:
        offset = int(event.position_offset)
        if event.rows is None:
            return value, EditScope(offset, None, value.shape[0])
        rows = event.rows.to(device=value.device, dtype=torch.long)
        return value.index_select(0, rows), EditScope(offset, rows, value.shape[0])

    def encode_at(self, layer: int, value: torch.Tensor, event: SiteEvent) -> None:
        """Encode layer ``layer``'s input in this run and keep ``(f, f')`` for the output sites."""
        state = self._runs.get(event.context)
        if state is None or layer == self.clt.layers[0]:  # a new forward starts at the first layer
            state = self._runs[event.context] = _RunState()
        x, scope = self._scope(value, event)
        x = x.to(self.clt.device)
        f = self.clt.encode(x, layer)
        edit = self.edits.get(layer)
        f_new = f if edit is None else apply_edit(edit, f, scope)
        state.feats[layer] = (f, f_new)
        state.inputs[layer] = x
        if self.record and bool(getattr(event.context, "derived_sinks", True)):
            event.record("sae.features", f_new)

    def write_at(self, layer: int, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        """The value at layer ``layer``'s output site (class docs)."""
        state = self._runs.get(event.context)
        sources = [L for L in self.clt.layers[: self.clt.index(layer) + 1]]
        missing = [L for L in sources if state is None or L not in state.feats]
        if missing:
            raise RuntimeError(
                f"CLTSplice at {event.site!r} has no features of layer(s) {missing} from this forward: register "
                "every part with interventions=splice.interventions() and run the whole model (no layer skipped)"
            )
        assert state is not None
        y, scope = self._scope(value, event)
        feats = {L: state.feats[L] for L in sources}
        for L, (f, _) in feats.items():
            if f.shape[:-1] != y.shape[:-1]:
                raise RuntimeError(f"CLTSplice: layer {L}'s features are {tuple(f.shape)} but {event.site!r} is "
                                   f"{tuple(y.shape)} (use one CLTSplice per sweep variant)")
        wants = self.record and bool(getattr(event.context, "derived_sinks", True))
        if wants or not self.keep_error:
            recon_old = self._reconstruct(layer, {L: f for L, (f, _) in feats.items()}, state)
        if wants:
            err = y.to(device=recon_old.device, dtype=recon_old.dtype) - recon_old
            event.record("sae.error", err.detach() if self.detach_error else err)
        if not self.keep_error:
            out = self._reconstruct(layer, {L: fn for L, (_, fn) in feats.items()}, state)
        else:
            edited = [L for L in sources if L in self.edits]
            if not edited and not self.detach_error:
                return value
            base_y = y.detach() if self.detach_error else y
            deltas = {L: fn - (f.detach() if self.detach_error else f) for L, (f, fn) in feats.items()
                      if L in edited}
            out = base_y if not deltas else base_y + self.clt.decode(deltas, layer, bias=False).to(
                device=y.device, dtype=y.dtype)
        out = out.to(device=value.device, dtype=value.dtype)
        if event.rows is None:
            return out
        return value.index_copy(0, event.rows.to(device=value.device, dtype=torch.long), out)

    def _reconstruct(self, layer: int, feats: Mapping[int, torch.Tensor], state: _RunState) -> torch.Tensor:
        y_hat = self.clt.decode(feats, layer)
        skip = self.clt.skip_term(state.inputs[layer], layer) if self.clt.W_skip is not None else None
        return y_hat if skip is None else y_hat + skip

    def __repr__(self) -> str:
        args = [f"CrossLayerTranscoder(layers={list(self.clt.layers)}, d_sae={self.clt.d_sae})"]
        if self.edits:
            args.append(f"edits={self.edits!r}")
        if not self.keep_error:
            args.append("keep_error=False")
        if self.detach_error:
            args.append("detach_error=True")
        return f"CLTSplice({', '.join(args)})"
