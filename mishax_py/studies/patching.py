"""Activation patching and path patching, in TransformerLens's conventions, batched and exact.

Activation patching
-------------------
``activation_patching(im, clean_ids, corrupt_ids, metric, site="resid_pre", by="pos")`` copies one
activation from a source run into a base run and returns ``metric(logits)`` for each copy:

* ``direction="denoise"`` (default, TransformerLens's ``get_act_patch_*``): the *clean* activation
  is patched into the *corrupted* run;
* ``direction="noise"``: the *corrupted* activation is patched into the *clean* run.

Sites and grids (``L`` layers, ``P`` positions, ``H`` heads -- ``n_kv_heads`` for ``k``/``v``):

==========================================================  ==========  ===================
site                                                        ``by``      result
==========================================================  ==========  ===================
``resid_pre``, ``resid_mid``, ``resid_post``,               ``"pos"``   ``[L, P]``
``attn_out``, ``mlp_out``                                   ``"layer"`` ``[L]`` (all positions)
``attn.z``, ``attn.q``, ``attn.k``, ``attn.v``,             ``"head"``  ``[L, H]`` (all positions)
``attn.pattern``                                            ``"head_pos"`` ``[L, H, P]``
==========================================================  ==========  ===================

For ``attn.pattern`` the position is the *query* (destination) position: patching ``(l, h, p)``
copies row ``p`` of head ``h``'s attention map. ``metric`` maps the logits ``[batch, pos, vocab]``
of one patched run (the batch of ``clean_ids``) to a scalar (a 0-dim tensor or a float).

How it is fast (``method="packed"``, the default), exactly
-----------------------------------------------------------
A patch at layer ``l`` whose earliest patched position is ``p`` changes nothing at layers ``< l``
and, under causal attention, nothing at positions ``< p``. So each patch only computes layers
``>= l`` at positions ``>= p``:

* patches are grouped by layer; a group's forward starts at layer ``l`` from the base run's
  cached ``resid_pre`` (``RunContext.start_layer``), skipping the layers below;
* each patch (per batch row) is a *segment*: the suffix ``p .. P-1`` of its sequence. Segments
  are packed along the position axis of a few rows (a length ``P-p`` segment pairs with a length
  ``p+1`` one, so a ``[L, P]`` grid is ``P/2`` rows of ``P+1`` tokens per layer instead of ``P``
  rows of ``P``); positions < p are read from a key/value cache holding the base run's per-layer
  ``rot_k``/``v`` for all positions, and a 4-D attention mask lets each token see exactly the keys
  it sees in a plain run (the cache before its segment's start, its own segment causally, the
  sliding window on sliding layers); ``position_ids`` are the original positions, so RoPE is exact;
* a patch that copies a value equal to the one already there (e.g. every position before the
  first token where the two prompts differ) is not run: its result is the base run's metric.

The logits of positions ``< p`` are the base run's. Results equal a plain loop of single patched
runs (one full forward each, as TransformerLens does) up to float reassociation (~1e-6, fp32).
``method="rows"`` runs each patch as a full-length row through :func:`mishax_py.execution.sweep.sweep`
(with ``Patch`` interventions); it is used automatically when HF keyword arguments (e.g. a
padding ``attention_mask``) are given or another run is active (inside ``im.intervene``).

Path patching
-------------
``path_patching(im, clean_ids, corrupt_ids, metric, senders, receivers)`` measures the effect of
the senders on the receivers through the direct paths only (Wang et al. 2022, IOI), with the
three-step algorithm: (1) cache the clean and corrupted runs; (2) run the clean input with the
senders patched from the corrupted run and every other attention head's output (``attn.z``)
frozen to its clean value (and, with ``freeze_mlps=True``, every MLP output too), recording the
receivers' inputs; (3) run the clean input with only the receivers' inputs patched to those
values, and return the metric. ``path_patching_by_head`` does this for every head alone as the
sender and returns a ``[layer, head]`` :class:`PatchingResult` (plottable like the others).
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.hf_compat import CACHE_KWARG
from mishax_py.interventions import Hook, Patch, PositionsLike
from mishax_py.memory import available_ram
from mishax_py.runtime import RunContext, SiteEvent, activate, active_context
from mishax_py.studies.result import PatchingResult, plot

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["PatchingResult", "activation_patching", "path_patching", "path_patching_by_head", "plot"]

STREAM_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HEAD_SITES = ("attn.z", "attn.q", "attn.k", "attn.v", "attn.pattern")
_BY_STREAM = ("pos", "layer")
_BY_HEAD = ("head", "head_pos")
# `by=` spellings -> canonical grid kind; attribution_patching accepts the same ones.
BY_ALIASES: dict[Any, str] = {
    "pos": "pos", "layer_pos": "pos", ("layer", "pos"): "pos",
    "layer": "layer", ("layer",): "layer",
    "head": "head", "layer_head": "head", ("layer", "head"): "head", ("head",): "head",
    "head_pos": "head_pos", "layer_head_pos": "head_pos", ("head", "pos"): "head_pos",
    ("layer", "head", "pos"): "head_pos",
}
#: ``metric(logits [batch, pos, vocab]) -> scalar``: a 0-dim tensor (differentiable where gradients are
#: taken: attribution, feature circuits) or, for exact patching, a float.
Metric = Callable[[torch.Tensor], Any]


# ---------------------------------------------------------------------------------------------
# Activation patching
# ---------------------------------------------------------------------------------------------
@dataclass
class _Patch:
    index: tuple[int, ...]  # where its result goes
    layer: int
    head: int | None
    positions: list[int]  # the patched positions (sorted)

    @property
    def start(self) -> int:
        return self.positions[0]


def activation_patching(
    im: InstrumentedModel,
    clean_ids: Any,
    corrupt_ids: Any,
    metric: Metric,
    site: str = "resid_pre",
    by: str | tuple[str, ...] | None = None,
    direction: str = "denoise",
    batch_size: int | None = None,
    progress: bool | None = None,
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    pos_labels: Sequence[str] | None = None,
    method: str = "auto",
    **hf_kwargs: Any,
) -> PatchingResult:
    """Patch each activation of ``site`` from the source run into the base run; see the module docs.

    Args:
        im: the instrumented model.
        clean_ids, corrupt_ids: token ids ``[batch, pos]`` of the same shape.
        metric: ``metric(logits [batch, pos, vocab]) -> scalar`` (0-dim tensor or float).
        site: ``resid_pre`` | ``resid_mid`` | ``resid_post`` | ``attn_out`` | ``mlp_out`` |
            ``attn.z`` | ``attn.q`` | ``attn.k`` | ``attn.v`` | ``attn.pattern`` (TransformerLens
            spellings such as ``"hook_resid_pre"`` or ``"z"`` are accepted).
        by: ``"pos"`` (``[layer, pos]``, default for residual sites) or ``"layer"`` (all positions
            at once) for residual sites; ``"head"`` (``[layer, head]``, all positions, default for
            head sites) or ``"head_pos"`` (``[layer, head, pos]``) for head sites.
        direction: ``"denoise"`` (clean into corrupted; TransformerLens) or ``"noise"``.
        batch_size: rows per forward pass (a row holds about ``pos + 1`` tokens with the packed
            method, ``pos`` with the rows method); default from a memory estimate.
        progress: a tqdm bar over forward passes (``None``: on for more than 8 passes on a terminal).
        layers: the layers to patch (default all); the result's layer axis follows this order.
        positions: the positions to patch (default all). With ``by="layer"``/``"head"`` these
            positions are patched together.
        pos_labels: tick labels for the position axis (e.g. the tokens), one per patched position.
        method: ``"auto"`` | ``"packed"`` | ``"rows"`` (see the module docs).
        **hf_kwargs: passed to the model (``attention_mask``, ...); they select the rows method.
    """
    clean, corrupt = prompt_pair(im, clean_ids, corrupt_ids)
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' (clean into corrupted) or 'noise', got {direction!r}")
    if not callable(metric):
        raise TypeError(f"metric must be a function of the logits, got {type(metric).__name__}")
    kind = _site_kind(site)
    mode = _by(kind, by)
    B, T = clean.shape
    n_layers = im.n_layers
    layer_list = _layers(layers, n_layers)
    pos_list = _positions(positions, T)
    if pos_labels is not None and len(pos_labels) != len(pos_list):
        raise ValueError(f"pos_labels has {len(pos_labels)} labels for {len(pos_list)} positions")
    n_heads = _n_heads(im, kind)
    if method not in ("auto", "packed", "rows"):
        raise ValueError(f"method must be 'auto', 'packed' or 'rows', got {method!r}")
    outer = active_context()
    if method == "packed" and (hf_kwargs or outer is not None):
        raise ValueError("method='packed' builds its own attention masks and runs: it cannot take HF keyword "
                         f"arguments ({', '.join(hf_kwargs) or 'none given'}) or run inside another run "
                         "(im.intervene); use method='rows'")
    packed = method == "packed" or (method == "auto" and not hf_kwargs and outer is None)

    patches, shape, axes = _enumerate(mode, layer_list, pos_list, n_heads)
    labels: dict[str, list[str]] = {"layer": [str(x) for x in layer_list]}
    if "head" in axes:
        labels["head"] = [str(h) for h in range(n_heads)]
    if "pos" in axes:
        labels["pos"] = list(pos_labels) if pos_labels is not None else [str(p) for p in pos_list]

    base_ids, source_ids = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    names = [f"blocks.{layer}.{kind}" for layer in layer_list]
    base_sites = list(names)
    if packed:
        lo = min(layer_list)
        base_sites += [f"blocks.{layer}.resid_pre" for layer in layer_list]
        base_sites += [f"blocks.{i}.attn.{s}" for i in range(lo, n_layers) for s in ("rot_k", "v")]
    with torch.no_grad():
        base_logits, base_cache = im.run_with_cache(base_ids, sites=base_sites, **hf_kwargs)
        source_logits, source_cache = im.run_with_cache(source_ids, sites=names, **hf_kwargs)
        base_metric = _scalar(metric(base_logits), "metric(base logits)")
        source_metric = _scalar(metric(source_logits), "metric(source logits)")
        del source_logits

        values = torch.full(shape, float("nan"), dtype=torch.float32)
        todo: list[_Patch] = []
        for patch in patches:
            name = f"blocks.{patch.layer}.{kind}"
            if _same(base_cache[name], source_cache[name], patch, kind):
                values[patch.index] = base_metric
            else:
                todo.append(patch)
        if todo:
            if packed:
                _run_packed(im, kind, todo, values, metric, base_ids, base_logits, base_cache, source_cache,
                            batch_size, progress)
            else:
                _run_rows(im, kind, todo, values, metric, base_ids, source_cache, batch_size, progress, hf_kwargs)

    clean_metric, corrupt_metric = (source_metric, base_metric) if direction == "denoise" else (base_metric,
                                                                                               source_metric)
    return PatchingResult(values, axes, labels, kind, direction, clean_metric, corrupt_metric)


def _site_kind(site: str) -> str:
    s = site
    if s.startswith("blocks.*."):
        s = s[len("blocks.*."):]
    s = s.replace("attn.hook_", "attn.").replace("hook_", "")
    if s in ("z", "q", "k", "v", "pattern"):
        s = f"attn.{s}"
    if s not in STREAM_SITES + HEAD_SITES:
        raise ValueError(f"activation_patching: unsupported site {site!r}; supported: "
                         f"{', '.join(STREAM_SITES + HEAD_SITES)}")
    return s


def _by(kind: str, by: Any) -> str:
    allowed = _BY_HEAD if kind in HEAD_SITES else _BY_STREAM
    if by is None:
        return allowed[0]
    key = tuple(by) if isinstance(by, list) else by
    mode = BY_ALIASES.get(key)
    if mode not in allowed:
        raise ValueError(f"by={by!r} is not supported for site {kind!r}; use one of {', '.join(allowed)}")
    return mode


def _layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    out = [int(x) for x in layers]
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad or not out or len(set(out)) != len(out):
        raise ValueError(f"layers must be distinct layer indices in [0, {n_layers}), got {list(layers)}")
    return out


def _positions(positions: Sequence[int] | None, T: int) -> list[int]:
    if positions is None:
        return list(range(T))
    out = [int(p) + T if int(p) < 0 else int(p) for p in positions]
    if any(not 0 <= p < T for p in out) or not out or len(set(out)) != len(out):
        raise ValueError(f"positions must be distinct positions in [-{T}, {T}), got {list(positions)}")
    return out


def _n_heads(im: InstrumentedModel, kind: str) -> int:
    if kind not in HEAD_SITES:
        return 0
    dims = im.site_info(f"blocks.0.{kind}").shape
    return int(dims[1] if kind == "attn.pattern" else dims[2])


def _enumerate(mode: str, layers: list[int], pos: list[int], n_heads: int
               ) -> tuple[list[_Patch], tuple[int, ...], tuple[str, ...]]:
    together = sorted(pos)
    out: list[_Patch] = []
    if mode == "pos":
        out = [_Patch((i, j), layer, None, [p]) for i, layer in enumerate(layers) for j, p in enumerate(pos)]
        return out, (len(layers), len(pos)), ("layer", "pos")
    if mode == "layer":
        return [_Patch((i,), layer, None, together) for i, layer in enumerate(layers)], (len(layers),), ("layer",)
    if mode == "head":
        out = [_Patch((i, h), layer, h, together) for i, layer in enumerate(layers) for h in range(n_heads)]
        return out, (len(layers), n_heads), ("layer", "head")
    out = [_Patch((i, h, j), layer, h, [p]) for i, layer in enumerate(layers) for h in range(n_heads)
           for j, p in enumerate(pos)]
    return out, (len(layers), n_heads, len(pos)), ("layer", "head", "pos")


def _select(value: torch.Tensor, patch: _Patch, kind: str) -> torch.Tensor:
    """The entries of a site value (batch-first) that ``patch`` overwrites."""
    pos = torch.tensor(patch.positions)
    if kind == "attn.pattern":
        return value[:, patch.head][:, pos]
    if patch.head is not None:
        return value[:, pos, patch.head]
    return value[:, pos]


def _same(base: torch.Tensor, source: torch.Tensor, patch: _Patch, kind: str) -> bool:
    return torch.equal(_select(base, patch, kind), _select(source, patch, kind))


def _scalar(out: Any, what: str) -> float:
    if isinstance(out, torch.Tensor):
        if out.ndim != 0:
            raise ValueError(f"{what} must be a scalar (a 0-dim tensor or a float), got a tensor of shape "
                             f"{tuple(out.shape)}; reduce it, e.g. with .mean()")
        if out.is_complex():
            raise TypeError(f"{what} must be a real scalar, got dtype {out.dtype}")
        return float(out)
    if isinstance(out, numbers.Real) and not isinstance(out, bool):
        return float(out)
    raise TypeError(f"{what} must be a scalar (a 0-dim tensor or a float), got {type(out).__name__}: {out!r}")


def _progress(total: int, progress: bool | None, desc: str) -> Any:
    show = progress if progress is not None else total > 8 and sys.stderr.isatty()
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pass")


# -- the rows method: full-length rows through sweep ------------------------------------------------
def _run_rows(im: InstrumentedModel, kind: str, todo: list[_Patch], values: torch.Tensor, metric: Metric,
              base_ids: torch.Tensor, source_cache: Any, batch_size: int | None, progress: bool | None,
              hf_kwargs: dict[str, Any]) -> None:
    from mishax_py.execution.sweep import sweep

    variants = []
    for patch in todo:
        name = f"blocks.{patch.layer}.{kind}"
        heads = None if patch.head is None else [patch.head]
        variants.append({name: Patch(source_cache[name], positions=patch.positions, heads=heads)})
    results = sweep(im, base_ids, variants, metric=lambda lg: _scalar(metric(lg), "metric(patched logits)"),
                    batch_size=batch_size, progress=progress, **hf_kwargs)
    for patch, r in zip(todo, results, strict=True):
        values[patch.index] = r


# -- the packed method ---------------------------------------------------------------------------------
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


class _PrefixKV:
    """A read-only key/value cache: per layer, the base run's keys/values of every position, shared by
    all tokens of a packed forward (the attention mask decides which of them a token sees)."""

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor], length: int) -> None:
        self.keys, self.values, self.length = keys, values, length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([self.keys[layer_idx], key_states], dim=-2),
                torch.cat([self.values[layer_idx], value_states], dim=-2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


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


def _default_rows(im: InstrumentedModel, row_len: int, cache_len: int) -> int:
    """Rows per packed forward from a memory estimate (budget as sweep.default_batch_size)."""
    cfg = im.model.config
    param = next(im.model.parameters())
    e = param.element_size()
    d, d_mlp = int(cfg.hidden_size), int(cfg.intermediate_size)
    heads, vocab = int(cfg.num_attention_heads), int(cfg.vocab_size)
    per_token = 4 * vocab * 4 + 3 * d_mlp * e + 8 * d * e + 3 * heads * (cache_len + row_len) * 4
    if param.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(param.device)
        budget = free // 2
    else:
        budget = min(available_ram() // 4, 2 << 30)
    return max(1, int(budget // (per_token * row_len)))


def _run_packed(im: InstrumentedModel, kind: str, todo: list[_Patch], values: torch.Tensor, metric: Metric,
                base_ids: torch.Tensor, base_logits: torch.Tensor, base_cache: Any, source_cache: Any,
                batch_size: int | None, progress: bool | None) -> None:
    B, T = base_ids.shape
    n_layers = im.n_layers
    cfg = im.model.config
    layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers)
    window = getattr(cfg, "sliding_window", None)
    dtype = next(im.model.parameters()).dtype

    # per layer: the base run's keys/values as the attention sees them, [B, kv, T, d]
    lo = min(p.layer for p in todo)
    keys = {i: base_cache[f"blocks.{i}.attn.rot_k"].transpose(1, 2) for i in range(lo, n_layers)}
    vals = {i: base_cache[f"blocks.{i}.attn.v"].transpose(1, 2) for i in range(lo, n_layers)}

    capacity = T + 1
    rows_per_pass = batch_size if batch_size is not None else _default_rows(im, capacity, T)
    if rows_per_pass < 1:
        raise ValueError(f"batch_size must be >= 1, got {rows_per_pass}")
    per_pass = max(1, rows_per_pass // B)  # templates per pass (a pass holds all B rows of a template)

    # group by layer, pack each layer's patches into row templates, cut into passes
    passes: list[tuple[int, list[list[_Segment]]]] = []
    for layer in sorted({p.layer for p in todo}):
        templates = _pack([_Segment(i, p.start, T) for i, p in enumerate(todo) if p.layer == layer], capacity)
        passes += [(layer, templates[k:k + per_pass]) for k in range(0, len(templates), per_pass)]

    bar = _progress(len(passes), progress, "patching")
    try:
        for layer, templates in passes:
            out = _packed_pass(im, kind, layer, templates, todo, base_ids, base_cache, source_cache, keys, vals,
                               layer_types, window, dtype)
            for t, template in enumerate(templates):
                for seg in template:
                    full = torch.stack([
                        torch.cat([base_logits[b, : seg.start], out[t * B + b, seg.offset: seg.offset + seg.length]])
                        for b in range(B)
                    ])
                    values[todo[seg.patch].index] = _scalar(metric(full), "metric(patched logits)")
            del out
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def _packed_pass(im: InstrumentedModel, kind: str, layer: int, templates: list[list[_Segment]], todo: list[_Patch],
                 base_ids: torch.Tensor, base_cache: Any, source_cache: Any, keys: dict[int, torch.Tensor],
                 vals: dict[int, torch.Tensor], layer_types: list[str], window: int | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """One forward of packed segments starting at ``layer``; returns its logits ``[R, S, vocab]``."""
    device = base_ids.device
    B, T = base_ids.shape
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
    # segment causally (plus the sliding window on sliding layers); padding sees itself only.
    k_pos = torch.arange(T)
    sees_cache = (k_pos[None, None, :] < seg_start[:, :, None]) & (seg_id[:, :, None] >= 0)  # [n_t, S, T]
    same = (seg_id[:, :, None] == seg_id[:, None, :]) & (seg_id[:, :, None] >= 0)
    sees_new = same & (pos[:, None, :] <= pos[:, :, None])  # [n_t, S, S]
    sees_new |= torch.eye(S, dtype=torch.bool)[None] & (seg_id[:, :, None] < 0)
    masks: dict[str, torch.Tensor] = {}
    for lt in sorted(set(layer_types[layer:])):
        c, n = sees_cache, sees_new
        if lt == "sliding_attention" and window is not None:
            c = c & (pos[:, :, None] - k_pos[None, None, :] < window)
            n = n & (pos[:, :, None] - pos[:, None, :] < window)
        allowed = torch.cat([c, n], dim=-1).repeat_interleave(B, dim=0)[:, None].to(device)  # [R, 1, S, T+S]
        masks[lt] = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    for lt in set(layer_types) - set(masks):  # only layers skipped in this pass use these
        masks[lt] = next(iter(masks.values()))

    pos_d = pos.repeat_interleave(B, dim=0).to(device)  # [R, S]; row t * B + b
    row_b = torch.arange(B, device=device).repeat(n_t)  # [R]
    kv = _PrefixKV({i: keys[i][row_b] for i in keys if i >= layer}, {i: vals[i][row_b] for i in vals if i >= layer}, T)
    start_value = base_cache[f"blocks.{layer}.resid_pre"][row_b[:, None], pos_d]  # [R, S, d]
    patch_fn = _packed_patch(kind, templates, todo, source_cache[f"blocks.{layer}.{kind}"], B, T, device)

    ctx = RunContext()
    ctx.start_layer = layer
    im.add_handler(ctx, f"blocks.{layer}.resid_pre", lambda value, event: start_value)
    im.add_handler(ctx, f"blocks.{layer}.{kind}", patch_fn)
    ids = base_ids[row_b[:, None], pos_d]
    with activate(ctx):
        return im.forward(ids, attention_mask=masks, position_ids=pos_d, use_cache=False, **{CACHE_KWARG: kv})


def _packed_patch(kind: str, templates: list[list[_Segment]], todo: list[_Patch], source: torch.Tensor, B: int,
                  T: int, device: torch.device) -> Callable[[torch.Tensor, SiteEvent], torch.Tensor]:
    """The handler writing every segment's patch into the packed value of the site."""
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
            for b in range(B):
                for p in patch.positions:
                    r_idx.append(t * B + b)
                    s_idx.append(seg.offset + p - seg.start)
                    h_idx.append(patch.head if patch.head is not None else 0)
                    b_idx.append(b)
                    p_idx.append(p)
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
    if kind in HEAD_SITES:
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


