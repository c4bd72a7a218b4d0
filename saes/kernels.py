"""Compute kernels for SAE encode and decode (CPU and GPU via plain torch ops).

Encode is one GEMM (``addmm``: the bias add fused into the matmul call) followed by the
activation. For JumpReLU the threshold and the ReLU are one ``torch.where(pre > max(θ, 0),
pre, 0)`` instead of the textbook ``(pre > θ) * relu(pre)`` (a compare, a ReLU, a cast and a
multiply, each a pass over ``[tokens, d_sae]``): benchmarks/saes.py measures the
activation step ~5x faster on CPU. Both are equal element for element: ``pre > max(θ, 0)``
holds exactly when ``pre > θ`` and ``pre > 0``.

Decode chooses between

* dense: ``f @ W_dec + b_dec`` (one GEMM over all ``d_sae`` features), and
* sparse: gather-and-sum of the decoder rows of the active features
  (``torch.nn.functional.embedding_bag`` with ``per_sample_weights``, mode
  ``"sum"``), whose cost scales with the number of active features,

by the measured density of ``f`` (fraction of non-zero entries); when ``f`` requires
gradients the dense path is used, since the gather only differentiates non-zero entries.
:data:`SPARSE_DECODE_MAX_DENSITY` is the crossover measured by
``benchmarks/saes.py`` on the development CPU (see the docstring there); below it
the sparse path wins. All paths work in float32, bfloat16 and float16. The dense path is
fully differentiable; the sparse path differentiates ``W_dec``, ``b_dec`` and the non-zero
entries of ``f``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "SPARSE_DECODE_MAX_DENSITY",
    "auto_decode_mode",
    "decode",
    "decode_dense",
    "decode_sparse",
    "density",
    "encode_pre",
    "is_cpu_half",
    "jumprelu",
    "jumprelu_encode",
    "topk_activation",
]

# Fraction of non-zero features below which the sparse (gather) decode is used.
# Measured by benchmarks/saes.py (decode density sweep) on the 2-core AMD EPYC (AVX2) dev
# machine, 1 thread, fp32, d_sae 16384, d_in 2304, 256 tokens: dense/sparse time ratio
# 10.9x at 0.5% density, 5.9x at 1%, 2.8x at 2%, 1.7x at 4%, 0.7x at 8% (crossover ~5%).
# 2% keeps a margin for machines with faster GEMMs (more threads, AMX); Gemma Scope's
# L0 ~70 of 16384 is 0.4%.
SPARSE_DECODE_MAX_DENSITY: float = 0.02


def _as_2d(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Flatten leading dims: ``[..., d] -> [N, d]``; returns the leading shape too."""
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, x.shape[-1]), lead


def encode_pre(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    """Pre-activations ``x @ W_enc + b_enc`` as one GEMM.

    Args:
        x: ``[..., d_in]`` (any dtype; cast to ``W_enc.dtype``).
        W_enc: ``[d_in, d_sae]``.
        b_enc: ``[d_sae]``.

    Returns:
        ``[..., d_sae]`` in ``W_enc.dtype``.
    """
    x2, lead = _as_2d(x.to(W_enc.dtype))
    pre = torch.addmm(b_enc, x2, W_enc)
    return pre.reshape(*lead, W_enc.shape[1])


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Gemma Scope JumpReLU ``(pre > threshold) * relu(pre)``.

    Args:
        pre: ``[..., d_sae]`` pre-activations.
        threshold: ``[d_sae]``.
        inplace: overwrite ``pre`` (only when nothing needs ``pre`` for autograd).

    Returns:
        ``[..., d_sae]`` features, exactly equal to the textbook formula.
    """
    thr = threshold.clamp(min=0).to(pre.dtype)
    if inplace and not pre.requires_grad:
        return pre.mul_(pre > thr)
    return torch.where(pre > thr, pre, 0.0)


def jumprelu_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor
) -> torch.Tensor:
    """JumpReLU features of ``x``: ``[..., d_in] -> [..., d_sae]`` (GEMM + in-place threshold)."""
    return jumprelu(encode_pre(x, W_enc, b_enc), threshold)


def topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest pre-activations per token (then ReLU), zero the rest.

    Args:
        pre: ``[..., d_sae]``.
        k: number of features kept per token.

    Returns:
        ``[..., d_sae]`` with at most ``k`` non-zeros per token.
    """
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def decode_dense(f: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """Dense decode ``f @ W_dec + b_dec``: ``[..., d_sae] -> [..., d_out]``."""
    f2, lead = _as_2d(f.to(W_dec.dtype))
    return torch.addmm(b_dec, f2, W_dec).reshape(*lead, W_dec.shape[1])


def decode_sparse(f: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """Sparse decode: sum of the active decoder rows weighted by their activations.

    ``out[n] = b_dec + sum_{i: f[n, i] != 0} f[n, i] * W_dec[i]`` via ``embedding_bag``.

    Args:
        f: ``[..., d_sae]`` features.
        W_dec: ``[d_sae, d_out]``.
        b_dec: ``[d_out]``.

    Returns:
        ``[..., d_out]`` in ``W_dec.dtype``.
    """
    f2, lead = _as_2d(f.to(W_dec.dtype))
    n, d_sae = f2.shape
    flat = f2.reshape(-1)
    idx = flat.nonzero().squeeze(1)  # row-major: sorted by token
    rows = idx.div(d_sae, rounding_mode="floor")
    cols = idx - rows * d_sae
    weights = flat.index_select(0, idx)
    offsets = torch.searchsorted(rows, torch.arange(n, device=f2.device))
    out = F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=weights)
    return (out + b_dec).reshape(*lead, W_dec.shape[1])


def density(f: torch.Tensor) -> float:
    """Fraction of non-zero entries of ``f``."""
    return float(torch.count_nonzero(f)) / max(f.numel(), 1)


def auto_decode_mode(f: torch.Tensor, max_density: float | None = None) -> str:
    """``"sparse"`` or ``"dense"``: the decode path ``mode="auto"`` takes for features ``f`` ``[..., d_sae]``.

    Dense when ``f`` needs gradients (the gather only differentiates the non-zero entries of
    ``f``; the true gradient ``g @ W_dec^T`` is dense), else sparse at a measured density of
    at most ``max_density`` (default :data:`SPARSE_DECODE_MAX_DENSITY`).
    """
    if torch.is_grad_enabled() and f.requires_grad:
        return "dense"
    limit = SPARSE_DECODE_MAX_DENSITY if max_density is None else max_density
    return "sparse" if f.numel() and density(f) <= limit else "dense"


def is_cpu_half(t: torch.Tensor) -> bool:
    """``t`` is a bfloat16/float16 CPU tensor: its GEMMs run much faster upcast to fp32 (benchmarks/saes.py)."""
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def decode(
    f: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    *,
    mode: str = "auto",
    max_density: float | None = None,
) -> torch.Tensor:
    """Decode ``f`` (``[..., d_sae]``) to ``[..., d_out]``, sparse or dense.

    Args:
        mode: ``"auto"`` (by measured density), ``"sparse"`` or ``"dense"``.
        max_density: override :data:`SPARSE_DECODE_MAX_DENSITY` for ``"auto"``.
    """
    if mode == "dense":
        return decode_dense(f, W_dec, b_dec)
    if mode == "sparse":
        return decode_sparse(f, W_dec, b_dec)
    if mode != "auto":
        raise ValueError(f"decode mode must be 'auto', 'sparse' or 'dense', got {mode!r}")
    return decode(f, W_dec, b_dec, mode=auto_decode_mode(f, max_density))
