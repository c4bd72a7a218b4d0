"""One forward pass with raw handlers, and the batch bookkeeping of replicated runs.

Studies that stack several copies ("replicas") of a ``[batch, pos]`` input along the batch
(sweeps, AtP*'s GradDrop, integrated gradients, ``atp-layer``, feature-circuit edges) run
them through :func:`forward_with` and repeat the per-row keyword arguments with
:func:`repeat_rows`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.interventions.base import Interventions
from mishax_py.runtime import Handler, activate

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["forward_with", "repeat_rows"]


def forward_with(
    im: InstrumentedModel,
    ids: torch.Tensor,
    handlers: Iterable[tuple[str, Handler]],
    interventions: Interventions | None = None,
    hf_kwargs: Mapping[str, Any] | None = None,
    *,
    start_layer: int = 0,
) -> torch.Tensor:
    """Logits ``[batch, pos, vocab]`` of one forward: the user's ``interventions`` first, then ``handlers``
    ``(site, handler)`` in order.

    ``start_layer > 0`` skips the decoder layers below it (a handler must then supply that
    layer's ``resid_pre``).
    """
    ctx = im.context(interventions, batch=ids.shape[0], pos=ids.shape[1])
    ctx.start_layer = start_layer
    for name, h in handlers:
        im.add_handler(ctx, name, h)
    with activate(ctx):
        return im.forward(ids, **dict(hf_kwargs or {}))


def repeat_rows(hf_kwargs: Mapping[str, Any], batch: int, reps: int) -> dict[str, Any]:
    """Repeat per-row tensors (first dim ``batch``) ``reps`` times along the batch; pass the rest through."""
    out: dict[str, Any] = {}
    for k, v in hf_kwargs.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == batch and reps > 1:
            out[k] = v.repeat(reps, *([1] * (v.ndim - 1)))
        else:
            out[k] = v
    return out
