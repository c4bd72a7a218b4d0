"""Sparse feature circuits (Marks et al. 2024): SAE features and error nodes as the units of a circuit.

With an SAE at each chosen site, a site's value splits into nodes:
``x = decode(f) + eps = sum_i f_i W_dec[i] + b_dec + eps`` -- one node per (position, feature)
and one *error node* ``eps`` per position (the error is part of the graph: it is a node
with its own effect, and downstream error nodes depend on upstream nodes).

Node effects (indirect effects, IE). For a metric ``m`` on the clean input and a *patch*
value for every node -- the corrupt run's (``corrupt_ids`` given, ``ablation="patch"``),
the batch mean per position (``"mean"``, Marks et al.'s choice) or zero (``"zero"``) --
the effect of moving a node from its clean value to its patch value in the clean run
(``direction="noise"``, the default; ``"denoise"`` swaps the two runs: corrupted values moved to
their clean values in the corrupted run):

* ``method="atp"``: ``IE(f_i) = (f_i^patch - f_i) * (W_dec[i] . dm/dx)`` and
  ``IE(eps) = (eps^patch - eps) . dm/dx``, the gradient taken on the clean run in the
  original model (the SAE is transparent: decode(f) + eps = x, so ``dm/df_i`` is
  ``W_dec[i] . dm/dx`` and ``dm/deps = dm/dx``; Marks et al.'s "all-folded" attribution);
* ``method="ig"``: the same with ``dm/dx`` averaged over ``steps`` points on the line from
  the clean to the patched value of that site (decode is affine, so interpolating ``f`` and
  ``eps`` is interpolating ``x``).

Effects are summed over the batch (the metric is one number for the whole batch) and kept
per position: ``effects[site]`` is ``[pos, d_sae]``, ``error_effects[site]`` ``[pos]``. For
every (site, position), features + error add up to the plain AtP of patching that site
at that position (``attribution_patching``).

Edges, between each site and the next one in forward order (for residual-stream SAEs at
every layer: layer l to layer l+1), by the Jacobian-vector trick:
``edge(u -> d) = dm/dd * (dd/du) * (u^patch - u)``, the derivative ``dd/du`` taken through
the model between the two sites with the upstream site's nodes as the only inputs (its
features and error are leaves: nothing flows back into the upstream SAE). One backward
pass per downstream node; the downstream nodes run as replicas of the batch,
``batch_size`` rows per forward. Only edges between selected nodes are computed.

Selection: nodes with ``|IE| >= node_threshold`` (or the ``top_k`` largest per site), and
edges with ``|weight| >= edge_threshold``.

Validation by ablation (``FeatureCircuit.evaluate``): every SAE is spliced in and, at each
site, the nodes *outside* a node set are set to their ablation value (features and error
terms alike; features downstream are recomputed from the modified input, then ablated).
With ``m(C)`` the metric keeping circuit ``C``, ``M`` all nodes and ``0`` none:

* faithfulness ``(m(C) - m(0)) / (m(M) - m(0))`` (1: the circuit alone recovers the model),
* completeness ``(m(M \\ C) - m(0)) / (m(M) - m(0))`` (ablating the circuit; 0: nothing is left
  outside it).

SAEs are structural (:class:`~mishax_py.circuits.dictionaries.SAELike`: ``encode``, ``decode``,
``W_dec``, ``site``; ``attn.z`` SAEs read the flattened ``[.., head * d_head]`` value); this
package never imports ``saes``. This module finds the circuit; the edges are computed in
:mod:`~mishax_py.circuits.feature_edges`, the ablations in :mod:`~mishax_py.circuits.feature_ablation`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.circuits.dictionaries import SAELike, decode_at, encode_at
from mishax_py.circuits.feature_ablation import ablate_complement
from mishax_py.circuits.feature_edges import feature_edges
from mishax_py.devices import execution_device
from mishax_py.inputs import Ids, Metric, as_ids, metric_float, prompt_pair
from mishax_py.interventions import Intervention
from mishax_py.memory import (
    MemoryEstimate,
    announce_chunking,
    check_estimate,
    checked,
    estimate_run,
    fit_chunk,
    memory_budget,
    register_estimator,
    study_estimate,
)
from mishax_py.studies.attribution import site_gradients
from mishax_py.studies.attribution.budget import attribution_estimate
from mishax_py.studies.attribution.gradients import IG_STEPS
from mishax_py.studies.conventions import check_direction

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["ABLATIONS", "CircuitNode", "FeatureCircuit", "SAEs", "ablate_complement", "feature_circuit",
           "feature_circuit_estimate"]

# (site, position, feature index; -1 for the error node)
CircuitNode = tuple[str, int, int]
#: What the SAEs are given as: ``{site: sae}``, or SAEs that name their site.
SAEs = Mapping[str, SAELike] | Sequence[SAELike]
#: The patch values a node can be moved to (see the module docs).
ABLATIONS = ("mean", "zero", "patch")


@dataclass
class FeatureCircuit:
    """Node effects, the selected circuit and its edges.

    Attributes:
        sites: the SAE sites in forward order.
        effects: ``{site: [pos, d_sae]}`` feature indirect effects.
        error_effects: ``{site: [pos]}`` error-node indirect effects.
        nodes: the selected nodes ``(site, pos, feature)`` (``feature = -1``: error node),
            by decreasing ``|effect|``.
        edges: ``{(upstream node, downstream node): weight}`` between selected nodes of
            successive sites.
        metric_clean: the metric on the run the circuit was found on (the clean input; the
            corrupted one for ``direction="denoise"``).
        metric_patch: the metric with every node patched (the other run's values, or all ablated).
        method, ablation: how effects were computed and what the patch values are.
        saes: ``{site: sae}``.
        ablation_values: ``{site: (features, errors)}`` the patch values (``[batch or 1, pos, ...]``).
        clean_ids: the input the circuit was found on (the clean one; the corrupted one for
            ``direction="denoise"``).
        direction: ``"noise"`` or ``"denoise"`` (see :func:`feature_circuit`).
    """

    sites: list[str]
    effects: dict[str, torch.Tensor]
    error_effects: dict[str, torch.Tensor]
    nodes: list[CircuitNode]
    edges: dict[tuple[CircuitNode, CircuitNode], float]
    metric_clean: float
    metric_patch: float
    method: str
    ablation: str
    saes: dict[str, SAELike] = field(repr=False, default_factory=dict)
    ablation_values: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False, default_factory=dict)
    clean_ids: torch.Tensor | None = field(repr=False, default=None)
    direction: str = "noise"

    def effect(self, node: CircuitNode) -> float:
        site, pos, feat = node
        return float(self.error_effects[site][pos] if feat < 0 else self.effects[site][pos, feat])

    def all_nodes(self) -> list[CircuitNode]:
        """Every node: each (site, position) with all ``d_sae`` features and its error node.

        (Inactive features count too: once upstream nodes are ablated they may fire.)
        """
        out: list[CircuitNode] = []
        for s in self.sites:
            n_pos, d_sae = self.effects[s].shape
            out += [(s, p, f) for p in range(n_pos) for f in range(-1, d_sae)]
        return out

    def evaluate(self, im: InstrumentedModel, metric: Metric, ids: Ids | None = None,
                 nodes: Iterable[CircuitNode] | None = None, **hf_kwargs: Any) -> dict[str, float]:
        """Faithfulness and completeness of ``nodes`` (default: the circuit) by ablation; see the module docs.

        Returns ``{"faithfulness", "completeness", "m_full", "m_circuit", "m_complement",
        "m_empty", "n_nodes"}``.
        """
        ids = self.clean_ids if ids is None else as_ids(ids, im)
        if ids is None:
            raise ValueError("this circuit keeps no clean_ids: pass the ids it was found on")
        keep = set(self.nodes if nodes is None else nodes)
        everything = None  # keep all nodes
        with torch.no_grad():
            m_full = _metric_of(im, ids, metric, ablate_complement(self, everything), hf_kwargs)
            m_empty = _metric_of(im, ids, metric, ablate_complement(self, set()), hf_kwargs)
            m_circ = _metric_of(im, ids, metric, ablate_complement(self, keep), hf_kwargs)
            m_comp = _metric_of(im, ids, metric, ablate_complement(self, keep, invert=True), hf_kwargs)
        denom = m_full - m_empty
        safe = denom if abs(denom) > 1e-12 else float("nan")
        return {
            "faithfulness": (m_circ - m_empty) / safe,
            "completeness": (m_comp - m_empty) / safe,
            "m_full": m_full, "m_circuit": m_circ, "m_complement": m_comp, "m_empty": m_empty,
            "n_nodes": float(len(keep)),
        }

    def __repr__(self) -> str:
        return (f"FeatureCircuit({len(self.sites)} sites, {len(self.nodes)} nodes, {len(self.edges)} edges, "
                f"{self.method}, {self.direction}, ablation={self.ablation}, metric clean {self.metric_clean:.4g} "
                f"-> patched {self.metric_patch:.4g})")


def _metric_of(im: InstrumentedModel, ids: torch.Tensor, metric: Metric, interventions: Mapping[str, Intervention],
               hf: Mapping[str, Any]) -> float:
    return metric_float(metric(im.run(ids, interventions=interventions, **hf)))


# ---------------------------------------------------------------------------------------------
# Finding the circuit
# ---------------------------------------------------------------------------------------------
def _sae_map(im: InstrumentedModel, saes: SAEs, sites: Sequence[str] | None) -> dict[str, SAELike]:
    items: list[tuple[str, SAELike]] = []
    if isinstance(saes, Mapping):
        items = [(im.resolve(k)[0], v) for k, v in saes.items()]
    else:
        for sae in saes:
            site = getattr(sae, "site", None)
            if site is None:
                raise ValueError(f"{sae!r} has no .site; pass SAEs as {{site: sae}}")
            items.append((im.resolve(site)[0], sae))
    by_site = dict(items)
    if len(by_site) != len(items):
        raise ValueError("two SAEs for the same site")
    for s, sae in by_site.items():
        for attr in ("encode", "decode", "W_dec"):
            if not hasattr(sae, attr):
                raise TypeError(f"the SAE for {s!r} has no {attr!r}: expected an SAE (encode/decode/W_dec)")
        own = getattr(sae, "site", None)
        if getattr(sae, "output_site", None) not in (None, own) or getattr(sae, "W_skip", None) is not None:
            raise ValueError(f"{s!r}: feature circuits need SAEs that read and write the same site (not transcoders)")
    if sites is not None:
        wanted = im.resolve(list(sites))
        missing = [s for s in wanted if s not in by_site]
        if missing:
            raise ValueError(f"no SAE for the requested site(s) {missing}; SAEs are given for {sorted(by_site)}")
        by_site = {s: by_site[s] for s in wanted}
    if not by_site:
        raise ValueError("feature_circuit needs at least one SAE")
    order = im.resolve(list(by_site))
    return {s: by_site[s] for s in order}


def _split(sae: SAELike, value: torch.Tensor, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [b, p, d_sae], error [b, p, d])`` of a site value (flattened to ``[b, p, d]``)."""
    x = value.reshape(*value.shape[:2], -1)
    d_sae_in = sae.W_dec.shape[1]
    if x.shape[-1] != d_sae_in:
        raise ValueError(f"the SAE for {site!r} has width {d_sae_in} but the site's values are "
                         f"{tuple(value.shape)} ({x.shape[-1]} per position)")
    with torch.no_grad():
        f = encode_at(sae, x).float()
        err = x.float() - decode_at(sae, f).float()
    return f, err


def feature_circuit(
    im: InstrumentedModel,
    clean_ids: Ids,
    corrupt_ids: Ids | None,
    metric: Metric,
    *,
    saes: SAEs,
    sites: Sequence[str] | None = None,
    direction: str = "noise",
    ablation: str | None = None,
    node_threshold: float | None = None,
    top_k: int | None = None,
    edge_threshold: float = 0.0,
    edges: bool = True,
    batch_size: int | None = None,
    progress: bool | None = None,
    method: str = "atp",
    steps: int = IG_STEPS,
    max_memory: int | str | None = None,
    **hf_kwargs: Any,
) -> FeatureCircuit:
    """Attribute ``metric`` to SAE features and error nodes, select a circuit and its edges (module docs).

    The study convention's order: ``(im, clean_ids, corrupt_ids, metric, *, ...)``, everything
    after ``metric`` keyword-only.

    Args:
        im: the instrumented model.
        clean_ids: ``[batch, pos]`` the inputs whose behaviour the circuit explains.
        corrupt_ids: ``[batch, pos]`` contrastive inputs of the same shape; their node values are
            the patch (``ablation="patch"``, the default when given). ``None``: no contrastive
            input; nodes are ablated to their batch mean per position (``ablation="mean"``, the
            default then) or to zero (``"zero"``).
        metric: ``metric(logits [batch, pos, vocab]) -> scalar tensor`` over the batch (differentiable).
        saes: ``{site: sae}`` or SAEs with ``.site`` (:class:`~mishax_py.circuits.dictionaries.SAELike`).
        sites: the SAE sites to use (default: all given); a site without an SAE is an error.
        direction: ``"noise"`` (default): effects of moving each node from its clean value to its
            patch value in the clean run (the circuit explains the clean behaviour).
            ``"denoise"``: clean and corrupted swap roles -- effects of moving each node from its
            corrupted value to its clean value in the corrupted run (needs ``corrupt_ids`` and
            ``ablation="patch"``; the circuit's ``clean_ids`` and ``metric_clean`` are then the
            corrupted run's).
        ablation: ``"patch"``, ``"mean"`` (default without ``corrupt_ids``) or ``"zero"``.
        node_threshold: keep nodes with ``|IE| >= node_threshold``.
        top_k: or keep the ``top_k`` nodes of largest ``|IE|`` per site (default: 5 if
            neither is given).
        edge_threshold: keep edges with ``|weight| >= edge_threshold``.
        edges: compute edges between successive sites.
        batch_size: rows per forward for IG and edge replicas (default ``8 * batch``).
        progress: progress bars (``None``: on a terminal, for long work; see :mod:`mishax_py.progress`).
        method: the estimator of node effects: ``"atp"`` or ``"ig"`` (``steps`` interpolation
            points per site).
        steps: integrated-gradients steps (the default of every study, 16).
        max_memory: the memory budget (bytes or ``"8GiB"``; default :func:`mishax_py.memory.memory_budget`):
            the peak (:func:`feature_circuit_estimate`) is checked before any forward; the default
            ``batch_size`` shrinks to fit it (announced by a :class:`~mishax_py.memory.MemoryChunkingWarning`),
            and a run that cannot fit raises :class:`~mishax_py.memory.MemoryBudgetError` naming estimate and budget.
        **hf_kwargs: passed to the model (e.g. ``attention_mask``).

    Raises:
        ValueError: clean and corrupt shapes differ, an unknown ``direction``, ``ablation`` or
            ``method``, ``ablation="patch"`` or ``direction="denoise"`` without ``corrupt_ids``,
            both ``node_threshold`` and ``top_k``, SAEs that do not fit their sites (or
            transcoders), a metric that is not a differentiable scalar.
        TypeError: an SAE without ``encode``/``decode``/``W_dec``.
    """
    direction = check_direction(direction)
    if corrupt_ids is None:
        if direction == "denoise":
            raise ValueError("direction='denoise' needs corrupt_ids (the run the clean values are patched into)")
        run, source = as_ids(clean_ids, im), None
    else:
        clean, corrupt = prompt_pair(im, clean_ids, corrupt_ids)
        # the run the effects are measured in, and the run whose node values are the patch
        run, source = (clean, corrupt) if direction == "noise" else (corrupt, clean)
    ablation = ablation or ("patch" if source is not None else "mean")
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    if ablation == "patch" and source is None:
        raise ValueError("ablation='patch' needs corrupt_ids")
    if direction == "denoise" and ablation != "patch":
        raise ValueError(f"direction='denoise' patches the clean values into the corrupted run: it needs "
                         f"ablation='patch', got {ablation!r}")
    if method not in ("atp", "ig"):
        raise ValueError(f"method must be 'atp' or 'ig', got {method!r}")
    if node_threshold is not None and top_k is not None:
        raise ValueError("give node_threshold or top_k, not both")
    if node_threshold is None and top_k is None:
        top_k = 5
    by_site = _sae_map(im, saes, sites)
    names = list(by_site)
    B = run.shape[0]
    est = feature_circuit_estimate(im, run.shape, by_site, method, steps=steps, batch_size=batch_size,
                                   edges=edges and len(names) > 1, max_memory=max_memory, top_k=top_k)
    check_estimate(est, max_memory=max_memory, device=execution_device(im),
                   reduce=f"use fewer SAE sites, fewer prompt rows (the run has {B}) or fewer positions")
    if batch_size is None:
        batch_size = est.chunks["batch_size"]
        announce_chunking(f"feature_circuit(method={method!r})", batch_size, 8 * B, "rows", est.budget or 0)

    # -- node values on the run, patch values --------------------------------------------
    with torch.no_grad(), checked():
        _, cache = im.run_with_cache(run, sites=names, **hf_kwargs)
        if source is not None:
            _, source_cache = im.run_with_cache(source, sites=names, **hf_kwargs)
    run_nodes = {s: _split(by_site[s], cache[s], s) for s in names}
    patch_nodes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for s in names:
        f, e = run_nodes[s]
        if ablation == "patch":
            patch_nodes[s] = _split(by_site[s], source_cache[s], s)
        elif ablation == "mean":
            patch_nodes[s] = (f.mean(0, keepdim=True), e.mean(0, keepdim=True))  # per position, over the batch
        else:
            patch_nodes[s] = (torch.zeros_like(f[:1]), torch.zeros_like(e[:1]))
    # the site value every node at its patch value gives: decode(f_patch) + err_patch
    toward = {}
    for s in names:
        sae = by_site[s]
        fp, ep = patch_nodes[s]
        with torch.no_grad():
            x = decode_at(sae, fp).float() + ep
        toward[s] = x.expand(B, *x.shape[1:]).reshape(cache[s].shape).to(cache[s].dtype)

    # -- node effects ------------------------------------------------------------------------
    with checked():  # the whole peak was checked above
        gradients = site_gradients(im, run, metric, names, method=method, toward=toward, steps=steps,
                                   batch_size=batch_size, progress=progress, **hf_kwargs)
    grads = gradients.grads
    effects, err_effects = {}, {}
    for s in names:
        sae = by_site[s]
        g = grads[s].reshape(B, run.shape[1], -1)  # dm/dx [b, p, d]
        f, e = run_nodes[s]
        fp, ep = patch_nodes[s]
        g_f = g @ sae.W_dec.detach().float().to(g.device).T  # dm/df [b, p, d_sae]
        effects[s] = ((fp - f) * g_f).sum(0)
        err_effects[s] = ((ep - e) * g).sum((0, 2))

    # -- selection --------------------------------------------------------------------------
    selected: list[tuple[float, CircuitNode]] = []
    for s in names:
        cand = [(float(v), (s, p, fi)) for (p, fi), v in _nonzero_items(effects[s])]
        cand += [(float(v), (s, p, -1)) for p, v in enumerate(err_effects[s].tolist())]
        if node_threshold is not None:
            cand = [c for c in cand if abs(c[0]) >= node_threshold]
        else:
            cand = sorted(cand, key=lambda c: -abs(c[0]))[:top_k]
        selected += cand
    selected.sort(key=lambda c: -abs(c[0]))
    nodes = [n for _, n in selected]

    circuit = FeatureCircuit(
        sites=names, effects=effects, error_effects=err_effects, nodes=nodes, edges={},
        metric_clean=gradients.metric, metric_patch=float("nan"), method=method, ablation=ablation, saes=by_site,
        ablation_values={s: patch_nodes[s] for s in names}, clean_ids=run, direction=direction,
    )
    with torch.no_grad():  # every node at its patch value
        circuit.metric_patch = _metric_of(im, run, metric, ablate_complement(circuit, set()), hf_kwargs)
    if edges and len(names) > 1:
        circuit.edges = feature_edges(im, run, circuit, run_nodes, grads, edge_threshold, batch_size, progress,
                                      hf_kwargs)
    return circuit


def feature_circuit_estimate(im: InstrumentedModel, shape: Sequence[int], by_site: Mapping[str, SAELike],
                             method: str, *, steps: int = IG_STEPS, batch_size: int | None = None,
                             edges: bool = True, max_memory: int | str | None = None,
                             top_k: int | None = None) -> MemoryEstimate:
    """The peak memory of :func:`feature_circuit` on ``shape = (B, T)`` inputs with the SAEs ``by_site``.

    Held: per site, the features of the run and of the patch and the feature gradients (``3·B·T·d_sae``
    fp32) and the effects (``T·d_sae``). Steps: the node gradients
    (:func:`~mishax_py.studies.attribution.budget.attribution_estimate` of ``site_gradients``: one forward
    and backward, or IG chunks) and, with ``edges``, one chunk of edge replicas (a forward and backward of
    ``batch_size`` rows; with ``top_k`` at most ``top_k`` downstream nodes, so ``top_k·B`` rows). The default
    ``batch_size`` is the largest multiple of ``B`` up to ``8·B`` whose chunks fit the budget. The SAEs' own
    parameters exist before the call and are not counted.
    """
    B, T = int(shape[0]), int(shape[1])
    names = list(by_site)
    nodes = sum((3 * B + 1) * T * int(sae.W_dec.shape[0]) * 4 for sae in by_site.values())
    held = MemoryEstimate({"feature_nodes": nodes})
    grads = attribution_estimate(im, B, T, names, method, steps=steps, batch_size=batch_size,
                                 max_memory=max_memory, what="feature_circuit")
    budget = grads.budget if grads.budget is not None else memory_budget(execution_device(im), max_memory)
    rows = grads.chunks.get("batch_size", 8 * B)
    steps_est = {"its node gradients": grads + held}
    if edges:
        def chunk(n: int) -> MemoryEstimate:  # a forward with autograd; the backward stops at the upstream site
            fwd = estimate_run(im, n, T, grad=True)
            return MemoryEstimate({k: v for k, v in fwd.parts.items() if k != "backward"}) + held

        if batch_size is None:
            rows = min(rows, fit_chunk(chunk, default=8 * B, budget=budget, minimum=B, step=B))
        largest = min(rows, top_k * B) if top_k is not None else rows
        steps_est[f"a chunk of {largest} edge replica rows"] = chunk(largest)
    return study_estimate(f"feature_circuit(method={method!r}, {len(names)} SAE sites, {B} rows x {T} positions)",
                          steps_est, budget=budget, chunks={"batch_size": rows})


def _estimate_feature_circuit(im: InstrumentedModel, clean_ids: Ids, corrupt_ids: Ids | None, metric: Metric, *,
                              saes: SAEs, sites: Sequence[str] | None = None, edges: bool = True,
                              batch_size: int | None = None, method: str = "atp", steps: int = IG_STEPS,
                              max_memory: int | str | None = None, **kwargs: Any) -> MemoryEstimate:
    """:func:`mishax_py.memory.estimate_memory` of :func:`feature_circuit`."""
    run = as_ids(clean_ids, im)
    by_site = _sae_map(im, saes, sites)
    top_k = kwargs.get("top_k")
    if top_k is None and kwargs.get("node_threshold") is None:
        top_k = 5
    return feature_circuit_estimate(im, run.shape, by_site, method, steps=steps, batch_size=batch_size,
                                    edges=edges and len(by_site) > 1, max_memory=max_memory, top_k=top_k)


register_estimator(feature_circuit, _estimate_feature_circuit)


def _nonzero_items(t: torch.Tensor) -> list[tuple[tuple[int, int], float]]:
    idx = t.nonzero().tolist()
    return [((p, f), float(t[p, f])) for p, f in idx]
