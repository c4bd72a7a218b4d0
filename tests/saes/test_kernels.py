"""saes.kernels: fused JumpReLU encode and sparse/dense decode agree with the textbook formulas."""

from __future__ import annotations

import itertools

import pytest
import torch

import saes
from saes import kernels

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops: see conftest.one_thread


def sparse_features(n: int, d_sae: int, density: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, d_sae, generator=g) < density
    return (mask * (0.5 + torch.rand(n, d_sae, generator=g))).to(dtype)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)]
)
def test_sparse_decode_equals_dense(dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(512, 64, generator=g) / 8).to(dtype)
    b = torch.randn(64, generator=g).to(dtype)
    f = sparse_features(2 * 7, 512, 0.02, dtype).reshape(2, 7, 512)
    f[0, 3] = 0  # a token with no active feature
    want = (f.float() @ W.float() + b.float()).to(dtype)
    for mode in ("sparse", "dense", "auto"):
        got = kernels.decode(f, W, b, mode=mode)
        assert got.shape == (2, 7, 64) and got.dtype == dtype
        assert (got.float() - want.float()).abs().max().item() <= tol, mode
    assert torch.equal(kernels.decode_sparse(f, W, b)[0, 3], b)
    with pytest.raises(ValueError, match="decode mode"):
        kernels.decode(f, W, b, mode="fast")


def test_decode_gradients() -> None:
    g = torch.Generator().manual_seed(2)
    W = torch.randn(100, 16, generator=g, requires_grad=True)
    f = sparse_features(30, 100, 0.05, torch.float32)
    out = kernels.decode_sparse(f, W, torch.zeros(16))
    grad_out = torch.randn(30, 16, generator=g)
    (gW,) = torch.autograd.grad(out, W, grad_out)
    assert torch.allclose(gW, f.T @ grad_out, atol=1e-5)  # W_dec grads are exact on the sparse path
    f.requires_grad_(True)
    out = kernels.decode(f, W.detach(), torch.zeros(16))  # auto: f needs grads -> dense, exact
    (gf,) = torch.autograd.grad(out, f, grad_out)
    assert torch.allclose(gf, grad_out @ W.detach().T, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_jumprelu_encode_matches_formula(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 9, 32, generator=g).to(dtype)
    W = torch.randn(32, 200, generator=g).to(dtype)
    b = torch.randn(200, generator=g).to(dtype)
    thr = (torch.rand(200, generator=g) * 2 - 0.5).to(dtype)  # some thresholds negative
    pre = kernels.encode_pre(x, W, b)
    want = (pre > thr) * torch.relu(pre)
    got = kernels.jumprelu_encode(x, W, b, thr)
    assert torch.equal(got, want)
    assert torch.equal(kernels.jumprelu(pre.clone(), thr, inplace=True), want)
    sae = saes.JumpReLUSAE(32, 200, dtype=dtype)
    with torch.no_grad():
        sae.W_enc.copy_(W), sae.b_enc.copy_(b), sae.threshold.copy_(thr)
        out = sae.encode(x)
    ref = (x.float() @ W.float() + b.float()).to(dtype)  # CPU half GEMMs run in fp32
    tol = 0 if dtype == torch.float32 else 5e-2
    assert (out.float() - ((ref > thr) * torch.relu(ref)).float()).abs().max().item() <= tol + 1e-4


def test_topk_activation() -> None:
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-3.0, -2.0, -1.0, 1.0]])
    got = kernels.topk_activation(pre, 2)
    assert torch.equal(got, torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))


