"""Activations of one site on disk: collecting them from a model, reading them back in batches.

:func:`collect_activations` runs an :class:`~mishax_py.InstrumentedModel` over batches of
token ids (``im.run_with_cache(ids, sites=[site])``) and writes the site's values,
flattened to ``[tokens, d_in]`` (``attn.z`` head-major), into an :class:`ActivationStore`:
a folder of safetensors shards (``shard_00000.safetensors`` ...) plus ``meta.json``. A
shard is written atomically and ``meta.json`` records how many input batches it covers,
so an interrupted collection (even one killed with SIGKILL) resumes where the last listed
shard ended: nothing is lost or stored twice.

A store is resumed only with the settings it was made with. ``meta.json`` records every
setting that changes what is stored: the ``site``, the storage ``dtype``, ``drop_bos``, the
``model`` (class, ``name_or_path`` and a SHA-256 of a strided sample of every parameter) and
the ``batches`` (a SHA-256 of the token ids and masks of the batches it covers). A call that
differs in any of them raises :class:`StoreError` naming the setting and both values before
anything is written. :func:`saes.train.train_sae` trains on a store.

Across processes (``parallel="data"``, torch.distributed's default group of ``n`` > 1 ranks), rank
``r`` collects its contiguous block of the batches (:func:`saes.parallel.block`: batches
``[T r / n, T (r+1) / n)`` of ``T``, the ``total`` passed or ``len(batches)``) into its own store
``path/rank{r}-of-{n}/``, resumable as above; rank 0 writes ``path/meta.json`` with ``"layout":
"ranks"``, the world size, the parts, ``T`` and the settings. ``ActivationStore(path)`` reads the
union: the parts' shards in rank order, so its rows are exactly those of a single-process
collection of the same batches, in the same order (``ActivationStore(path / "rank1-of-2")`` reads
one part). A killed rank is restarted with the others and resumes its own part; nothing is lost or
stored twice. Resuming with another world size or another ``T`` (the blocks would move), or mixing a
single-process store and a multi-rank one, raises :class:`StoreError` naming both values. Every rank
iterates over ``batches`` (skipping the other blocks) and waits for the others at the end.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saes.files import write_json_atomic, write_safetensors_atomic
from saes.parallel import barrier, block, rank_world

if TYPE_CHECKING:
    from torch import nn

    from mishax_py import InstrumentedModel

__all__ = ["ActivationStore", "StoreError", "collect_activations", "model_identity"]

_META = "meta.json"
_SETTINGS = ("site", "dtype", "drop_bos", "model", "batches_sha256")  # what meta.json must record to be resumed


class StoreError(ValueError):
    """An activation store that cannot be read, or resumed as asked (names the folder or shard file, the
    setting and both values)."""


class ActivationStore:
    """Activations of one site on disk: safetensors shards ``[rows, d_in]`` plus ``meta.json``.

    Args:
        path: the store's folder (created by :func:`collect_activations`).

    Attributes:
        site, d_in, dtype, drop_bos, n_rows, shards (file names), complete (collection finished),
        meta (``meta.json``: also the ``model`` and ``batches_sha256`` a resumed collection must match).

    Reading a shard that is missing, truncated or of another shape than ``meta.json`` lists raises
    :class:`StoreError` naming the shard file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / _META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path} is not an activation store (no {_META})")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise StoreError(f"{meta_path}: invalid JSON: {e}") from None
        if isinstance(self.meta, dict) and self.meta.get("layout") == "ranks":
            self.meta = self._union(self.meta)
        if not isinstance(self.meta, dict) or not isinstance(self.meta.get("shards"), list):
            raise StoreError(f"{meta_path}: not an activation store's meta.json (no 'shards' list)")

    def _union(self, top: dict[str, Any]) -> dict[str, Any]:
        """A multi-rank store's ``meta.json`` (``top``) with its parts' shards (``part/shard_...``, rank order),
        ``complete`` when every part is, and the parts' batch hashes combined."""
        shards: list[dict[str, Any]] = []
        complete, d_in, done = True, None, 0
        hashes: list[str | None] = []
        for part in top.get("parts", []):
            meta_path = self.path / part / _META
            if not meta_path.is_file():  # this rank has written no shard yet
                complete = False
                hashes.append(None)
                continue
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise StoreError(f"{meta_path}: invalid JSON: {e}") from None
            shards += [{"file": f"{part}/{s['file']}", "rows": int(s["rows"])} for s in meta.get("shards", [])]
            complete = complete and bool(meta.get("complete", False))
            d_in = d_in if d_in is not None else meta.get("d_in")
            done += int(meta.get("batches_done", 0))
            hashes.append(meta.get("batches_sha256"))
        combined = hashlib.sha256(json.dumps(hashes).encode()).hexdigest()
        return {**top, "shards": shards, "complete": complete, "d_in": d_in, "batches_done": done,
                "batches_sha256": combined}  # fmt: skip

    @property
    def site(self) -> str:
        return str(self.meta["site"])

    @property
    def d_in(self) -> int:
        return int(self.meta["d_in"])

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype (shards hold this dtype)."""
        dtype = getattr(torch, str(self.meta["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise StoreError(f"{self.path / _META}: unknown dtype {self.meta['dtype']!r}")
        return dtype

    @property
    def drop_bos(self) -> bool:
        """Whether position 0 of every sequence was left out."""
        return bool(self.meta.get("drop_bos", False))

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
        """Shard ``i`` as ``[rows, d_in]``.

        Raises:
            StoreError: naming the shard file when it is missing, truncated or corrupt, or holds
            another shape than ``meta.json`` lists.
        """
        from safetensors.torch import load_file

        file = self.path / self.shards[i]
        if not file.is_file():
            raise StoreError(f"{file}: shard {i} of the activation store {self.path} is missing")
        try:
            rows = load_file(str(file))["activations"]
        except Exception as e:  # SafetensorError, a missing key, header parse errors
            raise StoreError(
                f"{file}: shard {i} of the activation store {self.path} cannot be read (truncated or corrupt?): "
                f"{type(e).__name__}: {e}"
            ) from None
        want = [int(self.meta["shards"][i]["rows"]), self.d_in]
        if list(rows.shape) != want:
            raise StoreError(f"{file}: holds {list(rows.shape)}, meta.json says {want}")
        return rows

    def load_all(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """All activations ``[n_rows, d_in]`` in memory."""
        parts = [self.load_shard(i) for i in range(len(self.shards))]
        if not parts:
            return torch.empty(0, self.d_in, dtype=dtype or torch.float32)
        out = torch.cat(parts)
        return out if dtype is None else out.to(dtype)

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        start: int = 0,
    ) -> Iterator[torch.Tensor]:
        """Batches ``[batch_size, d_in]`` over one pass (shards in random order, rows shuffled per shard).

        The pass is the shuffled shards concatenated and cut every ``batch_size`` rows (the last
        batch may be shorter). ``start`` skips its first ``start`` batches without reading the
        shards that lie wholly inside them (how :func:`saes.train.train_sae` resumes mid-pass).
        """
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=g).tolist() if shuffle else range(len(self.shards))
        carry: torch.Tensor | None = None
        to_skip = start * batch_size  # rows of the pass still to skip
        for i in order:
            n = int(self.meta["shards"][i]["rows"])
            if to_skip >= n:  # wholly skipped: draw its permutation (the generator moves on) but read nothing
                if shuffle:
                    torch.randperm(n, generator=g)
                to_skip -= n
                continue
            shard = self.load_shard(i).to(dtype)
            if shuffle:
                shard = shard[torch.randperm(shard.shape[0], generator=g)]
            if to_skip:
                shard, to_skip = shard[to_skip:], 0
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


def model_identity(model: nn.Module) -> dict[str, str]:
    """What identifies a model's activations: its class, ``config.name_or_path`` (``""`` when none) and a
    SHA-256 (hex) over every parameter's name, shape, dtype and 4,096 evenly strided values.

    Two checkpoints of one architecture (another seed, a fine-tune) differ in the hash; the same
    weights loaded twice (another process, another device) agree. Cheap: a few thousand values
    per tensor. Parameters on the ``meta`` device (offloaded) add only their name, shape and dtype.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        if p.device.type == "meta":  # offloaded weights: their names, shapes and dtypes only
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.float64).contiguous()
        h.update(sample.numpy().tobytes())
    config = getattr(model, "config", None)
    name_or_path = getattr(config, "name_or_path", "") or ""
    return {"class": type(model).__name__, "name_or_path": str(name_or_path), "weights_sha256": h.hexdigest()}


