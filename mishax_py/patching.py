"""Deprecated import path: moved to :mod:`mishax_py.studies.patching`.

This re-export goes in the next release.
"""

import warnings

from mishax_py.studies.patching import *  # noqa: F403
from mishax_py.studies.patching import __all__  # noqa: F401

warnings.warn("mishax_py.patching moved to mishax_py.studies.patching; import from there",
              DeprecationWarning, stacklevel=2)
