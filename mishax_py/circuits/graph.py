"""Transcoder attribution graphs (the circuit-tracer method, Ameisen et al. 2025).

The *local replacement model* of a prompt replaces every MLP by its transcoder (reading
``blocks.L.ln2_normalized``, writing ``blocks.L.mlp_out``) plus an *error node* holding
what the transcoder misses at each (layer, position), and freezes the attention patterns
and the scales of every RMSNorm at their values on the prompt. With those fixed, the
replacement model is *linear* in the feature activations, error nodes and token
embeddings, so every node's pre-activation splits exactly into direct contributions:

* a feature node ``(L, p, i)`` with activation ``a`` contributes ``a * W_dec[i]`` to
  ``mlp_out`` of layer ``L`` at position ``p``;
* an error node ``(L, p)`` contributes the transcoder's error vector there;
* a token node ``p`` contributes the embedding at ``p`` (already x sqrt(d_model));
* targets are feature *pre-activations* ``x . W_enc[:, i] + b_enc[i]`` and logit nodes
  (the pre-soft-cap logit of a token minus the mean logit, as circuit-tracer does).

The direct attribution (an *edge*) from a source to a target is the source's output
vector dotted with the gradient of the target with respect to that output, taken in the
frozen model with the gradient stopped at every transcoder output (so only paths through
attention value/output circuits, frozen norms, residual connections and transcoder skip
connections count -- never through another feature). Completeness then holds exactly:
for every target, ``sum of incoming edges + bias == its value`` where ``bias`` collects
the constants (encoder bias, the decoder biases of earlier transcoders carried along the
linear paths). ``AttributionGraph.completeness_error()`` reports the largest violation.

How it runs (batched backward passes): the prompt is replicated ``batch_size`` times and
run once through the frozen replacement model, keeping the graph; then each backward pass
seeds a different target in every row (the gradient of a feature pre-activation is its
encoder column at its position; of a logit node, the de-meaned unembedding row at the last
position), so one backward yields ``batch_size`` rows of the adjacency matrix. Memory is
bounded by ``batch_size`` copies of the prompt's activations plus the ``[batch_size, pos,
d_model]`` gradients of one layer at a time: lower ``batch_size`` for long prompts.

How the model is frozen, using only canonical sites: a norm ``y = norm(x)`` between the
sites ``x`` and ``y`` is replaced for autograd by ``y.detach() + (x - x.detach()) * c``
with ``c = y / x`` (the RMSNorm gain times its frozen ``rsqrt`` scale; exact in value).
Pairs: ``resid_pre -> ln1``, ``attn_out_pre_norm -> attn_out``, ``resid_mid ->
ln2_normalized`` and ``resid_post`` (last layer) ``-> ln_final``. Attention patterns are
detached at ``attn.pattern``. A layer without a transcoder keeps its MLP output as a single
error node per position.

Checking claims: :meth:`AttributionGraph.clamp_effect` is exact in the replacement model
(:func:`mishax_py.circuits.replacement.replacement_interventions` runs it, with clamps) up to
features switching on or off. The real model can disagree where the frozen parts matter: on
the bundled ``gemma2-tiny``'s confident recall answer the final norm rescales a change along
the dominant answer direction away, so real ablations move the logit ~10x less than the graph
says and sometimes the other way (``benchmarks/RESULTS.md``).

Pruning follows circuit-tracer: normalise ``|A|`` by rows, node influence on the logits
(weighted by their probabilities) is ``w (A + A^2 + ...)``; keep the nodes carrying
``node_threshold`` of the cumulative influence (tokens and logits always), then the edges
carrying ``edge_threshold`` of the edge influence, then drop features left without
incoming or outgoing edges.

JSON export (``AttributionGraph.to_json``) writes circuit-tracer's graph-file format, which
Neuronpedia's attribution-graph viewer reads::

    {"metadata": {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt",
                  "node_threshold", "schema_version": 1, "info", "generation_settings",
                  "pruning_settings"},
     "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
     "nodes": [{"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
                "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp",
                "influence", "activation"}, ...],
     "links": [{"source", "target", "weight"}, ...]}

Node ids: feature ``"{layer}_{feature}_{pos}"`` (``feature_type`` ``"cross layer
transcoder"``, ``feature`` the Cantor pairing of layer and index, as circuit-tracer
writes it), error ``"{layer}_-1_{pos}"`` (``"mlp reconstruction error"``), token
``"E_{token_id}_{pos}"`` (``"embedding"``, ``layer`` ``"E"``), logit
``"{n_layers + 1}_{token_id}_{pos}"`` (``"logit"``). ``influence`` is circuit-tracer's
cumulative-influence fraction at the node's rank (small = among the most influential),
``activation`` the feature activation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.inputs import as_ids
from mishax_py.runtime import SiteEvent, activate

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = [
    "AttributionGraph",
    "attribution_graph",
    "compute_influence",
    "load_graph_json",
    "prune",
    "render_graph",
]

Handler = Callable[[torch.Tensor, SiteEvent], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# The graph object
# ---------------------------------------------------------------------------------------------
@dataclass
class AttributionGraph:
    """Direct-attribution graph of one prompt in the local replacement model.

    Node order (rows = targets, columns = sources of ``adjacency``): the active features
    (``features`` rows), the error nodes (layer-major: ``n_layers * n_pos``), the token
    nodes (``n_pos``), the logit nodes (``logit_tokens``).

    Attributes:
        input_ids: the prompt ``[n_pos]``.
        tokens: the prompt's token strings.
        n_layers: layers of the model.
        features: ``[n_features, 3]`` LongTensor ``(layer, pos, feature index)``.
        activations: ``[n_features]`` feature activations.
        pre_activations: ``[n_features]`` feature pre-activations (the targets' values).
        logit_tokens: ``[n_logits]`` token ids of the logit nodes (most probable first).
        logit_probabilities: ``[n_logits]`` their probabilities (weights of the influence).
        logit_values: ``[n_logits]`` de-meaned pre-soft-cap logits (the targets' values).
        adjacency: ``[n_nodes, n_nodes]``; ``adjacency[t, s]`` is the direct attribution of
            source ``s`` to target ``t``.
        bias: ``[n_nodes]`` the constant part of each target (0 for pure sources).
        visited: ``[n_nodes]`` whether the node's row was computed (all targets unless
            ``max_feature_nodes`` limited them).
        transcoder_layers: the layers whose MLP was replaced.
        error_norms: ``[n_layers, n_pos]`` L2 norm of each error vector.
        settings: generation settings (for the JSON metadata).
    """

    input_ids: torch.Tensor
    tokens: list[str]
    n_layers: int
    features: torch.Tensor
    activations: torch.Tensor
    pre_activations: torch.Tensor
    logit_tokens: torch.Tensor
    logit_probabilities: torch.Tensor
    logit_values: torch.Tensor
    adjacency: torch.Tensor
    bias: torch.Tensor
    visited: torch.Tensor
    transcoder_layers: list[int]
    error_norms: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)

    # -- node bookkeeping -----------------------------------------------------------------
    @property
    def n_pos(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.numel())

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_layers * self.n_pos + self.n_pos + self.n_logits

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_layers * self.n_pos + pos

    def logit_index(self, k: int) -> int:
        return self.n_features + self.n_layers * self.n_pos + self.n_pos + k

    def feature_index(self, layer: int, pos: int, feature: int) -> int:
        """Row of feature node ``(layer, pos, feature)``; raises ``KeyError`` if it is not active."""
        hit = ((self.features[:, 0] == layer) & (self.features[:, 1] == pos) & (self.features[:, 2] == feature))
        idx = hit.nonzero()
        if idx.numel() == 0:
            raise KeyError(f"feature {feature} at layer {layer}, position {pos} is not active in this graph")
        return int(idx[0, 0])

    def node_kind(self, index: int) -> str:
        if index < self.n_features:
            return "feature"
        if index < self.n_features + self.n_layers * self.n_pos:
            return "error"
        if index < self.n_features + self.n_layers * self.n_pos + self.n_pos:
            return "token"
        return "logit"

    def node_id(self, index: int) -> str:
        """circuit-tracer's node id of node ``index``."""
        kind = self.node_kind(index)
        if kind == "feature":
            layer, pos, feat = (int(v) for v in self.features[index])
            return f"{layer}_{feat}_{pos}"
        if kind == "error":
            layer, pos = divmod(index - self.n_features, self.n_pos)
            return f"{layer}_-1_{pos}"
        if kind == "token":
            pos = index - self.token_index(0)
            return f"E_{int(self.input_ids[pos])}_{pos}"
        k = index - self.logit_index(0)
        return f"{self.n_layers + 1}_{int(self.logit_tokens[k])}_{self.n_pos - 1}"

    def node_values(self) -> torch.Tensor:
        """``[n_nodes]`` the value each target row decomposes (pre-activations, logit values; NaN for sources)."""
        v = torch.full((self.n_nodes,), float("nan"), dtype=self.adjacency.dtype)
        v[: self.n_features] = self.pre_activations.to(v.dtype)
        v[self.logit_index(0):] = self.logit_values.to(v.dtype)
        return v

    def completeness_error(self) -> float:
        """Largest ``|sum of incoming edges + bias - value|`` over the computed target rows."""
        vals = self.node_values()
        rows = self.visited & torch.isfinite(vals)
        if not bool(rows.any()):
            return 0.0
        got = self.adjacency[rows].sum(1) + self.bias[rows]
        return float((got - vals[rows]).abs().max())

    def clamp_effect(self, node: int, value: float = 0.0) -> torch.Tensor:
        """What the graph predicts clamping feature ``node`` to ``value`` does: ``[n_nodes]`` value changes.

        The change ``value - a`` of the feature's activation moves each target's
        pre-activation by ``edge * (value - a) / a`` (an edge is ``a`` times the per-unit
        effect); a changed active feature passes its change on to its own targets the same
        way (slope 1: ReLU, JumpReLU and TopK features are linear while active), until the
        logits. This is the linear replacement model's total effect (attention patterns,
        norm scales and error nodes frozen); read ``[logit_index(k)]`` for logit ``k``. Rows
        that were not computed (``max_feature_nodes``) pass nothing on.
        """
        if self.node_kind(node) != "feature":
            raise ValueError(f"node {node} ({self.node_id(node)}) is not a feature node")
        nf = self.n_features
        acts = self.activations.to(self.adjacency.dtype)
        per_unit = self.adjacency[:, :nf] / acts.clamp(min=1e-12)  # d target / d activation of each feature
        delta = per_unit[:, node] * (float(value) - float(acts[node]))
        total = delta.clone()
        total[node] = 0.0
        for _ in range(nf + 1):  # acyclic: each round moves at least one layer downstream
            step = per_unit @ delta[:nf]
            if not bool(step.any()):
                break
            total += step
            delta = step
        total[node] = float(value) - float(acts[node])
        return total

    def ablation_effects(self, target: int) -> torch.Tensor:
        """``[n_features]``: the change of node ``target`` the graph predicts when each feature is set to 0.

        ``-a_s * (total per-unit effect of s on target)`` through direct edges and chains of
        active features (see :meth:`clamp_effect`, which this computes for all features at once).
        """
        nf = self.n_features
        acts = self.activations.to(self.adjacency.dtype)
        per_unit_ff = self.adjacency[:nf, :nf] / acts.clamp(min=1e-12)
        row = self.adjacency[target, :nf] / acts.clamp(min=1e-12)
        total = row.clone()
        for _ in range(nf + 1):
            row = row[None] @ per_unit_ff
            row = row[0]
            if not bool(row.any()):
                break
            total += row
        return -acts * total

    def top_sources(self, target: int, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` sources with the largest ``|edge|`` into node ``target``: ``(node id, weight)``."""
        row = self.adjacency[target]
        idx = row.abs().topk(min(k, row.numel())).indices.tolist()
        return [(self.node_id(i), float(row[i])) for i in idx if float(row[i]) != 0.0]

    # -- pruning and export ----------------------------------------------------------------
    def logit_weights(self) -> torch.Tensor:
        w = torch.zeros(self.n_nodes, dtype=self.adjacency.dtype)
        w[self.logit_index(0):] = self.logit_probabilities.to(w.dtype)
        return w

    def node_influence(self) -> torch.Tensor:
        """``[n_nodes]`` influence of each node on the logits (circuit-tracer's definition)."""
        return compute_influence(_normalise_rows(self.adjacency), self.logit_weights())

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PrunedGraph:
        """Keep the nodes/edges carrying ``node_threshold``/``edge_threshold`` of the influence."""
        return prune(self, node_threshold, edge_threshold)

    def to_json(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        node_threshold: float = 0.8,
        edge_threshold: float = 0.98,
        slug: str = "mishax-py-graph",
        scan: str = "mishax-py",
        clerps: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The pruned graph in circuit-tracer's JSON format (see the module docs); written to ``path`` if given.

        ``clerps``: optional ``{node_id: label}`` descriptions shown by the viewer.
        """
        pr = self.prune(node_threshold, edge_threshold)
        data = _graph_json(self, pr, slug=slug, scan=scan, clerps=clerps or {})
        if path is not None:
            with open(os.fspath(path), "w") as f:
                json.dump(data, f, indent=1)
        return data

    def render(self, path: str | os.PathLike[str], **kwargs: Any) -> str:
        """Draw the pruned graph to ``path`` (PNG or SVG by extension); see :func:`render_graph`."""
        return render_graph(self, path, **kwargs)

    def __repr__(self) -> str:
        return (f"AttributionGraph({self.n_pos} tokens, {self.n_features} active features, "
                f"{self.n_logits} logits, {self.n_nodes} nodes, transcoders at layers {self.transcoder_layers})")


@dataclass
class PrunedGraph:
    """Masks of a pruned :class:`AttributionGraph`.

    Attributes:
        node_mask: ``[n_nodes]`` nodes kept.
        edge_mask: ``[n_nodes, n_nodes]`` edges kept.
        cumulative_scores: ``[n_nodes]`` the cumulative influence fraction at each node's rank.
        influence: ``[n_nodes]`` node influence.
        node_threshold, edge_threshold: the shares of influence kept.
    """

    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    cumulative_scores: torch.Tensor
    influence: torch.Tensor
    node_threshold: float = 0.8
    edge_threshold: float = 0.98


def _normalise_rows(A: torch.Tensor) -> torch.Tensor:
    absA = A.abs()
    return absA / absA.sum(1, keepdim=True).clamp(min=1e-10)


def compute_influence(A: torch.Tensor, weights: torch.Tensor, max_iter: int = 10_000) -> torch.Tensor:
    """``weights @ (A + A^2 + ...)`` for a nilpotent (acyclic) ``A``."""
    current = weights @ A
    total = current.clone()
    for _ in range(max_iter):
        if not bool(current.any()):
            return total
        current = current @ A
        total += current
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def _threshold(scores: torch.Tensor, share: float) -> torch.Tensor:
    """The score above which the largest scores add up to ``share`` of the total."""
    s = scores.flatten().sort(descending=True).values
    total = s.sum()
    if total <= 0:
        return s[0] if s.numel() else torch.tensor(0.0)
    cum = s.cumsum(0) / total
    k = int(torch.searchsorted(cum, torch.tensor(share, dtype=cum.dtype)).item())
    return s[min(k, s.numel() - 1)]


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PrunedGraph:
    """Influence pruning as in circuit-tracer (see the module docs)."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    A = graph.adjacency.float()
    n_fixed = graph.n_pos + graph.n_logits  # tokens and logits, always kept
    w = graph.logit_weights()
    influence = compute_influence(_normalise_rows(A), w)
    node_mask = influence >= _threshold(influence, node_threshold)
    node_mask[-n_fixed:] = True
    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    norm = _normalise_rows(pruned)
    edge_scores = norm * (compute_influence(norm, w) + w)[:, None]
    edge_mask = edge_scores >= _threshold(edge_scores, edge_threshold)
    edge_mask &= pruned != 0
    nf = graph.n_features
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:-n_fixed] &= edge_mask[:, :-n_fixed].any(0)  # features/errors need an outgoing edge
        node_mask[:nf] &= edge_mask[:nf].any(1)  # features need an incoming edge
        if torch.equal(before, node_mask):
            break
    order = influence.sort(descending=True)
    cum = order.values.cumsum(0) / order.values.sum().clamp(min=1e-30)
    cumulative = torch.zeros_like(influence)
    cumulative[order.indices] = cum
    return PrunedGraph(node_mask, edge_mask, cumulative, influence, float(node_threshold), float(edge_threshold))


def _cantor(a: int, b: int) -> int:
    return (a + b) * (a + b + 1) // 2 + b


def _graph_json(g: AttributionGraph, pr: PrunedGraph, *, slug: str, scan: str, clerps: Mapping[str, str]
                ) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = []
    kept = pr.node_mask.nonzero().flatten().tolist()
    last = g.n_pos - 1
    for i in kept:
        kind = g.node_kind(i)
        nid = g.node_id(i)
        base = {"node_id": nid, "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
                "clerp": clerps.get(nid, ""), "influence": float(pr.cumulative_scores[i]), "activation": None}
        if kind == "feature":
            layer, pos, feat = (int(v) for v in g.features[i])
            base.update(feature=_cantor(layer, feat), layer=str(layer), ctx_idx=pos,
                        feature_type="cross layer transcoder", jsNodeId=f"{layer}_{feat}-0",
                        activation=float(g.activations[i]))
        elif kind == "error":
            layer, pos = divmod(i - g.n_features, g.n_pos)
            base.update(feature=-1, layer=str(layer), ctx_idx=pos, feature_type="mlp reconstruction error",
                        jsNodeId=f"{layer}_-1-{pos}")
        elif kind == "token":
            pos = i - g.token_index(0)
            tok = int(g.input_ids[pos])
            base.update(feature=pos, layer="E", ctx_idx=pos, feature_type="embedding", jsNodeId=f"E_{tok}-{pos}")
        else:
            k = i - g.logit_index(0)
            tok = int(g.logit_tokens[k])
            p = float(g.logit_probabilities[k])
            word = g.settings.get("logit_strings", {}).get(tok, str(tok))
            base.update(feature=tok, layer=str(g.n_layers + 1), ctx_idx=last, feature_type="logit", token_prob=p,
                        is_target_logit=k == 0, jsNodeId=f"L_{tok}-{last}", influence=None,
                        clerp=clerps.get(nid, f'Output "{word}" (p={p:.3f})'))
        nodes.append(base)
    keep = set(kept)
    tgt, src = pr.edge_mask.nonzero(as_tuple=True)
    links = [
        {"source": g.node_id(s), "target": g.node_id(t), "weight": float(g.adjacency[t, s])}
        for t, s in zip(tgt.tolist(), src.tolist(), strict=True) if s in keep and t in keep
    ]
    meta = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": [],
        "prompt_tokens": list(g.tokens),
        "prompt": "".join(g.tokens),
        "node_threshold": pr.node_threshold,
        "schema_version": 1,
        "info": {"generator": {"name": "mishax-py circuits.graph", "url": ""},
                 "transcoder_layers": list(g.transcoder_layers)},
        "generation_settings": {k: v for k, v in g.settings.items() if k != "logit_strings"},
        "pruning_settings": {"node_threshold": pr.node_threshold, "edge_threshold": pr.edge_threshold},
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": qparams, "nodes": nodes, "links": links}


_NODE_KEYS = ("node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId")


def load_graph_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a graph JSON file and check it has circuit-tracer's structure; returns the parsed dict.

    Raises:
        ValueError: naming the first missing or inconsistent field.
    """
    with open(os.fspath(path)) as f:
        data = json.load(f)
    for key in ("metadata", "qParams", "nodes", "links"):
        if key not in data:
            raise ValueError(f"{path}: not an attribution-graph file (no {key!r})")
    for key in ("prompt_tokens", "prompt", "schema_version"):
        if key not in data["metadata"]:
            raise ValueError(f"{path}: metadata has no {key!r}")
    ids = set()
    for n in data["nodes"]:
        for key in _NODE_KEYS:
            if key not in n:
                raise ValueError(f"{path}: node {n.get('node_id', n)!r} has no {key!r}")
        ids.add(n["node_id"])
    for e in data["links"]:
        if e.get("source") not in ids or e.get("target") not in ids or not isinstance(e.get("weight"), (int, float)):
            raise ValueError(f"{path}: link {e!r} does not join two listed nodes with a numeric weight")
    return data


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def render_graph(
    graph: AttributionGraph | Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_edges: int = 300,
    title: str | None = None,
    dpi: int = 130,
) -> str:
    """Draw an attribution graph (an :class:`AttributionGraph`, or a loaded JSON dict) with matplotlib.

    Positions run left to right (token labels below), layers bottom to top (embeddings at
    the bottom, logits at the top); several nodes at one (layer, position) spread
    sideways. Feature nodes are circles (area ~ influence), error nodes grey squares,
    tokens and logits labelled boxes. Edges are red (positive) / blue (negative), their
    width and opacity proportional to ``|weight|`` (the ``max_edges`` strongest drawn).
    The file type follows the extension (``.png``, ``.svg``, ``.pdf``). Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = graph.to_json(node_threshold=node_threshold, edge_threshold=edge_threshold) \
        if isinstance(graph, AttributionGraph) else graph
    nodes = data["nodes"]
    tokens = data["metadata"]["prompt_tokens"]
    layer_ids = sorted({int(n["layer"]) for n in nodes if n["layer"] != "E"})
    top = max(layer_ids) if layer_ids else 1

    def y_of(n: Mapping[str, Any]) -> float:
        return -1.0 if n["layer"] == "E" else float(n["layer"])

    groups: dict[tuple[float, int], list[Mapping[str, Any]]] = {}
    for n in nodes:
        groups.setdefault((y_of(n), int(n["ctx_idx"])), []).append(n)
    xy: dict[str, tuple[float, float]] = {}
    for (y, x), members in groups.items():
        per_row = 10 if members[0]["feature_type"] == "logit" else 5  # side by side in a cell, then wrap
        members = sorted(members, key=lambda m: (m["feature_type"] != "mlp reconstruction error",
                                                 m.get("influence") or 0.0))
        n_rows = (len(members) + per_row - 1) // per_row
        for j, n in enumerate(members):
            row, col = divmod(j, per_row)
            k = min(per_row, len(members) - row * per_row)
            dy = (row - (n_rows - 1) / 2) * min(0.7 / max(n_rows, 1), 0.22)
            xy[n["node_id"]] = (x + (col - (k - 1) / 2) * (0.09 if per_row > 5 else 0.16), y + dy)
    n_pos = max(len(tokens), 1)
    fig = Figure(figsize=(min(3 + 0.9 * n_pos, 28), min(2.5 + 0.7 * (top + 2), 20)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    links = sorted(data["links"], key=lambda e: -abs(e["weight"]))[:max_edges]
    wmax = max((abs(e["weight"]) for e in links), default=1.0) or 1.0
    for e in links:
        (x0, y0), (x1, y1) = xy[e["source"]], xy[e["target"]]
        s = abs(e["weight"]) / wmax
        ax.plot([x0, x1], [y0, y1], color="#c0392b" if e["weight"] > 0 else "#2e6fd8", lw=0.3 + 2.5 * s,
                alpha=0.15 + 0.7 * s, zorder=1)
    style = {"cross layer transcoder": ("o", "#f5b041"), "mlp reconstruction error": ("s", "#aab7b8"),
             "embedding": ("s", "#d5dbdb"), "logit": ("D", "#58d68d")}
    for n in nodes:
        x, y = xy[n["node_id"]]
        marker, color = style.get(n["feature_type"], ("o", "#888888"))
        infl = n.get("influence")
        size = 40 if infl is None else 30 + 120 * (1 - min(max(float(infl), 0.0), 1.0))
        ax.scatter([x], [y], s=size, marker=marker, c=color, edgecolors="black", linewidths=0.5, zorder=2)
        if n["feature_type"] == "cross layer transcoder":
            ax.annotate(n["node_id"].split("_")[1], (x, y), fontsize=5, ha="center", va="center", zorder=3)
        elif n["feature_type"] == "logit":
            word = str(n.get("clerp", "")).removeprefix("Output ").split(" (p=")[0][:16]
            ax.annotate(word, (x, y), xytext=(0, 6), textcoords="offset points", fontsize=6, ha="left",
                        va="bottom", rotation=60)
    ax.set_xticks(range(len(tokens)), [str(t) for t in tokens], rotation=60, fontsize=7)
    ax.set_yticks([-1, *layer_ids], ["emb", *[("logits" if L == top and any(n["feature_type"] == "logit" and
                                                                         int(n["layer"]) == L for n in nodes)
                                               else f"L{L}") for L in layer_ids]], fontsize=7)
    ax.set_xlim(-0.7, n_pos - 0.3)
    ax.set_ylim(-1.7, top + 1.6)
    ax.set_title(title or f"attribution graph: {len(nodes)} nodes, {len(data['links'])} edges", fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=dpi)
    return os.fspath(path)


# ---------------------------------------------------------------------------------------------
# Building the graph
# ---------------------------------------------------------------------------------------------
def _transcoder_map(im: InstrumentedModel, transcoders: Any) -> dict[int, Any]:
    """``{layer: transcoder}`` from a mapping or a sequence of transcoders with ``site``/``output_site``."""
    items = list(transcoders.items()) if isinstance(transcoders, Mapping) else [(None, t) for t in transcoders]
    out: dict[int, Any] = {}
    for key, tc in items:
        for attr in ("pre_acts", "activation", "W_enc", "W_dec", "b_dec"):
            if not hasattr(tc, attr):
                raise TypeError(f"transcoder {tc!r} has no {attr!r}: expected a saes.Transcoder (or a duck-typed one)")
        site = getattr(tc, "site", None)
        out_site = getattr(tc, "output_site", None)
        if site is None or out_site is None:
            if key is None:
                raise ValueError("transcoders given as a list need .site and .output_site; pass {layer: transcoder}")
            site = site or f"blocks.{key}.ln2_normalized"
            out_site = out_site or f"blocks.{key}.mlp_out"
        site, out_site = im.resolve(site)[0], im.resolve(out_site)[0]
        layer = im.site_info(site).layer
        if key is not None and int(key) != layer:
            raise ValueError(f"transcoder given for layer {key} reads {site!r} (layer {layer})")
        ok_in = site in (f"blocks.{layer}.ln2_normalized", f"blocks.{layer}.ln2")
        if not ok_in or out_site != f"blocks.{layer}.mlp_out":
            raise ValueError(
                f"attribution graphs need transcoders reading blocks.L.ln2_normalized (or ln2) and writing "
                f"blocks.L.mlp_out of the same layer; got {site!r} -> {out_site!r}"
            )
        if layer in out:
            raise ValueError(f"two transcoders for layer {layer}")
        out[layer] = (tc, site)
    if not out:
        raise ValueError("attribution_graph needs at least one transcoder")
    return out


@torch.no_grad()
def _prompt_state(im: InstrumentedModel, ids: torch.Tensor, tcs: dict[int, Any]) -> dict[str, Any]:
    """One plain forward: features, pre-activations, error vectors, embeddings, final-norm output."""
    L = im.n_layers
    sites = ["embed", "ln_final", *[f"blocks.{i}.mlp_out" for i in range(L)], *[s for _, s in tcs.values()]]
    logits, cache = im.run_with_cache(ids, sites=sites)
    feats, errors = {}, {}
    for layer in range(L):
        y = cache[f"blocks.{layer}.mlp_out"][0].float()
        if layer not in tcs:
            errors[layer] = y
            continue
        tc, site = tcs[layer]
        x = cache[site][0]
        pre, f = _transcoder_features(tc, x)
        errors[layer] = y - _transcoder_output(tc, f, x)
        feats[layer] = (pre, f)
    return {"logits": logits[0, -1].float(), "embed": cache["embed"][0].float(), "ln_final": cache["ln_final"][0],
            "feats": feats, "errors": errors}


def _transcoder_features(tc: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pre-activations, activations)`` of a transcoder on its input ``x`` (float32)."""
    pre = tc.pre_acts(x).float()
    return pre, tc.activation(pre.clone()).float()  # clone: an activation may work in place


def _transcoder_output(tc: Any, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What a transcoder writes for activations ``f`` on input ``x``: decoder (+ skip connection), float32."""
    out = tc.decode(f.to(tc.W_dec.dtype)).float()
    skip = tc.skip_term(x) if hasattr(tc, "skip_term") else None
    return out if skip is None else out + skip.float()


def _norm_pairs(n_layers: int) -> list[tuple[str, str]]:
    """The RMSNorms the replacement model freezes, as ``(input site, output site)`` pairs."""
    pairs = []
    for layer in range(n_layers):
        b = f"blocks.{layer}"
        pairs += [(f"{b}.resid_pre", f"{b}.ln1"), (f"{b}.attn_out_pre_norm", f"{b}.attn_out"),
                  (f"{b}.resid_mid", f"{b}.ln2_normalized")]
    return [*pairs, (f"blocks.{n_layers - 1}.resid_post", "ln_final")]


def _norm_scale(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``c = y / x`` elementwise (0 where ``x`` is 0): a norm's output as a fixed scale of its input."""
    return torch.where(x != 0, y / torch.where(x != 0, x, torch.ones_like(x)), torch.zeros_like(x))


def _freeze_norm(stash: dict[str, torch.Tensor], src: str) -> Handler:
    """Autograd sees ``y = c * x`` with ``c = y / x`` frozen (value unchanged)."""

    def h(y: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        x = stash[src]
        xd = x.detach().to(y.dtype)
        return y.detach() + (x.to(y.dtype) - xd) * _norm_scale(xd, y.detach())

    return h


def _stash(stash: dict[str, torch.Tensor], name: str, leaf: bool = False) -> Handler:
    def h(v: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        if leaf:
            v = v.detach().requires_grad_(True)
        stash[name] = v
        return v

    return h


def _replace_mlp(stash: dict[str, torch.Tensor], layer: int, tc: Any, in_name: str | None) -> Handler:
    """mlp_out becomes a leaf (the sources' outputs are constants); only a skip connection passes gradient."""

    def h(v: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        leaf = v.detach().requires_grad_(True)
        stash[f"mlp{layer}"] = leaf
        if tc is not None and in_name is not None and getattr(tc, "W_skip", None) is not None:
            skip = tc.skip_term(stash[in_name]).to(v.dtype)
            return leaf + (skip - skip.detach())
        return leaf

    return h


def _detach(v: torch.Tensor, event: SiteEvent) -> torch.Tensor:
    return v.detach()


def attribution_graph(
    im: InstrumentedModel,
    ids: Any,
    transcoders: Mapping[int, Any] | Sequence[Any],
    *,
    tokenizer: Any = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    logit_tokens: Sequence[int] | None = None,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
    progress: bool | None = None,
) -> AttributionGraph:
    """Build the attribution graph of one prompt (see the module docs).

    Args:
        im: the instrumented model.
        ids: the prompt, token ids ``[pos]`` or ``[1, pos]``.
        transcoders: ``{layer: transcoder}`` or a list of transcoders with ``site``
            (``blocks.L.ln2_normalized``) and ``output_site`` (``blocks.L.mlp_out``). Layers
            without one keep their whole MLP output as error nodes.
        tokenizer: optional, for token strings.
        max_n_logits, desired_logit_prob: logit nodes are the most probable next tokens
            until their probabilities add up to ``desired_logit_prob`` (at most ``max_n_logits``).
        logit_tokens: explicit logit-node tokens instead (the first is the target logit).
        max_feature_nodes: compute rows for at most this many features, chosen greedily
            by their current influence on the logits (circuit-tracer's strategy); default: all.
        batch_size: targets per backward pass (rows of the replicated forward).
        progress: a tqdm bar over backward passes (default: on a terminal).
    """
    ids = as_ids(ids, im.model)
    if ids.shape[0] != 1:
        raise ValueError(f"attribution_graph takes one prompt, got a batch of {ids.shape[0]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for site in ("embed", "ln_final", "blocks.0.attn.pattern", "blocks.0.resid_mid", "blocks.0.mlp_out"):
        im.resolve(site)  # raises UnknownSiteError for models without the canonical sites
    tcs = _transcoder_map(im, transcoders)
    n_layers, T = im.n_layers, ids.shape[1]
    st = _prompt_state(im, ids, tcs)

    # -- nodes --------------------------------------------------------------------------
    feat_rows, acts, pres = [], [], []
    for layer in sorted(st["feats"]):
        pre, f = st["feats"][layer]
        nz = (f != 0).nonzero()
        feat_rows.append(torch.cat([torch.full((nz.shape[0], 1), layer), nz], 1))
        acts.append(f[nz[:, 0], nz[:, 1]])
        pres.append(pre[nz[:, 0], nz[:, 1]])
    features = torch.cat(feat_rows).long() if feat_rows else torch.zeros(0, 3, dtype=torch.long)
    activations = torch.cat(acts) if acts else torch.zeros(0)
    pre_acts = torch.cat(pres) if pres else torch.zeros(0)
    n_f = features.shape[0]

    W_U = im.model.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    lm_bias = getattr(im.model.get_output_embeddings(), "bias", None)
    probs = st["logits"].softmax(-1)
    if logit_tokens is not None:
        ltoks = torch.as_tensor(list(logit_tokens), dtype=torch.long)
        if ltoks.numel() == 0 or bool((ltoks < 0).any()) or bool((ltoks >= W_U.shape[0]).any()):
            raise ValueError(f"logit_tokens must be token ids in [0, {W_U.shape[0]}), got {list(logit_tokens)}")
    else:
        top = probs.sort(descending=True)
        k = int(torch.searchsorted(top.values.cumsum(0), torch.tensor(desired_logit_prob)).item()) + 1
        ltoks = top.indices[: max(1, min(k, max_n_logits))]
    lprobs = probs[ltoks]
    logit_vecs = W_U[ltoks] - W_U.mean(0)  # de-meaned unembedding rows [n_logits, d_model]
    pre_logits = st["ln_final"][-1].float() @ W_U.T
    if lm_bias is not None:
        pre_logits = pre_logits + lm_bias.detach().float()
    logit_values = pre_logits[ltoks] - pre_logits.mean()
    n_l = ltoks.numel()
    n_nodes = n_f + n_layers * T + T + n_l
    A = torch.zeros(n_nodes, n_nodes)
    bias = torch.zeros(n_nodes)
    visited = torch.zeros(n_nodes, dtype=torch.bool)

    # -- the replicated frozen forward --------------------------------------------------
    R = batch_size
    stash: dict[str, torch.Tensor] = {}
    handlers: list[tuple[str, Handler]] = [("embed", _stash(stash, "embed", leaf=True))]
    for x_site, y_site in _norm_pairs(n_layers):  # registered first: a site's stash below sees the frozen value
        handlers += [(x_site, _stash(stash, x_site)), (y_site, _freeze_norm(stash, x_site))]
    for layer in range(n_layers):
        b = f"blocks.{layer}"
        tc, in_site = tcs.get(layer, (None, None))
        handlers += [
            (f"{b}.attn.pattern", _detach),
            (f"{b}.ln2_normalized", _stash(stash, f"{b}.ln2_normalized")),
            (f"{b}.ln2", _stash(stash, f"{b}.ln2")),
            (f"{b}.mlp_out", _replace_mlp(stash, layer, tc, in_site)),
        ]
    handlers += [("ln_final", _stash(stash, "ln_final"))]
    ctx = im.context(None, batch=R, pos=T)
    for name, h in handlers:
        im.add_handler(ctx, name, h)
    with torch.enable_grad(), activate(ctx):
        im.forward(ids.expand(R, T).contiguous())

    embed = st["embed"]
    err = torch.stack([st["errors"][layer] for layer in range(n_layers)])  # [L, T, d]
    # per layer: decoder rows of active features (scaled by activation) and their positions
    by_layer = {}
    for layer in tcs:
        sel = (features[:, 0] == layer).nonzero().flatten()
        tc = tcs[layer][0]
        W = tc.W_dec.detach().float()[features[sel, 2]] * activations[sel, None]
        by_layer[layer] = (sel, features[sel, 1], W, tc.b_dec.detach().float())

    def run_rows(targets: list[int]) -> None:
        """Compute adjacency rows for node indices ``targets`` (features or logits) in one backward."""
        outs: dict[str, torch.Tensor] = {}
        for r, node in enumerate(targets):
            if node < n_f:
                layer, pos, feat = (int(v) for v in features[node])
                tc, site = tcs[layer]
                seed_name = site
                vec = tc.W_enc.detach()[:, feat]
            else:
                seed_name, pos, vec = "ln_final", T - 1, logit_vecs[node - (n_nodes - n_l)]
            out = outs.get(seed_name)
            if out is None:
                ref = stash[seed_name]
                out = outs[seed_name] = torch.zeros(ref.shape, dtype=ref.dtype)
            out[r, pos] = vec.to(out.dtype)
        names = list(outs)
        inputs = [stash["embed"]] + [stash[f"mlp{layer}"] for layer in range(n_layers)]
        grads = torch.autograd.grad([stash[n] for n in names], inputs, grad_outputs=[outs[n] for n in names],
                                    retain_graph=True, allow_unused=True)
        k = len(targets)
        g_embed = grads[0]
        rows = torch.zeros(k, n_nodes)
        const = torch.zeros(k)
        if g_embed is not None:
            rows[:, n_f + n_layers * T: n_f + n_layers * T + T] = (g_embed[:k].float() * embed).sum(-1)
        for layer in range(n_layers):
            g = grads[1 + layer]
            if g is None:
                continue
            g = g[:k].float()  # [k, T, d]
            rows[:, n_f + layer * T: n_f + (layer + 1) * T] = (g * err[layer]).sum(-1)
            if layer in by_layer:
                sel, pos_sel, W, b_dec = by_layer[layer]
                if sel.numel():
                    rows[:, sel] = (g[:, pos_sel] * W).sum(-1)
                const += (g @ b_dec).sum(-1)
        for r, node in enumerate(targets):
            if node < n_f:
                layer, _pos, feat = (int(v) for v in features[node])
                tc, site = tcs[layer]
                zero = torch.zeros(1, int(tc.W_enc.shape[0]), dtype=tc.W_enc.dtype)
                with torch.no_grad():  # b_enc (and -b_dec W_enc if the SAE subtracts b_dec from its input)
                    const[r] += float(tc.pre_acts(zero)[0, feat])
            elif lm_bias is not None:
                kk = node - (n_nodes - n_l)
                const[r] += float(lm_bias[ltoks[kk]] - lm_bias.mean())
        A[targets] = rows
        bias[targets] = const
        visited[targets] = True

    logit_nodes = list(range(n_nodes - n_l, n_nodes))
    order: list[int] = []
    total = n_l + (n_f if max_feature_nodes is None else min(n_f, max_feature_nodes))
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="attribution graph rows", disable=None if progress is None else not progress,
               leave=False)
    for i in range(0, n_l, R):
        run_rows(logit_nodes[i:i + R])
        bar.update(len(logit_nodes[i:i + R]))
    if max_feature_nodes is None:
        order = list(range(n_f))
        for i in range(0, n_f, R):
            run_rows(order[i:i + R])
            bar.update(len(order[i:i + R]))
    else:
        w = torch.zeros(n_nodes)
        w[n_nodes - n_l:] = lprobs
        remaining = torch.ones(n_f, dtype=torch.bool)
        budget = min(n_f, max_feature_nodes)
        while budget > 0 and bool(remaining.any()):
            infl = compute_influence(_normalise_rows(A), w)[:n_f].masked_fill(~remaining, -1.0)
            take = infl.topk(min(R, budget, int(remaining.sum()))).indices.tolist()
            run_rows(take)
            remaining[take] = False
            budget -= len(take)
            bar.update(len(take))
    bar.close()
    stash.clear()

    toks = [tokenizer.decode([int(t)]) for t in ids[0]] if tokenizer is not None else [str(int(t)) for t in ids[0]]
    logit_strings = {int(t): (tokenizer.decode([int(t)]) if tokenizer is not None else str(int(t))) for t in ltoks}
    settings = {"max_n_logits": max_n_logits, "desired_logit_prob": desired_logit_prob, "batch_size": batch_size,
                "max_feature_nodes": max_feature_nodes, "logit_strings": logit_strings}
    return AttributionGraph(
        input_ids=ids[0].cpu(), tokens=toks, n_layers=n_layers, features=features, activations=activations,
        pre_activations=pre_acts, logit_tokens=ltoks.cpu(), logit_probabilities=lprobs.cpu(),
        logit_values=logit_values.cpu(), adjacency=A, bias=bias, visited=visited,
        transcoder_layers=sorted(tcs), error_norms=err.norm(dim=-1), settings=settings,
    )
