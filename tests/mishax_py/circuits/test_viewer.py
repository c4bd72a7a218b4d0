"""The interactive graph viewer (``AttributionGraph.to_html``): what the page embeds, and the page in headless Chromium.

The graphs are synthetic (:func:`tests.helpers.synthetic_graph`: no model needed); the demo's
real transcoder graph is opened in the report's browser test (``tests/mishax_py/zoo/test_demo.py``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mishax_py.circuits import AttributionGraph
from mishax_py.circuits.viewer import graph_to_html, link_indices, viewer_data
from tests.helpers import chromium, run_chromium, synthetic_graph


def embedded(path: Path) -> dict:
    """The JSON the page embeds (``<script type="application/json" id="graph-data">``)."""
    text = path.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', text, re.S)
    assert m is not None
    return json.loads(m.group(1))


def pruned_ids(g: AttributionGraph, nt: float = 0.8, et: float = 0.98) -> tuple[set[str], dict[tuple[str, str], float]]:
    """The node ids and ``{(source id, target id): weight}`` edges ``graph.prune`` keeps."""
    pr = g.prune(nt, et)
    nodes = {g.node_id(i) for i in pr.node_mask.nonzero().flatten().tolist()}
    t, s = pr.edge_mask.nonzero(as_tuple=True)
    edges = {(g.node_id(b), g.node_id(a)): float(g.adjacency[a, b]) for a, b in zip(t.tolist(), s.tolist(),
                                                                                     strict=True)}  # fmt: skip
    return nodes, edges


# ---------------------------------------------------------------------------------- the file
def test_the_page_embeds_exactly_the_pruned_graph(tmp_path: Path) -> None:
    g = synthetic_graph(seed=1, n_layers=4, n_pos=8, per_cell=4)
    path = Path(g.to_html(tmp_path / "graph.html"))
    data = embedded(path)
    nodes, edges = pruned_ids(g)
    assert len(nodes) < g.n_nodes  # pruning removed something
    assert {n["id"] for n in data["nodes"]} == nodes
    got = {(data["nodes"][s]["id"], data["nodes"][t]["id"]): w for s, t, w in data["edges"]}
    assert got.keys() == edges.keys()
    for key, w in edges.items():
        assert got[key] == pytest.approx(w, rel=1e-4, abs=1e-9)
    assert data["node_threshold"] == 0.8 and data["edge_threshold"] == 0.98
    # tighter thresholds embed the smaller graph
    small = embedded(Path(g.to_html(tmp_path / "small.html", node_threshold=0.5, edge_threshold=0.9)))
    assert {n["id"] for n in small["nodes"]} == pruned_ids(g, 0.5, 0.9)[0]


def test_the_page_is_self_contained(tmp_path: Path) -> None:
    """No network: no external script, stylesheet, image, font or import; the only URL is the SVG namespace."""
    g = synthetic_graph(seed=2, n_layers=4, n_pos=8, per_cell=4)
    text = Path(g.to_html(tmp_path / "graph.html")).read_text(encoding="utf-8")
    assert not re.search(r"<(link|img|iframe|object|embed)\b", text)
    assert not re.search(r"<script[^>]*\bsrc=", text)
    assert "@import" not in text and "url(" not in text and "fetch(" not in text and "XMLHttpRequest" not in text
    assert set(re.findall(r"https?://[^\s\"'<>)]+", text)) == {"http://www.w3.org/2000/svg"}
    # small: the viewer (about 25 kB) plus the pruned graph (about 60 bytes an edge)
    n_edges = len(embedded(tmp_path / "graph.html")["edges"])
    assert len(text.encode()) < 30_000 + 200 * n_edges


def test_tokens_probabilities_labels_and_contexts(tmp_path: Path) -> None:
    g = synthetic_graph(seed=3, tokens=["<bos>", "The", " cat", " sat", " on", " the"])
    data = embedded(Path(g.to_html(tmp_path / "g.html")))
    feats = [n for n in data["nodes"] if n["type"] == "feature"]
    assert feats
    f = feats[0]
    layer, feature, pos = (int(x) for x in f["id"].split("_"))
    labels = {f["id"]: "a cat feature"}
    contexts = {(layer, feature): ["the [cat] sat", "a [cat] ran"], "E_10_0": "start of text"}
    data = embedded(Path(g.to_html(tmp_path / "g.html", labels=labels, contexts=contexts, title="My graph")))
    by_id = {n["id"]: n for n in data["nodes"]}
    n = by_id[f["id"]]
    assert (n["layer"], n["pos"], n["feature"]) == (layer, pos, feature)
    assert n["label"] == "a cat feature" and n["contexts"] == ["the [cat] sat", "a [cat] ran"]
    i = g.feature_index(layer, pos, feature)
    assert n["act"] == pytest.approx(float(g.activations[i]), rel=1e-4)
    assert by_id["E_10_0"]["contexts"] == ["start of text"] and by_id["E_10_0"]["token"] == "<bos>"
    logits = [n for n in data["nodes"] if n["type"] == "logit"]
    assert [(n["token"], n["prob"]) for n in logits] == [
        (f"out{int(t)}", pytest.approx(float(p))) for t, p in zip(g.logit_tokens, g.logit_probabilities, strict=True)]
    assert data["title"] == "My graph" and data["prompt_tokens"] == g.tokens

    class Upper:  # a tokenizer: decode([id]) -> str
        def decode(self, ids: list[int]) -> str:
            return f"TOK{ids[0]}"

    data = embedded(Path(g.to_html(tmp_path / "g.html", tokenizer=Upper())))
    assert [n["token"] for n in data["nodes"] if n["type"] == "logit"] == [f"TOK{int(t)}" for t in g.logit_tokens]


def test_text_cannot_end_the_script(tmp_path: Path) -> None:
    """Token strings and labels are data: a ``</script>`` in them neither ends the data block nor runs."""
    evil = "</script><script>alert(1)</script>"
    g = synthetic_graph(seed=4, tokens=[evil, "b", "c", "d", "e", "f"])
    path = Path(g.to_html(tmp_path / "g.html", title=evil))
    text = path.read_text(encoding="utf-8")
    assert text.count("<script") == 2 and "alert(1)</script>" not in text
    data = embedded(path)
    assert data["prompt_tokens"][0] == evil and data["title"] == evil


def test_a_json_file_and_shared_error_ids(tmp_path: Path) -> None:
    """A circuit-tracer dict is viewed as is; a link naming a shared id (error ``0_1_2`` = feature 1 of layer 0 at
    position 2) takes the node that makes it go upward."""
    g = synthetic_graph(seed=5)
    data = g.to_json(error_ids="unique")
    path = Path(graph_to_html(data, tmp_path / "g.html"))
    assert {n["id"] for n in embedded(path)["nodes"]} == {n["node_id"] for n in data["nodes"]}
    shared = {
        "metadata": {"prompt_tokens": ["a", "b", "c"], "prompt": "a b c"},
        "nodes": [
            {"node_id": "0_1_2", "feature": -1, "layer": "1", "ctx_idx": 2, "feature_type": "mlp reconstruction error"},
            {"node_id": "0_1_2", "feature": 2, "layer": "0", "ctx_idx": 2, "feature_type": "cross layer transcoder"},
            {"node_id": "1_7_2", "feature": 35, "layer": "1", "ctx_idx": 2, "feature_type": "cross layer transcoder"},
            {"node_id": "3_9_2", "feature": 9, "layer": "3", "ctx_idx": 2, "feature_type": "logit", "token_prob": 1.0},
        ],
        "links": [{"source": "0_1_2", "target": "1_7_2", "weight": 0.5},
                  {"source": "0_1_2", "target": "3_9_2", "weight": -0.25}],
    }  # fmt: skip
    assert link_indices(shared) == [(1, 2, 0.5), (0, 3, -0.25)]
    v = viewer_data(shared)
    assert [n["type"] for n in v["nodes"]] == ["error", "feature", "feature", "logit"]
    assert v["nodes"][1]["feature"] == 1 and v["nodes"][3]["token"] == "9"
    shared["links"].append({"source": "0_1_2", "target": "nowhere", "weight": 1.0})
    with pytest.raises(ValueError, match="'nowhere' is not in the graph's nodes"):
        link_indices(shared)


# ------------------------------------------------------------------------------- the browser
def dom_elements(dom: str, tag: str) -> list[dict[str, str]]:
    """The attributes of every ``<tag ...>`` element in serialized HTML."""
    return [dict(re.findall(r'([\w-]+)="([^"]*)"', m)) for m in re.findall(rf"<{tag}\b([^>]*)>", dom)]


@pytest.mark.browser
def test_the_viewer_in_headless_chromium(tmp_path: Path) -> None:
    """No console output; the nodes drawn are the pruned graph's; a click highlights the clicked node's 5 strongest
    incoming and outgoing edges (and weight labels); the sliders redraw. Read back from the DOM (``--dump-dom``)
    after the page's own check (``#selftest``) clicked a node."""
    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); .ci/run installs it")
    g = synthetic_graph(seed=1, n_layers=4, n_pos=8, per_cell=4)
    path = Path(g.to_html(tmp_path / "graph.html", contexts={(0, 1): ["x [y] z"]}))
    proc = run_chromium(["--dump-dom", path.resolve().as_uri() + "#selftest"], tmp_path / "profile", console=True)
    dom = proc.stdout
    assert 'data-viewer-ready="1"' in dom, proc.stderr[-3000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    m = re.search(r'<pre id="selftest">(.*?)</pre>', dom, re.S)
    assert m is not None
    report = json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                        .replace("&amp;", "&"))  # fmt: skip
    assert 'data-selftest="pass"' in dom, report
    assert report["errors"] == []

    nodes, edges = pruned_ids(g)
    drawn = [a for a in dom_elements(dom, "g") if a.get("class", "").startswith("node ")]
    assert len(drawn) == len(nodes) and {a["data-id"] for a in drawn} == nodes
    index_to_id = {a["data-i"]: a["data-id"] for a in drawn}
    paths = [a for a in dom_elements(dom, "path") if a.get("class", "").startswith("edge ")]
    assert len(paths) == len(edges)
    assert report["nodes_at_half_threshold"] < len(nodes)  # the slider redrew a smaller graph...
    assert report["nodes_restored"] == len(nodes)  # ...and back

    clicked = report["clicked"]
    assert f'data-selected="{clicked}"' in dom and clicked.split("_")[0] != "E"
    hl = [a for a in paths if "hl" in a["class"].split()]
    assert hl and report["weight_labels"] == len(hl)

    def strongest(direction: str) -> list[str]:
        mine = [(w, s if direction == "in" else t) for (s, t), w in edges.items()
                if (t if direction == "in" else s) == clicked]  # fmt: skip
        return [n for _, n in sorted(mine, key=lambda x: -abs(x[0]))[:5]]

    got_in = {index_to_id[a["data-s"]] for a in hl if "hl-in" in a["class"].split()}
    got_out = {index_to_id[a["data-t"]] for a in hl if "hl-out" in a["class"].split()}
    assert got_in == set(strongest("in")) and got_out == set(strongest("out"))
    assert got_in and got_out  # the self-check clicks a feature, which has both
    # hovering showed the node's id and layer
    assert clicked in report["tooltip_text"] and "layer" in report["tooltip_text"]


def test_threshold_sliders_start_at_the_file_thresholds(tmp_path: Path) -> None:
    text = Path(synthetic_graph().to_html(tmp_path / "g.html", node_threshold=0.7, edge_threshold=0.95)).read_text()
    sliders = {a["id"]: a for a in dom_elements(text, "input")}
    assert sliders["node-threshold"]["max"] == sliders["node-threshold"]["value"] == "0.7"
    assert sliders["edge-threshold"]["max"] == sliders["edge-threshold"]["value"] == "0.95"
