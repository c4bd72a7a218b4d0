"""Triton kernels for SAE and transcoder encode, decode and splice (the ``"triton"`` backend of :mod:`saes.kernels`).

Import this module only through :mod:`saes.kernels` (``kernels.backend("triton")`` or the
automatic choice on CUDA); it needs the optional ``triton`` package (``pip install
mishax-py[gpu]``). Every kernel works on token rows: inputs are flattened to ``[N, d]`` and
sparse features are the padded row format of :class:`saes.kernels.SparseFeatures`:
``indices [N, cap]`` (int64), ``values [N, cap]`` and ``counts [N]`` (int32; entries at
``j >= counts[n]`` are padding).

Kernels:

* :func:`encode_threshold` -- ``x @ W_enc + b_enc`` tile by tile (``tl.dot``, fp32
  accumulator, rounded to the weights' dtype like ``addmm``), then ReLU or JumpReLU in the
  epilogue: the active entries of a tile are compacted into the row's slots (one atomic per
  row and tile reserves them, ``tl.cumsum`` places them), so the dense ``[N, d_sae]``
  pre-activation is never written to global memory. Rows are sorted by feature id afterwards
  (the atomics make the slot order depend on scheduling; sorting makes results
  deterministic and equal to the order of ``nonzero()``). A row with more active features
  than ``cap`` is counted in full, and the launcher reruns with a larger ``cap``.
* :func:`decode_rows` / :func:`decode_rows_backward` -- ``b_dec + sum_j v[n, j] W_dec[i[n, j]]``
  per (row, block of ``d_out``), fp32 accumulation; the backward computes the gradient of the
  active values (``g[n] . W_dec[i[n, j]]``) and scatters ``v[n, j] g[n]`` into an fp32
  ``W_dec`` gradient with atomics, in one pass over the active decoder rows.
* :func:`splice_rows` -- a splice in one pass over each row's active set: the reconstruction
  ``x_hat(f)``, the error ``x - x_hat(f)``, and the edited output ``x + (f' - f) W_dec`` (or
  ``x_hat(f')``), where ``f'`` applies the row's edit table (per-row feature ids, values and
  set/add flags, in order) to the active entries and to edited features that are inactive.

TopK encoders have no kernel here: a per-row top-k needs the whole pre-activation row, so
the dense GEMM (cuBLAS) and ``torch.topk`` stay (:mod:`saes.kernels`).

Kernels are compiled for CUDA tensors. With ``TRITON_INTERPRET=1`` in the environment before
``triton`` is imported (``import torch`` imports it, so: before the process starts) every
kernel, and Triton's own library functions, run in Triton's interpreter on CPU tensors: how CI
checks them without a GPU (tests/saes/test_triton_kernels.py runs its kernel tests in such a
subprocess).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

__all__ = [
    "ACT_JUMPRELU",
    "ACT_RELU",
    "INTERPRETER",
    "decode_rows",
    "decode_rows_backward",
    "encode_threshold",
    "splice_rows",
]

#: the activation codes of :func:`encode_threshold`
ACT_RELU = 0
ACT_JUMPRELU = 1
#: triton was imported in interpreter mode (``TRITON_INTERPRET=1``): kernels run on CPU tensors
INTERPRETER = type(tl.sum).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _encode_kernel(
    x_ptr, w_ptr, b_ptr, thr_ptr, idx_ptr, val_ptr, cnt_ptr,
    N, D_IN, D_SAE, CAP,
    s_xn, s_xk, s_wk, s_wn, s_in, s_ic, s_vn, s_vc,
    ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < N
    n_ok = rn < D_SAE
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D_IN, BK):
        kk = k0 + rk
        a = tl.load(x_ptr + rm[:, None] * s_xn + kk[None, :] * s_xk,
                    mask=m_ok[:, None] & (kk[None, :] < D_IN), other=0.0)
        w = tl.load(w_ptr + kk[:, None] * s_wk + rn[None, :] * s_wn,
                    mask=(kk[:, None] < D_IN) & n_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter multiplies bf16 (held as uint16) wrongly; the products are exact in fp32
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    # round to the weights' dtype as addmm does, then compare in fp32 (exact for that dtype)
    pre = (acc + bias[None, :]).to(w_ptr.dtype.element_ty).to(tl.float32)
    if ACT == 1:
        thr = tl.load(thr_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        thr = tl.maximum(thr, 0.0)
    else:
        thr = tl.zeros((BN,), dtype=tl.float32)
    active = (pre > thr[None, :]) & m_ok[:, None] & n_ok[None, :]
    act_i = active.to(tl.int32)
    n_act = tl.sum(act_i, axis=1)
    base = tl.atomic_add(cnt_ptr + rm, n_act, mask=m_ok)
    slot = base[:, None] + tl.cumsum(act_i, axis=1) - 1
    keep = active & (slot < CAP)
    cols = (rn[None, :] + tl.zeros((BM, BN), dtype=tl.int32)).to(tl.int64)
    tl.store(idx_ptr + rm[:, None] * s_in + slot * s_ic, cols, mask=keep)
    tl.store(val_ptr + rm[:, None] * s_vn + slot * s_vc, pre.to(val_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _decode_kernel(
    idx_ptr, val_ptr, cnt_ptr, w_ptr, b_ptr, out_ptr,
    D, CAP,
    s_in, s_ic, s_vn, s_vc, s_wr, s_wd, s_on, s_od,
    HAS_BIAS: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr,
):
    n = tl.program_id(0)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = rd < D
    cnt = tl.minimum(tl.load(cnt_ptr + n), CAP)
    acc = tl.zeros((BD,), dtype=tl.float32)
    for e0 in range(0, cnt, BE):
        re = e0 + tl.arange(0, BE)
        e_ok = re < cnt
        ids = tl.load(idx_ptr + n * s_in + re * s_ic, mask=e_ok, other=0)
        v = tl.load(val_ptr + n * s_vn + re * s_vc, mask=e_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ids[:, None] * s_wr + rd[None, :] * s_wd, mask=e_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * v[:, None], axis=0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rd, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * s_on + rd * s_od, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _decode_backward_kernel(
    idx_ptr, val_ptr, cnt_ptr, w_ptr, g_ptr, gv_ptr, gw_ptr,
    D, CAP,
    s_in, s_ic, s_vn, s_vc, s_wr, s_wd, s_gn, s_gd, s_gvn, s_gvc,
    WANT_V: tl.constexpr, WANT_W: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr,
):
    n = tl.program_id(0)
    re = tl.program_id(1) * BE + tl.arange(0, BE)
    cnt = tl.minimum(tl.load(cnt_ptr + n), CAP)
    e_ok = re < cnt
    ids = tl.load(idx_ptr + n * s_in + re * s_ic, mask=e_ok, other=0)
    v = tl.load(val_ptr + n * s_vn + re * s_vc, mask=e_ok, other=0.0).to(tl.float32)
    gv = tl.zeros((BE,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        d_ok = rd < D
        m = e_ok[:, None] & d_ok[None, :]
        g = tl.load(g_ptr + n * s_gn + rd * s_gd, mask=d_ok, other=0.0).to(tl.float32)
        if WANT_V:
            w = tl.load(w_ptr + ids[:, None] * s_wr + rd[None, :] * s_wd, mask=m, other=0.0).to(tl.float32)
            gv += tl.sum(w * g[None, :], axis=1)
        if WANT_W:
            tl.atomic_add(gw_ptr + ids[:, None] * D + rd[None, :], v[:, None] * g[None, :], mask=m)
    if WANT_V:
        tl.store(gv_ptr + n * s_gvn + re * s_gvc, gv.to(gv_ptr.dtype.element_ty), mask=re < CAP)


@triton.jit
def _splice_kernel(
    idx_ptr, val_ptr, cnt_ptr, w_ptr, b_ptr, x_ptr, skip_ptr, eid_ptr, evl_ptr, eset_ptr,
    out_ptr, err_ptr,
    D, CAP, KE,
    s_in, s_ic, s_vn, s_vc, s_wr, s_wd, s_xn, s_xd, s_sn, s_sd, s_en, s_ec, s_on, s_od, s_rn, s_rd,
    KEEP_ERROR: tl.constexpr, HAS_SKIP: tl.constexpr, WANT_ERR: tl.constexpr,
    BE: tl.constexpr, BD: tl.constexpr, BKE: tl.constexpr,
):
    n = tl.program_id(0)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = rd < D
    cnt = tl.minimum(tl.load(cnt_ptr + n), CAP)
    # this row's edits, applied in order: set (ablate, clamp) or add (steer); id -1 = padding
    ek = tl.arange(0, BKE)
    ek_ok = ek < KE
    e_id = tl.load(eid_ptr + n * s_en + ek * s_ec, mask=ek_ok, other=-1)
    e_val = tl.load(evl_ptr + n * s_en + ek * s_ec, mask=ek_ok, other=0.0).to(tl.float32)
    e_set = tl.load(eset_ptr + n * s_en + ek * s_ec, mask=ek_ok, other=0) != 0
    e_ok = e_id >= 0
    acc_hat = tl.zeros((BD,), dtype=tl.float32)
    acc_delta = tl.zeros((BD,), dtype=tl.float32)
    found = tl.zeros((BKE,), dtype=tl.int32)
    for a0 in range(0, cnt, BE):
        ra = a0 + tl.arange(0, BE)
        a_ok = ra < cnt
        ids = tl.load(idx_ptr + n * s_in + ra * s_ic, mask=a_ok, other=-2)
        v = tl.load(val_ptr + n * s_vn + ra * s_vc, mask=a_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ids[:, None] * s_wr + rd[None, :] * s_wd, mask=a_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        acc_hat += tl.sum(w * v[:, None], axis=0)
        match = (ids[:, None] == e_id[None, :]) & e_ok[None, :] & a_ok[:, None]  # [BE, BKE]
        found = tl.maximum(found, tl.max(match.to(tl.int32), axis=0))
        sets = match & e_set[None, :]
        last = tl.max(tl.where(sets, ek[None, :], -1), axis=1)  # the last edit that sets each entry
        set_val = tl.sum(tl.where(sets & (ek[None, :] == last[:, None]), e_val[None, :], 0.0), axis=1)
        adds = tl.sum(tl.where(match & (~e_set[None, :]) & (ek[None, :] > last[:, None]), e_val[None, :], 0.0),
                      axis=1)
        new = tl.where(last >= 0, set_val, v) + adds
        acc_delta += tl.sum(w * (new - v)[:, None], axis=0)
    # edited features that are not active: f' from 0, counted once (at the first edit of each id)
    same = (e_id[:, None] == e_id[None, :]) & e_ok[:, None] & e_ok[None, :]  # [BKE, BKE]
    sets_i = same & e_set[None, :]
    last_i = tl.max(tl.where(sets_i, ek[None, :], -1), axis=1)
    set_i = tl.sum(tl.where(sets_i & (ek[None, :] == last_i[:, None]), e_val[None, :], 0.0), axis=1)
    adds_i = tl.sum(tl.where(same & (~e_set[None, :]) & (ek[None, :] > last_i[:, None]), e_val[None, :], 0.0),
                    axis=1)
    first = tl.sum(tl.where(same & (ek[None, :] < ek[:, None]), 1, 0), axis=1) == 0
    lone = e_ok & first & (found == 0)
    new_i = tl.where(lone, tl.where(last_i >= 0, set_i, 0.0) + adds_i, 0.0)
    w_i = tl.load(w_ptr + e_id[:, None] * s_wr + rd[None, :] * s_wd, mask=lone[:, None] & d_ok[None, :],
                  other=0.0).to(tl.float32)
    acc_delta += tl.sum(w_i * new_i[:, None], axis=0)
    x = tl.load(x_ptr + n * s_xn + rd * s_xd, mask=d_ok, other=0.0).to(tl.float32)
    x_hat = acc_hat + tl.load(b_ptr + rd, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_SKIP:
        x_hat += tl.load(skip_ptr + n * s_sn + rd * s_sd, mask=d_ok, other=0.0).to(tl.float32)
    if KEEP_ERROR:
        out = x + acc_delta
    else:
        out = x_hat + acc_delta
    tl.store(out_ptr + n * s_on + rd * s_od, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    if WANT_ERR:
        tl.store(err_ptr + n * s_rn + rd * s_rd, (x - x_hat).to(err_ptr.dtype.element_ty), mask=d_ok)


# ---------------------------------------------------------------------------- launchers
def _kernel(kernel: Any, device: torch.device) -> Any:
    """The kernel to launch for tensors on ``device`` (a hook for per-device variants; today the kernel itself)."""
    return kernel


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: for fp32, IEEE unless torch allows TF32 for matmuls (as cuBLAS would then use
    it); 16-bit inputs always multiply exactly into the fp32 accumulator (the setting only concerns fp32)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def encode_threshold(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor | None,
    *,
    cap: int,
    blocks: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``x @ W_enc + b_enc`` and ReLU (``threshold=None``) or JumpReLU, into sparse rows.

    Args:
        x: ``[N, d_in]`` in ``W_enc.dtype`` (any strides).
        W_enc: ``[d_in, d_sae]``; b_enc, threshold: ``[d_sae]``.
        cap: slots per row; a row with more active features is rerun with enough slots.
        blocks: ``(BM, BN, BK)`` tile sizes (powers of two, at least 16; tests use small ones).

    Returns:
        ``(indices [N, cap'] int64, values [N, cap'] W_enc.dtype, counts [N] int32)``, each row
        sorted by feature id, padding ``(0, 0)``.
    """
    n, d_in = x.shape
    d_sae = W_enc.shape[1]
    if blocks is None:
        blocks = (64, 64, 32) if W_enc.dtype == torch.float32 else (64, 128, 32)
    bm, bn, bk = blocks
    act = ACT_RELU if threshold is None else ACT_JUMPRELU
    thr = b_enc if threshold is None else threshold.to(W_enc.dtype)
    kern = _kernel(_encode_kernel, x.device)
    cap = max(1, min(int(cap), d_sae))
    while True:
        idx = torch.zeros(n, cap, dtype=torch.int64, device=x.device)
        val = torch.zeros(n, cap, dtype=W_enc.dtype, device=x.device)
        cnt = torch.zeros(n, dtype=torch.int32, device=x.device)
        grid = (triton.cdiv(n, bm), triton.cdiv(d_sae, bn))
        if n:
            kern[grid](
                x, W_enc, b_enc, thr, idx, val, cnt, n, d_in, d_sae, cap,
                x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
                idx.stride(0), idx.stride(1), val.stride(0), val.stride(1),
                ACT=act, PRECISION=_precision(W_enc.dtype), UPCAST=INTERPRETER and W_enc.dtype != torch.float32,
                BM=bm, BN=bn, BK=bk,
            )
        most = int(cnt.max()) if n else 0
        if most <= cap:
            break
        cap = most  # counts are complete even when slots overflowed: one rerun is enough
    slot = torch.arange(cap, device=x.device)
    pad = slot[None, :] >= cnt[:, None]
    order = torch.where(pad, d_sae, idx).argsort(dim=1)
    return idx.gather(1, order), val.gather(1, order), cnt


