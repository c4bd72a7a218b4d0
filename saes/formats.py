"""Loading SAE files: Gemma Scope ``params.npz``, SAELens folders, and hub references.

:func:`load` accepts

* a local Gemma Scope ``params.npz`` (keys ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
  ``b_enc [d_sae]``, ``b_dec [d_in]``, ``threshold [d_sae]``),
* a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``; honours ``architecture``
  ``jumprelu``/``standard``/``topk``, ``apply_b_dec_to_input``, ``hook_name``, ``k``),
  or either of its two files,
* a folder holding a ``params.npz`` or a SAELens pair,
* a Gemma Scope 2 folder (``config.json`` + ``params.safetensors``, :func:`load_gemma_scope_2`;
  format facts and their source in :mod:`saes.gemma_scope_2`), or either of its two files,
* a Gemma Scope 2 cross-layer transcoder or crosscoder folder (``config.json`` +
  ``params_layer_{k}.safetensors``, :func:`load_gemma_scope_2_multi`, giving a
  :class:`saes.clt.CrossLayerTranscoder`; facts and sources in :mod:`saes.clt`), or one of its files,
* a hub reference ``owner/repo/path`` such as
  ``google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71`` (parsed and fetched into
  the Hugging Face cache by :mod:`saes.hub`). ``.../canonical`` resolves through
  :mod:`saes.canonical`; a leading ``google/`` may be left out, and SAELens release names
  ending in ``-canonical`` are accepted. Non-Gemma-Scope repos are read as SAELens
  folders (``{path}/cfg.json`` + ``{path}/sae_weights.safetensors``). Gemma Scope 2 references
  ``google/gemma-scope-2-{270m,1b,4b,12b,27b}-{pt,it}/<kind>/<folder>`` fetch that folder's two files
  (``.../clt/<folder>`` and ``.../crosscoder/<folder>``: every layer file and the config).

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
import re
import stat
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mishax_py.naming import layer_of
from saes.base import SAE, JumpReLUSAE, ReLUSAE, TopKSAE, Transcoder
from saes.clt import CrossLayerTranscoder
from saes.files import SAELENS_CFG, SAELENS_WEIGHTS
from saes.gemma_scope_2 import (
    GS2_CONFIG,
    GS2_PARAMS,
    GS2_SKIP_KEY,
    layer_params_index,
    layer_params_name,
    parse_folder,
    parse_multi_layer_folder,
    site_from_hook_point,
    sites_from_hook_points,
)
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
    "load_gemma_scope_2",
    "load_gemma_scope_2_multi",
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
def _check_shapes(
    shapes: Mapping[str, tuple[int, ...]], required: Sequence[str], source: str, *, allow_d_out: bool = False
) -> tuple[int, int, int]:
    """Check that SAE parameter shapes agree with each other; return ``(d_in, d_sae, d_out)``.

    ``W_enc [d_in, d_sae]`` fixes ``d_in`` and ``d_sae``; ``W_dec [d_sae, d_out]`` (``d_out = d_in``
    unless ``allow_d_out``) ``d_out``; ``b_enc``/``threshold``/``log_threshold [d_sae]``,
    ``b_dec [d_out]`` and ``W_skip [d_in, d_out]`` must follow. Works on shapes alone, so an npz is
    checked from its ``.npy`` headers before anything is decompressed.

    Raises:
        SAEFileError: naming ``source``, the key and the shapes.
    """
    missing = [k for k in required if k not in shapes]
    if missing:
        raise SAEFileError(
            f"{source}: missing key(s) {missing}; found keys {sorted(shapes)}; expected {list(required)}"
        )
    W_enc = shapes["W_enc"]
    if len(W_enc) != 2:
        raise SAEFileError(f"{source}: key 'W_enc' has shape {W_enc}, expected [d_in, d_sae]")
    d_in, d_sae = (int(s) for s in W_enc)
    W_dec = shapes["W_dec"]
    if len(W_dec) != 2 or W_dec[0] != d_sae or (not allow_d_out and W_dec[1] != d_in):
        want = f"[{d_sae}, d_out]" if allow_d_out else f"[{d_sae}, {d_in}]"
        raise SAEFileError(
            f"{source}: key 'W_dec' has shape {W_dec}, expected {want} (from W_enc {W_enc} = [d_in, d_sae])"
        )
    d_out = int(W_dec[1])
    expected = {
        "b_enc": (d_sae,),
        "b_dec": (d_out,),
        "threshold": (d_sae,),
        "log_threshold": (d_sae,),
        "W_skip": (d_in, d_out),
    }
    for key, shape in expected.items():
        if key in shapes and tuple(shapes[key]) != shape:
            raise SAEFileError(
                f"{source}: key {key!r} has shape {tuple(shapes[key])}, expected {list(shape)} "
                f"(d_in={d_in}, d_sae={d_sae}, d_out={d_out} from W_enc {W_enc}, W_dec {W_dec})"
            )
    return d_in, d_sae, d_out


def _check_tensors(
    tensors: Mapping[str, torch.Tensor],
    required: Sequence[str],
    source: str,
    *,
    optional: Sequence[str] = (),
    allow_d_out: bool = False,
) -> tuple[int, int, int]:
    """Validate SAE parameter tensors (dtypes, :func:`_check_shapes`, finite values); return
    ``(d_in, d_sae, d_out)``.

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
    shapes = {key: tuple(int(n) for n in t.shape) for key, t in tensors.items()}
    d_in, d_sae, d_out = _check_shapes(shapes, required, source, allow_d_out=allow_d_out)
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


