"""Gemma 3 instrumentation: source patches of transformers' ``modeling_gemma3`` (text decoder) and its catalogue.

Covers ``Gemma3ForCausalLM`` (270M, 1B) and the language model inside ``Gemma3ForConditionalGeneration``
(4B, 12B, 27B; image tokens pass through, the sites are on the text decoder). The sites are Gemma 2's
(SPEC §2) plus ``blocks.L.attn.q_normed`` / ``attn.k_normed``: the queries and keys after Gemma 3's
QK RMSNorm, before RoPE (TransformerLens ``attn.hook_q_normed`` / ``hook_k_normed``).

``install()``/``uninstall()``/``instrument()`` behave as in :mod:`instrumentation.gemma2` (atomic,
idempotent, thread-safe through :class:`instrumentation.common.SourcePatches`; after ``uninstall()``
runs are refused, never re-patched silently). Verified against the transformers versions in
``VERIFIED_TRANSFORMERS``; on another version the patches either match or ``install()`` raises
:class:`~mishax_py.ast_patcher.PatchError` showing the code that changed.

Attention: transformers 5.24's ``Gemma3Attention`` passes no soft-cap to the attention function (the
released configs set ``attn_logit_softcapping=None``), so ``attn.scores`` are scaled, masked logits with
no soft-cap and :class:`Gemma3Family` reports ``softcap=None`` whatever the config says. Layers follow
``config.layer_types`` (5 sliding : 1 global in the releases), each with its RoPE base from
``config.rope_parameters[layer_type]["rope_theta"]`` (10k local, 1M global).
"""

from __future__ import annotations

from typing import Any

import transformers.models.gemma3.modeling_gemma3 as modeling_gemma3
from torch import nn

from instrumentation.common import (
    DECODER_LAYER_PATCHES,
    EAGER_ATTENTION_PATCHES,
    LOGITS_PATCHES,
    MLP_PATCHES,
    QKV_PATCHES,
    RMSNORM_PATCHES,
    ROTARY_AND_Z_PATCHES,
    SourcePatches,
    frozen_norm_pairs,
    gemma_catalogue,
    instrument_with,
    model_forward_patches,
)
from mishax_py.ast_patcher import ModuleASTPatcher, Replace
from mishax_py.family import AttentionSpec, ModelDims
from mishax_py.instrumented import InstrumentedModel
from mishax_py.sites import SiteCatalogue

__all__ = ["PATCHES", "VERIFIED_TRANSFORMERS", "Gemma3Family", "build_catalogue", "install", "installed",
           "instrument", "patcher", "uninstall"]

# Test suite (tests/instrumentation/test_gemma3.py) run on each.
VERIFIED_TRANSFORMERS = ("5.24.0",)

# Each patch names a function of modeling_gemma3 and the snippets rewritten in it (see gemma2.PATCHES).
PATCHES: dict[str, list[Replace]] = {
    "Gemma3TextModel.forward": model_forward_patches("position_embeddings[self.config.layer_types[i]]"),
    "Gemma3DecoderLayer.forward": DECODER_LAYER_PATCHES,
    "Gemma3Attention.forward": [
        *QKV_PATCHES,
        Replace(
            "query_states = self.q_norm(query_states)",
            "query_states = tag(self, 'q_normed', self.q_norm(query_states), (1, 2))",
        ),
        Replace(
            "key_states = self.k_norm(key_states)",
            "key_states = tag(self, 'k_normed', self.k_norm(key_states), (1, 2))",
        ),
        *ROTARY_AND_Z_PATCHES,
    ],
    "eager_attention_forward": EAGER_ATTENTION_PATCHES,
    "Gemma3MLP.forward": MLP_PATCHES,
    "Gemma3RMSNorm.forward": RMSNORM_PATCHES,
    "Gemma3ForCausalLM.forward": LOGITS_PATCHES,
    "Gemma3ForConditionalGeneration.forward": LOGITS_PATCHES,
}

# Built at import; one lock serialises install()/uninstall() (see common.SourcePatches).
_PATCHES = SourcePatches(modeling_gemma3, PATCHES, label="Gemma 3", family_module="instrumentation.gemma3",
                         verified=VERIFIED_TRANSFORMERS)

def patcher() -> ModuleASTPatcher:
    """The (single) patcher for ``modeling_gemma3``."""
    return _PATCHES.patcher


def install() -> None:
    """Patch transformers' Gemma 3 code (idempotent, thread-safe). Existing model instances are covered too."""
    _PATCHES.install()


def uninstall() -> None:
    """Restore transformers' original Gemma 3 code objects exactly (idempotent, thread-safe)."""
    _PATCHES.uninstall()


def installed() -> bool:
    """Whether transformers' Gemma 3 code is patched now."""
    return _PATCHES.installed


def text_parts(model: nn.Module) -> tuple[Any, Any]:
    """``(text config, Gemma3TextModel)`` of a ``Gemma3ForCausalLM`` or ``Gemma3ForConditionalGeneration``."""
    if isinstance(model, modeling_gemma3.Gemma3ForConditionalGeneration):
        return model.config.text_config, model.model.language_model
    return model.config, model.model


