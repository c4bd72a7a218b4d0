"""Activation patching, in TransformerLens's conventions, batched and exact.

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
of one patched run (the batch of ``clean_ids``) to a scalar (a one-element tensor or a float).

Engines (``engine=``; the estimator, ``method=``, is always ``"exact"``)
-------------------------------------------------------------------------
* ``"packed"``: runs only the layers and positions a patch can change, many patches packed into
  few rows (:mod:`mishax_py.studies.packed`). Needs a family with ``supports_kv_prefix``.
* ``"rows"``: each patch is a full-length row of :func:`mishax_py.execution.sweep.sweep` (with
  ``Patch`` interventions), the same as a plain loop of patched runs.
* ``"auto"`` (default): packed where it can run, rows otherwise: with HF keyword arguments (e.g. a
  padding ``attention_mask``), ``interventions=``, inside another run (``im.intervene``) or on a
  family without ``supports_kv_prefix``.

Either way a patch that copies a value equal to the one already there (e.g. every position before
the first token where the two prompts differ) is not run: its result is the base run's metric.
``interventions=`` apply in every run (the base and source runs and each patched run), before
the patch at a site they share.

Inside :func:`mishax_py.distributed.split` each rank runs the base and source runs and its share of the
patches (either engine); every rank returns the whole grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.distributed import active_split
from mishax_py.execution.sweep import chunk_estimate, default_batch_size, sweep
from mishax_py.inputs import Ids, Metric, metric_float, prompt_pair
from mishax_py.interventions import Patch
from mishax_py.memory import (
    MemoryEstimate,
    announce_chunking,
    cache_bytes,
    check_estimate,
    estimate_run,
    get_max_memory,
    memory_budget,
    model_device,
    register_estimator,
    study_estimate,
)
from mishax_py.naming import site_kind
from mishax_py.runtime import active_context
from mishax_py.studies.conventions import (
    by_kind,
    check_direction,
    check_layers,
    check_pos_labels,
    check_positions,
    with_interventions,
)
from mishax_py.studies.packed import GridPatch, default_rows, largest_pass_rows, packed_sites, run_packed
from mishax_py.studies.result import PatchingResult

if TYPE_CHECKING:
    from mishax_py.cache import ActivationCache
    from mishax_py.instrumented import InstrumentedModel
    from mishax_py.interventions import Interventions

__all__ = ["ENGINES", "HEAD_SITES", "STREAM_SITES", "activation_patching", "patching_estimate"]

STREAM_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HEAD_SITES = ("attn.z", "attn.q", "attn.k", "attn.v", "attn.pattern")
ENGINES = ("auto", "packed", "rows")
_BY_STREAM = ("pos", "layer")
_BY_HEAD = ("head", "head_pos")


def activation_patching(
    im: InstrumentedModel,
    clean_ids: Ids,
    corrupt_ids: Ids,
    metric: Metric,
    *,
    site: str = "resid_pre",
    by: str | Sequence[str] | None = None,
    direction: str = "denoise",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    interventions: Interventions | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    method: str = "exact",
    engine: str = "auto",
    pos_labels: Sequence[str] | None = None,
    max_memory: int | str | None = None,
    **hf_kwargs: Any,
) -> PatchingResult:
    """Patch each activation of ``site`` from the source run into the base run; see the module docs.

    Args:
        im: the instrumented model.
        clean_ids, corrupt_ids: token ids ``[batch, pos]`` of the same shape.
        metric: ``metric(logits [batch, pos, vocab]) -> scalar`` (one-element tensor or float).
        site: ``resid_pre`` | ``resid_mid`` | ``resid_post`` | ``attn_out`` | ``mlp_out`` |
            ``attn.z`` | ``attn.q`` | ``attn.k`` | ``attn.v`` | ``attn.pattern`` (TransformerLens
            spellings such as ``"hook_resid_pre"`` or ``"z"`` are accepted).
        by: ``"pos"`` (``[layer, pos]``, default for residual sites) or ``"layer"`` (all positions
            at once) for residual sites; ``"head"`` (``[layer, head]``, all positions, default for
            head sites) or ``"head_pos"`` (``[layer, head, pos]``) for head sites.
        direction: ``"denoise"`` (clean into corrupted; TransformerLens) or ``"noise"``.
        layers: the layers to patch (default all); the result's layer axis follows this order.
        positions: the positions to patch (default all; negative counts from the end). With
            ``by="layer"``/``"head"`` these positions are patched together.
        interventions: ``{site: intervention}`` applied in every run (base, source and patched).
        batch_size: rows per forward pass (a row holds about ``pos + 1`` tokens with the packed
            engine, ``pos`` with the rows engine); default from a memory estimate.
        progress: a tqdm bar over forward passes (``None``: on for more than 8 passes on a terminal).
        method: the estimator: ``"exact"`` (the only one; see ``attribution_patching`` for estimates).
        engine: ``"auto"`` | ``"packed"`` | ``"rows"``: how the exact runs are made (module docs).
        pos_labels: tick labels for the position axis (e.g. the tokens), one per patched position.
        max_memory: the memory budget (bytes or ``"8GiB"``; default :func:`mishax_py.memory.memory_budget`).
            Before any forward, the base and source runs (with their caches) and the smallest pass of the
            engine (one patch of every prompt row, with those caches held) are estimated; over the budget,
            :class:`~mishax_py.memory.MemoryBudgetError` names the estimate and the budget at once. It also
            caps the default ``batch_size``.
        **hf_kwargs: passed to the model (``attention_mask``, ...); they select the rows engine.

    Returns a :class:`PatchingResult` (a tensor of the grid's shape, with ``clean``/``corrupt`` metrics).
    """
    clean, corrupt = prompt_pair(im, clean_ids, corrupt_ids)
    direction = check_direction(direction)
    if not callable(metric):
        raise TypeError(f"metric must be a function of the logits, got {type(metric).__name__}")
    kind = _check_site(site)
    mode = _check_by(kind, by)
    T = clean.shape[1]
    layer_list = check_layers(layers, im.n_layers)
    pos_list = check_positions(positions, T)
    check_pos_labels(pos_labels, len(pos_list))
    n_heads = _n_heads(im, kind)
    _check_method(method)
    packed = _use_packed(im, engine, interventions, hf_kwargs)

    patches, shape, axes = _enumerate(mode, layer_list, pos_list, n_heads)
    labels: dict[str, list[str]] = {"layer": [str(x) for x in layer_list]}
    if "head" in axes:
        labels["head"] = [str(h) for h in range(n_heads)]
    if "pos" in axes:
        labels["pos"] = list(pos_labels) if pos_labels is not None else [str(p) for p in pos_list]

    base_ids, source_ids = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    names = [im.layer_site(layer, kind) for layer in layer_list]
    base_sites = names + packed_sites(im, kind, layer_list) if packed else names
    _check_memory(im, base_sites, names, clean.shape[0], T, packed, max_memory, batch_size, len(patches))
    with torch.no_grad():
        base_logits, base_cache = im.run_with_cache(base_ids, sites=base_sites, interventions=interventions,
                                                    max_memory=max_memory, **hf_kwargs)
        source_logits, source_cache = im.run_with_cache(source_ids, sites=names, interventions=interventions,
                                                        max_memory=max_memory, **hf_kwargs)
        base_metric = metric_float(metric(base_logits), "metric(base logits)")
        source_metric = metric_float(metric(source_logits), "metric(source logits)")
        del source_logits

        values = torch.full(shape, float("nan"), dtype=torch.float32)
        todo: list[GridPatch] = []
        for patch in patches:
            name = im.layer_site(patch.layer, kind)
            if _same(base_cache[name], source_cache[name], patch, kind):
                values[patch.index] = base_metric
            else:
                todo.append(patch)
        def run(todo: list[GridPatch]) -> None:
            if not todo:
                return
            if packed:
                run_packed(im, kind, todo, values, metric, base_ids, base_logits, base_cache, source_cache,
                           batch_size, progress, max_memory=max_memory)
            else:
                _run_rows(im, kind, todo, values, metric, base_ids, source_cache, interventions, batch_size, progress,
                          dict(hf_kwargs, max_memory=max_memory))

        sp = active_split()
        if sp is None or packed:  # the packed engine splits its packed rows itself (run_packed)
            run(todo)
        elif todo:  # mishax_py.distributed.split(): each rank runs its share of the patches, all get every metric

            def share(mine: list[int]) -> torch.Tensor:
                run([todo[i] for i in mine])
                return torch.stack([values[todo[i].index] for i in mine]) if mine else torch.empty(0)

            done = sp.map(len(todo), share, what="activation_patching patches")
            for patch, value in zip(todo, done, strict=True):
                values[patch.index] = value

    clean_metric, corrupt_metric = ((source_metric, base_metric) if direction == "denoise"
                                    else (base_metric, source_metric))
    return PatchingResult(values, axes, labels, kind, direction, clean_metric, corrupt_metric)


def _check_memory(im: InstrumentedModel, base_sites: list[str], names: list[str], B: int, T: int, packed: bool,
                  max_memory: int | str | None, batch_size: int | None = None, n_patches: int = 0) -> None:
    """Fail before any forward when the base and source runs, or the smallest pass after them, cannot fit
    (:func:`patching_estimate` with one patch per pass), and say when the budget makes the passes smaller
    than the engine's default would make them for ``n_patches`` patches
    (:class:`~mishax_py.memory.MemoryChunkingWarning`)."""
    smallest = patching_estimate(im, base_sites, names, B, T, packed, B if packed else 1, max_memory)
    check_estimate(smallest, max_memory=max_memory, device=model_device(im),
                   reduce=f"patch fewer prompt rows at a time (clean_ids has {B}), fewer positions, or fewer layers")
    if packed and batch_size is None and (max_memory is not None or get_max_memory() is not None):
        announce_chunking(f"activation_patching (packed rows of {T + 1} tokens)",
                          default_rows(im, T + 1, T, max_memory=max_memory),
                          min(default_rows(im, T + 1, T), max(n_patches, 1) * B), "rows",
                          smallest.budget or 0, stacklevel=4)


def patching_estimate(im: InstrumentedModel, base_sites: list[str], names: list[str], B: int, T: int, packed: bool,
                      rows: int | None, max_memory: int | str | None,
                      patches: Sequence[GridPatch] | None = None) -> MemoryEstimate:
    """The peak of activation patching: the larger of its base and source runs and of one pass of ``rows`` rows.

    Estimates (:func:`mishax_py.memory.estimate_run`): the two caching runs -- one forward of the ``B``
    prompt rows, the base cache (``base_sites``), the source cache (``names``) and both runs' logits
    held -- and then one pass of the engine with those held: ``rows`` packed rows of ``T + 1`` tokens over a
    key/value prefix of ``T`` (packed; default :func:`mishax_py.studies.packed.default_rows`), or ``rows``
    full-length variants of ``B`` rows (rows engine, with the clean run's logits; default
    :func:`mishax_py.execution.sweep.default_batch_size`). With ``patches`` the pass is the largest one they
    make (:func:`mishax_py.studies.packed.largest_pass_rows`; rows engine: at most one variant per patch).
    """
    held = estimate_run(im, B, T, keep_logits=True).parts["logits"] * 2
    held += cache_bytes(im, base_sites, B, T) + cache_bytes(im, names, B, T)
    runs = estimate_run(im, B, T).plus(caches_and_logits=held)
    if packed:
        rows = rows or default_rows(im, T + 1, T, max_memory=max_memory)
        per_pass = (largest_pass_rows(patches, T, B, rows) if patches is not None else max(1, rows // B) * B)
        step = estimate_run(im, per_pass, T + 1, kv_len=T).plus(caches_and_logits=held)
        desc = f"a pass of {per_pass} packed rows of {T + 1} tokens"
    else:
        with torch.no_grad():
            per_pass = rows * B if rows else default_batch_size(im, B, T, False, max_memory=max_memory)
            n = max(1, min(per_pass // B, len(patches) if patches is not None else per_pass))
            per_pass = n * B
            step = chunk_estimate(im, B, T, n, n, False).plus(caches_and_logits=held)
        desc = f"a chunk of {n} patched variant(s) x {B} rows"
    budget = memory_budget(model_device(im), max_memory)
    return study_estimate(f"activation_patching ({B} prompt rows x {T} positions, caching "
                          f"{len(set(base_sites) | set(names))} sites)",
                          {"its base and source runs": runs, desc: step}, budget=budget,
                          chunks={"batch_size": per_pass})


def _estimate_activation_patching(
    im: InstrumentedModel, clean_ids: Ids, corrupt_ids: Ids, metric: Metric, *, site: str = "resid_pre",
    by: str | Sequence[str] | None = None, direction: str = "denoise", layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None, interventions: Interventions | None = None,
    batch_size: int | None = None, progress: bool | None = None, method: str = "exact", engine: str = "auto",
    pos_labels: Sequence[str] | None = None, max_memory: int | str | None = None, **hf_kwargs: Any,
) -> MemoryEstimate:
    """:func:`mishax_py.memory.estimate_memory` of :func:`activation_patching` (:func:`patching_estimate`)."""
    clean, corrupt = prompt_pair(im, clean_ids, corrupt_ids)
    kind = _check_site(site)
    mode = _check_by(kind, by)
    layer_list = check_layers(layers, im.n_layers)
    packed = _use_packed(im, engine, interventions, hf_kwargs)
    names = [im.layer_site(layer, kind) for layer in layer_list]
    base_sites = names + packed_sites(im, kind, layer_list) if packed else names
    B, T = clean.shape
    patches, _, _ = _enumerate(mode, layer_list, check_positions(positions, T), _n_heads(im, kind))
    # a patch of positions before the first token where the prompts differ copies equal values: it is not run
    differs = (clean != corrupt).any(0).nonzero()
    first = int(differs[0]) if len(differs) else T
    patches = [p for p in patches if max(p.positions) >= first]
    rows = batch_size if packed or batch_size is None else max(1, batch_size // B)
    return patching_estimate(im, base_sites, names, B, T, packed, rows, max_memory, patches)


def _check_site(site: str) -> str:
    kind = site_kind(site)
    if kind not in STREAM_SITES + HEAD_SITES:
        raise ValueError(f"activation_patching: unsupported site {site!r}; supported: "
                         f"{', '.join(STREAM_SITES + HEAD_SITES)}")
    return kind


def _check_by(kind: str, by: object) -> str:
    allowed = _BY_HEAD if kind in HEAD_SITES else _BY_STREAM
    if by is None:
        return allowed[0]
    mode = by_kind(by)
    if mode not in allowed:
        raise ValueError(f"by={by!r} is not supported for site {kind!r}; use one of {', '.join(allowed)}")
    return mode


def _check_method(method: str) -> None:
    if method in ENGINES:
        raise ValueError(f"method={method!r} is an execution strategy, now spelled engine={method!r}; method= names "
                         "the estimator, and activation patching has one: method='exact'")
    if method != "exact":
        raise ValueError(f"activation_patching computes exact patching only: method must be 'exact', got {method!r} "
                         "(estimates: attribution_patching(method='atp' | ...))")


def _use_packed(im: InstrumentedModel, engine: str, interventions: Interventions | None,
                hf_kwargs: dict[str, Any]) -> bool:
    """Whether the packed engine runs (see the module docs), or a ``ValueError`` for ``engine='packed'``
    where it cannot."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be 'auto', 'packed' or 'rows', got {engine!r}")
    reasons = []
    if not im.family.supports_kv_prefix:
        reasons.append(f"the {im.family.name!r} family does not support key/value prefixes (supports_kv_prefix)")
    if hf_kwargs:
        reasons.append(f"it builds its own attention masks and cannot take HF keyword arguments "
                       f"({', '.join(hf_kwargs)})")
    if interventions:
        reasons.append("it cannot apply interventions= to its packed rows")
    if active_context() is not None:
        reasons.append("it cannot run inside another run (im.intervene)")
    if engine == "packed" and reasons:
        raise ValueError(f"engine='packed' cannot run here: {'; '.join(reasons)}; use engine='rows' or 'auto'")
    return engine != "rows" and not reasons


