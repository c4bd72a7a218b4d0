"""Activation and path patching in one import: the studies' convenience module.

The code lives in :mod:`~mishax_py.studies.activation_patching` (with its packed engine in
:mod:`~mishax_py.studies.packed`), :mod:`~mishax_py.studies.path_patching` and
:mod:`~mishax_py.studies.result`; this module re-exports their public names, so
``from mishax_py.studies.patching import activation_patching, path_patching`` keeps working.
(The ``by=`` table ``BY_ALIASES`` moved to :mod:`mishax_py.studies.conventions`; ``Metric`` and
``prompt_pair`` live in :mod:`mishax_py.inputs`.)
"""

from mishax_py.studies.activation_patching import activation_patching
from mishax_py.studies.path_patching import Receiver, Sender, path_patching, path_patching_by_head
from mishax_py.studies.result import PatchingResult, plot

__all__ = [
    "PatchingResult",
    "Receiver",
    "Sender",
    "activation_patching",
    "path_patching",
    "path_patching_by_head",
    "plot",
]
