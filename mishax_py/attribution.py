"""Deprecated import path: moved to :mod:`mishax_py.studies.attribution` (the studies in its ``api``
module, the result types in ``result``, ``site_gradients`` in ``gradients``; ``site_kind`` is
``mishax_py.studies.attribution.plan.site_layout``).

This re-export goes in the next release.
"""

import warnings

from mishax_py.studies.attribution import (
    AttributionResult,
    attribution_patching,
    attribution_patching_sites,
    site_gradients,
)
from mishax_py.studies.attribution.plan import site_layout as site_kind

__all__ = ["AttributionResult", "attribution_patching", "attribution_patching_sites", "site_gradients", "site_kind"]

warnings.warn("mishax_py.attribution moved to mishax_py.studies.attribution; import from there",
              DeprecationWarning, stacklevel=2)
