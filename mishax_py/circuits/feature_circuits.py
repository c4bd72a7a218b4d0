"""Sparse feature circuits (Marks et al. 2024): SAE features and error nodes as the units of a circuit.

With an SAE at each chosen site, a site's value splits into nodes:
``x = decode(f) + eps = sum_i f_i W_dec[i] + b_dec + eps`` -- one node per (position, feature)
and one *error node* ``eps`` per position (the error is part of the graph: it is a node
with its own effect, and downstream error nodes depend on upstream nodes).

Node effects (indirect effects, IE). For a metric ``m`` on the clean input and a *patch*
value for every node -- the corrupt run's (``corrupt_ids`` given, ``ablation="patch"``),
the batch mean per position (``"mean"``, Marks et al.'s choice) or zero (``"zero"``) --

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

SAEs are duck-typed (``encode``, ``decode``, ``W_dec``; ``attn.z`` SAEs read the flattened
``[.., head * d_head]`` value); this module never imports ``saes``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.execution.forward import forward_with, repeat_rows
from mishax_py.inputs import as_ids
from mishax_py.interventions import Intervention
from mishax_py.runtime import SiteEvent
from mishax_py.studies.attribution.atp import _check_metric_value, _progress, site_gradients
from mishax_py.studies.patching import Metric, prompt_pair

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["CircuitNode", "FeatureCircuit", "ablate_complement", "feature_circuit"]

# (site, position, feature index; -1 for the error node)
CircuitNode = tuple[str, int, int]
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
        metric_clean: the metric on the clean input.
        metric_patch: the metric with every node patched (corrupt run, or all ablated).
        method, ablation: how effects were computed and what the patch values are.
        saes: ``{site: sae}``.
        ablation_values: ``{site: (features, errors)}`` the patch values (``[batch or 1, pos, ...]``).
        clean_ids: the clean input the circuit was found on.
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
    saes: dict[str, Any] = field(repr=False, default_factory=dict)
    ablation_values: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False, default_factory=dict)
    clean_ids: torch.Tensor | None = field(repr=False, default=None)

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

    def evaluate(self, im: InstrumentedModel, metric: Metric, ids: Any = None,
                 nodes: Iterable[CircuitNode] | None = None, **hf_kwargs: Any) -> dict[str, float]:
        """Faithfulness and completeness of ``nodes`` (default: the circuit) by ablation; see the module docs.

        Returns ``{"faithfulness", "completeness", "m_full", "m_circuit", "m_complement",
        "m_empty", "n_nodes"}``.
        """
        ids = self.clean_ids if ids is None else as_ids(ids, im.model)
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
                f"{self.method}, ablation={self.ablation}, metric clean {self.metric_clean:.4g} -> patched "
                f"{self.metric_patch:.4g})")


def _metric_of(im: InstrumentedModel, ids: torch.Tensor, metric: Metric, interventions: dict[str, Any],
               hf: Mapping[str, Any]) -> float:
    return float(_check_metric_value(metric(im.run(ids, interventions=interventions, **hf))))


# ---------------------------------------------------------------------------------------------
# Splicing with node ablation
# ---------------------------------------------------------------------------------------------
class _NodeAblation(Intervention):
    """At a site: encode, set the features/error not kept to their ablation values, decode + error."""

    def __init__(self, sae: Any, keep_f: torch.Tensor, keep_e: torch.Tensor, abl_f: torch.Tensor,
                 abl_e: torch.Tensor) -> None:
        self.sae, self.keep_f, self.keep_e, self.abl_f, self.abl_e = sae, keep_f, keep_e, abl_f, abl_e

    def apply(self, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        if event.rows is not None:
            raise ValueError("feature-circuit ablations do not run inside row-restricted sweeps")
        x = value.reshape(*value.shape[:2], -1)
        f = self.sae.encode(x)
        err = x.to(f.dtype) - self.sae.decode(f)
        T = x.shape[1]
        f = torch.where(self.keep_f[:T], f, self.abl_f[:, :T].to(f.dtype))
        err = torch.where(self.keep_e[:T, None], err, self.abl_e[:, :T].to(err.dtype))
        return (self.sae.decode(f) + err).to(value.dtype).reshape(value.shape)

    def __repr__(self) -> str:
        return f"NodeAblation(kept {int(self.keep_f.sum())} features, {int(self.keep_e.sum())} error nodes)"


def ablate_complement(circuit: FeatureCircuit, keep: Iterable[CircuitNode] | None,
                      invert: bool = False) -> dict[str, Intervention]:
    """Interventions splicing every SAE of ``circuit`` with the nodes outside ``keep`` ablated.

    ``keep=None`` keeps every node (the spliced model, equal to the original up to float
    error); ``invert=True`` ablates ``keep`` instead (the complement survives). Ablation
    values are the circuit's (``mean``/``zero``/``patch``), for the batch it was found on.
    """
    out: dict[str, Intervention] = {}
    keep_set = None if keep is None else set(keep)
    for s in circuit.sites:
        abl_f, abl_e = circuit.ablation_values[s]
        T, F = abl_f.shape[1], abl_f.shape[2]  # batch 1 (mean/zero) broadcasts to any batch
        kf = torch.zeros(T, F, dtype=torch.bool, device=abl_f.device)
        ke = torch.zeros(T, dtype=torch.bool, device=abl_f.device)
        if keep_set is None:
            kf[:], ke[:] = True, True
        else:
            for site, pos, feat in keep_set:
                if site != s:
                    continue
                if feat < 0:
                    ke[pos] = True
                else:
                    kf[pos, feat] = True
        if invert:
            kf, ke = ~kf, ~ke
        out[s] = _NodeAblation(circuit.saes[s], kf, ke, abl_f, abl_e)
    return out


# ---------------------------------------------------------------------------------------------
# Finding the circuit
# ---------------------------------------------------------------------------------------------
def _sae_map(im: InstrumentedModel, saes: Mapping[str, Any] | Sequence[Any], sites: Sequence[str] | None
             ) -> dict[str, Any]:
    if isinstance(saes, Mapping):
        items = [(im.resolve(k)[0], v) for k, v in saes.items()]
    else:
        items = []
        for sae in saes:
            if getattr(sae, "site", None) is None:
                raise ValueError(f"{sae!r} has no .site; pass SAEs as {{site: sae}}")
            items.append((im.resolve(sae.site)[0], sae))
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


def _split(sae: Any, value: torch.Tensor, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [b, p, d_sae], error [b, p, d])`` of a site value (flattened to ``[b, p, d]``)."""
    x = value.reshape(*value.shape[:2], -1)
    d_sae_in = sae.W_dec.shape[1]
    if x.shape[-1] != d_sae_in:
        raise ValueError(f"the SAE for {site!r} has width {d_sae_in} but the site's values are "
                         f"{tuple(value.shape)} ({x.shape[-1]} per position)")
    with torch.no_grad():
        f = sae.encode(x).float()
        err = x.float() - sae.decode(f.to(sae.W_dec.dtype)).float()
    return f, err


