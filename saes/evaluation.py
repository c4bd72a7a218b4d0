"""Evaluating an SAE or transcoder: L0, FVU, dead features, and the LM loss with it spliced in.

:func:`evaluate` measures L0, the fraction of variance unexplained (FVU) and dead features
on activations, and, given an instrumented model and token ids, the delta LM loss when the
SAE's reconstruction replaces the site (``Splice(sae, keep_error=False)``; a
``TranscoderSplice`` for transcoders).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from saes.base import SAE, Transcoder
from saes.splicing import Splice, TranscoderSplice
from saes.store import ActivationStore

if TYPE_CHECKING:
    from mishax_py import InstrumentedModel

__all__ = ["evaluate", "lm_loss"]


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits [batch, pos, vocab]`` on ``ids [batch, pos]``."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
    )


@torch.no_grad()
def evaluate(
    sae: SAE,
    data: torch.Tensor | ActivationStore | tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    im: InstrumentedModel | None = None,
    ids: torch.Tensor | None = None,
    batch_size: int = 4096,
    site: str | None = None,
) -> dict[str, float]:
    """Evaluate ``sae``.

    Args:
        data: activations ``[n, d_in]`` (or a store) for L0, FVU and dead features; for a
            transcoder a pair ``(x_in [n, d_in], y_out [n, d_out])`` (FVU of ``y_out``).
        im, ids: an instrumented model and token ids ``[batch, pos]`` for the delta LM loss
            (the SAE's output replacing its output site: ``Splice(sae, keep_error=False)``, or a
            ``TranscoderSplice`` for transcoders; minus the clean run).
        site: where to splice a plain SAE (default ``sae.site``).

    Returns:
        ``l0`` (mean active features per token), ``fvu`` (Σ||y - ŷ||² / Σ||y - mean y||², with
        ``y = x`` for SAEs), ``dead_features`` (count never active on ``data``),
        ``dead_fraction``, and with ``im``: ``lm_loss_clean``, ``lm_loss_spliced``, ``delta_lm_loss``.
    """
    out: dict[str, float] = {}
    if data is not None:
        pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]
        if isinstance(data, tuple):
            x_all, y_all = data
            if x_all.shape[0] != y_all.shape[0]:
                raise ValueError(
                    f"evaluate: inputs {tuple(x_all.shape)} and targets {tuple(y_all.shape)} differ in n"
                )
            pairs = (
                (x_all[i : i + batch_size], y_all[i : i + batch_size])
                for i in range(0, x_all.shape[0], batch_size)
            )
        elif isinstance(sae, Transcoder):
            raise ValueError(
                "evaluate(data=...) for a transcoder needs a pair (x_in [n, d_in], y_out [n, d_out])"
            )
        elif isinstance(data, ActivationStore):
            pairs = ((x, x) for x in data.iter_batches(batch_size, shuffle=False))
        else:
            pairs = ((data[i : i + batch_size],) * 2 for i in range(0, data.shape[0], batch_size))
        n = 0
        l0_sum = 0.0
        err_sum = 0.0
        y_sum: torch.Tensor | None = None
        y_sq = 0.0
        fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.device)
        for x, y in pairs:
            x = x.to(device=sae.device, dtype=sae.dtype)
            y = y.to(device=sae.device).float()
            f = sae.encode(x)
            y_hat = sae.decode(f)
            if isinstance(sae, Transcoder):
                skip = sae.skip_term(x)
                y_hat = y_hat if skip is None else y_hat + skip
            active = f != 0
            fired |= active.reshape(-1, sae.d_sae).any(0)
            l0_sum += float(active.sum())
            err_sum += float((y - y_hat.float()).pow(2).sum())
            ys = y.reshape(-1, y.shape[-1]).sum(0)
            y_sum = ys if y_sum is None else y_sum + ys
            y_sq += float(y.pow(2).sum())
            n += active.reshape(-1, sae.d_sae).shape[0]
        if n:
            assert y_sum is not None
            total_var = y_sq - float(y_sum.pow(2).sum()) / n
            out["l0"] = l0_sum / n
            out["fvu"] = err_sum / max(total_var, 1e-30)
            out["dead_features"] = float((~fired).sum())
            out["dead_fraction"] = out["dead_features"] / sae.d_sae
    if im is not None:
        if ids is None:
            raise ValueError("evaluate(im=...) needs ids for the delta LM loss")
        clean = lm_loss(im.run(ids), ids)
        if isinstance(sae, Transcoder):
            splice = TranscoderSplice(sae, keep_error=False, record=False).interventions()
        else:
            where = site or sae.site
            if where is None:
                raise ValueError("the SAE has no site; pass site=")
            splice = {where: Splice(sae, keep_error=False, record=False)}
        spliced = lm_loss(im.run(ids, interventions=splice), ids)
        out["lm_loss_clean"] = float(clean)
        out["lm_loss_spliced"] = float(spliced)
        out["delta_lm_loss"] = float(spliced - clean)
    return out
