"""Pieces of ``method="atp-layer"``: each element's patch run exactly to the end of one decoder layer.

Plain AtP linearises everything downstream of a patched element, including the nonlinearities
right next to it: the attention softmax its keys and queries feed (saturated patterns, the
failure AtP*'s QK fix addresses for query/key nodes) and the MLP of its own layer. For a
``resid_pre`` node that is the whole story of why AtP fails on, say, an induction prompt: a
token restored alone at layer 0 changes what the previous-token head writes at the *next*
position, an effect that passes through a softmax and a gelu before anything linear.

``atp-layer`` runs every element's patch exactly through the first decoder layer that reads
it, and linearises only from that layer's ``resid_post`` on:

    metric(patched) - metric(target)  ~=  (r'_stop - r_stop) . d metric / d r_stop |_target

where ``r_stop`` is the stop layer's ``resid_post`` of the target run and ``r'_stop`` the same
site with the element patched. ``stop`` is the element's own layer, or the next one for
``resid_post`` (which the next layer reads); when that is past the last layer, the patched run
goes on to the logits and the estimate is exact.

Each element is one replica of the input batch, started at its layer from the target run's
cached ``resid_pre`` and stopped at ``resid_post`` of ``stop`` (:class:`StopForward`), so the
cost is one decoder layer per element and batch row, on top of AtP's two forwards and one
backward -- about ``n_layers / 2`` times less compute than exact patching, which runs every
layer above the element.

:func:`atp_layer_estimate` is the estimator; the rest is its bookkeeping: which elements a grid
has (:func:`element_masks`), where each stops (:func:`stop_layer`) and the handlers that patch
and stop the replicated runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mishax_py.distributed import active_split
from mishax_py.execution.forward import forward_with, repeat_rows
from mishax_py.inputs import Metric
from mishax_py.progress import progress_bar
from mishax_py.runtime import Handler, SiteEvent
from mishax_py.studies.attribution.gradients import metric_per_replica, plain_run, replace_with, site_gradients
from mishax_py.studies.attribution.plan import Estimate, Grid

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["StopForward", "atp_layer_estimate", "element_masks", "patch_elements", "stop_layer", "stopper"]


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by :func:`stopper` once the value it waits for is recorded; ends the forward early."""


# Sites of a decoder layer that its own attention reads (the rest come after the attention).
_BEFORE_ATTENTION = ("resid_pre", "ln1", "attn.q", "attn.k", "attn.v", "attn.q_normed", "attn.k_normed",
                     "attn.rot_q", "attn.rot_k", "attn.scores", "attn.pattern")


def stop_layer(kind: str, layer: int) -> int:
    """The decoder layer whose ``resid_post`` ends the exact part for an element of site ``kind`` at ``layer``:
    the first layer whose attention reads the element (``layer`` itself for sites up to the attention
    pattern, ``layer + 1`` for ``attn.z`` and everything after it)."""
    return layer if kind in _BEFORE_ATTENTION else layer + 1