def _describe_model(ident: Mapping[str, str]) -> str:
    name = f" {ident.get('name_or_path')!r}" if ident.get("name_or_path") else ""
    return f"{ident.get('class')}{name} (weights sha256 {str(ident.get('weights_sha256'))[:12]})"


def _hash_batch(h: Any, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Add one input batch (token ids and the attention mask, shapes and dtypes included) to ``h``."""
    for t in (ids, mask):
        if t is None:
            h.update(b"|none|")
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.numpy().tobytes())


def _check_settings(path: Path, meta: Mapping[str, Any], asked: Mapping[str, Any]) -> None:
    """Refuse to resume the store at ``path`` (its ``meta``) with other settings than ``asked``.

    Raises:
        StoreError: naming the setting the store lacks or that differs, with both values.
    """
    for key in _SETTINGS:
        if key not in meta:
            raise StoreError(
                f"{path / _META} does not record {key!r} (written by an older mishax-py?), so resuming cannot "
                "check that new activations match the stored ones; collect into a new folder"
            )
    if meta["site"] != asked["site"]:
        raise StoreError(
            f"{path}: cannot resume: setting 'site' differs: the store holds activations of {meta['site']!r}, "
            f"this call asks for {asked['site']!r}"
        )
    for key in ("dtype", "drop_bos"):
        if meta[key] != asked[key]:
            raise StoreError(
                f"{path}: cannot resume: setting {key!r} differs: the store has {meta[key]!r}, this call asks for "
                f"{asked[key]!r}"
            )
    if meta["model"] != asked["model"]:
        raise StoreError(
            f"{path}: cannot resume: setting 'model' differs: the store has {_describe_model(meta['model'])}, "
            f"this call's model is {_describe_model(asked['model'])}"
        )


def _part_name(rank: int, world: int) -> str:
    """The folder of rank ``rank``'s part of a store collected by ``world`` ranks."""
    return f"rank{rank}-of-{world}"


def _rank_block(path: Path, asked: Mapping[str, Any], batches: Iterable[Any], total: int | None, rank: int,
                world: int) -> range:  # fmt: skip
    """The batches rank ``rank`` of ``world`` collects into the multi-rank store at ``path``, after checking a
    store already there (rank 0 writes ``meta.json`` of a new one).

    Raises:
        StoreError: the store was collected by another number of ranks, over another number of batches, with
            other settings, or by one process.
        ValueError: the number of batches is unknown.
    """
    if total is None:
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError("collect_activations(parallel='data') splits the batches into one block per rank: "
                             "pass total= (the number of batches) or a sized sequence") from None
    top = path / _META
    if top.is_file():
        meta = ActivationStore(path).meta
        if meta.get("layout") != "ranks":
            raise StoreError(f"{path}: cannot resume: setting 'world_size' differs: the store was collected by one "
                             f"process, this run has {world} ranks; collect into a new folder")  # fmt: skip
        if meta.get("world_size") != world:
            raise StoreError(
                f"{path}: cannot resume: setting 'world_size' differs: the store was collected by "
                f"{meta.get('world_size')} ranks ({', '.join(meta.get('parts', []))}), this run has {world}; "
                f"resume with {meta.get('world_size')} ranks, or collect into a new folder"
            )
        if meta.get("batches") != total:
            raise StoreError(f"{path}: cannot resume: setting 'batches' differs: the store splits "
                             f"{meta.get('batches')} batches over its ranks, this call has {total}")  # fmt: skip
        _check_settings(path, {**meta, "batches_sha256": None}, asked)  # each part checks its own batches
    else:
        others = sorted(p.name for p in path.glob("rank*-of-*") if not p.name.endswith(f"-of-{world}"))
        if others:
            raise StoreError(f"{path}: cannot resume: setting 'world_size' differs: it holds parts {others} of "
                             f"another number of ranks, this run has {world}")  # fmt: skip
        if rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(top, {"layout": "ranks", "world_size": world, "batches": total,
                                    "parts": [_part_name(r, world) for r in range(world)], **asked})  # fmt: skip
    return block(total, rank, world)


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
    parallel: str | None = None,
) -> ActivationStore:
    """Record ``site`` over ``batches`` into a sharded, resumable :class:`ActivationStore` at ``path``.

    An existing store at ``path`` is resumed: the batches it already covers are skipped (their
    token ids hashed and compared with the store's record), and new shards are appended. It is
    resumed only with the same site, ``dtype``, ``drop_bos``, model weights and batches; any
    difference raises :class:`StoreError` naming the setting and both values, before anything is
    written (module docs). ``shard_rows`` may differ between runs (it changes only where shards
    end). Temporary files left by a killed write (``*.tmp``) are removed on resume.

    Args:
        im: the instrumented model.
        batches: token ids ``[batch, pos]``, or dicts with ``input_ids`` and optionally
            ``attention_mask`` (masked positions are skipped). Must be deterministic for resuming.
        site: canonical site (or alias); per-head sites are flattened head-major.
        path: the store's folder; an existing store is resumed.
        shard_rows: rows per shard (a shard is written once this many rows are buffered).
        dtype: storage dtype.
        drop_bos: skip position 0 (Gemma's BOS token has outlier norms).
        total: number of batches, for the progress bar (and, with ``parallel="data"``, to split them).
        progress: show a tqdm progress bar (rank 0's only, across processes).
        parallel: ``"data"``: split the batches over the ranks of torch.distributed's default group, each rank
            writing ``path/rank{r}-of-{n}/`` (module docs); without a process group (or with one rank) the
            plain call.

    Returns:
        The store (``complete=True``).

    Raises:
        StoreError: resuming with other settings (above; across processes also another world size or number
            of batches), or a ``meta.json`` that records none.
        ValueError: an unknown ``parallel``; ``parallel="data"`` over several ranks without ``total`` or a sized
            ``batches``.
    """
    from tqdm.auto import tqdm

    if parallel not in (None, "data"):
        raise ValueError(f"collect_activations' parallel must be None or 'data', got {parallel!r}")
    path = Path(path)
    (canonical,) = im.resolve(site)
    meta_path = path / _META
    asked = {"site": canonical, "dtype": str(dtype).removeprefix("torch."), "drop_bos": drop_bos,
             "model": model_identity(im.model)}  # fmt: skip
    rank, world = rank_world() if parallel == "data" else (0, 1)
    if world > 1:
        mine = _rank_block(path, asked, batches, total, rank, world)
        collect_activations(im, itertools.islice(batches, mine.start, mine.stop), canonical,
                            path / _part_name(rank, world), shard_rows=shard_rows, dtype=dtype, drop_bos=drop_bos,
                            total=len(mine), progress=progress and rank == 0)  # fmt: skip
        barrier()
        return ActivationStore(path)
    resuming = meta_path.is_file()
    if resuming:
        meta = ActivationStore(path).meta
        if meta.get("layout") == "ranks":
            raise StoreError(
                f"{path}: cannot resume: setting 'world_size' differs: the store was collected by "
                f"{meta.get('world_size')} ranks ({', '.join(meta.get('parts', []))}), this call runs in one "
                "process (parallel=None, or no process group); read it with ActivationStore(path)"
            )
        _check_settings(path, meta, asked)
    else:
        meta = {**asked, "d_in": None, "shards": [], "batches_done": 0, "batches_sha256": None, "complete": False}
    skip = int(meta["batches_done"])
    hasher = hashlib.sha256()
    buffer: list[torch.Tensor] = []
    buffered = 0
    done = 0

    def flush() -> None:
        nonlocal buffer, buffered
        if not buffered:
            return
        rows = torch.cat(buffer).to(dtype).contiguous()
        name = f"shard_{len(meta['shards']):05d}.safetensors"
        write_safetensors_atomic({"activations": rows}, path / name)
        meta["shards"].append({"file": name, "rows": int(rows.shape[0])})
        meta["batches_done"] = done
        meta["batches_sha256"] = hasher.hexdigest()
        meta["d_in"] = int(rows.shape[1])
        write_json_atomic(meta_path, meta)
        buffer, buffered = [], 0

    def check_skipped() -> None:
        """Once the store's batches have been skipped: were they the ones it was collected from?"""
        if done < skip:
            raise StoreError(
                f"{path}: cannot resume: the 'batches' differ: the store already holds {skip} batches, this call's "
                f"batches end after {done}"
            )
        if skip and hasher.hexdigest() != meta["batches_sha256"]:
            raise StoreError(
                f"{path}: cannot resume: the 'batches' differ: the first {skip} batches of this call (token ids and "
                "masks, hashed) are not the ones the store was collected from; pass the same batches in the same order"
            )

    bar = tqdm(total=total, initial=skip, desc=f"collect {canonical}", unit="batch", disable=not progress)
    try:
        for i, item in enumerate(batches):
            if isinstance(item, Mapping):
                ids, mask = item["input_ids"], item.get("attention_mask")
            else:
                ids, mask = item, None
            if i == skip:
                check_skipped()
                if resuming:
                    for stale in path.glob("*.tmp"):  # a write killed before its rename
                        stale.unlink(missing_ok=True)
            _hash_batch(hasher, ids, mask)
            if i < skip:
                done = i + 1
                continue
            with torch.no_grad():
                if mask is None:
                    _, cache = im.run_with_cache(ids, sites=[canonical])
                else:
                    _, cache = im.run_with_cache(ids, sites=[canonical], attention_mask=mask)
            value = _flatten_site_value(cache[canonical])
            if meta["d_in"] is not None and value.shape[-1] != meta["d_in"]:
                raise StoreError(
                    f"{path}: cannot resume: setting 'd_in' differs: the store has {meta['d_in']}, this call's "
                    f"{canonical} has {value.shape[-1]}"
                )
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
                path.mkdir(parents=True, exist_ok=True)
                flush()
            bar.update(1)
        if done <= skip:
            check_skipped()
        path.mkdir(parents=True, exist_ok=True)
        flush()
        meta["batches_done"] = done
        meta["batches_sha256"] = hasher.hexdigest()
        meta["complete"] = True
        write_json_atomic(meta_path, meta)
    finally:
        bar.close()
    return ActivationStore(path)
