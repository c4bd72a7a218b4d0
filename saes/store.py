"""Activations of one site on disk: collecting them from a model, reading them back in batches.

:func:`collect_activations` runs an :class:`~mishax_py.InstrumentedModel` over batches of
token ids (``im.run_with_cache(ids, sites=[site])``) and writes the site's values,
flattened to ``[tokens, d_in]`` (``attn.z`` head-major), into an :class:`ActivationStore`:
a folder of safetensors shards (``shard_00000.safetensors`` ...) plus ``meta.json``. A
shard is written atomically and ``meta.json`` records how many input batches it covers,
so an interrupted collection resumes where the last shard ended (the batch iterable must
yield the same batches in the same order). :func:`saes.train.train_sae` trains on a store.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saes.files import write_json_atomic, write_safetensors_atomic

if TYPE_CHECKING:
    from mishax_py import InstrumentedModel

__all__ = ["ActivationStore", "collect_activations"]

_META = "meta.json"


class ActivationStore:
    """Activations of one site on disk: safetensors shards ``[rows, d_in]`` plus ``meta.json``.

    Args:
        path: the store's folder (created by :func:`collect_activations`).

    Attributes:
        site, d_in, dtype, n_rows, shards (file names), complete (collection finished).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / _META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path} is not an activation store (no {_META})")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: invalid JSON: {e}") from None

    @property
    def site(self) -> str:
        return str(self.meta["site"])

    @property
    def d_in(self) -> int:
        return int(self.meta["d_in"])

    @property
    def n_rows(self) -> int:
        return sum(int(s["rows"]) for s in self.meta["shards"])

    @property
    def shards(self) -> list[str]:
        return [str(s["file"]) for s in self.meta["shards"]]

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete", False))

    def load_shard(self, i: int) -> torch.Tensor:
        """Shard ``i`` as ``[rows, d_in]``."""
        from safetensors.torch import load_file

        return load_file(str(self.path / self.shards[i]))["activations"]

    def load_all(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """All activations ``[n_rows, d_in]`` in memory."""
        parts = [self.load_shard(i) for i in range(len(self.shards))]
        if not parts:
            return torch.empty(0, self.d_in, dtype=dtype or torch.float32)
        out = torch.cat(parts)
        return out if dtype is None else out.to(dtype)

    def iter_batches(
        self, batch_size: int, *, shuffle: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> Iterator[torch.Tensor]:
        """Batches ``[batch_size, d_in]`` over one pass (shards in random order, rows shuffled per shard)."""
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=g).tolist() if shuffle else range(len(self.shards))
        carry: torch.Tensor | None = None
        for i in order:
            shard = self.load_shard(i).to(dtype)
            if shuffle:
                shard = shard[torch.randperm(shard.shape[0], generator=g)]
            if carry is not None:
                shard = torch.cat([carry, shard])
            n_full = shard.shape[0] // batch_size * batch_size
            for j in range(0, n_full, batch_size):
                yield shard[j : j + batch_size]
            carry = shard[n_full:] if n_full < shard.shape[0] else None
        if carry is not None and carry.shape[0]:
            yield carry

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, site={self.site!r}, rows={self.n_rows}, d_in={self.d_in}, "
            f"shards={len(self.shards)}, complete={self.complete})"
        )


def _flatten_site_value(value: torch.Tensor) -> torch.Tensor:
    """``[batch, pos, d]`` or ``[batch, pos, head, d_head]`` -> ``[batch, pos, d_in]``."""
    if value.dim() == 4:
        return value.reshape(value.shape[0], value.shape[1], -1)
    if value.dim() != 3:
        raise ValueError(f"expected a [batch, pos, ...] site value, got shape {tuple(value.shape)}")
    return value


def collect_activations(
    im: InstrumentedModel,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    site: str,
    path: str | Path,
    *,
    shard_rows: int = 65536,
    dtype: torch.dtype = torch.float32,
    drop_bos: bool = True,
    total: int | None = None,
    progress: bool = True,
) -> ActivationStore:
    """Record ``site`` over ``batches`` into a sharded, resumable :class:`ActivationStore` at ``path``.

    Args:
        im: the instrumented model.
        batches: token ids ``[batch, pos]``, or dicts with ``input_ids`` and optionally
            ``attention_mask`` (masked positions are skipped). Must be deterministic for resuming.
        site: canonical site (or alias); per-head sites are flattened head-major.
        path: the store's folder; an existing store for the same site is resumed.
        shard_rows: rows per shard (a shard is written once this many rows are buffered).
        dtype: storage dtype.
        drop_bos: skip position 0 (Gemma's BOS token has outlier norms).
        total: number of batches, for the progress bar.
        progress: show a tqdm progress bar.

    Returns:
        The store (``complete=True``).
    """
    from tqdm.auto import tqdm

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (canonical,) = im.resolve(site)
    meta_path = path / _META
    if meta_path.is_file():
        meta = ActivationStore(path).meta
        if meta.get("site") != canonical:
            raise ValueError(f"{path} holds activations of {meta.get('site')!r}, not {canonical!r}")
    else:
        meta = {"site": canonical, "d_in": None, "dtype": str(dtype).removeprefix("torch."), "shards": [],
                "batches_done": 0, "complete": False, "drop_bos": drop_bos}  # fmt: skip
    skip = int(meta["batches_done"])
    buffer: list[torch.Tensor] = []
    buffered = 0
    done = skip

    def flush() -> None:
        nonlocal buffer, buffered
        if not buffered:
            return
        rows = torch.cat(buffer).to(dtype).contiguous()
        name = f"shard_{len(meta['shards']):05d}.safetensors"
        write_safetensors_atomic({"activations": rows}, path / name)
        meta["shards"].append({"file": name, "rows": int(rows.shape[0])})
        meta["batches_done"] = done
        meta["d_in"] = int(rows.shape[1])
        write_json_atomic(meta_path, meta)
        buffer, buffered = [], 0

    bar = tqdm(total=total, initial=skip, desc=f"collect {canonical}", unit="batch", disable=not progress)
    try:
        for i, item in enumerate(batches):
            if i < skip:
                continue
            if isinstance(item, Mapping):
                ids, mask = item["input_ids"], item.get("attention_mask")
            else:
                ids, mask = item, None
            with torch.no_grad():
                if mask is None:
                    _, cache = im.run_with_cache(ids, sites=[canonical])
                else:
                    _, cache = im.run_with_cache(ids, sites=[canonical], attention_mask=mask)
            value = _flatten_site_value(cache[canonical])
            keep = torch.ones(value.shape[:2], dtype=torch.bool, device=value.device)
            if mask is not None:
                keep &= mask.to(device=value.device).bool()
            if drop_bos:
                keep[:, 0] = False
            rows = value[keep].detach().to("cpu")
            buffer.append(rows)
            buffered += rows.shape[0]
            done = i + 1
            if buffered >= shard_rows:
                flush()
            bar.update(1)
        flush()
        meta["batches_done"] = done
        meta["complete"] = True
        write_json_atomic(meta_path, meta)
    finally:
        bar.close()
    return ActivationStore(path)
