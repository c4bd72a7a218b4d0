"""Influence and pruning of an attribution graph, as circuit-tracer does them.

Normalise ``|A|`` by rows (each target's incoming edges sum to 1); a node's influence on the
logits, weighted by their probabilities ``w``, is ``w (A + A^2 + ...)`` (finite: the graph is
acyclic, so ``A`` is nilpotent). Pruning keeps the nodes carrying ``node_threshold`` of the
cumulative influence (tokens and logits always), then the edges carrying ``edge_threshold`` of
the edge influence, then drops features left without incoming or outgoing edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mishax_py.circuits.graph import AttributionGraph

__all__ = ["PrunedGraph", "compute_influence", "normalise_rows", "partial_influence", "prune", "share_threshold"]


@dataclass
class PrunedGraph:
    """Masks of a pruned :class:`~mishax_py.circuits.graph.AttributionGraph`.

    Attributes:
        node_mask: ``[n_nodes]`` nodes kept.
        edge_mask: ``[n_nodes, n_nodes]`` edges kept (``[target, source]``, as the adjacency).
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


def normalise_rows(A: torch.Tensor) -> torch.Tensor:
    """``|A|`` with each row divided by its sum (rows of zeros stay zero): ``[n, n]``."""
    absA = A.abs()
    return absA / absA.sum(1, keepdim=True).clamp(min=1e-10)


def compute_influence(A: torch.Tensor, weights: torch.Tensor, max_iter: int = 10_000) -> torch.Tensor:
    """``weights @ (A + A^2 + ...)`` ``[n]`` for a nilpotent (acyclic) ``A`` ``[n, n]``.

    Raises:
        RuntimeError: when the series does not end within ``max_iter`` terms (``A`` has a cycle).
    """
    current = weights @ A
    total = current.clone()
    for _ in range(max_iter):
        if not bool(current.any()):
            return total
        current = current @ A
        total += current
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def partial_influence(rows: torch.Tensor, row_sources: torch.Tensor, weights: torch.Tensor, *,
                      row_sums: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """Influence of every source on the logits through the rows of the adjacency computed so far: ``[n_sources]``.

    circuit-tracer's *partial influence*, which an attribution graph uses to pick the features whose rows it
    computes next: with ``N = |rows|`` normalised by row (each row's absolute edges sum to 1), the weight
    ``w`` starts at the rows (``weights``: the logit probabilities at the logit rows, 0 elsewhere) and flows
    back through computed rows only: ``x = w + x N_rr + ...`` over the rows that are themselves sources
    (``N_rr`` the columns of ``N`` at those rows' own nodes), and the influence is ``x N``. When every target
    row is computed this is :func:`compute_influence` of the whole graph at its source columns.

    Args:
        rows: ``[n_rows, n_sources]`` the computed rows (target x source, as the adjacency).
        row_sources: ``[n_rows]`` the source column of each row's own node, ``-1`` for a node that is no
            source (a logit).
        weights: ``[n_rows]`` the starting weight of each row.
        row_sums: ``[n_rows]`` ``rows.abs().sum(1)`` if already known.
        chunk: rows per step of the final product (bounds the temporary ``|rows|`` to ``chunk x n_sources``).

    Raises:
        RuntimeError: when the flow does not end (the rows have a cycle).
    """
    n = rows.shape[0]
    if n == 0:
        return rows.new_zeros(rows.shape[1])
    sums = (rows.abs().sum(1) if row_sums is None else row_sums).clamp(min=1e-10)
    is_src = row_sources >= 0
    M = rows.new_zeros(n, n)
    if bool(is_src.any()):
        M[:, is_src] = rows[:, row_sources[is_src]].abs() / sums[:, None]
    x = weights.to(rows.dtype).clone()
    total = x.clone()
    for _ in range(n + 1):
        x = x @ M
        if not bool(x.any()):
            break
        total += x
    else:
        raise RuntimeError("influence did not converge: the adjacency rows have a cycle")
    out = rows.new_zeros(rows.shape[1])
    scaled = total / sums
    for i in range(0, n, chunk):
        out += scaled[i:i + chunk] @ rows[i:i + chunk].abs()
    return out


def share_threshold(scores: torch.Tensor, share: float) -> torch.Tensor:
    """The score above which the largest ``scores`` add up to ``share`` of their total (0-dim)."""
    s = scores.flatten().sort(descending=True).values
    total = s.sum()
    if total <= 0:
        return s[0] if s.numel() else torch.tensor(0.0)
    cum = s.cumsum(0) / total
    k = int(torch.searchsorted(cum, torch.tensor(share, dtype=cum.dtype, device=cum.device)).item())
    return s[min(k, s.numel() - 1)]


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PrunedGraph:
    """Influence pruning as in circuit-tracer (see the module docs).

    Raises:
        ValueError: a threshold outside ``[0, 1]``.
    """
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    A = graph.adjacency.float()
    n_fixed = graph.n_pos + graph.n_logits  # tokens and logits, always kept
    w = graph.logit_weights()
    influence = compute_influence(normalise_rows(A), w)
    node_mask = influence >= share_threshold(influence, node_threshold)
    node_mask[-n_fixed:] = True
    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    norm = normalise_rows(pruned)
    edge_scores = norm * (compute_influence(norm, w) + w)[:, None]
    edge_mask = edge_scores >= share_threshold(edge_scores, edge_threshold)
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