# ---------------------------------------------------------------------------------------------
# Path patching
# ---------------------------------------------------------------------------------------------
Sender = tuple[int, int] | str
Receiver = tuple[int, int, str] | str


def path_patching(
    im: InstrumentedModel,
    clean_ids: Any,
    corrupt_ids: Any,
    metric: Metric,
    senders: Sequence[Sender],
    receivers: Sequence[Receiver],
    *,
    freeze_mlps: bool = False,
    sender_positions: PositionsLike = None,
    receiver_positions: PositionsLike = None,
    **hf_kwargs: Any,
) -> float:
    """The metric after patching the effect of ``senders`` on ``receivers`` through direct paths only.

    Args:
        im: the instrumented model.
        clean_ids, corrupt_ids: token ids ``[batch, pos]`` of the same shape.
        metric: ``metric(logits [batch, pos, vocab]) -> scalar``.
        senders: ``(layer, head)`` pairs (that head's ``attn.z``, all positions) and/or site names
            (e.g. ``"blocks.0.mlp_out"``), patched from the corrupted run.
        receivers: ``(layer, head, "q" | "k" | "v")`` (the head's query/key/value input; for
            ``"k"``/``"v"`` ``head`` is a key/value head, shared by a group of query heads under
            GQA) and/or site names (e.g. ``"blocks.3.resid_pre"``, or the last layer's
            ``resid_post`` for the direct path to the logits).
        freeze_mlps: also freeze every MLP output (``mlp_out``) to its clean value in step 2, so
            that only paths through the residual stream (no MLP in between) count.
        sender_positions: the positions at which senders take their corrupted value (default all;
            elsewhere they stay clean). Any ``positions=`` selector of the interventions: an int, a
            list, a slice, or one list per batch row (e.g. each prompt's subject token).
        receiver_positions: the positions at which receivers are patched in step 3 (default all),
            e.g. the final token for the name-mover queries of the IOI circuit (Wang et al.).
        **hf_kwargs: passed to the model (``attention_mask``, ...).

    Returns the metric of step 3 (compare with ``metric`` on the clean run).
    """
    clean, corrupt = prompt_pair(im, clean_ids, corrupt_ids)
    if not senders or not receivers:
        raise ValueError("path_patching needs at least one sender and one receiver")
    sender_heads, sender_sites = _parse_senders(im, senders)
    recv_heads, recv_sites = _parse_receivers(im, receivers, freeze_mlps)
    z_sites = [f"blocks.{i}.attn.z" for i in range(im.n_layers)]
    mlp_sites = [f"blocks.{i}.mlp_out" for i in range(im.n_layers)] if freeze_mlps else []
    with torch.no_grad():
        # 1. clean and corrupted caches
        _, clean_cache = im.run_with_cache(clean, sites=z_sites + mlp_sites, **hf_kwargs)
        _, corrupt_cache = im.run_with_cache(
            corrupt, sites=list(dict.fromkeys([z_sites[i] for i in sender_heads] + sender_sites)), **hf_kwargs)
        return _path_steps_2_3(im, clean, metric, clean_cache, corrupt_cache, sender_heads, sender_sites,
                               recv_heads, recv_sites, mlp_sites, hf_kwargs, sender_positions, receiver_positions)


