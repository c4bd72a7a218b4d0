"""Check attribution estimates against exact activation patching on a sample of elements.

Attribution patching is a first-order (or path-integrated) estimate, and how far it can
be trusted depends on the model and the task: saturated attention or a very confident
answer can make a large effect look small (see ``benchmarks/RESULTS.md`` for measured
cases). :func:`check_attribution` measures this for the experiment at hand, at the cost
of a few exact patches instead of the whole grid:

* the ``k`` elements the estimate ranks highest (``result.score``) -- are the reported
  effects real? -- and
* ``n_random`` elements drawn uniformly from the rest -- is anything large being missed?

Each sampled element is patched exactly with :func:`mishax_py.studies.activation_patching.activation_patching`
(same site, granularity, direction and positions as the estimate, under the estimate's
``interventions`` if it had any), one batched call per layer, and :class:`AttributionCheck`
reports estimate against exact per element, with the Pearson correlation and the largest error.

Example::

    est = attribution_patching(im, clean, corrupt, metric, site="resid_pre")
    check = check_attribution(im, clean, corrupt, metric, result=est, k=8, n_random=8)
    print(check)            # a table: element, sample, estimate, exact
    check.pearson, check.max_abs_error
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.inputs import Ids, Metric
from mishax_py.studies.activation_patching import activation_patching
from mishax_py.studies.attribution.result import AttributionResult

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["AttributionCheck", "check_attribution", "pearson"]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors' entries (flattened; ``nan`` when either is constant or has < 2)."""
    a, b = a.flatten().double(), b.flatten().double()
    if a.numel() < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else math.nan


@dataclass(repr=False)
class AttributionCheck:
    """Estimated against exact patched-run metrics on a sample of elements.

    Attributes:
        elements: index tuples into ``result.values`` (one per sampled element).
        labels: the same elements as tick labels, e.g. ``("3", "7")`` for layer 3, position 7.
        sample: ``"top"`` (ranked highest by the estimate) or ``"random"`` per element.
        estimated: ``[n]`` the estimate's patched-run metric (``result.values`` at the elements).
        exact: ``[n]`` activation patching's metric for the same patches.
        method, site, by, direction: copied from the checked result.
    """

    elements: list[tuple[int, ...]]
    labels: list[tuple[str, ...]]
    sample: list[str]
    estimated: torch.Tensor
    exact: torch.Tensor
    method: str
    site: str
    by: str
    direction: str

    @property
    def pearson(self) -> float:
        """Pearson correlation of estimated and exact over the sample (``nan`` when either is constant)."""
        return pearson(self.estimated, self.exact)

    @property
    def max_abs_error(self) -> float:
        """The largest ``|estimated - exact|`` over the sample."""
        return float((self.estimated - self.exact).abs().max()) if self.exact.numel() else 0.0

    def __str__(self) -> str:
        head = f"{'element':<18} {'sample':<7} {'estimated':>11} {'exact':>11} {'error':>10}"
        lines = [f"{self.method} {self.direction} on {self.site} by {self.by}: {len(self.elements)} elements, "
                 f"Pearson {self.pearson:.3f}, max |error| {self.max_abs_error:.4g}", head]
        for lab, kind, e, x in zip(self.labels, self.sample, self.estimated.tolist(), self.exact.tolist(), strict=True):
            lines.append(f"{'/'.join(lab):<18} {kind:<7} {e:>11.4g} {x:>11.4g} {e - x:>10.3g}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"AttributionCheck({self.method}, {self.site!r} by {self.by}, n={len(self.elements)}, "
                f"pearson={self.pearson:.3f}, max_abs_error={self.max_abs_error:.4g})")


def check_attribution(
    im: InstrumentedModel,
    clean_ids: Ids,
    corrupt_ids: Ids,
    metric: Metric,
    *,
    result: AttributionResult,
    k: int = 8,
    n_random: int = 8,
    seed: int = 0,
    **hf_kwargs: Any,
) -> AttributionCheck:
    """Patch the ``k`` top-ranked and ``n_random`` other elements of ``result`` exactly and compare.

    Args:
        im: the instrumented model the estimate was computed on.
        clean_ids, corrupt_ids, metric: the same inputs and metric as for ``result``.
        result: an :class:`~mishax_py.studies.attribution.result.AttributionResult` from
            :func:`~mishax_py.studies.attribution.attribution_patching`.
        k: how many of the elements with the largest ``result.score`` to check.
        n_random: how many further elements to draw uniformly (without replacement) from the rest.
        seed: seed of that draw.
        **hf_kwargs: passed to the model, as for ``result`` (e.g. ``attention_mask``).

    Returns:
        :class:`AttributionCheck` (elements in the order top-ranked first, then random).
    """
    if not isinstance(result, AttributionResult):
        raise TypeError(f"result must be an AttributionResult from attribution_patching, got {type(result).__name__}")
    if result.under_interventions and result.interventions is None:
        raise ValueError("result was computed under interventions=... that it does not hold; check_attribution "
                         "cannot rerun them")
    if not result.positions:
        raise ValueError("result has no recorded positions (it was not made by attribution_patching)")
    for name, n in (("k", k), ("n_random", n_random)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
    if k + n_random == 0:
        raise ValueError("nothing to check: k and n_random are both 0")

    score = (result.score if result.score is not None else result.effects.abs()).flatten()
    top = score.topk(min(k, score.numel())).indices
    rest = torch.ones(score.numel(), dtype=torch.bool)
    rest[top] = False
    pool = rest.nonzero()[:, 0]
    draw = torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed))[:n_random]
    flat = top.tolist() + pool[draw].tolist()
    sample = ["top"] * top.numel() + ["random"] * int(draw.numel())
    shape = tuple(result.values.shape)
    elements = [tuple(int(c) for c in torch.unravel_index(torch.tensor(i), shape)) for i in flat]

    axes = result.axes
    pos_axis = axes.index("pos") if "pos" in axes else None
    exact = torch.empty(len(elements))
    by_layer: dict[int, list[int]] = {}
    for j, el in enumerate(elements):
        by_layer.setdefault(el[0], []).append(j)
    for li, members in by_layer.items():
        if pos_axis is None:
            positions = list(result.positions)
            needed: list[int] = []
        else:
            needed = sorted({elements[j][pos_axis] for j in members})
            positions = [result.positions[p] for p in needed]
        under = (im.intervene(result.interventions) if result.under_interventions and result.interventions is not None
                 else contextlib.nullcontext())
        with torch.no_grad(), under:  # the estimate's own interventions hold in the exact runs too
            patched = activation_patching(
                im, clean_ids, corrupt_ids, metric, site=result.site, by=result.by, direction=result.direction,
                layers=[result.layers[li]], positions=positions, progress=False, **hf_kwargs,
            )
        for j in members:
            index = list(elements[j])
            index[0] = 0
            if pos_axis is not None:
                index[pos_axis] = needed.index(index[pos_axis])
            exact[j] = patched.values[tuple(index)]

    estimated = result.values.flatten()[torch.tensor(flat, dtype=torch.long)].float()
    labels = [tuple(result.labels[a][c] for a, c in zip(axes, el, strict=True)) for el in elements]
    return AttributionCheck(elements=elements, labels=labels, sample=sample, estimated=estimated, exact=exact,
                            method=result.method, site=result.site, by=result.by, direction=result.direction)