def _n_heads(im: InstrumentedModel, kind: str) -> int:
    """Heads along the head axis of ``kind``: key/value heads for ``attn.k``/``attn.v``, else query heads."""
    if kind not in HEAD_SITES:
        return 0
    dims = im.family.dims
    return dims.n_kv_heads if kind in ("attn.k", "attn.v") else dims.n_heads


def _enumerate(mode: str, layers: list[int], pos: list[int], n_heads: int
               ) -> tuple[list[GridPatch], tuple[int, ...], tuple[str, ...]]:
    """Every patch of the grid, the grid's shape and its axes."""
    together = sorted(pos)
    if mode == "pos":
        out = [GridPatch((i, j), layer, None, [p]) for i, layer in enumerate(layers) for j, p in enumerate(pos)]
        return out, (len(layers), len(pos)), ("layer", "pos")
    if mode == "layer":
        return [GridPatch((i,), layer, None, together) for i, layer in enumerate(layers)], (len(layers),), ("layer",)
    if mode == "head":
        out = [GridPatch((i, h), layer, h, together) for i, layer in enumerate(layers) for h in range(n_heads)]
        return out, (len(layers), n_heads), ("layer", "head")
    out = [GridPatch((i, h, j), layer, h, [p]) for i, layer in enumerate(layers) for h in range(n_heads)
           for j, p in enumerate(pos)]
    return out, (len(layers), n_heads, len(pos)), ("layer", "head", "pos")