def decode_rows(
    indices: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    *,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``b_dec + sum_j values[n, j] W_dec[indices[n, j]]`` for ``j < counts[n]``: ``[N, d_out]`` in ``W_dec.dtype``.

    ``blocks``: ``(BE, BD)``, active entries and output columns per step.
    """
    n, cap = indices.shape
    d = W_dec.shape[1]
    be, bd = blocks or (16, 128)
    out = torch.empty(n, d, dtype=W_dec.dtype, device=W_dec.device)
    if n == 0 or d == 0:
        return out
    bias = W_dec if b_dec is None else b_dec
    _kernel(_decode_kernel, W_dec.device)[(n, triton.cdiv(d, bd))](
        indices, values, counts, W_dec, bias, out, d, cap,
        indices.stride(0), indices.stride(1), values.stride(0), values.stride(1),
        W_dec.stride(0), W_dec.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=b_dec is not None, BE=be, BD=bd,
    )
    return out


def decode_rows_backward(
    indices: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    W_dec: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    want_values: bool = True,
    want_weight: bool = True,
    blocks: tuple[int, int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`decode_rows` for the active values ``[N, cap]`` and ``W_dec`` ``[d_sae, d_out]``.

    ``grad_values[n, j] = grad_out[n] . W_dec[indices[n, j]]`` (0 on padding);
    ``grad_W_dec[i] = sum_{(n, j): indices[n, j] = i} values[n, j] grad_out[n]``, accumulated in
    fp32 with atomics (the summation order varies between runs on a GPU) and cast to ``W_dec.dtype``.
    """
    n, cap = indices.shape
    d = W_dec.shape[1]
    be, bd = blocks or (16, 128)
    gv = torch.zeros(n, cap, dtype=values.dtype, device=values.device) if want_values else None
    gw = torch.zeros(W_dec.shape, dtype=torch.float32, device=W_dec.device) if want_weight else None
    if n and d and (want_values or want_weight):
        gvt = gv if gv is not None else values
        gwt = gw if gw is not None else W_dec
        grad_out = grad_out.to(W_dec.dtype)
        _kernel(_decode_backward_kernel, W_dec.device)[(n, triton.cdiv(cap, be))](
            indices, values, counts, W_dec, grad_out, gvt, gwt, d, cap,
            indices.stride(0), indices.stride(1), values.stride(0), values.stride(1),
            W_dec.stride(0), W_dec.stride(1), grad_out.stride(0), grad_out.stride(1),
            gvt.stride(0), gvt.stride(1) if gvt.dim() > 1 else 1,
            WANT_V=want_values, WANT_W=want_weight, BE=be, BD=bd,
        )
    return gv, (None if gw is None else gw.to(W_dec.dtype))


def splice_rows(
    indices: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    x: torch.Tensor,
    edit_ids: torch.Tensor,
    edit_values: torch.Tensor,
    edit_sets: torch.Tensor,
    *,
    keep_error: bool,
    skip: torch.Tensor | None = None,
    want_error: bool = True,
    out_dtype: torch.dtype | None = None,
    blocks: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pass per row over the active set: ``(out [N, d_out], error [N, d_out] or None)``.

    Args:
        indices, values, counts: the features ``f`` of ``x``'s rows (sparse rows).
        W_dec, b_dec: decoder; x: ``[N, d_out]`` the site's value.
        edit_ids: ``[R, k]`` int64 (``-1`` pads), ``R`` 1 (every row) or ``N``; edit_values
            ``[R, k]`` and edit_sets ``[R, k]`` (int8, 1 = set to the value, 0 = add it), applied in order.
        keep_error: ``out = x + (f' - f) W_dec`` (else ``x_hat(f')``).
        skip: ``[N, d_out]`` added to the reconstruction (a transcoder's skip term).
        want_error: also return ``x - x_hat(f)`` (in ``W_dec.dtype``).
        out_dtype: dtype of ``out`` (default ``x.dtype``).
    """
    n, cap = indices.shape
    d = W_dec.shape[1]
    be, bd = blocks or (16, 128)
    ke = edit_ids.shape[1]
    out = torch.empty(n, d, dtype=out_dtype or x.dtype, device=x.device)
    err = torch.empty(n, d, dtype=W_dec.dtype, device=x.device) if want_error else None
    if n == 0 or d == 0:
        return out, err
    evl = edit_values.to(torch.float32).expand(edit_ids.shape).contiguous()
    est = edit_sets.to(torch.int8).expand(edit_ids.shape).contiguous()
    eid = edit_ids.contiguous()
    es = 0 if eid.shape[0] == 1 else eid.stride(0)
    sk = skip if skip is not None else x
    er = err if err is not None else out
    _kernel(_splice_kernel, W_dec.device)[(n, triton.cdiv(d, bd))](
        indices, values, counts, W_dec, b_dec, x, sk, eid, evl, est, out, er,
        d, cap, ke,
        indices.stride(0), indices.stride(1), values.stride(0), values.stride(1),
        W_dec.stride(0), W_dec.stride(1), x.stride(0), x.stride(1), sk.stride(0), sk.stride(1),
        es, 1, out.stride(0), out.stride(1), er.stride(0), er.stride(1),
        KEEP_ERROR=keep_error, HAS_SKIP=skip is not None, WANT_ERR=want_error,
        BE=be, BD=bd, BKE=_pow2(ke, 2),
    )
    return out, err
