"""What an intervention is: the :class:`Intervention` base, :class:`Hook` for plain functions, and the
``{site: intervention}`` mapping every run accepts (:data:`Interventions`).

An intervention is a callable ``(value, event) -> Tensor`` registered on a site; it receives the
site's value in the site's canonical layout (see the site catalogue) and returns the value the
model continues with. A list of interventions at one site composes: each receives the previous
one's output.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence

import torch

from mishax_py.runtime import SiteEvent

__all__ = ["Hook", "Intervention", "InterventionLike", "Interventions", "as_intervention_list"]


class Intervention:
    """Base class of all interventions.

    Subclasses implement :meth:`apply`. :meth:`check` is called once per site before
    the run starts, with the site's expected shape (``None`` where unknown), so bad
    input fails before any forward pass with an error naming the site and shapes.
    """

    def apply(self, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        raise NotImplementedError

    def check(self, site: str, shape: tuple[int | None, ...] | None) -> None:
        """Validate this intervention for ``site`` before the run (default: nothing to check)."""

    def __call__(self, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        return self.apply(value, event)


class Hook(Intervention):
    """A user function at a site: ``fn(value)`` or ``fn(value, event)``.

    ``fn`` gets the :class:`~mishax_py.runtime.SiteEvent` when it takes two positional
    parameters without defaults (or ``*args``); parameters with defaults do not count.
    ``fn`` returns the replacement value, or ``None`` to leave the value unchanged
    (useful for reading values, or for in-place edits you take responsibility for). The replacement
    must have the value's dtype and shape: another dtype is a ``TypeError`` naming the site and both
    dtypes (the model would otherwise fail later in an unrelated matmul, or silently compute in it).
    """

    def __init__(self, fn: Callable[..., torch.Tensor | None]) -> None:
        self.fn = fn
        self._wants_event = _accepts_two_args(fn)

    def apply(self, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        out = self.fn(value, event) if self._wants_event else self.fn(value)
        if out is None:
            return value
        if isinstance(out, torch.Tensor) and out.dtype != value.dtype:
            raise TypeError(
                f"{self!r} at site {event.site!r} returned dtype {out.dtype}, but the site's value has dtype "
                f"{value.dtype} (shape {tuple(value.shape)}); return the site's dtype, e.g. out.to(value.dtype)")
        return out

    def __repr__(self) -> str:
        return f"Hook({getattr(self.fn, '__qualname__', self.fn)!r})"


def _accepts_two_args(fn: Callable[..., object]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without signatures: assume fn(value)
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    # Only parameters without defaults count: `fn(v, src=cache, pos=3)` (defaults used to bind
    # loop variables) is a one-argument hook.
    required = [
        p for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is inspect.Parameter.empty
    ]
    return len(required) >= 2


#: One intervention, or a plain function (wrapped in a :class:`Hook`).
InterventionLike = Intervention | Callable[..., torch.Tensor | None]
#: ``{site name, alias or glob: one intervention or a list applied in order}``: what every run accepts.
Interventions = Mapping[str, InterventionLike | Sequence[InterventionLike]]


def as_intervention_list(value: InterventionLike | Sequence[InterventionLike]) -> list[Intervention]:
    """Normalise one intervention, a plain function, or a list of them, to a list of Interventions."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out: list[Intervention] = []
    for item in items:
        if isinstance(item, Intervention):
            out.append(item)
        elif callable(item):
            out.append(Hook(item))
        else:
            raise TypeError(f"expected an Intervention or a function, got {type(item).__name__}: {item!r}")
    return out
