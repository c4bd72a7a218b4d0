"""Loading SAE files: Gemma Scope ``params.npz``, SAELens folders, and hub references.

:func:`load` accepts

* a local Gemma Scope ``params.npz`` (keys ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
  ``b_enc [d_sae]``, ``b_dec [d_in]``, ``threshold [d_sae]``),
* a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``; honours ``architecture``
  ``jumprelu``/``standard``/``topk``, ``apply_b_dec_to_input``, ``hook_name``, ``k``),
  or either of its two files,
* a folder holding a ``params.npz`` or a SAELens pair,
* a hub reference ``owner/repo/path`` such as
  ``google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71`` (parsed and fetched into
  the Hugging Face cache by :mod:`saes.hub`). ``.../canonical`` resolves through
  :mod:`saes.canonical`; a leading ``google/`` may be left out, and SAELens release names
  ending in ``-canonical`` are accepted. Non-Gemma-Scope repos are read as SAELens
  folders (``{path}/cfg.json`` + ``{path}/sae_weights.safetensors``).

Files are read without executing code: ``np.load(allow_pickle=False)`` and safetensors.
Every malformed file (missing key, wrong shape, non-finite values, truncated file,
pickled object) raises :class:`SAEFileError` naming the file, the key and the shapes.

This module re-exports the names of :mod:`saes.hub` and :mod:`saes.sites` it uses.

Sites are inferred (by :mod:`saes.sites`): from SAELens
``hook_name`` through TransformerLens aliases (``blocks.L.hook_resid_post`` ->
``blocks.L.resid_post``, ``blocks.L.attn.hook_z`` -> ``blocks.L.attn.z``,
``blocks.L.ln2.hook_normalized`` -> ``blocks.L.ln2_normalized``, ...), and from the Gemma
Scope repo kind (``res`` -> ``resid_post``, ``mlp`` -> ``mlp_out``, ``att`` -> ``attn.z``,
``transcoders`` -> reads ``ln2_normalized`` and writes ``mlp_out``, ``embedding`` -> ``embed``).
``site=`` overrides. Writing a SAELens folder is :meth:`saes.SAE.save` (:func:`save_saelens`).
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from saes.base import SAE, JumpReLUSAE, ReLUSAE, TopKSAE, Transcoder
from saes.files import SAELENS_CFG, SAELENS_WEIGHTS
from saes.hub import HubRef, SAEFetchError, fetch, parse_hub_ref
from saes.sites import gemma_scope_sites, hook_name_from_site, site_from_hook_name

__all__ = [
    "GEMMA_SCOPE_KEYS",
    "HubRef",
    "SAEFetchError",
    "SAEFileError",
    "gemma_scope_sites",
    "hook_name_from_site",
    "load",
    "load_npz",
    "load_saelens",
    "parse_hub_ref",
    "save_saelens",
    "site_from_hook_name",
]

GEMMA_SCOPE_KEYS: tuple[str, ...] = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


class SAEFileError(ValueError):
    """A file that is not a valid SAE (message names the file, key and shapes)."""


# ------------------------------------------------------------------ validation
def _check_tensors(
    tensors: Mapping[str, torch.Tensor],
    required: Sequence[str],
    source: str,
    *,
    optional: Sequence[str] = (),
    allow_d_out: bool = False,
) -> tuple[int, int, int]:
    """Validate SAE parameter tensors; return ``(d_in, d_sae, d_out)``.

    Raises:
        SAEFileError: naming ``source``, the key and the shapes on any problem.
    """
    missing = [k for k in required if k not in tensors]
    if missing:
        raise SAEFileError(
            f"{source}: missing key(s) {missing}; found keys {sorted(tensors)}; expected {list(required)}"
        )
    for key in list(required) + [k for k in optional if k in tensors]:
        t = tensors[key]
        if not t.is_floating_point():
            raise SAEFileError(f"{source}: key {key!r} has dtype {t.dtype}, expected a floating-point array")
    W_enc = tensors["W_enc"]
    if W_enc.dim() != 2:
        raise SAEFileError(f"{source}: key 'W_enc' has shape {tuple(W_enc.shape)}, expected [d_in, d_sae]")
    d_in, d_sae = (int(s) for s in W_enc.shape)
    W_dec = tensors["W_dec"]
    if W_dec.dim() != 2 or W_dec.shape[0] != d_sae or (not allow_d_out and W_dec.shape[1] != d_in):
        want = f"[{d_sae}, d_out]" if allow_d_out else f"[{d_sae}, {d_in}]"
        raise SAEFileError(
            f"{source}: key 'W_dec' has shape {tuple(W_dec.shape)}, expected {want} "
            f"(from W_enc {tuple(W_enc.shape)} = [d_in, d_sae])"
        )
    d_out = int(W_dec.shape[1])
    expected = {
        "b_enc": (d_sae,),
        "b_dec": (d_out,),
        "threshold": (d_sae,),
        "log_threshold": (d_sae,),
        "W_skip": (d_in, d_out),
    }
    for key, shape in expected.items():
        if key in tensors and tuple(tensors[key].shape) != shape:
            raise SAEFileError(
                f"{source}: key {key!r} has shape {tuple(tensors[key].shape)}, expected {list(shape)} "
                f"(d_in={d_in}, d_sae={d_sae}, d_out={d_out} from W_enc {tuple(W_enc.shape)}, "
                f"W_dec {tuple(W_dec.shape)})"
            )
    for key in list(required) + [k for k in optional if k in tensors]:
        t = tensors[key]
        if t.numel() and bool(torch.isfinite(t.sum())):
            continue  # a NaN or inf anywhere makes the sum non-finite; a finite sum needs no scan
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            n_nan = int(torch.isnan(t).sum())
            raise SAEFileError(
                f"{source}: key {key!r} (shape {tuple(t.shape)}) has {bad} non-finite value(s) "
                f"({n_nan} NaN, {bad - n_nan} inf)"
            )
    return d_in, d_sae, d_out


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    """Read every array of ``path`` (no pickle) into torch tensors."""
    try:
        npz = np.load(path, allow_pickle=False)
    except ValueError as e:  # pickled .npy/.pkl content
        raise SAEFileError(
            f"{path}: holds pickled data, which is never loaded (allow_pickle=False): {e}"
        ) from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise SAEFileError(f"{path}: not a readable .npz file (truncated or corrupt?): {e}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise SAEFileError(
            f"{path}: is a single .npy array, expected a .npz archive with keys {GEMMA_SCOPE_KEYS}"
        )
    out: dict[str, torch.Tensor] = {}
    with npz:
        for key in npz.files:
            try:
                arr = npz[key]
            except ValueError as e:
                raise SAEFileError(
                    f"{path}: key {key!r} holds a pickled object array, which is never loaded "
                    f"(allow_pickle=False): {e}"
                ) from None
            except Exception as e:  # zlib.error, BadZipFile, EOFError on truncated members
                raise SAEFileError(
                    f"{path}: key {key!r} could not be read (truncated or corrupt file?): "
                    f"{type(e).__name__}: {e}"
                ) from None
            if arr.dtype.kind not in "fiub":
                raise SAEFileError(f"{path}: key {key!r} has dtype {arr.dtype}, expected a numeric array")
            if arr.dtype.kind == "f" and arr.dtype.itemsize == 2:
                arr = arr.astype(np.float32)
            out[key] = torch.from_numpy(np.ascontiguousarray(arr))
    return out


def _build(cls: type[SAE], params: Mapping[str, torch.Tensor], **kwargs: Any) -> SAE:
    """Construct ``cls`` on the meta device and install ``params`` as frozen parameters."""
    sae = cls(**kwargs, device="meta")
    names = {n for n, _ in sae.named_parameters()}
    for name in names:
        if name not in params:
            raise SAEFileError(f"internal: no tensor for parameter {name!r} of {cls.__name__}")
        setattr(sae, name, nn.Parameter(params[name], requires_grad=False))
    return sae


def _finish(sae: SAE, *, device: torch.device | str | None, dtype: torch.dtype | None) -> SAE:
    if dtype is not None or device is not None:
        sae.to(device=device, dtype=dtype)
    sae.eval()
    return sae


# ------------------------------------------------------------------ Gemma Scope
def load_npz(
    path: str | Path,
    *,
    site: str | None = None,
    output_site: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    origin: str | None = None,
) -> SAE:
    """Load a Gemma Scope ``params.npz`` as a :class:`JumpReLUSAE` (or :class:`Transcoder`).

    The site is inferred from ``origin`` (hub reference) or the path when either names a
    Gemma Scope repo; ``site``/``output_site`` override. Transcoder repos give a
    :class:`Transcoder` (JumpReLU activation).

    Args:
        path: the ``.npz`` file.
        origin: the hub reference the file came from (for site inference and metadata).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such SAE file: {path}")
    tensors = _read_npz(path)
    extra = sorted(set(tensors) - set(GEMMA_SCOPE_KEYS))
    inferred = gemma_scope_sites(origin or "") or gemma_scope_sites(str(path.resolve()))
    is_transcoder = inferred is not None and inferred[0] != inferred[1]
    if output_site is not None and output_site != site:
        is_transcoder = True
    d_in, d_sae, d_out = _check_tensors(tensors, GEMMA_SCOPE_KEYS, str(path), allow_d_out=is_transcoder)
    params = {k: tensors[k].float() for k in GEMMA_SCOPE_KEYS}
    in_site = site if site is not None else (inferred[0] if inferred else None)
    if is_transcoder:
        out_site = output_site if output_site is not None else (inferred[1] if inferred else None)
        sae = _build(
            Transcoder, params, d_in=d_in, d_sae=d_sae, d_out=d_out, site=in_site, output_site=out_site
        )
    else:
        sae = _build(JumpReLUSAE, params, d_in=d_in, d_sae=d_sae, site=in_site)
    sae.metadata.update({"format": "gemma_scope_npz", "path": str(path)})
    if origin:
        sae.metadata["hub_ref"] = origin
    if extra:
        sae.metadata["ignored_keys"] = extra
    return _finish(sae, device=device, dtype=dtype)


