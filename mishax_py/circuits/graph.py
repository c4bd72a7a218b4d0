"""The attribution graph of one prompt: its nodes, its adjacency matrix, and what it predicts.

An :class:`AttributionGraph` holds the direct attributions between the nodes of a prompt's
local replacement model (built by :func:`mishax_py.circuits.build.attribution_graph`, which
describes the method): active transcoder features, error nodes, token embeddings and logits.
The graph is linear in the feature activations, so it predicts what clamping a feature does
(:meth:`AttributionGraph.clamp_effect`, exact in the replacement model up to features switching
on or off); it is pruned by influence (:mod:`mishax_py.circuits.prune`), written in
circuit-tracer's JSON format (:mod:`mishax_py.circuits.json_format`) and drawn
(:mod:`mishax_py.circuits.render`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mishax_py.circuits.json_format import ErrorIds, graph_to_json
from mishax_py.circuits.prune import PrunedGraph, compute_influence, normalise_rows, prune
from mishax_py.circuits.render import render_graph

__all__ = ["AttributionGraph", "PrunedGraph"]


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
        settings: generation settings (for the JSON metadata; ``zero_bos``: whether position 0's
            features and error vectors were zeroed, ``zero_positions``: every zeroed position, see
            :func:`~mishax_py.circuits.build.attribution_graph`).
        prompt: the prompt as one string, the tokenizer's ``decode`` of ``input_ids`` (``None``:
            ``tokens`` joined by spaces); circuit-tracer's ``metadata.prompt``.
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
    prompt: str | None = None

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
        """The node id of node ``index``: circuit-tracer's for features, tokens and logits; ``{layer}_-1_{pos}`` for
        error nodes, which never equals a feature's (circuit-tracer 0.5.0's files write ``0_{layer}_{pos}``, the
        id of feature ``layer`` of layer 0 too; :meth:`to_json` writes that by default, see ``error_ids``)."""
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
        v = torch.full((self.n_nodes,), float("nan"), dtype=self.adjacency.dtype, device=self.adjacency.device)
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
        w = torch.zeros(self.n_nodes, dtype=self.adjacency.dtype, device=self.adjacency.device)
        w[self.logit_index(0):] = self.logit_probabilities.to(w.dtype)
        return w

    def node_influence(self) -> torch.Tensor:
        """``[n_nodes]`` influence of each node on the logits (circuit-tracer's definition)."""
        return compute_influence(normalise_rows(self.adjacency), self.logit_weights())

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
        error_ids: ErrorIds = "circuit-tracer",
    ) -> dict[str, Any]:
        """The pruned graph in circuit-tracer's JSON format (see :mod:`~mishax_py.circuits.json_format`); written
        to ``path`` if given.

        ``clerps``: optional ``{node_id: label}`` descriptions shown by the viewer. ``error_ids``:
        ``"circuit-tracer"`` (its files' ``0_{layer}_{pos}``) or ``"unique"`` (``{layer}_-1_{pos}``).
        """
        return graph_to_json(self, path, node_threshold=node_threshold, edge_threshold=edge_threshold, slug=slug,
                             scan=scan, clerps=clerps, error_ids=error_ids)

    def render(self, path: str | os.PathLike[str], **kwargs: Any) -> str:
        """Draw the pruned graph to ``path`` (PNG or SVG by extension); see
        :func:`~mishax_py.circuits.render.render_graph`."""
        return render_graph(self, path, **kwargs)

    def to_html(
        self,
        path: str | os.PathLike[str],
        *,
        node_threshold: float = 0.8,
        edge_threshold: float = 0.98,
        labels: Mapping[str, str] | None = None,
        contexts: Mapping[Any, Any] | None = None,
        tokenizer: Any = None,
        title: str | None = None,
    ) -> str:
        """Write the interactive viewer of the graph pruned at the thresholds to ``path`` (one self-contained HTML
        file: hover a node, click to trace its strongest paths, threshold sliders); returns the path.

        ``labels``: ``{node_id: text}``; ``contexts``: top-activating contexts, ``{node_id: [text, ...]}`` or
        ``{(layer, feature index): [text, ...]}``; ``tokenizer``: decodes the logit tokens. See
        :func:`~mishax_py.circuits.viewer.graph_to_html` and the module docs for what the sliders recompute.
        """
        from mishax_py.circuits.viewer import graph_to_html

        return graph_to_html(self, path, node_threshold=node_threshold, edge_threshold=edge_threshold, labels=labels,
                             contexts=contexts, tokenizer=tokenizer, title=title)

    def __repr__(self) -> str:
        return (f"AttributionGraph({self.n_pos} tokens, {self.n_features} active features, "
                f"{self.n_logits} logits, {self.n_nodes} nodes, transcoders at layers {self.transcoder_layers})")
