"""What attribution patching returns: :class:`AttributionResult` (one site) and :class:`AttributionResults` (several).

An :class:`AttributionResult` is a :class:`~mishax_py.studies.result.PatchingResult` -- same
``values``/``axes``/``labels``/``site``/``direction``/``clean``/``corrupt``, the tensor
protocol, ``normalized()`` and ``plot`` -- whose ``values`` *estimate* what activation
patching returns, with the estimate's details (the estimated change alone, the estimator,
GradDrop's variants, a ranking score). :class:`AttributionResults` maps each site of an
``attribution_patching_sites`` call to its result.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.studies.result import PatchingResult, plot

if TYPE_CHECKING:
    from mishax_py.instrumented import Interventions

__all__ = ["AttributionResult", "AttributionResults"]


@dataclass(repr=False, eq=False)  # eq=False: ``==`` stays elementwise, as for every result
class AttributionResult(PatchingResult):
    """Estimated activation-patching results of one site across layers.

    A :class:`~mishax_py.studies.result.PatchingResult` (same ``values``/``axes``/``labels``/``site``/
    ``direction``/``clean``/``corrupt``, ``normalized()``, and :func:`mishax_py.studies.result.plot`
    draws it) with the estimate's details:

    Attributes:
        values: estimates of the patched runs' metric, ``[n_layers, ...]`` (see
            :func:`~mishax_py.studies.attribution.attribution_patching` for shapes): ``target metric + effects``.
        effects: the estimated change ``metric(patched) - metric(target run)``, same shape.
        method: ``"atp"``, ``"atp*"``, ``"atp-layer"``, ``"ig"`` or ``"ig-input"``.
        by: the patching granularity (``"pos"``, ``"layer"``, ``"head"``, ``"head_pos"``).
        layers: the model layers along the first axis.
        sites: the canonical site names, one per layer.
        qk_fix: whether the QK fix was applied.
        steps: IG steps (``None`` for the other methods).
        graddrop: with GradDrop, ``[n_model_layers, *values.shape]``: the estimated effect
            with the gradient through layer ``l``'s residual contributions dropped.
        score: a non-negative importance per element: the AtP* GradDrop score
            ``1/(L-1) sum_l |graddrop[l]|`` with GradDrop, else ``|effects|``.
        positions: the patched token positions (absolute), in the order of the position axis
            (with ``by="head"``/``"layer"``: the positions patched together).
        under_interventions: whether the runs were made under ``interventions=``.
        interventions: those interventions (kept so that checks can rerun under them).
    """

    effects: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    method: str = "atp"
    by: str = "pos"
    layers: list[int] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    qk_fix: bool = False
    steps: int | None = None
    graddrop: torch.Tensor | None = None
    score: torch.Tensor | None = None
    positions: list[int] = field(default_factory=list)
    under_interventions: bool = False
    interventions: Interventions | None = field(default=None, repr=False, compare=False)

    @property
    def target_metric(self) -> float:
        """The metric of the run patched into (corrupt when denoising)."""
        return self.corrupt if self.direction == "denoise" else self.clean

    def worst_case(self) -> torch.Tensor:
        """Per element, the signed effect estimate of largest magnitude among AtP and every GradDrop variant.

        Without GradDrop this is ``effects``.
        """
        if self.graddrop is None:
            return self.effects
        allv = torch.cat([self.effects[None], self.graddrop])
        idx = allv.abs().argmax(0, keepdim=True)
        return allv.gather(0, idx)[0]

    def top(self, k: int = 10) -> list[tuple[tuple[str, ...], float]]:
        """The ``k`` elements of largest ``score``, as ``((label per axis), estimated effect)``."""
        score = self.score if self.score is not None else self.effects.abs()
        k = min(k, score.numel())
        out = []
        for i in score.flatten().topk(k).indices.tolist():
            coords = [int(c) for c in torch.unravel_index(torch.tensor(i), tuple(score.shape))]
            labels = tuple(self.labels[a][c] for a, c in zip(self.axes, coords, strict=True))
            out.append((labels, float(self.effects.flatten()[i])))
        return out

    def plot(self, path: str | os.PathLike[str], title: str | None = None, **kwargs: Any) -> str:
        """Write a heatmap PNG of ``values`` (``normalized=True`` for the normalised metric); returns the path."""
        return plot(self, path, title or f"{self.method} {self.direction}: {self.site} by {self.by}", **kwargs)

    def __repr__(self) -> str:
        dims = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.values.shape, strict=True))
        return (f"AttributionResult({self.method}, {self.site!r}, {self.direction}, [{dims}], clean={self.clean:.4g}, "
                f"corrupt={self.corrupt:.4g})")


class AttributionResults(Mapping[str, AttributionResult]):
    """The results of one ``attribution_patching_sites`` call: ``{site as given: AttributionResult}``.

    A read-only mapping in the order the sites were given (``results["attn.z"]``, ``list(results)``,
    ``results.items()``, ``dict(results)`` all work); :meth:`plot` writes one heatmap per site.
    """

    def __init__(self, results: Mapping[str, AttributionResult]) -> None:
        self._results = dict(results)

    def __getitem__(self, site: str) -> AttributionResult:
        return self._results[site]

    def __iter__(self) -> Iterator[str]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    def plot(self, folder: str | os.PathLike[str], **kwargs: Any) -> dict[str, str]:
        """Write ``{folder}/{site}.png`` for each site (created if missing; keyword arguments as for
        :meth:`AttributionResult.plot`). Returns ``{site: path}``."""
        os.makedirs(folder, exist_ok=True)
        paths: dict[str, str] = {}
        for site, result in self._results.items():
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", site).strip("_") or "site"
            if f"{stem}.png" in {os.path.basename(p) for p in paths.values()}:  # two spellings, one file name
                stem = f"{stem}-{len(paths)}"
            paths[site] = result.plot(os.path.join(os.fspath(folder), f"{stem}.png"), **kwargs)
        return paths

    def __repr__(self) -> str:
        inner = ", ".join(f"{site!r}: {r!r}" for site, r in self._results.items())
        return f"AttributionResults({{{inner}}})"
