"""ActivationCache: the values recorded by ``run_with_cache``, looked up by name or alias."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["ActivationCache"]


class ActivationCache(Mapping[str, torch.Tensor]):
    """A read-only mapping from canonical site names to recorded tensors, in forward order.

    ``cache["blocks.0.hook_resid_post"]`` (a TransformerLens alias) and
    ``cache["blocks.0.resid_post"]`` return the same tensor. Derived entries such as
    ``"blocks.1.resid_post.sae.features"`` are stored under their own names.

    ``attention_mask``: the ``[batch, pos]`` attention mask of the run that filled the cache
    (``None`` without one), so that statistics over it -- ``Ablate(mean=cache)`` -- can leave
    padding out.
    """

    def __init__(self, values: dict[str, torch.Tensor], canonical: Callable[[str], str] | None = None,
                 attention_mask: torch.Tensor | None = None) -> None:
        self._values = values
        self._canonical = canonical
        self.attention_mask = attention_mask

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._values:
            return self._values[name]
        if self._canonical is not None:
            try:
                key = self._canonical(name)
            except KeyError:
                key = None
            if key is not None and key in self._values:
                return self._values[key]
        raise KeyError(f"{name!r} is not in this cache; it holds: {', '.join(self._values) or 'nothing'}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self[name]
        except KeyError:
            return False
        return True

    def stack(self, names: list[str]) -> torch.Tensor:
        """Stack the tensors of ``names`` along a new leading dimension."""
        return torch.stack([self[n] for n in names])

    def to(self, *args: Any, **kwargs: Any) -> ActivationCache:
        """A copy with every tensor moved/cast with ``Tensor.to(*args, **kwargs)``."""
        moved = {k: v.to(*args, **kwargs) for k, v in self._values.items()}
        mask = self.attention_mask
        if mask is not None and moved:  # follows a device move; keeps its own dtype
            mask = mask.to(next(iter(moved.values())).device)
        return ActivationCache(moved, self._canonical, mask)

    def __repr__(self) -> str:
        body = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._values.items())
        return f"ActivationCache({{{body}}})"
