"""Attribution graphs and replacement runs on a second, non-Hugging-Face family (``tests/mishax_py/toy_family.py``).

Nothing in ``mishax_py.circuits`` knows the toy transformer: the norms it freezes come from
``im.family.frozen_norms`` (``ln1``, ``ln2``, ``ln_final``: the toy has no post-attention norm),
the transcoder's sites from ``im.family.mlp_input_kinds`` (``ln2``) and ``mlp_output_kind``.
"""

from __future__ import annotations

import pytest
import torch

import saes
from mishax_py.circuits import attribution_graph, replacement_interventions
from mishax_py.runtime import active_context
from tests.helpers import train_transcoder
from tests.mishax_py.toy_family import instrument_toy, make_toy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def toy():
    model = make_toy()
    im = instrument_toy(model)
    tcs = {L: train_transcoder(im, L, d_sae=48, steps=300, seed=L, in_kind="ln2") for L in range(im.n_layers)}
    ids = torch.tensor([[1, 5, 7, 3, 9, 2, 11, 4]])
    return model, im, tcs, ids


def test_replacement_model_without_clamps_is_the_toy_model(toy):
    model, im, tcs, ids = toy
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        for kw in ({}, {"freeze_attention": False}, {"freeze_norms": False}):
            out = im.run(ids, interventions=replacement_interventions(im, ids, tcs, **kw))
            assert (out - plain).abs().max() <= 1e-5, kw
        # the frozen norms are the family's: ln1, ln2 and the final norm, nothing else
        ivs = replacement_interventions(im, ids, tcs)
        assert {s for pair in im.family.frozen_norms for s in pair} <= set(ivs)
        assert not any("ln2_normalized" in s or "attn_out_pre_norm" in s for s in ivs)
    assert active_context() is None


def test_transcoder_sites_come_from_the_family(toy):
    _, im, tcs, ids = toy
    wrong = saes.Transcoder(16, 8, site="blocks.0.resid_mid", output_site="blocks.0.mlp_out", activation="relu")
    with pytest.raises(ValueError, match="reading a layer's ln2 and writing its mlp_out"):
        replacement_interventions(im, ids, [wrong])
    # given by layer without sites: the family's MLP input and output kinds are assumed
    bare = saes.Transcoder(16, 8, activation="relu")
    ivs = replacement_interventions(im, ids, {1: bare})
    assert "blocks.1.ln2" in ivs and "blocks.1.mlp_out" in ivs


def test_attribution_graph_on_the_toy_family(toy):
    """Complete in the toy's replacement model; its clamp predictions are exact there (no feature switches).

    The graph reads the unembedding from ``model.get_output_embeddings()``, a Hugging Face method the toy
    does not have: without it the error says so; given one, everything else is the family's business.
    """
    model, im, tcs, ids = toy
    with pytest.raises(TypeError, match="get_output_embeddings"):
        attribution_graph(im, ids, tcs)
    model.get_output_embeddings = lambda: model.unembed
    try:
        graph = attribution_graph(im, ids, tcs, batch_size=32)
    finally:
        del model.get_output_embeddings
    assert graph.n_features > 0 and graph.transcoder_layers == [0, 1]
    assert graph.completeness_error() <= 1e-4
    target, tok = graph.logit_index(0), int(graph.logit_tokens[0])

    def logit_node(interventions=None) -> float:  # de-meaned logit at the last position
        with torch.no_grad():
            logits = im.run(ids, interventions=interventions)[0, -1]
        return float(logits[tok] - logits.mean())

    base = logit_node()
    assert base == pytest.approx(float(graph.logit_values[0]), abs=1e-4)
    sel = (graph.features[:, 0] == 0).nonzero().flatten()
    i = int(sel[graph.ablation_effects(target)[sel].abs().argmax()])
    layer, pos, feat = (int(v) for v in graph.features[i])
    value = 0.99 * float(graph.activations[i])
    predicted = float(graph.clamp_effect(i, value)[target])
    moved = logit_node(replacement_interventions(im, ids, tcs, [(layer, pos, feat, value)])) - base
    assert abs(predicted) > 1e-5
    assert moved == pytest.approx(predicted, rel=1e-3, abs=1e-6)
    assert active_context() is None
