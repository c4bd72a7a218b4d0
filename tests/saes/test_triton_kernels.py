"""saes.triton_kernels against the torch reference, in Triton's interpreter on CPU (and compiled on CUDA).

Every kernel -- fused encode, sparse decode forward and backward, fused splice -- is compared
with plain torch: fp32 within 1e-5; bf16 within 3e-2 and fp16 within 3e-3 (relative to the
magnitude of the result, the torch reference itself rounding to those dtypes), at small shapes
with the edge cases: no active feature, every feature active (slots overflow and the encode
reruns), ``d_sae`` and ``d_in`` not multiples of the tile sizes, one token, ``k = d_sae``,
non-contiguous inputs. Then ``Splice``/``TranscoderSplice``, TopK/JumpReLU training and
attribution graphs are run under each backend (``saes.kernels.backend``) and compared.

Triton's interpreter must be chosen before ``triton`` is imported, and ``import torch`` imports
it, so the kernel tests run in a subprocess started with ``TRITON_INTERPRET=1``
(:func:`test_kernels_in_the_interpreter`, part of the normal ``python -m pytest`` run); in the
parent process they are skipped, saying so, and the rest of the suite never sees the
interpreter. Without ``triton`` the module is skipped with a message; the ``gpu``-marked tests
need CUDA and skip cleanly without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'mishax-py[gpu]'): kernels not checked")

import saes  # noqa: E402
from mishax_py.instrumented import InstrumentedModel  # noqa: E402
from saes import kernels  # noqa: E402
from saes import triton_kernels as tk  # noqa: E402
from saes.base import init_tied  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

#: this process is the interpreter run (TRITON_INTERPRET=1 before triton was imported)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and kernels.triton_interpreting()
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs in test_kernels_in_the_interpreter's TRITON_INTERPRET=1 subprocess"
)


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run")
def test_kernels_in_the_interpreter() -> None:
    """Run this module's kernel tests in a fresh process with ``TRITON_INTERPRET=1``; all of them must pass."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "not gpu", "-rs", str(Path(__file__))]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout[-8000:] + "\n" + proc.stderr[-4000:]).strip()
    assert proc.returncode == 0, f"interpreter run failed ({' '.join(cmd)}):\n{tail}"
    summary = [line for line in proc.stdout.splitlines() if " passed" in line]
    assert summary and " failed" not in summary[-1], tail
    assert int(summary[-1].split(" passed")[0].split()[-1]) >= 20, f"too few kernel tests ran:\n{tail}"


TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}
DTYPES = list(TOL)
SMALL = (16, 16, 16)  # encode tiles: d_sae 40 and d_in 24 are not multiples of them


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """``|got - want| <= TOL[dtype] * max(1, |want|_max)`` (both compared in fp32)."""
    scale = max(1.0, float(want.float().abs().max())) if want.numel() else 1.0
    err = float((got.float() - want.float()).abs().max()) if want.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"{what}: max abs error {err:.3g} > {TOL[dtype] * scale:.3g} ({dtype})"


def weights(d_in: int, d_sae: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(d_in, d_sae, generator=g) / d_in**0.5).to(dtype)
    b = (torch.randn(d_sae, generator=g) * 0.2).to(dtype)
    thr = (torch.rand(d_sae, generator=g) * 0.8 - 0.1).to(dtype)  # a few thresholds negative
    return W, b, thr


def reference_encode(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, thr: torch.Tensor | None) -> tuple:
    """Pre-activations (fp32 GEMM rounded to the dtype, as the kernel) and features ``[N, d_sae]``."""
    pre = (x.float() @ W.float() + b.float()).to(W.dtype)
    f = torch.relu(pre) if thr is None else kernels.jumprelu(pre, thr)
    return pre, f


def check_encode(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, thr: torch.Tensor | None, cap: int) -> tuple:
    dtype = W.dtype
    idx, val, cnt = tk.encode_threshold(x, W, b, thr, cap=cap, blocks=SMALL)
    pre, want = reference_encode(x, W, b, thr)
    got = kernels.SparseFeatures(idx, val, cnt, W.shape[1]).to_dense()
    cut = torch.zeros_like(b) if thr is None else thr.clamp(min=0)
    # entries within rounding of the threshold may flip between GEMMs; everything else must agree
    near = (pre.float() - cut.float()).abs() <= TOL[dtype] * max(1.0, float(pre.float().abs().max()))
    assert torch.equal((got != 0) | near, (want != 0) | near)
    close(torch.where(near, 0, got), torch.where(near, 0, want), dtype, "encode values")
    assert torch.equal(cnt, (got != 0).sum(1, dtype=torch.int32))
    valid = torch.arange(idx.shape[1])[None] < cnt[:, None]
    assert bool((idx[:, 1:] > idx[:, :-1])[valid[:, 1:]].all()), "row ids must ascend"
    return idx, val, cnt


