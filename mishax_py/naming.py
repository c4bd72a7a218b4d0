"""Site names: how a layer's site is spelled, and the one TransformerLens alias table.

Every family names its sites the same way: ``blocks.{layer}.{kind}`` inside the decoder
layers (``kind`` such as ``"resid_pre"`` or ``"attn.z"``) and a bare name outside them
(``"embed"``, ``"ln_final"``, ``"logits"``). TransformerLens spells many of the same
values differently (``blocks.3.attn.hook_z``); :data:`TL_LAYER_ALIASES` is the single
table between the two, used by family catalogues (their ``alias`` column), by SAE file
loaders (SAELens ``hook_name``) and by studies (``site="hook_z"``). A family aliases a
site only where its value means the same thing as TransformerLens's hook.
"""

from __future__ import annotations

import re

__all__ = [
    "TL_GLOBAL_ALIASES",
    "TL_LAYER_ALIASES",
    "canonical_from_tl",
    "layer_of",
    "layer_site",
    "site_kind",
    "tl_alias",
]

#: canonical kind of a per-layer site -> TransformerLens's suffix for the same value.
TL_LAYER_ALIASES: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "attn.q": "attn.hook_q",
    "attn.k": "attn.hook_k",
    "attn.v": "attn.hook_v",
    "attn.q_normed": "attn.hook_q_normed",
    "attn.k_normed": "attn.hook_k_normed",
    "attn.z": "attn.hook_z",
    "attn.rot_q": "attn.hook_rot_q",
    "attn.rot_k": "attn.hook_rot_k",
    "attn.scores": "attn.hook_attn_scores",
    "attn.pattern": "attn.hook_pattern",
    "ln2_normalized": "ln2.hook_normalized",
    "mlp.pre": "mlp.hook_pre",
    "mlp.pre_linear": "mlp.hook_pre_linear",
    "mlp.post": "mlp.hook_post",
}
#: canonical name of a site outside the layers -> TransformerLens's hook name.
TL_GLOBAL_ALIASES: dict[str, str] = {"embed": "hook_embed"}

_FROM_TL_LAYER = {tl: kind for kind, tl in TL_LAYER_ALIASES.items()}
_FROM_TL_GLOBAL = {tl: name for name, tl in TL_GLOBAL_ALIASES.items()}
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def layer_site(layer: int, kind: str) -> str:
    """The canonical name of site ``kind`` in decoder layer ``layer``: ``(3, "attn.z")`` -> ``"blocks.3.attn.z"``."""
    return f"blocks.{layer}.{kind}"


def layer_of(name: str) -> tuple[int, str] | None:
    """``"blocks.3.attn.z"`` -> ``(3, "attn.z")``; ``None`` for a site outside the layers."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def tl_alias(name: str) -> str | None:
    """TransformerLens's hook name for a canonical site name, or ``None`` where TL has none."""
    if name in TL_GLOBAL_ALIASES:
        return TL_GLOBAL_ALIASES[name]
    split = layer_of(name)
    if split is None or split[1] not in TL_LAYER_ALIASES:
        return None
    return layer_site(split[0], TL_LAYER_ALIASES[split[1]])


def canonical_from_tl(name: str) -> str | None:
    """The canonical site for a TransformerLens hook name, or ``None`` if ``name`` is not one."""
    if name in _FROM_TL_GLOBAL:
        return _FROM_TL_GLOBAL[name]
    split = layer_of(name)
    if split is None or split[1] not in _FROM_TL_LAYER:
        return None
    return layer_site(split[0], _FROM_TL_LAYER[split[1]])


def site_kind(spelling: str) -> str:
    """A per-layer site kind from the spellings studies accept.

    ``"resid_pre"``, ``"hook_resid_pre"``, ``"blocks.*.resid_pre"`` -> ``"resid_pre"``;
    ``"z"``, ``"hook_z"``, ``"attn.hook_z"`` -> ``"attn.z"``; ``"attn_scores"``/``"hook_attn_scores"``
    -> ``"attn.scores"``. Unknown spellings are returned unchanged (callers check them).
    """
    s = spelling.removeprefix("blocks.*.")
    if s in _FROM_TL_LAYER:
        return _FROM_TL_LAYER[s]
    bare = s.removeprefix("attn.").removeprefix("hook_")
    if bare == "attn_scores":
        bare = "scores"
    if f"attn.{bare}" in TL_LAYER_ALIASES:
        return f"attn.{bare}"
    return s.removeprefix("hook_")