# ----------------------------------------------------------------------- SAELens
_TRANSCODER_ARCHS = {
    "transcoder": "relu",
    "skip_transcoder": "relu",
    "jumprelu_transcoder": "jumprelu",
    "jumprelu_skip_transcoder": "jumprelu",
    "topk_transcoder": "topk",
    "relu_transcoder": "relu",
}


def _read_cfg(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SAEFileError(f"{path}: not UTF-8 text: {e}") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise SAEFileError(f"{path}: invalid JSON (truncated?): {e}") from None
    if not isinstance(cfg, dict):
        raise SAEFileError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise SAEFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    except Exception as e:  # header parse failures surface as other exception types
        raise SAEFileError(f"{path}: could not read safetensors file: {type(e).__name__}: {e}") from None


def load_saelens(
    folder: str | Path,
    *,
    site: str | None = None,
    output_site: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    origin: str | None = None,
) -> SAE:
    """Load a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``).

    Honours ``architecture`` (``jumprelu``, ``standard``, ``topk``; ``batchtopk`` loads as
    TopK; the transcoder architectures written by :func:`save_saelens`),
    ``apply_b_dec_to_input``, ``hook_name`` (site inference) and ``k`` (also read from
    ``activation_fn_kwargs``). A ``log_threshold`` tensor is accepted for JumpReLU.
    """
    folder = Path(folder)
    cfg_path, w_path = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"SAELens folder {folder} lacks {p.name} (needs {SAELENS_CFG} + {SAELENS_WEIGHTS})"
            )
    cfg = _read_cfg(cfg_path)
    tensors = _read_safetensors(w_path)
    arch = str(cfg.get("architecture", "standard")).lower()
    meta_cfg = cfg.get("metadata")
    metadata: dict[str, Any] = meta_cfg if isinstance(meta_cfg, dict) else {}
    hook_name = cfg.get("hook_name") or metadata.get("hook_name")
    hook_name_out = cfg.get("hook_name_out") or metadata.get("hook_name_out")
    act_kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", act_kwargs.get("k") if isinstance(act_kwargs, dict) else None)
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", False))
    norm = cfg.get("normalize_activations")
    if norm not in (None, "none", "None"):
        warnings.warn(
            f"{cfg_path}: normalize_activations={norm!r} is not applied by mishax-py SAEs; "
            "inputs are encoded as they are",
            stacklevel=2,
        )
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors = dict(tensors)
        tensors["threshold"] = tensors.pop("log_threshold").float().exp()

    is_tc = arch in _TRANSCODER_ARCHS
    if arch in ("jumprelu",):
        required: tuple[str, ...] = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    elif arch in ("standard", "relu", "topk", "batchtopk"):
        required = ("W_enc", "W_dec", "b_enc", "b_dec")
    elif is_tc:
        required = ("W_enc", "W_dec", "b_enc", "b_dec")
        if _TRANSCODER_ARCHS[arch] == "jumprelu":
            required += ("threshold",)
    else:
        raise SAEFileError(
            f"{cfg_path}: architecture {arch!r} is not supported "
            "(supported: jumprelu, standard, topk, batchtopk, and transcoders)"
        )
    d_in, d_sae, d_out = _check_tensors(
        tensors, required, str(w_path), optional=("W_skip",), allow_d_out=is_tc
    )
    for key, val in (("d_in", d_in), ("d_sae", d_sae)):
        if key in cfg and cfg[key] is not None and int(cfg[key]) != val:
            raise SAEFileError(
                f"{folder}: cfg.json says {key}={cfg[key]} but {SAELENS_WEIGHTS} has W_enc "
                f"{tuple(tensors['W_enc'].shape)} ({key}={val})"
            )
    if site is None:
        site = cfg.get("mishax_site") or (site_from_hook_name(hook_name) if hook_name else None)
    params = {key: tensors[key] for key in required}
    common: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "site": site, "apply_b_dec_to_input": apply_b_dec}
    common_dtype = tensors["W_enc"].dtype
    params = {key: t.to(common_dtype) for key, t in params.items()}
    sae: SAE
    if is_tc:
        if output_site is None:
            output_site = cfg.get("mishax_output_site") or (
                site_from_hook_name(hook_name_out) if hook_name_out else None
            )
        act = str(cfg.get("activation", _TRANSCODER_ARCHS[arch]))
        skip = "W_skip" in tensors
        if skip:
            params["W_skip"] = tensors["W_skip"].to(common_dtype)
        if act == "topk" and k is None:
            raise SAEFileError(f"{cfg_path}: topk transcoder without 'k'")
        sae = _build(
            Transcoder,
            params,
            **common,
            d_out=d_out,
            output_site=output_site,
            activation=act,
            k=None if k is None else int(k),
            skip=skip,
            dtype=common_dtype,
        )
    elif arch == "jumprelu":
        sae = _build(JumpReLUSAE, params, **common, dtype=common_dtype)
    elif arch in ("topk", "batchtopk"):
        if k is None:
            raise SAEFileError(f"{cfg_path}: architecture {arch!r} without 'k' (or activation_fn_kwargs.k)")
        sae = _build(TopKSAE, params, **common, k=int(k), dtype=common_dtype)
    else:
        sae = _build(ReLUSAE, params, **common, dtype=common_dtype)
    sae.metadata.update({"format": "saelens", "path": str(folder), "architecture": arch})
    if hook_name:
        sae.metadata["hook_name"] = hook_name
    if origin:
        sae.metadata["hub_ref"] = origin
    for key in ("model_name", "release", "sae_id"):
        if key in cfg:
            sae.metadata[key] = cfg[key]
    return _finish(sae, device=device, dtype=dtype)


