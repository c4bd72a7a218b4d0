"""What studies and runs accept as input, checked once: token ids, prompt pairs and metrics.

* Token ids: a LongTensor ``[batch, pos]`` (or ``[pos]``, or nested lists of ints), moved to
  the model's device (:func:`as_ids`); clean and corrupted prompts of one shape
  (:func:`prompt_pair`).
* A metric maps logits ``[batch, pos, vocab]`` to one real number: a float, or a tensor of one
  element (0-dim, or ``[1]``). One rule for every study (:func:`metric_value`): non-scalars,
  complex values, booleans and NaN are errors that say what was returned; studies that take
  gradients also require a tensor that depends on the logits.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["Ids", "Metric", "as_ids", "metric_float", "metric_value", "prompt_pair"]

#: Token ids as studies and runs accept them: a tensor ``[batch, pos]`` or ``[pos]``, or (nested) lists of ints.
Ids = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


class Metric(Protocol):
    """``metric(logits [batch, pos, vocab]) -> scalar``: a float or a one-element tensor (differentiable
    where a study takes gradients: attribution, feature circuits)."""

    def __call__(self, logits: torch.Tensor, /) -> Any: ...


def as_ids(ids: Ids, model: nn.Module | None = None) -> torch.Tensor:
    """Token ids as a LongTensor ``[batch, pos]`` on the model's device."""
    t = torch.as_tensor(ids)
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token ids must be integers, got dtype {t.dtype}")
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise ValueError(f"token ids must have shape [batch, pos] or [pos], got {tuple(t.shape)}")
    if model is not None:
        device = next(model.parameters()).device
        t = t.to(device)
    return t.long()


def prompt_pair(im: InstrumentedModel, clean_ids: Ids, corrupt_ids: Ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean and corrupted prompts as token-id tensors of one shape ``[batch, pos]``.

    Patching and attribution pair activations position by position, so the shapes must agree;
    otherwise a ``ValueError`` names both shapes.
    """
    clean = as_ids(clean_ids, im.model)
    corrupt = as_ids(corrupt_ids, im.model)
    if clean.shape != corrupt.shape:
        raise ValueError(
            f"clean_ids and corrupt_ids must have the same shape [batch, pos] (activations are patched position by "
            f"position), got {tuple(clean.shape)} and {tuple(corrupt.shape)}; pad them to a common length and pass "
            "attention_mask=..."
        )
    return clean, corrupt


def metric_value(out: Any, what: str = "metric(logits)", *, differentiable: bool = False) -> torch.Tensor:
    """``out`` (what a metric returned) as a 0-dim tensor, or a clear error naming ``what``.

    With ``differentiable=True`` (gradient studies) it must be a tensor that depends on the logits.
    """
    if isinstance(out, torch.Tensor):
        if out.numel() != 1:
            raise ValueError(f"{what} must be a scalar (a float or a one-element tensor), got a tensor of shape "
                             f"{tuple(out.shape)}; reduce it, e.g. with .mean() over the batch")
        if out.is_complex() or out.dtype == torch.bool:
            raise TypeError(f"{what} must be a real scalar, got dtype {out.dtype}")
        value = out.reshape(())
    elif isinstance(out, numbers.Real) and not isinstance(out, bool):
        if differentiable:
            raise TypeError(f"{what} must be a scalar torch.Tensor computed from the logits (differentiable), "
                            f"got {type(out).__name__}")
        value = torch.tensor(float(out))
    else:
        raise TypeError(f"{what} must be a scalar (a float or a one-element tensor), got {type(out).__name__}: "
                        f"{out!r}")
    if differentiable and not value.requires_grad:
        raise ValueError(f"{what} does not depend differentiably on the logits (no gradient); compute it with torch "
                         "operations on the logits you are given")
    if math.isnan(float(value.detach())):
        raise ValueError(f"{what} is NaN; check the metric and the logits it was given")
    return value


def metric_float(out: Any, what: str = "metric(logits)") -> float:
    """``out`` as a Python float, by the rule of :func:`metric_value`."""
    return float(metric_value(out, what))