def feature_circuit(
    im: InstrumentedModel,
    clean_ids: Any,
    saes: Mapping[str, Any] | Sequence[Any],
    metric: Metric,
    corrupt_ids: Any = None,
    *,
    sites: Sequence[str] | None = None,
    method: str = "atp",
    steps: int = 10,
    ablation: str | None = None,
    node_threshold: float | None = None,
    top_k: int | None = None,
    edge_threshold: float = 0.0,
    edges: bool = True,
    batch_size: int | None = None,
    progress: bool | None = None,
    **hf_kwargs: Any,
) -> FeatureCircuit:
    """Attribute ``metric`` to SAE features and error nodes, select a circuit and its edges (module docs).

    Args:
        im: the instrumented model.
        clean_ids: ``[batch, pos]`` the inputs whose behaviour the circuit explains.
        saes: ``{site: sae}`` or SAEs with ``.site``.
        metric: ``metric(logits) -> scalar tensor`` over the batch (differentiable).
        corrupt_ids: ``[batch, pos]`` contrastive inputs; their node values are the patch
            (``ablation="patch"``, the default when given).
        sites: the SAE sites to use (default: all given); a site without an SAE is an error.
        method: ``"atp"`` or ``"ig"`` (``steps`` interpolation points per site).
        ablation: ``"patch"``, ``"mean"`` (default without ``corrupt_ids``) or ``"zero"``.
        node_threshold: keep nodes with ``|IE| >= node_threshold``.
        top_k: or keep the ``top_k`` nodes of largest ``|IE|`` per site (default: 5 if
            neither is given).
        edge_threshold: keep edges with ``|weight| >= edge_threshold``.
        edges: compute edges between successive sites.
        batch_size: rows per forward for IG and edge replicas (default ``8 * batch``).
        progress: progress bars (default: on a terminal).
    """
    if corrupt_ids is None:
        clean, corrupt = as_ids(clean_ids, im.model), None
    else:
        clean, corrupt = prompt_pair(im, clean_ids, corrupt_ids)
    ablation = ablation or ("patch" if corrupt is not None else "mean")
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    if ablation == "patch" and corrupt is None:
        raise ValueError("ablation='patch' needs corrupt_ids")
    if method not in ("atp", "ig"):
        raise ValueError(f"method must be 'atp' or 'ig', got {method!r}")
    if node_threshold is not None and top_k is not None:
        raise ValueError("give node_threshold or top_k, not both")
    if node_threshold is None and top_k is None:
        top_k = 5
    by_site = _sae_map(im, saes, sites)
    names = list(by_site)
    B = clean.shape[0]
    batch_size = batch_size or 8 * B

    # -- node values on the clean run, patch values --------------------------------------
    with torch.no_grad():
        _, cache = im.run_with_cache(clean, sites=names, **hf_kwargs)
        if corrupt is not None:
            _, ccache = im.run_with_cache(corrupt, sites=names, **hf_kwargs)
    clean_nodes = {s: _split(by_site[s], cache[s], s) for s in names}
    patch_nodes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for s in names:
        f, e = clean_nodes[s]
        if ablation == "patch":
            patch_nodes[s] = _split(by_site[s], ccache[s], s)
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
            x = sae.decode(fp.to(sae.W_dec.dtype)).float() + ep
        toward[s] = x.expand(B, *x.shape[1:]).reshape(cache[s].shape).to(cache[s].dtype)

    # -- node effects ------------------------------------------------------------------------
    _, grads, m_clean = site_gradients(im, clean, metric, names, method=method, toward=toward, steps=steps,
                                       batch_size=batch_size, progress=progress, **hf_kwargs)
    effects, err_effects = {}, {}
    for s in names:
        sae = by_site[s]
        g = grads[s].reshape(B, clean.shape[1], -1)  # dm/dx [b, p, d]
        f, e = clean_nodes[s]
        fp, ep = patch_nodes[s]
        g_f = g @ sae.W_dec.detach().float().T  # dm/df [b, p, d_sae]
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
        sites=names, effects=effects, error_effects=err_effects, nodes=nodes, edges={}, metric_clean=m_clean,
        metric_patch=float("nan"), method=method, ablation=ablation, saes=by_site,
        ablation_values={s: patch_nodes[s] for s in names}, clean_ids=clean,
    )
    with torch.no_grad():  # every node at its patch value
        circuit.metric_patch = _metric_of(im, clean, metric, ablate_complement(circuit, set()), hf_kwargs)
    if edges and len(names) > 1:
        circuit.edges = _edges(im, clean, circuit, clean_nodes, grads, edge_threshold, batch_size, progress,
                               hf_kwargs)
    return circuit


