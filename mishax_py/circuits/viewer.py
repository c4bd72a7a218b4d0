"""The interactive attribution-graph viewer: one self-contained HTML file (inline JS and SVG, no network).

:func:`graph_to_html` (``AttributionGraph.to_html``) writes the pruned graph into a page that
draws it as an SVG: rows are layers (token embeddings at the bottom, logits at the top), columns
are prompt positions labelled with their tokens; feature nodes are orange circles, error nodes
grey squares, embeddings light squares, logits green diamonds labelled with token and
probability. Hovering a node shows its id, layer, position, activation, cumulative influence,
label and (when given) top-activating contexts; clicking it highlights its 5 strongest incoming
and outgoing edges and the strongest path through each of its 3 strongest edges (every step the
largest ``|weight|``) down to an embedding and up to a logit, with the weights written on the
edges and listed in a side panel.

What is embedded, and what the sliders do: the file holds only the graph pruned at
``node_threshold``/``edge_threshold`` (circuit-tracer's JSON form, :mod:`~mishax_py.circuits.json_format`,
so its node ids are the exported ones), as node records and ``[source, target, weight]`` edges.
At those thresholds the page shows exactly that graph. The two sliders go tighter, down to 0.05:
nodes are recomputed exactly (a node's cumulative influence does not depend on the
thresholds: keep the nodes ranked up to the first whose cumulative influence reaches the
threshold), edges approximately (circuit-tracer's edge score, row-normalised ``|weight|``
times the target's influence on the logits, computed on the embedded subgraph, keeping the
share ``edge / file edge threshold`` of it), then features left without an incoming or
outgoing edge are dropped, as :func:`~mishax_py.circuits.prune.prune` does. To see a looser
graph, write the file at looser thresholds.

Opened as ``graph.html#selftest`` the page checks itself on load (nodes and edges drawn, a
slider moved and restored, a node hovered and clicked) and writes the result into
``<pre id="selftest">`` and ``data-selftest`` on ``<body>``, which the browser test reads with
``chromium --headless --dump-dom``.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mishax_py.circuits.build import TokenDecoder
    from mishax_py.circuits.graph import AttributionGraph

__all__ = ["Contexts", "graph_to_html", "link_indices", "page_html", "viewer_data"]

# top-activating contexts: per node id, or per (layer, feature index) for every position of a feature
Contexts = Mapping[str | tuple[int, int], Sequence[str] | str]

_KINDS = {"cross layer transcoder": "feature", "transcoder": "feature", "mlp reconstruction error": "error",
          "embedding": "embedding", "logit": "logit"}  # fmt: skip
_LOGIT_CLERP = re.compile(r'^Output "(.*)" \(p=[^)]*\)$', re.S)


def _asset(name: str) -> str:
    return resources.files("mishax_py.circuits").joinpath("assets", name).read_text(encoding="utf-8")


def _round(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


def _decode(tokenizer: TokenDecoder, token: int) -> str:
    out = tokenizer.decode([token])
    return out if isinstance(out, str) else "".join(out)


def _feature_index(node: Mapping[str, Any]) -> int | None:
    """A feature node's index in its transcoder, from its id ``"{layer}_{index}_{pos}"``."""
    parts = str(node["node_id"]).split("_")
    try:
        return int(parts[1])
    except (IndexError, ValueError):
        return None


def _row(node: Mapping[str, Any]) -> float:
    """A node's height in the graph: embeddings lowest, then layers, logits highest."""
    if node.get("feature_type") == "embedding" or node.get("layer") == "E":
        return -1.0
    if node.get("feature_type") == "logit":
        return float("inf")
    return float(node["layer"])


def link_indices(data: Mapping[str, Any]) -> list[tuple[int, int, float]]:
    """The links of a graph in circuit-tracer's JSON form: ``(source, target, weight)``, indices into ``data["nodes"]``.

    circuit-tracer's error id ``0_{L}_{P}`` is also the id of feature ``L`` of layer 0 at ``P``;
    when a link names such a shared id, the node that makes the link go upward (source below
    target) is chosen, else the first listed.

    Raises:
        ValueError: a link naming a node that is not in ``data["nodes"]``.
    """
    by_id: dict[str, list[int]] = {}
    nodes = list(data["nodes"])
    for i, n in enumerate(nodes):
        by_id.setdefault(str(n["node_id"]), []).append(i)
    out = []
    for e in data["links"]:
        cands = []
        for key in ("source", "target"):
            found = by_id.get(str(e[key]))
            if not found:
                raise ValueError(f"link {e!r}: its {key} {e[key]!r} is not in the graph's nodes")
            cands.append(found)
        s, t = cands[0][0], cands[1][0]
        if len(cands[0]) > 1 or len(cands[1]) > 1:
            s, t = next(((a, b) for a in cands[0] for b in cands[1] if _row(nodes[a]) < _row(nodes[b])), (s, t))
        out.append((s, t, float(e["weight"])))
    return out


