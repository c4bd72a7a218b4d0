"""SAEs and transcoders shipped for the bundled models (``load_saes("gemma2-tiny")``, ``load_saes("gemma3-tiny")``).

The files live in ``mishax_py/zoo/data/<model>-saes/``, in the layout of the release each family's
SAEs come in:

* ``gemma2-tiny``: Gemma Scope -- one folder per SAE holding a ``params.npz`` (``W_enc``, ``W_dec``,
  ``b_enc``, ``b_dec``, ``threshold``; float32); transcoders read ``blocks.L.ln2_normalized``.
* ``gemma3-tiny``: Gemma Scope 2 (:mod:`saes.gemma_scope_2`) -- ``resid_post/layer_{L}_width_{W}_l0_small/``
  and ``transcoder/layer_{L}_width_{W}_l0_small/``, each holding ``params.safetensors`` (``w_enc``,
  ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``; float32) and ``config.json`` (``hf_hook_point_in``/``_out``
  name the transformers modules, from which the loader infers the sites); transcoders read
  ``blocks.L.ln2`` (the pre-feedforward norm's output) and write ``blocks.L.mlp_out``.

Each folder has a ``registry.json`` written by ``scripts/train_tiny_saes.py`` (``--model``) with, per
SAE: ``name``, ``kind`` (``"sae"`` or ``"transcoder"``), ``site`` / ``output_site``, ``path`` (relative),
``d_in``, ``d_sae``, and the numbers measured on held-out task prompts -- ``l0``, ``fvu``,
``dead_fraction``, ``delta_lm_loss`` (increase of the task cross-entropy when the site
is replaced by the reconstruction) and the task accuracies when spliced.

Loading goes through the real loaders, ``saes.load(path, site=..., output_site=...)`` (Gemma Scope's
``params.npz`` or Gemma Scope 2's folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mishax_py.zoo.models import DATA_DIR

__all__ = ["SAE_MODELS", "sae_dir", "sae_registry", "has_saes", "load_saes"]

# Bundled model name -> folder (under ``DATA_DIR``) holding its SAEs and registry.json.
SAE_MODELS: dict[str, str] = {"gemma2-tiny": "gemma2-tiny-saes", "gemma3-tiny": "gemma3-tiny-saes"}


def sae_dir(model: str = "gemma2-tiny") -> Path:
    """The folder holding ``model``'s SAEs; ``KeyError`` (listing the models that have some) if none."""
    if model not in SAE_MODELS:
        raise KeyError(f"no bundled SAEs for {model!r}; available for: {', '.join(sorted(SAE_MODELS))}")
    return DATA_DIR / SAE_MODELS[model]


def has_saes(model: str = "gemma2-tiny") -> bool:
    """Whether ``model`` has bundled SAEs whose registry is present."""
    return model in SAE_MODELS and (sae_dir(model) / "registry.json").is_file()


def sae_registry(model: str = "gemma2-tiny") -> dict[str, Any]:
    """The parsed ``registry.json`` of ``model``'s SAEs (``{"model", "saes": [entry, ...], ...}``).

    Raises:
        KeyError: no SAEs are registered for ``model``.
        FileNotFoundError: the registry is missing (says how to rebuild it).
    """
    path = sae_dir(model) / "registry.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild the SAEs with "
                                f"`python scripts/train_tiny_saes.py --model {model}`")
    return json.loads(path.read_text(encoding="utf-8"))


def load_saes(
    model: str = "gemma2-tiny",
    names: list[str] | None = None,
    *,
    kind: str | None = None,
    device: Any = None,
) -> dict[str, Any]:
    """Load the bundled SAEs of ``model`` through ``saes.load`` (the Gemma Scope / Gemma Scope 2 loaders).

    Args:
        model: a bundled model with SAEs (``"gemma2-tiny"``, ``"gemma3-tiny"``).
        names: only these registry names (default: all), e.g. ``["res-L1", "transcoder-L1"]``.
        kind: only ``"sae"`` or only ``"transcoder"`` entries.
        device: move the parameters there.

    Returns:
        ``{name: SAE}`` in registry order; each SAE's ``site`` (and a transcoder's
        ``output_site``) is set, and ``sae.metadata["registry"]`` holds its registry entry
        (L0, FVU, delta LM loss, ...).

    Raises:
        KeyError: unknown model or unknown name (the message lists the valid ones).
    """
    import saes

    reg = sae_registry(model)
    entries = reg["saes"]
    by_name = {e["name"]: e for e in entries}
    if names is not None:
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise KeyError(f"unknown SAE name(s) {unknown} for {model!r}; available: {', '.join(by_name)}")
        entries = [by_name[n] for n in names]
    if kind is not None:
        if kind not in ("sae", "transcoder"):
            raise ValueError(f"kind must be 'sae' or 'transcoder', got {kind!r}")
        entries = [e for e in entries if e["kind"] == kind]
    out: dict[str, Any] = {}
    root = sae_dir(model)
    for e in entries:
        path = root / e["path"]
        if e["kind"] == "transcoder":
            sae = saes.load(path, site=e["site"], output_site=e["output_site"], device=device)
        else:
            sae = saes.load(path, site=e["site"], device=device)
        sae.metadata["registry"] = dict(e)
        sae.metadata["zoo_name"] = e["name"]
        out[e["name"]] = sae
    return out
