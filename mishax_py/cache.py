"""ActivationCache: the values recorded by ``run_with_cache``, looked up by name or alias."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["ActivationCache", "DeviceStore"]


class DeviceStore(dict[str, torch.Tensor]):
    """The store of a run that caches on another device (``run_with_cache(..., cache_device=)``).

    Every value is moved to ``device`` as it is recorded (``store[name] = value`` in the runtime), so a long
    cache of a big model fills host memory instead of the accelerator's: the accelerator holds each value
    only as long as the forward itself needs it. A CUDA -> CPU copy is issued with ``non_blocking=True``
    (the destination is then pinned memory and the copy overlaps the rest of the forward); :meth:`finish`
    waits for those copies before anyone reads the values. Other moves are plain blocking ``.to`` calls (a
    non-blocking copy out of pageable host memory would not overlap anything). A run without
    ``cache_device`` records into a plain ``dict``: this class costs it nothing.
    """

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)
        self._async: set[torch.device] = set()  # CUDA devices with non-blocking copies in flight

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        src = value.device
        if src != self.device:
            non_blocking = src.type == "cuda" and self.device.type == "cpu"
            if non_blocking:
                self._async.add(src)
            value = value.to(self.device, non_blocking=non_blocking)
        super().__setitem__(name, value)

    def finish(self) -> None:
        """Wait for the non-blocking copies (their values are not valid before); nothing to do on the CPU."""
        for device in self._async:
            torch.cuda.synchronize(device)
        self._async.clear()


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
