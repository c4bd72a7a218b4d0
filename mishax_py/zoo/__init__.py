"""Application layer: bundled tiny trained models (``load``, ``MODELS``) and their synthetic tasks."""

from mishax_py.zoo.models import MODELS, load
from mishax_py.zoo.saes import SAE_MODELS, load_saes

__all__ = ["MODELS", "SAE_MODELS", "load", "load_saes"]
