"""Attribution graphs with a cap on feature rows (issue #14): which features get rows, what the others become,
and the memory budget. Completeness and the uncapped graph are in ``test_graph.py``."""

from __future__ import annotations

import warnings

import pytest
import torch

import instrumentation.gemma2 as g2
from mishax_py.circuits import DEFAULT_MAX_FEATURE_NODES, attribution_graph, estimate_graph_memory
from mishax_py.circuits.prune import compute_influence, normalise_rows
from mishax_py.memory import MemoryBudgetError
from tests.helpers import make_model, train_transcoder

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

CAP, BATCH = 24, 4


@pytest.fixture(scope="module")
def setup():
    model = make_model(seed=0)
    im = g2.instrument(model)
    tcs = {0: train_transcoder(im, 0), 1: train_transcoder(im, 1, seed=1)}
    ids = torch.randint(4, 64, (1, 9), generator=torch.Generator().manual_seed(5))
    full = attribution_graph(im, ids, tcs, batch_size=48, max_feature_nodes=None, progress=False)
    capped = attribution_graph(im, ids, tcs, batch_size=BATCH, max_feature_nodes=CAP, progress=False)
    return im, tcs, ids, full, capped


def _key(graph, i: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in graph.features[i])  # type: ignore[return-value]


def test_default_cap_and_a_short_prompt_keeps_every_feature(setup):
    """The default cap (7,500) exceeds the features of a short prompt: the graph is the uncapped one."""
    im, tcs, ids, full, _ = setup
    assert DEFAULT_MAX_FEATURE_NODES == 7500
    assert attribution_graph.__kwdefaults__["max_feature_nodes"] == DEFAULT_MAX_FEATURE_NODES
    g = attribution_graph(im, ids, tcs, batch_size=48, progress=False)
    assert g.settings["folded_features"] == 0 and g.n_features == full.n_features
    torch.testing.assert_close(g.adjacency, full.adjacency, rtol=0, atol=1e-5)
    torch.testing.assert_close(g.bias, full.bias, rtol=0, atol=1e-5)


def test_a_binding_cap_keeps_only_features_with_rows(setup):
    """Features without a row are not nodes (before issue #14 they stayed as nodes without rows)."""
    _, _, _, full, capped = setup
    assert full.n_features > CAP
    assert capped.n_features == CAP and bool(capped.visited[:CAP].all())
    assert capped.settings["n_active_features"] == full.n_features
    assert capped.settings["folded_features"] == full.n_features - CAP
    assert capped.completeness_error() <= 1e-4  # the folded features' edges sit in the error nodes


