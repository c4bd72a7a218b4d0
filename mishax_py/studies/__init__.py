"""Studies: activation patching, path patching and attribution patching.

Every study has one signature shape, ``(im, clean_ids, corrupt_ids, metric, *, site=, by=,
direction=, layers=, positions=, interventions=, batch_size=, progress=, method=, **hf_kwargs)``,
and returns a :class:`~mishax_py.studies.result.PatchingResult` (or a subclass) that behaves
as a tensor.
"""

from mishax_py.studies.activation_patching import activation_patching
from mishax_py.studies.attribution import (
    AttributionCheck,
    AttributionResult,
    attribution_patching,
    attribution_patching_sites,
    check_attribution,
    site_gradients,
)
from mishax_py.studies.path_patching import path_patching, path_patching_by_head
from mishax_py.studies.result import PatchingResult, plot

__all__ = [
    "AttributionCheck",
    "AttributionResult",
    "PatchingResult",
    "activation_patching",
    "attribution_patching",
    "attribution_patching_sites",
    "check_attribution",
    "path_patching",
    "path_patching_by_head",
    "plot",
    "site_gradients",
]
