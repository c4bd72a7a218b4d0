"""What one attribution call attributes: the site of each layer, its value layout, and the grid of the result.

Every estimator (:mod:`~mishax_py.studies.attribution.atp`, :mod:`~mishax_py.studies.attribution.ig`,
:mod:`~mishax_py.studies.attribution.layer`) works on the same bookkeeping:

* a site's *layout* (:func:`site_layout`): ``"stream"`` values ``[batch, pos, d]``, ``"head"``
  values ``[batch, pos, head, d_head]`` or ``"map"`` values ``[batch, head, q_pos, k_pos]``;
* the *plan* (:func:`plan_site`): the canonical site of every attributed layer, its layout and
  the granularity ``by`` (``"pos"``, ``"layer"``, ``"head"``, ``"head_pos"``);
* the *grid* (:class:`Grid`): a plan plus how the replicated runs go (batch, chunk size,
  patched positions, interventions, model keywords);
* the reduction of an elementwise product ``(a_source - a_target) * gradient`` in the site's
  layout to one layer's row of the result (:func:`reduce_to_grid`), with axes :func:`grid_axes`
  and tick labels :func:`grid_labels`.

An estimator returns an :class:`Estimate`: the estimated change of the metric per element,
``[n_layers, ...]`` in the shape :func:`reduce_to_grid` gives for every position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from mishax_py.naming import layer_of, site_kind
from mishax_py.studies.conventions import by_kind

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel, Interventions

__all__ = [
    "BY_FOR_LAYOUT",
    "DEFAULT_BY",
    "QK_KINDS",
    "Estimate",
    "Grid",
    "SitePlan",
    "grid_axes",
    "grid_labels",
    "mask_positions",
    "plan_site",
    "reduce_to_grid",
    "site_layout",
]

#: The granularities each layout allows (the first is the default).
BY_FOR_LAYOUT: dict[str, tuple[str, ...]] = {
    "stream": ("pos", "layer"),
    "head": ("head", "head_pos", "pos", "layer"),
    "map": ("head", "head_pos", "pos", "layer"),
}
#: ``by=None`` means this granularity, per layout.
DEFAULT_BY: dict[str, str] = {layout: bys[0] for layout, bys in BY_FOR_LAYOUT.items()}
#: Site kinds the QK fix of AtP* applies to -> what a patch of them moves: query rows, key columns or scores.
#: A query/key site's per-(position, head) map to ``rot_q``/``rot_k`` (a QK-norm, RoPE) acts on each row
#: alone, so a patched row's rotated value is the source run's: the fix reads it there.
QK_KINDS: dict[str, str] = {"attn.q": "q", "attn.q_normed": "q", "attn.rot_q": "q", "attn.k": "k",
                            "attn.k_normed": "k", "attn.rot_k": "k", "attn.scores": "scores"}


def site_layout(dims: Sequence[int | str]) -> str:
    """``"stream"`` for ``[batch, pos, d]``, ``"head"`` for ``[batch, pos, head, d_head]``,
    ``"map"`` for ``[batch, head, q_pos, k_pos]`` sites; raises for anything else."""
    dims = tuple(dims)
    if len(dims) == 3 and dims[:2] == ("batch", "pos") and isinstance(dims[2], int):
        return "stream"
    if len(dims) == 4 and dims[:2] == ("batch", "pos") and all(isinstance(d, int) for d in dims[2:]):
        return "head"
    if len(dims) == 4 and dims[0] == "batch" and isinstance(dims[1], int) and dims[2:] == ("pos", "key_pos"):
        return "map"
    raise ValueError(f"sites of shape {dims} are not supported by attribution patching")


def _within_block(site: str) -> str:
    """The per-layer site kind of a study's ``site=`` spelling (``"blocks.*.hook_z"`` -> ``"attn.z"``)."""
    spelling = site.removeprefix("blocks.L.")
    if spelling.startswith("blocks.") and not spelling.startswith("blocks.*."):
        raise ValueError(
            f"site {site!r}: give the site within a block (e.g. 'resid_pre', 'attn.z') and choose layers with "
            "layers=[...]"
        )
    return site_kind(spelling)


@dataclass(frozen=True)
class SitePlan:
    """One site attributed across layers.

    Attributes:
        kind: the canonical per-layer site kind, e.g. ``"attn.z"``.
        names: the canonical site of each attributed layer, in the order of the result's first axis.
        dims: the site's symbolic value shape (``("batch", "pos", 32)``, ...).
        layout: ``"stream"``, ``"head"`` or ``"map"`` (:func:`site_layout`).
        by: the granularity of the result.
    """

    kind: str
    names: list[str]
    dims: tuple[int | str, ...]
    layout: str
    by: str

    @property
    def n_heads(self) -> int:
        """Heads of a per-head site or map (0 for a stream site)."""
        if self.layout == "head":
            return int(self.dims[2])
        return int(self.dims[1]) if self.layout == "map" else 0