def path_patching_by_head(
    im: InstrumentedModel,
    clean_ids: Any,
    corrupt_ids: Any,
    metric: Metric,
    receivers: Sequence[Receiver],
    *,
    freeze_mlps: bool = False,
    sender_positions: PositionsLike = None,
    receiver_positions: PositionsLike = None,
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    **hf_kwargs: Any,
) -> PatchingResult:
    """:func:`path_patching` with each attention head alone as the sender: a ``[layer, head]`` grid.

    The clean and corrupted caches are computed once; steps 2 and 3 then run for all heads as two
    batched sweeps (:meth:`InstrumentedModel.sweep`: one head per block of batch rows, ``batch_size``
    rows per forward), each equal to running that head alone. ``result.clean`` / ``result.corrupt``
    are the metric on the unpatched runs, and ``result.normalized()`` is the fraction of the
    clean-to-corrupted change carried by the path. ``sender_positions`` / ``receiver_positions`` as
    in :func:`path_patching`.
    """
    clean, corrupt = prompt_pair(im, clean_ids, corrupt_ids)
    if not receivers:
        raise ValueError("path_patching_by_head needs at least one receiver")
    recv_heads, recv_sites = _parse_receivers(im, receivers, freeze_mlps)
    layer_list = _layers(layers, im.n_layers)
    n_heads = _n_heads(im, "attn.z")
    z_sites = [f"blocks.{i}.attn.z" for i in range(im.n_layers)]
    mlp_sites = [f"blocks.{i}.mlp_out" for i in range(im.n_layers)] if freeze_mlps else []
    senders = [(layer, head) for layer in layer_list for head in range(n_heads)]
    recorded = list(dict.fromkeys(list(recv_heads) + recv_sites))
    with torch.no_grad():
        clean_logits, clean_cache = im.run_with_cache(clean, sites=z_sites + mlp_sites, **hf_kwargs)
        corrupt_logits, corrupt_cache = im.run_with_cache(corrupt, sites=z_sites, **hf_kwargs)
        clean_metric = _scalar(metric(clean_logits), "metric(clean logits)")
        corrupt_metric = _scalar(metric(corrupt_logits), "metric(corrupted logits)")
        del clean_logits, corrupt_logits
        # 2. per sender head: senders from corrupt, the rest frozen; a Hook keeps each receiver's value
        step2_values: list[dict[str, torch.Tensor]] = [{} for _ in senders]
        step2 = []
        for j, (layer, head) in enumerate(senders):
            variant = _path_step2(im, clean_cache, corrupt_cache, {layer: [head]}, [], mlp_sites, sender_positions)
            for name in recorded:
                variant.setdefault(name, []).append(Hook(_keep_into(step2_values[j], name)))
            step2.append(variant)
        im.sweep(clean, step2, metric=_discard, batch_size=batch_size, progress=progress, **hf_kwargs)
        # 3. per sender head: the clean run with only the receivers patched to their step-2 values
        step3 = [_path_step3(values, recv_heads, recv_sites, receiver_positions) for values in step2_values]
        results = im.sweep(clean, step3, metric=metric, batch_size=batch_size, progress=progress, **hf_kwargs)
    values = torch.tensor([_scalar(r, "metric(path-patched logits)") for r in results]).view(len(layer_list), n_heads)
    labels = {"layer": [str(x) for x in layer_list], "head": [str(h) for h in range(n_heads)]}
    return PatchingResult(values, ("layer", "head"), labels, "path", "noise", clean_metric, corrupt_metric)


