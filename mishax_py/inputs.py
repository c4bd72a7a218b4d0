"""What studies and runs accept as input, checked once: token ids, text, prompt pairs and metrics.

* Inputs (:data:`Ids`), the ways Hugging Face users pass them:

  - token ids: a LongTensor ``[batch, pos]`` or ``[pos]``, a list of ints, nested lists (one per row,
    of one length), or a numpy array;
  - text: a string or a list of strings, tokenised with ``im.tokenizer`` (the tokenizer given to the
    family's ``instrument(model, tokenizer=...)`` or set on ``im.tokenizer``; else the one
    ``AutoTokenizer.from_pretrained`` loads, offline, from the model's own folder,
    ``model.name_or_path``). Several strings of different lengths are padded by the tokenizer (its
    ``padding_side``) and the padding mask is passed to the model;
  - a tokenizer's output (``BatchEncoding``, or any mapping with ``input_ids``): its ``input_ids`` and
    ``attention_mask`` are used (the mask passed to the model as ``attention_mask=``; a mask of all
    ones changes nothing and is dropped); other keys are ignored.

  :func:`model_inputs` turns any of them into ids and the model's keyword arguments (``im.run``,
  ``run_with_cache``, ``sweep``, ``walk``); :func:`as_ids` into ids alone (a padded input is then an
  error that says to pass ``attention_mask=``); :func:`prompt_pair` into the clean and corrupted
  prompts of the studies. Each refuses degenerate input before any forward, with an error naming the
  problem: an empty batch, a zero-length sequence, rows of different lengths, ids that are not
  integers, and ids outside the vocabulary (``im.family.dims.vocab``; the first offending id with its
  row and position).
* A metric maps logits ``[batch, pos, vocab]`` to one real number: a float, or a tensor of one
  element (0-dim, or ``[1]``). One rule for every study (:func:`metric_value`): non-scalars,
  complex values, booleans and NaN are errors that say what was returned; studies that take
  gradients also require a tensor that depends on the logits.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from mishax_py.devices import input_device

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["TOKENIZER_FILES", "Ids", "Metric", "as_ids", "local_tokenizer", "metric_float", "metric_value",
           "model_inputs", "prompt_pair"]

#: What runs and studies accept as input (module docs): token ids -- a tensor ``[batch, pos]`` or ``[pos]``,
#: (nested) lists of ints --, text (a string or a list of strings), or a tokenizer's output (a
#: ``BatchEncoding`` or any mapping with ``input_ids``).
Ids = torch.Tensor | Sequence[int] | Sequence[Sequence[int]] | str | Sequence[str] | Mapping[str, Any]


class Metric(Protocol):
    """``metric(logits [batch, pos, vocab]) -> scalar``: a float or a one-element tensor (differentiable
    where a study takes gradients: attribution, feature circuits)."""

    def __call__(self, logits: torch.Tensor, /) -> Any: ...


def model_inputs(ids: Ids, im: InstrumentedModel, hf_kwargs: Mapping[str, Any] | None = None
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
    """``ids`` as a checked LongTensor ``[batch, pos]`` on the model's device, and ``hf_kwargs`` with the
    attention mask of text or a tokenizer's output added (module docs).

    Raises ``ValueError`` when the input brings a mask and ``hf_kwargs`` has an ``attention_mask`` too.
    """
    t, mask = _encode(ids, im)
    t = _checked(t, _vocab(im))
    kwargs = dict(hf_kwargs or {})
    device = _device(im)
    if mask is not None and not bool((mask != 0).all()):
        if kwargs.get("attention_mask") is not None:
            raise ValueError("the input carries its own attention_mask (text or a tokenizer's output) and "
                             "attention_mask= was passed too; pass one of them")
        kwargs["attention_mask"] = mask.to(device)
    return (t.to(device) if device is not None else t), kwargs


def as_ids(ids: Ids, model: InstrumentedModel | nn.Module | None = None) -> torch.Tensor:
    """Token ids as a checked LongTensor ``[batch, pos]`` on the model's device (module docs).

    ``model``: the instrumented model (text is tokenised with ``im.tokenizer``; ids are checked against
    ``im.family.dims.vocab``) or a plain ``nn.Module`` (ids are checked against the size of its input
    embeddings, where it has ``get_input_embeddings()``). A padded input (text of several lengths, a
    tokenizer's output with zeros in its mask) is an error here: pass ``attention_mask=`` where the call
    takes it.
    """
    t, mask = _encode(ids, model)
    if mask is not None and not bool((mask != 0).all()):
        raise ValueError(
            f"the input is padded (its attention_mask has zeros, shape {tuple(mask.shape)}), and this call takes "
            "token ids alone; pass the ids with attention_mask=... where the call accepts keyword arguments, or "
            "prompts of one length")
    t = _checked(t, _vocab(model))
    device = _device(model)
    return t.to(device) if device is not None else t


def _device(model: InstrumentedModel | nn.Module | None) -> torch.device | None:
    """Where the ids go: :func:`mishax_py.devices.input_device` (the input embeddings' execution device, not
    ``meta`` when accelerate offloads them); ``None`` without a model."""
    return None if model is None else input_device(model)


def _vocab(model: InstrumentedModel | nn.Module | None) -> tuple[int, str] | None:
    """The vocabulary size ids are checked against, and where it comes from (for messages)."""
    if model is None:
        return None
    if not isinstance(model, nn.Module):
        return int(model.family.dims.vocab), "im.family.dims.vocab"
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    n = getattr(emb, "num_embeddings", None)
    return (int(n), "the model's input embeddings") if isinstance(n, int) else None


def _encode(x: Any, model: InstrumentedModel | nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ids, attention mask or None)`` from any accepted input, not yet checked."""
    if isinstance(x, str) or (isinstance(x, (list, tuple)) and x and all(isinstance(s, str) for s in x)):
        return _tokenise([x] if isinstance(x, str) else list(x), model)
    if isinstance(x, Mapping):
        if "input_ids" not in x:
            raise TypeError(f"a mapping of inputs must hold 'input_ids' (a tokenizer's output), got keys {list(x)}")
        mask = x.get("attention_mask")
        ids = _as_tensor(x["input_ids"])
        if mask is None:
            return ids, None
        m = _as_tensor(mask, "attention_mask")
        if m.ndim == 1:
            m = m[None]
        if m.shape != (ids[None] if ids.ndim == 1 else ids).shape:
            raise ValueError(f"attention_mask of shape {tuple(m.shape)} does not match input_ids of shape "
                             f"{tuple(ids.shape)}")
        return ids, m.long()
    if isinstance(x, (list, tuple)) and any(isinstance(s, str) for s in x):
        raise TypeError("a list of inputs must be all strings (text) or all token ids, got a mix")
    return _as_tensor(x), None


def _as_tensor(x: Any, what: str = "token ids") -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (ValueError, TypeError, RuntimeError) as e:
        if isinstance(x, (list, tuple)) and x and all(isinstance(r, (list, tuple)) for r in x):
            lengths = sorted({len(r) for r in x})
            raise ValueError(
                f"the rows of {what} have different lengths {lengths}; pad them to one length and pass "
                "attention_mask=... (a tokenizer does both: tokenizer(texts, padding=True, return_tensors='pt'))"
            ) from None
        raise TypeError(f"{what} must be a tensor, a list of ints, nested lists of ints, text or a tokenizer's "
                        f"output, got {type(x).__name__} ({e})") from None


def _checked(t: torch.Tensor, vocab: tuple[int, str] | None) -> torch.Tensor:
    """``t`` as ``[batch, pos]`` LongTensor, or an error naming what is wrong with it."""
    if t.numel() == 0:
        if t.ndim <= 1 or t.shape[0] == 0:
            raise ValueError(f"empty batch: no token ids were given (shape {tuple(t.shape)}); pass at least one "
                             "row of at least one token")
        raise ValueError(f"zero-length sequence: token ids of shape {tuple(t.shape)} have no positions; each row "
                         "needs at least one token")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"token ids must be integers, got dtype {t.dtype}")
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise ValueError(f"token ids must have shape [batch, pos] or [pos], got {tuple(t.shape)}")
    if vocab is not None:
        size, source = vocab
        distinct = t
        for d in range(t.ndim):  # an expanded view repeats its values: read each once
            if distinct.stride(d) == 0 and distinct.shape[d] > 1:
                distinct = distinct.narrow(d, 0, 1)
        lo, hi = torch.aminmax(distinct)
        if int(lo) < 0 or int(hi) >= size:
            bad = ((t < 0) | (t >= size)).nonzero()
            row, pos = (int(i) for i in bad[0])
            more = f" ({len(bad)} ids are outside it)" if len(bad) > 1 else ""
            raise ValueError(
                f"token id {int(t[row, pos])} at row {row}, position {pos} is outside the vocabulary of size {size} "
                f"({source}): ids must be in [0, {size}){more}")
    return t.long()


