"""Path patching (Wang et al. 2022, IOI): the effect of senders on receivers through the direct paths only.

``path_patching(im, clean_ids, corrupt_ids, metric, senders=..., receivers=...)`` runs the
three-step algorithm (``direction="noise"``, the paper's):

1. cache the clean and corrupted runs;
2. run the clean input with the senders patched from the corrupted run and every other attention
   head's output (``attn.z``) frozen to its clean value (and, with ``freeze_mlps=True``, every MLP
   output too), recording the receivers' inputs;
3. run the clean input with only the receivers' inputs patched to those values; the result is the
   metric of this run.

``direction="denoise"`` swaps the two runs: the corrupted run is the base, the senders take their
clean values and the other heads are frozen to their corrupted values.

``path_patching`` returns a 0-dim :class:`~mishax_py.studies.result.PatchingResult` (``float(res)``
is the metric of step 3; ``res.clean`` / ``res.corrupt`` the unpatched runs' metrics, so
``res.normalized()`` is the fraction of the change the path carries). ``path_patching_by_head``
does this for every head alone as the sender and returns a ``[layer, head]`` result.

``interventions=`` apply in every run (both caches, step 2 and step 3), before the study's own edits.
Inside :func:`mishax_py.distributed.split`, ``path_patching_by_head`` runs steps 2 and 3 of each rank's share
of the sender heads there; every rank returns the whole grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.devices import execution_device
from mishax_py.distributed import active_split
from mishax_py.execution.sweep import chunk_estimate, default_batch_size, sweep
from mishax_py.inputs import Ids, Metric, metric_float, prompt_pair
from mishax_py.interventions import Hook, Intervention, Patch, PositionsLike
from mishax_py.memory import (
    MemoryEstimate,
    cache_bytes,
    check_estimate,
    checked,
    estimate_run,
    memory_budget,
    register_estimator,
    rows_and_positions,
    study_estimate,
)
from mishax_py.studies.conventions import check_direction, check_layers, with_interventions
from mishax_py.studies.result import PatchingResult

if TYPE_CHECKING:
    from mishax_py.cache import ActivationCache
    from mishax_py.instrumented import InstrumentedModel
    from mishax_py.interventions import Interventions

__all__ = ["Receiver", "Sender", "path_patching", "path_patching_by_head", "path_patching_estimate"]

#: A sender: ``(layer, head)`` (that head's ``attn.z``) or a site name such as ``"blocks.0.mlp_out"``.
Sender = tuple[int, int] | str
#: A receiver: ``(layer, head, "q" | "k" | "v")`` (a head's input) or a site name such as ``"blocks.3.resid_pre"``.
Receiver = tuple[int, int, str] | str


def path_patching(
    im: InstrumentedModel,
    clean_ids: Ids,
    corrupt_ids: Ids,
    metric: Metric,
    *,
    senders: Sequence[Sender],
    receivers: Sequence[Receiver],
    direction: str = "noise",
    interventions: Interventions | None = None,
    method: str = "exact",
    freeze_mlps: bool = False,
    sender_positions: PositionsLike = None,
    receiver_positions: PositionsLike = None,
    max_memory: int | str | None = None,
    **hf_kwargs: Any,
) -> PatchingResult:
    """The metric after patching the effect of ``senders`` on ``receivers`` through direct paths only.

    Args:
        im: the instrumented model.
        clean_ids, corrupt_ids: token ids ``[batch, pos]`` of the same shape.
        metric: ``metric(logits [batch, pos, vocab]) -> scalar``.
        senders: ``(layer, head)`` pairs (that head's ``attn.z``, all positions) and/or site names
            (e.g. ``"blocks.0.mlp_out"``), patched from the source run.
        receivers: ``(layer, head, "q" | "k" | "v")`` (the head's query/key/value input; for
            ``"k"``/``"v"`` ``head`` is a key/value head, shared by a group of query heads under
            GQA) and/or site names (e.g. ``"blocks.3.resid_pre"``, or the last layer's
            ``resid_post`` for the direct path to the logits).
        direction: ``"noise"`` (default; the clean run with corrupted senders, as Wang et al.) or
            ``"denoise"`` (the corrupted run with clean senders).
        interventions: ``{site: intervention}`` applied in every run, before the study's own edits.
        method: ``"exact"`` (the only one).
        freeze_mlps: also freeze every MLP output (``mlp_out``) to its base value in step 2, so
            that only paths through the residual stream (no MLP in between) count.
        sender_positions: the positions at which senders take their source value (default all;
            elsewhere they keep the base value). Any ``positions=`` selector of the interventions:
            an int, a list, a slice, or one list per batch row (e.g. each prompt's subject token).
        receiver_positions: the positions at which receivers are patched in step 3 (default all),
            e.g. the final token for the name-mover queries of the IOI circuit (Wang et al.).
        max_memory: the memory budget (bytes or ``"8GiB"``; default :func:`mishax_py.memory.memory_budget`):
            the peak (:func:`path_patching_estimate`) is checked before any forward, and a run that cannot fit
            raises :class:`~mishax_py.memory.MemoryBudgetError` naming estimate and budget.
        **hf_kwargs: passed to the model (``attention_mask``, ...).

    Returns a 0-dim :class:`PatchingResult`: ``float(res)`` is the metric of step 3 (compare with
    ``res.clean`` and ``res.corrupt``).
    """
    clean, corrupt = prompt_pair(im, clean_ids, corrupt_ids)
    direction = check_direction(direction)  # (here, so that a deprecation warning points at the caller)
    _check_method(method)
    if not senders or not receivers:
        raise ValueError("path_patching needs at least one sender and one receiver")
    sender_heads, sender_sites = _parse_senders(im, senders)
    recv_heads, recv_sites = _parse_receivers(im, receivers, freeze_mlps)
    base, source = (clean, corrupt) if direction == "noise" else (corrupt, clean)
    frozen = _frozen_sites(im, freeze_mlps)
    wanted = [im.layer_site(layer, "attn.z") for layer in sender_heads] + sender_sites
    recorded = list(dict.fromkeys(list(recv_heads) + recv_sites))
    est = path_patching_estimate(im, *rows_and_positions(clean), frozen, list(dict.fromkeys(wanted)), recorded, 1,
                                 max_memory)
    check_estimate(est, max_memory=max_memory, device=execution_device(im),
                   reduce=f"patch fewer prompt rows at a time (clean_ids has {clean.shape[0]}) or fewer positions")
    with torch.no_grad(), checked():
        # 1. the base and source caches
        base_logits, base_cache = im.run_with_cache(base, sites=frozen, interventions=interventions, **hf_kwargs)
        source_logits, source_cache = im.run_with_cache(source, sites=list(dict.fromkeys(wanted)),
                                                        interventions=interventions, **hf_kwargs)
        base_metric = metric_float(metric(base_logits), "metric(base logits)")
        source_metric = metric_float(metric(source_logits), "metric(source logits)")
        del base_logits, source_logits
        # 2. senders from the source run, everything else frozen; record the receivers
        step2 = _path_step2(im, base_cache, source_cache, sender_heads, sender_sites, freeze_mlps, sender_positions)
        _, step2_cache = im.run_with_cache(base, sites=recorded, interventions=with_interventions(interventions, step2),
                                           **hf_kwargs)
        # 3. the base run with only the receivers patched
        step3 = _path_step3(step2_cache, recv_heads, recv_sites, receiver_positions)
        logits = im.run(base, interventions=with_interventions(interventions, step3), **hf_kwargs)
        value = metric_float(metric(logits), "metric(path-patched logits)")
    clean_metric, corrupt_metric = (base_metric, source_metric) if direction == "noise" else (source_metric,
                                                                                              base_metric)
    return PatchingResult(torch.tensor(value, dtype=torch.float32), (), {}, "path", direction, clean_metric,
                          corrupt_metric)


def path_patching_by_head(
    im: InstrumentedModel,
    clean_ids: Ids,
    corrupt_ids: Ids,
    metric: Metric,
    *,
    receivers: Sequence[Receiver],
    direction: str = "noise",
    layers: Sequence[int] | None = None,
    interventions: Interventions | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    method: str = "exact",
    freeze_mlps: bool = False,
    sender_positions: PositionsLike = None,
    receiver_positions: PositionsLike = None,
    max_memory: int | str | None = None,
    **hf_kwargs: Any,
) -> PatchingResult:
    """:func:`path_patching` with each attention head alone as the sender: a ``[layer, head]`` grid.

    The base and source caches are computed once; steps 2 and 3 then run for all heads as two
    batched sweeps (:func:`mishax_py.execution.sweep.sweep`: one head per block of batch rows, ``batch_size``
    rows per forward; ``progress`` a bar over forward passes), each equal to running that head alone.
    ``layers`` are the sender layers (default all; the result's layer axis follows this order).
    ``result.clean`` / ``result.corrupt`` are the metric on the unpatched runs, and
    ``result.normalized()`` is the fraction of the clean-to-corrupted change carried by the path.
    The other keywords as in :func:`path_patching`.
    """
    clean, corrupt = prompt_pair(im, clean_ids, corrupt_ids)
    direction = check_direction(direction)  # (here, so that a deprecation warning points at the caller)
    _check_method(method)
    if not receivers:
        raise ValueError("path_patching_by_head needs at least one receiver")
    recv_heads, recv_sites = _parse_receivers(im, receivers, freeze_mlps)
    layer_list = check_layers(layers, im.n_layers)
    n_heads = im.family.dims.n_heads
    base, source = (clean, corrupt) if direction == "noise" else (corrupt, clean)
    frozen = _frozen_sites(im, freeze_mlps)
    z_sites = [im.layer_site(i, "attn.z") for i in range(im.n_layers)]
    senders = [(layer, head) for layer in layer_list for head in range(n_heads)]
    recorded = list(dict.fromkeys(list(recv_heads) + recv_sites))
    est = path_patching_estimate(im, *rows_and_positions(clean), frozen, z_sites, recorded, len(senders), max_memory,
                                 batch_size=batch_size)
    check_estimate(est, max_memory=max_memory, device=execution_device(im),
                   reduce=f"patch fewer sender layers, fewer prompt rows (clean_ids has {clean.shape[0]}), or pass a "
                          "smaller batch_size")
    with torch.no_grad(), checked():
        base_logits, base_cache = im.run_with_cache(base, sites=frozen, interventions=interventions, **hf_kwargs)
        source_logits, source_cache = im.run_with_cache(source, sites=z_sites, interventions=interventions,
                                                        **hf_kwargs)
        base_metric = metric_float(metric(base_logits), "metric(base logits)")
        source_metric = metric_float(metric(source_logits), "metric(source logits)")
        del base_logits, source_logits

        def run(chosen: list[int]) -> torch.Tensor:
            """Steps 2 and 3 for the sender heads ``senders[j]``, ``j`` in ``chosen``: their metrics ``[len]``."""
            # 2. per sender head: senders from the source, the rest frozen; a Hook keeps each receiver's value
            step2_values: list[dict[str, torch.Tensor]] = [{} for _ in chosen]
            step2 = []
            for j, (layer, head) in enumerate(senders[i] for i in chosen):
                variant = _path_step2(im, base_cache, source_cache, {layer: [head]}, [], freeze_mlps, sender_positions)
                for name in recorded:
                    variant.setdefault(name, []).append(Hook(_keep_into(step2_values[j], name)))
                step2.append(with_interventions(interventions, variant))
            sweep(im, base, step2, metric=_discard, batch_size=batch_size, progress=progress, max_memory=max_memory,
                  **hf_kwargs)
            # 3. per sender head: the base run with only the receivers patched to their step-2 values
            step3 = [with_interventions(interventions, _path_step3(values, recv_heads, recv_sites, receiver_positions))
                     for values in step2_values]
            results = sweep(im, base, step3, metric=metric, batch_size=batch_size, progress=progress,
                            max_memory=max_memory, **hf_kwargs)
            return torch.tensor([metric_float(r, "metric(path-patched logits)") for r in results], dtype=torch.float32)

        sp = active_split()  # mishax_py.distributed.split(): each rank runs its share of the sender heads
        flat = (run(list(range(len(senders)))) if sp is None
                else sp.map(len(senders), run, what="path_patching_by_head sender heads"))
    values = flat.view(len(layer_list), n_heads)
    labels = {"layer": [str(x) for x in layer_list], "head": [str(h) for h in range(n_heads)]}
    clean_metric, corrupt_metric = (base_metric, source_metric) if direction == "noise" else (source_metric,
                                                                                              base_metric)
    return PatchingResult(values, ("layer", "head"), labels, "path", direction, clean_metric, corrupt_metric)


def _check_method(method: str) -> None:
    if method != "exact":
        raise ValueError(f"path patching is exact: method must be 'exact', got {method!r}")


def _frozen_sites(im: InstrumentedModel, freeze_mlps: bool) -> list[str]:
    """The sites step 2 freezes to the base run's values: every ``attn.z`` (and ``mlp_out``)."""
    z_sites = [im.layer_site(i, "attn.z") for i in range(im.n_layers)]
    return z_sites + ([im.layer_site(i, "mlp_out") for i in range(im.n_layers)] if freeze_mlps else [])


def _discard(logits: torch.Tensor) -> None:
    """A sweep metric that keeps nothing (step 2 is run for what its hooks record)."""
    return None


def _keep_into(store: dict[str, torch.Tensor], name: str) -> Callable[[torch.Tensor], None]:
    def keep(value: torch.Tensor) -> None:
        store[name] = value.detach().clone()

    return keep


def _parse_senders(im: InstrumentedModel, senders: Sequence[Sender]) -> tuple[dict[int, list[int]], list[str]]:
    """``(layer, head)`` senders grouped by layer, and sender site names."""
    n_heads = im.family.dims.n_heads
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
    n_heads, n_kv = im.family.dims.n_heads, im.family.dims.n_kv_heads
    frozen = set(_frozen_sites(im, freeze_mlps))
    heads: dict[str, list[int]] = {}
    sites: list[str] = []
    for rcv in receivers:
        if isinstance(rcv, str):
            for name in im.resolve(rcv):
                if name in frozen:
                    raise ValueError(f"receiver {name!r} is frozen in step 2 of path patching; receivers are "
                                     "inputs (q/k/v of a head, or a residual-stream site)")
                sites.append(name)
        else:
            if len(rcv) != 3 or rcv[2] not in ("q", "k", "v"):
                raise ValueError(f"receiver {rcv!r} must be (layer, head, 'q' | 'k' | 'v') or a site name")
            limit = n_heads if rcv[2] == "q" else n_kv
            layer, head = _layer_head(rcv[:2], im.n_layers, limit, "receiver",
                                      "(layer, head, 'q')" if rcv[2] == "q" else "(layer, kv_head, 'k'|'v')")
            heads.setdefault(im.layer_site(layer, f"attn.{rcv[2]}"), []).append(head)
    return heads, sites


def _path_step2(im: InstrumentedModel, base_cache: ActivationCache, source_cache: ActivationCache,
                sender_heads: dict[int, list[int]], sender_sites: list[str], freeze_mlps: bool,
                sender_positions: PositionsLike) -> dict[str, list[Intervention]]:
    """Step 2's edits: senders from the source run (at ``sender_positions``), every other head (and MLP)
    frozen to the base run's value."""
    step2: dict[str, list[Intervention]] = {}
    for i in range(im.n_layers):
        name = im.layer_site(i, "attn.z")
        edits: list[Intervention] = [Patch(base_cache[name])]
        if i in sender_heads:
            edits.append(Patch(source_cache[name], heads=sorted(set(sender_heads[i])), positions=sender_positions))
        step2[name] = edits
    if freeze_mlps:
        for i in range(im.n_layers):
            name = im.layer_site(i, "mlp_out")
            step2[name] = [Patch(base_cache[name])]
    for name in sender_sites:
        step2.setdefault(name, []).append(Patch(source_cache[name], positions=sender_positions))
    return step2


def _path_step3(step2_values: Mapping[str, torch.Tensor], recv_heads: dict[str, list[int]], recv_sites: list[str],
                receiver_positions: PositionsLike) -> dict[str, list[Intervention]]:
    """Step 3's edits: only the receivers' inputs, patched to their step-2 values."""
    step3: dict[str, list[Intervention]] = {}
    for name, heads in recv_heads.items():
        step3[name] = [Patch(step2_values[name], heads=sorted(set(heads)), positions=receiver_positions)]
    for name in recv_sites:
        step3.setdefault(name, []).append(Patch(step2_values[name], positions=receiver_positions))
    return step3


def _layer_head(x: Any, n_layers: int, n_heads: int, what: str, form: str) -> tuple[int, int]:
    try:
        layer, head = int(x[0]), int(x[1])
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"{what} {x!r} must be {form} or a site name") from None
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise ValueError(f"{what} {tuple(x)} out of range: layer in [0, {n_layers}), head in [0, {n_heads})")
    return layer, head


# -- memory (mishax_py.memory.estimate_memory) ---------------------------------------------------------------------
def path_patching_estimate(im: InstrumentedModel, B: int, T: int, frozen: Sequence[str], source_sites: Sequence[str],
                           recorded: Sequence[str], n_senders: int, max_memory: int | str | None, *,
                           batch_size: int | None = None) -> MemoryEstimate:
    """The peak of path patching (:func:`mishax_py.memory.estimate_run` for each forward, no grad).

    Held: the base run's cache of the ``frozen`` sites, the source run's of ``source_sites`` and the receivers'
    step-2 values (``recorded``, once per sender: ``n_senders``). Steps: the caching source run (the base run's
    logits held), and step 2 and 3 -- one forward of ``B`` rows (:func:`path_patching`) or one sweep chunk of
    :func:`mishax_py.execution.sweep.default_batch_size` rows (:func:`path_patching_by_head`, ``n_senders``
    variants, or ``batch_size``).
    """
    held = (cache_bytes(im, list(frozen), B, T) + cache_bytes(im, list(source_sites), B, T)
            + n_senders * cache_bytes(im, list(recorded), B, T))
    logits = estimate_run(im, B, T, keep_logits=True).parts["logits"]
    with torch.no_grad():
        rows = batch_size or (B if n_senders <= 1 else default_batch_size(im, B, T, False, max_memory=max_memory))
        n = min(max(1, rows // B), max(n_senders, 1))
        step = chunk_estimate(im, B, T, n, n_senders, False)
    steps = {"its base and source runs": estimate_run(im, B, T).plus(caches_and_logits=held + logits),
             f"steps 2 and 3 ({n} sender variant(s) x {B} rows per forward)": step.plus(caches=held)}
    what = "path_patching_by_head" if n_senders > 1 else "path_patching"
    return study_estimate(f"{what} ({B} prompt rows x {T} positions)", steps,
                          budget=memory_budget(execution_device(im), max_memory), chunks={"batch_size": n * B})


def _estimate_path_patching(im: InstrumentedModel, clean_ids: Ids, corrupt_ids: Ids, metric: Metric, *,
                            senders: Sequence[Sender], receivers: Sequence[Receiver], direction: str = "noise",
                            interventions: Interventions | None = None, method: str = "exact",
                            freeze_mlps: bool = False, sender_positions: PositionsLike = None,
                            receiver_positions: PositionsLike = None, max_memory: int | str | None = None,
                            **hf_kwargs: Any) -> MemoryEstimate:
    clean, _ = prompt_pair(im, clean_ids, corrupt_ids)
    sender_heads, sender_sites = _parse_senders(im, senders)
    recv_heads, recv_sites = _parse_receivers(im, receivers, freeze_mlps)
    wanted = [im.layer_site(layer, "attn.z") for layer in sender_heads] + sender_sites
    return path_patching_estimate(im, *rows_and_positions(clean), _frozen_sites(im, freeze_mlps),
                                  list(dict.fromkeys(wanted)), list(dict.fromkeys(list(recv_heads) + recv_sites)), 1,
                                  max_memory)


def _estimate_path_patching_by_head(im: InstrumentedModel, clean_ids: Ids, corrupt_ids: Ids, metric: Metric, *,
                                    receivers: Sequence[Receiver], direction: str = "noise",
                                    layers: Sequence[int] | None = None, interventions: Interventions | None = None,
                                    batch_size: int | None = None, progress: bool | None = None,
                                    method: str = "exact", freeze_mlps: bool = False,
                                    sender_positions: PositionsLike = None, receiver_positions: PositionsLike = None,
                                    max_memory: int | str | None = None, **hf_kwargs: Any) -> MemoryEstimate:
    clean, _ = prompt_pair(im, clean_ids, corrupt_ids)
    recv_heads, recv_sites = _parse_receivers(im, receivers, freeze_mlps)
    n_senders = len(check_layers(layers, im.n_layers)) * im.family.dims.n_heads
    z_sites = [im.layer_site(i, "attn.z") for i in range(im.n_layers)]
    return path_patching_estimate(im, *rows_and_positions(clean), _frozen_sites(im, freeze_mlps), z_sites,
                                  list(dict.fromkeys(list(recv_heads) + recv_sites)), n_senders, max_memory,
                                  batch_size=batch_size)


register_estimator(path_patching, _estimate_path_patching)
register_estimator(path_patching_by_head, _estimate_path_patching_by_head)
