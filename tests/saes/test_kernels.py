"""saes.kernels: fused JumpReLU encode and sparse/dense decode agree with the textbook formulas."""

from __future__ import annotations

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
