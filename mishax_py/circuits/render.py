"""The static picture of an attribution graph (matplotlib; PNG, SVG or PDF).

It draws the pruned graph from its circuit-tracer JSON form (:mod:`mishax_py.circuits.json_format`),
so a graph built here and a file written by circuit-tracer render the same way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mishax_py.circuits.graph import AttributionGraph

__all__ = ["render_graph"]


def render_graph(
    graph: AttributionGraph | Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_edges: int = 300,
    title: str | None = None,
    dpi: int = 130,
) -> str:
    """Draw an attribution graph (an :class:`AttributionGraph`, or a loaded JSON dict) with matplotlib.

    Positions run left to right (token labels below), layers bottom to top (embeddings at
    the bottom, logits at the top); several nodes at one (layer, position) spread
    sideways. Feature nodes are circles (area ~ influence), error nodes grey squares,
    tokens and logits labelled boxes. Edges are red (positive) / blue (negative), their
    width and opacity proportional to ``|weight|`` (the ``max_edges`` strongest drawn).
    The file type follows the extension (``.png``, ``.svg``, ``.pdf``). Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = graph if isinstance(graph, Mapping) else graph.to_json(node_threshold=node_threshold,
                                                                  edge_threshold=edge_threshold)
    nodes = data["nodes"]
    tokens = data["metadata"]["prompt_tokens"]
    layer_ids = sorted({int(n["layer"]) for n in nodes if n["layer"] != "E"})
    top = max(layer_ids) if layer_ids else 1

    def y_of(n: Mapping[str, Any]) -> float:
        return -1.0 if n["layer"] == "E" else float(n["layer"])

    groups: dict[tuple[float, int], list[Mapping[str, Any]]] = {}
    for n in nodes:
        groups.setdefault((y_of(n), int(n["ctx_idx"])), []).append(n)
    xy: dict[str, tuple[float, float]] = {}
    for (y, x), members in groups.items():
        per_row = 10 if members[0]["feature_type"] == "logit" else 5  # side by side in a cell, then wrap
        members = sorted(members, key=lambda m: (m["feature_type"] != "mlp reconstruction error",
                                                 m.get("influence") or 0.0))
        n_rows = (len(members) + per_row - 1) // per_row
        for j, n in enumerate(members):
            row, col = divmod(j, per_row)
            k = min(per_row, len(members) - row * per_row)
            dy = (row - (n_rows - 1) / 2) * min(0.7 / max(n_rows, 1), 0.22)
            xy[n["node_id"]] = (x + (col - (k - 1) / 2) * (0.09 if per_row > 5 else 0.16), y + dy)
    n_pos = max(len(tokens), 1)
    fig = Figure(figsize=(min(3 + 0.9 * n_pos, 28), min(2.5 + 0.7 * (top + 2), 20)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    links = sorted(data["links"], key=lambda e: -abs(e["weight"]))[:max_edges]
    wmax = max((abs(e["weight"]) for e in links), default=1.0) or 1.0
    for e in links:
        (x0, y0), (x1, y1) = xy[e["source"]], xy[e["target"]]
        s = abs(e["weight"]) / wmax
        ax.plot([x0, x1], [y0, y1], color="#c0392b" if e["weight"] > 0 else "#2e6fd8", lw=0.3 + 2.5 * s,
                alpha=0.15 + 0.7 * s, zorder=1)
    style = {"cross layer transcoder": ("o", "#f5b041"), "mlp reconstruction error": ("s", "#aab7b8"),
             "embedding": ("s", "#d5dbdb"), "logit": ("D", "#58d68d")}
    for n in nodes:
        nx, ny = xy[n["node_id"]]
        marker, color = style.get(n["feature_type"], ("o", "#888888"))
        infl = n.get("influence")
        size = 40 if infl is None else 30 + 120 * (1 - min(max(float(infl), 0.0), 1.0))
        ax.scatter([nx], [ny], s=size, marker=marker, c=color, edgecolors="black", linewidths=0.5, zorder=2)
        if n["feature_type"] == "cross layer transcoder":
            ax.annotate(n["node_id"].split("_")[1], (nx, ny), fontsize=5, ha="center", va="center", zorder=3)
        elif n["feature_type"] == "logit":
            word = str(n.get("clerp", "")).removeprefix("Output ").split(" (p=")[0][:16]
            ax.annotate(word, (nx, ny), xytext=(0, 6), textcoords="offset points", fontsize=6, ha="left",
                        va="bottom", rotation=60)
    ax.set_xticks(range(len(tokens)), [str(t) for t in tokens], rotation=60, fontsize=7)
    ax.set_yticks([-1, *layer_ids], ["emb", *[("logits" if L == top and any(n["feature_type"] == "logit" and
                                                                         int(n["layer"]) == L for n in nodes)
                                               else f"L{L}") for L in layer_ids]], fontsize=7)
    ax.set_xlim(-0.7, n_pos - 0.3)
    ax.set_ylim(-1.7, top + 1.6)
    ax.set_title(title or f"attribution graph: {len(nodes)} nodes, {len(data['links'])} edges", fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=dpi)
    return os.fspath(path)
