"""What every transformers family module shares: one patcher under one lock, the version warning,
the switch to eager attention, the ``instrument()`` wrapper and (for the Gemma families) the site catalogue.

A family module (``instrumentation/gemma2.py``, ``instrumentation/gemma3.py``) builds one
:class:`SourcePatches` at import (so two threads can never build two patchers of the same functions)
and delegates ``install``/``uninstall``/``installed`` to it; its ``instrument()`` checks the model's
class and calls :func:`instrument_with`.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import transformers
from torch import nn

from mishax_py.ast_patcher import ModuleASTPatcher, Replace
from mishax_py.hf_compat import CACHE_KWARG
from mishax_py.instrumented import InstrumentedModel
from mishax_py.naming import layer_site, tl_alias
from mishax_py.runtime import begin_forward, skip_layer, tag
from mishax_py.sites import BATCH, KEY_POS, POS, SiteCatalogue, SiteSpec

__all__ = [
    "DECODER_LAYER_PATCHES",
    "EAGER_ATTENTION_PATCHES",
    "LOGITS_PATCHES",
    "MLP_PATCHES",
    "QKV_PATCHES",
    "RMSNORM_PATCHES",
    "ROTARY_AND_Z_PATCHES",
    "SourcePatches",
    "frozen_norm_pairs",
    "instrument_with",
    "model_forward_patches",
    "use_eager_attention",
]

# Where an instrumented model keeps its wrapper (instrument() is idempotent per model).
WRAPPER_ATTR = "_mishax_py_instrumented"


class SourcePatches:
    """The source patches of one transformers modelling module, installed and removed atomically.

    Args:
        module: the modelling module (e.g. ``transformers.models.gemma3.modeling_gemma3``).
        patches: ``{"Class.method": [Replace(old, new), ...]}``.
        label: the family's name in messages (``"Gemma 3"``).
        family_module: the instrumentation module's dotted name, named by errors (``install()``).
        verified: the transformers versions the patches are verified against; another version warns
            once per process (the patches applied, but the suite should be run).

    ``install()`` and ``uninstall()`` are idempotent and serialised by one re-entrant lock (the
    version warning included); the original code objects are recorded once, by the patcher.
    """

    def __init__(self, module: ModuleType, patches: dict[str, list[Replace]], *, label: str, family_module: str,
                 verified: tuple[str, ...]) -> None:
        self.patcher = ModuleASTPatcher(
            module, patches, extra_globals={"tag": tag, "begin_forward": begin_forward, "skip_layer": skip_layer},
        )
        self.label = label
        self.family_module = family_module
        self.verified = verified
        self.lock = threading.RLock()
        self.warned = False

    def install(self, stacklevel: int = 3) -> None:
        """Patch the module (idempotent, thread-safe); existing model instances are covered too."""
        with self.lock:
            if transformers.__version__ not in self.verified and not self.warned:
                warnings.warn(
                    f"mishax-py's {self.label} patches are verified against transformers {', '.join(self.verified)}; "
                    f"found {transformers.__version__}. They applied, but run the test suite to be sure.",
                    stacklevel=stacklevel,
                )
                self.warned = True
            self.patcher.install()

    def uninstall(self) -> None:
        """Restore the original code objects exactly (idempotent, thread-safe)."""
        with self.lock:
            self.patcher.uninstall()

    @property
    def installed(self) -> bool:
        """Whether the module is patched now."""
        return self.patcher.installed

    def ensure_installed(self) -> None:
        """Raise unless the patches are in place: after ``uninstall()`` runs are refused, never re-patched silently."""
        if not self.patcher.installed:
            raise RuntimeError(
                f"transformers' {self.label} code is not instrumented (uninstall() was called); call "
                f"{self.family_module}.install() or instrument(model) again"
            )


def use_eager_attention(model: Any, switch_to_eager: bool, why: str = "") -> None:
    """Switch ``model`` to eager attention (warning), or raise when ``switch_to_eager`` is False.

    ``attn.scores`` and ``attn.pattern`` exist only in transformers' eager attention function.
    ``why``: a family-specific reason appended to the warning.
    """
    impl = model.config._attn_implementation
    if impl == "eager":
        return
    if not switch_to_eager:
        raise ValueError(
            f"the model uses attn_implementation={impl!r}; the sites attn.scores and attn.pattern exist only "
            "under eager attention. Load with attn_implementation='eager' or pass switch_to_eager=True."
        )
    warnings.warn(
        f"switching the model from attn_implementation={impl!r} to 'eager' so that attention scores and "
        f"patterns are observable{why}.",
        stacklevel=4,
    )
    model.set_attn_implementation("eager")


def instrument_with(model: Any, patches: SourcePatches, make: Callable[[], InstrumentedModel], *,
                    tokenizer: Any, switch_to_eager: bool, eager_why: str = "") -> InstrumentedModel:
    """The body of a family's ``instrument()``, after its class check; idempotent per model.

    An already instrumented model gets its wrapper back (patches re-installed, ``tokenizer`` set when
    given); otherwise the model is switched to eager attention, the patches installed and
    ``make()`` (which builds the :class:`InstrumentedModel`) stored on the model.
    """
    existing = model.__dict__.get(WRAPPER_ATTR)
    if isinstance(existing, InstrumentedModel):
        patches.install(stacklevel=4)
        if tokenizer is not None:
            existing.tokenizer = tokenizer
        return existing
    use_eager_attention(model, switch_to_eager, eager_why)
    patches.install(stacklevel=4)
    im = make()
    model.__dict__[WRAPPER_ATTR] = im
    return im


# -- snippets shared by transformers' Gemma modules -------------------------------------------------------
# Gemma 2 and Gemma 3 spell these parts of their forwards identically; each family's PATCHES lists them
# under its own function names (``tag(owner, local, value)`` returns ``value`` unless a run is active;
# CACHE_KWARG is the KV-cache argument's name: ``past_key_values`` before transformers 5.24, ``cache`` since).


def model_forward_patches(position_embeddings: str) -> list[Replace]:
    """``<Family>Model.forward``: ``begin_forward`` and ``embed``, ``skip_layer`` in the decoder loop, ``ln_final``.

    ``position_embeddings``: the loop's argument expression (Gemma 3 indexes it by layer type).
    """
    call = (f"hidden_states = decoder_layer(hidden_states, attention_mask=causal_mask_mapping[self.config.layer_types"
            f"[i]], position_embeddings={position_embeddings}, position_ids=position_ids, "
            f"{CACHE_KWARG}={CACHE_KWARG}, **kwargs)")
    loop = "for i, decoder_layer in enumerate(self.layers[:self.config.num_hidden_layers]):\n"
    return [
        Replace("hidden_states = inputs_embeds",
                f"begin_forward(self, {CACHE_KWARG})\nhidden_states = tag(self, 'embed', inputs_embeds)"),
        Replace(f"{loop}    {call}", f"{loop}    if skip_layer(self, i):\n        continue\n    {call}"),
        Replace("hidden_states = self.norm(hidden_states)",
                "hidden_states = tag(self, 'ln_final', self.norm(hidden_states))"),
    ]


#: ``<Family>DecoderLayer.forward``: the residual stream and the four norms' outputs.
DECODER_LAYER_PATCHES: list[Replace] = [
    Replace(
        "residual = hidden_states\nhidden_states = self.input_layernorm(hidden_states)",
        "hidden_states = tag(self, 'resid_pre', hidden_states)\nresidual = hidden_states\n"
        "hidden_states = tag(self, 'ln1', self.input_layernorm(hidden_states))",
    ),
    Replace(
        "hidden_states = self.post_attention_layernorm(hidden_states)\nhidden_states = residual + hidden_states",
        "hidden_states = tag(self, 'attn_out', self.post_attention_layernorm("
        "tag(self, 'attn_out_pre_norm', hidden_states)))\n"
        "hidden_states = tag(self, 'resid_mid', residual + hidden_states)",
    ),
    Replace(
        "hidden_states = self.pre_feedforward_layernorm(hidden_states)",
        "hidden_states = tag(self, 'ln2', self.pre_feedforward_layernorm(hidden_states))",
    ),
    Replace(
        "hidden_states = self.post_feedforward_layernorm(hidden_states)\nhidden_states = residual + hidden_states",
        "hidden_states = tag(self, 'mlp_out', self.post_feedforward_layernorm("
        "tag(self, 'mlp_out_pre_norm', hidden_states)))\n"
        "hidden_states = tag(self, 'resid_post', residual + hidden_states)",
    ),
]
#: ``<Family>Attention.forward``: the q/k/v projections per head, before anything else touches them.
QKV_PATCHES: list[Replace] = [
    Replace(f"{s}_states = self.{p}_proj(hidden_states).view(hidden_shape).transpose(1, 2)",
            f"{s}_states = tag(self, '{p}', self.{p}_proj(hidden_states).view(hidden_shape)).transpose(1, 2)")
    for s, p in (("query", "q"), ("key", "k"), ("value", "v"))
]
#: ``<Family>Attention.forward``: queries and keys after RoPE, and the per-head output before ``o_proj``.
ROTARY_AND_Z_PATCHES: list[Replace] = [
    Replace(
        "query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)",
        "query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)\n"
        "query_states = tag(self, 'rot_q', query_states, (1, 2))\n"
        "key_states = tag(self, 'rot_k', key_states, (1, 2))",
    ),
    Replace(
        "attn_output = attn_output.reshape(*input_shape, -1).contiguous()",
        "attn_output = tag(self, 'z', attn_output).reshape(*input_shape, -1).contiguous()",
    ),
]
#: ``eager_attention_forward``: the masked scores and the softmax.
EAGER_ATTENTION_PATCHES: list[Replace] = [
    Replace(
        "if attention_mask is not None:\n    attn_weights = attn_weights + attention_mask",
        "if attention_mask is not None:\n    attn_weights = attn_weights + attention_mask\n"
        "attn_weights = tag(module, 'scores', attn_weights)",
    ),
    Replace(
        "attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)",
        "attn_weights = tag(module, 'pattern', "
        "nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype))",
    ),
]
#: ``<Family>MLP.forward``: gate, up and their product.
MLP_PATCHES: list[Replace] = [
    Replace(
        "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
        "down_proj = self.down_proj(tag(self, 'post', self.act_fn(tag(self, 'pre', self.gate_proj(x))) "
        "* tag(self, 'pre_linear', self.up_proj(x))))",
    ),
]
#: ``<Family>RMSNorm.forward``: the normalised input before the ``(1 + w)`` gain.
RMSNORM_PATCHES: list[Replace] = [
    Replace("output = self._norm(x.float())", "output = tag(self, 'normalized', self._norm(x.float()))"),
]
#: ``<Family>ForCausalLM.forward`` (and Gemma 3's conditional-generation model): the final logits.
LOGITS_PATCHES: list[Replace] = [Replace("loss = None", "logits = tag(self, 'logits', logits)\nloss = None")]


def frozen_norm_pairs(n_layers: int, in_layer: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """A family's ``frozen_norms``: ``in_layer``'s ``(input kind, output kind)`` pairs in every layer, then the final
    norm (the last layer's ``resid_post`` -> ``ln_final``)."""
    pairs = [(layer_site(layer, a), layer_site(layer, b)) for layer in range(n_layers) for a, b in in_layer]
    return [*pairs, (layer_site(n_layers - 1, "resid_post"), "ln_final")]


def gemma_catalogue(model: Any, base: Any, cfg: Any, *, prefix: str, text_model: str, qk_norm: bool,
                    scores_where: str, logits_where: str) -> SiteCatalogue:
    """The sites of one Gemma-style model instance, in forward order (what Gemma 2 and Gemma 3 share).

    Names are spelled by :func:`mishax_py.naming.layer_site`; every site whose value means what
    TransformerLens's hook means gets its alias from the one table, :func:`mishax_py.naming.tl_alias`.

    Args:
        model: the module whose forward tags ``logits``; ``base``: the decoder (``embed``, ``layers``, ``ln_final``).
        cfg: the text config (sizes).
        prefix: the transformers class prefix in the source locations (``"Gemma2"``); ``text_model``: the
            decoder class (``"Gemma2Model"``).
        qk_norm: whether the attention has QK norms (adds ``attn.q_normed``/``attn.k_normed`` after ``attn.v``).
        scores_where, logits_where: the source locations of ``attn.scores`` and ``logits``.
    """
    d_model, d_mlp, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    n_heads, n_kv, d_head = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    stream = (BATCH, POS, d_model)
    where_l, where_a = f"{prefix}DecoderLayer.forward", f"{prefix}Attention.forward"
    heads_q, heads_kv = (BATCH, POS, n_heads, d_head), (BATCH, POS, n_kv, d_head)
    attn_map = (BATCH, n_heads, POS, KEY_POS)
    mlp_dims = (BATCH, POS, d_mlp)
    before_qk = "before the QK norm" if qk_norm else "pre-RoPE"
    specs: list[SiteSpec] = [
        _spec("embed", base, "embed", None, stream, f"{text_model}.forward: embed_tokens(input_ids) (× √d_model)"),
    ]
    for L, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp

        def site(kind: str, owner: nn.Module, local: str, dims: tuple[int | str, ...], where: str,
                 dtype: torch.dtype | None = None, L: int = L) -> SiteSpec:
            return _spec(layer_site(L, kind), owner, local, L, dims, where, dtype)

        specs += [
            site("resid_pre", layer, "resid_pre", stream, f"{where_l}: layer input"),
            site("ln1", layer, "ln1", stream, f"{where_l}: input_layernorm output"),
            site("attn.q", attn, "q", heads_q, f"{where_a}: q_proj, per head, {before_qk}"),
            site("attn.k", attn, "k", heads_kv, f"{where_a}: k_proj, per kv head, {before_qk}"),
            site("attn.v", attn, "v", heads_kv, f"{where_a}: v_proj, per kv head"),
        ]
        if qk_norm:
            specs += [
                site("attn.q_normed", attn, "q_normed", heads_q, f"{where_a}: q_norm output, pre-RoPE"),
                site("attn.k_normed", attn, "k_normed", heads_kv, f"{where_a}: k_norm output, pre-RoPE"),
            ]
        specs += [
            site("attn.rot_q", attn, "rot_q", heads_q, f"{where_a}: query after RoPE"),
            site("attn.rot_k", attn, "rot_k", heads_kv, f"{where_a}: key after RoPE (before KV cache)"),
            site("attn.scores", attn, "scores", attn_map, scores_where),
            site("attn.pattern", attn, "pattern", attn_map, "eager_attention_forward: softmax"),
            site("attn.z", attn, "z", heads_q, f"{where_a}: per-head output before o_proj"),
            site("attn_out_pre_norm", layer, "attn_out_pre_norm", stream, f"{where_l}: o_proj output"),
            site("attn_out", layer, "attn_out", stream, f"{where_l}: post_attention_layernorm output"),
            site("resid_mid", layer, "resid_mid", stream, f"{where_l}: residual after attention"),
            site("ln2_normalized", layer.pre_feedforward_layernorm, "normalized", stream,
                 f"{prefix}RMSNorm.forward: x·rsqrt(mean(x²)+eps), fp32, before the (1+w) gain", dtype=torch.float32),
            site("ln2", layer, "ln2", stream, f"{where_l}: pre_feedforward_layernorm output"),
            site("mlp.pre", mlp, "pre", mlp_dims, f"{prefix}MLP.forward: gate_proj(x)"),
            site("mlp.pre_linear", mlp, "pre_linear", mlp_dims, f"{prefix}MLP.forward: up_proj(x)"),
            site("mlp.post", mlp, "post", mlp_dims, f"{prefix}MLP.forward: act(gate) * up"),
            site("mlp_out_pre_norm", layer, "mlp_out_pre_norm", stream, f"{where_l}: down_proj output"),
            site("mlp_out", layer, "mlp_out", stream, f"{where_l}: post_feedforward_layernorm output"),
            site("resid_post", layer, "resid_post", stream, f"{where_l}: layer output"),
        ]
    specs += [
        _spec("ln_final", base, "ln_final", None, stream, f"{text_model}.forward: final norm output"),
        _spec("logits", model, "logits", None, (BATCH, POS, vocab), logits_where),
    ]
    return SiteCatalogue(specs)


def _spec(name: str, owner: nn.Module, local: str, layer: int | None, dims: tuple[int | str, ...], where: str,
          dtype: torch.dtype | None = None) -> SiteSpec:
    """A catalogue entry, aliased by the one TransformerLens table."""
    return SiteSpec(name, owner, local, layer, dims, where, tl_alias(name), dtype=dtype)
