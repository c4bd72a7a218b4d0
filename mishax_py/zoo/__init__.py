"""Application layer: bundled tiny trained models (``load``, ``MODELS``) and their synthetic tasks.

Modules: ``models`` (bundled models, the one checkpoint loader), ``tasks`` (prompts), ``saes``
(bundled SAEs), ``analyses`` (reusable analyses), ``demo`` (the ``mishax-py demo`` study),
``report`` / ``figures`` / ``page`` (its report).
"""

from mishax_py.zoo.models import MODELS, load
from mishax_py.zoo.saes import SAE_MODELS, load_saes

__all__ = ["MODELS", "SAE_MODELS", "load", "load_saes"]