def _nonzero_items(t: torch.Tensor) -> list[tuple[tuple[int, int], float]]:
    idx = t.nonzero().tolist()
    return [((p, f), float(t[p, f])) for p, f in idx]


# ---------------------------------------------------------------------------------------------
# Edges
# ---------------------------------------------------------------------------------------------
def _edges(
    im: InstrumentedModel,
    clean: torch.Tensor,
    circuit: FeatureCircuit,
    clean_nodes: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    grads: Mapping[str, torch.Tensor],
    threshold: float,
    batch_size: int,
    progress: bool | None,
    hf: Mapping[str, Any],
) -> dict[tuple[CircuitNode, CircuitNode], float]:
    B, T = clean.shape
    per_chunk = max(1, batch_size // B)
    out: dict[tuple[CircuitNode, CircuitNode], float] = {}
    pairs = list(zip(circuit.sites[:-1], circuit.sites[1:], strict=True))
    jobs = [(u, d, n) for u, d in pairs for n in circuit.nodes if n[0] == d]
    bar = _progress(len(jobs), "feature-circuit edges", progress if len(jobs) > per_chunk else False)
    for up, down in pairs:
        ups = [n for n in circuit.nodes if n[0] == up]
        downs = [n for n in circuit.nodes if n[0] == down]
        if not ups or not downs:
            continue
        sae_u, sae_d = circuit.saes[up], circuit.saes[down]
        f_u, e_u = clean_nodes[up]
        fp_u, ep_u = circuit.ablation_values[up]
        df_u, de_u = (fp_u - f_u).unsqueeze(0), (ep_u - e_u).unsqueeze(0)  # right vectors [1, B, T, .]
        g_d = grads[down].reshape(B, T, -1)  # dm/dy at the downstream site
        gf_d = g_d @ sae_d.W_dec.detach().float().T  # dm/dg for downstream features
        for c0 in range(0, len(downs), per_chunk):
            chunk = downs[c0:c0 + per_chunk]
            R = len(chunk)
            ids = clean.repeat(R, 1)
            f_leaf = f_u.repeat(R, 1, 1).requires_grad_(True)
            e_leaf = e_u.repeat(R, 1, 1).requires_grad_(True)
            stash: dict[str, torch.Tensor] = {}

            def at_up(v: torch.Tensor, event: SiteEvent, f_leaf=f_leaf, e_leaf=e_leaf, sae_u=sae_u) -> torch.Tensor:
                xh = sae_u.decode(f_leaf.to(sae_u.W_dec.dtype)).float()
                moved = (xh - xh.detach()) + (e_leaf - e_leaf.detach())  # zero in value; gradient to the leaves
                return v.detach() + moved.reshape(v.shape).to(v.dtype)

            def at_down(v: torch.Tensor, event: SiteEvent, stash=stash, sae_d=sae_d) -> torch.Tensor:
                y = v.reshape(*v.shape[:2], -1)
                g = sae_d.encode(y).float()
                stash["f"] = g
                stash["e"] = y.float() - sae_d.decode(g.to(sae_d.W_dec.dtype)).float()
                return v

            with torch.enable_grad():
                forward_with(im, ids, [(up, at_up), (down, at_down)], None, repeat_rows(hf, B, R))
                seed_f = torch.zeros_like(stash["f"])
                seed_e = torch.zeros_like(stash["e"])
                for r, (_s, pos, feat) in enumerate(chunk):
                    rows = slice(r * B, (r + 1) * B)
                    if feat < 0:
                        seed_e[rows, pos] = g_d[:, pos]
                    else:
                        seed_f[rows, pos, feat] = gf_d[:, pos, feat]
                gf, ge = torch.autograd.grad([stash["f"], stash["e"]], [f_leaf, e_leaf], [seed_f, seed_e],
                                             allow_unused=True)
            gf = torch.zeros_like(f_leaf) if gf is None else gf
            ge = torch.zeros_like(e_leaf) if ge is None else ge
            w_f = (gf.view(R, B, T, -1) * df_u).sum(1)  # [R, T, d_sae]
            w_e = (ge.view(R, B, T, -1) * de_u).sum((1, 3))  # [R, T]
            for r, dn in enumerate(chunk):
                for un in ups:
                    _s, pos, feat = un
                    w = float(w_e[r, pos] if feat < 0 else w_f[r, pos, feat])
                    if abs(w) >= threshold and w != 0.0:
                        out[(un, dn)] = w
            bar.update(R)
    bar.close()
    return out

