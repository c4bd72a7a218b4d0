"""Gemma 2 instrumentation: source patches of transformers' ``modeling_gemma2`` and its site catalogue.

``install()`` rewrites the Gemma 2 forward functions in place (their code objects) to
call ``tag(self, "<local>", value)`` at every site of SPEC §2; ``uninstall()`` puts the
original code back. ``instrument(model)`` installs, switches the model to eager
attention (``scores``/``pattern`` only exist there), and returns an
:class:`~mishax_py.InstrumentedModel` whose catalogue maps each tag call of this
model instance to its canonical name and TransformerLens alias.

Verified against the transformers versions in ``VERIFIED_TRANSFORMERS``; on another
version the patches either match (and the tests hold) or ``install()`` raises
:class:`~mishax_py.ast_patcher.PatchError` showing the code that changed.

Threads: ``install()`` and ``uninstall()`` are atomic and idempotent from any number of threads
(one lock; the original code objects are recorded once, from the unpatched functions). A forward
already running when another thread uninstalls finishes with the same result: the frames running
patched code keep the names they call (``tag``, ``begin_forward``, ``skip_layer`` stay in
``modeling_gemma2``'s namespace; they do nothing when no run is active), and the layers it enters
afterwards run the original code (so an instrumented run racing an ``uninstall()`` in another thread
sees no sites in those layers: uninstall when no run of yours is in flight).

After ``uninstall()`` nothing installs the patches again behind your back: a run of an
:class:`~mishax_py.InstrumentedModel` (``run``, ``run_with_cache``, ``intervene``, ``sweep``, ``walk``,
every study) raises ``RuntimeError`` naming ``install()``, since it would otherwise run unpatched code
(no site fires) or silently re-patch transformers for the whole process. Call ``install()`` or
``instrument(model)`` again to resume.
"""

from __future__ import annotations

from typing import Any

import transformers
import transformers.models.gemma2.modeling_gemma2 as modeling_gemma2
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

__all__ = ["PATCHES", "VERIFIED_TRANSFORMERS", "Gemma2Family", "install", "installed", "instrument", "patcher",
           "uninstall"]

# Full test suite run on each (2026-11-29); 5.0.0 fails with PatchError (the decoder loop differs).
VERIFIED_TRANSFORMERS = ("5.5.0", "5.5.4", "5.10.4", "5.15.1", "5.17.0", "5.19.0", "5.20.2", "5.21.1", "5.22.2",
                         "5.23.0", "5.24.0")

# Each patch names a function of modeling_gemma2 and the snippets rewritten in it.
# `tag(owner, local, value)` returns `value` unchanged unless a run is active.
# CACHE_KWARG is the KV-cache argument's name (`past_key_values` before transformers 5.24, `cache` since).
PATCHES: dict[str, list[Replace]] = {
    "Gemma2Model.forward": model_forward_patches("position_embeddings"),
    "Gemma2DecoderLayer.forward": DECODER_LAYER_PATCHES,
    "Gemma2Attention.forward": [*QKV_PATCHES, *ROTARY_AND_Z_PATCHES],
    "eager_attention_forward": EAGER_ATTENTION_PATCHES,
    "Gemma2MLP.forward": MLP_PATCHES,
    "Gemma2RMSNorm.forward": RMSNORM_PATCHES,
    "Gemma2ForCausalLM.forward": LOGITS_PATCHES,
}

# Built at import (cheap: nothing is read or compiled before the first install), so two threads can never
# build two patchers of the same functions; one lock serialises install()/uninstall() (see common.SourcePatches).
_PATCHES = SourcePatches(modeling_gemma2, PATCHES, label="Gemma 2", family_module="instrumentation.gemma2",
                         verified=VERIFIED_TRANSFORMERS)


def patcher() -> ModuleASTPatcher:
    """The (single) patcher for ``modeling_gemma2``."""
    return _PATCHES.patcher


def install() -> None:
    """Patch transformers' Gemma 2 code (idempotent, thread-safe). Existing model instances are covered too."""
    _PATCHES.install()


def uninstall() -> None:
    """Restore transformers' original Gemma 2 code objects exactly (idempotent, thread-safe).

    Forwards running in other threads finish unharmed (see the module docstring); runs of an
    ``InstrumentedModel`` started afterwards raise until ``install()`` or ``instrument(model)`` is called.
    """
    _PATCHES.uninstall()


def installed() -> bool:
    """Whether transformers' Gemma 2 code is patched now."""
    return _PATCHES.installed


