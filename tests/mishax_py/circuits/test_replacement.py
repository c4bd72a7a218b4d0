"""replacement_interventions: the local replacement model of a prompt, against the model and the graph."""

from __future__ import annotations

import pytest
import torch

import instrumentation.gemma2 as g2
from mishax_py.circuits import attribution_graph, replacement_interventions
from mishax_py.runtime import active_context
from tests.helpers import make_model, train_transcoder

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def setup():
    im = g2.instrument(make_model(seed=0))
    tcs = {0: train_transcoder(im, 0), 1: train_transcoder(im, 1, seed=1)}
    ids = torch.randint(4, 64, (1, 9), generator=torch.Generator().manual_seed(5))
    graph = attribution_graph(im, ids, tcs, batch_size=48)
    return im, tcs, ids, graph


def _logit_node(im, ids, tok, interventions=None) -> float:
    """The graph's logit node: the de-meaned pre-soft-cap logit at the last position."""
    W_U = im.model.get_output_embeddings().weight.detach()
    with torch.no_grad():
        _, cache = im.run_with_cache(ids, sites=["ln_final"], interventions=interventions)
    pre = cache["ln_final"][0, -1] @ W_U.T
    return float(pre[tok] - pre.mean())


def test_without_clamps_it_is_the_model(setup):
    im, tcs, ids, _ = setup
    with torch.no_grad():
        plain = im.run(ids)
        for kw in ({}, {"freeze_attention": False}, {"freeze_norms": False}):
            out = im.run(ids, interventions=replacement_interventions(im, ids, tcs, **kw))
            assert (out - plain).abs().max() <= 1e-5, kw
        only_layer1 = im.run(ids, interventions=replacement_interventions(im, ids, {1: tcs[1]}))
        assert (only_layer1 - plain).abs().max() <= 1e-5
    assert active_context() is None


def test_clamps_follow_the_graph_in_its_own_model(setup):
    """The graph is exact for the replacement model: a clamp small enough that no feature switches on or off
    moves the logit node by exactly what clamp_effect says; a last-layer ablation too (nothing downstream)."""
    im, tcs, ids, graph = setup
    target = graph.logit_index(0)
    tok = int(graph.logit_tokens[0])
    base = _logit_node(im, ids, tok)
    last = im.n_layers - 1
    for layer, scale in ((0, 0.99), (last, 0.0)):
        sel = (graph.features[:, 0] == layer).nonzero().flatten()
        i = int(sel[graph.ablation_effects(target)[sel].abs().argmax()])
        _, pos, feat = (int(v) for v in graph.features[i])
        value = scale * float(graph.activations[i])
        predicted = float(graph.clamp_effect(i, value)[target])
        moved = _logit_node(im, ids, tok, replacement_interventions(im, ids, tcs, [(layer, pos, feat, value)])) - base
        assert abs(predicted) > 1e-4
        assert moved == pytest.approx(predicted, rel=1e-3, abs=1e-5), (layer, scale)
    # with the attention and the norms live it is the real model's business: the numbers differ, the run works
    moved_live = _logit_node(im, ids, tok, replacement_interventions(im, ids, tcs, [(layer, pos, feat, value)],
                                                                      freeze_attention=False, freeze_norms=False))
    assert moved_live - base != pytest.approx(predicted, rel=1e-6)


def test_bad_input(setup):
    im, tcs, ids, _ = setup
    with pytest.raises(ValueError, match="layer 1 has no transcoder"):
        replacement_interventions(im, ids, {0: tcs[0]}, [(1, 0, 0, 0.0)])
    with pytest.raises(ValueError, match="position 9 is outside"):
        replacement_interventions(im, ids, tcs, [(0, 9, 0, 0.0)])
    with pytest.raises(ValueError, match="feature 64 is outside layer 0's 64 features"):
        replacement_interventions(im, ids, tcs, [(0, 0, 64, 0.0)])
    with pytest.raises(ValueError, match=r"\(layer, position, feature, value\)"):
        replacement_interventions(im, ids, tcs, [(0, 0, 1)])
    ivs = replacement_interventions(im, ids, tcs)
    with pytest.raises(ValueError, match="built for a prompt"):
        im.run(ids[:, :5], interventions=ivs)
    assert active_context() is None
    with torch.no_grad():
        assert torch.equal(im.run(ids), im.model(ids).logits)  # nothing left installed
