"""Influence: the partial influence through computed rows (how a capped graph picks its features)."""

from __future__ import annotations

import torch

from mishax_py.circuits.prune import compute_influence, normalise_rows, partial_influence
from tests.helpers import synthetic_graph


def test_partial_influence_with_every_row_is_the_influence():
    graph = synthetic_graph(seed=3)
    nf, n_src = graph.n_features, graph.logit_index(0)
    rows_idx = [*range(nf), *range(graph.logit_index(0), graph.n_nodes)]
    rows = graph.adjacency[rows_idx, :n_src]
    sources = torch.tensor([*range(nf), *[-1] * graph.n_logits])
    weights = graph.logit_weights()[rows_idx]
    got = partial_influence(rows, sources, weights, chunk=3)
    want = compute_influence(normalise_rows(graph.adjacency), graph.logit_weights())[:n_src]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_partial_influence_sees_only_the_rows_given():
    """A feature reached only through a row not yet computed has no influence yet."""
    graph = synthetic_graph(seed=4)
    nf = graph.n_features
    logit_rows = graph.adjacency[graph.logit_index(0):, : graph.logit_index(0)]
    got = partial_influence(logit_rows, torch.full((graph.n_logits,), -1), graph.logit_probabilities)
    direct = (logit_rows.abs() / logit_rows.abs().sum(1, keepdim=True).clamp(min=1e-10)).T @ graph.logit_probabilities
    torch.testing.assert_close(got, direct.to(got.dtype))
    assert got[:nf].numel() == nf