def instrument(model: nn.Module, *, tokenizer: Any = None, switch_to_eager: bool = True) -> InstrumentedModel:
    """Install the patches and wrap ``model`` (a ``Gemma2ForCausalLM``); idempotent per model.

    ``tokenizer``: what text inputs (``im.run("...")``) are tokenised with, stored as ``im.tokenizer``
    (set on the existing wrapper when the model is instrumented again). Without one, the tokenizer in
    the model's own folder is used, loaded offline on first use (:attr:`InstrumentedModel.tokenizer`).

    ``scores`` and ``pattern`` exist only under eager attention, so a model loaded with
    another implementation is switched to eager with a warning; pass
    ``switch_to_eager=False`` to get an error instead.
    """
    if not isinstance(model, modeling_gemma2.Gemma2ForCausalLM):
        raise TypeError(
            f"instrumentation.gemma2.instrument() needs a transformers Gemma2ForCausalLM, got "
            f"{type(model).__module__}.{type(model).__name__}. Load the model with "
            f"Gemma2ForCausalLM.from_pretrained(...) (or AutoModelForCausalLM for a gemma2 checkpoint)."
        )
    return instrument_with(
        model, _PATCHES,
        lambda: InstrumentedModel(model, build_catalogue(model), Gemma2Family(model.config), tokenizer=tokenizer),
        tokenizer=tokenizer, switch_to_eager=switch_to_eager,
        eager_why=" (Gemma 2's logit soft-cap also needs eager for exact results)",
    )


class Gemma2Family:
    """What studies need to know of one Gemma 2 model (implements :class:`mishax_py.family.ModelFamily`).

    Attention: ``scale = query_pre_attn_scalar ** -0.5``, soft-cap ``attn_logit_softcapping``
    (50 in the released models), the sliding window on the layers ``config.layer_types`` marks
    ``"sliding_attention"``. Attribution graphs freeze ``input_layernorm`` (``resid_pre -> ln1``),
    ``post_attention_layernorm`` (``attn_out_pre_norm -> attn_out``), the MLP input norm up to its
    gain (``resid_mid -> ln2_normalized``) and the final norm. Transcoders read
    ``ln2_normalized`` (Gemma Scope) or ``ln2`` and write ``mlp_out``.
    """

    name = "gemma2"
    supports_kv_prefix = True
    mlp_input_kinds = ("ln2_normalized", "ln2")
    mlp_output_kind = "mlp_out"

    def __init__(self, config: transformers.Gemma2Config) -> None:
        n_layers = int(config.num_hidden_layers)
        self.dims = ModelDims(
            n_layers=n_layers, d_model=int(config.hidden_size), d_mlp=int(config.intermediate_size),
            n_heads=int(config.num_attention_heads), n_kv_heads=int(config.num_key_value_heads),
            d_head=int(config.head_dim), vocab=int(config.vocab_size),
        )
        layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * n_layers)
        scalar = config.query_pre_attn_scalar or config.head_dim
        cap = config.attn_logit_softcapping
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
        self._attention = [
            AttentionSpec(scale=float(scalar) ** -0.5, softcap=float(cap) if cap else None,
                          window=config.sliding_window if lt == "sliding_attention" else None,
                          rope_base=float(rope) if rope is not None else None, layer_type=lt)
            for lt in layer_types
        ]
        self.frozen_norms = frozen_norm_pairs(n_layers, _FROZEN_IN_LAYER)

    def attention(self, layer: int) -> AttentionSpec:
        return self._attention[layer]

    def ensure_installed(self) -> None:
        """Raise unless the patches are in place: after ``uninstall()`` runs are refused, never re-patched silently."""
        _PATCHES.ensure_installed()

    def __repr__(self) -> str:
        return f"Gemma2Family({self.dims})"


# The norms an attribution graph freezes inside each layer: (input kind, output kind); see Gemma2Family.
_FROZEN_IN_LAYER = (("resid_pre", "ln1"), ("attn_out_pre_norm", "attn_out"), ("resid_mid", "ln2_normalized"))


def build_catalogue(model: modeling_gemma2.Gemma2ForCausalLM) -> SiteCatalogue:
    """The sites of one Gemma 2 model instance, in forward order.

    Names are spelled by :func:`mishax_py.naming.layer_site`; every site whose value means what
    TransformerLens's hook means gets its alias from the one table, :func:`mishax_py.naming.tl_alias`
    (for Gemma 2, every site the table names; ``ln1``, ``ln2``, the pre-norm outputs, ``ln_final``
    and ``logits`` have none).
    """
    return gemma_catalogue(model, model.model, model.config, prefix="Gemma2", text_model="Gemma2Model", qk_norm=False,
                           scores_where="eager_attention_forward: scaled, soft-capped, masked logits",
                           logits_where="Gemma2ForCausalLM.forward: after soft-cap")
