"""The metric's gradient at sites: the primitive every attribution estimate is built from.

:func:`site_gradients` is the public building block (also used by feature circuits): one run's
values at some sites and the metric's gradient there, either at the run itself (AtP) or
averaged along straight lines toward other values (integrated gradients,
:func:`interpolated_gradients`). The handlers here keep a site's value
(:func:`keeper`), keep it in the autograd graph (:func:`grad_recorder`), replace it
(:func:`replace_with`) or rows of it (:func:`replacer`); :func:`metric_per_replica` reads the
metric of each replica of a batch stacked along the batch dimension.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from mishax_py.devices import execution_device
from mishax_py.distributed import active_split
from mishax_py.execution.forward import forward_with, repeat_rows
from mishax_py.inputs import Ids, Metric, as_ids, metric_value
from mishax_py.memory import MemoryEstimate, announce_chunking, check_estimate, register_estimator, rows_and_positions
from mishax_py.progress import progress_bar
from mishax_py.runtime import Handler, SiteEvent
from mishax_py.studies.attribution.budget import attribution_estimate

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel, Interventions

__all__ = [
    "IG_STEPS",
    "SiteGradients",
    "check_steps",
    "grad_recorder",
    "interpolated_gradients",
    "keeper",
    "metric_per_replica",
    "plain_run",
    "replace_with",
    "replacer",
    "site_gradients",
]

#: Integrated-gradients steps when none are given (the same default in every study).
IG_STEPS = 16


class SiteGradients(NamedTuple):
    """What :func:`site_gradients` returns (a tuple: ``values, grads, metric = site_gradients(...)`` works).

    Attributes:
        values: ``{site: detached value [batch, ...]}`` of the run.
        grads: ``{site: d metric / d value}`` (float32, the site's shape; zeros where the metric does not
            depend on the site).
        metric: the metric of the unmodified run.
    """

    values: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    metric: float


def keeper(store: dict[str, torch.Tensor], name: str) -> Handler:
    """A handler storing the site's value (detached) under ``name``, leaving it unchanged."""

    def h(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        store[name] = value.detach()
        return value

    return h


def grad_recorder(store: dict[str, torch.Tensor], name: str) -> Handler:
    """Keep the site's value in the graph (a leaf if it had no gradient) so ``autograd.grad`` can be taken
    with respect to it."""

    def h(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        if not value.requires_grad:
            value = value.detach().requires_grad_(True)
        store[name] = value
        return value

    return h


def replace_with(value: torch.Tensor) -> Handler:
    """A handler replacing the site's value by ``value`` (cast to the site's dtype)."""

    def h(site_value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        return value.to(device=site_value.device, dtype=site_value.dtype)

    return h


def replacer(rows: torch.Tensor, interp: torch.Tensor) -> Handler:
    """A handler writing ``interp`` into batch ``rows`` of the site's value (the other rows unchanged)."""

    def h(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        return value.index_put((rows.to(value.device),), interp.to(device=value.device, dtype=value.dtype))

    return h


def metric_per_replica(metric: Metric, logits: torch.Tensor, batch: int, *, differentiable: bool) -> torch.Tensor:
    """The metric of each ``batch``-row replica of ``logits`` ``[n_replicas * batch, pos, vocab]``, as a
    ``[n_replicas]`` tensor (checked by :func:`mishax_py.inputs.metric_value`)."""
    reps = logits.shape[0] // batch
    return torch.stack([metric_value(metric(logits[r * batch:(r + 1) * batch]), differentiable=differentiable)
                        for r in range(reps)])


def plain_run(im: InstrumentedModel, ids: torch.Tensor, metric: Metric, sites: Iterable[str],
              interventions: Interventions | None, hf: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], float]:
    """One run without gradients: its (detached) values at ``sites`` and its metric."""
    store: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        logits = forward_with(im, ids, [(n, keeper(store, n)) for n in sites], interventions, hf)
        return store, float(metric_value(metric(logits)))


def interpolated_gradients(
    im: InstrumentedModel,
    target: torch.Tensor,
    metric: Metric,
    names: Sequence[str],
    start: Mapping[str, torch.Tensor],
    toward: Mapping[str, torch.Tensor],
    *,
    steps: int,
    batch: int,
    batch_size: int,
    interventions: Interventions | None,
    hf: Mapping[str, Any],
    progress: bool | None,
) -> dict[str, torch.Tensor]:
    """Per site, the metric's gradient averaged over ``start + alpha (toward - start)`` (midpoint alphas
    ``(k + 1/2) / steps``).

    Each site is interpolated on its own (the rest of the model runs normally on ``target``);
    all ``len(names) * steps`` interpolations are replicas of the batch, run ``batch_size``
    rows at a time. Returns ``{site: mean gradient}`` (float32, the site's shape).
    """
    alphas = [(k + 0.5) / steps for k in range(steps)]
    jobs = [(li, a) for li in range(len(names)) for a in alphas]  # one replica of the batch each
    per_chunk = max(1, batch_size // batch)

    def accumulate(todo: list[tuple[int, float]]) -> list[torch.Tensor]:
        """Per site, the sum of the gradients of the interpolations ``todo`` (float32, the site's shape)."""
        grad_sum = [torch.zeros_like(start[n], dtype=torch.float32) for n in names]
        bar = progress_bar(len(todo), "integrated gradients", progress if len(todo) > per_chunk else False)
        for j0 in range(0, len(todo), per_chunk):
            chunk = todo[j0:j0 + per_chunk]
            ids = target.repeat(len(chunk), 1)
            hfr = repeat_rows(hf, batch, len(chunk))
            leaves: list[tuple[int, torch.Tensor]] = []
            handlers: list[tuple[str, Handler]] = []
            by_site: dict[int, list[int]] = {}
            for i, (li, _a) in enumerate(chunk):
                by_site.setdefault(li, []).append(i)
            for li, reps in by_site.items():
                n = names[li]
                delta = toward[n] - start[n]
                interp = torch.cat([start[n] + chunk[i][1] * delta for i in reps]).requires_grad_(True)
                rows = torch.cat([torch.arange(i * batch, (i + 1) * batch) for i in reps]).to(ids.device)
                leaves.append((li, interp))
                handlers.append((n, replacer(rows, interp)))
            with torch.enable_grad():
                logits = forward_with(im, ids, handlers, interventions, hfr)
                ms = metric_per_replica(metric, logits, batch, differentiable=True)
                grads = torch.autograd.grad(ms.sum(), [leaf for _, leaf in leaves], allow_unused=True)
            for (li, leaf), g in zip(leaves, grads, strict=True):
                if g is not None:
                    grad_sum[li] += g.detach().float().view(-1, batch, *leaf.shape[1:]).sum(0)
            del logits, grads, leaves
            bar.update(len(chunk))
        bar.close()
        return grad_sum

    sp = active_split()
    if sp is None:
        grad_sum = accumulate(jobs)
    else:  # mishax_py.distributed.split(): each rank sums its share of the interpolations; partials add in rank order
        mine = sp.share(len(jobs), "ig interpolations")
        parts = sp.gather(lambda: torch.cat([g.flatten() for g in accumulate([jobs[i] for i in mine])]),
                          what="ig gradient sums")
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        grad_sum = [t.view_as(start[n]) for t, n in zip(total.split([start[n].numel() for n in names]), names,
                                                         strict=True)]
    return {n: grad_sum[i] / steps for i, n in enumerate(names)}


def check_steps(steps: object) -> int:
    """``steps`` of integrated gradients: a positive integer, else a ``ValueError``."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return steps


def site_gradients(
    im: InstrumentedModel,
    ids: Ids,
    metric: Metric,
    sites: Sequence[str],
    *,
    interventions: Interventions | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    method: str = "atp",
    toward: Mapping[str, torch.Tensor] | None = None,
    steps: int = IG_STEPS,
    max_memory: int | str | None = None,
    **hf_kwargs: Any,
) -> SiteGradients:
    """Values of ``sites`` on ``ids`` and the metric's gradient there (the building block of AtP and IG).

    Args:
        im: the instrumented model.
        ids: token ids ``[batch, pos]``.
        metric: ``metric(logits [batch, pos, vocab]) -> scalar tensor``, differentiable.
        sites: site names, aliases or globs (``"blocks.*.resid_pre"``).
        interventions: applied first in every run.
        batch_size: most rows per forward of the IG replicas (default ``8 * batch``).
        progress: show a progress bar for IG (default: on a terminal, for multi-chunk work).
        method: ``"atp"``: the gradient at the run's own values (one forward, one backward).
            ``"ig"``: per site, the gradient averaged over ``steps`` midpoints of the line from the
            site's value to ``toward[site]`` (same shape), the rest of the model running normally.
        toward: with ``method="ig"``, ``{site: the value to integrate toward}``.
        steps: integrated-gradients steps.
        max_memory: the memory budget (bytes or ``"8GiB"``; default :func:`mishax_py.memory.memory_budget`),
            checked before the forward (:func:`~mishax_py.studies.attribution.budget.attribution_estimate`); with
            ``method="ig"`` the default ``batch_size`` shrinks to fit it, announced by a
            :class:`~mishax_py.memory.MemoryChunkingWarning`.
        **hf_kwargs: passed to the model (e.g. ``attention_mask``).

    Returns:
        :class:`SiteGradients` ``(values, grads, metric)``.
    """
    ids = as_ids(ids, im)
    names = im.resolve(list(sites))
    if method not in ("atp", "ig"):
        raise ValueError(f"method must be 'atp' or 'ig', got {method!r}")
    batch = ids.shape[0]
    est = attribution_estimate(im, batch, ids.shape[1], names, method, steps=steps, batch_size=batch_size,
                               max_memory=max_memory, what="site_gradients")
    check_estimate(est, max_memory=max_memory, device=execution_device(im),
                   reduce=f"take gradients at fewer sites, or of fewer rows (ids has {batch})")
    if method == "ig" and batch_size is None:
        batch_size = est.chunks["batch_size"]
        announce_chunking("site_gradients(method='ig')", batch_size, min(8 * batch, len(names) * steps * batch),
                          "rows", est.budget or 0)
    store: dict[str, torch.Tensor] = {}
    with torch.enable_grad():
        logits = forward_with(im, ids, [(n, grad_recorder(store, n)) for n in names], interventions, hf_kwargs)
        m = metric_per_replica(metric, logits, batch, differentiable=method == "atp")[0]
        if method == "atp":
            grads = torch.autograd.grad(m, [store[n] for n in names], allow_unused=True)
    values = {n: store[n].detach() for n in names}
    if method == "atp":
        gmap = {n: (g.detach().float() if g is not None else torch.zeros_like(values[n], dtype=torch.float32))
                for n, g in zip(names, grads, strict=True)}
        return SiteGradients(values, gmap, float(m.detach()))
    if toward is None:
        raise ValueError("method='ig' needs toward={site: the value to integrate toward}")
    check_steps(steps)
    for n in names:
        if n not in toward or tuple(toward[n].shape) != tuple(values[n].shape):
            got = None if n not in toward else tuple(toward[n].shape)
            raise ValueError(f"toward[{n!r}] must have the site's shape {tuple(values[n].shape)}, got {got}")
    gmap = interpolated_gradients(im, ids, metric, names, values, {n: toward[n].to(values[n].dtype) for n in names},
                                  steps=steps, batch=batch, batch_size=batch_size or 8 * batch,
                                  interventions=interventions, hf=hf_kwargs, progress=progress)
    return SiteGradients(values, gmap, float(m.detach()))


def _estimate_site_gradients(im: InstrumentedModel, ids: Ids, metric: Metric, sites: Sequence[str], *,
                             interventions: Interventions | None = None, batch_size: int | None = None,
                             progress: bool | None = None, method: str = "atp",
                             toward: Mapping[str, torch.Tensor] | None = None, steps: int = IG_STEPS,
                             max_memory: int | str | None = None, **hf_kwargs: Any) -> MemoryEstimate:
    """:func:`mishax_py.memory.estimate_memory` of :func:`site_gradients`."""
    ids = as_ids(ids, im)
    return attribution_estimate(im, *rows_and_positions(ids), im.resolve(list(sites)), method, steps=steps,
                                batch_size=batch_size,
                                max_memory=max_memory, what="site_gradients")


register_estimator(site_gradients, _estimate_site_gradients)
