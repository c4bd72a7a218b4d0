"""The exported graph file is circuit-tracer's: node ids, error-node ids, the BOS position, the prompt.

The expected file below is written by hand from circuit-tracer's own writer (``circuit-tracer``
0.5.0 on PyPI, the latest release: ``circuit_tracer/frontend/graph_models.py``'s ``Node`` and
``circuit_tracer/utils/create_graph_files.py``), not from this package's output:

* feature ``{layer}_{index}_{pos}``, ``feature`` the Cantor pairing of ``(layer, index)``,
  ``jsNodeId`` ``{layer}_{index}-0``, ``feature_type`` ``"cross layer transcoder"``;
* error ``0_{layer}_{pos}``, ``feature`` -1, ``jsNodeId`` ``{layer}_{pos}-0``,
  ``"mlp reconstruction error"``;
* token ``E_{id}_{pos}``, ``feature`` the position, ``layer`` ``"E"``, ``jsNodeId`` ``E_{id}-{pos}``;
* logit ``{n_layers + 1}_{id}_{last pos}``, ``jsNodeId`` ``L_{id}-{last pos}``;
* ``metadata.prompt`` the tokenizer's ``decode`` of the whole prompt, ``prompt_tokens`` each token decoded;
* features and error vectors at position 0 (the ``<bos>``) are zeroed, so nothing but the
  ``<bos>`` token node sits at ``ctx_idx`` 0; nodes that no kept link touches are left out
  (embeddings and logits stay).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch

import instrumentation.gemma2 as g2
from mishax_py.circuits import AttributionGraph, attribution_graph, load_graph_json
from tests.helpers import BUNDLED, make_model, train_transcoder

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

# "<bos> k3 v7 k3" on gemma2-tiny (4 layers; ids: <bos> 2, k3 8, v7 76): the model answers v7 (p 0.999).
# Pruned at node/edge thresholds 1.0, every node with a path to the logit stays. With position 0
# zeroed, the error nodes with such a path are those at positions 1-3 of layers 0-2 (later
# attention reads them) and layer 3's at the last position; layer 3's at positions 1 and 2 reach
# no logit. Written by hand; the feature nodes are listed by rule in the test (which features a
# trained transcoder fires is not a format fact).
EXPECTED_FILE = """
{"metadata": {"prompt_tokens": ["<bos>", "k3", "v7", "k3"], "prompt": "<bos> k3 v7 k3",
              "node_threshold": 1.0, "schema_version": 1, "transcoder_list": []},
 "nodes": [
  {"node_id": "0_0_1", "feature": -1, "layer": "0", "ctx_idx": 1, "feature_type": "mlp reconstruction error",
   "jsNodeId": "0_1-0", "activation": null, "is_target_logit": false},
  {"node_id": "0_0_2", "feature": -1, "layer": "0", "ctx_idx": 2, "feature_type": "mlp reconstruction error",
   "jsNodeId": "0_2-0", "activation": null, "is_target_logit": false},
  {"node_id": "0_0_3", "feature": -1, "layer": "0", "ctx_idx": 3, "feature_type": "mlp reconstruction error",
   "jsNodeId": "0_3-0", "activation": null, "is_target_logit": false},
  {"node_id": "0_1_1", "feature": -1, "layer": "1", "ctx_idx": 1, "feature_type": "mlp reconstruction error",
   "jsNodeId": "1_1-0", "activation": null, "is_target_logit": false},
  {"node_id": "0_1_2", "feature": -1, "layer": "1", "ctx_idx": 2, "feature_type": "mlp reconstruction error",
   "jsNodeId": "1_2-0", "activation": null, "is_target_logit": false},
  {"node_id": "0_1_3", "feature": -1, "layer": "1", "ctx_idx": 3, "feature_type": "mlp reconstruction error",
   "jsNodeId": "1_3-0", "activation": null, "is_target_logit": false},
  {"node_id": "0_2_1", "feature": -1, "layer": "2", "ctx_idx": 1, "feature_type": "mlp reconstruction error",
   "jsNodeId": "2_1-0", "activation": null, "is_target_logit": false},
  {"node_id": "0_2_2", "feature": -1, "layer": "2", "ctx_idx": 2, "feature_type": "mlp reconstruction error",
   "jsNodeId": "2_2-0", "activation": null, "is_target_logit": false},
  {"node_id": "0_2_3", "feature": -1, "layer": "2", "ctx_idx": 3, "feature_type": "mlp reconstruction error",
   "jsNodeId": "2_3-0", "activation": null, "is_target_logit": false},
  {"node_id": "0_3_3", "feature": -1, "layer": "3", "ctx_idx": 3, "feature_type": "mlp reconstruction error",
   "jsNodeId": "3_3-0", "activation": null, "is_target_logit": false},
  {"node_id": "E_2_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding",
   "jsNodeId": "E_2-0", "activation": null, "is_target_logit": false},
  {"node_id": "E_8_1", "feature": 1, "layer": "E", "ctx_idx": 1, "feature_type": "embedding",
   "jsNodeId": "E_8-1", "activation": null, "is_target_logit": false},
  {"node_id": "E_76_2", "feature": 2, "layer": "E", "ctx_idx": 2, "feature_type": "embedding",
   "jsNodeId": "E_76-2", "activation": null, "is_target_logit": false},
  {"node_id": "E_8_3", "feature": 3, "layer": "E", "ctx_idx": 3, "feature_type": "embedding",
   "jsNodeId": "E_8-3", "activation": null, "is_target_logit": false},
  {"node_id": "5_76_3", "feature": 76, "layer": "5", "ctx_idx": 3, "feature_type": "logit",
   "jsNodeId": "L_76-3", "activation": null, "is_target_logit": true, "influence": null,
   "clerp": "Output \\"v7\\" (p=0.999)"}
 ]}
