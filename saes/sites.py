"""Where an SAE reads and writes: sites from SAELens hook names and from Gemma Scope repo names.

SAELens files name the site by its TransformerLens hook (``blocks.20.hook_resid_post``);
:func:`site_from_hook_name` and :func:`hook_name_from_site` translate through the one alias
table, :data:`mishax_py.naming.TL_LAYER_ALIASES`. Gemma Scope files carry no site at all:
:func:`gemma_scope_sites` reads it off the repo name and path (``gemma-scope-2b-pt-res/layer_20/...``).
"""

from __future__ import annotations

import os
import re
import warnings

from mishax_py.naming import TL_LAYER_ALIASES, canonical_from_tl, layer_of, layer_site, tl_alias

__all__ = ["gemma_scope_sites", "hook_name_from_site", "site_from_hook_name"]

# Canonical names accepted as they are: sites outside the layers, and per-layer kinds that
# TransformerLens has no hook for (besides the kinds of the alias table).
_NON_LAYER_SITES = frozenset({"embed", "ln_final", "logits"})
_UNALIASED_KINDS = frozenset({"ln1", "ln2", "attn_out_pre_norm", "mlp_out_pre_norm"})


def site_from_hook_name(hook_name: str) -> str:
    """Canonical site for a TransformerLens hook name (or a canonical name, returned unchanged).

    ``blocks.20.hook_resid_post`` -> ``blocks.20.resid_post``; ``blocks.3.attn.hook_z`` ->
    ``blocks.3.attn.z``; ``blocks.3.ln2.hook_normalized`` -> ``blocks.3.ln2_normalized``.
    Unknown names are returned unchanged with a warning (pass ``site=`` to override).
    """
    canonical = canonical_from_tl(hook_name)
    if canonical is not None:
        return canonical
    if hook_name in _NON_LAYER_SITES:
        return hook_name
    split = layer_of(hook_name)
    if split is not None and (split[1] in TL_LAYER_ALIASES or split[1] in _UNALIASED_KINDS):
        return hook_name
    warnings.warn(
        f"hook name {hook_name!r} has no canonical mishax-py site alias; using it as the site "
        "(pass site=... to saes.load to override)",
        stacklevel=3,
    )
    return hook_name


def hook_name_from_site(site: str) -> str:
    """TransformerLens hook name for a canonical site (the site itself where TL has no alias)."""
    return tl_alias(site) or site


_GS_REPO_RE = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)")
_GS_LAYER_RE = re.compile(r"(?:^|/)layer_(\d+)(?:/|$)")
_GS_KIND_SITE = {"res": "resid_post", "mlp": "mlp_out", "att": "attn.z"}


def gemma_scope_sites(ref: str) -> tuple[str, str] | None:
    """``(reads, writes)`` sites of a Gemma Scope SAE from its repo name and path, else ``None``.

    ``res`` -> ``resid_post``, ``mlp`` -> ``mlp_out``, ``att`` -> ``attn.z`` (read and written),
    ``transcoders`` -> reads ``ln2_normalized`` and writes ``mlp_out``, a ``res`` repo's
    ``embedding`` folder -> ``embed``. ``ref`` may be a hub reference or a local path that
    contains the repo name (the Hugging Face cache keeps it: ``models--google--gemma-scope-2b-pt-res/...``).
    """
    text = ref.replace(os.sep, "/")
    m = _GS_REPO_RE.search(text)
    if m is None:
        return None
    kind = m.group(3)
    if kind == "res" and re.search(r"(?:^|/)embedding(?:/|$)", text):
        return ("embed", "embed")
    lm = _GS_LAYER_RE.search(text)
    if lm is None:
        return None
    layer = int(lm.group(1))
    if kind in _GS_KIND_SITE:
        s = layer_site(layer, _GS_KIND_SITE[kind])
        return (s, s)
    return (layer_site(layer, "ln2_normalized"), layer_site(layer, "mlp_out"))