# --------------------------------------------------------------------------------- encode
@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["jumprelu", "relu"])
def test_encode_matches_torch(dtype: torch.dtype, act: str) -> None:
    W, b, thr = weights(24, 40, dtype)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    check_encode(x, W, b, thr if act == "jumprelu" else None, cap=4)  # cap 4 < count: the rerun path


@interpreted
def test_encode_edge_cases() -> None:
    W, b, thr = weights(24, 40, torch.float32)
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(2))
    _, _, cnt = check_encode(x, W, b, torch.full_like(thr, 1e6), cap=8)  # no active feature
    assert int(cnt.sum()) == 0
    _, _, cnt = check_encode(x, W, b + 100.0, thr, cap=3)  # every feature active, slots overflow
    assert bool((cnt == 40).all())
    check_encode(x[:1], W, b, thr, cap=8)  # one token
    wide = torch.randn(7, 48, generator=torch.Generator().manual_seed(3))
    check_encode(wide[:, ::2], W, b, thr, cap=8)  # non-contiguous rows
    check_encode(x, W.T.contiguous().T, b, thr, cap=8)  # column-major W_enc
    idx, val, cnt = tk.encode_threshold(x[:0], W, b, thr, cap=8)  # no token
    assert idx.shape == (0, 8) and cnt.numel() == 0


@interpreted
def test_encode_backward_matches_autograd() -> None:
    W, b, thr = weights(24, 40, torch.float32)
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(4))
    g = torch.randn(6, 40, generator=torch.Generator().manual_seed(5))
    grads = []
    for name in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, W, b)]
        with kernels.backend(name):
            sp = kernels.encode_sparse(leaves[0], leaves[1], leaves[2], activation="jumprelu", threshold=thr)
        (sp.to_dense() * g).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want, what in zip(grads[1], grads[0], ("x", "W_enc", "b_enc"), strict=True):
        close(got, want, torch.float32, f"grad {what}")


# --------------------------------------------------------------------------------- decode
def sparse_rows(n: int, d_sae: int, per_row: list[int], dtype: torch.dtype, seed: int = 0) -> kernels.SparseFeatures:
    g = torch.Generator().manual_seed(seed)
    f = torch.zeros(n, d_sae)
    for r, k in enumerate(per_row):
        f[r, torch.randperm(d_sae, generator=g)[:k]] = torch.rand(k, generator=g) + 0.5
    return kernels.SparseFeatures.from_dense(f.to(dtype))


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_forward_and_backward(dtype: torch.dtype) -> None:
    d_sae, d = 40, 24
    sp = sparse_rows(5, d_sae, [3, 0, 40, 7, 1], dtype)  # a row with none, a row with every feature
    g = torch.Generator().manual_seed(6)
    W = (torch.randn(d, d_sae, generator=g) / 4).to(dtype).T  # non-contiguous [d_sae, d]
    bias = torch.randn(d, generator=g).to(dtype)
    f = sp.to_dense()
    close(tk.decode_rows(sp.indices, sp.values, sp.counts, W, bias, blocks=(4, 16)),
          (f.float() @ W.float() + bias.float()), dtype, "decode")
    grad_out = torch.randn(5, d, generator=g).to(dtype)
    gv, gw = tk.decode_rows_backward(sp.indices, sp.values, sp.counts, W, grad_out, blocks=(4, 16))
    assert gv is not None and gw is not None
    dense_gf = torch.where(sp.valid, (grad_out.float() @ W.float().T).gather(1, sp.indices), 0)
    close(gv, dense_gf, dtype, "grad values")
    close(gw, f.float().T @ grad_out.float(), dtype, "grad W_dec")


@interpreted
def test_decode_rows_autograd_through_dispatch() -> None:
    """``kernels.decode_rows`` under each backend: same output and gradients (values, W_dec, b_dec)."""
    sp = sparse_rows(4, 40, [5, 0, 12, 40], torch.float32, seed=1)
    g = torch.Generator().manual_seed(7)
    W, bias, grad_out = torch.randn(40, 20, generator=g), torch.randn(20, generator=g), torch.randn(4, 20, generator=g)
    res = []
    for name in ("torch", "triton"):
        v, Wl, bl = (t.clone().requires_grad_() for t in (sp.values, W, bias))
        with kernels.backend(name):
            out = kernels.decode_rows(kernels.SparseFeatures(sp.indices, v, sp.counts, 40), Wl, bl)
        out.backward(grad_out)
        res.append((out.detach(), v.grad, Wl.grad, bl.grad))
    for got, want, what in zip(res[1], res[0], ("out", "values", "W_dec", "b_dec"), strict=True):
        close(got, want, torch.float32, what)