def test_auto_decode_mode_is_what_decode_auto_takes() -> None:
    """``mode="auto"`` picks sparse at low density, dense at high density, when ``f`` needs gradients, or
    is empty; base SAEs and ``kernels.decode`` share the rule."""
    W = torch.randn(64, 8)
    b = torch.randn(8)
    sparse = sparse_features(4, 64, 0.01, torch.float32)
    sparse[0, 0] = 1.0
    dense = sparse_features(4, 64, 0.5, torch.float32)
    assert kernels.auto_decode_mode(sparse) == "sparse"
    assert kernels.auto_decode_mode(dense) == "dense"
    assert kernels.auto_decode_mode(dense, max_density=0.9) == "sparse"
    assert kernels.auto_decode_mode(sparse.clone().requires_grad_()) == "dense"
    with torch.no_grad():
        assert kernels.auto_decode_mode(sparse.clone().requires_grad_()) == "sparse"
    assert kernels.auto_decode_mode(torch.zeros(0, 64)) == "dense"
    for f in (sparse, dense):
        mode = kernels.auto_decode_mode(f)
        torch.testing.assert_close(kernels.decode(f, W, b), kernels.decode(f, W, b, mode=mode), rtol=0, atol=0)
    assert kernels.is_cpu_half(torch.zeros(1, dtype=torch.bfloat16))
    assert not kernels.is_cpu_half(torch.zeros(1))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_sparse_decode_reads_the_last_feature(dtype: torch.dtype, tol: float) -> None:
    """Feature ``d_sae - 1`` (the last entry of the flattened features, on the last token too) decodes like any
    other, alone on a token, with feature 0, and on every token; ``d_sae`` is prime so no block size divides it."""
    d_sae, d_out = 101, 16
    g = torch.Generator().manual_seed(4)
    W = (torch.randn(d_sae, d_out, generator=g) / 8).to(dtype)
    b = torch.randn(d_out, generator=g).to(dtype)
    f = torch.zeros(3, 4, d_sae, dtype=dtype)
    f[..., -1] = (0.5 + torch.arange(12) / 12).reshape(3, 4).to(dtype)  # every token, last feature
    f[1, 2, 0] = 1.25  # first and last together
    f[2, 1, -1] = 0.0  # a token with nothing active
    want = (f.float() @ W.float() + b.float()).to(dtype)
    for mode in ("sparse", "dense", "auto"):
        got = kernels.decode(f, W, b, mode=mode)
        assert (got.float() - want.float()).abs().max().item() <= tol, mode
    only_last = torch.zeros(1, d_sae, dtype=dtype)
    only_last[0, -1] = 1.5
    torch.testing.assert_close(kernels.decode_sparse(only_last, W, b).float(), (1.5 * W[-1].float() + b.float())[None],
                               atol=tol, rtol=0)
    sae = saes.ReLUSAE(d_out, d_sae, dtype=dtype)
    with torch.no_grad():
        sae.W_dec.copy_(W), sae.b_dec.copy_(b)
    assert kernels.auto_decode_mode(f) == kernels.auto_decode_mode(only_last) == "sparse"  # ~1% density
    assert (sae.decode(f).float() - want.float()).abs().max().item() <= tol


def test_jumprelu_is_inactive_exactly_at_the_threshold() -> None:
    """``f = (pre > threshold) * relu(pre)``: ``pre == threshold`` exactly (fp32) gives 0, the next float above
    gives ``pre``. ``W_enc = 0`` makes ``pre = b_enc`` exactly, so the equality is exact, not up to rounding."""
    thr = torch.tensor([0.5, 1.0, 0.25, 3.0, 0.0, -0.5])
    above = torch.nextafter(thr, torch.full_like(thr, float("inf")))
    for b_enc, active in ((thr, torch.zeros(6, dtype=torch.bool)), (above, above > 0)):
        want = torch.where(active, b_enc, 0.0).expand(2, 3, 6)
        pre = b_enc.expand(2, 3, 6).clone()
        assert torch.equal(kernels.jumprelu(pre, thr), want)
        assert torch.equal(kernels.jumprelu(pre.clone(), thr, inplace=True), want)
        x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(5))
        W = torch.zeros(8, 6)
        assert torch.equal(kernels.jumprelu_encode(x, W, b_enc, thr), want)
        sae = saes.JumpReLUSAE(8, 6)
        tc = saes.Transcoder(8, 6, site="blocks.0.ln2_normalized", output_site="blocks.0.mlp_out")
        for model in (sae, tc):
            with torch.no_grad():
                model.W_enc.zero_(), model.b_enc.copy_(b_enc), model.threshold.copy_(thr)
                assert torch.equal(model.encode(x), want), type(model).__name__