def instrument(model: nn.Module, *, tokenizer: Any = None, switch_to_eager: bool = True) -> InstrumentedModel:
    """Install the patches and wrap ``model`` (``Gemma3ForCausalLM`` or ``Gemma3ForConditionalGeneration``).

    Idempotent per model. ``tokenizer`` and ``switch_to_eager`` as in :func:`instrumentation.gemma2.instrument`
    (``attn.scores``/``attn.pattern`` exist only under eager attention).
    """
    if not isinstance(model, (modeling_gemma3.Gemma3ForCausalLM, modeling_gemma3.Gemma3ForConditionalGeneration)):
        raise TypeError(
            f"instrumentation.gemma3.instrument() needs a transformers Gemma3ForCausalLM or "
            f"Gemma3ForConditionalGeneration, got {type(model).__module__}.{type(model).__name__}."
        )
    return instrument_with(
        model, _PATCHES,
        lambda: InstrumentedModel(model, build_catalogue(model), Gemma3Family(text_parts(model)[0]),
                                 tokenizer=tokenizer),
        tokenizer=tokenizer, switch_to_eager=switch_to_eager,
    )


class Gemma3Family:
    """What studies need to know of one Gemma 3 model (implements :class:`mishax_py.family.ModelFamily`).

    Attention: ``scale = query_pre_attn_scalar ** -0.5``; no soft-cap (transformers' Gemma 3 attention
    applies none, see the module docstring); the sliding window on the layers ``config.layer_types``
    marks ``"sliding_attention"``; each layer's RoPE base from ``config.rope_parameters[layer_type]``.

    Attribution graphs freeze ``input_layernorm`` (``resid_pre -> ln1``), the QK norms
    (``attn.q -> attn.q_normed``, ``attn.k -> attn.k_normed``: per head, like the residual norms, so
    the QK logits stay linear in the frozen graph), ``post_attention_layernorm``
    (``attn_out_pre_norm -> attn_out``), ``pre_feedforward_layernorm`` (``resid_mid -> ln2``: Gemma Scope 2's
    transcoders read ``ln2``) and the final norm. Transcoders read ``ln2`` and write ``mlp_out``.
    Packed patching (``supports_kv_prefix``): the KV-cache keyword and 4-D float masks work as for Gemma 2
    (tests/instrumentation/test_gemma3.py checks packed == rows).
    """

    name = "gemma3"
    supports_kv_prefix = True
    mlp_input_kinds = ("ln2",)
    mlp_output_kind = "mlp_out"

    def __init__(self, config: Any) -> None:
        n_layers = int(config.num_hidden_layers)
        self.dims = ModelDims(
            n_layers=n_layers, d_model=int(config.hidden_size), d_mlp=int(config.intermediate_size),
            n_heads=int(config.num_attention_heads), n_kv_heads=int(config.num_key_value_heads),
            d_head=int(config.head_dim), vocab=int(config.vocab_size),
        )
        layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * n_layers)
        scalar = config.query_pre_attn_scalar or config.head_dim
        rope = getattr(config, "rope_parameters", None) or {}
        self._attention = [
            AttentionSpec(scale=float(scalar) ** -0.5, softcap=None,
                          window=config.sliding_window if lt == "sliding_attention" else None,
                          rope_base=_rope_base(rope, lt), layer_type=lt)
            for lt in layer_types
        ]
        self.frozen_norms = frozen_norm_pairs(n_layers, _FROZEN_IN_LAYER)

    def attention(self, layer: int) -> AttentionSpec:
        return self._attention[layer]

    def ensure_installed(self) -> None:
        """Raise unless the patches are in place: after ``uninstall()`` runs are refused, never re-patched silently."""
        _PATCHES.ensure_installed()

    def __repr__(self) -> str:
        return f"Gemma3Family({self.dims})"


def _rope_base(rope: dict[str, Any], layer_type: str) -> float | None:
    """The RoPE base of a layer type: ``rope_parameters[layer_type]["rope_theta"]`` (or a flat ``rope_theta``)."""
    params = rope.get(layer_type, rope)
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta) if theta is not None else None


# The norms an attribution graph freezes inside each layer: (input kind, output kind); see Gemma3Family.
_FROZEN_IN_LAYER = (("resid_pre", "ln1"), ("attn.q", "attn.q_normed"), ("attn.k", "attn.k_normed"),
                    ("attn_out_pre_norm", "attn_out"), ("resid_mid", "ln2"))


def build_catalogue(model: nn.Module) -> SiteCatalogue:
    """The sites of one Gemma 3 model instance, in forward order (names and aliases as in Gemma 2's catalogue)."""
    cfg, base = text_parts(model)
    return gemma_catalogue(model, base, cfg, prefix="Gemma3", text_model="Gemma3TextModel", qk_norm=True,
                           scores_where="eager_attention_forward: scaled, masked logits",
                           logits_where=f"{type(model).__name__}.forward: lm_head output "
                                        "(after the final soft-cap, if any)")
