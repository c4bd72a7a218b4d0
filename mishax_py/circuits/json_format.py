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

The nodes and their fields are those circuit-tracer writes (``circuit-tracer`` 0.5.0, its latest
release: ``Node`` in ``circuit_tracer/frontend/graph_models.py``, ``create_graph_files`` in
``circuit_tracer/utils/create_graph_files.py``), so a tool that reads its files reads these:

=======  ===================================  ============================  ======================
node     ``node_id``                          ``feature_type``              ``jsNodeId``
=======  ===================================  ============================  ======================
feature  ``{layer}_{index}_{pos}``            ``cross layer transcoder``    ``{layer}_{index}-0``
error    ``0_{layer}_{pos}``                  ``mlp reconstruction error``  ``{layer}_{pos}-0``
token    ``E_{token_id}_{pos}``               ``embedding``                 ``E_{token_id}-{pos}``
logit    ``{n_layers + 1}_{token_id}_{pos}``  ``logit``                     ``L_{token_id}-{pos}``
=======  ===================================  ============================  ======================

``feature`` is the Cantor pairing of layer and index for features, -1 for errors, the position
for tokens and the token id for logits; ``layer`` is the layer as a string (``"E"`` for tokens,
``n_layers + 1`` for logits); ``influence`` is the cumulative-influence fraction at the node's
rank (small = among the most influential; ``null`` for logits); ``activation`` the feature
activation (``null`` otherwise). Nodes are listed in graph order (features, errors layer-major,
tokens, logits), links by target then source; a feature or error node that no kept link names
is left out, as circuit-tracer does. ``metadata.prompt`` is the tokenizer's ``decode`` of the
whole prompt (circuit-tracer's ``input_string``), ``prompt_tokens`` each token decoded.

Error ids (``error_ids=``): circuit-tracer 0.5.0's ``0_{layer}_{pos}`` (the default, as in the files
it writes) is also the id of feature ``layer`` of layer 0 at
``pos``; when both are in one file the export warns, naming them. ``error_ids="unique"`` writes
``{layer}_-1_{pos}`` (never a feature's id; the form circuit-tracer's main branch adopted after
0.5.0) and is what :meth:`AttributionGraph.node_id` returns.

Whether the ``<bos>`` position's features and error nodes exist is decided when the graph is
built (``zero_bos`` of :func:`~mishax_py.circuits.build.attribution_graph`; circuit-tracer zeroes
them).

:func:`load_graph_json` reads such a file back and checks its structure.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mishax_py.circuits.graph import AttributionGraph
    from mishax_py.circuits.prune import PrunedGraph

__all__ = ["ERROR_ID_STYLES", "ErrorIds", "graph_to_json", "load_graph_json"]

#: How error nodes are named in a file: circuit-tracer 0.5.0's ``0_{layer}_{pos}`` or ``{layer}_-1_{pos}``.
ErrorIds = Literal["circuit-tracer", "unique"]
ERROR_ID_STYLES: tuple[ErrorIds, ...] = ("circuit-tracer", "unique")

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
    error_ids: ErrorIds = "circuit-tracer",
) -> dict[str, Any]:
    """The graph pruned at the thresholds, as a JSON-ready dict (the module docs); written to ``path`` if given.

    ``clerps``: optional ``{node_id: label}`` descriptions shown by the viewer (keys as written
    in the file). ``error_ids``: ``"circuit-tracer"`` or ``"unique"`` (the module docs).

    Raises:
        ValueError: an unknown ``error_ids``.
    """
    if error_ids not in ERROR_ID_STYLES:
        raise ValueError(f"error_ids must be one of {', '.join(map(repr, ERROR_ID_STYLES))}, got {error_ids!r}")
    pruned = graph.prune(node_threshold, edge_threshold)
    data = _graph_json(graph, pruned, slug=slug, scan=scan, clerps=clerps or {}, error_ids=error_ids)
    if path is not None:
        with open(os.fspath(path), "w") as f:
            json.dump(data, f, indent=1)
    return data


def _file_node_id(g: AttributionGraph, index: int, error_ids: ErrorIds) -> str:
    """The id node ``index`` has in the file: :meth:`AttributionGraph.node_id`, error nodes per ``error_ids``."""
    if error_ids == "circuit-tracer" and g.node_kind(index) == "error":
        layer, pos = divmod(index - g.n_features, g.n_pos)
        return f"0_{layer}_{pos}"
    return g.node_id(index)


def _graph_json(g: AttributionGraph, pr: PrunedGraph, *, slug: str, scan: str, clerps: Mapping[str, str],
                error_ids: ErrorIds) -> dict[str, Any]:
    """The nodes and edges ``pr`` keeps of ``g`` in circuit-tracer's format (the module docs)."""
    kept = pr.node_mask.nonzero().flatten().tolist()
    keep = set(kept)
    tgt, src = pr.edge_mask.nonzero(as_tuple=True)
    edges = [(t, s) for t, s in zip(tgt.tolist(), src.tolist(), strict=True) if s in keep and t in keep]
    linked = {i for edge in edges for i in edge}
    ids = {i: _file_node_id(g, i, error_ids) for i in kept}
    nodes: list[dict[str, Any]] = []
    last = g.n_pos - 1
    for i in kept:
        kind = g.node_kind(i)
        if kind in ("feature", "error") and i not in linked:
            continue  # circuit-tracer lists only the feature and error nodes a kept link names
        nid = ids[i]
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
                        jsNodeId=f"{layer}_{pos}-0")
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
    _warn_on_shared_ids(nodes)
    links = [{"source": ids[s], "target": ids[t], "weight": float(g.adjacency[t, s])} for t, s in edges]
    meta = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": [],
        "prompt_tokens": list(g.tokens),
        "prompt": g.prompt if g.prompt is not None else " ".join(g.tokens),
        "node_threshold": pr.node_threshold,
        "schema_version": 1,
        "info": {"generator": {"name": "mishax-py circuits.graph", "url": ""},
                 "transcoder_layers": list(g.transcoder_layers)},
        "generation_settings": {k: v for k, v in g.settings.items() if k != "logit_strings"},
        "pruning_settings": {"node_threshold": pr.node_threshold, "edge_threshold": pr.edge_threshold},
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": qparams, "nodes": nodes, "links": links}


def _warn_on_shared_ids(nodes: list[dict[str, Any]]) -> None:
    """Warn when two listed nodes share an id (circuit-tracer's error id ``0_{L}_{P}`` is feature ``L`` of layer 0)."""
    seen: dict[str, dict[str, Any]] = {}
    for n in nodes:
        other = seen.setdefault(n["node_id"], n)
        if other is not n:
            warnings.warn(
                f"node id {n['node_id']!r} names both a {other['feature_type']} node (layer {other['layer']}, position "
                f"{other['ctx_idx']}) and a {n['feature_type']} node (layer {n['layer']}, position {n['ctx_idx']}), as "
                "circuit-tracer's files can; links naming it are ambiguous: pass error_ids='unique' for ids that "
                "never collide",
                UserWarning, stacklevel=4,
            )


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
