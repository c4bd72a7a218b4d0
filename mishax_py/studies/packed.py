"""The packed engine of activation patching: many patches of one layer in a few short forward passes, exactly.

A patch at layer ``l`` whose earliest patched position is ``p`` changes nothing at layers ``< l``
and, under causal attention, nothing at positions ``< p``. So each patch only computes layers
``>= l`` at positions ``>= p``:

* patches are grouped by layer; a group's forward starts at layer ``l`` from the base run's
  cached ``resid_pre`` (``RunContext.start_layer``), skipping the layers below;
* each patch (per batch row) is a *segment*: the suffix ``p .. P-1`` of its sequence. Segments
  are packed along the position axis of a few rows (a length ``P-p`` segment pairs with a length
  ``p+1`` one, so a ``[L, P]`` grid is ``P/2`` rows of ``P+1`` tokens per layer instead of ``P``
  rows of ``P``); positions < p are read from a key/value cache holding the base run's per-layer
  ``rot_k``/``v`` for all positions (:class:`PrefixKV`), and a 4-D attention mask per layer type
  lets each token see exactly the keys it sees in a plain run (the cache before its segment's
  start, its own segment causally, the sliding window where ``im.family.attention(layer).window``
  sets one); ``position_ids`` are the original positions, so RoPE is exact.

The logits of positions ``< p`` are the base run's. Results equal a plain loop of single patched
runs up to float reassociation (~1e-6, fp32). The engine needs a family whose model takes Hugging
Face's key/value cache keyword and a ``{layer type: 4-D float mask}`` attention mask
(``im.family.supports_kv_prefix``), and ``rot_k`` / ``v`` sites.

Inside :func:`mishax_py.distributed.split` the packed rows (row templates) are dealt to the ranks, so each
rank runs whole rows packed as one process packs them (dealing single patches would break the pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.devices import execution_device, model_dtype
from mishax_py.distributed import active_split
from mishax_py.hf_compat import CACHE_KWARG
from mishax_py.inputs import Metric, metric_float
from mishax_py.memory import available_ram, estimate_run, get_max_memory, memory_budget
from mishax_py.progress import progress_bar
from mishax_py.runtime import RunContext, SiteEvent, activate

if TYPE_CHECKING:
    from mishax_py.cache import ActivationCache
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["GridPatch", "PrefixKV", "default_rows", "largest_pass_rows", "packed_sites", "run_packed"]


@dataclass
class GridPatch:
    """One patch of an activation-patching grid, as both engines run it.

    Attributes:
        index: where its metric goes in the result's ``values``.
        layer: the patched layer.
        head: the patched head (``None`` for residual-stream sites).
        positions: the patched positions, sorted (for ``attn.pattern``: query positions).
    """

    index: tuple[int, ...]
    layer: int
    head: int | None
    positions: list[int]

    @property
    def start(self) -> int:
        """The first patched position: nothing before it changes."""
        return self.positions[0]


@dataclass
class _Segment:
    """One patch in a packed row: it recomputes positions ``start .. T-1`` from token ``offset`` of the row.

    Packing does not depend on the batch row, so a row *template* (a list of segments) is used
    once per batch row of the base input: packed row ``t * B + b`` is template ``t`` on batch row
    ``b``, and all of a patch's rows are in one forward pass.
    """

    patch: int  # index into todo
    start: int  # its first position
    T: int  # the sequence length
    offset: int = 0  # where it starts in its row

    @property
    def length(self) -> int:
        return self.T - self.start


class PrefixKV:
    """A read-only key/value cache: per layer, the base run's keys/values of every position ``[R, kv, T, d]``,
    shared by all tokens of a packed forward (the attention mask decides which of them a token sees).

    It implements the two methods of Hugging Face's cache that attention layers call.
    """

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor], length: int) -> None:
        self.keys, self.values, self.length = keys, values, length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([self.keys[layer_idx], key_states], dim=-2),
                torch.cat([self.values[layer_idx], value_states], dim=-2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def packed_sites(im: InstrumentedModel, kind: str, layers: list[int]) -> list[str]:
    """The base-run sites the engine reads besides ``kind``: ``resid_pre`` of the patched layers (where
    passes start) and ``attn.rot_k`` / ``attn.v`` of every layer from the first patched one (the prefix)."""
    sites = [im.layer_site(layer, "resid_pre") for layer in layers]
    sites += [im.layer_site(i, s) for i in range(min(layers), im.n_layers) for s in ("attn.rot_k", "attn.v")]
    return sites


def _pack(segments: list[_Segment], capacity: int) -> list[list[_Segment]]:
    """Pack segments into rows of at most ``capacity`` tokens: each row takes the longest segment
    left, then the shortest ones while they fit (so ``P-p`` pairs with ``p+1``); sets the offsets."""
    segs = sorted(segments, key=lambda s: -s.length)
    rows: list[list[_Segment]] = []
    i, j = 0, len(segs) - 1
    while i <= j:
        row, used = [segs[i]], segs[i].length
        i += 1
        while i <= j and used + segs[j].length <= capacity:
            row.append(segs[j])
            used += segs[j].length
            j -= 1
        off = 0
        for seg in row:
            seg.offset, off = off, off + seg.length
        rows.append(row)
    return rows


def largest_pass_rows(patches: Sequence[GridPatch], T: int, B: int, rows_per_pass: int) -> int:
    """The rows of the largest forward :func:`run_packed` makes for ``patches`` (an upper bound when some are
    skipped as equal): per layer, the templates packed from its patches, at most ``rows_per_pass // B`` of
    them per pass, each ``B`` rows."""
    per_pass = max(1, rows_per_pass // B)
    most = 0
    for layer in {p.layer for p in patches}:
        templates = _pack([_Segment(i, p.start, T) for i, p in enumerate(patches) if p.layer == layer], T + 1)
        most = max(most, min(len(templates), per_pass))
    return max(most, 1) * B


def default_rows(im: InstrumentedModel, row_len: int, cache_len: int, *, max_memory: int | str | None = None) -> int:
    """Rows per packed forward from a memory estimate.

    Per row: :func:`mishax_py.memory.estimate_run` of one row of ``row_len`` tokens over a key/value
    prefix of ``cache_len`` positions (the formula is :func:`mishax_py.memory.estimate_forward_bytes`'s:
    fp32 logits and soft-cap temporaries, the MLP, eager attention over ``cache_len + row_len`` keys,
    the 4-D masks, the prefix's keys and values). The budget is half the free GPU memory, or a quarter
    of the available RAM (at most 2 GiB) on the CPU, and at most ``max_memory`` (or the process-wide
    :func:`mishax_py.memory.set_max_memory`).
    """
    per_row = estimate_run(im, 1, row_len, kv_len=cache_len).total
    device = execution_device(im)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 2
    else:
        budget = min(available_ram() // 4, 2 << 30)
    if max_memory is not None or get_max_memory() is not None:
        budget = min(budget, memory_budget(device, max_memory))
    return max(1, int(budget // per_row))


def run_packed(im: InstrumentedModel, kind: str, todo: list[GridPatch], values: torch.Tensor, metric: Metric,
               base_ids: torch.Tensor, base_logits: torch.Tensor, base_cache: ActivationCache,
               source_cache: ActivationCache, batch_size: int | None, progress: bool | None, *,
               max_memory: int | str | None = None) -> None:
    """Run every patch of ``todo`` at site ``kind`` and write its metric into ``values[patch.index]``.

    ``base_cache`` holds the base run's :func:`packed_sites`, ``source_cache`` the source run's
    ``kind`` at the patched layers; ``batch_size`` is in packed rows of ``T + 1`` tokens.
    """
    B, T = base_ids.shape
    n_layers = im.n_layers
    dtype = model_dtype(im)

    # per layer: the base run's keys/values as the attention sees them, [B, kv, T, d]
    lo = min(p.layer for p in todo)
    keys = {i: base_cache[im.layer_site(i, "attn.rot_k")].transpose(1, 2) for i in range(lo, n_layers)}
    vals = {i: base_cache[im.layer_site(i, "attn.v")].transpose(1, 2) for i in range(lo, n_layers)}

    capacity = T + 1
    rows_per_pass = batch_size if batch_size is not None else default_rows(im, capacity, T, max_memory=max_memory)
    if rows_per_pass < 1:
        raise ValueError(f"batch_size must be >= 1, got {rows_per_pass}")
    per_pass = max(1, rows_per_pass // B)  # templates per pass (a pass holds all B rows of a template)

    # group by layer, pack each layer's patches into row templates (cut into passes by `run`)
    rows_all: list[tuple[int, list[_Segment]]] = []
    for layer in sorted({p.layer for p in todo}):
        segments = [_Segment(i, p.start, T) for i, p in enumerate(todo) if p.layer == layer]
        rows_all += [(layer, t) for t in _pack(segments, capacity)]

    def run(chosen: list[int]) -> None:
        """Run the row templates ``rows_all[k]``, ``k`` in ``chosen`` (ascending), ``per_pass`` of a layer per pass."""
        passes: list[tuple[int, list[list[_Segment]]]] = []
        for k in chosen:
            layer, template = rows_all[k]
            if passes and passes[-1][0] == layer and len(passes[-1][1]) < per_pass:
                passes[-1][1].append(template)
            else:
                passes.append((layer, [template]))
        bar = progress_bar(len(passes), "patching", progress, unit="pass")
        try:
            for layer, templates in passes:
                out = _packed_pass(im, kind, layer, templates, todo, base_ids, base_cache, source_cache, keys, vals,
                                   dtype)
                for t, template in enumerate(templates):
                    for seg in template:
                        full = torch.stack([
                            torch.cat([base_logits[b, : seg.start],
                                       out[t * B + b, seg.offset: seg.offset + seg.length]])
                            for b in range(B)
                        ])
                        values[todo[seg.patch].index] = metric_float(metric(full), "metric(patched logits)")
                del out
                bar.update(1)
        finally:
            bar.close()

    sp = active_split()
    if sp is None:
        run(list(range(len(rows_all))))
        return
    # mishax_py.distributed.split(): each rank runs its share of the row templates (whole packed rows, so the
    # packing is one process's); every rank gets every patch's metric
    width = max(len(t) for _, t in rows_all)

    def share(mine: list[int]) -> torch.Tensor:
        run(mine)
        done = torch.full((len(mine), width), float("nan"))
        for r, k in enumerate(mine):
            for j, seg in enumerate(rows_all[k][1]):
                done[r, j] = values[todo[seg.patch].index]
        return done

    done = sp.map(len(rows_all), share, what="activation_patching packed rows")
    for k, (_, template) in enumerate(rows_all):
        for j, seg in enumerate(template):
            values[todo[seg.patch].index] = done[k, j]


def _layer_windows(im: InstrumentedModel) -> tuple[list[str], dict[str, int | None]]:
    """Each layer's attention type, and each type's sliding window (``None``: global attention)."""
    specs = [im.family.attention(i) for i in range(im.n_layers)]
    return [s.layer_type for s in specs], {s.layer_type: s.window for s in specs}


def _packed_pass(im: InstrumentedModel, kind: str, layer: int, templates: list[list[_Segment]], todo: list[GridPatch],
                 base_ids: torch.Tensor, base_cache: ActivationCache, source_cache: ActivationCache,
                 keys: dict[int, torch.Tensor], vals: dict[int, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """One forward of packed segments starting at ``layer``; returns its logits ``[R, S, vocab]``."""
    device = base_ids.device
    B, T = base_ids.shape
    layer_types, windows = _layer_windows(im)
    S = max(sum(s.length for s in row) for row in templates)
    n_t = len(templates)
    pos = torch.zeros(n_t, S, dtype=torch.long)  # original position of each token
    seg_id = torch.full((n_t, S), -1, dtype=torch.long)  # which segment of the row (-1: padding)
    seg_start = torch.zeros(n_t, S, dtype=torch.long)
    for t, row in enumerate(templates):
        for k, seg in enumerate(row):
            span = slice(seg.offset, seg.offset + seg.length)
            pos[t, span] = torch.arange(seg.start, T)
            seg_id[t, span] = k
            seg_start[t, span] = seg.start

    # Attention masks: a token sees the cached base keys before its segment's start and its own
    # segment causally (plus the sliding window on windowed layers); padding sees itself only.
    k_pos = torch.arange(T)
    sees_cache = (k_pos[None, None, :] < seg_start[:, :, None]) & (seg_id[:, :, None] >= 0)  # [n_t, S, T]
    same = (seg_id[:, :, None] == seg_id[:, None, :]) & (seg_id[:, :, None] >= 0)
    sees_new = same & (pos[:, None, :] <= pos[:, :, None])  # [n_t, S, S]
    sees_new |= torch.eye(S, dtype=torch.bool)[None] & (seg_id[:, :, None] < 0)
    masks: dict[str, torch.Tensor] = {}
    for lt in sorted(set(layer_types[layer:])):
        c, n = sees_cache, sees_new
        window = windows[lt]
        if window is not None:
            c = c & (pos[:, :, None] - k_pos[None, None, :] < window)
            n = n & (pos[:, :, None] - pos[:, None, :] < window)
        allowed = torch.cat([c, n], dim=-1).repeat_interleave(B, dim=0)[:, None].to(device)  # [R, 1, S, T+S]
        masks[lt] = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    for lt in set(layer_types) - set(masks):  # only layers skipped in this pass use these
        masks[lt] = next(iter(masks.values()))

    pos_d = pos.repeat_interleave(B, dim=0).to(device)  # [R, S]; row t * B + b
    row_b = torch.arange(B, device=device).repeat(n_t)  # [R]
    # each layer's keys/values (and cached values) stay on that layer's device (a model split by accelerate)
    kv = PrefixKV({i: keys[i][row_b.to(keys[i].device)] for i in keys if i >= layer},
                  {i: vals[i][row_b.to(vals[i].device)] for i in vals if i >= layer}, T)
    start_site, patch_site = im.layer_site(layer, "resid_pre"), im.layer_site(layer, kind)
    base_start = base_cache[start_site]
    start_value = base_start[row_b[:, None].to(base_start.device), pos_d.to(base_start.device)]  # [R, S, d]
    source = source_cache[patch_site]  # on the patched layer's device, as the value it is written into
    patch_fn = _packed_patch(kind, templates, todo, source, B, T, source.device)

    ctx = RunContext()
    ctx.start_layer = layer
    im.add_handler(ctx, start_site, lambda value, event: start_value)
    im.add_handler(ctx, patch_site, patch_fn)
    ids = base_ids[row_b[:, None], pos_d]
    with activate(ctx):
        return im.forward(ids, attention_mask=masks, position_ids=pos_d, use_cache=False, **{CACHE_KWARG: kv})


def _packed_patch(kind: str, templates: list[list[_Segment]], todo: list[GridPatch], source: torch.Tensor, B: int,
                  T: int, device: torch.device) -> Callable[[torch.Tensor, SiteEvent], torch.Tensor]:
    """The handler writing every segment's patch into the packed value of the site.

    Site layouts: residual ``[R, S, d]``, per-head ``[R, S, head, d_head]`` (patches with a head),
    attention maps ``[R, head, S, T + S]`` (``attn.pattern``; the source row's keys are moved to the
    packed key index of each original key position).
    """
    r_idx: list[int] = []  # packed row
    s_idx: list[int] = []  # packed token
    h_idx: list[int] = []  # head
    b_idx: list[int] = []  # source batch row
    p_idx: list[int] = []  # source position
    k_map: list[list[int]] = []  # pattern: packed key index of each original key position
    for t, row in enumerate(templates):
        for seg in row:
            patch = todo[seg.patch]
            kk = [k if k < seg.start else T + seg.offset + k - seg.start for k in range(T)]
            for row_b in range(B):
                for p_i in patch.positions:
                    r_idx.append(t * B + row_b)
                    s_idx.append(seg.offset + p_i - seg.start)
                    h_idx.append(patch.head if patch.head is not None else 0)
                    b_idx.append(row_b)
                    p_idx.append(p_i)
                    if kind == "attn.pattern":
                        k_map.append(kk)

    def t_(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    r, s, h, b, p = t_(r_idx), t_(s_idx), t_(h_idx), t_(b_idx), t_(p_idx)
    if kind == "attn.pattern":
        key_index = torch.tensor(k_map, dtype=torch.long, device=device)
        src_rows = source[b, h, p]  # [n, T] rows of the source attention map

        def patch_pattern(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
            new = torch.zeros(len(r_idx), value.shape[-1], dtype=value.dtype, device=value.device)
            new.scatter_(1, key_index, src_rows.to(value.dtype))
            out = value.clone()
            out[r, h, s] = new
            return out

        return patch_pattern
    if any(patch.head is not None for patch in todo):
        src = source[b, p, h]

        def patch_head(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
            out = value.clone()
            out[r, s, h] = src
            return out

        return patch_head
    src = source[b, p]

    def patch_stream(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        out = value.clone()
        out[r, s] = src
        return out

    return patch_stream
