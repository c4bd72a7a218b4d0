"""Integrated-gradients estimates of activation patching (``method="ig"`` and ``method="ig-input"``).

``"ig"``: integrated gradients along the straight line from the target activation to the
source activation, separately for each layer's site (the rest of the model runs normally):
``(a_s - a_t) . mean_k d metric / d a |_{a_t + alpha_k (a_s - a_t)}`` with midpoint
``alpha_k = (k + 1/2) / steps``. Summed over a layer's whole site it converges to the exact
effect of patching that whole site (completeness). All ``n_layers * steps`` interpolations run
as replicas of the batch, ``batch_size`` rows at a time.

``"ig-input"``: one path for every layer at once (the node form of EAP-IG, Hanna et al. 2024):
the token embeddings (the ``embed`` site, all positions) move on the straight line from the
target run's to the source run's, and the gradient is read at each attributed site along that
path: ``(a_s - a_t) . mean_k d metric / d a |_{run with embed = e_t + alpha_k (e_s - e_t)}``.
``steps`` forward/backward passes in total instead of ``n_layers * steps``; for the layer-0
``resid_pre`` (the embeddings themselves) it is the same estimate as ``"ig"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from mishax_py.distributed import active_split
from mishax_py.execution.forward import forward_with, repeat_rows
from mishax_py.inputs import Metric
from mishax_py.progress import progress_bar
from mishax_py.runtime import Handler
from mishax_py.studies.attribution.gradients import (
    grad_recorder,
    interpolated_gradients,
    metric_per_replica,
    plain_run,
    replace_with,
)
from mishax_py.studies.attribution.plan import Estimate, Grid, mask_positions, reduce_to_grid

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["ig_estimate", "ig_input_estimate"]


def _two_runs(im: InstrumentedModel, source: torch.Tensor, target: torch.Tensor, metric: Metric, grid: Grid,
              sites: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float, float]:
    """The source and target runs without gradients: their values at ``sites`` and their metrics."""
    src_store, m_src = plain_run(im, source, metric, sites, grid.interventions, grid.hf)
    tgt_store, m_tgt = plain_run(im, target, metric, sites, grid.interventions, grid.hf)
    return src_store, tgt_store, m_src, m_tgt


def _products(grid: Grid, src_store: Mapping[str, torch.Tensor], tgt_store: Mapping[str, torch.Tensor],
              mean_grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(a_s - a_t) . mean gradient`` per element (patched positions only), ``[n_layers, ...]``."""
    vals = []
    for n in grid.names:
        delta = mask_positions((src_store[n] - tgt_store[n]).float(), grid.layout, grid.pos_mask)
        vals.append(reduce_to_grid(delta * mean_grads[n], grid.layout, grid.by).to(grid.pos_mask.device))
    return torch.stack(vals)  # each layer's row moved from its layer's device to the ids' device


def ig_estimate(im: InstrumentedModel, source: torch.Tensor, target: torch.Tensor, metric: Metric, grid: Grid,
                *, steps: int) -> Estimate:
    """IG with each layer's site interpolated on its own (only the patched positions move)."""
    names = grid.names
    src_store, tgt_store, m_src, m_tgt = _two_runs(im, source, target, metric, grid, names)
    toward = {n: tgt_store[n] + mask_positions(src_store[n] - tgt_store[n], grid.layout, grid.pos_mask)
              for n in names}
    mean_grads = interpolated_gradients(im, target, metric, names, tgt_store, toward, steps=steps, batch=grid.batch,
                                        batch_size=grid.batch_size, interventions=grid.interventions, hf=grid.hf,
                                        progress=grid.progress)
    return Estimate(_products(grid, src_store, tgt_store, mean_grads), m_tgt, m_src)


def ig_input_estimate(im: InstrumentedModel, source: torch.Tensor, target: torch.Tensor, metric: Metric, grid: Grid,
                      *, steps: int) -> Estimate:
    """IG along the input path: interpolate ``embed``, read the gradient at every site in ``grid.names``."""
    names, batch, batch_size = grid.names, grid.batch, grid.batch_size
    if "embed" not in im.site_names():
        raise ValueError("method='ig-input' interpolates the token embeddings, but this model has no 'embed' site")
    src_store, tgt_store, m_src, m_tgt = _two_runs(im, source, target, metric, grid, [*names, "embed"])
    e_tgt = tgt_store["embed"]
    e_delta = src_store["embed"] - e_tgt
    alphas = [(k + 0.5) / steps for k in range(steps)]
    per_chunk = max(1, batch_size // batch)

    def accumulate(todo: list[float]) -> dict[str, torch.Tensor]:
        """Per site, the sum of the gradients along the path at the alphas ``todo``."""
        grad_sum = {n: torch.zeros_like(tgt_store[n], dtype=torch.float32) for n in names}
        bar = progress_bar(len(todo), "integrated gradients (input path)",
                           grid.progress if len(todo) > per_chunk else False)
        for a0 in range(0, len(todo), per_chunk):
            chunk = todo[a0:a0 + per_chunk]
            ids = target.repeat(len(chunk), 1)
            interp = torch.cat([e_tgt + a * e_delta for a in chunk])
            store: dict[str, torch.Tensor] = {}
            handlers: list[tuple[str, Handler]] = [("embed", replace_with(interp))]
            handlers += [(n, grad_recorder(store, n)) for n in names]
            with torch.enable_grad():
                logits = forward_with(im, ids, handlers, grid.interventions, repeat_rows(grid.hf, batch, len(chunk)))
                ms = metric_per_replica(metric, logits, batch, differentiable=True)
                grads = torch.autograd.grad(ms.sum(), [store[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads, strict=True):
                if g is not None:
                    grad_sum[n] += g.detach().float().view(len(chunk), batch, *g.shape[1:]).sum(0)
            del logits, grads, store
            bar.update(len(chunk))
        bar.close()
        return grad_sum

    sp = active_split()
    if sp is None:
        grad_sum = accumulate(alphas)
    else:  # mishax_py.distributed.split(): each rank sums its share of the steps; partials add in rank order
        mine = sp.share(steps, "ig-input steps")
        parts = sp.gather(lambda: torch.cat([g.flatten() for g in accumulate([alphas[i] for i in mine]).values()]),
                          what="ig-input gradient sums")
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        grad_sum = {n: t.view_as(tgt_store[n]) for t, n in
                    zip(total.split([tgt_store[n].numel() for n in names]), names, strict=True)}
    return Estimate(_products(grid, src_store, tgt_store, {n: grad_sum[n] / steps for n in names}), m_tgt, m_src)
