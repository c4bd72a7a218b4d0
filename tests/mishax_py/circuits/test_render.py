"""The static graph picture (``mishax_py.circuits.render``): every pruned node drawn, no two labels overlapping,
a legend for node shapes, edge colour and edge width. Synthetic graphs (:func:`tests.helpers.synthetic_graph`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mishax_py.circuits.render import EDGE_COLOURS, graph_figure, render_graph
from tests.helpers import synthetic_graph, text_overlaps

pytestmark = pytest.mark.usefixtures("one_thread")


def marker_boxes(fig) -> list[tuple[float, float, float, float]]:
    """The node markers of the graph's axes as pixel boxes ``(x0, y0, x1, y1)``."""
    ax = fig.axes[0]
    fig.canvas.draw()
    boxes = []
    for c in ax.collections:
        sizes = c.get_sizes() if hasattr(c, "get_sizes") else []
        for (x, y), size in zip(ax.transData.transform(c.get_offsets()), [*sizes] * len(c.get_offsets()),
                                strict=False):  # fmt: skip
            half = float(size) ** 0.5 / 2 * fig.dpi / 72  # a marker's size is its area in points^2
            boxes.append((x - half, y - half, x + half, y + half))
    return boxes


def meets(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def labels_covering_other_nodes(fig) -> list[str]:
    """The texts of the graph's axes whose box covers more than one node marker (a label may touch its own)."""
    markers = marker_boxes(fig)
    renderer = fig.canvas.get_renderer()
    out = []
    for t in fig.axes[0].texts:
        b = t.get_window_extent(renderer)
        if sum(meets((b.x0, b.y0, b.x1, b.y1), m) for m in markers) > 1:
            out.append(t.get_text())
    return out


@pytest.mark.parametrize("per_cell", [2, 12, 30])
def test_no_label_overlaps_and_every_node_is_drawn(per_cell: int) -> None:
    """Dense cells (up to 30 features per layer and position, wrapping) and a long token: no two texts overlap,
    no label covers another node, no two nodes overlap."""
    g = synthetic_graph(seed=2, n_layers=6, n_pos=5, per_cell=per_cell,
                        tokens=["<bos>", "The quick brown fox", " jumped", " over", "ok"])  # fmt: skip
    data = g.to_json(error_ids="unique")
    fig = graph_figure(data)
    assert text_overlaps(fig) == []
    ax = fig.axes[0]
    drawn = sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_sizes") and len(c.get_sizes()))
    assert drawn == len(data["nodes"])
    assert labels_covering_other_nodes(fig) == []
    markers = marker_boxes(fig)
    assert not [(i, j) for i, a in enumerate(markers) for j, b in enumerate(markers[:i]) if meets(a, b)]
    labels = [t.get_text() for t in ax.texts]
    assert "<bos>" in labels and "L0" in labels and "logits" in labels and "emb" in labels
    assert any(t.startswith("out") and "(" in t for t in labels)  # a logit: token (probability)


def test_the_legend_explains_shapes_colours_and_widths() -> None:
    g = synthetic_graph(seed=1, n_layers=4, n_pos=8, per_cell=4)
    fig = graph_figure(g)
    (legend,) = fig.legends
    entries = {t.get_text(): h for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)}
    assert entries["positive edge"].get_color() == EDGE_COLOURS["positive"]
    assert entries["negative edge"].get_color() == EDGE_COLOURS["negative"]
    widths = [(k, h.get_linewidth()) for k, h in entries.items() if k.startswith("|weight| = ")]
    assert len(widths) == 3 and widths[0][1] > widths[1][1] > widths[2][1]  # width grows with |weight|
    assert {"transcoder feature (label: index)", "token embedding", "logit (token, probability)"} <= entries.keys()
    # the largest width in the legend is the strongest drawn edge's
    data = g.to_json(error_ids="unique")
    wmax = max(abs(e["weight"]) for e in data["links"])
    assert widths[0][0] == f"|weight| = {wmax:.3g}"


def test_files(tmp_path: Path) -> None:
    g = synthetic_graph()
    for ext in ("png", "svg"):
        out = render_graph(g, tmp_path / f"g.{ext}", title="a graph")
        assert Path(out).stat().st_size > 5_000
