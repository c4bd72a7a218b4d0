"""The peak memory of an attribution graph, and the batch size that fits a budget.

:func:`graph_memory` is the estimate (by part, a :class:`~mishax_py.memory.MemoryEstimate`) of one
:func:`~mishax_py.circuits.build.attribution_graph` from the sizes it depends on; it follows
:mod:`mishax_py.memory`'s conventions (the forward's part from :func:`~mishax_py.memory.estimate_run`,
``4`` bytes wherever the graph computes in float32). :func:`fit_batch_size` picks the largest batch of
targets per backward pass that fits the budget and raises :class:`~mishax_py.memory.MemoryBudgetError`,
naming the estimate and the budget, when even one target per pass does not fit.
:func:`mishax_py.circuits.build.estimate_graph_memory` counts a prompt's active features and calls this.

Parts (``R`` targets per pass, ``T`` positions, ``L`` layers, ``d`` = d_model, ``F`` active features,
``C`` = ``min(F, max_feature_nodes)`` feature rows, ``n_l`` logit nodes, ``S = F + L*T + T`` sources,
``N = C + L*T + T + n_l`` nodes of the graph, ``e`` the model's bytes per value):

* ``forward``: the frozen forward at batch 1 with its autograd graph (:func:`~mishax_py.memory.estimate_run`);
* ``prompt``: the transcoders' dense pre-activations and activations on the prompt (``2 * T * d_sae * 4``
  per transcoder layer) and the error vectors (``L * T * d * 4``);
* ``rows``: the computed rows, ``(n_l + C) * S * 4``;
* then the larger of two phases. While rows are computed: ``backward`` (per pass: the cotangents,
  ``n_targets * R * T * d * e``, the gradients ``(L + 1) * R * T * d * e`` and
  two float32 copies ``2 * R * T * d * 4``, one attention layer's folded product,
  ``3 * H * T * R * d_head * 4``, and the linear temporaries of a layer, ``8 * R * T * max(d, H * d_head) * e``),
  ``edges`` (the block products ``T * R * m * 4`` of one layer, ``m`` the most features of one layer at one
  position, ``4 F / (T L)`` assumed, and the decoder rows padded per position, ``2 * F * d * 4``)
  and, when the cap binds, ``ranking`` (the row-by-row influence matrix ``(n_l + C)^2 * 4`` and one chunk
  ``1024 * F * 4``). After: ``graph``, the assembled adjacency ``N^2 * 4`` with one chunk of rows being
  copied (``1024 * N * 4 * 2``);
* ``fragmentation``: a seventh of the rest, what the heap holds besides around the many short-lived tensors
  (measured peaks of ``gemma2-tiny`` graphs of 64-512 tokens were 1.05-1.2 times the other parts).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from mishax_py.devices import model_dtype
from mishax_py.memory import (
    MemoryEstimate,
    check_fits,
    estimate_run,
    format_bytes,
    memory_budget,
    model_device,
)

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["fit_batch_size", "graph_memory"]

_F32 = 4


def graph_memory(im: InstrumentedModel, n_pos: int, n_features: int, *, batch_size: int,
                 max_feature_nodes: int | None, n_logits: int = 10, d_sae: int = 0,
                 n_transcoders: int | None = None) -> MemoryEstimate:
    """The peak bytes of an attribution graph of ``n_pos`` tokens with ``n_features`` active features (module docs).

    Args:
        im: the instrumented model (its ``family.dims`` and parameter dtype).
        n_pos: prompt length.
        n_features: active transcoder features on the prompt (all layers).
        batch_size: targets per backward pass.
        max_feature_nodes: the cap on feature rows (``None``: every active feature).
        n_logits: logit nodes.
        d_sae: transcoder width (for the prompt's dense features; 0 leaves that part out).
        n_transcoders: layers with a transcoder (default: every layer).
    """
    dims = im.family.dims
    T, L, d, R = int(n_pos), dims.n_layers, dims.d_model, int(batch_size)
    F = int(n_features)
    C = F if max_feature_nodes is None else min(F, int(max_feature_nodes))
    n_l = int(n_logits)
    S = F + L * T + T
    N = C + L * T + T + n_l
    n_tc = L if n_transcoders is None else int(n_transcoders)
    hd = dims.n_heads * dims.d_head
    eb = model_dtype(im).itemsize  # the model's (offloaded parameters keep theirs)
    m = max(1, 4 * F // max(1, T * L))
    loop = {  # while rows are computed
        "backward": (n_tc + 1) * R * T * d * eb + (L + 1) * R * T * d * eb
        + 2 * R * T * d * _F32 + 3 * dims.n_heads * T * R * dims.d_head * _F32 + 8 * R * T * max(d, hd) * eb,
        "edges": T * R * m * _F32 + 2 * F * d * _F32,
        "ranking": 0 if C >= F else (n_l + C) ** 2 * _F32 + min(1024, n_l + C) * F * _F32,
    }
    assembly = {"graph": N * N * _F32 + 2 * min(1024, n_l + C) * N * _F32}  # after: the rows become the graph
    parts = {
        "forward": int(estimate_run(im, 1, T, grad=True).total),
        "prompt": 2 * T * int(d_sae) * _F32 * n_tc + L * T * d * _F32,
        "rows": (n_l + C) * S * _F32,
        **(loop if sum(loop.values()) >= sum(assembly.values()) else assembly),
    }
    parts["fragmentation"] = sum(parts.values()) // 7  # the heap around many short-lived tensors (module docs)
    return MemoryEstimate(parts)


def fit_batch_size(im: InstrumentedModel, n_pos: int, n_features: int, *, batch_size: int,
                   max_feature_nodes: int | None, n_logits: int, d_sae: int, n_transcoders: int,
                   max_memory: int | str | None) -> tuple[int, MemoryEstimate]:
    """The largest batch size ``<= batch_size`` whose :func:`graph_memory` fits the budget, with its estimate.

    The budget is :func:`mishax_py.memory.memory_budget` (``max_memory=``, else the process-wide setting,
    else a share of the free memory of the model's device). A lowered batch size is said with a warning.

    Raises:
        MemoryBudgetError: when even one target per pass does not fit (naming the estimate and the budget).
    """

    def est(r: int) -> MemoryEstimate:
        return graph_memory(im, n_pos, n_features, batch_size=r, max_feature_nodes=max_feature_nodes,
                            n_logits=n_logits, d_sae=d_sae, n_transcoders=n_transcoders)

    full = est(batch_size)
    budget = memory_budget(model_device(im), max_memory)
    if full.total <= budget:
        return batch_size, full
    r = batch_size
    while r > 1 and est(r).total > budget:
        r //= 2
    small = est(r)
    what = (f"an attribution graph of {n_pos} tokens ({n_features} active features, "
            f"{'all' if max_feature_nodes is None else f'at most {max_feature_nodes}'} feature rows)")
    check_fits(small, budget, what, reduce="lower max_feature_nodes or shorten the prompt")
    warnings.warn(f"{what}: batch_size lowered from {batch_size} to {r} to fit the memory budget of "
                  f"{format_bytes(budget)} (estimate {small.describe()}; at batch_size={batch_size}: "
                  f"{format_bytes(full.total)})", ResourceWarning, stacklevel=3)
    return r, small