def _tokenise(texts: list[str], model: InstrumentedModel | nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    if model is None or isinstance(model, nn.Module):
        raise ValueError("text input needs the instrumented model (its tokenizer): pass token ids here, or call "
                         "through im.run / the studies")
    tok = model.tokenizer
    if tok is None:
        where = local_tokenizer(model.model)[1] or "none was given"
        raise ValueError(
            f"text input needs a tokenizer, and this model has none ({where}); pass one to the family's "
            "instrument(model, tokenizer=tok), or set im.tokenizer = tok, or pass token ids")
    try:
        enc = tok(texts, return_tensors="pt", padding=len(texts) > 1)
    except ValueError as e:
        raise ValueError(f"tokenising {len(texts)} texts with {type(tok).__name__} failed: {e}; texts of different "
                         "lengths need a tokenizer with a pad token (tok.pad_token = ...)") from e
    ids = torch.as_tensor(enc["input_ids"])
    mask = enc.get("attention_mask")
    return ids, (torch.as_tensor(mask).long() if mask is not None else torch.ones_like(ids))


#: Files of which at least one must be in the model's folder for it to hold a tokenizer (without them,
#: ``AutoTokenizer`` builds an empty one from the model's config, which maps every word to ``<unk>``).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def local_tokenizer(model: nn.Module) -> tuple[Any | None, str]:
    """The tokenizer ``AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True)`` loads -- from the
    model's own folder, or for a hub name from the local cache, never downloading -- and, when there is none,
    ``(None, why)``. A folder must hold one of :data:`TOKENIZER_FILES`."""
    path = str(getattr(model, "name_or_path", "") or "")
    if not path:
        return None, "the model was not loaded from a folder (model.name_or_path is empty)"
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            return None, f"the model's folder {path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)})"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = [try_to_load_from_cache(path, f) for f in ("tokenizer.json", "tokenizer_config.json")]
        except Exception:  # not a valid hub name
            cached = []
        if not any(isinstance(c, str) for c in cached):
            return None, (f"the model's name {path!r} is not a folder, and no tokenizer of that name is in the local "
                          "cache (nothing is downloaded)")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True), ""
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for files it cannot read
        return None, f"no tokenizer could be loaded from {path!r}: {type(e).__name__}: {e}"


def prompt_pair(im: InstrumentedModel, clean_ids: Ids, corrupt_ids: Ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean and corrupted prompts as token-id tensors of one shape ``[batch, pos]``.

    Patching and attribution pair activations position by position, so the shapes must agree;
    otherwise a ``ValueError`` names both shapes. Text and tokenizer outputs are accepted (:func:`as_ids`).
    """
    clean = as_ids(clean_ids, im)
    corrupt = as_ids(corrupt_ids, im)
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
