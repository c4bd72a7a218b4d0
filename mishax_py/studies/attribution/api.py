"""Attribution patching: gradient estimates of activation patching, for every element at once.

Activation patching runs the model once per patched element (a layer and position, a
head, ...) and reads the metric. Attribution patching (AtP; Nanda 2022, Syed et al.
2023) replaces each of those runs by the first-order Taylor estimate

    metric(patched) - metric(target)  ~=  (a_source - a_target) . d metric / d a |_target

so one forward pass per input and *one* backward pass give the estimate for every
element of every layer. The conventions follow :func:`mishax_py.studies.activation_patching.activation_patching`:

* ``direction="denoise"`` (default): clean activations are patched into the corrupt
  run; the target run is the corrupt one, where the gradient is taken.
* ``direction="noise"``: corrupt activations are patched into the clean run.
* The result is a :class:`~mishax_py.studies.result.PatchingResult` (an
  :class:`~mishax_py.studies.attribution.result.AttributionResult`): ``values`` estimates what
  activation patching returns, the metric of each patched run (``target metric + estimated
  change``); ``effects`` is the estimated change alone, ``clean``/``corrupt`` the metrics of the
  two unpatched runs, ``normalized()`` the fraction of the way to the source run.
* The metric maps the logits ``[batch, pos, vocab]`` of the whole batch to a scalar
  (typically a mean over rows); a patch applies to every row at once, so an estimate
  sums the per-row products (a batch is one experiment, as in activation patching).

Shapes of ``values`` (``n_layers`` = the layers attributed, default all):

=========================================================  ==========  =============================
site                                                       ``by``      ``values``
=========================================================  ==========  =============================
resid_pre/resid_mid/resid_post/attn_out/mlp_out (any       ``"pos"``   ``[n_layers, n_pos]``
``[batch, pos, d]`` site: ln1, mlp.post, ...)              ``"layer"`` ``[n_layers]``
attn.q/k/v/rot_q/rot_k/z (``[batch, pos, head, d_head]``)  ``"head"``  ``[n_layers, n_heads]``
                                                           ``"head_pos"`` ``[n_layers, n_heads, n_pos]``
                                                           ``"pos"``   ``[n_layers, n_pos]``
attn.scores/pattern (``[batch, head, q_pos, k_pos]``;      same as above, ``pos`` = the query position
``head_pos`` patches one query row of one head)
=========================================================  ==========  =============================

``k``/``v``/``rot_k`` have ``n_kv_heads`` heads (GQA). ``by="head"`` patches a head at
every position; ``by="head_pos"`` one head at one position.

Methods (``method=`` names the estimator)
------------------------------------------
``"atp"``
    Plain AtP (the formula above).
``"atp*"`` (Kramár et al. 2024)
    AtP with the QK fix (exact attention softmax for query/key/score nodes) and GradDrop
    (one backward per layer with that layer's residual contributions' gradient dropped; the
    ranking ``score`` is ``1/(L-1) sum_l |I_l|``, ``values``/``effects`` stay the signed
    estimate, :meth:`~mishax_py.studies.attribution.result.AttributionResult.worst_case` flags
    possible false negatives). Each fix is also available alone with ``method="atp"``
    (``qk_fix=True``, ``graddrop=True``). Details in :mod:`mishax_py.studies.attribution.atp`.
``"atp-layer"``
    AtP with each element's patch run *exactly* through the first decoder layer whose
    attention reads it, linearised only from that layer's ``resid_post`` on; exact past the
    last layer. About ``n_layers / 2`` times less compute than exact patching. Like every
    gradient estimate taken at the target run, it cannot see an effect through a metric that
    is saturated *there*; use ``"ig"`` for that. Details in :mod:`mishax_py.studies.attribution.layer`.
``"ig"``, ``steps=k`` (default 16)
    Integrated gradients along the straight line from the target to the source activation,
    separately for each layer's site; summed over a layer's site it converges to the exact
    effect of patching the whole site (completeness).
``"ig-input"``, ``steps=k`` (default 16)
    Integrated gradients along one path for every layer at once (the token embeddings
    interpolated; the node form of EAP-IG). ``steps`` passes in total instead of
    ``n_layers * steps``. On ``gemma2-tiny`` it tracks exact patching like ``"ig"``
    (``benchmarks/RESULTS.md``). Both IG paths: :mod:`mishax_py.studies.attribution.ig`.

Performance and memory: AtP is two forward passes and one backward pass whatever the
number of elements. Only the requested sites are kept (plus ``rot_q``/``rot_k``/
``scores``/``pattern`` for the QK fix). GradDrop, IG and atp-layer replicate the batch; the
replicas run in chunks of at most ``batch_size`` rows (default: 8 x the input batch; 32 x
for atp-layer, whose replicas run one layer without gradients), so memory is bounded by
``batch_size`` rows whatever ``steps`` and the depth. The QK fix works layer by layer and
head-chunk by head-chunk in float64, its ``[batch, heads, q, k]`` temporaries bounded by
:data:`mishax_py.studies.attribution.qk.MAX_CHUNK_ELEMENTS`. Long runs show a progress bar
(``progress=True``/``False``; default: on a terminal only).

Across processes (inside :func:`mishax_py.distributed.split`): ``"atp*"``/GradDrop splits its replicas,
``"atp-layer"`` its elements, ``"ig"`` its ``layers x steps`` interpolations and ``"ig-input"`` its steps over
the ranks; plain ``"atp"`` (with or without the QK fix) is one forward and backward that every rank runs
whole. Every rank returns the whole estimate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.devices import execution_device
from mishax_py.inputs import Ids, Metric, prompt_pair
from mishax_py.memory import (
    MemoryEstimate,
    announce_chunking,
    check_estimate,
    checked,
    register_estimator,
    rows_and_positions,
)
from mishax_py.studies.attribution.atp import atp_estimate
from mishax_py.studies.attribution.budget import attribution_estimate, default_batch_size, replica_rows
from mishax_py.studies.attribution.gradients import IG_STEPS, check_steps, plain_run, site_gradients
from mishax_py.studies.attribution.ig import ig_estimate, ig_input_estimate
from mishax_py.studies.attribution.layer import atp_layer_estimate
from mishax_py.studies.attribution.plan import (
    QK_KINDS,
    Estimate,
    Grid,
    grid_axes,
    grid_labels,
    plan_site,
    reduce_to_grid,
)
from mishax_py.studies.attribution.result import AttributionResult, AttributionResults
from mishax_py.studies.conventions import check_direction, check_layers, check_pos_labels, check_positions

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel, Interventions

__all__ = ["IG_METHODS", "METHODS", "attribution_patching", "attribution_patching_sites"]

#: The estimators of :func:`attribution_patching` (``method=``).
METHODS = ("atp", "atp*", "atp-layer", "ig", "ig-input")
#: The integrated-gradients estimators (they take ``steps=``).
IG_METHODS = ("ig", "ig-input")


def _check_metric(metric: object) -> None:
    if not callable(metric):
        raise TypeError(f"metric must be a function of the logits, got {type(metric).__name__}")


def attribution_patching(
    im: InstrumentedModel,
    clean_ids: Ids,
    corrupt_ids: Ids,
    metric: Metric,
    *,
    site: str = "resid_pre",
    by: Any = None,
    direction: str = "denoise",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    interventions: Interventions | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    method: str = "atp",
    steps: int = IG_STEPS,
    qk_fix: bool | None = None,
    graddrop: bool | None = None,
    pos_labels: Sequence[str] | None = None,
    max_memory: int | str | None = None,
    **hf_kwargs: Any,
) -> AttributionResult:
    """Estimate activation patching of ``site`` at every layer (and position/head) from gradients.

    Args:
        im: the instrumented model.
        clean_ids, corrupt_ids: token ids ``[batch, pos]`` of the same shape.
        metric: ``metric(logits [batch, pos, vocab]) -> scalar tensor``, differentiable.
        site: a site within a block: ``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``,
            ``"attn_out"``, ``"mlp_out"``, ``"attn.z"``, ``"attn.q"``, ``"attn.k"``,
            ``"attn.v"``, ``"attn.pattern"``, ... (TransformerLens suffixes such as
            ``"hook_resid_pre"`` work too).
        by: ``"pos"`` (default for ``[batch, pos, d]`` sites), ``"head"`` (default for
            per-head sites and attention maps), ``"head_pos"`` or ``"layer"`` (or a
            TransformerLens spelling such as ``("layer", "pos")``).
        direction: ``"denoise"`` (clean patched into corrupt; gradient on the corrupt
            run) or ``"noise"`` (corrupt into clean; gradient on the clean run).
        layers: the layers to attribute (default: all), in the order of the result's first axis.
        positions: the positions to patch (default all; negative counts from the end). With
            ``by="head"``/``"layer"`` these positions are patched together.
        interventions: applied in every run first (e.g. an ablation you study under).
        batch_size: most rows per forward for the replicated GradDrop/IG/atp-layer batches
            (default ``8 * batch``; ``32 * batch`` for ``"atp-layer"``, whose replicas run one
            layer without gradients).
        progress: show progress bars (default: on a terminal, for multi-chunk work).
        method: the estimator: ``"atp"``, ``"atp*"`` (QK fix + GradDrop), ``"atp-layer"`` (each
            element's own layer exact, first order after), ``"ig"`` (each layer's site interpolated
            on its own) or ``"ig-input"`` (one path: the input embeddings interpolated; see the
            module docs).
        steps: integrated-gradients steps (``method="ig"``/``"ig-input"``).
        qk_fix: recompute the attention softmax exactly for query/key/score sites
            (default: on for ``"atp*"`` on those sites).
        graddrop: AtP* GradDrop (default: on for ``"atp*"``); see :mod:`mishax_py.studies.attribution.atp`.
        pos_labels: tick labels of the position axis, one per patched position.
        max_memory: the memory budget (bytes or ``"8GiB"``; default :func:`mishax_py.memory.memory_budget`).
            Before any forward the peak is estimated (:func:`mishax_py.memory.estimate_memory` gives the same
            estimate): the default ``batch_size`` of the replicated methods shrinks to fit it, with a
            :class:`~mishax_py.memory.MemoryChunkingWarning` naming the chunk, and a run that cannot fit even
            one replica per forward raises :class:`~mishax_py.memory.MemoryBudgetError` naming estimate and budget.
        **hf_kwargs: passed to the model (e.g. ``attention_mask``).

    Returns:
        :class:`~mishax_py.studies.attribution.result.AttributionResult` (shapes in the module docs).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    direction = check_direction(direction)
    _check_metric(metric)
    clean, corrupt = prompt_pair(im, clean_ids, corrupt_ids)
    n_layers = im.n_layers
    layers = check_layers(layers, n_layers)
    batch, n_pos = clean.shape
    pos_list = check_positions(positions, n_pos)
    check_pos_labels(pos_labels, len(pos_list))
    plan = plan_site(im, site, by, layers)
    qk_kind = QK_KINDS.get(plan.kind)
    star = method == "atp*"
    if qk_fix is None:
        qk_fix = star and qk_kind is not None
    if qk_fix and qk_kind is None:
        raise ValueError(f"qk_fix applies to query/key/score sites {tuple(QK_KINDS)}, not {site!r}")
    if qk_fix and method not in ("atp", "atp*"):
        raise ValueError(f"qk_fix is an AtP correction; it does not combine with method={method!r}")
    if graddrop is None:
        graddrop = star
    if graddrop and method not in ("atp", "atp*"):
        raise ValueError(f"graddrop is an AtP correction; it does not combine with method={method!r}")
    if method in IG_METHODS:
        check_steps(steps)
    if batch_size is not None and batch_size < batch:
        raise ValueError(f"batch_size ({batch_size}) must be at least the input batch ({batch})")
    n_elements = _elements_per_site(im, plan.by, len(pos_list))
    est = attribution_estimate(im, batch, n_pos, plan.names, method, steps=steps, batch_size=batch_size,
                               qk_fix=bool(qk_fix), graddrop=bool(graddrop), max_memory=max_memory,
                               n_elements=n_elements)
    check_estimate(est, max_memory=max_memory, device=execution_device(im),
                   reduce=f"attribute fewer layers or positions, or fewer prompt rows (clean_ids has {batch})")
    if batch_size is None:
        batch_size = est.chunks["batch_size"]
        announce_chunking(f"attribution_patching(method={method!r})", batch_size,
                          min(default_batch_size(method, batch), replica_rows(im, method, batch, len(plan.names),
                                                                                 steps, bool(graddrop), n_elements)),
                          "rows", est.budget or 0)
    pos_mask = torch.zeros(n_pos, dtype=torch.bool, device=clean.device)
    pos_mask[pos_list] = True

    source, target = (clean, corrupt) if direction == "denoise" else (corrupt, clean)
    grid = Grid(plan=plan, batch=batch, batch_size=batch_size, pos_mask=pos_mask, interventions=interventions,
                hf=hf_kwargs, progress=progress)
    result: Estimate
    with checked():  # the whole peak was checked above
        if method == "ig":
            result = ig_estimate(im, source, target, metric, grid, steps=steps)
        elif method == "ig-input":
            result = ig_input_estimate(im, source, target, metric, grid, steps=steps)
        elif method == "atp-layer":
            result = atp_layer_estimate(im, source, target, metric, grid, layers)
        else:
            result = atp_estimate(im, source, target, metric, grid, qk_kind=qk_kind if qk_fix else None,
                                  graddrop=graddrop)
    effects, gd = result.effects, result.graddrop
    axes = grid_axes(plan.by)
    if "pos" in axes:  # keep the patched positions only, in the order given
        index = torch.tensor(pos_list, device=effects.device)
        effects = effects.index_select(len(axes) - 1, index)
        if gd is not None:
            gd = gd.index_select(len(axes), index)
    score = gd.abs().sum(0) / max(1, n_layers - 1) if gd is not None else effects.abs()
    m_tgt, m_src = result.target_metric, result.source_metric
    clean_m, corrupt_m = (m_src, m_tgt) if direction == "denoise" else (m_tgt, m_src)
    effects = effects.detach().float().cpu()
    return AttributionResult(
        values=effects + m_tgt, axes=axes, labels=grid_labels(plan, layers, pos_list, pos_labels), site=plan.kind,
        direction=direction, clean=clean_m, corrupt=corrupt_m, effects=effects, method=method, by=plan.by,
        layers=layers, sites=plan.names, qk_fix=bool(qk_fix), steps=steps if method in IG_METHODS else None,
        graddrop=None if gd is None else gd.detach().float().cpu(), score=score.detach().float().cpu(),
        positions=pos_list, under_interventions=bool(interventions), interventions=interventions or None,
    )


