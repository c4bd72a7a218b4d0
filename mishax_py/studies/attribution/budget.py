"""The memory of attribution estimates: what they hold, their steps, and the replica chunk that fits a budget.

:func:`attribution_estimate` is what :func:`~mishax_py.studies.attribution.api.attribution_patching`,
:func:`~mishax_py.studies.attribution.api.attribution_patching_sites` and
:func:`~mishax_py.studies.attribution.gradients.site_gradients` check before their first forward, and what
:func:`mishax_py.memory.estimate_memory` returns for them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mishax_py.devices import execution_device, model_dtype
from mishax_py.memory import (
    MemoryEstimate,
    cache_bytes,
    estimate_forward_bytes,
    estimate_run,
    fit_chunk,
    memory_budget,
    study_estimate,
)
from mishax_py.naming import layer_of
from mishax_py.studies.attribution.qk import MAX_CHUNK_ELEMENTS

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["attribution_estimate", "default_batch_size", "replica_rows"]

#: The estimators that interpolate (their replicas hold an interpolated value each).
_IG = ("ig", "ig-input")


def default_batch_size(method: str, batch: int) -> int:
    """Rows per replicated forward without a budget: 8 batches (32 for atp-layer, one layer without grad)."""
    return (32 if method == "atp-layer" else 8) * batch


def replica_rows(im: InstrumentedModel, method: str, batch: int, n_sites: int, steps: int, graddrop: bool,
                 n_elements: int = 0) -> int:
    """Rows of all the replicas a method runs (0: none): IG's interpolations, GradDrop's ``L + 1`` backward
    replicas, atp-layer's one replica per element (``n_elements`` per site, at most)."""
    if method == "ig":
        return n_sites * steps * batch
    if method == "ig-input":
        return steps * batch
    if method == "atp-layer":
        return n_sites * max(n_elements, 1) * batch
    return (1 + im.n_layers) * batch if graddrop else 0


def attribution_estimate(im: InstrumentedModel, batch: int, n_pos: int, names: Sequence[str], method: str, *,
                         steps: int = 16, batch_size: int | None = None, qk_fix: bool = False,
                         graddrop: bool = False, max_memory: int | str | None = None,
                         what: str = "attribution_patching", n_elements: int = 0) -> MemoryEstimate:
    """The peak memory of an attribution estimate, and the replica chunk (``chunks["batch_size"]``) that fits.

    Held throughout: the source run's values at the attributed sites (``names``; for the QK fix each layer's
    rotated queries/keys, scores and pattern as well, in both runs), the target run's values and the gradients
    there (fp32). Steps (:func:`mishax_py.memory.estimate_run` each): the source forward (no grad); the target
    forward and backward of ``batch`` rows (AtP, AtP*, atp-layer's gradient run); and for the replicated
    methods (GradDrop, ``ig``, ``ig-input``, ``atp-layer``) one chunk of ``batch_size`` rows -- with autograd,
    or for atp-layer one layer without it. With ``batch_size=None`` the chunk is the largest multiple of
    ``batch`` up to the default (8 batches; 32 for atp-layer) that fits the budget
    (:func:`mishax_py.memory.fit_chunk`); the estimate's chunk is at most the rows of all replicas
    (:func:`replica_rows`; ``n_elements``: atp-layer's elements per site).
    """
    names = [n for n in names if n in im.catalogue.by_name]  # derived sites (SAE features): not counted
    e = torch.empty((), dtype=model_dtype(im)).element_size()
    qk = []
    if qk_fix:
        for n in names:
            split = layer_of(n)
            if split is not None:
                qk += [im.layer_site(split[0], k) for k in ("attn.rot_q", "attn.rot_k", "attn.scores",
                                                            "attn.pattern")]
        qk = [n for n in qk if n in im.catalogue.by_name]  # a family without RoPE has no rot_q/rot_k
    values = cache_bytes(im, names, batch, n_pos)
    held = {"source_values": values + cache_bytes(im, qk, batch, n_pos), "target_values": values,
            "gradients": values * 4 // e}
    if qk:  # both runs' internals, and the float64 temporaries of one head chunk
        chunk_elems = min(MAX_CHUNK_ELEMENTS, batch * im.family.dims.n_heads * n_pos * n_pos)
        held["qk_fix"] = 2 * cache_bytes(im, qk, batch, n_pos) + 8 * 4 * chunk_elems
    held_est = MemoryEstimate(held)
    steps_est = {f"its source forward ({batch} rows x {n_pos} positions)": estimate_run(im, batch, n_pos) + held_est,
                 f"its target forward and backward ({batch} rows x {n_pos} positions)":
                     estimate_run(im, batch, n_pos, grad=True) + held_est}
    budget = memory_budget(execution_device(im), max_memory)
    replicated = method in ("ig", "ig-input", "atp-layer") or graddrop
    chunks: dict[str, int] = {}
    if replicated:
        if method == "atp-layer":
            dims = dataclasses.replace(im.family.dims, vocab=0, n_layers=1)

            def chunk(rows: int) -> MemoryEstimate:
                return estimate_forward_bytes(dims, rows, n_pos, dtype_bytes=e) + held_est
        else:
            def chunk(rows: int) -> MemoryEstimate:
                return estimate_run(im, rows, n_pos, grad=True).plus(
                    interpolation=rows * values // batch // max(len(names), 1) if method in _IG else 0) + held_est

        default = default_batch_size(method, batch)
        rows = batch_size if batch_size is not None else fit_chunk(chunk, default=default, budget=budget,
                                                                   minimum=batch, step=batch)
        chunks["batch_size"] = rows
        largest = min(rows, max(replica_rows(im, method, batch, len(names), steps, graddrop, n_elements), batch))
        steps_est[f"a chunk of {largest} replica rows x {n_pos} positions"] = chunk(largest)
    else:
        chunks["batch_size"] = batch_size or default_batch_size(method, batch)
    return study_estimate(f"{what}(method={method!r}, {len(names)} sites)", steps_est, budget=budget,
                          chunks=chunks)
