"""Differences between the transformers releases mishax-py supports, in one place.

transformers 5.24 renamed the key/value cache argument and output field of its models
from ``past_key_values`` to ``cache`` (the old keyword still works there, with a
deprecation shim, until 5.40). Code that passes a cache to a model or reads one back
uses :data:`CACHE_KWARG` and :func:`output_cache` so it runs on both sides of the rename.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers.modeling_outputs import BaseModelOutputWithPast

__all__ = ["CACHE_KWARG", "output_cache"]

#: The keyword (and output field) that carries a model's key/value cache in this transformers.
CACHE_KWARG: str = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
)


def output_cache(output: Any) -> Any:
    """The key/value cache held by a model output (``None`` when the forward kept none)."""
    return getattr(output, CACHE_KWARG, None)
