"""Deprecated import path: moved to :mod:`mishax_py.studies.attribution.layer`.

This re-export goes in the next release.
"""

import warnings

from mishax_py.studies.attribution.layer import *  # noqa: F403
from mishax_py.studies.attribution.layer import __all__  # noqa: F401

warnings.warn("mishax_py.attribution_layer moved to mishax_py.studies.attribution.layer; import from there",
              DeprecationWarning, stacklevel=2)