def plan_site(im: InstrumentedModel, site: str, by: Any, layers: Sequence[int]) -> SitePlan:
    """The :class:`SitePlan` of ``site`` (any spelling :func:`mishax_py.naming.site_kind` knows) at ``layers``.

    ``by=None`` takes the layout's default; an unknown ``by`` or one the layout does not have
    is a ``ValueError`` naming the choices.
    """
    wanted = _within_block(site)
    names = []
    for layer in layers:
        resolved = im.resolve(im.layer_site(layer, wanted))
        if len(resolved) != 1:
            raise ValueError(f"site {site!r} matches {len(resolved)} sites in layer {layer}: {resolved}")
        names.append(resolved[0])
    dims = tuple(im.site_info(names[0]).dims)
    layout = site_layout(dims)
    grid_by = DEFAULT_BY[layout] if by is None else by_kind(by)
    if grid_by not in BY_FOR_LAYOUT[layout]:
        shown = tuple(by) if isinstance(by, list) else by
        raise ValueError(f"by={shown!r} is not available for site {site!r} (shape {dims}); choose one of "
                         f"{BY_FOR_LAYOUT[layout]}")
    split = layer_of(names[0])
    kind = split[1] if split is not None else names[0]
    return SitePlan(kind=kind, names=names, dims=dims, layout=layout, by=grid_by)


def grid_axes(by: str) -> tuple[str, ...]:
    """The axes of a result of granularity ``by``: ``("layer", "pos")``, ``("layer", "head", "pos")``, ..."""
    return {"pos": ("layer", "pos"), "head": ("layer", "head"), "head_pos": ("layer", "head", "pos"),
            "layer": ("layer",)}[by]


def grid_labels(plan: SitePlan, layers: Sequence[int], positions: Sequence[int],
                pos_labels: Sequence[str] | None) -> dict[str, list[str]]:
    """Tick labels per axis: layer and head indices, and ``pos_labels`` (default the absolute positions)."""
    axes = grid_axes(plan.by)
    labels: dict[str, list[str]] = {"layer": [str(layer) for layer in layers]}
    if "head" in axes:
        labels["head"] = [str(h) for h in range(plan.n_heads)]
    if "pos" in axes:
        labels["pos"] = list(pos_labels) if pos_labels is not None else [str(p) for p in positions]
    return labels


def reduce_to_grid(x: torch.Tensor, layout: str, by: str) -> torch.Tensor:
    """Sum an elementwise product ``[batch, ...]`` (the site's layout) to one layer's row of the ``by`` grid.

    Returns ``[]`` (layer), ``[pos]``, ``[head]`` or ``[head, pos]``.
    """
    if by == "layer":
        return x.sum()
    if layout == "stream":  # by pos
        return x.sum((0, 2))
    if layout == "head":
        if by == "head":
            return x.sum((0, 1, 3))
        if by == "head_pos":
            return x.sum((0, 3)).transpose(0, 1)
        return x.sum((0, 2, 3))  # pos
    # map [batch, head, q, k]
    if by == "head":
        return x.sum((0, 2, 3))
    if by == "head_pos":
        return x.sum((0, 3))
    return x.sum((0, 1, 3))


def mask_positions(x: torch.Tensor, layout: str, pos_mask: torch.Tensor) -> torch.Tensor:
    """Zero the entries of a site-layout tensor outside the patched positions (query rows for maps)."""
    if bool(pos_mask.all()):
        return x
    shape = [1] * x.ndim
    axis = 2 if layout == "map" else 1
    shape[axis] = -1
    return x * pos_mask.view(shape).to(device=x.device, dtype=x.dtype)  # x: on its layer's device


@dataclass(frozen=True)
class Grid:
    """What one ``attribution_patching`` call attributes and how it runs (shared by every estimator).

    Attributes:
        plan: the site per attributed layer, its layout and the granularity.
        batch: rows of one run (the input batch).
        batch_size: most rows per forward of replicated runs.
        pos_mask: ``[pos]`` bool, the patched positions.
        interventions: applied first in every run.
        hf: keyword arguments of the model (``attention_mask``, ...).
        progress: the progress-bar switch (:func:`mishax_py.progress.progress_bar`).
    """

    plan: SitePlan
    batch: int
    batch_size: int
    pos_mask: torch.Tensor
    interventions: Interventions | None
    hf: Mapping[str, Any]
    progress: bool | None

    @property
    def names(self) -> list[str]:
        return self.plan.names

    @property
    def layout(self) -> str:
        return self.plan.layout

    @property
    def by(self) -> str:
        return self.plan.by


class Estimate(NamedTuple):
    """What an estimator returns.

    Attributes:
        effects: the estimated ``metric(patched) - metric(target run)``, ``[n_layers, ...]`` (every position).
        target_metric: the metric of the run patched into.
        source_metric: the metric of the run the patches come from.
        graddrop: with GradDrop, ``[n_model_layers, n_layers, ...]`` (see :mod:`~mishax_py.studies.attribution.atp`).
    """

    effects: torch.Tensor
    target_metric: float
    source_metric: float
    graddrop: torch.Tensor | None = None
