"""The QK fix of AtP* (Kramár et al. 2024): exact attention-softmax effects for query, key and score nodes.

Plain AtP linearises through the attention softmax, which misses large effects when the
pattern is saturated. For a node that acts on the scores -- a query row, a key column, or the
scores themselves -- the fix recomputes the new scores of the patched run exactly (``ScoreFn``:
the layer's scale and soft-cap, from ``im.family.attention(layer)``, applied to the cached
rotated queries and keys), takes the softmax exactly, and linearises only *after* the pattern: the estimate is
``sum G * (softmax(S + delta) - softmax(S))`` with ``G = d metric / d pattern`` on the target run.
``qk_fix_layer`` does this for one layer, in head chunks whose float64 temporaries stay below
``MAX_CHUNK_ELEMENTS``; :mod:`mishax_py.studies.attribution.atp` calls it for ``method="atp*"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mishax_py.family import AttentionSpec

__all__ = ["MAX_CHUNK_ELEMENTS", "ScoreFn", "check_scores", "key_effect", "qk_fix_layer"]

# elements of one chunk of the QK-fix temporaries (float64) -- 2**25 * 8 B = 256 MiB each
MAX_CHUNK_ELEMENTS = 2**25


class ScoreFn:
    """``scores = softcap * tanh(scale * q.k / softcap)`` (or ``scale * q.k``) of one layer's attention.

    Built from the layer's :class:`~mishax_py.family.AttentionSpec` (``im.family.attention(layer)``),
    so each layer's QK fix uses that layer's scale and soft-cap.
    """

    def __init__(self, spec: AttentionSpec) -> None:
        self.scale = float(spec.scale)
        self.softcap = float(spec.softcap) if spec.softcap else None

    def __call__(self, dots: torch.Tensor) -> torch.Tensor:
        s = dots * self.scale
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        return s


def _dots(q: torch.Tensor, k: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``q [b, q, h, d]``, ``k [b, k, hkv, d]`` -> ``[b, h, q, k]`` (float64), query head h uses kv head h // n_rep."""
    k = k.repeat_interleave(n_rep, dim=2)
    return torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double())


def _masked(scores: torch.Tensor) -> torch.Tensor:
    return scores <= torch.finfo(scores.dtype).min / 2


def check_scores(score_fn: ScoreFn, site: str, q: torch.Tensor, k: torch.Tensor, scores: torch.Tensor,
                 n_rep: int) -> None:
    """Raise a ``ValueError`` unless ``score_fn`` reproduces the cached ``scores`` ``[b, h, q, k]`` of ``site``
    from its rotated queries ``q [b, q, h, d]`` and keys ``k [b, k, h_kv, d]`` (masked entries ignored)."""
    rec = score_fn(_dots(q, k, n_rep))
    keep = ~_masked(scores)
    err = (rec - scores.double()).abs()[keep]
    tol = (1e-3 if scores.dtype == torch.float32 else 5e-2) * (1 + scores.double().abs()[keep])
    if err.numel() and bool((err > tol).any()):
        raise ValueError(
            f"QK fix: cannot reproduce {site} from the cached rotated queries/keys (max error "
            f"{float(err.max()):.3g}); this model's attention scores are not softcap*tanh(scale*q.k/softcap). "
            "Use qk_fix=False."
        )