def test_topk_keeps_k_then_applies_relu() -> None:
    """TopK against a per-token oracle written with ``sort``: the ``k`` largest pre-activations, each through
    ReLU, the rest 0 -- tokens with fewer than ``k`` positive pre-activations (or none) keep only those.
    Through ``TopKSAE`` and a TopK ``Transcoder`` (``W_enc = I``, so ``pre = x + b_enc``)."""
    g = torch.Generator().manual_seed(6)
    d, k = 12, 5
    x = torch.randn(4, 3, d, generator=g)
    x[0, 0] = -torch.rand(d, generator=g) - 0.1  # every pre-activation negative
    x[1, 2] = -torch.rand(d, generator=g) - 0.1
    x[1, 2, [3, 7]] = torch.tensor([0.4, 2.0])  # two positive of k = 5
    b_enc = torch.zeros(d)

    def oracle(pre: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(pre)
        for idx in itertools.product(*map(range, pre.shape[:-1])):
            order = pre[idx].sort(descending=True).indices[:k]
            out[idx][order] = pre[idx][order].clamp(min=0)
        return out

    want = oracle(x)
    assert torch.equal(want[0, 0], torch.zeros(d)) and int((want[1, 2] != 0).sum()) == 2
    assert torch.equal(kernels.topk_activation(x, k), want)
    sae = saes.TopKSAE(d, d, k=k)
    tc = saes.Transcoder(d, d, activation="topk", k=k, site="blocks.0.ln2_normalized", output_site="blocks.0.mlp_out")
    for model in (sae, tc):
        with torch.no_grad():
            model.W_enc.copy_(torch.eye(d)), model.b_enc.copy_(b_enc)
            if model.apply_b_dec_to_input:
                model.b_dec.zero_()
            got = model.encode(x)
        assert torch.equal(got, want), type(model).__name__
        assert (got >= 0).all() and ((got != 0).sum(-1) <= k).all()


# ------------------------------------------------------------------------- backend dispatch
def test_backend_choice_and_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` is torch on CPU; ``backend()`` overrides ``MISHAX_PY_SAE_KERNELS``; bad names and Triton where it
    cannot run are clear errors naming the reason (no triton; CPU without ``TRITON_INTERPRET=1``)."""
    import importlib.util

    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    assert kernels.requested_backend() == "auto" and kernels.resolve_backend("cpu") == "torch"
    monkeypatch.setenv(kernels.BACKEND_ENV, "torch")
    with kernels.backend("auto"):
        assert kernels.requested_backend() == "auto"
    assert kernels.requested_backend() == "torch"
    monkeypatch.setenv(kernels.BACKEND_ENV, "cuda-please")
    with pytest.raises(ValueError, match="MISHAX_PY_SAE_KERNELS.*cuda-please"):
        kernels.requested_backend()
    with pytest.raises(ValueError, match="one of auto, torch, triton"):
        with kernels.backend("fast"):
            pass
    monkeypatch.delenv(kernels.BACKEND_ENV)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sae = saes.JumpReLUSAE(8, 16)
    x = torch.randn(3, 8)
    if importlib.util.find_spec("triton") is not None:
        with kernels.backend("triton"), pytest.raises(kernels.KernelBackendError, match="TRITON_INTERPRET=1"):
            sae.encode(x)
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # too late: this process imported triton without it
        if not kernels.triton_interpreting():
            with kernels.backend("triton"), pytest.raises(kernels.KernelBackendError, match="before the process"):
                sae.decode(torch.zeros(3, 16))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    with pytest.raises(kernels.KernelBackendError, match=r"MISHAX_PY_SAE_KERNELS=triton.*not installed.*\[gpu\]"):
        sae.encode(x)
    with kernels.backend("torch"):  # the block wins over the environment
        assert torch.equal(sae.encode(x), kernels.jumprelu_encode(x, sae.W_enc, sae.b_enc, sae.threshold))
    assert kernels.triton_unavailable("cuda") is not None


def test_sparse_rows_and_the_torch_splice_reference() -> None:
    """``SparseFeatures`` round-trips dense features (ids ascending, padding after ``counts``); the torch
    ``decode_rows`` and ``splice_rows`` (the Triton kernels' reference) match the dense formulas."""
    f = sparse_features(6, 50, 0.1, torch.float32, seed=7)
    f[2] = 0  # a token with nothing active
    sp = kernels.SparseFeatures.from_dense(f)
    assert torch.equal(sp.to_dense(), f) and int(sp.counts[2]) == 0
    assert torch.equal(sp.counts, (f != 0).sum(1, dtype=torch.int32))
    assert bool((sp.indices[:, 1:] >= sp.indices[:, :-1])[sp.valid[:, 1:]].all())
    g = torch.Generator().manual_seed(8)
    W, b, x = torch.randn(50, 12, generator=g), torch.randn(12, generator=g), torch.randn(6, 12, generator=g)
    torch.testing.assert_close(kernels.decode_rows(sp, W, b), f @ W + b)
    table = kernels.EditTable(torch.tensor([[3, 3, 40, -1]]), torch.tensor([[1.0, 2.0, 0.0, 9.0]]),
                              torch.tensor([[False, True, True, True]]))  # steer 3 then clamp it; ablate 40
    f_new = table.apply(f)
    want = f.clone()
    want[:, 3] = 2.0
    want[:, 40] = 0.0
    assert torch.equal(f_new, want)
    out, err = kernels.splice_rows(x, sp, W, b, table, keep_error=True, want_error=True)
    torch.testing.assert_close(out, x + (f_new - f) @ W)
    assert err is not None
    torch.testing.assert_close(err, x - (f @ W + b))
    out, _ = kernels.splice_rows(x, sp, W, b, table, keep_error=False, skip=x)
    torch.testing.assert_close(out, f_new @ W + b + x)
