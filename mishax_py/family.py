"""The model-family boundary: everything the core and the studies know about a model comes from here.

A family module (one per model architecture in ``instrumentation``, a toy transformer in the tests) places
``tag(...)`` calls at its sites, builds a :class:`~mishax_py.sites.SiteCatalogue`, and
implements :class:`ModelFamily` for one model instance. The core never reads a model's
config or names a family: where a study needs a fact (the attention scale and soft-cap to
recompute scores, sliding windows to build masks, sizes to estimate memory, which norms an
attribution graph freezes, where a transcoder reads), it asks ``im.family``.

The contract a family's model keeps (what :class:`~mishax_py.InstrumentedModel` calls):

* ``model(input_ids=ids [batch, pos], **kwargs)`` returns an object with ``.logits``
  ``[batch, pos, vocab]``; it accepts ``use_cache=False`` and passes other keywords it
  does not know (``attention_mask``) to the place it uses them;
* its forward calls :func:`mishax_py.runtime.begin_forward` once and
  :func:`mishax_py.runtime.skip_layer` before each decoder layer (sweeps and
  ``atp-layer`` start runs at a later layer from a cached ``resid_pre``);
* sites are named as :mod:`mishax_py.naming` spells them (``blocks.L.kind``), with the
  kinds of SPEC §2 where the value exists (``resid_pre``, ``attn.z``, ``mlp_out``, ...).

Families whose models also take Hugging Face's key/value cache and 4-D float attention
masks (``supports_kv_prefix``) get the faster engines: packed activation patching and the
shared clean KV prefix of sweeps (``share_positions``). Others run the plain, row-per-patch
path with equal results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["AttentionSpec", "ModelDims", "ModelFamily"]


@dataclass(frozen=True, kw_only=True)
class ModelDims:
    """The sizes of one model instance (what memory estimates and grids are built from)."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    vocab: int


@dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """How one layer's attention turns rotated queries and keys into scores.

    ``scores = softcap * tanh(scale * q.k / softcap)`` (``scale * q.k`` when ``softcap`` is
    ``None``), then masked causally and, when ``window`` is set, to the last ``window`` keys.

    Attributes:
        scale: the factor on ``q.k`` (``1/sqrt(d_head)`` in most models).
        softcap: the attention-logit soft-cap, or ``None`` where the model has none.
        window: the sliding-window length of this layer, or ``None`` for global attention.
        rope_base: the rotary embedding's base (``theta``) of this layer, ``None`` without RoPE.
        layer_type: the family's name for the attention kind (e.g. ``"sliding_attention"``); layers
            of one type share an attention mask.
    """

    scale: float
    softcap: float | None = None
    window: int | None = None
    rope_base: float | None = None
    layer_type: str = "full_attention"


@runtime_checkable
class ModelFamily(Protocol):
    """What the core needs to know about one instrumented model instance of a family.

    Attributes:
        name: the family's name (shown by ``repr(im)``).
        dims: the model's sizes.
        supports_kv_prefix: the model takes HF's KV-cache keyword and 4-D float masks (see the
            module docs); enables packed activation patching and sweeps' shared KV prefix.
        frozen_norms: ``(input site, output site)`` of every normalisation an attribution graph
            freezes (its output becomes a fixed scale of its input), in forward order.
        mlp_input_kinds: the per-layer site kinds a transcoder may read (first: the usual one).
        mlp_output_kind: the per-layer site kind a transcoder writes.

    The attributes are read-only properties here, so a family may define them as class or
    instance attributes of any matching type (a tuple or a list for a sequence).
    """

    @property
    def name(self) -> str: ...

    @property
    def dims(self) -> ModelDims: ...

    @property
    def supports_kv_prefix(self) -> bool: ...

    @property
    def frozen_norms(self) -> Sequence[tuple[str, str]]: ...

    @property
    def mlp_input_kinds(self) -> Sequence[str]: ...

    @property
    def mlp_output_kind(self) -> str: ...

    def attention(self, layer: int) -> AttentionSpec:
        """The attention facts of decoder layer ``layer``."""
        ...

    def ensure_installed(self) -> None:
        """Called before every run: raise a clear error, naming the family's ``install()``, if its source
        patches are not in place (uninstalled). Never re-installs them silently."""
        ...

