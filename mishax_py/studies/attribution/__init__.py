"""Attribution patching: gradient estimates of activation patching (AtP, AtP*, atp-layer, IG) and
the check that re-runs a sample of an estimate exactly."""

from mishax_py.studies.attribution.atp import (
    AttributionResult,
    attribution_patching,
    attribution_patching_sites,
    site_gradients,
)
from mishax_py.studies.attribution.check import AttributionCheck, check_attribution, pearson

__all__ = [
    "AttributionCheck",
    "AttributionResult",
    "attribution_patching",
    "attribution_patching_sites",
    "check_attribution",
    "pearson",
    "site_gradients",
]