"""


@pytest.fixture(scope="module")
def tiny():
    if not BUNDLED:
        pytest.skip("bundled gemma2-tiny weights are not in this build")
    from mishax_py.zoo import load, load_saes

    model, tok = load("gemma2-tiny")
    tcs = list(load_saes("gemma2-tiny", kind="transcoder").values())
    return g2.instrument(model), tok, tcs


@pytest.fixture(scope="module")
def bos_graph(tiny) -> AttributionGraph:
    im, tok, tcs = tiny
    ids = torch.tensor([tok("k3 v7 k3").input_ids])
    assert ids.tolist() == [[2, 8, 76, 8]]
    return attribution_graph(im, ids, tcs, tokenizer=tok, batch_size=64, progress=False)


def _active_features(im, tcs, ids: torch.Tensor) -> set[tuple[int, int, int]]:
    """``(layer, index, pos)`` of every firing transcoder feature, straight from the transcoders."""
    sites = [tc.site for tc in tcs]
    with torch.no_grad():
        _, cache = im.run_with_cache(ids, sites=sites)
    out = set()
    for tc in tcs:
        layer = im.site_info(tc.site).layer
        for pos, index in (tc.encode(cache[tc.site][0]) != 0).nonzero().tolist():
            out.add((layer, index, pos))
    return out


def test_bos_prompt_exports_circuit_tracer_node_set(tiny, bos_graph, tmp_path):
    im, tok, tcs = tiny
    expected = json.loads(EXPECTED_FILE)
    path = tmp_path / "graph.json"
    bos_graph.to_json(path, node_threshold=1.0, edge_threshold=1.0)
    got = load_graph_json(path)
    for key, value in expected["metadata"].items():
        assert got["metadata"][key] == value, key
    nodes = got["nodes"]
    features = [n for n in nodes if n["feature_type"] == "cross layer transcoder"]
    others = [n for n in nodes if n["feature_type"] != "cross layer transcoder"]
    # errors (layer-major), tokens, logits: the same nodes, in circuit-tracer's order, field for field
    assert [n["node_id"] for n in others] == [n["node_id"] for n in expected["nodes"]]
    for n, want in zip(others, expected["nodes"], strict=True):
        assert {k: n[k] for k in want} == want
    # features: every firing one past the <bos> with a path to the logit (layer 3 only at the last position)
    active = _active_features(im, tcs, bos_graph.input_ids[None])
    want_features = {(layer, i, p) for layer, i, p in active if p >= 1 and (layer < 3 or p == 3)}
    assert {n["node_id"] for n in features} == {f"{layer}_{i}_{p}" for layer, i, p in want_features}
    assert any(p == 0 for _, _, p in active)  # the <bos> does fire features: zeroing removed them
    for n in features:
        layer, i, p = (int(v) for v in n["node_id"].split("_"))
        assert (n["feature"], n["layer"], n["ctx_idx"], n["jsNodeId"]) == (
            (layer + i) * (layer + i + 1) // 2 + i, str(layer), p, f"{layer}_{i}-0")
    # every node but the <bos> token lies past position 0, and the links name listed nodes
    assert [n["node_id"] for n in nodes if n["ctx_idx"] == 0] == ["E_2_0"]
    assert {e["source"] for e in got["links"]} | {e["target"] for e in got["links"]} <= {n["node_id"] for n in nodes}


def test_bos_zeroing_drops_nodes_and_keeps_every_other_edge(tiny, bos_graph):
    """Zeroing position 0 removes its features and empties its error nodes; every other edge is unchanged,
    and the bias takes what the zeroed nodes wrote (completeness still holds)."""
    im, tok, tcs = tiny
    g, full = bos_graph, attribution_graph(im, bos_graph.input_ids, tcs, tokenizer=tok, zero_bos=False,
                                           batch_size=64, progress=False)
    assert g.settings["zero_bos"] is True and full.settings["zero_bos"] is False
    assert int((g.features[:, 1] == 0).sum()) == 0 and int((full.features[:, 1] == 0).sum()) > 0
    assert g.completeness_error() <= 1e-4 and full.completeness_error() <= 1e-4
    for layer in range(g.n_layers):
        e = g.error_index(layer, 0)
        assert g.adjacency[:, e].abs().sum() == 0 and g.error_norms[layer, 0] == 0
    # map g's nodes onto full's and compare every edge among them
    keep = [full.feature_index(*(int(v) for v in f)) for f in g.features]
    keep += list(range(full.n_features, full.n_nodes))
    sub = full.adjacency[keep][:, keep].clone()
    for layer in range(g.n_layers):  # the zeroed error nodes' columns
        sub[:, g.error_index(layer, 0)] = 0
    torch.testing.assert_close(g.adjacency, sub, rtol=1e-5, atol=1e-6)
    # the same prompt with the BOS id given explicitly (no tokenizer) is zeroed the same way
    g2_ = attribution_graph(im, g.input_ids, tcs, bos_token_id=2, batch_size=64, progress=False)
    assert g2_.settings["zero_bos"] is True and torch.equal(g2_.features, g.features)
    # a prompt that does not start with the BOS keeps position 0 (nothing to zero by default)
    g3 = attribution_graph(im, g.input_ids[1:], tcs, tokenizer=tok, batch_size=64, progress=False)
    assert g3.settings["zero_bos"] is False and int((g3.features[:, 1] == 0).sum()) > 0


@pytest.mark.parametrize(("zero_positions", "zeroed"), [(2, [0, 1]), (slice(1, 3), [1, 2]), (0, [])])
def test_zero_positions_drops_those_nodes_and_keeps_every_other_edge(tiny, bos_graph, zero_positions, zeroed):
    """``zero_positions`` (a chat template's leading tokens) zeroes positions by the ``<bos>`` rule: no
    features there, their error nodes without edges, completeness holds, every other edge unchanged."""
    im, tok, tcs = tiny
    full = attribution_graph(im, bos_graph.input_ids, tcs, zero_bos=False, batch_size=64, progress=False)
    g = attribution_graph(im, bos_graph.input_ids, tcs, zero_bos=False, zero_positions=zero_positions,
                          batch_size=64, progress=False)
    assert g.settings["zero_positions"] == zeroed and g.settings["zero_bos"] is (0 in zeroed)
    assert all(int((full.features[:, 1] == p).sum()) > 0 for p in zeroed)  # features did fire there
    assert not any(int(p) in zeroed for p in g.features[:, 1])
    assert g.completeness_error() <= 1e-4
    keep = [full.feature_index(*(int(v) for v in f)) for f in g.features] + list(range(full.n_features, full.n_nodes))
    sub = full.adjacency[keep][:, keep].clone()
    for layer in range(g.n_layers):
        for p in zeroed:
            assert g.adjacency[:, g.error_index(layer, p)].abs().sum() == 0 and g.error_norms[layer, p] == 0
            sub[:, g.error_index(layer, p)] = 0
    torch.testing.assert_close(g.adjacency, sub, rtol=1e-5, atol=1e-6)


def test_zero_positions_adds_to_zero_bos_and_rejects_bad_values(tiny, bos_graph):
    im, _, tcs = tiny
    ids = bos_graph.input_ids
    g = attribution_graph(im, ids, tcs, bos_token_id=2, zero_positions=slice(2, 3), batch_size=64, progress=False)
    assert g.settings["zero_positions"] == [0, 2] and g.completeness_error() <= 1e-4
    for bad, err in [(-1, ValueError), (5, ValueError), (True, TypeError), ([0, 1], TypeError)]:
        with pytest.raises(err, match="zero_positions"):
            attribution_graph(im, ids, tcs, zero_positions=bad, batch_size=64, progress=False)


def test_metadata_prompt_is_the_tokenizers_decode(bos_graph):
    """A word-level tokenizer's spaces survive (joining per-token strings gave "<bos>k3v7k3")."""
    meta = bos_graph.to_json()["metadata"]
    assert meta["prompt"] == "<bos> k3 v7 k3"
    assert meta["prompt_tokens"] == ["<bos>", "k3", "v7", "k3"]


class _Tok:
    """A tokenizer without a BOS (decode only): the prompt is the ids joined by spaces without one."""

    def decode(self, ids: list[int]) -> str:
        return "|".join(f"t{i}" for i in ids)


@pytest.fixture(scope="module")
def random_setup():
    im = g2.instrument(make_model(seed=0))
    tcs = {0: train_transcoder(im, 0, steps=150), 1: train_transcoder(im, 1, seed=1, steps=150)}
    ids = torch.randint(4, 64, (1, 7), generator=torch.Generator().manual_seed(5))
    return im, tcs, ids


@pytest.mark.filterwarnings("ignore:node id .* names both")  # collisions: the next test
def test_prompt_without_tokenizer_and_error_id_styles(random_setup):
    im, tcs, ids = random_setup
    g = attribution_graph(im, ids, tcs, batch_size=64, progress=False)
    assert g.to_json()["metadata"]["prompt"] == " ".join(str(int(t)) for t in ids[0])
    assert attribution_graph(im, ids, tcs, tokenizer=_Tok(), batch_size=64, progress=False
                             ).to_json()["metadata"]["prompt"] == "|".join(f"t{int(t)}" for t in ids[0])
    data = g.to_json(node_threshold=1.0, edge_threshold=1.0)
    errs = [n for n in data["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert errs and all(n["node_id"] == f"0_{n['layer']}_{n['ctx_idx']}" for n in errs)
    unique = g.to_json(node_threshold=1.0, edge_threshold=1.0, error_ids="unique")
    errs_u = [n for n in unique["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert [n["node_id"] for n in errs_u] == [f"{n['layer']}_-1_{n['ctx_idx']}" for n in errs]
    assert [e["weight"] for e in unique["links"]] == [e["weight"] for e in data["links"]]
    with pytest.raises(ValueError, match="error_ids"):
        g.to_json(error_ids="neuronpedia")


@pytest.mark.filterwarnings("ignore:node id .* names both")  # pytest.warns below still sees them
def test_colliding_error_id_warns_and_unique_ids_do_not_collide(random_setup):
    """circuit-tracer's error id ``0_{L}_{P}`` is also the id of feature ``L`` of layer 0 at ``P``:
    the export warns, naming both, and ``error_ids="unique"`` writes ``{L}_-1_{P}``."""
    im, tcs, ids = random_setup
    g = attribution_graph(im, ids, tcs, batch_size=64, progress=False)
    # rename a layer-0 feature so its index is 1 (the layer of an error node) at a position where layer 1's
    # error node is kept: the ids collide as in circuit-tracer's files
    data = g.to_json(node_threshold=1.0, edge_threshold=1.0)
    kept_err = {n["ctx_idx"] for n in data["nodes"] if n["node_id"].startswith("0_1_")
                and n["feature_type"] == "mlp reconstruction error"}
    kept_f0 = {(int(n["node_id"].split("_")[1]), n["ctx_idx"]) for n in data["nodes"]
               if n["feature_type"] == "cross layer transcoder" and n["layer"] == "0"}
    index, pos = next((i, p) for i, p in sorted(kept_f0) if p in kept_err)
    g.features[g.feature_index(0, pos, index), 2] = 1
    with pytest.warns(UserWarning, match=rf"0_1_{pos}.*error_ids='unique'"):
        g.to_json(node_threshold=1.0, edge_threshold=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids_u = [n["node_id"] for n in g.to_json(node_threshold=1.0, edge_threshold=1.0, error_ids="unique")["nodes"]]
    assert len(ids_u) == len(set(ids_u))


@pytest.mark.filterwarnings("ignore:node id .* names both")  # collisions: the next test
def test_nodes_no_kept_link_touches_are_left_out(random_setup):
    """As circuit-tracer writes files: a feature or error node is listed only if a kept link names it."""
    im, tcs, ids = random_setup
    g = attribution_graph(im, ids, tcs, batch_size=64, progress=False)
    for threshold in (0.5, 0.8, 1.0):
        data: dict[str, Any] = g.to_json(node_threshold=threshold, edge_threshold=0.9)
        linked = {e["source"] for e in data["links"]} | {e["target"] for e in data["links"]}
        for n in data["nodes"]:
            assert n["node_id"] in linked or n["feature_type"] in ("embedding", "logit"), n