def element_masks(layout: str, by: str, shape: tuple[int, ...], pos_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """The elements of one layer's grid, as boolean masks over the site's value.

    Args:
        layout: ``"stream"`` (``[batch, pos, d]``), ``"head"`` (``[batch, pos, head, d_head]``) or
            ``"map"`` (``[batch, head, q_pos, k_pos]``), as :func:`mishax_py.studies.attribution.plan.site_layout`.
        by: ``"pos"``, ``"head"``, ``"head_pos"`` or ``"layer"``.
        shape: the site's value shape without the batch dim.
        pos_mask: ``[pos]`` bool, the patched positions (query positions for maps).

    Returns:
        ``(masks, index, out_shape)``: ``masks [n_elements, *shape[:-1], 1]`` (True where the
        element is patched; broadcast over the last dim), ``index [n_elements]`` the flat index
        of each element in a per-layer result of shape ``out_shape`` (the shape
        :func:`mishax_py.studies.attribution.plan.reduce_to_grid` gives), where elements outside ``pos_mask`` stay 0.
    """
    device = pos_mask.device
    positions = pos_mask.nonzero().flatten().tolist()
    n_pos = pos_mask.numel()
    if layout == "stream":
        axes = {"pos": 0}  # mask layout [pos, 1]
        n_heads = 0
    elif layout == "head":
        axes = {"pos": 0, "head": 1}  # [pos, head, 1]
        n_heads = shape[1]
    elif layout == "map":
        axes = {"head": 0, "pos": 1}  # [head, q_pos, 1] (the key axis is the broadcast one)
        n_heads = shape[0]
    else:
        raise ValueError(f"unknown site layout {layout!r}")
    if by in ("head", "head_pos") and layout == "stream":
        raise ValueError(f"by={by!r} needs a per-head site")
    mask_shape = tuple(shape[:-1])  # the value's shape without its last (broadcast) dim

    def mask(pos: int | None, head: int | None) -> torch.Tensor:
        m = torch.ones(mask_shape, dtype=torch.bool, device=device)
        pos_sel = pos_mask if pos is None else torch.arange(n_pos, device=device) == pos
        view = [1] * len(mask_shape)
        view[axes["pos"]] = n_pos
        m = m & pos_sel.view(view)
        if head is not None:
            hv = [1] * len(mask_shape)
            hv[axes["head"]] = n_heads
            m = m & (torch.arange(n_heads, device=device) == head).view(hv)
        return m.unsqueeze(-1)

    elements: list[tuple[int | None, int | None, int]]  # (position or all, head or all, flat index)
    out_shape: tuple[int, ...]
    if by == "layer":
        elements, out_shape = [(None, None, 0)], ()
    elif by == "pos":
        elements, out_shape = [(p, None, p) for p in positions], (n_pos,)
    elif by == "head":
        elements, out_shape = [(None, h, h) for h in range(n_heads)], (n_heads,)
    elif by == "head_pos":
        elements, out_shape = [(p, h, h * n_pos + p) for h in range(n_heads) for p in positions], (n_heads, n_pos)
    else:
        raise ValueError(f"unknown granularity by={by!r}")
    masks = torch.stack([mask(p, h) for p, h, _ in elements])
    index = torch.tensor([i for _, _, i in elements], dtype=torch.long, device=device)
    return masks, index, out_shape


def patch_elements(masks: torch.Tensor, source: torch.Tensor) -> Handler:
    """A handler for a batch of ``len(masks)`` replicas of ``source``'s batch: replica ``e`` takes
    ``source`` where ``masks[e]`` is True and keeps its own value elsewhere."""
    n = masks.shape[0]

    def h(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        rows = value.view(n, -1, *value.shape[1:])
        src = source.to(device=value.device, dtype=value.dtype).unsqueeze(0)
        return torch.where(masks.unsqueeze(1).to(value.device), src, rows).reshape(value.shape)

    return h


def stopper(store: dict[str, torch.Tensor], name: str) -> Handler:
    """A handler that records the site's value (detached) and ends the forward (:class:`StopForward`)."""

    def h(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        store[name] = value.detach()
        raise StopForward(name)

    return h


def atp_layer_estimate(im: InstrumentedModel, source: torch.Tensor, target: torch.Tensor, metric: Metric, grid: Grid,
                       layers: Sequence[int]) -> Estimate:
    """AtP with each element's patch run exactly through its stop layer, first order after (see the module docs).

    ``layers``: the model layer of each site in ``grid.names``.
    """
    n_layers, batch = im.n_layers, grid.batch
    stops = [stop_layer(grid.plan.kind, layer) for layer in layers]
    post = {s: im.layer_site(s, "resid_post") for s in set(stops) if s < n_layers}
    starts = {layer: im.layer_site(layer, "resid_pre") for layer in layers}
    src_store, m_src = plain_run(im, source, metric, grid.names, grid.interventions, grid.hf)
    # the target run: values where replicas start and patch, the metric's gradient where they stop
    store, grad_at, m_tgt = site_gradients(im, target, metric,
                                           list(dict.fromkeys([*starts.values(), *grid.names, *post.values()])),
                                           interventions=grid.interventions, **grid.hf)
    per_chunk = max(1, grid.batch_size // batch)
    plans = []
    for n, layer, s in zip(grid.names, layers, stops, strict=True):
        masks, index, out_shape = element_masks(grid.layout, grid.by, tuple(store[n].shape[1:]), grid.pos_mask)
        differs = (src_store[n] != store[n]).any(0)  # an element equal in both runs has effect 0
        changed = (masks & differs.to(masks.device)).flatten(1).any(1)  # differs: on the layer's device
        plans.append((n, layer, s, masks[changed], index[changed], out_shape))
    offsets = [0]
    for p in plans:
        offsets.append(offsets[-1] + len(p[4]))
    total = offsets[-1]

    def estimate(chosen: list[int]) -> torch.Tensor:
        """The estimates ``[len(chosen)]`` of the elements ``chosen`` (ascending; numbered across ``plans``)."""
        est = torch.zeros(len(chosen))
        bar = progress_bar(len(chosen), "attribution (exact layer per element)",
                           grid.progress if len(chosen) > per_chunk else False)
        at = 0
        for pi, (n, layer, s, all_masks, _index, _shape) in enumerate(plans):
            ks = [c - offsets[pi] for c in chosen if offsets[pi] <= c < offsets[pi + 1]]
            if not ks:
                continue
            masks = all_masks if len(ks) == len(all_masks) else all_masks[ks]
            start_value = store[starts[layer]]
            for e0 in range(0, len(ks), per_chunk):
                chunk = masks[e0:e0 + per_chunk]
                e = chunk.shape[0]
                start = start_value.repeat(e, *([1] * (start_value.ndim - 1)))
                hs: list[tuple[str, Handler]] = [(starts[layer], replace_with(start)),
                                                 (n, patch_elements(chunk, src_store[n]))]
                reached: dict[str, torch.Tensor] = {}
                if s < n_layers:
                    hs.append((post[s], stopper(reached, post[s])))
                logits: torch.Tensor | None
                with torch.no_grad():
                    try:
                        logits = forward_with(im, target.repeat(e, 1), hs, grid.interventions,
                                              repeat_rows(grid.hf, batch, e), start_layer=layer)
                    except StopForward:
                        logits = None
                rows = slice(at + e0, at + e0 + e)
                if logits is None:
                    delta = (reached[post[s]].float().view(e, batch, *grad_at[post[s]].shape[1:])
                             - store[post[s]].float())
                    est[rows] = (delta * grad_at[post[s]]).flatten(1).sum(1).cpu()
                else:  # the element's stop layer is past the last one: the patched run is exact
                    est[rows] = metric_per_replica(metric, logits, batch, differentiable=False).float().cpu() - m_tgt
                bar.update(e)
            at += len(ks)
        bar.close()
        return est

    sp = active_split()  # mishax_py.distributed.split(): each rank runs its share of the elements
    flat_est = (estimate(list(range(total))) if sp is None
                else sp.map(total, estimate, what="atp-layer elements").cpu())
    out = []
    for pi, (_n, _layer, _s, _masks, index, out_shape) in enumerate(plans):
        flat = torch.zeros(math.prod(out_shape))
        flat[index.cpu()] = flat_est[offsets[pi]:offsets[pi + 1]]
        out.append(flat.view(out_shape))
    return Estimate(torch.stack(out), m_tgt, m_src)
