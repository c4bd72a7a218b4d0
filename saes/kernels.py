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

Backends
--------
Every encode, decode and splice of :mod:`saes` (``SAE.encode``/``decode``, ``Splice``,
``TranscoderSplice``, training, and so feature circuits and attribution graphs, which call
those methods) goes through this module, which runs it with one of two backends:

* ``"torch"``: the functions above (plain torch; cuBLAS GEMMs on CUDA);
* ``"triton"``: the kernels of :mod:`saes.triton_kernels` (optional extra ``mishax-py[gpu]``):
  a fused GEMM + JumpReLU/ReLU encode into sparse rows (:class:`SparseFeatures`) that never
  writes the dense pre-activation, a sparse gather-sum decode with its backward, and a fused
  splice (reconstruction, error and feature edits in one pass over the active set).

``"auto"`` (the default) takes Triton for CUDA tensors when ``triton`` is installed and torch
elsewhere, so nothing changes on CPU. ``with saes.kernels.backend("triton"):`` (or ``"torch"``,
``"auto"``) forces one for the block; the environment variable ``MISHAX_PY_SAE_KERNELS`` sets
the default. Asking for Triton where it cannot run -- ``triton`` not installed, or CPU tensors
in a process not started with ``TRITON_INTERPRET=1`` (Triton's interpreter, how CI checks the
kernels without a GPU; it must be set before ``import torch``, which imports ``triton``) --
raises :class:`KernelBackendError` naming the reason.

What stays torch on both backends, and why: TopK encoders (a per-row top-k needs the whole
pre-activation row: cuBLAS GEMM + ``torch.topk``); dense decodes (``auto`` at high density
or when ``f`` needs its dense gradient: a GEMM, where cuBLAS is the fast path); the JumpReLU
training step (its threshold's straight-through gradient needs ``dL/df`` at inactive features
within ``ε/2`` of the threshold, i.e. the dense ``g @ W_dec^T``, so training keeps the dense
decoder GEMM; the rectangle-kernel pseudo-derivatives are elementwise passes that a Triton
kernel could fuse, but no GPU was available to show one beats torch, so none ships).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "EditTable",
    "KernelBackendError",
    "SPARSE_DECODE_MAX_DENSITY",
    "SparseFeatures",
    "auto_decode_mode",
    "backend",
    "decode",
    "decode_rows",
    "decode_dense",
    "decode_sparse",
    "density",
    "encode_pre",
    "encode_sparse",
    "is_cpu_half",
    "jumprelu",
    "jumprelu_encode",
    "linear",
    "requested_backend",
    "resolve_backend",
    "splice_rows",
    "topk_activation",
    "topk_decode",
    "triton_interpreting",
    "triton_unavailable",
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

    ``out[n] = b_dec + sum_{i: f[n, i] != 0} f[n, i] * W_dec[i]`` via ``embedding_bag`` (torch
    backend) or the Triton gather-sum kernel (:func:`decode_rows`).

    Args:
        f: ``[..., d_sae]`` features.
        W_dec: ``[d_sae, d_out]``.
        b_dec: ``[d_out]``.

    Returns:
        ``[..., d_out]`` in ``W_dec.dtype``.
    """
    f2, lead = _as_2d(f.to(W_dec.dtype))
    if resolve_backend(W_dec.device) == "triton":
        return decode_rows(SparseFeatures.from_dense(f2), W_dec, b_dec).reshape(*lead, W_dec.shape[1])
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


# ------------------------------------------------------------------------------ backends
#: the backend names ``backend()`` and ``MISHAX_PY_SAE_KERNELS`` accept.
BACKENDS = ("auto", "torch", "triton")
#: the environment variable that sets the default backend.
BACKEND_ENV = "MISHAX_PY_SAE_KERNELS"

_FORCED: ContextVar[str | None] = ContextVar("saes_kernels_backend", default=None)


class KernelBackendError(RuntimeError):
    """The Triton backend was asked for where it cannot run (the message says why)."""


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"{where}: SAE kernel backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name.strip().lower()


@contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the block's SAE kernels with backend ``name`` (``"triton"``, ``"torch"`` or ``"auto"``).

    Per thread / async task (a ``ContextVar``); overrides ``MISHAX_PY_SAE_KERNELS``. Forcing
    ``"triton"`` is checked when a kernel runs, on that kernel's device.
    """
    token = _FORCED.set(_check_name(name, "saes.kernels.backend()"))
    try:
        yield
    finally:
        _FORCED.reset(token)