def viewer_data(
    data: Mapping[str, Any],
    *,
    labels: Mapping[str, str] | None = None,
    contexts: Contexts | None = None,
    tokenizer: TokenDecoder | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """What the page embeds, from a graph in circuit-tracer's JSON form (``data``).

    Returns ``{"title", "prompt", "prompt_tokens", "node_threshold", "edge_threshold",
    "has_influence", "nodes": [...], "edges": [[source, target, weight], ...]}``; a node is
    ``{"id", "type" ("feature"/"error"/"embedding"/"logit"), "feature_type", "layer" (int, or
    None for embeddings), "pos", "feature" (index in its transcoder, features only), "act",
    "infl" (cumulative influence; None for logits), "prob" (logits), "token", "always"
    (embeddings and logits, which pruning keeps), "label", "contexts"}``. Weights are rounded to
    5 significant digits.

    Raises:
        ValueError: a link naming a node that is not in ``data["nodes"]``.
    """
    meta = data.get("metadata", {})
    tokens = [str(t) for t in meta.get("prompt_tokens", [])]
    pruning = meta.get("pruning_settings", {})
    node_threshold = float(pruning.get("node_threshold", meta.get("node_threshold", 0.8)))
    edge_threshold = float(pruning.get("edge_threshold", 0.98))
    labels = labels or {}
    nodes: list[dict[str, Any]] = []
    for n in data["nodes"]:
        kind = _KINDS.get(str(n.get("feature_type")), "feature")
        nid = str(n["node_id"])
        pos = int(n["ctx_idx"])
        layer = None if kind == "embedding" or n["layer"] == "E" else int(n["layer"])
        feature = _feature_index(n) if kind == "feature" else None
        rec: dict[str, Any] = {
            "id": nid, "type": kind, "feature_type": str(n.get("feature_type", "")), "layer": layer, "pos": pos,
            "feature": feature, "act": None if n.get("activation") is None else _round(float(n["activation"])),
            "infl": None if n.get("influence") is None else float(n["influence"]),
            "prob": None, "token": "", "always": kind in ("embedding", "logit"),
            "label": labels.get(nid, str(n.get("clerp") or "")), "contexts": [],
        }  # fmt: skip
        if kind == "embedding":
            rec["token"] = tokens[pos] if pos < len(tokens) else nid
        elif kind == "logit":
            tok = int(n["feature"])
            rec["prob"] = float(n.get("token_prob") or 0.0)
            m = _LOGIT_CLERP.match(str(n.get("clerp") or ""))
            rec["token"] = _decode(tokenizer, tok) if tokenizer is not None else (m.group(1) if m else str(tok))
        if contexts:
            ctx = contexts.get(nid)
            if ctx is None and feature is not None and layer is not None:
                ctx = contexts.get((layer, feature))
            if ctx is not None:
                rec["contexts"] = [ctx] if isinstance(ctx, str) else [str(c) for c in ctx]
        nodes.append(rec)
    edges = [[s, t, _round(w)] for s, t, w in link_indices(data)]
    prompt = str(meta.get("prompt", "".join(tokens)))
    return {
        "title": title or "attribution graph", "prompt": prompt, "prompt_tokens": tokens,
        "node_threshold": node_threshold, "edge_threshold": edge_threshold,
        "has_influence": any(n["infl"] is not None for n in nodes if not n["always"]),
        "nodes": nodes, "edges": edges,
    }  # fmt: skip


def _script_json(obj: object) -> str:
    """JSON safe inside ``<script>``: no ``<`` (so no ``</script>``), no raw U+2028/9."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _legend() -> str:
    items = [
        ('<circle cx="8" cy="8" r="6" fill="#f5b041" stroke="#333"/>', "transcoder feature"),
        ('<rect x="2.5" y="2.5" width="11" height="11" fill="#aab7b8" stroke="#333"/>', "error node"),
        ('<rect x="1" y="1" width="14" height="14" fill="#d5dbdb" stroke="#333"/>', "token embedding"),
        ('<polygon points="8,0 16,8 8,16 0,8" fill="#58d68d" stroke="#333"/>', "logit (token, probability)"),
        ('<line x1="0" y1="8" x2="16" y2="8" stroke="#c0392b" stroke-width="3"/>', "positive edge"),
        ('<line x1="0" y1="8" x2="16" y2="8" stroke="#2e6fd8" stroke-width="3"/>', "negative edge"),
        ('<line x1="0" y1="10" x2="16" y2="10" stroke="#888" stroke-width="0.6"/>'
         '<line x1="0" y1="4" x2="16" y2="4" stroke="#888" stroke-width="3.5"/>', "width ∝ |weight|"),
    ]
    return "".join(f'<span><svg width="16" height="16" viewBox="0 0 16 16">{g}</svg>{html.escape(t)}</span>'
                   for g, t in items)


def page_html(payload: Mapping[str, Any]) -> str:
    """The viewer page for ``payload`` (:func:`viewer_data`): one HTML document, CSS and JS inline."""
    title = html.escape(str(payload["title"]))
    prompt = html.escape(str(payload["prompt"]))
    nt, et = float(payload["node_threshold"]), float(payload["edge_threshold"])
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{title}</title>",
        f"<style>{_asset('graph_viewer.css')}</style>",
        "</head><body>",
        f'<header><h1>{title}</h1><div class="prompt">{prompt}</div>',
        '<div class="controls">',
        f'<label>node threshold <input type="range" id="node-threshold" min="0.05" max="{nt}" step="0.01" '
        f'value="{nt}"><output id="node-threshold-value">{nt:.2f}</output></label>',
        f'<label>edge threshold <input type="range" id="edge-threshold" min="0.05" max="{et}" step="0.005" '
        f'value="{et}"><output id="edge-threshold-value">{et:.3f}</output></label>',
        '<button type="button" id="reset">reset</button><span id="counts"></span></div>',
        f'<div class="legend">{_legend()}</div></header>',
        '<main><div id="canvas"><svg id="graph" class="graph" xmlns="http://www.w3.org/2000/svg"></svg></div>',
        '<aside id="side"><div id="side-body"></div>'
        f'<p class="hint">Pruned at node threshold {nt:g}, edge threshold {et:g}; the sliders recompute tighter '
        "pruning in the page (nodes exactly, edges from the embedded subgraph).</p></aside></main>",
        '<div id="tip"></div><pre id="selftest"></pre>',
        f'<script type="application/json" id="graph-data">{_script_json(payload)}</script>',
        f"<script>{_asset('graph_viewer.js')}</script>",
        "</body></html>",
    ]) + "\n"  # fmt: skip


def graph_to_html(
    graph: AttributionGraph | Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    labels: Mapping[str, str] | None = None,
    contexts: Contexts | None = None,
    tokenizer: TokenDecoder | None = None,
    title: str | None = None,
) -> str:
    """Write the interactive viewer of a pruned attribution graph to ``path`` (one HTML file); returns the path.

    Args:
        graph: an :class:`~mishax_py.circuits.graph.AttributionGraph` (pruned here at the
            thresholds) or a graph already in circuit-tracer's JSON form (a dict from
            ``to_json`` or :func:`~mishax_py.circuits.json_format.load_graph_json`; its own
            pruning settings are used and the thresholds are ignored).
        node_threshold, edge_threshold: the shares of influence kept (the page's initial and
            loosest view; see the module docs for the sliders).
        labels: optional ``{node_id: text}`` shown on hover (circuit-tracer's "clerp").
        contexts: optional top-activating contexts, ``{node_id: [text, ...]}`` or
            ``{(layer, feature index): [text, ...]}`` (a feature at any position).
        tokenizer: optional; decodes the logit nodes' tokens (else the export's strings).
        title: the page title (default: the prompt).
    """
    if isinstance(graph, Mapping):
        data = graph
    else:
        data = graph.to_json(node_threshold=node_threshold, edge_threshold=edge_threshold, clerps=labels,
                             error_ids="unique")
    payload = viewer_data(data, labels=labels, contexts=contexts, tokenizer=tokenizer,
                          title=title or f"Attribution graph: {data.get('metadata', {}).get('prompt', '')}")
    Path(path).write_text(page_html(payload), encoding="utf-8")
    return os.fspath(path)