def attribution_patching_sites(
    im: InstrumentedModel,
    clean_ids: Ids,
    corrupt_ids: Ids,
    metric: Metric,
    *,
    sites: Mapping[str, Any] | Sequence[str],
    direction: str = "denoise",
    layers: Sequence[int] | None = None,
    interventions: Interventions | None = None,
    method: str = "atp",
    max_memory: int | str | None = None,
    **hf_kwargs: Any,
) -> AttributionResults:
    """Plain AtP for several sites at once: one source forward, one target forward and one backward.

    Equal to :func:`attribution_patching` with ``method="atp"`` for each site (the gradient of one
    backward pass is read at every site), for the cost of one call: e.g. every head's ``attn.z``,
    every ``mlp_out`` and every ``resid_pre`` position together.

    Args:
        sites: site kinds, ``["attn.z", "mlp_out"]`` (default granularity each), or a mapping
            ``{"attn.z": "head", "resid_pre": "pos"}`` to choose ``by`` per site.
        direction, layers, interventions, **hf_kwargs: as for :func:`attribution_patching`.
        method: the estimator; only ``"atp"`` (the one that shares a backward pass between sites).
        max_memory: the memory budget, checked before any forward as for :func:`attribution_patching`.

    Returns:
        :class:`~mishax_py.studies.attribution.result.AttributionResults`: ``{site: AttributionResult}``
        in the order given (keys as given); ``.plot(folder)`` writes one heatmap per site.
    """
    if method != "atp":
        raise ValueError(f"attribution_patching_sites shares one backward pass between sites, so method must be "
                         f"'atp', got {method!r}; call attribution_patching per site for other estimators")
    direction = check_direction(direction)
    _check_metric(metric)
    clean, corrupt = prompt_pair(im, clean_ids, corrupt_ids)
    spec = dict(sites) if isinstance(sites, Mapping) else dict.fromkeys(sites)
    if not spec:
        raise ValueError("attribution_patching_sites needs at least one site")
    layers = check_layers(layers, im.n_layers)
    plans = {key: plan_site(im, key, by, layers) for key, by in spec.items()}
    all_names = list(dict.fromkeys(n for plan in plans.values() for n in plan.names))
    est = attribution_estimate(im, *rows_and_positions(clean), all_names, "atp", max_memory=max_memory,
                               what="attribution_patching_sites")
    check_estimate(est, max_memory=max_memory, device=execution_device(im),
                   reduce=f"attribute fewer sites or layers, or fewer prompt rows (clean_ids has {clean.shape[0]})")
    source, target = (clean, corrupt) if direction == "denoise" else (corrupt, clean)
    src_store, m_src = plain_run(im, source, metric, all_names, interventions, hf_kwargs)
    with checked():  # checked above
        tgt_values, grads, m_tgt = site_gradients(im, target, metric, all_names, interventions=interventions,
                                                  **hf_kwargs)
    clean_m, corrupt_m = (m_src, m_tgt) if direction == "denoise" else (m_tgt, m_src)
    positions = list(range(clean.shape[1]))
    out: dict[str, AttributionResult] = {}
    for key, plan in plans.items():
        effects = torch.stack([  # each layer's grid from its own device (a model split over devices)
            reduce_to_grid((src_store[n] - tgt_values[n]).float() * grads[n], plan.layout, plan.by).detach().cpu()
            for n in plan.names
        ]).float()
        out[key] = AttributionResult(
            values=effects + m_tgt, axes=grid_axes(plan.by), labels=grid_labels(plan, layers, positions, None),
            site=plan.kind, direction=direction, clean=clean_m, corrupt=corrupt_m, effects=effects, method="atp",
            by=plan.by, layers=layers, sites=plan.names, score=effects.abs(), positions=positions,
            under_interventions=bool(interventions), interventions=interventions or None,
        )
    return AttributionResults(out)


