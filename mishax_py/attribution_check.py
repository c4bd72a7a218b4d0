"""Deprecated import path: moved to :mod:`mishax_py.studies.attribution.check`.

This re-export goes in the next release.
"""

import warnings

from mishax_py.studies.attribution.check import *  # noqa: F403
from mishax_py.studies.attribution.check import __all__  # noqa: F401

warnings.warn("mishax_py.attribution_check moved to mishax_py.studies.attribution.check; import from there",
              DeprecationWarning, stacklevel=2)