def save_saelens(sae: SAE, path: str | Path) -> Path:
    """Write ``sae`` to folder ``path`` in SAELens format; returns the folder (same as ``sae.save(path)``).

    What ``cfg.json`` carries: :meth:`saes.base.SAE.saelens_config`.
    """
    return sae.save(path)


# ------------------------------------------------------------------------ load
def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~", "\\")) or (len(ref) > 1 and ref[1] == ":")


def load(
    ref: str | os.PathLike[str],
    *,
    site: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    output_site: str | None = None,
) -> SAE:
    """Load an SAE or transcoder from a local file/folder or a hub reference.

    Args:
        ref: ``params.npz``; SAELens folder or one of its files; a folder holding
            either; or a hub reference like
            ``"google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71"`` (or ``.../canonical``).
        site: override the inferred site (the input site for transcoders).
        device, dtype: move/cast the parameters (default: CPU, the file's dtype).
        output_site: override a transcoder's inferred output site.

    Returns:
        A frozen (``requires_grad=False``), ``eval()``-mode :class:`SAE`; ``sae.site`` holds
        the inferred or given site, ``sae.metadata`` the source.

    Raises:
        SAEFileError: malformed file (names file, key, shapes).
        SAEFetchError: hub file not available (offline or missing); names repo and file.
        FileNotFoundError: a local path that does not exist.
    """
    kw: dict[str, Any] = {"site": site, "output_site": output_site, "device": device, "dtype": dtype}
    text = os.fspath(ref)
    local = Path(text).expanduser()
    if local.exists():
        return _load_local(local, **kw)
    if isinstance(ref, os.PathLike) or _looks_local(text):
        raise FileNotFoundError(f"no such SAE file or folder: {local}")
    try:
        hub = parse_hub_ref(text)
    except ValueError as e:
        if text.strip("/").count("/") < 2:
            raise FileNotFoundError(
                f"{text!r} is neither an existing local path nor a hub reference 'owner/repo/path' "
                "(e.g. 'google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71')"
            ) from None
        raise e
    paths = [fetch(hub.repo_id, f, text) for f in hub.files]
    origin = f"{hub.repo_id}/{hub.path}"
    if hub.kind == "npz":
        return load_npz(paths[0], origin=origin, **kw)
    folder = paths[0].parent
    if paths[1].parent != folder:  # cache layouts always co-locate; be safe anyway
        raise SAEFetchError(f"{text}: {SAELENS_CFG} and {SAELENS_WEIGHTS} were fetched to different folders")
    return load_saelens(folder, origin=origin, **kw)


def _load_local(path: Path, **kw: Any) -> SAE:
    if path.is_file():
        if path.name in (SAELENS_CFG, SAELENS_WEIGHTS):
            return load_saelens(path.parent, **kw)
        if path.suffix == ".npz":
            return load_npz(path, **kw)
        raise SAEFileError(
            f"{path}: unknown SAE file type (expected a Gemma Scope .npz, or a SAELens {SAELENS_CFG} / "
            f"{SAELENS_WEIGHTS})"
        )
    if (path / SAELENS_CFG).is_file() or (path / SAELENS_WEIGHTS).is_file():
        return load_saelens(path, **kw)
    if (path / "params.npz").is_file():
        return load_npz(path / "params.npz", **kw)
    npzs = sorted(path.glob("*.npz"))
    if len(npzs) == 1:
        return load_npz(npzs[0], **kw)
    listing = sorted(p.name for p in path.iterdir())[:20]
    raise SAEFileError(
        f"{path}: folder holds neither a SAELens pair ({SAELENS_CFG} + {SAELENS_WEIGHTS}) nor a "
        f"params.npz; it contains {listing}"
    )
