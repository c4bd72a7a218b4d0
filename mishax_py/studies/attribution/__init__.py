"""Attribution patching: gradient estimates of activation patching (AtP, AtP*, atp-layer, IG) and
the check that re-runs a sample of an estimate exactly.

Modules, one job each:

* :mod:`~mishax_py.studies.attribution.api`: the studies :func:`attribution_patching` and
  :func:`attribution_patching_sites` (argument checks, dispatch to an estimator, the result);
* :mod:`~mishax_py.studies.attribution.result`: :class:`AttributionResult`, :class:`AttributionResults`;
* :mod:`~mishax_py.studies.attribution.plan`: the site per layer, its layout, the result's grid;
* :mod:`~mishax_py.studies.attribution.gradients`: :func:`site_gradients` (the primitive: values
  and the metric's gradient at sites) and the handlers the estimators share;
* estimators: :mod:`~mishax_py.studies.attribution.atp` (AtP, AtP*'s GradDrop),
  :mod:`~mishax_py.studies.attribution.qk` (AtP*'s QK fix), :mod:`~mishax_py.studies.attribution.layer`
  (``atp-layer``), :mod:`~mishax_py.studies.attribution.ig` (``ig``, ``ig-input``);
* :mod:`~mishax_py.studies.attribution.check`: :func:`check_attribution`.
"""

from mishax_py.studies.attribution.api import attribution_patching, attribution_patching_sites
from mishax_py.studies.attribution.check import AttributionCheck, check_attribution, pearson
from mishax_py.studies.attribution.gradients import SiteGradients, site_gradients
from mishax_py.studies.attribution.result import AttributionResult, AttributionResults

__all__ = [
    "AttributionCheck",
    "AttributionResult",
    "AttributionResults",
    "SiteGradients",
    "attribution_patching",
    "attribution_patching_sites",
    "check_attribution",
    "pearson",
    "site_gradients",
]
