"""Deprecated import path: moved to :mod:`mishax_py.studies.attribution.atp`.

This re-export goes in the next release.
"""

import warnings

from mishax_py.studies.attribution.atp import *  # noqa: F403
from mishax_py.studies.attribution.atp import __all__  # noqa: F401

warnings.warn("mishax_py.attribution moved to mishax_py.studies.attribution.atp; import from there",
              DeprecationWarning, stacklevel=2)
