"""Application layer: bundled tiny trained models (``load``, ``MODELS``) and their synthetic tasks."""

from mishax_py.zoo.models import MODELS, load

__all__ = ["MODELS", "load"]
