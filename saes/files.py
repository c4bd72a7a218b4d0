"""Writing SAE files atomically, and the file names of a SAELens folder.

A SAELens folder holds :data:`SAELENS_CFG` (JSON config) and :data:`SAELENS_WEIGHTS`
(safetensors). Every file this package writes (SAE folders by :meth:`saes.SAE.save`,
activation-store shards and ``meta.json`` by :func:`saes.store.collect_activations`) goes
through a temporary file in the same folder and ``os.replace``, so a reader never sees a
half-written file and an interrupted write leaves the previous one in place.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["SAELENS_CFG", "SAELENS_WEIGHTS", "write_json_atomic", "write_safetensors_atomic"]

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"


def write_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` (contiguous CPU tensors) to the safetensors file ``path`` atomically."""
    from safetensors.torch import save_file

    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        save_file(dict(tensors), str(tmp_path))
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Mapping[str, Any], *, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON (plus a final newline) to ``path`` atomically (via ``path.tmp``)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")
    os.replace(tmp, path)