# -- memory (mishax_py.memory.estimate_memory) -------------------------------------------------------------------
def _estimate_attribution_patching(
    im: InstrumentedModel, clean_ids: Ids, corrupt_ids: Ids, metric: Metric, *, site: str = "resid_pre",
    by: Any = None, direction: str = "denoise", layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None, interventions: Interventions | None = None,
    batch_size: int | None = None, progress: bool | None = None, method: str = "atp", steps: int = IG_STEPS,
    qk_fix: bool | None = None, graddrop: bool | None = None, pos_labels: Sequence[str] | None = None,
    max_memory: int | str | None = None, **hf_kwargs: Any,
) -> MemoryEstimate:
    """:func:`mishax_py.memory.estimate_memory` of :func:`attribution_patching` (:func:`attribution_estimate`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    clean, _ = prompt_pair(im, clean_ids, corrupt_ids)
    plan = plan_site(im, site, by, check_layers(layers, im.n_layers))
    star = method == "atp*"
    qk = (star and QK_KINDS.get(plan.kind) is not None) if qk_fix is None else qk_fix
    n_pos = len(check_positions(positions, clean.shape[1]))
    return attribution_estimate(im, *rows_and_positions(clean), plan.names, method, steps=steps, batch_size=batch_size,
                                qk_fix=bool(qk), graddrop=star if graddrop is None else graddrop,
                                max_memory=max_memory, n_elements=_elements_per_site(im, plan.by, n_pos))


def _elements_per_site(im: InstrumentedModel, by: str, n_pos: int) -> int:
    """At most how many elements one site's grid has (atp-layer runs a replica per element)."""
    heads = im.family.dims.n_heads
    return {"pos": n_pos, "layer": 1, "head": heads, "head_pos": heads * n_pos}.get(by, n_pos * heads)


def _estimate_attribution_patching_sites(
    im: InstrumentedModel, clean_ids: Ids, corrupt_ids: Ids, metric: Metric, *,
    sites: Mapping[str, Any] | Sequence[str],
    direction: str = "denoise", layers: Sequence[int] | None = None, interventions: Interventions | None = None,
    method: str = "atp", max_memory: int | str | None = None, **hf_kwargs: Any,
) -> MemoryEstimate:
    """:func:`mishax_py.memory.estimate_memory` of :func:`attribution_patching_sites`."""
    clean, _ = prompt_pair(im, clean_ids, corrupt_ids)
    spec = dict(sites) if isinstance(sites, Mapping) else dict.fromkeys(sites)
    layer_list = check_layers(layers, im.n_layers)
    names = list(dict.fromkeys(n for key, by in spec.items() for n in plan_site(im, key, by, layer_list).names))
    return attribution_estimate(im, *rows_and_positions(clean), names, "atp", max_memory=max_memory,
                                what="attribution_patching_sites")


register_estimator(attribution_patching, _estimate_attribution_patching)
register_estimator(attribution_patching_sites, _estimate_attribution_patching_sites)
