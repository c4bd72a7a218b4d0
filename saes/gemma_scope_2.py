"""Gemma Scope 2 (Gemma 3 SAEs and transcoders): file names, folder names, and their sites.

The release (Hugging Face repos ``google/gemma-scope-2-{270m,1b,4b,12b,27b}-{pt,it}``) keeps one
folder per single-layer SAE or transcoder, named
``{resid_post|attn_out|mlp_out|transcoder}[_all]/layer_{L}_width_{16k|65k|262k|1m}_l0_{small|medium|big}[_affine]``,
holding

* ``params.safetensors``: ``w_enc [d_in, d_sae]``, ``w_dec [d_sae, d_out]``, ``b_enc [d_sae]``,
  ``b_dec [d_out]``, ``threshold [d_sae]``; ``_affine`` transcoders add
  ``affine_skip_connection [d_in, d_out]`` (applied as ``x @ affine_skip_connection``, untransposed:
  see the sources below);
* ``config.json``: ``architecture`` (``"jump_relu"``), ``hf_hook_point_in``, ``hf_hook_point_out``
  (transcoders), ``affine_connection`` (boolean), ``model_name``, ``width``, ``l0``.

Inference is Gemma Scope's JumpReLU with no ``b_dec`` subtraction and no input scaling:
``pre = x @ w_enc + b_enc; f = (pre > threshold) * relu(pre); x_hat = f @ w_dec + b_dec``
(``+ x @ affine_skip_connection`` for ``_affine`` transcoders).

The hook points name modules of transformers' Gemma 3 text decoder; :func:`sites_from_hook_points`
maps them to our sites (SPEC §4): ``model.layers.L.output`` -> ``blocks.L.resid_post``;
``model.layers.L.self_attn.o_proj.input`` -> ``blocks.L.attn.z`` (flattened head-major, which is
the ``o_proj`` input); ``model.layers.L.post_feedforward_layernorm.output`` -> ``blocks.L.mlp_out``;
``model.layers.L.pre_feedforward_layernorm.output`` -> ``blocks.L.ln2`` (the norm's output with
its gain, unlike Gemma Scope 1 transcoders' ``ln2_normalized``). Module paths with a
``language_model.`` part (the multimodal 4B/12B/27B checkpoints) map the same way. Without a
config the folder name's kind decides (:func:`parse_folder`).

Source of these facts (not checked against the release's own files, which are not stored here):
SAELens' Gemma Scope 2 loader and its tests, ``decoderesearch/SAELens``
``sae_lens/loading/pretrained_sae_loaders.py`` (``get_gemma_3_config_from_hf``,
``gemma_3_sae_huggingface_loader``; commit ``e05f04416f43c62ef2cb42414e3f846312710553``),
``tests/loading/test_pretrained_sae_loaders.py`` (folder names and ``hf_hook_point_*`` values per
kind). SAELens reads ``attn_out`` SAEs at TransformerLens' ``hook_attn_out`` although their config
names the ``o_proj`` *input*; we follow the config.

The skip's orientation (the matrix is square, so shapes cannot tell): SAELens copies
``affine_skip_connection`` unchanged into its ``SkipTranscoder.W_skip``, which it applies as
``x @ W_skip.T`` (``sae_lens/saes/transcoder.py``); every other source applies it untransposed,
``x @ affine_skip_connection``: circuit-tracer (``decoderesearch/circuit-tracer`` @
``4bb8c0ea10bde09727e14565ec8469656880da53``, ``circuit_tracer/transcoder/single_layer_transcoder.py``,
``load_gemma_scope_2_transcoder`` stores ``W_skip = affine.T`` and applies ``x @ W_skip.T``; its CLT
loader likewise), the ``JumpReLUSAE`` / ``JumpReLUMultiLayerSAE`` of Google's Gemma Scope 2 tutorial
as third-party code copies it (``recon + x @ affine_skip_connection``), and a third-party measurement
on the released 27B layer-45 affine transcoders (untransposed: 0.687 of the ``mlp_out`` energy
explained, cosine 0.831; transposed: 0.380). We apply it untransposed.

Multi-layer models (cross-layer transcoders and crosscoders; loaded by :mod:`saes.clt`, which holds
their facts and sources): one folder per model, ``clt/width_{W}_l0_{L0}[_affine]`` (the 270M and
1B repos; ``W`` counts the features of every layer together) and
``crosscoder/layer_{a}_{b}_{c}_{d}_width_{W}_l0_{L0}`` (every repo; four layers), holding
``config.json`` and one ``params_layer_{k}.safetensors`` per layer ``k`` of the model (the ``k``-th
layer of its list): :func:`parse_multi_layer_folder`, :data:`GS2_LAYER_PARAMS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mishax_py.naming import layer_site

__all__ = [
    "GS2_CONFIG",
    "GS2_PARAMS",
    "GS2_SKIP_KEY",
    "GS2_LAYER_PARAMS",
    "GS2_MULTI_LAYER_N_LAYERS",
    "GS2Folder",
    "GS2MultiLayerFolder",
    "is_gemma_scope_2_repo",
    "layer_params_index",
    "layer_params_name",
    "parse_folder",
    "parse_multi_layer_folder",
    "repo_size",
    "site_from_hook_point",
    "sites_from_hook_points",
]

GS2_CONFIG = "config.json"
GS2_PARAMS = "params.safetensors"
#: the affine (skip) weight of ``_affine`` transcoders, ``[d_in, d_out]`` (``x @ affine_skip_connection``).
GS2_SKIP_KEY = "affine_skip_connection"
#: a multi-layer model's per-layer file name, ``params_layer_{k}.safetensors`` (:func:`layer_params_name`).
GS2_LAYER_PARAMS = "params_layer_{k}.safetensors"
#: decoder layers of the models with cross-layer transcoders in the release (a CLT has one file per layer).
GS2_MULTI_LAYER_N_LAYERS = {"270m": 18, "1b": 26}

_REPO_RE = re.compile(r"gemma-scope-2-(270m|1b|4b|12b|27b)-(pt|it)")
_FOLDER_RE = re.compile(
    r"(?:^|/)(resid_post|attn_out|mlp_out|transcoder)(_all)?/"
    r"layer_(\d+)_width_([0-9]+[km]?)_l0_([A-Za-z0-9]+?)(_affine)?/?$"
)
#: folder kind -> our site kinds read and written.
_KIND_SITES = {
    "resid_post": ("resid_post", "resid_post"),
    "attn_out": ("attn.z", "attn.z"),
    "mlp_out": ("mlp_out", "mlp_out"),
    "transcoder": ("ln2", "mlp_out"),
}
#: the module path after ``layers.L.`` in a hook point -> our site kind.
_HOOK_KINDS = {
    "output": "resid_post",
    "self_attn.o_proj.input": "attn.z",
    "post_feedforward_layernorm.output": "mlp_out",
    "pre_feedforward_layernorm.output": "ln2",
}
_HOOK_RE = re.compile(r"^(?:[A-Za-z_]+\.)*?layers\.(\d+)\.(.+)$")
_MULTI_RE = re.compile(
    r"(?:^|/)(clt|crosscoder)/(?:layer_(\d+(?:_\d+)*)_)?width_([0-9]+[km]?)_l0_([A-Za-z0-9]+?)(_affine)?/?$"
)
_LAYER_FILE_RE = re.compile(r"^params_layer_(\d+)\.safetensors$")


@dataclass(frozen=True)
class GS2Folder:
    """A parsed Gemma Scope 2 folder name.

    Attributes:
        kind: ``resid_post``, ``attn_out``, ``mlp_out`` or ``transcoder``.
        layer: decoder layer.
        width: the width label (``16k``, ``262k``, ``1m``, ...).
        l0: the L0 label (``small``, ``medium``, ``big``).
        affine: an ``_affine`` (skip) transcoder.
        all_layers: from a ``{kind}_all`` folder (every layer) rather than the subset folder.
    """

    kind: str
    layer: int
    width: str
    l0: str
    affine: bool
    all_layers: bool

    @property
    def sites(self) -> tuple[str, str]:
        """``(reads, writes)`` sites this kind implies."""
        reads, writes = _KIND_SITES[self.kind]
        return layer_site(self.layer, reads), layer_site(self.layer, writes)


def is_gemma_scope_2_repo(name: str) -> bool:
    """Whether a repo name (``gemma-scope-2-1b-pt``, with or without owner) is a Gemma Scope 2 repo."""
    return _REPO_RE.fullmatch(name.rsplit("/", 1)[-1]) is not None


def parse_folder(path: str) -> GS2Folder | None:
    """Parse the last two parts of ``path`` as a Gemma Scope 2 folder name, else ``None``.

    ``"transcoder_all/layer_5_width_16k_l0_big_affine"`` -> ``GS2Folder("transcoder", 5, "16k",
    "big", affine=True, all_layers=True)``. ``path`` may be a longer local path or hub reference.
    """
    m = _FOLDER_RE.search(path.replace("\\", "/"))
    if m is None:
        return None
    kind, all_, layer, width, l0, affine = m.groups()
    return GS2Folder(kind, int(layer), width, l0, affine is not None, all_ is not None)


def site_from_hook_point(hook_point: str) -> str:
    """Our site for one Gemma Scope 2 ``hf_hook_point_*`` (a transformers module path + ``.input``/``.output``).

    Raises:
        ValueError: a hook point outside the table in the module docstring (names it).
    """
    m = _HOOK_RE.match(hook_point)
    kind = _HOOK_KINDS.get(m.group(2)) if m else None
    if m is None or kind is None:
        raise ValueError(
            f"hook point {hook_point!r} is not one Gemma Scope 2 uses; known: "
            f"model.layers.L.{{{', '.join(sorted(_HOOK_KINDS))}}}"
        )
    return layer_site(int(m.group(1)), kind)


def sites_from_hook_points(hook_in: str, hook_out: str | None) -> tuple[str, str]:
    """``(reads, writes)`` sites from a config's ``hf_hook_point_in``/``hf_hook_point_out``
    (``writes = reads`` when there is no output hook point).

    Raises:
        ValueError: an unknown hook point (names it).
    """
    reads = site_from_hook_point(hook_in)
    return reads, site_from_hook_point(hook_out) if hook_out else reads


@dataclass(frozen=True)
class GS2MultiLayerFolder:
    """A parsed Gemma Scope 2 multi-layer folder name (``clt/...`` or ``crosscoder/...``).

    Attributes:
        kind: ``"clt"`` or ``"crosscoder"``.
        layers: the crosscoder's layers from its name (``layer_7_13_17_22`` -> ``(7, 13, 17, 22)``);
            ``None`` for a CLT (every layer of the model).
        width, l0: the labels (``262k``, ``medium``); ``width`` counts the features of all layers together.
        affine: an ``_affine`` CLT (a per-layer affine skip connection).
    """

    kind: str
    layers: tuple[int, ...] | None
    width: str
    l0: str
    affine: bool


def parse_multi_layer_folder(path: str) -> GS2MultiLayerFolder | None:
    """Parse the last two parts of ``path`` as a ``clt/...`` or ``crosscoder/...`` folder name, else ``None``.

    ``"clt/width_262k_l0_medium_affine"`` -> ``GS2MultiLayerFolder("clt", None, "262k", "medium", True)``;
    ``"crosscoder/layer_7_13_17_22_width_262k_l0_medium"`` -> ``("crosscoder", (7, 13, 17, 22), ...)``.
    """
    m = _MULTI_RE.search(path.replace("\\", "/"))
    if m is None:
        return None
    kind, layers, width, l0, affine = m.groups()
    parsed = tuple(int(v) for v in layers.split("_")) if layers else None
    return GS2MultiLayerFolder(kind, parsed, width, l0, affine is not None)


def layer_params_name(k: int) -> str:
    """``params_layer_{k}.safetensors``: the file of a multi-layer model's ``k``-th layer."""
    return GS2_LAYER_PARAMS.format(k=k)


def layer_params_index(name: str) -> int | None:
    """``k`` of a ``params_layer_{k}.safetensors`` file name, else ``None``."""
    m = _LAYER_FILE_RE.match(name)
    return int(m.group(1)) if m else None


def repo_size(name: str) -> str | None:
    """The model size of a Gemma Scope 2 repo name (``"1b"`` for ``google/gemma-scope-2-1b-pt``), else ``None``."""
    m = _REPO_RE.fullmatch(name.rsplit("/", 1)[-1])
    return m.group(1) if m else None
