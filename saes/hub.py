"""Hub references to SAE files: parsing ``owner/repo/path`` and fetching the files.

:func:`parse_hub_ref` turns a reference such as
``google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71`` into a :class:`HubRef`
(repo, folder, kind, files). ``.../canonical`` resolves through :mod:`saes.canonical`; a
leading ``google/`` may be left out, and SAELens release names ending in ``-canonical`` are
accepted. Gemma Scope repos hold ``params.npz`` files; Gemma Scope 2 repos
(``google/gemma-scope-2-{size}-{pt|it}/<kind>/<folder>``, :mod:`saes.gemma_scope_2`) hold a
``config.json`` + ``params.safetensors`` folder; others are read as SAELens folders
(``{path}/cfg.json`` + ``{path}/sae_weights.safetensors``). :func:`fetch` downloads one file with
``huggingface_hub.hf_hub_download`` into its cache, and turns every hub failure into a
:class:`SAEFetchError` naming the repo and the file. :func:`saes.load` uses both.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from saes.canonical import CANONICAL_L0, canonical_l0
from saes.files import SAELENS_CFG, SAELENS_WEIGHTS
from saes.gemma_scope_2 import (
    GS2_CONFIG,
    GS2_MULTI_LAYER_N_LAYERS,
    GS2_PARAMS,
    is_gemma_scope_2_repo,
    layer_params_name,
    parse_multi_layer_folder,
    repo_size,
)

__all__ = ["HubRef", "SAEFetchError", "fetch", "parse_hub_ref"]


class SAEFetchError(FileNotFoundError):
    """A hub file that could not be fetched (offline, missing, gated); names repo and file."""


@dataclass(frozen=True)
class HubRef:
    """A parsed hub reference: ``repo_id`` plus the files to fetch.

    Attributes:
        repo_id: ``owner/name``.
        path: folder inside the repo (``layer_20/width_16k/average_l0_71``).
        kind: ``"npz"`` (Gemma Scope ``params.npz``), ``"gemma_scope_2"`` (``config.json`` +
            ``params.safetensors``), ``"gemma_scope_2_multi"`` (a CLT or crosscoder folder:
            ``params_layer_{k}.safetensors`` per layer, then ``config.json``) or ``"saelens"`` (cfg + weights).
        files: repo-relative file names to fetch.
        ref: the reference as given.
    """

    repo_id: str
    path: str
    kind: str
    files: tuple[str, ...]
    ref: str


def parse_hub_ref(ref: str) -> HubRef:
    """Parse ``owner/repo/path`` (see module docstring); resolves ``canonical`` via the table.

    Raises:
        ValueError: malformed reference, or a canonical entry missing from the table.
    """
    text = ref.strip()
    for prefix in ("hf://", "https://huggingface.co/", "huggingface.co/"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    parts = [p for p in text.strip("/").split("/") if p]
    if parts and parts[0].startswith("gemma-scope-"):
        parts = ["google", *parts]
    if len(parts) < 3:
        raise ValueError(
            f"hub reference {ref!r} must look like 'owner/repo/path', e.g. "
            "'google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71'"
        )
    owner, name, rest = parts[0], parts[1], parts[2:]
    if name.startswith("gemma-scope") and name.endswith("-canonical"):
        name = name[: -len("-canonical")]
    repo_id = f"{owner}/{name}"
    if is_gemma_scope_2_repo(name):
        if rest[-1] in (GS2_CONFIG, GS2_PARAMS):
            rest = rest[:-1]
        if not rest or rest[-1] == "canonical":
            raise ValueError(
                f"Gemma Scope 2 reference {ref!r} must name a folder, e.g. "
                f"'{repo_id}/resid_post/layer_12_width_16k_l0_medium' (no canonical table for Gemma Scope 2)"
            )
        if rest[0] in ("clt", "crosscoder"):
            return _multi_layer_ref(repo_id, name, rest, ref)
        folder = "/".join(rest)
        return HubRef(repo_id, folder, "gemma_scope_2", (f"{folder}/{GS2_CONFIG}", f"{folder}/{GS2_PARAMS}"), ref)
    if rest[-1] == "canonical":
        layer_m = re.fullmatch(r"layer_(\d+)", rest[0]) if len(rest) == 3 else None
        width_m = re.fullmatch(r"width_(\w+)", rest[1]) if len(rest) == 3 else None
        if layer_m is None or width_m is None:
            raise ValueError(f"canonical reference {ref!r} must end in 'layer_L/width_W/canonical'")
        layer, width = int(layer_m.group(1)), width_m.group(1)
        l0 = canonical_l0(repo_id, layer, width)
        if l0 is None:
            known = sorted(CANONICAL_L0.get(repo_id, {}))
            raise ValueError(
                f"no canonical entry for {repo_id} layer {layer} width {width} in saes.canonical "
                f"(a partial table; known for this repo: {known[:12]}{' ...' if len(known) > 12 else ''}). "
                "Give an explicit '.../average_l0_N' reference or add one with "
                "saes.canonical.register_canonical(repo, layer, width, l0)."
            )
        rest = [rest[0], rest[1], f"average_l0_{l0}"]
    last = rest[-1]
    if last.endswith(".npz"):
        return HubRef(repo_id, "/".join(rest[:-1]), "npz", ("/".join(rest),), ref)
    if last in (SAELENS_CFG, SAELENS_WEIGHTS):
        folder = "/".join(rest[:-1])
        files = tuple(f"{folder}/{n}" if folder else n for n in (SAELENS_CFG, SAELENS_WEIGHTS))
        return HubRef(repo_id, folder, "saelens", files, ref)
    folder = "/".join(rest)
    if name.startswith("gemma-scope"):
        return HubRef(repo_id, folder, "npz", (f"{folder}/params.npz",), ref)
    return HubRef(repo_id, folder, "saelens", (f"{folder}/{SAELENS_CFG}", f"{folder}/{SAELENS_WEIGHTS}"), ref)


def _multi_layer_ref(repo_id: str, name: str, rest: list[str], ref: str) -> HubRef:
    """A Gemma Scope 2 ``clt/...`` or ``crosscoder/...`` folder: its ``params_layer_{k}.safetensors`` files (one per
    layer: every decoder layer of the model for a CLT, the named four for a crosscoder), then ``config.json``."""
    if rest[-1] == GS2_CONFIG or rest[-1].startswith("params_layer_"):
        rest = rest[:-1]
    folder = "/".join(rest)
    parsed = parse_multi_layer_folder(folder)
    if parsed is None or len(rest) != 2:
        raise ValueError(
            f"Gemma Scope 2 multi-layer reference {ref!r} must name a folder such as "
            f"'{repo_id}/clt/width_262k_l0_medium_affine' or "
            f"'{repo_id}/crosscoder/layer_7_13_17_22_width_262k_l0_medium'"
        )
    if parsed.layers is not None:
        n = len(parsed.layers)
    else:
        size = repo_size(name)
        if size not in GS2_MULTI_LAYER_N_LAYERS:
            raise ValueError(
                f"{ref!r}: Gemma Scope 2 has cross-layer transcoders for the "
                f"{', '.join(sorted(GS2_MULTI_LAYER_N_LAYERS))} models only, not {size!r}"
            )
        n = GS2_MULTI_LAYER_N_LAYERS[size]
    files = tuple(f"{folder}/{layer_params_name(k)}" for k in range(n)) + (f"{folder}/{GS2_CONFIG}",)
    return HubRef(repo_id, folder, "gemma_scope_2_multi", files, ref)


def _hub_errors() -> tuple[type[BaseException], ...]:
    import huggingface_hub.errors as hfe

    names = (
        "LocalEntryNotFoundError", "EntryNotFoundError", "RemoteEntryNotFoundError",
        "RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError",
        "OfflineModeIsEnabled", "HfHubHTTPError", "HFValidationError",
    )  # fmt: skip
    errs: list[type[BaseException]] = [getattr(hfe, n) for n in names if hasattr(hfe, n)]
    errs.append(ConnectionError)
    errs.append(TimeoutError)
    return tuple(errs)


def fetch(repo_id: str, filename: str, ref: str) -> Path:
    """``hf_hub_download`` one file (looked up at call time, so tests can monkeypatch it)."""
    import huggingface_hub

    try:
        local = huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename)
    except _hub_errors() as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = (
            "offline mode (HF_HUB_OFFLINE is set) and the file is not in the cache"
            if offline
            else (f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        )
        raise SAEFetchError(
            f"could not fetch {filename!r} from the Hugging Face repo {repo_id!r} for {ref!r} ({why}). "
            f"Fetch it on a machine with network access, e.g. "
            f"`hf download {repo_id} {filename}` (it lands in the hub cache), "
            "or pass saes.load a local path to the file."
        ) from None
    return Path(local)