def test_capped_rows_are_the_uncapped_rows(setup):
    """Each computed row equals the uncapped graph's row: the same edges from kept features and tokens, the error
    edges plus the edges of the features folded into each error node, the same bias."""
    _, _, _, full, capped = setup
    L, T = full.n_layers, full.n_pos
    full_idx = {_key(full, i): i for i in range(full.n_features)}
    kept = [full_idx[_key(capped, i)] for i in range(capped.n_features)]
    folded = sorted(set(range(full.n_features)) - set(kept))
    rows_full = kept + [full.logit_index(k) for k in range(full.n_logits)]
    rows_cap = list(range(capped.n_features)) + [capped.logit_index(k) for k in range(capped.n_logits)]
    A, B = full.adjacency[rows_full], capped.adjacency[rows_cap]
    torch.testing.assert_close(B[:, : capped.n_features], A[:, kept], rtol=0, atol=1e-5)
    err = A[:, full.error_index(0, 0): full.error_index(0, 0) + L * T].clone()
    for j in folded:
        layer, pos, _ = _key(full, j)
        err[:, layer * T + pos] += A[:, j]
    torch.testing.assert_close(B[:, capped.error_index(0, 0): capped.error_index(0, 0) + L * T], err,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(B[:, capped.token_index(0): capped.token_index(0) + T],
                               A[:, full.token_index(0): full.token_index(0) + T], rtol=0, atol=1e-5)
    torch.testing.assert_close(capped.bias[rows_cap], full.bias[rows_full], rtol=0, atol=1e-5)
    torch.testing.assert_close(capped.logit_values, full.logit_values)


def test_the_chosen_features_follow_the_documented_rule(setup):
    """Brute force on the uncapped graph: logit rows first; rank the features without a row by the influence on the
    logits through the known rows only (every other row zeroed), recomputed once the rows since the last ranking
    reach the rows it used (at least a batch); take the next batch in the ranking (ties: the earlier feature)."""
    _, _, _, full, capped = setup
    nf, n_l = full.n_features, full.n_logits
    known = torch.zeros(full.n_nodes, dtype=torch.bool)
    known[full.logit_index(0):] = True
    computed = torch.zeros(nf, dtype=torch.bool)
    n_rows, ranked_at, order = n_l, -1, None
    while int(computed.sum()) < CAP:
        if ranked_at < 0 or n_rows - ranked_at >= max(BATCH, ranked_at):
            A = full.adjacency.clone()
            A[~known] = 0
            infl = compute_influence(normalise_rows(A), full.logit_weights())[:nf]
            order = infl.masked_fill(computed, -1.0).sort(descending=True, stable=True).indices
            ranked_at = n_rows
        assert order is not None
        take = order[~computed[order]][: min(BATCH, CAP - int(computed.sum()))]
        computed[take] = True
        known[take] = True
        n_rows += take.numel()
    expected = {_key(full, int(j)) for j in computed.nonzero().flatten()}
    assert {_key(capped, i) for i in range(capped.n_features)} == expected
    # and they are influential: their influence in the full graph beats the median of the folded ones
    infl = full.node_influence()[:nf]
    chosen = torch.tensor([j in expected for j in (_key(full, i) for i in range(nf))])
    assert float(infl[chosen].mean()) > float(infl[~chosen].median())


def test_memory_budget_fails_before_allocating_and_lowers_the_batch(setup):
    """``max_memory`` below the estimate at one target per pass fails before any row is allocated, naming estimate
    and budget; between the estimates at 1 and 48 targets per pass, the batch is lowered with a warning. (With 8
    feature rows the passes' memory, not the assembled graph's, is the larger phase, so the batch matters.)"""
    im, tcs, ids, _, _ = setup
    kw = {"max_feature_nodes": 8, "progress": False}
    est = estimate_graph_memory(im, ids, tcs, batch_size=48, max_feature_nodes=8)
    assert {"forward", "rows", "backward", "ranking"} <= set(est.parts)
    one = estimate_graph_memory(im, ids, tcs, batch_size=1, max_feature_nodes=8)
    assert one.total < est.total
    with pytest.raises(MemoryBudgetError, match=r"attribution graph of 9 tokens.*budget of") as info:
        attribution_graph(im, ids, tcs, max_memory=one.total // 2, **kw)
    assert info.value.budget == one.total // 2 and "max_feature_nodes" in str(info.value)
    budget = (one.total + est.total) // 2  # fits a smaller batch only
    with pytest.warns(ResourceWarning, match="batch_size lowered from 48"):
        g = attribution_graph(im, ids, tcs, batch_size=48, max_memory=budget, **kw)
    lowered = g.settings["batch_size"]
    assert 1 <= lowered < 48 and g.n_features == 8 and g.completeness_error() <= 1e-4
    same = attribution_graph(im, ids, tcs, batch_size=lowered, **kw)
    torch.testing.assert_close(g.adjacency, same.adjacency, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a budget that fits says nothing
        attribution_graph(im, ids, tcs, batch_size=48, max_memory=est.total * 2, **kw)


def test_a_bf16_model_and_transcoders_build_a_capped_graph():
    """bf16 throughout (the cotangents take the targets' dtype): the graph builds, its rows are finite, and the
    logit rows still sum to the logit values up to bf16's precision."""
    import saes

    im = g2.instrument(make_model(seed=0).to(torch.bfloat16))
    d, g = im.family.dims.d_model, torch.Generator().manual_seed(0)
    tcs = {}
    for layer in range(im.n_layers):
        tc = saes.Transcoder(d, 32, site=f"blocks.{layer}.ln2_normalized", output_site=f"blocks.{layer}.mlp_out",
                             activation="relu", dtype=torch.bfloat16)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d, 32, generator=g).to(torch.bfloat16))
            tc.W_dec.copy_(torch.randn(32, d, generator=g).mul(0.1).to(torch.bfloat16))
        tcs[layer] = tc.requires_grad_(False)
    ids = torch.randint(4, 64, (1, 12), generator=g)
    graph = attribution_graph(im, ids, tcs, max_feature_nodes=20, batch_size=8, progress=False)
    assert graph.n_features == 20 and bool(torch.isfinite(graph.adjacency).all())
    rows = slice(graph.logit_index(0), graph.n_nodes)
    got = graph.adjacency[rows].sum(1) + graph.bias[rows]
    scale = float(graph.adjacency[rows].abs().sum(1).max())
    assert float((got - graph.logit_values).abs().max()) <= 0.05 * scale