def _select(value: torch.Tensor, patch: GridPatch, kind: str) -> torch.Tensor:
    """The entries of a site value (batch-first) that ``patch`` overwrites."""
    pos = torch.tensor(patch.positions)
    if kind == "attn.pattern":
        return value[:, patch.head][:, pos]
    if patch.head is not None:
        return value[:, pos, patch.head]
    return value[:, pos]


def _same(base: torch.Tensor, source: torch.Tensor, patch: GridPatch, kind: str) -> bool:
    return torch.equal(_select(base, patch, kind), _select(source, patch, kind))


def _run_rows(im: InstrumentedModel, kind: str, todo: list[GridPatch], values: torch.Tensor, metric: Metric,
              base_ids: torch.Tensor, source_cache: ActivationCache, interventions: Interventions | None,
              batch_size: int | None, progress: bool | None, hf_kwargs: dict[str, Any]) -> None:
    """The rows engine: one full-length sweep variant per patch (after ``interventions``)."""
    variants = []
    for patch in todo:
        name = im.layer_site(patch.layer, kind)
        heads = None if patch.head is None else [patch.head]
        variants.append(with_interventions(interventions, {name: [Patch(source_cache[name], positions=patch.positions,
                                                                        heads=heads)]}))
    results = sweep(im, base_ids, variants, metric=lambda lg: metric_float(metric(lg), "metric(patched logits)"),
                    batch_size=batch_size, progress=progress, **hf_kwargs)
    for patch, r in zip(todo, results, strict=True):
        values[patch.index] = r


register_estimator(activation_patching, _estimate_activation_patching)
