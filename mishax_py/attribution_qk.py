"""Deprecated import path: moved to :mod:`mishax_py.studies.attribution.qk`.

This re-export goes in the next release.
"""

import warnings

from mishax_py.studies.attribution.qk import *  # noqa: F403
from mishax_py.studies.attribution.qk import __all__  # noqa: F401

warnings.warn("mishax_py.attribution_qk moved to mishax_py.studies.attribution.qk; import from there",
              DeprecationWarning, stacklevel=2)
