"""Deprecated import path: moved to :mod:`mishax_py.execution.walk`.

This re-export goes in the next release.
"""

import warnings

from mishax_py.execution.walk import *  # noqa: F403
from mishax_py.execution.walk import __all__  # noqa: F401

warnings.warn("mishax_py.walk moved to mishax_py.execution.walk; import from there",
              DeprecationWarning, stacklevel=2)