_SPECIAL_FILES = (
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def _refuse_special(path: Path) -> None:
    """Raise :class:`SAEFileError` when ``path`` exists (symlinks followed) but is neither a regular file
    nor a folder: opening a FIFO blocks until a writer comes and a device such as ``/dev/zero`` never
    ends, so such a path is refused from its ``stat`` alone, before anything opens it."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # missing paths get the caller's FileNotFoundError
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "special file")
    raise SAEFileError(
        f"{path}: is a {kind}, not a regular file; an SAE is a Gemma Scope .npz file or a SAELens folder "
        f"({SAELENS_CFG} + {SAELENS_WEIGHTS})"
    )


# Members larger than this that decompress more than _NPZ_MAX_RATIO times are refused: float weights
# barely compress (random float32 about 1.1x), only a decompression bomb or a mostly-constant array does.
_NPZ_RATIO_MIN_BYTES = 64 << 20
_NPZ_MAX_RATIO = 100


def _npz_headers(
    path: Path, zf: zipfile.ZipFile, wanted: Sequence[str]
) -> tuple[dict[str, tuple[zipfile.ZipInfo, tuple[int, ...], np.dtype[Any]]], list[str]]:
    """The ``.npy`` headers of an npz's members, read from the zip without decompressing the arrays.

    Returns ``({key: (zip info, shape, dtype)}`` for the ``wanted`` keys present, the other keys).
    Every member's header is read (a few hundred bytes each): an object array in any member is
    refused as pickled data, and a ``wanted`` member must be a ``.npy`` array whose header agrees
    with the member's uncompressed size in the zip directory.

    Raises:
        SAEFileError: naming the file, the member and the sizes.
    """
    headers: dict[str, tuple[zipfile.ZipInfo, tuple[int, ...], np.dtype[Any]]] = {}
    others: list[str] = []
    for info in zf.infolist():
        key = info.filename.removesuffix(".npy")
        try:
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy format version {version}")
                header_len = f.tell()
        except ValueError as e:  # no .npy magic, a bad header: np.load would read such a member as bytes
            if key in wanted:
                raise SAEFileError(f"{path}: member {info.filename!r} is not a readable .npy array: {e}") from None
            others.append(key)
            continue
        except Exception as e:  # zlib.error, BadZipFile, EOFError on truncated members
            raise SAEFileError(
                f"{path}: key {key!r} could not be read (truncated or corrupt file?): {type(e).__name__}: {e}"
            ) from None
        if dtype.hasobject:
            raise SAEFileError(
                f"{path}: key {key!r} holds a pickled object array, which is never loaded (allow_pickle=False)"
            )
        if key not in wanted:
            others.append(key)
            continue
        size = header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if info.file_size != size:
            raise SAEFileError(
                f"{path}: member {info.filename!r} declares {info.file_size} bytes uncompressed, but its .npy "
                f"header (shape {tuple(shape)}, dtype {dtype}) describes {size}"
            )
        headers[key] = (info, tuple(int(n) for n in shape), dtype)
    return headers, others


def _read_npz(path: Path, *, allow_d_out: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read the Gemma Scope arrays of ``path`` (no pickle) into torch tensors; return them and the
    names of the other members (not read).

    Before decompressing anything the zip directory and the ``.npy`` headers are checked
    (:func:`_npz_headers`): the shapes must agree with each other (:func:`_check_shapes`), no
    member over 64 MiB may decompress more than 100x, and the arrays must fit in the RAM available.
    So a small file that would decompress to gigabytes is refused at once.
    """
    from mishax_py.memory import available_ram

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
        assert npz.zip is not None  # open until the with block ends
        headers, others = _npz_headers(path, npz.zip, GEMMA_SCOPE_KEYS)
        shapes = {key: shape for key, (_, shape, _) in headers.items()}
        _check_shapes(shapes, GEMMA_SCOPE_KEYS, str(path), allow_d_out=allow_d_out)
        for info, _, _ in headers.values():
            if info.file_size > _NPZ_RATIO_MIN_BYTES and info.file_size > _NPZ_MAX_RATIO * max(1, info.compress_size):
                raise SAEFileError(
                    f"{path}: member {info.filename!r} would decompress to {info.file_size} bytes from "
                    f"{info.compress_size} ({info.file_size / max(1, info.compress_size):.0f}x); SAE weights do "
                    f"not compress more than {_NPZ_MAX_RATIO}x, so this looks like a decompression bomb and is "
                    "refused before decompressing"
                )
        need = sum(info.file_size * (2 if dtype.kind == "f" and dtype.itemsize == 2 else 1)
                   for info, _, dtype in headers.values())  # fmt: skip
        budget = available_ram()
        if need > budget:
            raise SAEFileError(
                f"{path}: its arrays need {need / 2**30:.2f} GiB of memory, more than the {budget / 2**30:.2f} GiB "
                "available; refused before decompressing"
            )
        for key in headers:
            try:
                arr = npz[key]
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
    return out, others


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

    Only the five Gemma Scope arrays are decompressed (other members are listed in
    ``metadata["ignored_keys"]``), and only after the zip directory and ``.npy`` headers passed
    the checks of :func:`_read_npz` (consistent shapes, no decompression bomb, fits in RAM).

    Args:
        path: the ``.npz`` file.
        origin: the hub reference the file came from (for site inference and metadata).
    """
    path = Path(path)
    _refuse_special(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such SAE file: {path}")
    inferred = gemma_scope_sites(origin or "") or gemma_scope_sites(str(path.resolve()))
    is_transcoder = inferred is not None and inferred[0] != inferred[1]
    if output_site is not None and output_site != site:
        is_transcoder = True
    tensors, extra = _read_npz(path, allow_d_out=is_transcoder)
    extra = sorted(extra)
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


_CFG_KINDS = {
    "bool": "boolean (true or false)",
    "int": "integer",
    "posint": "positive integer",
    "str": "string",
    "object": "object",
}


def _json_type(value: object) -> str:
    """The JSON type name of a value ``json.loads`` returned."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object" if isinstance(value, dict) else type(value).__name__


def _cfg_value(cfg: Mapping[str, Any], key: str, kind: str, path: Path, *, prefix: str = "") -> Any:
    """``cfg[key]`` checked to be a JSON value of ``kind`` (a key of :data:`_CFG_KINDS`); ``None`` when
    the key is absent or ``null``. Integers must be JSON integers: not booleans, not ``12.0``.

    Raises:
        SAEFileError: naming ``path``, the key (``prefix + key`` for nested objects), the expected
        type and the value, e.g. ``cfg.json: key 'apply_b_dec_to_input' must be a JSON boolean
        (true or false), got "false" (a JSON string)``.
    """
    value = cfg.get(key)
    if value is None:
        return None
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = {
        "bool": isinstance(value, bool),
        "int": is_int,
        "posint": is_int and value > 0,
        "str": isinstance(value, str),
        "object": isinstance(value, dict),
    }[kind]
    if not ok:
        shown = json.dumps(value)
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        raise SAEFileError(
            f"{path}: key {prefix + key!r} must be a JSON {_CFG_KINDS[kind]}, got {shown} (a JSON {_json_type(value)})"
        )
    return value


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
    ``apply_b_dec_to_input`` (``true`` when not given, as SAELens reads it), ``hook_name`` (site inference)
    and ``k`` (also read from ``activation_fn_kwargs``). A ``log_threshold`` tensor is accepted for JumpReLU.

    Every ``cfg.json`` key read is checked for its JSON type before use (:func:`_cfg_value`:
    ``apply_b_dec_to_input`` a boolean, ``k`` a positive integer, ``d_in``/``d_sae``/``d_out``
    integers that match the weights, names and sites strings, ``metadata`` and
    ``activation_fn_kwargs`` objects; ``null`` means not given), so ``"false"`` is never read as
    true nor ``3.7`` as 3.
    """
    folder = Path(folder)
    cfg_path, w_path = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    for p in (cfg_path, w_path):
        _refuse_special(p)
        if not p.is_file():
            raise FileNotFoundError(
                f"SAELens folder {folder} lacks {p.name} (needs {SAELENS_CFG} + {SAELENS_WEIGHTS})"
            )
    cfg = _read_cfg(cfg_path)
    arch = (_cfg_value(cfg, "architecture", "str", cfg_path) or "standard").lower()
    metadata: dict[str, Any] = _cfg_value(cfg, "metadata", "object", cfg_path) or {}
    hook_name = _cfg_value(cfg, "hook_name", "str", cfg_path) or _cfg_value(
        metadata, "hook_name", "str", cfg_path, prefix="metadata."
    )
    hook_name_out = _cfg_value(cfg, "hook_name_out", "str", cfg_path) or _cfg_value(
        metadata, "hook_name_out", "str", cfg_path, prefix="metadata."
    )
    act_kwargs = _cfg_value(cfg, "activation_fn_kwargs", "object", cfg_path) or {}
    k = _cfg_value(cfg, "k", "posint", cfg_path)
    if k is None:
        k = _cfg_value(act_kwargs, "k", "posint", cfg_path, prefix="activation_fn_kwargs.")
    apply_b_dec = _cfg_value(cfg, "apply_b_dec_to_input", "bool", cfg_path)
    if apply_b_dec is None:  # not given: SAELens' default (its loaders setdefault it to True)
        apply_b_dec = True
    norm = _cfg_value(cfg, "normalize_activations", "str", cfg_path)
    sizes = {key: _cfg_value(cfg, key, "int", cfg_path) for key in ("d_in", "d_sae", "d_out")}
    mishax_site = _cfg_value(cfg, "mishax_site", "str", cfg_path)
    mishax_output_site = _cfg_value(cfg, "mishax_output_site", "str", cfg_path)
    activation = _cfg_value(cfg, "activation", "str", cfg_path)
    names = {key: _cfg_value(cfg, key, "str", cfg_path) for key in ("model_name", "release", "sae_id")}
    tensors = _read_safetensors(w_path)
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
    for key, val in (("d_in", d_in), ("d_sae", d_sae), ("d_out", d_out)):
        if sizes[key] is not None and sizes[key] != val:
            raise SAEFileError(
                f"{folder}: cfg.json says {key}={sizes[key]} but {SAELENS_WEIGHTS} has W_enc "
                f"{tuple(tensors['W_enc'].shape)}, W_dec {tuple(tensors['W_dec'].shape)} ({key}={val})"
            )
    if site is None:
        site = mishax_site or (site_from_hook_name(hook_name) if hook_name else None)
    params = {key: tensors[key] for key in required}
    common: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "site": site, "apply_b_dec_to_input": apply_b_dec}
    common_dtype = tensors["W_enc"].dtype
    params = {key: t.to(common_dtype) for key, t in params.items()}
    sae: SAE
    if is_tc:
        if output_site is None:
            output_site = mishax_output_site or (site_from_hook_name(hook_name_out) if hook_name_out else None)
        act = activation or _TRANSCODER_ARCHS[arch]
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
            k=k,
            skip=skip,
            dtype=common_dtype,
        )
    elif arch == "jumprelu":
        sae = _build(JumpReLUSAE, params, **common, dtype=common_dtype)
    elif arch in ("topk", "batchtopk"):
        if k is None:
            raise SAEFileError(f"{cfg_path}: architecture {arch!r} without 'k' (or activation_fn_kwargs.k)")
        sae = _build(TopKSAE, params, **common, k=k, dtype=common_dtype)
    else:
        sae = _build(ReLUSAE, params, **common, dtype=common_dtype)
    sae.metadata.update({"format": "saelens", "path": str(folder), "architecture": arch})
    if hook_name:
        sae.metadata["hook_name"] = hook_name
    if origin:
        sae.metadata["hub_ref"] = origin
    for key, name in names.items():
        if name is not None:
            sae.metadata[key] = name
    return _finish(sae, device=device, dtype=dtype)


def save_saelens(sae: SAE, path: str | Path) -> Path:
    """Write ``sae`` to folder ``path`` in SAELens format; returns the folder (same as ``sae.save(path)``).

    What ``cfg.json`` carries: :meth:`saes.base.SAE.saelens_config`.
    """
    return sae.save(path)


# ---------------------------------------------------------------- Gemma Scope 2
_GS2_NAMES = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}


def load_gemma_scope_2(
    folder: str | Path,
    *,
    site: str | None = None,
    output_site: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    origin: str | None = None,
) -> SAE:
    """Load one Gemma Scope 2 folder (``config.json`` + ``params.safetensors``; layout and the
    source of these facts in :mod:`saes.gemma_scope_2`) as a :class:`JumpReLUSAE` or, for
    transcoders, a JumpReLU :class:`Transcoder` (with ``W_skip = affine_skip_connection``,
    ``[d_in, d_out]``, applied as ``x @ W_skip``, for ``_affine`` ones; the orientation's sources in
    :mod:`saes.gemma_scope_2`).

    Sites come from the config's ``hf_hook_point_in``/``hf_hook_point_out``
    (:func:`saes.gemma_scope_2.sites_from_hook_points`), else from the folder name in ``origin``
    or the path; ``site``/``output_site`` override. Config values are type-checked
    (:func:`_cfg_value`): ``architecture`` must be ``"jump_relu"``, ``affine_connection`` a boolean
    that agrees with the presence of ``affine_skip_connection``, an integer ``width`` must equal
    ``d_sae``. Tensors are checked as for every format (:func:`_check_tensors`).

    Raises:
        SAEFileError: a malformed file (names the file, the key, the shapes or value).
        FileNotFoundError: a missing ``config.json`` or ``params.safetensors``.
    """
    folder = Path(folder)
    cfg_path, w_path = folder / GS2_CONFIG, folder / GS2_PARAMS
    for p in (cfg_path, w_path):
        _refuse_special(p)
        if not p.is_file():
            raise FileNotFoundError(
                f"Gemma Scope 2 folder {folder} lacks {p.name} (needs {GS2_CONFIG} + {GS2_PARAMS})"
            )
    cfg = _read_cfg(cfg_path)
    arch = _cfg_value(cfg, "architecture", "str", cfg_path)
    if arch is not None and arch.lower() not in ("jump_relu", "jumprelu"):
        raise SAEFileError(f"{cfg_path}: key 'architecture' is {arch!r}; Gemma Scope 2 SAEs are 'jump_relu'")
    hook_in = _cfg_value(cfg, "hf_hook_point_in", "str", cfg_path)
    hook_out = _cfg_value(cfg, "hf_hook_point_out", "str", cfg_path)
    affine = _cfg_value(cfg, "affine_connection", "bool", cfg_path)
    width = cfg.get("width")
    raw = _read_safetensors(w_path)
    missing = [k for k in _GS2_NAMES if k not in raw]
    if missing:
        raise SAEFileError(
            f"{w_path}: missing key(s) {missing}; found keys {sorted(raw)}; expected {list(_GS2_NAMES)}"
            f"{f' (+ {GS2_SKIP_KEY!r} for affine transcoders)' if affine else ''}"
        )
    tensors = {_GS2_NAMES[k]: raw[k] for k in _GS2_NAMES}
    has_skip = GS2_SKIP_KEY in raw
    if affine is not None and affine != has_skip:
        raise SAEFileError(
            f"{cfg_path}: key 'affine_connection' is {json.dumps(affine)} but {w_path.name} "
            f"{'has' if has_skip else 'lacks'} key {GS2_SKIP_KEY!r}"
        )
    if hook_in is not None:
        try:
            reads, writes = sites_from_hook_points(hook_in, hook_out)
        except ValueError as e:
            bad_out = hook_out is not None and str(e).startswith(f"hook point {hook_out!r}")
            key = "hf_hook_point_out" if bad_out else "hf_hook_point_in"
            raise SAEFileError(f"{cfg_path}: key {key!r}: {e}") from None
        inferred: tuple[str, str] | None = (reads, writes)
    else:
        parsed = parse_folder(origin or "") or parse_folder(str(folder.resolve()))
        inferred = parsed.sites if parsed is not None else None
    is_tc = has_skip or (inferred is not None and inferred[0] != inferred[1])
    if output_site is not None and output_site != (site or (inferred[0] if inferred else None)):
        is_tc = True
    try:
        d_in, d_sae, d_out = _check_tensors(tensors, GEMMA_SCOPE_KEYS, str(w_path), allow_d_out=is_tc)
    except SAEFileError as e:  # name the keys as the file spells them
        raise SAEFileError(str(e).replace("W_enc", "w_enc").replace("W_dec", "w_dec")) from None
    if has_skip:
        skip = raw[GS2_SKIP_KEY]
        if tuple(skip.shape) != (d_in, d_out) or not skip.is_floating_point():
            raise SAEFileError(
                f"{w_path}: key {GS2_SKIP_KEY!r} has shape {tuple(skip.shape)} and dtype {skip.dtype}, "
                f"expected a floating-point [d_in, d_out] = [{d_in}, {d_out}] (from w_enc, w_dec)"
            )
        if not bool(torch.isfinite(skip).all()):
            raise SAEFileError(f"{w_path}: key {GS2_SKIP_KEY!r} has non-finite values")
        tensors["W_skip"] = skip.contiguous()
    if isinstance(width, int) and not isinstance(width, bool) and width != d_sae:
        raise SAEFileError(
            f"{cfg_path}: key 'width' is {width} but {w_path.name} has d_sae={d_sae} (w_enc {[d_in, d_sae]})"
        )
    common_dtype = tensors["W_enc"].dtype
    params = {k: t.to(common_dtype) for k, t in tensors.items()}
    in_site = site if site is not None else (inferred[0] if inferred else None)
    sae: SAE
    if is_tc:
        out_site = output_site if output_site is not None else (inferred[1] if inferred else None)
        sae = _build(
            Transcoder, params, d_in=d_in, d_sae=d_sae, d_out=d_out, site=in_site, output_site=out_site,
            activation="jumprelu", skip=has_skip, dtype=common_dtype,
        )  # fmt: skip
    else:
        sae = _build(JumpReLUSAE, params, d_in=d_in, d_sae=d_sae, site=in_site, dtype=common_dtype)
    sae.metadata.update({"format": "gemma_scope_2", "path": str(folder)})
    for key in ("hf_hook_point_in", "hf_hook_point_out", "model_name", "width", "l0"):
        if cfg.get(key) is not None:
            sae.metadata[key] = cfg[key]
    if origin:
        sae.metadata["hub_ref"] = origin
    extra = sorted(set(raw) - set(_GS2_NAMES) - {GS2_SKIP_KEY})
    if extra:
        sae.metadata["ignored_keys"] = extra
    return _finish(sae, device=device, dtype=dtype)


# ------------------------------------------------- Gemma Scope 2 multi-layer (CLTs, crosscoders)
_MULTI_KEYS = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")
_MULTI_KINDS = {"clt": ("ln2", "mlp_out"), "crosscoder": ("resid_post", "resid_post")}
_HOOK_TEMPLATE_RE = re.compile(r"^((?:[A-Za-z_]+\.)*?layers\.)\{([^}]*)\}(\..+)$")


def _multi_hook(value: str, key: str, path: Path) -> tuple[tuple[int, ...] | None, str]:
    """``(layers or None for {all}, site kind)`` of a multi-layer ``hf_hook_point_*`` such as
    ``model.layers.{all}.pre_feedforward_layernorm.output`` or ``model.layers.{5,9,12,15}.output``."""
    m = _HOOK_TEMPLATE_RE.match(value)
    if m is None:
        raise SAEFileError(f"{path}: key {key!r} is {value!r}; a multi-layer model's hook point names its layers "
                           "as model.layers.{all}.<module> or model.layers.{5,9,12,15}.<module>")
    head, spec, tail = m.groups()
    try:
        site = site_from_hook_point(f"{head}0{tail}")
    except ValueError as e:
        raise SAEFileError(f"{path}: key {key!r}: {e}") from None
    split = layer_of(site)
    assert split is not None
    if spec.strip() == "all":
        return None, split[1]
    try:
        return tuple(int(v) for v in spec.split(",")), split[1]
    except ValueError:
        raise SAEFileError(f"{path}: key {key!r} names layers {{{spec}}}; expected 'all' or integers") from None


def load_gemma_scope_2_multi(
    folder: str | Path,
    *,
    input_kind: str | None = None,
    output_kind: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    origin: str | None = None,
) -> CrossLayerTranscoder:
    """Load a Gemma Scope 2 cross-layer transcoder or crosscoder folder (``config.json`` +
    ``params_layer_{k}.safetensors``; layout, formula and sources in :mod:`saes.clt`).

    The layers and the site kinds come from the config's ``hf_hook_point_in``/``hf_hook_point_out``
    (``model.layers.{all}.pre_feedforward_layernorm.output`` -> every layer's ``ln2``), else from the
    folder name (``clt/...``: ``ln2`` -> ``mlp_out`` of layers ``0 .. n-1``, ``n`` the number of files;
    ``crosscoder/layer_5_9_12_15_...``: ``resid_post`` of those layers); ``input_kind``/``output_kind``
    override the kinds (e.g. ``"ln2_normalized"``). Each file's ``w_dec [d_sae, n, d_out]`` keeps the
    slots of its layer and later ones; slots before it that are not all zero are dropped with a warning
    naming the file (circuit-tracer's reading). ``dtype`` casts file by file (a 1B CLT is ~30 GB in float32).

    Raises:
        SAEFileError: a malformed file or config (names the file, the key, the shapes or value), files
            that do not number ``0 .. n-1``, a config that disagrees with the files or the folder name.
        FileNotFoundError: a folder without ``params_layer_*.safetensors`` files.
    """
    folder = Path(folder)
    _refuse_special(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such Gemma Scope 2 multi-layer folder: {folder}")
    files: dict[int, Path] = {}
    for p in folder.iterdir():
        k = layer_params_index(p.name)
        if k is not None:
            _refuse_special(p)
            files[k] = p
    if not files:
        raise FileNotFoundError(f"{folder}: no params_layer_{{k}}.safetensors files (a Gemma Scope 2 CLT or "
                                "crosscoder folder holds one per layer, and config.json)")
    n = max(files) + 1
    gaps = [k for k in range(n) if k not in files]
    if gaps:
        raise SAEFileError(f"{folder}: missing {layer_params_name(gaps[0])} (files must number 0 .. {n - 1}; "
                           f"missing k = {gaps})")
    cfg_path = folder / GS2_CONFIG
    _refuse_special(cfg_path)
    cfg = _read_cfg(cfg_path) if cfg_path.is_file() else {}
    name = parse_multi_layer_folder(origin or "") or parse_multi_layer_folder(str(folder.resolve()))
    arch = _cfg_value(cfg, "architecture", "str", cfg_path)
    if arch is not None and arch.lower() not in ("jump_relu", "jumprelu"):
        raise SAEFileError(f"{cfg_path}: key 'architecture' is {arch!r}; Gemma Scope 2 models are 'jump_relu'")
    kind = _cfg_value(cfg, "type", "str", cfg_path)
    if kind is not None and kind not in _MULTI_KINDS:
        raise SAEFileError(f"{cfg_path}: key 'type' is {kind!r}; a multi-layer folder is 'clt' or 'crosscoder'")
    kind = kind or (name.kind if name is not None else "clt")
    kinds = list(_MULTI_KINDS[kind])
    layers: tuple[int, ...] | None = name.layers if name is not None else None
    for i, key in enumerate(("hf_hook_point_in", "hf_hook_point_out")):
        hook = _cfg_value(cfg, key, "str", cfg_path)
        if hook is None:
            continue
        hook_layers, kinds[i] = _multi_hook(hook, key, cfg_path)
        if hook_layers is not None and layers is not None and hook_layers != layers:
            raise SAEFileError(f"{cfg_path}: key {key!r} names layers {list(hook_layers)} but the folder name "
                               f"names {list(layers)}")
        layers = hook_layers if hook_layers is not None else layers
    layers = layers if layers is not None else tuple(range(n))
    if len(layers) != n:
        raise SAEFileError(f"{folder}: {n} params_layer files for {len(layers)} layers {list(layers)} "
                           "(one file per layer)")
    affine = _cfg_value(cfg, "affine_connection", "bool", cfg_path)
    tensors: list[dict[str, torch.Tensor]] = []
    dims: tuple[int, int, int] | None = None
    dropped: list[str] = []
    for k in range(n):
        path = files[k]
        raw = _read_safetensors(path)
        missing = [key for key in _MULTI_KEYS if key not in raw]
        if missing:
            raise SAEFileError(f"{path}: missing key(s) {missing}; found keys {sorted(raw)}; expected "
                               f"{list(_MULTI_KEYS)} (+ {GS2_SKIP_KEY!r} for affine CLTs)")
        has_skip = GS2_SKIP_KEY in raw
        if affine is not None and affine != has_skip:
            raise SAEFileError(f"{cfg_path}: key 'affine_connection' is {json.dumps(affine)} but {path.name} "
                               f"{'has' if has_skip else 'lacks'} key {GS2_SKIP_KEY!r}")
        if k > 0 and has_skip != (GS2_SKIP_KEY in tensors[0]):
            raise SAEFileError(f"{path}: {'has' if has_skip else 'lacks'} key {GS2_SKIP_KEY!r} unlike "
                               f"{files[0].name}")
        for key, t in raw.items():
            if key in _MULTI_KEYS or key == GS2_SKIP_KEY:
                if not t.is_floating_point():
                    raise SAEFileError(f"{path}: key {key!r} has dtype {t.dtype}, expected a floating-point array")
        w_enc, w_dec = raw["w_enc"], raw["w_dec"]
        if w_enc.dim() != 2:
            raise SAEFileError(f"{path}: key 'w_enc' has shape {tuple(w_enc.shape)}, expected [d_in, d_sae]")
        d_in, d_sae = (int(v) for v in w_enc.shape)
        if w_dec.dim() != 3 or w_dec.shape[0] != d_sae or w_dec.shape[1] != n:
            raise SAEFileError(f"{path}: key 'w_dec' has shape {tuple(w_dec.shape)}, expected [d_sae, n_layers, "
                               f"d_out] = [{d_sae}, {n}, d_out] (from w_enc {tuple(w_enc.shape)} and {n} layer files)")
        d_out = int(w_dec.shape[2])
        if dims is not None and (d_in, d_sae, d_out) != dims:
            raise SAEFileError(f"{path}: (d_in, d_sae, d_out) = {(d_in, d_sae, d_out)} from keys 'w_enc', 'w_dec' "
                               f"differ from {files[0].name}'s {dims}")
        dims = (d_in, d_sae, d_out)
        expected = {"b_enc": (d_sae,), "threshold": (d_sae,), "b_dec": (d_out,), GS2_SKIP_KEY: (d_in, d_out)}
        for key, shape in expected.items():
            if key in raw and tuple(raw[key].shape) != shape:
                raise SAEFileError(f"{path}: key {key!r} has shape {tuple(raw[key].shape)}, expected {list(shape)} "
                                   f"(d_in={d_in}, d_sae={d_sae}, d_out={d_out} from w_enc, w_dec)")
        for key in (*_MULTI_KEYS, GS2_SKIP_KEY):
            if key in raw and not bool(torch.isfinite(raw[key]).all()):
                raise SAEFileError(f"{path}: key {key!r} (shape {tuple(raw[key].shape)}) has non-finite values")
        if k > 0 and bool((w_dec[:, :k] != 0).any()):
            dropped.append(path.name)
        cast = dtype or w_enc.dtype
        layer = {
            "W_enc": w_enc, "b_enc": raw["b_enc"], "threshold": raw["threshold"], "b_dec": raw["b_dec"],
            "W_dec": w_dec[:, k:].permute(1, 0, 2),
        }  # fmt: skip
        if has_skip:
            layer[GS2_SKIP_KEY] = raw[GS2_SKIP_KEY]
        tensors.append({key: t.to(cast).contiguous() for key, t in layer.items()})
        del raw
    assert dims is not None
    d_in, d_sae, d_out = dims
    width = cfg.get("width")
    if isinstance(width, int) and not isinstance(width, bool) and width not in (n * d_sae, d_sae):
        raise SAEFileError(f"{cfg_path}: key 'width' is {width} but the files hold {n} x {d_sae} = {n * d_sae} "
                           "features")
    if dropped:
        warnings.warn(
            f"{folder}: w_dec slots before their own layer are not all zero in {dropped}; they are dropped "
            "(a feature writes only to its layer and later ones, as circuit-tracer reads these files)",
            stacklevel=2,
        )
    skip = GS2_SKIP_KEY in tensors[0]
    clt = CrossLayerTranscoder(layers, d_in, d_sae, d_out=d_out, input_kind=input_kind or kinds[0],
                               output_kind=output_kind or kinds[1], skip=skip, device="meta")
    stacked = {key: torch.stack([t[key] for t in tensors]) for key in ("W_enc", "b_enc", "threshold", "b_dec")}
    for key, t in stacked.items():
        setattr(clt, key, nn.Parameter(t, requires_grad=False))
    if skip:
        clt.W_skip = nn.Parameter(torch.stack([t[GS2_SKIP_KEY] for t in tensors]), requires_grad=False)
    clt.W_dec = nn.ParameterList([nn.Parameter(t["W_dec"], requires_grad=False) for t in tensors])
    clt.metadata.update({"format": "gemma_scope_2", "type": kind, "path": str(folder)})
    for key in ("hf_hook_point_in", "hf_hook_point_out", "model_name", "width", "l0"):
        if cfg.get(key) is not None:
            clt.metadata[key] = cfg[key]
    if origin:
        clt.metadata["hub_ref"] = origin
    if device is not None:
        clt.to(device=device)
    return clt.eval()


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
) -> SAE | CrossLayerTranscoder:
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
        the inferred or given site, ``sae.metadata`` the source. A Gemma Scope 2 ``clt/...`` or
        ``crosscoder/...`` folder (local, or ``google/gemma-scope-2-{270m,1b}-{pt,it}/clt/<folder>``)
        gives a :class:`saes.clt.CrossLayerTranscoder` (:func:`load_gemma_scope_2_multi`; ``site`` /
        ``output_site`` are then site *kinds* such as ``"ln2_normalized"``).

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
    origin = f"{hub.repo_id}/{hub.path}"
    if hub.kind == "gemma_scope_2_multi":
        return _load_multi_from_hub(hub, text, origin, kw)
    paths = [fetch(hub.repo_id, f, text) for f in hub.files]
    if hub.kind == "npz":
        return load_npz(paths[0], origin=origin, **kw)
    folder = paths[0].parent
    if paths[1].parent != folder:  # cache layouts always co-locate; be safe anyway
        raise SAEFetchError(f"{text}: {paths[0].name} and {paths[1].name} were fetched to different folders")
    if hub.kind == "gemma_scope_2":
        return load_gemma_scope_2(folder, origin=origin, **kw)
    return load_saelens(folder, origin=origin, **kw)


def _multi_kw(kw: Mapping[str, Any]) -> dict[str, Any]:
    """``load``'s keywords for :func:`load_gemma_scope_2_multi` (``site``/``output_site`` are site kinds there).

    Raises:
        ValueError: a ``site``/``output_site`` naming a layer (a multi-layer model reads a kind at every layer).
    """
    for key in ("site", "output_site"):
        if kw.get(key) is not None and layer_of(kw[key]) is not None:
            raise ValueError(f"{key}={kw[key]!r}: a cross-layer transcoder reads and writes a site kind at every "
                             "layer; pass the kind (e.g. 'ln2_normalized'), not one layer's site")
    return {"input_kind": kw.get("site"), "output_kind": kw.get("output_site"), "device": kw.get("device"),
            "dtype": kw.get("dtype")}


def _load_multi_from_hub(hub: HubRef, text: str, origin: str, kw: Mapping[str, Any]) -> CrossLayerTranscoder:
    """Fetch a multi-layer folder's files (the config is optional) and load them; a missing file raises
    :class:`SAEFetchError` naming it and the folder to download."""
    paths = []
    for f in hub.files:
        try:
            paths.append(fetch(hub.repo_id, f, text))
        except SAEFetchError as e:
            if f.endswith(GS2_CONFIG):
                continue  # the config only confirms what the folder name and files say
            raise SAEFetchError(
                f"{e} A Gemma Scope 2 multi-layer model needs its whole folder ({len(hub.files) - 1} "
                f"params_layer_{{k}}.safetensors files and {GS2_CONFIG}): "
                f"`hf download {hub.repo_id} --include '{hub.path}/*'`."
            ) from None
    folders = {p.parent for p in paths}
    if len(folders) != 1:  # cache layouts always co-locate; be safe anyway
        raise SAEFetchError(f"{text}: the files of {hub.path} were fetched to different folders {sorted(folders)}")
    return load_gemma_scope_2_multi(folders.pop(), origin=origin, **_multi_kw(kw))


def _load_local(path: Path, **kw: Any) -> SAE | CrossLayerTranscoder:
    """Load from an existing local file or folder. FIFOs and devices (the path itself, or an SAE file
    the folder names) are refused from ``stat`` before anything opens them."""
    _refuse_special(path)
    if path.is_dir():
        for name in (SAELENS_CFG, SAELENS_WEIGHTS, "params.npz", GS2_CONFIG, GS2_PARAMS):
            _refuse_special(path / name)
    if path.is_file():
        if path.name in (SAELENS_CFG, SAELENS_WEIGHTS):
            return load_saelens(path.parent, **kw)
        if layer_params_index(path.name) is not None:
            return load_gemma_scope_2_multi(path.parent, **_multi_kw(kw))
        if path.name in (GS2_CONFIG, GS2_PARAMS):
            if path.name == GS2_CONFIG and any(path.parent.glob("params_layer_*.safetensors")):
                return load_gemma_scope_2_multi(path.parent, **_multi_kw(kw))
            return load_gemma_scope_2(path.parent, **kw)
        if path.suffix == ".npz":
            return load_npz(path, **kw)
        raise SAEFileError(
            f"{path}: unknown SAE file type (expected a Gemma Scope .npz, or a SAELens {SAELENS_CFG} / "
            f"{SAELENS_WEIGHTS})"
        )
    if (path / SAELENS_CFG).is_file() or (path / SAELENS_WEIGHTS).is_file():
        return load_saelens(path, **kw)
    if any(layer_params_index(p.name) is not None for p in path.iterdir()) and not (path / GS2_PARAMS).is_file():
        return load_gemma_scope_2_multi(path, **_multi_kw(kw))
    if (path / GS2_PARAMS).is_file() or (path / GS2_CONFIG).is_file() and not (path / "params.npz").is_file():
        return load_gemma_scope_2(path, **kw)
    if (path / "params.npz").is_file():
        return load_npz(path / "params.npz", **kw)
    npzs = sorted(path.glob("*.npz"))
    for npz in npzs:
        _refuse_special(npz)
    if len(npzs) == 1:
        return load_npz(npzs[0], **kw)
    listing = sorted(p.name for p in path.iterdir())[:20]
    raise SAEFileError(
        f"{path}: folder holds neither a SAELens pair ({SAELENS_CFG} + {SAELENS_WEIGHTS}), a Gemma Scope 2 "
        f"pair ({GS2_CONFIG} + {GS2_PARAMS}) nor a params.npz; it contains {listing}"
    )
