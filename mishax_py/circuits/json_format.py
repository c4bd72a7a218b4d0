"""circuit-tracer's graph-file format (which Neuronpedia's attribution-graph viewer reads): export and load.

:func:`graph_to_json` (``AttributionGraph.to_json``) writes the pruned graph::

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

:func:`load_graph_json` reads such a file back and checks its structure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mishax_py.circuits.graph import AttributionGraph
    from mishax_py.circuits.prune import PrunedGraph

__all__ = ["graph_to_json", "load_graph_json"]

# the keys load_graph_json requires of every node
_NODE_KEYS = ("node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId")


def _cantor(a: int, b: int) -> int:
    """The Cantor pairing of two non-negative integers (circuit-tracer's feature id of ``(layer, index)``)."""
    return (a + b) * (a + b + 1) // 2 + b


def graph_to_json(
    graph: AttributionGraph,
    path: str | os.PathLike[str] | None = None,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    slug: str = "mishax-py-graph",
    scan: str = "mishax-py",
    clerps: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The graph pruned at the thresholds, as a JSON-ready dict (the module docs); written to ``path`` if given.

    ``clerps``: optional ``{node_id: label}`` descriptions shown by the viewer.
    """
    pruned = graph.prune(node_threshold, edge_threshold)
    data = _graph_json(graph, pruned, slug=slug, scan=scan, clerps=clerps or {})
    if path is not None:
        with open(os.fspath(path), "w") as f:
            json.dump(data, f, indent=1)
    return data


def _graph_json(g: AttributionGraph, pr: PrunedGraph, *, slug: str, scan: str, clerps: Mapping[str, str]
               ) -> dict[str, Any]:
    """The nodes and edges ``pr`` keeps of ``g`` in circuit-tracer's format (the module docs)."""
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