def _row_replace_effect(S: torch.Tensor, delta: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Exact pattern change when every score moves by ``delta``: ``sum_k G (softmax(S+delta) - softmax(S))``.

    ``S``, ``delta``, ``G``: ``[b, h, q, k]``; returns ``[b, h, q]`` (float64).
    """
    S = S.double()
    masked = _masked(S)
    S = S.masked_fill(masked, -math.inf)
    A = torch.softmax(S, -1)
    A2 = torch.softmax(S + delta.masked_fill(masked, 0.0), -1)
    A = torch.nan_to_num(A)  # fully masked rows (never in causal attention) -> 0
    A2 = torch.nan_to_num(A2)
    return (G.double() * (A2 - A)).sum(-1)


def key_effect(S: torch.Tensor, delta: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Per key ``t``, the exact pattern change from moving column ``t`` of each row by ``delta[..., t]``.

    Returns ``E [b, h, q, k]`` with ``E[.., s, t] = sum_j G[s, j] (A'_j - A_j)`` where ``A'`` is
    row ``s``'s softmax with only score ``t`` moved. Closed form: for ``j != t``
    ``A'_j = A_j / Z`` and ``A'_t = A_t e^delta / Z`` with ``Z = rest_t + A_t e^delta`` and
    ``rest_t = sum_{j != t} A_j``; ``rest_t`` and ``sum_{j != t} G_j A_j`` are exclusive
    prefix + suffix sums, so a saturated row (``A_t`` ~ 1) keeps its tiny other
    probabilities exactly (float64).
    """
    S = S.double()
    masked = _masked(S)
    A = torch.nan_to_num(torch.softmax(S.masked_fill(masked, -math.inf), -1))
    G = G.double()
    delta = delta.masked_fill(masked, 0.0).clamp(max=700.0)

    def excl(x: torch.Tensor) -> torch.Tensor:
        # sums of the earlier / later terms only (never total - x_t, which cancels when x_t dominates)
        pre = torch.cat([torch.zeros_like(x[..., :1]), torch.cumsum(x, -1)[..., :-1]], -1)
        suf = torch.flip(torch.cat([torch.zeros_like(x[..., :1]), torch.cumsum(torch.flip(x, [-1]), -1)[..., :-1]],
                                   -1), [-1])
        return pre + suf

    rest = excl(A)
    ga_rest = excl(G * A)
    at_new = A * torch.exp(delta)
    Z = rest + at_new
    Z = torch.where(Z > 0, Z, torch.ones_like(Z))
    return ga_rest * (1.0 / Z - 1.0) + G * (at_new / Z - A)


def qk_fix_layer(
    kind: str,
    by: str,
    score_fn: ScoreFn | None,
    n_rep: int,
    tgt: Mapping[str, torch.Tensor],
    src: Mapping[str, torch.Tensor],
    G: torch.Tensor,
    pos_mask: torch.Tensor,
) -> torch.Tensor:
    """QK-fixed estimate for one layer. ``kind``: ``"q"``, ``"k"`` or ``"scores"``.

    ``tgt``/``src`` hold ``rot_q``, ``rot_k``, ``scores`` of the target/source run; ``G`` is
    d metric / d pattern on the target run ``[b, h, q, k]``; only the queries (score rows)
    or keys (columns) at ``pos_mask`` are patched. ``score_fn`` (the layer's) is needed for
    ``"q"``/``"k"``; ``n_rep`` query heads share one key/value head.

    Returns ``[]`` (``by="layer"``), ``[heads]``, ``[heads, pos]`` or ``[pos]``.
    """
    if kind != "scores" and score_fn is None:
        raise ValueError(f"the QK fix of {kind!r} nodes needs the layer's ScoreFn")
    S = tgt["scores"]
    rows = pos_mask.to(S.device).double().view(-1, 1)  # the layer's device (a model split over devices)
    cols = rows.view(1, -1)
    b, h, nq, nk = S.shape
    # head chunks bounding the float64 temporaries
    per_head = max(1, b * nq * nk)
    chunk = max(1, min(h, MAX_CHUNK_ELEMENTS // per_head))
    if kind == "k":  # keep whole kv groups together
        chunk = max(n_rep, (chunk // n_rep) * n_rep)
    parts = []
    for h0 in range(0, h, chunk):
        hs = slice(h0, min(h, h0 + chunk))
        S_c, G_c = S[:, hs], G[:, hs]
        if kind == "scores":
            delta = src["scores"][:, hs].double() - S_c.double()
            masked = _masked(S_c) | _masked(src["scores"][:, hs])
            delta = delta.masked_fill(masked, 0.0) * rows
            parts.append(_row_replace_effect(S_c, delta, G_c))  # [b, h, q]
            continue
        q_t = tgt["rot_q"][:, :, hs]
        kv = slice(h0 // n_rep, (hs.stop + n_rep - 1) // n_rep)
        k_t = tgt["rot_k"][:, :, kv]
        assert score_fn is not None  # checked above
        old = score_fn(_dots(q_t, k_t, n_rep))
        if kind == "q":
            new = score_fn(_dots(src["rot_q"][:, :, hs], k_t, n_rep))
            parts.append(_row_replace_effect(S_c, (new - old) * rows, G_c))  # [b, h, q]
        else:
            new = score_fn(_dots(q_t, src["rot_k"][:, :, kv], n_rep))
            if by in ("head", "layer"):
                parts.append(_row_replace_effect(S_c, (new - old) * cols, G_c))  # keys together: [b, h, q]
            else:
                parts.append(key_effect(S_c, new - old, G_c).sum(2))  # per key t: [b, h, k]
    E = torch.cat(parts, 1)  # [b, h, pos]
    if by == "layer":
        return E.sum()
    if kind == "k":
        E = E.reshape(b, h // n_rep, n_rep, -1).sum(2)  # query heads -> their kv head
    if by == "head":
        return E.sum((0, 2))
    if by == "head_pos":
        return E.sum(0)
    return E.sum((0, 1))  # pos
