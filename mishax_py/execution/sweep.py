"""Batched experiments: many intervention variants in few forward passes.

``sweep(im, ids, variants)`` runs every variant (a ``{site: intervention}`` dict, as for
``im.run``) on the same base batch ``ids [B, P]`` and returns a list with one result per
variant (whatever the metric returns, ``None`` included: library code such as path patching
runs sweeps for what their hooks record), equal (up to float reassociation across batch sizes)
to ``im.run(ids, interventions=variant)``. :func:`stacked_sweep` (what ``im.sweep`` calls)
stacks those results into one tensor ``[n_variants, ...]``, detached unless ``grad=True``.

How it batches
--------------
* **Stacking.** Variants are stacked along the batch: in a chunk of ``n`` variants, variant
  ``j`` occupies rows ``j*B .. j*B+B-1``. At each site, one handler splits the batch into
  those row blocks and applies each variant's interventions to its own block only, as if it
  ran alone (so resampling, per-row sources and ``rows=`` selectors see only that variant's
  ``B`` rows). HF keyword tensors whose first dim is ``B`` (``attention_mask``, ...) are
  repeated per variant, so left-padded batches work unchanged.
* **Shared prefix.** A variant whose interventions all sit at layer ``>= l`` computes layers
  ``< l`` exactly like the clean run. One clean run (batch ``B``) records layer ``l``'s ``resid_pre``
  for every start layer needed; a chunk then skips layers ``< l`` (``RunContext.start_layer``)
  and starts from the cached value, repeated per variant. Variants are sorted by their earliest
  layer before chunking, so chunks share the longest prefixes. Variants with no interventions
  take the clean run's logits. Sites before the blocks (``embed``) start at layer 0; sites after
  them (``ln_final``, ``logits``) at the last layer.
* **Shared positions** (``share_positions``, under ``torch.no_grad()``, for families whose models take a
  KV cache: ``im.family.supports_kv_prefix``). Under causal attention an
  edit at positions ``>= p`` cannot change earlier positions. When every edit in a chunk is a
  built-in one whose positions start at ``p > 0`` (lists, slices, per-row lists; not ``"all"``,
  ``"new"``, ``Hook`` functions, or edits of attention maps), the chunk runs only positions
  ``p..P-1`` on top of a KV cache of the clean run's first ``p`` tokens (computed once per ``p``
  for the base batch, then tiled per variant); the logits of positions ``< p`` are the clean
  run's. Edits see absolute positions (``event.position_offset == p``), exactly as in generation.
  Only with ``attention_mask`` as the sole tensor keyword (other per-position inputs are not sliced)
  and no padding in it: HF's eager attention gives a padding query (all keys masked) uniform
  weights over every key, future ones included, so padded positions are not causal.
  Variants are sorted by (earliest layer, earliest position), so chunks share both.
* **Chunking.** ``batch_size`` is in rows; a chunk holds ``max(1, batch_size // B)`` whole
  variants (a variant is never split, so a chunk may exceed ``batch_size`` when ``B`` does).
  The default comes from :func:`default_batch_size` (a memory estimate, documented there).

Inside an outer ``im.intervene(...)`` block the outer interventions apply to every row of
every chunk (and prefix sharing is off, since they may depend on the batch).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.devices import execution_device, model_dtype
from mishax_py.distributed import active_split
from mishax_py.execution.forward import repeat_rows
from mishax_py.hf_compat import CACHE_KWARG, output_cache
from mishax_py.inputs import Ids, model_inputs
from mishax_py.interventions.base import Intervention, Interventions
from mishax_py.interventions.watch import SelectionWatch
from mishax_py.memory import (
    MemoryEstimate,
    announce_chunking,
    available_ram,
    check_budget,
    estimate_run,
    get_max_memory,
    memory_budget,
    register_estimator,
    study_estimate,
)
from mishax_py.naming import layer_site
from mishax_py.progress import progress_bar
from mishax_py.runtime import Handler, RunContext, SiteEvent, activate, active_context
from mishax_py.sites import UnknownSiteError

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["chunk_estimate", "default_batch_size", "stacked_sweep", "sweep"]


@dataclass
class _Variant:
    index: int
    sites: dict[str, list[Intervention]]  # canonical site -> interventions in order
    start: int  # the first decoder layer this variant changes (n_layers: changes nothing)
    first_pos: int = 0  # the first position it can change (0: unknown / all)


@dataclass
class _Chunk:
    variants: list[_Variant]
    start: int
    first_pos: int
    sites: dict[str, list[tuple[int, list[Intervention]]]] = field(default_factory=dict)  # site -> (slot, ivs)


def sweep(
    im: InstrumentedModel,
    ids: Ids,
    variants: Sequence[Interventions],
    metric: Callable[[torch.Tensor], Any] | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    *,
    share_prefix: bool = True,
    share_positions: bool = True,
    max_memory: int | str | None = None,
    **hf_kwargs: Any,
) -> list[Any]:
    """Run every variant on ``ids`` batched; one result per variant, in order.

    Args:
        im: the instrumented model.
        ids: the base batch of token ids ``[B, P]`` (or ``[P]``).
        variants: each a ``{site name | alias | glob: intervention | fn | [list]}`` dict.
        metric: ``metric(logits)`` with ``logits [B, P, vocab]`` of one variant; its return value
            is that variant's result. ``None``: the result is the logits themselves.
        batch_size: rows per forward pass (see the module docs); default :func:`default_batch_size`.
        progress: a tqdm bar over chunks; ``None`` = the library's rule (:func:`mishax_py.progress.progress_bar`:
            on for more than ``AUTO_MIN_STEPS`` chunks when stderr is a terminal).
        share_prefix: start chunks from the clean run's ``resid_pre`` of their earliest layer.
        share_positions: run only positions from a chunk's earliest edited one, on a KV cache of the
            clean prefix (no-grad runs of families with ``supports_kv_prefix`` only; see the module docs).
        max_memory: the memory budget of one chunk (bytes or ``"8GiB"``; default
            :func:`mishax_py.memory.memory_budget`). The largest chunk's memory is estimated before any
            forward (:func:`mishax_py.memory.estimate_run`, plus the clean run's logits and prefixes and, without a
            metric, every variant's logits); over the budget, :class:`~mishax_py.memory.MemoryBudgetError`
            names both. It also caps the default ``batch_size``.
        **hf_kwargs: passed to the model (``attention_mask`` ...); per-row tensors are repeated per variant.

    Autograd follows the caller's grad mode (wrap big sweeps in ``torch.no_grad()``); with grad on,
    the shared prefix stays in the graph, so gradients reach every layer.

    ``ids`` may also be text or a tokenizer's output (:mod:`mishax_py.inputs`; its attention mask is passed on).
    Raises the first variant's validation error (naming the variant, site and shapes) before any
    forward pass. Variants whose edits select nothing warn once for the whole sweep
    (:mod:`mishax_py.interventions.watch`).
    """
    ids, hf_kwargs = model_inputs(ids, im, hf_kwargs)
    B, P = ids.shape
    n_layers = im.n_layers
    outer = active_context()
    share = share_prefix and outer is None
    tensor_kwargs = {k for k, v in hf_kwargs.items() if isinstance(v, torch.Tensor)}
    share_pos = (
        share_positions
        and im.family.supports_kv_prefix
        and outer is None
        and not torch.is_grad_enabled()
        and tensor_kwargs <= {"attention_mask"}
        and not hf_kwargs.get("use_cache")
        and hf_kwargs.get(CACHE_KWARG) is None
        and hf_kwargs.get("past_key_values") is None
    )

    first_block = im.catalogue.order(layer_site(0, "resid_pre")) if n_layers else 0
    # Not with padding: HF's eager attention gives a padding query (every key masked) uniform weights
    # over all keys, future ones included, so its values depend on later positions.
    mask = hf_kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and bool((mask == 0).any()):
        share_pos = False
    plans: list[_Variant] = []
    for vi, variant in enumerate(variants):
        if not isinstance(variant, Mapping):
            raise TypeError(f"sweep variant {vi} must be a {{site: intervention}} dict, got {type(variant).__name__}")
        try:  # resolution, companions and validation are shared with im.run (InstrumentedModel.plan)
            ordered = im.plan(variant, batch=B, pos=P)
        except UnknownSiteError as e:
            raise UnknownSiteError(f"sweep variant {vi}: {e}") from None
        except (ValueError, IndexError) as e:
            raise type(e)(f"sweep variant {vi}: {e}") from e
        start = _start_layer(im, ordered, n_layers, first_block) if share else 0
        plans.append(_Variant(vi, ordered, start, _first_position(im, ordered, B, P) if share_pos else 0))

    results: list[Any] = [None] * len(plans)
    if not plans:
        return results
    active = [v for v in plans if v.sites]
    empty = [v for v in plans if not v.sites]

    # One clean run: logits for empty variants, resid_pre of every start layer the chunks need.
    rows_per_chunk = (batch_size if batch_size is not None
                      else default_batch_size(im, B, P, metric is None, max_memory=max_memory))
    if rows_per_chunk < 1:
        raise ValueError(f"batch_size must be >= 1, got {rows_per_chunk}")
    if batch_size is None and (max_memory is not None or get_max_memory() is not None):
        wanted = min(default_batch_size(im, B, P, metric is None), max(len(active), 1) * B)
        announce_chunking(f"sweep ({len(active)} variants of {B} rows x {P} positions)", rows_per_chunk, wanted,
                          "rows", memory_budget(execution_device(im), max_memory))
    per_chunk = max(1, rows_per_chunk // B)
    _check_chunk_memory(im, B, P, min(per_chunk, max(len(active), 1)), len(plans), metric is None, max_memory,
                        batch_size)
    # stable sort: equal keys keep the caller's order
    active.sort(key=lambda v: (v.start, v.first_pos), reverse=True)
    chunks = [_make_chunk(active[i : i + per_chunk]) for i in range(0, len(active), per_chunk)]
    prefix_layers = sorted({c.start for c in chunks if 0 < c.start})
    prefix: dict[int, torch.Tensor] = {}
    clean: torch.Tensor | None = None
    if empty or prefix_layers or any(c.first_pos for c in chunks):
        clean = _clean_run(im, ids, prefix_layers, prefix, hf_kwargs)
        for k, v in enumerate(empty):  # each empty variant gets its own tensor
            logits = clean if k == 0 else clean.clone()
            results[v.index] = metric(logits) if metric is not None else logits
    kv_prefixes: dict[int, Any] = {}  # first position -> KV cache of the clean run's tokens before it

    bar = progress_bar(len(chunks), "sweep", progress, unit="chunk")
    try:
        with SelectionWatch(variants, "sweep"):
            for chunk in chunks:
                p0 = chunk.first_pos
                if p0 and p0 not in kv_prefixes:
                    kv_prefixes[p0] = _kv_prefix(im, ids, p0, hf_kwargs)
                logits = _run_chunk(im, ids, chunk, prefix.get(chunk.start), kv_prefixes.get(p0), outer, hf_kwargs)
                for slot, v in enumerate(chunk.variants):
                    block = logits[slot * B : (slot + 1) * B]
                    if p0:
                        assert clean is not None
                        block = torch.cat([clean[:, :p0], block], 1)
                    results[v.index] = metric(block) if metric is not None else block
                del logits
                bar.update(1)
    finally:
        bar.close()
    return results


def stacked_sweep(
    im: InstrumentedModel,
    ids: Ids,
    variants: Sequence[Interventions],
    metric: Callable[[torch.Tensor], Any] | None = None,
    *,
    batch_size: int | None = None,
    progress: bool | None = None,
    grad: bool = False,
    **kwargs: Any,
) -> torch.Tensor:
    """:func:`sweep`, its per-variant results stacked into one tensor: what ``im.sweep`` returns.

    Returns:
        ``[n_variants]`` for a scalar metric (a float or a 0-dim tensor per variant), ``[n_variants, *S]``
        for a metric returning a tensor of shape ``S``, and the logits ``[n_variants, B, P, vocab]``
        when ``metric`` is ``None``. So ``im.sweep(ids, variants, metric).argmax()`` is the variant
        with the largest metric.

    ``grad=False`` (the default) runs under ``torch.no_grad()`` and returns a detached tensor (which also
    lets the sweep share the clean run's KV prefix, see the module docs); ``grad=True`` runs with
    autograd on, whatever the caller's grad mode, so gradients flow from the result to whatever the
    metric depends on (steering vectors, model weights, through the shared prefix too). Other
    keywords as for :func:`sweep`. A metric returning ``None`` or results of different shapes are
    errors: use :func:`sweep` for arbitrary per-variant outputs.

    Inside :func:`mishax_py.distributed.split`, each rank runs its share of the variants and every rank
    returns the whole stacked tensor (``grad=True`` cannot split: gradients do not cross ranks).
    """
    ids, kwargs = model_inputs(ids, im, kwargs)
    sp = active_split()
    if sp is not None and len(variants):
        if grad:
            raise ValueError("im.sweep(grad=True) cannot run inside mishax_py.distributed.split(): gradients do not "
                             "cross ranks; call it outside the split() block")

        def share(mine: list[int]) -> torch.Tensor:
            results = sweep(im, ids, [variants[i] for i in mine], metric=metric, batch_size=batch_size,
                            progress=progress, **kwargs)
            return torch.stack(_as_tensors(results)) if results else torch.empty(0, device=ids.device)

        with torch.no_grad():
            return sp.map(len(variants), share, what="im.sweep variants")
    with torch.enable_grad() if grad else torch.no_grad():
        results = sweep(im, ids, variants, metric=metric, batch_size=batch_size, progress=progress, **kwargs)
        if not results:
            if metric is None:
                dtype = model_dtype(im)
                return torch.empty((0, *ids.shape, im.family.dims.vocab), dtype=dtype, device=ids.device)
            return torch.empty((0,), device=ids.device)
        stacked = torch.stack(_as_tensors(results))
    return stacked if grad else stacked.detach()


def _as_tensors(results: list[Any]) -> list[torch.Tensor]:
    """Each variant's result as a tensor of one common shape, or an error naming the variant."""
    out: list[torch.Tensor] = []
    for i, r in enumerate(results):
        if r is None or not isinstance(r, (torch.Tensor, int, float, bool)):
            raise TypeError(
                f"im.sweep stacks the metric's results into a tensor, but for variant {i} it returned "
                f"{type(r).__name__}; return a number or a tensor, or call mishax_py.execution.sweep.sweep "
                "for a list of arbitrary per-variant results"
            )
        t = r if isinstance(r, torch.Tensor) else torch.tensor(r)
        if out and t.shape != out[0].shape:
            raise ValueError(
                f"im.sweep stacks the metric's results, but variant {i} returned shape {tuple(t.shape)} and "
                f"variant 0 shape {tuple(out[0].shape)}; return one shape for every variant"
            )
        out.append(t)
    return out


def _start_layer(im: InstrumentedModel, sites: Mapping[str, list[Intervention]], n_layers: int, first: int) -> int:
    """The first decoder layer whose computation a variant changes: ``n_layers`` when every edit sits after
    the blocks (``ln_final``, ``logits``: no decoder layer runs for it, see ``_entry_site``)."""
    start = n_layers
    for name in sites:
        layer = im.catalogue.by_name[name].layer
        if layer is None:
            after = im.catalogue.order(name) >= first
            layer = (n_layers if _entry_site(im, n_layers) else max(n_layers - 1, 0)) if after else 0
        start = min(start, layer)
    return start


def _entry_site(im: InstrumentedModel, layer: int) -> str | None:
    """The site whose value a run that starts at ``layer`` takes from the clean run.

    Layer ``l < n_layers``: its ``resid_pre``. ``l = n_layers`` (every edit after the blocks): the first
    site after the last decoder layer in forward order (``ln_final``), whose value determines everything
    after it; ``None`` when the family has no site there (such variants then start at the last layer).
    """
    n_layers = im.n_layers
    if layer < n_layers:
        return layer_site(layer, "resid_pre")
    if n_layers == 0:
        return None
    last = max(i for i, spec in enumerate(im.catalogue.specs) if spec.layer == n_layers - 1)
    after = [spec.name for spec in im.catalogue.specs[last + 1:] if spec.layer is None]
    return after[0] if after else None


def _first_position(im: InstrumentedModel, sites: Mapping[str, list[Intervention]], B: int, P: int) -> int:
    """The first position a variant can change (0 when unknown), at most ``P - 1``."""
    first = P - 1
    for name, ivs in sites.items():
        shape = im.site_info(name).concrete_shape(B, P)
        for iv in ivs:
            first_position = getattr(iv, "first_position", None)
            if first_position is None:  # e.g. a Hook: it may read or write any position
                return 0
            first = min(first, int(first_position(name, shape)))
    return max(first, 0)


def _make_chunk(variants: list[_Variant]) -> _Chunk:
    chunk = _Chunk(variants, min(v.start for v in variants), min(v.first_pos for v in variants))
    for slot, v in enumerate(variants):
        for site, ivs in v.sites.items():
            chunk.sites.setdefault(site, []).append((slot, ivs))
    return chunk


def _clean_run(
    im: InstrumentedModel, ids: torch.Tensor, layers: list[int], store: dict[int, torch.Tensor], hf_kwargs: dict
) -> torch.Tensor:
    """The unpatched forward of the base batch; records the entry value of each start layer in ``layers``
    (its ``resid_pre``, or for ``n_layers`` the first site after the blocks: ``_entry_site``)."""
    ctx = im.context(None, batch=ids.shape[0], pos=ids.shape[1])
    for layer in layers:

        def record(value: torch.Tensor, event: SiteEvent, layer: int = layer) -> torch.Tensor:
            store[layer] = value  # kept in the graph when grad is on
            return value

        im.add_handler(ctx, _entry(im, layer), record)
    with activate(ctx):
        return im.forward(ids, **hf_kwargs)


def _entry(im: InstrumentedModel, layer: int) -> str:
    site = _entry_site(im, layer)
    assert site is not None, "start layers past the blocks are only chosen when an entry site exists"
    return site


def _kv_prefix(im: InstrumentedModel, ids: torch.Tensor, p0: int, hf_kwargs: dict) -> Any:
    """The KV cache of the clean run over the first ``p0`` tokens of the base batch."""
    kw = dict(hf_kwargs)
    if "attention_mask" in kw and kw["attention_mask"] is not None:
        kw["attention_mask"] = kw["attention_mask"][:, :p0]
    # no run is active here (position sharing is off inside intervene), so this is the clean model
    return output_cache(im.model(input_ids=ids[:, :p0], use_cache=True, **kw))


def _run_chunk(
    im: InstrumentedModel,
    ids: torch.Tensor,
    chunk: _Chunk,
    prefix: torch.Tensor | None,
    kv_prefix: Any,
    outer: RunContext | None,
    hf_kwargs: dict,
) -> torch.Tensor:
    B = ids.shape[0]
    n = len(chunk.variants)
    p0 = chunk.first_pos
    ctx = RunContext(outer)
    kwargs = repeat_rows(hf_kwargs, B, n)
    if kv_prefix is not None:  # positions < p0 come from the clean run's KV cache, tiled per variant
        cache = copy.deepcopy(kv_prefix)
        cache.batch_select_indices(torch.arange(B).repeat(n))  # CPU indices: valid for every layer's device
        kwargs.update({CACHE_KWARG: cache, "use_cache": True})
        ids = ids[:, p0:]
    if prefix is not None:
        ctx.start_layer = chunk.start
        prefix = prefix[:, p0:]
        repeated = prefix.repeat(n, *([1] * (prefix.ndim - 1))) if n > 1 else prefix

        def start_here(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
            return repeated

        im.add_handler(ctx, _entry(im, chunk.start), start_here)  # before the variants' edits there
    for site, entries in chunk.sites.items():
        im.add_handler(ctx, site, _block_handler(entries, B, n))
    with activate(ctx):
        return im.forward(ids.repeat(n, 1) if n > 1 else ids, **kwargs)


def _block_handler(entries: list[tuple[int, list[Intervention]]], B: int, n: int) -> Handler:
    """One handler for a site: each variant's interventions on its own rows, the rest unchanged."""
    by_slot = dict(entries)

    def handle(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        sub_event = SiteEvent(event.site, event.layer, event.context, None)  # each block runs as if alone
        pieces: list[torch.Tensor] = []
        changed = False
        for slot in range(n):
            block = value[slot * B : (slot + 1) * B]
            for iv in by_slot.get(slot, ()):
                out = iv(block, sub_event)
                if not isinstance(out, torch.Tensor) or out.shape != block.shape:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(
                        f"intervention {iv!r} at site {event.site!r} returned {got}, expected {tuple(block.shape)}"
                    )
                block, changed = out, True
            pieces.append(block)
        return torch.cat(pieces, 0) if changed and n > 1 else (pieces[0] if changed else value)

    return handle


def default_batch_size(im: InstrumentedModel, B: int, P: int, keep_logits: bool = True, *,
                       max_memory: int | str | None = None) -> int:
    """Rows per forward pass for a sweep, from a memory estimate.

    Per row: :func:`mishax_py.memory.estimate_run` of one row of ``P`` positions (the formula is
    :func:`mishax_py.memory.estimate_forward_bytes`'s), with autograd's share when grad is enabled
    and the returned logits (``keep_logits``) held after the forward. The budget is half of the free
    accelerator memory on CUDA, or a quarter of the available RAM (at most 4 GiB) on CPU, and at
    most ``max_memory`` (or the process-wide :func:`mishax_py.memory.set_max_memory`). The result is a
    multiple of ``B`` in ``[B, 4096]`` rows (``[B, 256]`` on CPU, where bigger batches do not run
    faster).
    """
    per_row = estimate_run(im, 1, P, grad=torch.is_grad_enabled(), keep_logits=keep_logits).total
    device = execution_device(im)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget, cap = free // 2, 4096
    else:
        budget, cap = min(available_ram() // 4, 4 << 30), 256
    if max_memory is not None or get_max_memory() is not None:
        budget = min(budget, memory_budget(device, max_memory))
    rows = min(max(budget // max(per_row, 1), 1), cap)
    return max(B, rows // B * B)


def _check_chunk_memory(im: InstrumentedModel, B: int, P: int, n: int, n_variants: int, keep_logits: bool,
                        max_memory: int | str | None, batch_size: int | None) -> None:
    """Fail before any forward when the largest chunk (``n`` variants of ``B`` rows) cannot fit the budget.

    The estimate: one forward of ``n * B`` rows (with autograd's share when grad is on), the clean run's
    logits, and without a metric every variant's logits (the results, and their stacked copy).
    """
    est = chunk_estimate(im, B, P, n, n_variants, keep_logits)
    if n > 1:
        fewer = f"a smaller batch_size (now {n} variants of {B} rows per forward)"
    else:
        fewer = f"fewer rows in ids (B = {B}: one variant per forward already)"
    reduce = f"pass {fewer}, fewer positions (P = {P})" + (", a metric (to keep fewer logits)" if keep_logits else "")
    check_budget(est, f"sweep (a chunk of {n} variant(s) x {B} rows x {P} positions, {n_variants} variants)",
                 device=execution_device(im), max_memory=max_memory, reduce=reduce)


def chunk_estimate(im: InstrumentedModel, B: int, P: int, n: int, n_variants: int, keep_logits: bool
                   ) -> MemoryEstimate:
    """The peak of a sweep's largest chunk (``n`` variants of ``B`` rows of ``P`` positions): one forward of
    ``n * B`` rows (with autograd's share when grad is on), the clean run's logits, and without a metric every
    variant's logits (the results, and their stacked copy)."""
    est = estimate_run(im, n * B, P, grad=torch.is_grad_enabled())
    per_logits = estimate_run(im, B, P, keep_logits=True).parts["logits"]
    est = est.plus(clean_logits=per_logits)
    if keep_logits:
        est = est.plus(results=2 * n_variants * per_logits)
    return est


def _estimate_sweep(im: InstrumentedModel, ids: Ids, variants: Sequence[Interventions],
                    metric: Callable[[torch.Tensor], Any] | None = None, batch_size: int | None = None,
                    progress: bool | None = None, *, share_prefix: bool = True, share_positions: bool = True,
                    max_memory: int | str | None = None, **hf_kwargs: Any) -> MemoryEstimate:
    """:func:`mishax_py.memory.estimate_memory` of :func:`sweep`: its largest chunk, with the rows it would choose."""
    ids, hf_kwargs = model_inputs(ids, im, hf_kwargs)
    B, P = ids.shape
    rows = batch_size if batch_size is not None else default_batch_size(im, B, P, metric is None,
                                                                         max_memory=max_memory)
    n = min(max(1, rows // B), max(len(variants), 1))
    est = chunk_estimate(im, B, P, n, len(variants), metric is None)
    return study_estimate("sweep", {f"a chunk of {n} variant(s) x {B} rows x {P} positions": est},
                          budget=memory_budget(execution_device(im), max_memory), chunks={"batch_size": n * B})


def _estimate_stacked_sweep(im: InstrumentedModel, ids: Ids, variants: Sequence[Interventions],
                            metric: Callable[[torch.Tensor], Any] | None = None, *, batch_size: int | None = None,
                            progress: bool | None = None, grad: bool = False, **kwargs: Any) -> MemoryEstimate:
    with torch.set_grad_enabled(grad):
        return _estimate_sweep(im, ids, variants, metric, batch_size, progress, **kwargs)


register_estimator(sweep, _estimate_sweep)
register_estimator(stacked_sweep, _estimate_stacked_sweep)