@interpreted
def test_sparse_decode_of_dense_features_goes_through_triton() -> None:
    """``kernels.decode(mode="sparse")`` (what ``SAE.decode`` uses at low density) under the Triton backend."""
    f = sparse_rows(6, 40, [2, 0, 3, 5, 1, 4], torch.float32, seed=2).to_dense().reshape(2, 3, 40)
    W, bias = torch.randn(40, 16), torch.randn(16)
    with kernels.backend("triton"):
        got = kernels.decode(f, W, bias, mode="sparse")
    close(got, f @ W + bias, torch.float32, "sparse decode")


@interpreted
@pytest.mark.parametrize("k", [3, 40])
def test_topk_decode_same_through_either_backend(k: int) -> None:
    """The TopK training step (``k = d_sae`` included): same ``x_hat``, ``f`` and gradients for both backends."""
    g = torch.Generator().manual_seed(8)
    pre0, W0, b0 = torch.randn(5, 40, generator=g), torch.randn(40, 16, generator=g), torch.randn(16, generator=g)
    res = []
    for name in ("torch", "triton"):
        pre, W, bias = (t.clone().requires_grad_() for t in (pre0, W0, b0))
        with kernels.backend(name):
            x_hat, f = kernels.topk_decode(pre, k, W, bias)
        (x_hat.square().sum() + f.sum()).backward()
        res.append((x_hat.detach(), f.detach(), pre.grad, W.grad, bias.grad))
    for got, want, what in zip(res[1], res[0], ("x_hat", "f", "pre", "W_dec", "b_dec"), strict=True):
        close(got, want, torch.float32, what)


# --------------------------------------------------------------------------------- splice
def edit_table(n: int) -> kernels.EditTable:
    """Per-row edits in order, on active and inactive features: ablate, clamp, steer, a steer then a clamp of one id."""
    ids = torch.full((n, 5), -1, dtype=torch.long)
    vals = torch.zeros(n, 5)
    sets = torch.zeros(n, 5, dtype=torch.bool)
    for r in range(n):
        ids[r] = torch.tensor([r % 40, 7, 11, 11, (3 * r) % 40])
        vals[r] = torch.tensor([0.0, 2.5, 1.0, -4.0, 0.75])
        sets[r] = torch.tensor([True, True, False, True, False])
    ids[1, 2:] = -1  # padding
    return kernels.EditTable(ids, vals, sets)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep_error", [True, False])
def test_splice_matches_reference(dtype: torch.dtype, keep_error: bool) -> None:
    n, d_sae, d = 6, 40, 24
    sp = sparse_rows(n, d_sae, [4, 0, 40, 7, 1, 11], dtype, seed=3)
    g = torch.Generator().manual_seed(9)
    W = (torch.randn(d_sae, d, generator=g) / 4).to(dtype)
    bias = torch.randn(d, generator=g).to(dtype)
    x = torch.randn(n, 2 * d, generator=g).to(dtype)[:, ::2]  # non-contiguous site value
    skip = torch.randn(n, d, generator=g).to(dtype)
    broadcast = kernels.EditTable(torch.tensor([[5, 9]]), torch.tensor([[3.0, 1.0]]), torch.tensor([[True, False]]))
    for table, sk in ((edit_table(n), None), (edit_table(n), skip), (kernels.EditTable.empty("cpu"), None),
                      (broadcast, skip)):
        out, err = tk.splice_rows(sp.indices, sp.values, sp.counts, W, bias, x, table.ids, table.values,
                                  table.sets, keep_error=keep_error, skip=sk, blocks=(8, 32))
        with kernels.backend("torch"):
            want_out, want_err = kernels.splice_rows(x, sp, W, bias, table, keep_error=keep_error, skip=sk,
                                                     want_error=True)
        assert err is not None and want_err is not None
        close(out, want_out, dtype, "splice out")
        close(err, want_err, dtype, "splice error")
    # the reference's semantics: f' = edits applied in order to f
    f = sp.to_dense().float()
    f_new = edit_table(n).apply(f)
    # row 0: ablate 0 then steer 0 by 0.75; row 3: clamp 7, steer 11 then clamp it to -4
    assert float(f_new[0, 0]) == 0.75 and float(f_new[3, 7]) == 2.5 and float(f_new[3, 11]) == -4.0