def _discard(logits: torch.Tensor) -> None:
    """A sweep metric that keeps nothing (step 2 is run for what its hooks record)."""
    return None


def _keep_into(store: dict[str, torch.Tensor], name: str) -> Callable[[torch.Tensor], None]:
    def keep(value: torch.Tensor) -> None:
        store[name] = value.detach().clone()

    return keep


def prompt_pair(im: InstrumentedModel, clean_ids: Any, corrupt_ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean and corrupted prompts as token-id tensors of one shape ``[batch, pos]``.

    Patching and attribution pair activations position by position, so the shapes must agree;
    otherwise a ``ValueError`` names both shapes.
    """
    from mishax_py.inputs import as_ids

    clean = as_ids(clean_ids, im.model)
    corrupt = as_ids(corrupt_ids, im.model)
    if clean.shape != corrupt.shape:
        raise ValueError(
            f"clean_ids and corrupt_ids must have the same shape [batch, pos] (activations are patched position by "
            f"position), got {tuple(clean.shape)} and {tuple(corrupt.shape)}; pad them to a common length and pass "
            "attention_mask=..."
        )
    return clean, corrupt


def _parse_senders(im: InstrumentedModel, senders: Sequence[Sender]) -> tuple[dict[int, list[int]], list[str]]:
    """``(layer, head)`` senders grouped by layer, and sender site names."""
    n_heads = _n_heads(im, "attn.z")
    heads: dict[int, list[int]] = {}
    sites: list[str] = []
    for s in senders:
        if isinstance(s, str):
            sites += im.resolve(s)
        else:
            layer, head = _layer_head(s, im.n_layers, n_heads, "sender", "(layer, head)")
            heads.setdefault(layer, []).append(head)
    return heads, sites


def _parse_receivers(im: InstrumentedModel, receivers: Sequence[Receiver], freeze_mlps: bool
                     ) -> tuple[dict[str, list[int]], list[str]]:
    """Receiver heads as ``{q/k/v site: heads}``, and receiver site names."""
    n_heads, n_kv = _n_heads(im, "attn.z"), _n_heads(im, "attn.k")
    heads: dict[str, list[int]] = {}
    sites: list[str] = []
    for rcv in receivers:
        if isinstance(rcv, str):
            for name in im.resolve(rcv):
                if name.endswith(".attn.z") or (freeze_mlps and name.endswith(".mlp_out")):
                    raise ValueError(f"receiver {name!r} is frozen in step 2 of path patching; receivers are "
                                     "inputs (q/k/v of a head, or a residual-stream site)")
                sites.append(name)
        else:
            if len(rcv) != 3 or rcv[2] not in ("q", "k", "v"):
                raise ValueError(f"receiver {rcv!r} must be (layer, head, 'q' | 'k' | 'v') or a site name")
            limit = n_heads if rcv[2] == "q" else n_kv
            layer, head = _layer_head(rcv[:2], im.n_layers, limit, "receiver",
                                      "(layer, head, 'q')" if rcv[2] == "q" else "(layer, kv_head, 'k'|'v')")
            heads.setdefault(f"blocks.{layer}.attn.{rcv[2]}", []).append(head)
    return heads, sites


def _path_step2(im: InstrumentedModel, clean_cache: Any, corrupt_cache: Any, sender_heads: dict[int, list[int]],
                sender_sites: list[str], mlp_sites: list[str], sender_positions: PositionsLike) -> dict[str, list[Any]]:
    """Step 2's interventions: senders from corrupt (at ``sender_positions``), every other head (and MLP)
    frozen to clean."""
    step2: dict[str, list[Any]] = {}
    for i in range(im.n_layers):
        name = f"blocks.{i}.attn.z"
        edits: list[Any] = [Patch(clean_cache[name])]
        if i in sender_heads:
            edits.append(Patch(corrupt_cache[name], heads=sorted(set(sender_heads[i])), positions=sender_positions))
        step2[name] = edits
    for name in mlp_sites:
        step2[name] = [Patch(clean_cache[name])]
    for name in sender_sites:
        step2.setdefault(name, []).append(Patch(corrupt_cache[name], positions=sender_positions))
    return step2


def _path_step3(step2_values: Mapping[str, torch.Tensor], recv_heads: dict[str, list[int]], recv_sites: list[str],
                receiver_positions: PositionsLike) -> dict[str, list[Any]]:
    """Step 3's interventions: only the receivers' inputs, patched to their step-2 values."""
    step3: dict[str, list[Any]] = {}
    for name, heads in recv_heads.items():
        step3[name] = [Patch(step2_values[name], heads=sorted(set(heads)), positions=receiver_positions)]
    for name in recv_sites:
        step3.setdefault(name, []).append(Patch(step2_values[name], positions=receiver_positions))
    return step3


def _path_steps_2_3(im: InstrumentedModel, clean: torch.Tensor, metric: Metric, clean_cache: Any, corrupt_cache: Any,
                    sender_heads: dict[int, list[int]], sender_sites: list[str], recv_heads: dict[str, list[int]],
                    recv_sites: list[str], mlp_sites: list[str], hf_kwargs: dict[str, Any],
                    sender_positions: PositionsLike = None, receiver_positions: PositionsLike = None) -> float:
    step2 = _path_step2(im, clean_cache, corrupt_cache, sender_heads, sender_sites, mlp_sites, sender_positions)
    recorded = list(dict.fromkeys(list(recv_heads) + recv_sites))
    _, step2_cache = im.run_with_cache(clean, sites=recorded, interventions=step2, **hf_kwargs)
    step3 = _path_step3(step2_cache, recv_heads, recv_sites, receiver_positions)
    logits = im.run(clean, interventions=step3, **hf_kwargs)
    return _scalar(metric(logits), "metric(path-patched logits)")


def _layer_head(x: Any, n_layers: int, n_heads: int, what: str, form: str) -> tuple[int, int]:
    try:
        layer, head = int(x[0]), int(x[1])
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"{what} {x!r} must be {form} or a site name") from None
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise ValueError(f"{what} {tuple(x)} out of range: layer in [0, {n_layers}), head in [0, {n_heads})")
    return layer, head
