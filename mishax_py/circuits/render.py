"""The static picture of an attribution graph (matplotlib; PNG, SVG or PDF).

It draws the pruned graph from its circuit-tracer JSON form (:mod:`mishax_py.circuits.json_format`),
so a graph built here and a file written by circuit-tracer render the same way. The layout is
measured in inches: every (layer, position) cell is wide and tall enough for its nodes side by
side (wrapping after a few), so nodes never overlap; a text label is drawn only where it
overlaps no other label and no node (feature labels in order of influence), so the picture has
no overlapping text at any size. A legend explains node shapes, edge colour and edge width.
The interactive counterpart is :mod:`mishax_py.circuits.viewer`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mishax_py.circuits.viewer import link_indices

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox

    from mishax_py.circuits.graph import AttributionGraph

__all__ = ["EDGE_COLOURS", "NODE_STYLES", "graph_figure", "render_graph"]

#: feature_type -> (marker, face colour, legend label, per-line capacity of a cell, spacing in inches)
NODE_STYLES: dict[str, tuple[str, str, str, int, float]] = {
    "cross layer transcoder": ("o", "#f5b041", "transcoder feature (label: index)", 6, 0.34),
    "mlp reconstruction error": ("s", "#aab7b8", "error node", 6, 0.34),
    "embedding": ("s", "#d5dbdb", "token embedding", 1, 0.34),
    "logit": ("D", "#58d68d", "logit (token, probability)", 3, 1.0),
}
EDGE_COLOURS = {"positive": "#c0392b", "negative": "#2e6fd8"}
_OTHER = ("o", "#888888", "other node", 6, 0.34)
_LINE_H = {"logit": 0.5}  # inches per wrapped line of a cell (0.36 otherwise)


def _row(node: Mapping[str, Any]) -> float:
    if node["feature_type"] == "embedding" or node["layer"] == "E":
        return -1.0
    if node["feature_type"] == "logit":
        return math.inf
    return float(node["layer"])


def _overlaps(box: Bbox, others: list[Bbox]) -> bool:
    return any(box.x0 < o.x1 and o.x0 < box.x1 and box.y0 < o.y1 and o.y0 < box.y1 for o in others)


def graph_figure(
    graph: AttributionGraph | Mapping[str, Any],
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_edges: int = 300,
    title: str | None = None,
    dpi: int = 100,
) -> Figure:
    """The picture of an attribution graph (an :class:`AttributionGraph`, pruned at the thresholds, or a JSON dict).

    Positions run left to right (tokens below), layers bottom to top (embeddings at the bottom,
    logits at the top); the nodes of one (layer, position) sit side by side, most influential
    first, and wrap. Feature nodes are circles labelled with their index, error nodes grey
    squares, embeddings light squares, logits diamonds labelled with token and probability.
    Edges are red (positive) / blue (negative), width and opacity proportional to ``|weight|``
    (the ``max_edges`` strongest drawn). Labels that would overlap another label or a node are
    left out (the viewer shows every node's details).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.transforms import Bbox

    data = graph if isinstance(graph, Mapping) else graph.to_json(
        node_threshold=node_threshold, edge_threshold=edge_threshold, error_ids="unique")
    nodes = list(data["nodes"])
    tokens = [str(t) for t in data["metadata"]["prompt_tokens"]]
    n_pos = max([len(tokens), *[int(n["ctx_idx"]) + 1 for n in nodes], 1])
    rows = sorted({_row(n) for n in nodes} | {-1.0})

    # -- layout (inches) ------------------------------------------------------------------
    cells: dict[tuple[float, int], list[int]] = {}
    for i, n in enumerate(nodes):
        cells.setdefault((_row(n), int(n["ctx_idx"])), []).append(i)
    col_w = [0.62] * n_pos
    row_h = dict.fromkeys(rows, 0.55)
    for (r, p), members in cells.items():
        _, _, _, per, gap = NODE_STYLES.get(nodes[members[0]]["feature_type"], _OTHER)
        lines = math.ceil(len(members) / per)
        col_w[p] = max(col_w[p], min(len(members), per) * gap + 0.16)
        row_h[r] = max(row_h[r], lines * _LINE_H.get(nodes[members[0]]["feature_type"], 0.36) + 0.22)
    tok_font = 8.0
    shown_tokens = [t if len(t) <= 14 else t[:13] + "…" for t in tokens]
    rotate = any(len(t) * tok_font * 0.6 / 72 > w - 0.06 for t, w in zip(shown_tokens, col_w, strict=False))
    longest = max((len(t) for t in shown_tokens), default=1)
    left, right, top = 0.7, 2.3, 0.5
    bottom = 0.25 + (longest * tok_font * 0.6 / 72 * 0.75 + 0.1 if rotate else 0.2)
    plot_w, plot_h = sum(col_w), sum(row_h.values())
    width, height = left + plot_w + right, bottom + plot_h + top
    col_x = [sum(col_w[:p]) + col_w[p] / 2 for p in range(n_pos)]
    row_y, y = {}, 0.0
    for r in rows:
        row_y[r] = y + row_h[r] / 2
        y += row_h[r]
    xy: list[tuple[float, float]] = [(0.0, 0.0)] * len(nodes)
    for (r, p), members in cells.items():
        kind = nodes[members[0]]["feature_type"]
        _, _, _, per, gap = NODE_STYLES.get(kind, _OTHER)
        line_h = _LINE_H.get(kind, 0.36)
        members = sorted(members, key=lambda i: (nodes[i]["feature_type"] == "mlp reconstruction error",
                                                 nodes[i].get("influence") or 0.0, i))  # fmt: skip
        lines = math.ceil(len(members) / per)
        for j, i in enumerate(members):
            line, col = divmod(j, per)
            k = min(per, len(members) - line * per)
            xy[i] = (col_x[p] + (col - (k - 1) / 2) * gap, row_y[r] + ((lines - 1) / 2 - line) * line_h)

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((left / width, bottom / height, plot_w / width, plot_h / height))
    ax.set_xlim(0, plot_w)
    ax.set_ylim(0, plot_h)
    ax.set_axis_off()
    for r in rows:
        ax.axhline(row_y[r], color="#eeeeee", linewidth=0.8, zorder=0)

    # -- edges ----------------------------------------------------------------------------
    links = sorted(link_indices(data), key=lambda e: abs(e[2]))[-max_edges:] if max_edges > 0 else []
    wmax = max((abs(w) for _, _, w in links), default=1.0) or 1.0

    def width_of(w: float) -> float:
        return 0.3 + 2.7 * abs(w) / wmax

    segs = [(xy[s], xy[t]) for s, t, _ in links]
    colours = [(EDGE_COLOURS["positive"] if w > 0 else EDGE_COLOURS["negative"]) for _, _, w in links]
    alphas = [0.2 + 0.65 * abs(w) / wmax for _, _, w in links]
    ax.add_collection(LineCollection(segs, colors=[to_rgba(c, a) for c, a in zip(colours, alphas, strict=True)],
                                     linewidths=[width_of(w) for _, _, w in links], zorder=1))  # fmt: skip

    # -- nodes ----------------------------------------------------------------------------
    for kind in {n["feature_type"] for n in nodes}:
        marker, face, _, _, _ = NODE_STYLES.get(kind, _OTHER)
        pts = [xy[i] for i, n in enumerate(nodes) if n["feature_type"] == kind]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=70 if kind in ("embedding", "logit") else 55,
                   marker=marker, c=face, edgecolors="black", linewidths=0.6, zorder=2)  # fmt: skip

    # -- text: fixed labels first, then logit and feature labels where they fit -------------
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    fig.text(0.5, 1 - 0.22 / height, title or f"attribution graph: {len(nodes)} nodes, {len(data['links'])} edges",
             ha="center", va="center", fontsize=10.5)  # fmt: skip
    for r in rows:
        name = "emb" if r == -1.0 else ("logits" if r == math.inf else f"L{int(r)}")
        ax.text(-0.08, row_y[r], name, ha="right", va="center", fontsize=8.5, clip_on=False)
    for p, t in enumerate(shown_tokens):
        if rotate:
            ax.text(col_x[p] + 0.05, -0.08, t, ha="right", va="top", rotation=45, rotation_mode="anchor",
                    fontsize=tok_font, clip_on=False)  # fmt: skip
        else:
            ax.text(col_x[p], -0.08, t, ha="center", va="top", fontsize=tok_font, clip_on=False)
    fig.draw_without_rendering()
    taken = [t.get_window_extent(renderer) for t in [*fig.texts, *ax.texts]]
    px = dpi / 72.0  # pixels per point
    marker_boxes = []
    for x, y in xy:
        cx, cy = ax.transData.transform((x, y))
        half = 5.5 * px  # the markers' half width, pixels
        marker_boxes.append(Bbox([[cx - half, cy - half], [cx + half, cy + half]]))
    candidates: list[tuple[float, int, str, dict[str, Any]]] = []
    for i, n in enumerate(nodes):
        x, y = xy[i]
        if n["feature_type"] == "logit":
            word = str(n.get("clerp", "")).removeprefix("Output ").split(" (p=")[0].strip('"')[:12]
            text = f"{word} ({float(n.get('token_prob') or 0.0):.2f})"
            candidates.append((-1.0, i, text, {"xy": (x, y + 0.13), "ha": "center", "va": "bottom", "fontsize": 7.5}))
        elif n["feature_type"] == "cross layer transcoder":
            index = str(n["node_id"]).split("_")[1]
            candidates.append((float(n.get("influence") or 1.0), i, index,
                               {"xy": (x, y - 0.1), "ha": "center", "va": "top", "fontsize": 6.5}))  # fmt: skip
    for _, i, text, kw in sorted(candidates, key=lambda c: (c[0], c[1])):
        label = ax.annotate(text, kw["xy"], ha=kw["ha"], va=kw["va"], fontsize=kw["fontsize"], zorder=3,
                            annotation_clip=False, bbox={"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none",
                                                         "alpha": 0.75})  # fmt: skip
        box = label.get_window_extent(renderer)
        if _overlaps(box, taken) or _overlaps(box, [b for j, b in enumerate(marker_boxes) if j != i]):
            label.remove()
        else:
            taken.append(box)

    # -- legend ---------------------------------------------------------------------------
    kinds = [k for k in NODE_STYLES if any(n["feature_type"] == k for n in nodes)]
    handles = [Line2D([], [], linestyle="none", marker=NODE_STYLES[k][0], markerfacecolor=NODE_STYLES[k][1],
                      markeredgecolor="black", markersize=7, label=NODE_STYLES[k][2]) for k in kinds]  # fmt: skip
    handles += [Line2D([], [], color=EDGE_COLOURS["positive"], linewidth=2.2, label="positive edge"),
                Line2D([], [], color=EDGE_COLOURS["negative"], linewidth=2.2, label="negative edge")]
    for share in (1.0, 0.5, 0.1):
        handles.append(Line2D([], [], color="#555555", linewidth=width_of(share * wmax),
                              label=f"|weight| = {share * wmax:.3g}"))  # fmt: skip
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=((left + plot_w + 0.15) / width, 1 - top / height),
               fontsize=7.5, frameon=False, title="nodes and edges", title_fontsize=8, handlelength=2.2)
    return fig


def render_graph(
    graph: AttributionGraph | Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_edges: int = 300,
    title: str | None = None,
    dpi: int = 100,
) -> str:
    """Draw an attribution graph (:func:`graph_figure`) to ``path``; the file type follows the extension
    (``.png``, ``.svg``, ``.pdf``). Returns the path."""
    fig = graph_figure(graph, node_threshold=node_threshold, edge_threshold=edge_threshold, max_edges=max_edges,
                       title=title, dpi=dpi)  # fmt: skip
    fig.savefig(os.fspath(path), dpi=dpi)
    return os.fspath(path)