# ------------------------------------------------------------------ splice, training, graphs
D_MODEL = 32


def make_sae(cls: type[saes.SAE] = saes.JumpReLUSAE, d_in: int = D_MODEL, **kw: object) -> saes.SAE:
    sae = cls(d_in, 96, **kw)
    init_tied(sae, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
        if getattr(sae, "threshold", None) is not None:
            sae.threshold.fill_(0.4)
    return sae


class Doubled(saes.FeatureEdit):
    """A user's feature edit (doubles its features), defined only on dense features."""

    def _new(self, f: torch.Tensor, ids: torch.Tensor, scope: saes.edits.EditScope) -> torch.Tensor:
        return f * 2


def count_calls(monkeypatch: pytest.MonkeyPatch, *names: str) -> dict[str, int]:
    """Count the calls of ``saes.triton_kernels`` launchers (to see that the Triton path really ran)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        fn = getattr(tk, name)

        def wrapped(*args: Any, _fn: Any = fn, _name: str = name, **kw: Any) -> Any:
            calls[_name] += 1
            return _fn(*args, **kw)

        monkeypatch.setattr(tk, name, wrapped)
    return calls


def both_backends(fn: Callable[[], Any]) -> tuple[Any, ...]:
    out = []
    for name in ("torch", "triton"):
        with kernels.backend(name):
            out.append(fn())
    return tuple(out)


@interpreted
def test_splices_same_through_either_backend(
    tiny_im: InstrumentedModel, ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_calls(monkeypatch, "encode_threshold", "decode_rows", "splice_rows", "decode_rows_backward")
    sae = make_sae(site="blocks.1.resid_post")
    topk = make_sae(saes.TopKSAE, site="blocks.1.resid_post", k=5)
    tc = make_sae(saes.Transcoder, site="blocks.0.ln2_normalized", output_site="blocks.0.mlp_out", skip=True)
    with torch.no_grad():
        tc.W_skip.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    per_row = torch.tensor([[3, 10], [5, -1]])
    cases = [
        saes.splice(sae, edit=saes.FeatureAblate([0, 1, 2, 3, 4, 5])),
        saes.splice(sae, edit=[saes.FeatureSteer(per_row, 2.0), saes.FeatureClamp([7], 3.0, positions=[2, 4])]),
        saes.splice(sae, keep_error=False),
        saes.splice(topk, edit=saes.FeatureClamp([1, 2], 4.0)),
        saes.splice(tc, edit=saes.FeatureSteer([0, 9], 1.5)),
        saes.splice(tc, keep_error=False),
        saes.splice(sae, edit=lambda f: f * 0.5),  # a callable: the general path, through the backend
        saes.splice(sae, edit=Doubled([4, 5])),  # an edit class without a table: the general path too
    ]
    for interventions in cases:
        with torch.no_grad():
            a, b = both_backends(lambda iv=interventions: tiny_im.run(ids, interventions=iv))
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    # fused: every case but the last two (TopK splices too, their selection in torch); those encode in Triton
    assert calls["splice_rows"] == 6 and calls["encode_threshold"] == 7, calls
    # with autograd: the general path (Triton encode and decode, torch backward), gradients for the SAE
    def grads() -> list[torch.Tensor]:
        for p in sae.parameters():
            p.grad = None
        logits = tiny_im.run(ids, interventions=saes.splice(sae, edit=saes.FeatureSteer([0, 1, 2], 1.0)))
        logits[:, -1].logsumexp(-1).sum().backward()
        return [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec) if p.grad is not None]

    ga, gb = both_backends(grads)
    assert len(ga) == len(gb) == 3
    assert calls["splice_rows"] == 6 and calls["encode_threshold"] == 8, calls  # the general path, in Triton
    for x, y in zip(gb, ga, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@interpreted
@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_training_same_through_either_backend(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from saes.train import TrainConfig, train_sae

    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    cfg = TrainConfig(d_sae=32, architecture=arch, k=4 if arch == "topk" else None, batch_size=32, steps=3,
                      lr=1e-2, lr_warmup_steps=1, scale_batches=1, log_every=1)
    calls = count_calls(monkeypatch, "decode_rows", "decode_rows_backward")
    a, b = both_backends(lambda: train_sae(x, cfg).sae.state_dict())
    if arch == "topk":  # the TopK step decodes sparsely; JumpReLU keeps the dense GEMM (saes.kernels docs)
        assert calls["decode_rows"] >= 3 and calls["decode_rows_backward"] >= 3, calls
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


@interpreted
def test_graph_same_through_either_backend(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    """The graph's decodes go through the dispatch, which takes the dense GEMM there (its features need gradients)."""
    from mishax_py.circuits import attribution_graph


    tcs = [make_sae(saes.Transcoder, site=f"blocks.{L}.ln2_normalized", output_site=f"blocks.{L}.mlp_out")
           for L in range(2)]
    a, b = both_backends(lambda: attribution_graph(tiny_im, ids[:1, :6], tcs, max_feature_nodes=16))
    assert torch.equal(b.features, a.features)
    torch.testing.assert_close(b.activations, a.activations, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.adjacency, a.adjacency, rtol=0, atol=1e-4)


@interpreted
def test_feature_circuit_same_through_either_backend(
    tiny_im: InstrumentedModel, ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Feature circuits encode and decode through the dispatch (Triton: the fused encode with its torch backward)."""
    from mishax_py.circuits import feature_circuit

    calls = count_calls(monkeypatch, "encode_threshold")
    sae_map = {s: make_sae(saes.ReLUSAE, site=s) for s in ("blocks.0.resid_post", "blocks.1.resid_post")}
    corrupt = ids.clone()
    corrupt[:, 3] = 7

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, 5] - logits[:, -1, 9]).mean()

    a, b = both_backends(lambda: feature_circuit(tiny_im, ids, corrupt, metric, saes=sae_map, top_k=4))
    for site in a.effects:
        torch.testing.assert_close(b.effects[site], a.effects[site], rtol=1e-4, atol=1e-5)
    assert calls["encode_threshold"] > 0
    assert a.nodes == b.nodes and a.edges.keys() == b.edges.keys()
    for key, value in a.edges.items():
        assert abs(b.edges[key] - value) <= 1e-4 * max(1.0, abs(value))


# -------------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernels_match_torch(dtype: torch.dtype) -> None:
    """Compiled kernels on CUDA at a Gemma-Scope-like shape against the torch backend on the same device."""
    dev = torch.device("cuda")
    W, b, thr = (t.to(dev) for t in weights(256, 4096, dtype))
    x = torch.randn(64, 256, device=dev).to(dtype)
    sp_t = tk.encode_threshold(x, W, b, thr, cap=64)
    pre, want = reference_encode(x, W, b, thr)
    got = kernels.SparseFeatures(*sp_t, d_sae=4096).to_dense()
    near = (pre.float() - thr.clamp(min=0).float()).abs() <= 2 * TOL[dtype] * max(1.0, float(pre.abs().max()))
    assert torch.equal((got != 0) | near, (want != 0) | near)
    sp = kernels.SparseFeatures.from_dense(want)
    Wd, bd = W.T.contiguous(), torch.randn(256, device=dev).to(dtype)
    close(tk.decode_rows(sp.indices, sp.values, sp.counts, Wd, bd), want.float() @ Wd.float() + bd.float(), dtype,
          "decode")
    table = edit_table(64)
    table = kernels.EditTable(table.ids.to(dev), table.values.to(dev), table.sets.to(dev))
    out, err = tk.splice_rows(sp.indices, sp.values, sp.counts, Wd, bd, x, table.ids, table.values, table.sets,
                              keep_error=True)
    with kernels.backend("torch"):
        want_out, want_err = kernels.splice_rows(x, sp, Wd, bd, table, want_error=True)
    assert err is not None and want_err is not None
    close(out, want_out, dtype, "splice")
    close(err, want_err, dtype, "error")


@pytest.mark.gpu
@needs_cuda
def test_gpu_auto_backend_is_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    assert kernels.resolve_backend("cuda") == "triton"
    sae = make_sae(site="blocks.1.resid_post").cuda()
    x = torch.randn(3, 7, D_MODEL, device="cuda")
    with torch.no_grad():
        a = sae.encode(x)
        with kernels.backend("torch"):
            b = sae.encode(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_gpu_benchmark_runs() -> None:
    """benchmarks/sae_kernels.py's GPU path (Triton rows, the spliced model and the sweep) at smoke sizes."""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/sae_kernels.py", "--smoke", "--device", "cuda"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for want in ("triton fused->sparse", "triton gather-sum", "triton fused", "spliced, triton backend",
                 "ablations, triton backend"):
        assert want in proc.stdout, want
