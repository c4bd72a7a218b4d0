"""Plain AtP and AtP* (``method="atp"``/``"atp*"``): one backward pass at the target run, with the QK fix and GradDrop.

AtP (Nanda 2022, Syed et al. 2023) estimates the effect of patching each element as

    metric(patched) - metric(target)  ~=  (a_source - a_target) . d metric / d a |_target

from one source forward and one target forward and backward. AtP* (Kramár et al. 2024) adds
two fixes, each also available alone (``qk_fix=True``, ``graddrop=True`` with ``method="atp"``):

*QK fix* (attention saturation): for nodes that act on the attention scores (``attn.q``,
``attn.k``, their QK-normed ``attn.q_normed``/``attn.k_normed`` where the family has them,
``attn.rot_q``, ``attn.rot_k``, ``attn.scores``) the change of the attention
*pattern* is computed exactly -- the softmax is recomputed for the patched queries/keys -- and
only the map from the pattern to the metric is linearised:
``sum (pattern' - pattern) . d metric / d pattern`` (:mod:`~mishax_py.studies.attribution.qk`).
The scores are recomputed from the cached rotated queries/keys (``attn.q``/``attn.k`` in a
family without rotary embeddings) with each layer's scale and soft-cap from
``im.family.attention(layer)``; the recomputation is checked against the cached
``attn.scores`` and a mismatch raises (the fix then does not apply to that model).

*GradDrop* (cancellation): for every layer ``l`` a backward pass in which the gradient through
layer ``l``'s contributions to the residual stream (its ``attn_out`` and ``mlp_out``) is set to
zero, giving estimates ``I_l``. The paper's score (their eq. 11) is ``c = 1/(L-1) * sum_l |I_l|``
-- a non-negative *magnitude* of the effect, used to rank nodes. The ``L`` backward passes are
batched: the target input is replicated ``L + 1`` times and row-group ``l`` drops layer ``l``
(chunked by ``batch_size`` rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mishax_py.distributed import active_split
from mishax_py.execution.forward import forward_with, repeat_rows
from mishax_py.inputs import Metric
from mishax_py.naming import layer_of
from mishax_py.progress import progress_bar
from mishax_py.runtime import Handler, SiteEvent
from mishax_py.studies.attribution.gradients import grad_recorder, metric_per_replica, plain_run
from mishax_py.studies.attribution.plan import Estimate, Grid, mask_positions, reduce_to_grid
from mishax_py.studies.attribution.qk import ScoreFn, check_scores, qk_fix_layer

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["atp_estimate", "dropper"]



def dropper(rows: torch.Tensor) -> Handler:
    """Zero the gradient flowing back through this site for batch ``rows`` (values unchanged)."""

    def h(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        shape = [-1] + [1] * (value.ndim - 1)
        return torch.where(rows.view(shape).to(value.device), value.detach(), value)

    return h


def _drop_sites(im: InstrumentedModel, layer: int) -> list[str]:
    """The sites through which layer ``layer`` writes to the residual stream (``attn_out``, ``mlp_out``)."""
    out = []
    for part in ("attn_out", "mlp_out"):
        name = im.layer_site(layer, part)
        try:
            out.append(im.resolve(name)[0])
        except KeyError as e:
            raise ValueError(f"GradDrop needs the site {name} (a layer's residual contribution): {e}") from None
    return out


def _qk_internals(im: InstrumentedModel, layer: int) -> dict[str, str]:
    """The sites of layer ``layer`` the QK fix reads: ``{"rot_q", "rot_k", "scores", "pattern"}`` -> site name.

    The scores are computed from the rotated queries and keys; a family without rotary embeddings
    tags no ``attn.rot_q``/``attn.rot_k``, and its ``attn.q``/``attn.k`` are what the scores use.
    """
    have = set(im.site_names())
    out = {}
    for role, fallback in (("rot_q", "q"), ("rot_k", "k"), ("scores", None), ("pattern", None)):
        name = im.layer_site(layer, f"attn.{role}")
        if name not in have and fallback is not None:
            name = im.layer_site(layer, f"attn.{fallback}")
        if name not in have:
            raise ValueError(f"the QK fix needs the site {name} (this model does not tag it)")
        out[role] = name
    return out


def atp_estimate(
    im: InstrumentedModel,
    source: torch.Tensor,
    target: torch.Tensor,
    metric: Metric,
    grid: Grid,
    *,
    qk_kind: str | None,
    graddrop: bool,
) -> Estimate:
    """AtP on ``grid``; ``qk_kind`` (``"q"``, ``"k"``, ``"scores"``) applies the QK fix, ``graddrop`` adds the
    GradDrop estimates ``[n_model_layers, n_layers, ...]``."""
    layout, by, names, batch, batch_size = grid.layout, grid.by, grid.names, grid.batch, grid.batch_size
    pos_mask, interventions, hf, progress = grid.pos_mask, grid.interventions, grid.hf, grid.progress
    # what to record: the site itself, or for the QK fix the attention internals of its layer
    per_layer: dict[str, dict[str, str]] = {}
    layer_index: dict[str, int] = {}
    needed: tuple[str, ...] = ()
    if qk_kind is None:
        src_sites = list(names)
        grad_sites = list(names)
        tgt_keep: list[str] = []
    else:
        for n in names:
            split = layer_of(n)
            if split is None:
                raise ValueError(f"the QK fix needs a per-layer attention site, got {n!r}")
            layer_index[n] = split[0]
            per_layer[n] = _qk_internals(im, split[0])
        needed = ("scores",) if qk_kind == "scores" else ("rot_q", "rot_k")
        src_sites = [per_layer[n][s] for n in names for s in needed]
        grad_sites = [per_layer[n]["pattern"] for n in names]
        tgt_keep = [per_layer[n][s] for n in names for s in ("rot_q", "rot_k", "scores")]

    # 1. source run: activations only
    src_store, m_src = plain_run(im, source, metric, src_sites, interventions, hf)

    # 2. target run(s) with gradients: replica 0 is plain, replica 1 + l drops layer l's gradient
    drop_layers = list(range(im.n_layers)) if graddrop else []
    n_rep = 1 + len(drop_layers)
    per_chunk = max(1, batch_size // batch)
    score_fns = ({n: ScoreFn(im.family.attention(layer_index[n])) for n in names} if qk_kind in ("q", "k")
                 else {})
    checked = False

    def run(todo: list[int]) -> tuple[list[torch.Tensor], list[float]]:
        """The estimate ``[n_layers, ...]`` of each replica in ``todo`` (0: plain, 1 + l: drops layer l), and
        each replica's metric."""
        nonlocal checked
        results: list[torch.Tensor] = []  # per replica: [n_layers, ...]
        metrics: list[float] = []
        bar = progress_bar(len(todo), "attribution (GradDrop replicas)", progress if len(todo) > per_chunk else False)
        for c0 in range(0, len(todo), per_chunk):
            reps = todo[c0:c0 + per_chunk]
            ids = target.repeat(len(reps), 1)
            hfr = repeat_rows(hf, batch, len(reps))
            handlers: list[tuple[str, Handler]] = []
            for i, r in enumerate(reps):
                if r == 0:
                    continue
                rows = torch.zeros(len(reps) * batch, dtype=torch.bool, device=ids.device)
                rows[i * batch:(i + 1) * batch] = True
                handlers += [(site, dropper(rows)) for site in _drop_sites(im, drop_layers[r - 1])]
            store: dict[str, torch.Tensor] = {}
            for n in dict.fromkeys(grad_sites + tgt_keep):
                handlers.append((n, grad_recorder(store, n)))
            with torch.enable_grad():
                logits = forward_with(im, ids, handlers, interventions, hfr)
                ms = metric_per_replica(metric, logits, batch, differentiable=True)
                grads = torch.autograd.grad(ms.sum(), [store[n] for n in grad_sites], allow_unused=True)
            metrics += [float(m) for m in ms.detach()]
            gmap = {n: (g if g is not None else torch.zeros_like(store[n])).detach()
                    for n, g in zip(grad_sites, grads, strict=True)}
            for i, _r in enumerate(reps):
                rs = slice(i * batch, (i + 1) * batch)
                per_layer_vals = []
                for n in names:
                    if qk_kind is None:
                        delta = mask_positions((src_store[n] - store[n].detach()[rs]).float(), layout, pos_mask)
                        per_layer_vals.append(reduce_to_grid(delta * gmap[n][rs].float(), layout, by))
                        continue
                    sites = per_layer[n]
                    tgt = {s: store[sites[s]].detach()[rs] for s in ("rot_q", "rot_k", "scores")}
                    src = {s: src_store[sites[s]] for s in needed}
                    n_rep_kv = tgt["rot_q"].shape[2] // tgt["rot_k"].shape[2]
                    score_fn = score_fns.get(n)
                    if score_fn is not None and not checked:  # each layer's recomputation, once
                        check_scores(score_fn, sites["scores"], tgt["rot_q"], tgt["rot_k"], tgt["scores"], n_rep_kv)
                    per_layer_vals.append(
                        qk_fix_layer(qk_kind, by, score_fn, n_rep_kv, tgt, src, gmap[sites["pattern"]][rs],
                                     pos_mask).float()
                    )
                checked = True
                results.append(torch.stack([v.to(pos_mask.device) for v in per_layer_vals]))  # layers' devices
            del logits, store, grads, gmap
            bar.update(len(reps))
        bar.close()
        return results, metrics

    sp = active_split() if graddrop else None  # plain AtP is one forward and backward: every rank runs it whole
    if sp is None:
        results, metrics = run(list(range(n_rep)))
    else:  # mishax_py.distributed.split(): each rank runs its share of the GradDrop replicas

        my_metrics: list[float] = []

        def share(mine: list[int]) -> torch.Tensor:
            res, ms = run(mine)
            my_metrics.extend(ms)
            return torch.stack(res) if res else torch.empty(0)

        results = list(sp.map(n_rep, share, what="atp GradDrop replicas"))
        rank0 = sp.gather(lambda: torch.tensor(my_metrics, dtype=torch.float64), what="atp GradDrop metrics")[0]
        metrics = [float(m) for m in rank0]
    m_tgt = metrics[0]  # replica 0 (the plain one; rank 0's first under a split)
    return Estimate(results[0], m_tgt, m_src, torch.stack(results[1:]) if graddrop else None)
