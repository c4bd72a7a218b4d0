"""Training checkpoints on disk: atomic, pickle-free folders of safetensors and JSON.

A checkpoint folder (``TrainConfig.checkpoint_dir``) holds one sub-folder per checkpoint,
``step_00001000/`` (the number of optimiser steps taken), each with

* ``tensors.safetensors``: every tensor of the state (parameters, the optimiser's per-parameter
  state, RNG states as byte tensors);
* ``state.json``: everything else (step, config, data fingerprint and position, scales,
  optimiser hyper-parameters, Python's and NumPy's RNG states, history).

Nothing is pickled (``torch.save`` of an optimiser state would be), so a checkpoint from
elsewhere can be inspected and loaded without running code. A checkpoint is written into
``step_XXXXXXXX.tmp-<pid>/``, flushed to disk (``fsync``), then renamed into place: the rename
is atomic, so a run killed at any moment (SIGKILL included) leaves either the previous
checkpoint or the new one, never a half-written one. Older checkpoints and stale temporary
folders are removed after a new one is in place. :func:`saes.train.train_sae` writes and
resumes them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "latest_checkpoint",
    "load_optimizer_state",
    "optimizer_state",
    "restore_rng_states",
    "rng_states",
    "tensor_fingerprint",
    "write_checkpoint",
]

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TENSORS = "tensors.safetensors"
_STATE = "state.json"
_FORMAT = "mishax-py train_sae checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, or made with another config or other data
    (the message names the folder, the key and both values)."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(folder: Path, step: int, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> Path:
    """Write checkpoint ``step`` (``tensors`` to safetensors, ``state`` to JSON) into ``folder`` atomically.

    Returns the new ``step_XXXXXXXX`` folder; older checkpoints are removed once it is in place. One
    run per folder: a concurrent run's temporary folder would be removed as stale.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}"
    if final.exists():  # written before by a run with the same config and data: the same state
        return final
    tmp = folder / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, str(tmp / _TENSORS))
    (tmp / _STATE).write_text(json.dumps({"format": _FORMAT, "version": 1, **state}, indent=1) + "\n",
                              encoding="utf-8")  # fmt: skip
    for name in (_TENSORS, _STATE):
        _fsync(tmp / name)
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(folder)
    for old in folder.iterdir():
        match = _STEP_DIR.match(old.name)
        if old != final and (".tmp-" in old.name or (match and int(match.group(1)) < step)):
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest complete checkpoint in ``folder`` as ``(its folder, tensors, state)``, or ``None``.

    Temporary folders of a write that was killed are ignored (and removed).

    Raises:
        CheckpointError: naming the file when the newest checkpoint cannot be read.
    """
    from safetensors.torch import load_file

    if not folder.is_dir():
        return None
    steps = []
    for sub in folder.iterdir():
        if ".tmp-" in sub.name:
            shutil.rmtree(sub, ignore_errors=True)
        elif (match := _STEP_DIR.match(sub.name)) is not None:
            steps.append((int(match.group(1)), sub))
    if not steps:
        return None
    _, newest = max(steps)
    try:
        state = json.loads((newest / _STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{newest / _STATE}: cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{newest / _STATE}: not a {_FORMAT} (format {state.get('format')!r})")
    try:
        tensors = load_file(str(newest / _TENSORS))
    except Exception as e:  # SafetensorError, OSError
        raise CheckpointError(f"{newest / _TENSORS}: cannot be read: {type(e).__name__}: {e}") from None
    return newest, tensors, state


# ------------------------------------------------------------------ optimiser state
def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's state split into tensors (``optimizer.{param index}.{name}``) and JSON (the
    param groups' hyper-parameters, non-tensor per-parameter entries)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(
    opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], saved: Mapping[str, Any]
) -> None:
    """Load what :func:`optimizer_state` wrote into ``opt`` (built with the same parameters)."""
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = t
    for idx, entries in saved.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entries)
    current = opt.state_dict()["param_groups"]
    groups = []
    for now, was in zip(current, saved["param_groups"], strict=True):
        groups.append({k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in was.items()})
    opt.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------ RNG states
def rng_states(devices: tuple[torch.device, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global RNG states: torch's CPU generator (and the CUDA generators of ``devices``) as tensors,
    Python's :mod:`random` and NumPy's legacy global generator as JSON."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    for device in devices:
        if device.type == "cuda":
            tensors[f"rng.cuda.{device.index or 0}"] = torch.cuda.get_rng_state(device)
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    json_state = {
        "python_random": [version, list(internal), gauss],
        "numpy_random": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos),
                         "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},  # fmt: skip
    }
    return tensors, json_state


def restore_rng_states(tensors: Mapping[str, torch.Tensor], saved: Mapping[str, Any]) -> None:
    """Set the global RNGs to what :func:`rng_states` recorded."""
    torch.set_rng_state(tensors["rng.torch_cpu"])
    for key, t in tensors.items():
        if key.startswith("rng.cuda.") and torch.cuda.is_available():
            torch.cuda.set_rng_state(t, int(key.rsplit(".", 1)[1]))
    version, internal, gauss = saved["python_random"]
    random.setstate((version, tuple(internal), gauss))
    npr = saved["numpy_random"]
    np.random.set_state((npr["kind"], np.array(npr["keys"], dtype=np.uint32), npr["pos"], npr["has_gauss"],
                         npr["cached_gaussian"]))  # fmt: skip


# ----------------------------------------------------------------------- data identity
def tensor_fingerprint(t: torch.Tensor, rows: int = 1024) -> str:
    """Shape, dtype and a SHA-256 (first 16 hex digits) of ``rows`` evenly spaced rows of ``t``: data that
    differs anywhere in those rows, or in shape or dtype, gets another fingerprint (cheap for any size)."""
    import hashlib

    h = hashlib.sha256()
    flat = t.detach().reshape(t.shape[0], -1) if t.dim() else t.detach().reshape(1, 1)
    idx = torch.linspace(0, flat.shape[0] - 1, min(rows, flat.shape[0])).round().long() if flat.shape[0] else None
    sample = flat[idx] if idx is not None else flat
    h.update(sample.to("cpu", torch.float64).contiguous().numpy().tobytes())
    return f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')} sha256:{h.hexdigest()[:16]}"
