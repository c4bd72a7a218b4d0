"""Deprecated import path: moved to :mod:`mishax_py.execution.sweep`.

This re-export goes in the next release.
"""

import warnings

from mishax_py.execution.sweep import *  # noqa: F403
from mishax_py.execution.sweep import __all__  # noqa: F401

warnings.warn("mishax_py.sweep moved to mishax_py.execution.sweep; import from there",
              DeprecationWarning, stacklevel=2)
