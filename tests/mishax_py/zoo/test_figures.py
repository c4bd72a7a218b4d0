"""The report's figures (``mishax_py.zoo.figures``): one-colour grids detected, figures that fit the page with
legible, non-overlapping labels, colourbars, estimates drawn next to the exact grid."""

from __future__ import annotations

import pytest
import torch

from mishax_py.zoo.figures import (
    MIN_FONT,
    PAGE_WIDTH_PX,
    draw_attention,
    draw_bars,
    draw_heatmaps,
    looks_constant,
)
from tests.helpers import text_overlaps

pytestmark = pytest.mark.usefixtures("one_thread")


def tick_fonts(fig) -> list[float]:
    return [t.get_fontsize() for ax in fig.axes for t in [*ax.get_xticklabels(), *ax.get_yticklabels()]
            if t.get_text()]  # fmt: skip


def test_looks_constant() -> None:
    """The demo's single-head ablation grid (0.9994..1 on a 0..1 scale) is one colour; patching's 0..0.1 is not."""
    single_head = torch.tensor([[1.0, 1.0, 1.0, 0.9994], [0.9994, 0.9994, 0.9994, 1.0], [1.0] * 4, [1.0] * 4])
    assert looks_constant(single_head, (0.0, 1.0))
    assert not looks_constant(torch.tensor([[0.0, 0.1], [0.05, 0.0]]), (0.0, 1.0))
    assert looks_constant(torch.full((3, 3), 0.7))  # identical cells, on their own scale
    assert not looks_constant(torch.tensor([[0.0, 1e-3]]))  # small but not identical: relative to the data
    assert looks_constant(torch.tensor([[0.0, 1e-3]]), atol=1e-2)  # ...unless below atol
    assert looks_constant(torch.tensor([[float("nan"), float("inf")]]))  # nothing finite to show


def test_attention_maps_are_a_legible_grid_with_a_colourbar() -> None:
    """Five maps of 26 tokens: two columns, every token labelled at MIN_FONT or more, no label overlaps, the
    figure no wider than the page, one colourbar labelled 'attention weight'."""
    T = 26
    tokens = ["<bos>"] + [f"v{i}" for i in range(12)] + ["k51"] + [f"v{i}" for i in range(12)]
    pats = [torch.softmax(torch.randn(T, T, generator=torch.Generator().manual_seed(i)), -1).tril() for i in range(5)]
    fig = draw_attention(pats, [f"L1H{i}" for i in range(5)], tokens, suptitle="Attention", boundaries=[13])
    assert fig.get_figwidth() * fig.dpi <= PAGE_WIDTH_PX
    maps = [ax for ax in fig.axes if ax.get_title()]
    assert len(maps) == 5
    assert len({round(ax.get_position().x0, 3) for ax in maps}) == 2  # a grid of two columns...
    assert len({round(ax.get_position().y0, 3) for ax in maps}) == 3  # ...and three rows
    assert all(len([t for t in ax.get_xticklabels() if t.get_text()]) == T for ax in maps)  # every token
    assert min(tick_fonts(fig)) >= MIN_FONT
    colourbars = [ax for ax in fig.axes if ax.get_ylabel() == "attention weight"]
    assert len(colourbars) == 1
    assert text_overlaps(fig) == []


def test_long_prompts_label_every_kth_token_without_overlap() -> None:
    T = 120
    fig = draw_attention([torch.eye(T)], ["L0H0"], [f"tok{i}" for i in range(T)])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert 20 <= len(labels) < T and labels[0] == "tok0"
    assert text_overlaps(fig) == []


def test_estimates_are_drawn_next_to_the_exact_grid_on_one_scale() -> None:
    """A wide grid (4 layers x 25 positions) with two estimates: three stacked panels, one shared colour scale
    and colourbar, column labels once (under the lowest), no overlapping text, page width."""
    g = torch.Generator().manual_seed(0)
    exact, atp, layer = (torch.randn(4, 25, generator=g) * s for s in (0.1, 0.2, 0.1))
    labels = ["<bos>"] + [f"s{i}" for i in range(1, 13)] + [f"s{i}'" for i in range(1, 13)]
    fig = draw_heatmaps([(exact, "exact"), (atp, "AtP estimate (r = 0.71)"), (layer, "atp-layer")], title="resid_pre",
                        row_labels=[f"layer {i}" for i in range(4)], col_labels=labels, colorbar_label="recovered")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["exact", "AtP estimate (r = 0.71)", "atp-layer"]
    assert len({round(ax.get_position().y0, 3) for ax in panels}) == 3  # stacked
    assert len({im.get_clim() for ax in panels for im in ax.get_images()}) == 1  # one colour scale
    vmax = float(max(t.abs().max() for t in (exact, atp, layer)))
    assert panels[0].get_images()[0].get_clim() == pytest.approx((-vmax, vmax))
    assert [ax.get_ylabel() for ax in fig.axes if ax not in panels] == ["recovered"]
    assert [len([t for t in ax.get_xticklabels() if t.get_text()]) for ax in panels] == [0, 0, 25]
    assert fig.get_figwidth() * fig.dpi <= PAGE_WIDTH_PX and min(tick_fonts(fig)) >= MIN_FONT
    assert text_overlaps(fig) == []
    # a small grid (4 layers x 4 heads) goes side by side, annotated
    fig = draw_heatmaps([(exact[:, :4], "exact"), (atp[:, :4], "AtP")], title="attn.z", annotate=True,
                        row_labels=[f"layer {i}" for i in range(4)], col_labels=[f"H{h}" for h in range(4)])
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len({round(ax.get_position().y0, 3) for ax in panels}) == 1
    assert text_overlaps(fig) == []


def test_bar_labels_do_not_overlap() -> None:
    groups = ["none", "named: L1H3+L1H2+L1H0+L1H1"] + [f"L0H{i}+L0H3+L2H0+L2H{i}" for i in range(10)]
    fig = draw_bars(groups, {"induction accuracy": [1.0, 0.0] + [0.96] * 10}, title="ablation", ylabel="accuracy",
                    hline=0.5, ylim=(0, 1.05))  # fmt: skip
    assert fig.get_figwidth() * fig.dpi <= PAGE_WIDTH_PX
    assert text_overlaps(fig) == []


def test_a_grid_of_many_positions_labels_every_kth_without_overlap() -> None:
    """26 layers x 128 positions (a 2B model's resid_pre grid): labels thinned, none overlapping, page width."""
    v = torch.randn(26, 128, generator=torch.Generator().manual_seed(1))
    fig = draw_heatmaps([(v, "exact"), (v * 2, "AtP")], title="big", row_labels=[f"layer {i}" for i in range(26)],
                        col_labels=[f"pos{i}" for i in range(128)], annotate=True)  # fmt: skip
    assert fig.get_figwidth() * fig.dpi <= PAGE_WIDTH_PX and min(tick_fonts(fig)) >= MIN_FONT
    assert text_overlaps(fig) == []
