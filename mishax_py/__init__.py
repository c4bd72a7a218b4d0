"""mishax-py: read and rewrite the internal activations of Hugging Face models.

The core is model-agnostic: :mod:`mishax_py.ast_patcher` rewrites model source to
call :func:`mishax_py.runtime.tag` at named sites, and :class:`InstrumentedModel`
decides per run what those calls do. Model families (one module per architecture,
implementing :class:`mishax_py.family.ModelFamily`) live in ``instrumentation``; SAEs in ``saes``.
"""

from mishax_py.ast_patcher import ModuleASTPatcher, PatchError, Replace
from mishax_py.cache import ActivationCache
from mishax_py.instrumented import InstrumentedModel
from mishax_py.runtime import SiteEvent, tag
from mishax_py.sites import SiteInfo, UnknownSiteError

__version__ = "0.1.0"

__all__ = [
    "ActivationCache",
    "InstrumentedModel",
    "ModuleASTPatcher",
    "PatchError",
    "Replace",
    "SiteEvent",
    "SiteInfo",
    "UnknownSiteError",
    "tag",
]