def requested_backend() -> str:
    """The backend asked for: the innermost :func:`backend` block, else ``MISHAX_PY_SAE_KERNELS``, else ``"auto"``."""
    forced = _FORCED.get()
    if forced is not None:
        return forced
    env = os.environ.get(BACKEND_ENV, "").strip()
    return _check_name(env, f"environment variable {BACKEND_ENV}") if env else "auto"


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_unavailable(device: torch.device | str) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (``None`` when they can).

    They run on CUDA tensors (compiled) and, with ``TRITON_INTERPRET=1``, on CPU tensors in
    Triton's interpreter (slow: for tests).
    """
    dev = torch.device(device)
    if not _triton_installed():
        return "the triton package is not installed (pip install 'mishax-py[gpu]')"
    if dev.type == "cuda":
        return None
    if dev.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "") != "1":
            return "tensors are on the CPU and TRITON_INTERPRET=1 is not set (Triton compiles for CUDA devices only)"
        if not triton_interpreting():
            return (
                "TRITON_INTERPRET=1 was set after triton was imported (import torch imports it): set it in the "
                "environment before the process starts"
            )
        return None
    return f"Triton kernels run on CUDA tensors, got device {dev}"


def triton_interpreting() -> bool:
    """Whether ``triton`` was imported in interpreter mode (``TRITON_INTERPRET=1`` set before its import)."""
    import triton.language as tl

    return type(tl.sum).__name__ == "InterpretedFunction"


def resolve_backend(device: torch.device | str) -> str:
    """``"triton"`` or ``"torch"``: what a kernel on ``device`` runs with now.

    ``"auto"`` takes Triton on CUDA when it is installed, torch elsewhere.

    Raises:
        KernelBackendError: ``"triton"`` forced where it cannot run (:func:`triton_unavailable`).
    """
    asked = requested_backend()
    if asked == "torch":
        return "torch"
    dev = torch.device(device)
    if asked == "auto":
        return "triton" if dev.type == "cuda" and _triton_installed() else "torch"
    why = triton_unavailable(dev)
    if why is not None:
        how = "saes.kernels.backend('triton')" if _FORCED.get() else f"{BACKEND_ENV}=triton"
        raise KernelBackendError(f"SAE kernel backend 'triton' ({how}) cannot run on device {dev}: {why}")
    return "triton"


def _tk() -> ModuleType:
    """:mod:`saes.triton_kernels` (imported on first use: it needs ``triton``)."""
    return importlib.import_module("saes.triton_kernels")


# ------------------------------------------------------------------------- sparse rows
@dataclass
class SparseFeatures:
    """Features of ``N`` token rows in padded sparse form.

    Attributes:
        indices: ``[N, cap]`` int64 feature ids, ascending within a row.
        values: ``[N, cap]`` activations (the SAE's dtype).
        counts: ``[N]`` int32, active entries per row; entries ``j >= counts[n]`` are padding
            (id 0, value 0).
        d_sae: number of features.
    """

    indices: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor
    d_sae: int

    @property
    def valid(self) -> torch.Tensor:
        """``[N, cap]`` bool: which entries are real (not padding)."""
        slots = torch.arange(self.indices.shape[1], device=self.indices.device)
        return slots[None, :] < self.counts[:, None]

    def to_dense(self) -> torch.Tensor:
        """``[N, d_sae]`` features (differentiable in ``values``)."""
        valid = self.valid
        n = self.indices.shape[0]
        out = torch.zeros(n, self.d_sae + 1, dtype=self.values.dtype, device=self.values.device)
        cols = torch.where(valid, self.indices, self.d_sae)
        return out.scatter(1, cols, torch.where(valid, self.values, 0))[:, : self.d_sae]

    @classmethod
    def from_dense(cls, f: torch.Tensor) -> SparseFeatures:
        """The non-zero entries of ``f`` ``[N, d_sae]`` (values gathered: differentiable in ``f``)."""
        n, d_sae = f.shape
        nz = f != 0
        counts = nz.sum(1, dtype=torch.int32)
        cap = max(int(counts.max()) if n else 0, 1)
        # ascending ids of the non-zero entries first: sort the keys (id if non-zero, else d_sae + id)
        cols = torch.arange(d_sae, device=f.device)
        key = torch.where(nz, cols, cols + d_sae)
        idx = key.topk(cap, dim=1, largest=False, sorted=True).indices if d_sae else key[:, :0]
        valid = torch.arange(cap, device=f.device)[None, :] < counts[:, None]
        idx = torch.where(valid, idx, 0)
        vals = torch.where(valid, f.gather(1, idx), 0)
        return cls(idx, vals, counts, d_sae)


def linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W (+ b)`` ``[N, d_in] -> [N, d_out]``; CPU half-precision GEMMs run in fp32 (much faster without
    native bf16/fp16 matmul units; benchmarks/saes.py) and are cast back."""
    if is_cpu_half(W):
        out = x.float() @ W.float() if b is None else encode_pre(x.float(), W.float(), b.float())
        return out.to(W.dtype)
    return x @ W if b is None else encode_pre(x, W, b)


class _TritonEncode(torch.autograd.Function):
    """Fused encode (Triton) with the exact torch backward of ``act(x @ W_enc + b_enc)`` (dense GEMMs)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor | None,
        cap: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx, val, cnt = _tk().encode_threshold(x, W_enc, b_enc, threshold, cap=cap)
        ctx.save_for_backward(x, W_enc, idx, cnt)
        ctx.mark_non_differentiable(idx, cnt)
        return idx, val, cnt

    @staticmethod
    def backward(ctx: Any, g_idx: Any, g_val: torch.Tensor, g_cnt: Any) -> tuple[Any, ...]:
        x, W_enc, idx, cnt = ctx.saved_tensors
        g_pre = SparseFeatures(idx, g_val, cnt, W_enc.shape[1]).to_dense()  # d act/d pre = 1 on active entries
        gx = g_pre @ W_enc.T if ctx.needs_input_grad[0] else None
        gw = x.T @ g_pre if ctx.needs_input_grad[1] else None
        gb = g_pre.sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


def encode_sparse(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    *,
    activation: str,
    threshold: torch.Tensor | None = None,
    k: int | None = None,
    cap: int | None = None,
) -> SparseFeatures:
    """Active features of ``x`` ``[N, d_in]`` as :class:`SparseFeatures`, by the current backend.

    ``activation``: ``"jumprelu"`` (needs ``threshold``), ``"relu"`` or ``"topk"`` (needs ``k``).
    Triton fuses the GEMM and the JumpReLU/ReLU threshold (``cap``: initial slots per row,
    default 256, grown when a row has more); TopK and the torch backend compute the dense
    pre-activation (``linear``) and select from it. Differentiable in ``x``, ``W_enc`` and ``b_enc``
    (the threshold gets no gradient, as with :func:`jumprelu`).
    """
    if activation not in ("jumprelu", "relu", "topk"):
        raise ValueError(f"activation must be 'jumprelu', 'relu' or 'topk', got {activation!r}")
    if activation == "jumprelu" and threshold is None:
        raise ValueError("a JumpReLU encode needs threshold=")
    d_sae = W_enc.shape[1]
    x = x.to(W_enc.dtype)
    if activation == "topk":
        if k is None or not 0 < k <= d_sae:
            raise ValueError(f"a TopK encode needs 0 < k <= d_sae={d_sae}, got k={k}")
        vals, idx = linear(x, W_enc, b_enc).topk(k, dim=-1, sorted=False)
        idx, order = idx.sort(dim=-1)
        counts = torch.full((x.shape[0],), k, dtype=torch.int32, device=x.device)
        return SparseFeatures(idx, vals.gather(-1, order).relu(), counts, d_sae)
    if resolve_backend(W_enc.device) == "triton":
        thr = threshold if activation == "jumprelu" else None
        idx, val, cnt = _TritonEncode.apply(x, W_enc, b_enc, thr, 256 if cap is None else cap)
        return SparseFeatures(idx, val, cnt, d_sae)
    pre = linear(x, W_enc, b_enc)
    f = jumprelu(pre, threshold) if activation == "jumprelu" else torch.relu(pre)  # type: ignore[arg-type]
    return SparseFeatures.from_dense(f)


class _TritonDecode(torch.autograd.Function):
    """:func:`saes.triton_kernels.decode_rows` with its Triton backward (active values, ``W_dec``) and ``b_dec``."""

    @staticmethod
    def forward(
        ctx: Any, idx: torch.Tensor, val: torch.Tensor, cnt: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(idx, val, cnt, W_dec)
        return _tk().decode_rows(idx, val.to(W_dec.dtype), cnt, W_dec, b_dec)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        idx, val, cnt, W_dec = ctx.saved_tensors
        want_v, want_w = bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[3])
        gv, gw = _tk().decode_rows_backward(
            idx, val.to(W_dec.dtype), cnt, W_dec, g.contiguous(), want_values=want_v, want_weight=want_w
        )
        gb = g.sum(0).to(W_dec.dtype) if ctx.needs_input_grad[4] else None
        return None, (None if gv is None else gv.to(val.dtype)), None, gw, gb


def decode_rows(sparse: SparseFeatures, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``b_dec + sum_j values[n, j] W_dec[indices[n, j]]``: ``[N, d_out]`` in ``W_dec.dtype``, by the current backend.

    Differentiable in the active values, ``W_dec`` and ``b_dec`` (torch: ``embedding_bag``;
    Triton: the gather-sum kernel and its backward).
    """
    if resolve_backend(W_dec.device) == "triton":
        return _TritonDecode.apply(sparse.indices, sparse.values, sparse.counts, W_dec, b_dec)
    weights = torch.where(sparse.valid, sparse.values.to(W_dec.dtype), 0)
    if sparse.indices.shape[1] == 0:
        return b_dec.expand(sparse.indices.shape[0], W_dec.shape[1]).clone()
    return F.embedding_bag(sparse.indices, W_dec, mode="sum", per_sample_weights=weights) + b_dec


def topk_decode(
    pre: torch.Tensor, k: int, W_dec: torch.Tensor, b_dec: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK training forward: ``(x_hat [N, d_out], f [N, d_sae])`` from pre-activations ``[N, d_sae]``.

    torch: ``f = topk_activation(pre, k)``, ``x_hat = f @ W_dec + b_dec``; Triton: the ``k``
    selected values decoded by :func:`decode_rows` (gradients for them, ``W_dec``, ``b_dec``).
    Both give the same values and gradients.
    """
    if resolve_backend(W_dec.device) != "triton":
        f = topk_activation(pre, k)
        return f @ W_dec + b_dec, f
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    counts = torch.full((pre.shape[0],), k, dtype=torch.int32, device=pre.device)
    sp = SparseFeatures(idx, vals.relu(), counts, pre.shape[-1])
    return decode_rows(sp, W_dec, b_dec), sp.to_dense()


@dataclass
class EditTable:
    """Feature edits per token row, for :func:`splice_rows`.

    Attributes:
        ids: ``[R, k]`` int64 feature ids (``-1`` pads), ``R`` 1 (every row) or ``N``.
        values: ``[R, k]`` the value set (ablate: 0, clamp) or added (steer).
        sets: ``[R, k]`` bool, True to set the feature to the value, False to add it.

    A row's edits apply in column order, as a list of edits does.
    """

    ids: torch.Tensor
    values: torch.Tensor
    sets: torch.Tensor

    @classmethod
    def empty(cls, device: torch.device | str) -> EditTable:
        """No edit."""
        return cls(torch.full((1, 1), -1, dtype=torch.long, device=device),
                   torch.zeros(1, 1, device=device), torch.zeros(1, 1, dtype=torch.bool, device=device))

    def apply(self, f: torch.Tensor) -> torch.Tensor:
        """``f'`` of dense features ``f`` ``[N, d_sae]`` (the reference semantics of the splice kernel)."""
        d_sae = f.shape[-1]
        ids = self.ids.to(f.device)
        vals = self.values.to(device=f.device, dtype=f.dtype)
        out = f
        for c in range(ids.shape[1]):
            col = ids[:, c : c + 1]
            mask = torch.zeros(col.shape[0], d_sae + 1, dtype=torch.bool, device=f.device)
            mask = mask.scatter(1, torch.where(col < 0, d_sae, col), True)[:, :d_sae]
            v = vals[:, c : c + 1]
            new = torch.where(self.sets[:, c : c + 1].to(f.device), v, out + v)
            out = torch.where(mask, new, out)
        return out


def splice_rows(
    x: torch.Tensor,
    sparse: SparseFeatures,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    edits: EditTable,
    *,
    keep_error: bool = True,
    skip: torch.Tensor | None = None,
    want_error: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A splice on token rows: ``(out [N, d_out], error [N, d_out] or None)``, by the current backend.

    ``x`` is the site's value ``[N, d_out]`` and ``sparse`` its features ``f``; ``f'`` is
    ``edits`` applied to ``f``. ``out = x + (f' - f) @ W_dec`` (``keep_error``: the
    reconstruction plus the error term ``x - x_hat(f)``) or ``x_hat(f')``, with ``x_hat(f) = f @
    W_dec + b_dec (+ skip)``; ``error = x - x_hat(f)`` in ``W_dec.dtype``. Triton computes both in
    one pass over each row's active set; torch (the reference) densifies ``f``. No autograd.
    """
    out_dtype = out_dtype or x.dtype
    if resolve_backend(W_dec.device) == "triton":
        return _tk().splice_rows(
            sparse.indices, sparse.values, sparse.counts, W_dec, b_dec, x, edits.ids, edits.values, edits.sets,
            keep_error=keep_error, skip=skip, want_error=want_error, out_dtype=out_dtype,
        )
    f = sparse.to_dense().to(W_dec.dtype)
    f_new = edits.apply(f)
    x_hat = decode_dense(f, W_dec, b_dec)
    if skip is not None:
        x_hat = x_hat + skip.to(x_hat.dtype)
    if keep_error:
        out = x + decode_dense(f_new - f, W_dec, torch.zeros_like(b_dec)).to(x.dtype)
    else:
        out = x_hat + decode_dense(f_new - f, W_dec, torch.zeros_like(b_dec))
    err = x.to(W_dec.dtype) - x_hat if want_error else None
    return out.to(out_dtype), err
