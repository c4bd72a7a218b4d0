"""SAE kernels by backend: per-kernel time, achieved bandwidth and FLOPs, and spliced forwards on a GPU.

    python benchmarks/sae_kernels.py                  # CUDA if present (torch vs Triton), else CPU (torch only)
    python benchmarks/sae_kernels.py --quick          # fewer shapes
    python benchmarks/sae_kernels.py --smoke          # tiny shapes: every path runs (the gpu-marked test uses it)
    python benchmarks/sae_kernels.py --out FILE       # also write the report to FILE

(Not ``benchmarks/kernels.py``: the other benchmark scripts run with this folder on ``sys.path``, and
transformers probes for a ``kernels`` package at import -- it would import this script instead.)

Sections (every candidate is checked against the torch result before it is timed):

1. kernels -- at Gemma Scope shapes (d_in 2,304 / 3,584, width 16k to 1M, L0 20 to 200, fp32 and
   bf16), per kernel and implementation: time, achieved bandwidth (of the bytes that
   implementation must move: its inputs, its outputs, and for torch the dense ``[tokens, width]``
   intermediates it writes and reads back), TFLOP/s, and its FLOPs as a share of the dense
   computation. Implementations: ``encode`` -- torch (``addmm`` + JumpReLU ``where``, dense
   output) vs Triton fused (GEMM + threshold epilogue, sparse output); ``decode`` -- torch dense
   (``f @ W_dec + b``), torch ``embedding_bag`` (gather of the active rows) vs Triton gather-sum;
   ``decode fwd+bwd`` -- ``embedding_bag`` vs Triton with its backward; ``splice`` -- the torch
   splice (dense encode, edit, sparse decode of the change) vs the fused Triton splice.
   On CPU only torch runs (Triton compiles for CUDA), and widths above 65,536 are skipped
   (``W_enc`` alone is 2.4 to 15 GB).
2. model -- a Gemma-2-2B-shaped bf16 forward (random weights) with three 16k JumpReLU SAEs spliced
   (an ablation each, so every splice computes) against the plain forward, per backend; the goal
   is <= 1.15x. CUDA only.
3. sweep -- 256 single-feature ablations of a 16k SAE as one 256-row forward (per-row
   ``FeatureAblate``) on the same model, per backend, against the plain 256-row forward. CUDA
   only (benchmarks/saes.py measures the CPU sweep on a tiny model).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Run as a script, this file's folder is sys.path[0] and this file would shadow the ``saes``
# package; drop the folder and make sure the repository root is importable instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
sys.modules.pop("saes", None)

import torch  # noqa: E402

import saes  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from saes import kernels  # noqa: E402
from saes.base import init_tied  # noqa: E402

LINES: list[str] = []


def say(text: str = "") -> None:
    """Print and keep the line for ``--out``."""
    print(text, flush=True)
    LINES.append(text)


def bench(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` (CUDA: synchronised around each call)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@contextmanager
def use(backend: str) -> Iterator[None]:
    with kernels.backend(backend), torch.no_grad():
        yield


# ------------------------------------------------------------------------------ kernels
def make_case(d: int, width: int, l0: int, dtype: torch.dtype, n: int, device: torch.device) -> dict:
    """Random SAE weights, inputs ``[n, d]`` and a threshold giving about ``l0`` active features per token."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    W_enc = torch.empty(d, width, dtype=dtype, device=device)
    for c in range(0, width, 65536):  # chunked: no fp32 copy of a 1M-wide matrix on the host
        W_enc[:, c : c + 65536] = (torch.randn(d, min(65536, width - c), generator=g) / d**0.5).to(device, dtype)
    b_enc = torch.zeros(width, dtype=dtype, device=device)
    pre = kernels.linear(x[: min(n, 64)], W_enc, b_enc).float()
    q = 1.0 - l0 / width
    cut = float(torch.quantile(pre.flatten()[:16_000_000].cpu(), q)) if pre.numel() else 0.0
    thr = torch.full((width,), cut, dtype=dtype, device=device)
    W_dec = W_enc.T.contiguous()
    b_dec = torch.zeros(d, dtype=dtype, device=device)
    return {"x": x, "W_enc": W_enc, "b_enc": b_enc, "thr": thr, "W_dec": W_dec, "b_dec": b_dec}


def row(kernel: str, impl: str, t: float, nbytes: float, flops: float, dense_flops: float) -> str:
    return (f"  {kernel:<15} {impl:<22} {t * 1e3:10.3f} ms {nbytes / t / 1e9:9.1f} GB/s {flops / t / 1e12:8.2f} TFLOP/s"
            f" {flops / dense_flops:9.2%}")


def check(got: torch.Tensor, want: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    scale = max(1.0, float(want.float().abs().max()))
    err = float((got.float() - want.float()).abs().max())
    if err > tol * scale:
        raise AssertionError(f"{what}: Triton differs from torch by {err:.3g} (> {tol * scale:.3g})")


def kernel_rows(case: dict, l0_label: int, dtype: torch.dtype, triton: bool, reps: int) -> None:
    x, W_enc, b_enc, thr, W_dec, b_dec = (case[k] for k in ("x", "W_enc", "b_enc", "thr", "W_dec", "b_dec"))
    dev = x.device
    n, d = x.shape
    width = W_enc.shape[1]
    e = x.element_size()
    with use("torch"):
        f = kernels.linear(x, W_enc, b_enc)
        f = kernels.jumprelu(f, thr)
        sp = kernels.SparseFeatures.from_dense(f)
    l0 = float(sp.counts.float().mean())
    say(f" d_in {d}, width {width}, L0 {l0:.0f} (asked {l0_label}), {str(dtype).removeprefix('torch.')}, "
        f"{n} tokens")
    gemm = 2.0 * n * d * width
    io = n * d * e + d * width * e + 2 * width * e  # x, W, b, threshold
    nnz = float(sp.counts.sum())
    sparse_out = nnz * (8 + e) + n * 4
    # encode
    with use("torch"):
        t = bench(lambda: kernels.jumprelu(kernels.linear(x, W_enc, b_enc), thr), dev, reps)
    say(row("encode", "torch addmm+where", t, io + 3 * n * width * e, gemm, gemm))
    if triton:
        with use("triton"):
            got = kernels.encode_sparse(x, W_enc, b_enc, activation="jumprelu", threshold=thr)
            agree = float(((got.to_dense() != 0) == (f != 0)).float().mean())
            if agree < 0.999:
                raise AssertionError(f"encode: Triton's active set agrees with torch's on only {agree:.4%}")
            t = bench(lambda: kernels.encode_sparse(x, W_enc, b_enc, activation="jumprelu", threshold=thr), dev,
                      reps)
        say(row("encode", "triton fused->sparse", t, io + sparse_out, gemm, gemm))
    # decode
    gathered = nnz * d * e + sparse_out + n * d * e
    with use("torch"):
        want = kernels.decode_dense(f, W_dec, b_dec)
        t = bench(lambda: kernels.decode_dense(f, W_dec, b_dec), dev, reps)
        say(row("decode", "torch dense addmm", t, n * width * e + width * d * e + n * d * e, gemm, gemm))
        check(kernels.decode_rows(sp, W_dec, b_dec), want, "embedding_bag decode", dtype)
        t = bench(lambda: kernels.decode_rows(sp, W_dec, b_dec), dev, reps)
        say(row("decode", "torch embedding_bag", t, gathered, 2 * nnz * d, gemm))
    if triton:
        with use("triton"):
            check(kernels.decode_rows(sp, W_dec, b_dec), want, "decode", dtype)
            t = bench(lambda: kernels.decode_rows(sp, W_dec, b_dec), dev, reps)
        say(row("decode", "triton gather-sum", t, gathered, 2 * nnz * d, gemm))
    # decode forward + backward (values, W_dec, b_dec)
    g_out = torch.randn(n, d, device=dev, dtype=dtype)

    def fwd_bwd() -> None:
        vals = sp.values.detach().requires_grad_()
        W = W_dec.detach().requires_grad_()
        b = b_dec.detach().requires_grad_()
        with torch.enable_grad():
            out = kernels.decode_rows(kernels.SparseFeatures(sp.indices, vals, sp.counts, width), W, b)
            out.backward(g_out)

    bwd_bytes = 2 * gathered + nnz * d * 4 * 2  # fwd + bwd gathers, fp32 W_dec gradient read-modify-write
    for name in ("torch", "triton") if triton else ("torch",):
        with kernels.backend(name):
            t = bench(fwd_bwd, dev, reps)
        impl = "torch embedding_bag" if name == "torch" else "triton gather-sum"
        say(row("decode fwd+bwd", impl, t, bwd_bytes, 6 * nnz * d, 3 * gemm))
    # splice: an ablation of 8 features per token, error kept
    sae = saes.JumpReLUSAE(d, width, dtype=dtype, device=dev)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc), sae.W_dec.copy_(W_dec), sae.threshold.copy_(thr)
    edit = saes.FeatureAblate(list(range(8)))

    def splice_torch() -> torch.Tensor:  # what Splice does on the torch backend
        fd = sae.encode(x)
        delta = kernels.decode(saes.edits.apply_edit(edit, fd) - fd, W_dec, torch.zeros_like(b_dec), mode="sparse")
        return x + delta

    table = kernels.EditTable(torch.arange(8, device=dev)[None], torch.zeros(1, 8, device=dev),
                              torch.ones(1, 8, dtype=torch.bool, device=dev))

    def splice_triton() -> torch.Tensor:
        return kernels.splice_rows(x, sae.encode_sparse(x), W_dec, b_dec, table, keep_error=True)[0]

    with use("torch"):
        want = splice_torch()
        t = bench(splice_torch, dev, reps)
    say(row("splice", "torch encode+edit+dec", t, io + 3 * n * width * e + gathered, gemm + 2 * nnz * d, gemm))
    if triton:
        with use("triton"):
            check(splice_triton(), want, "splice", dtype)
            t = bench(splice_triton, dev, reps)
        say(row("splice", "triton fused", t, io + sparse_out + gathered, gemm + 2 * nnz * d, gemm))


def section_kernels(device: torch.device, triton: bool, size: str) -> None:
    cpu = device.type == "cpu"
    if size == "smoke":
        dims, widths, l0s, dtypes, tokens, reps = (64,), (512,), (8,), (torch.float32, torch.bfloat16), 16, 1
    elif size == "quick":
        dims, widths, l0s = (2304,), ((16384,) if cpu else (16384, 262144)), (20, 70)
        dtypes, tokens, reps = (torch.float32, torch.bfloat16), (128 if cpu else 4096), (2 if cpu else 10)
    else:
        dims, l0s, dtypes = (2304, 3584), (20, 70, 200), (torch.float32, torch.bfloat16)
        widths = (16384, 65536) if cpu else (16384, 65536, 262144, 1048576)
        tokens, reps = (256 if cpu else 4096), (3 if cpu else 10)
    say(f"\n[kernels] {'torch vs Triton' if triton else 'torch backend only (CPU: the Triton kernels need CUDA)'}"
        f" on {device}")
    if cpu and size != "smoke":
        say("  widths 262144 and 1048576 are not measured on CPU (W_enc alone is 2.4-15 GB); run on a CUDA machine")
    say(f"  {'kernel':<15} {'implementation':<22} {'time':>13} {'bandwidth':>14} {'compute':>16} {'of dense':>9}")
    for d in dims:
        for width in widths:
            for dtype in dtypes:
                for l0 in l0s:
                    n = tokens if width <= 65536 else max(tokens // 4, 16)
                    case = make_case(d, width, l0, dtype, n, device)
                    kernel_rows(case, l0, dtype, triton, reps)
                    del case
                    if device.type == "cuda":
                        torch.cuda.empty_cache()


# ------------------------------------------------------------------------- model + sweep
def gemma2_2b(device: torch.device, smoke: bool) -> tuple[object, int]:
    """An instrumented random-weight Gemma 2 2B (bf16; ``smoke``: 2 layers, small vocab) and its width."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    import instrumentation.gemma2 as g2

    cfg = Gemma2Config(
        vocab_size=4096 if smoke else 256000, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=2 if smoke else 26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        sliding_window=4096, query_pre_attn_scalar=256, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Gemma2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    return g2.instrument(model), cfg.hidden_size


def spliced_saes(im: object, layers: tuple[int, ...], width: int, d: int, device: torch.device, ids: torch.Tensor,
                 l0: int = 70) -> list[saes.JumpReLUSAE]:
    """JumpReLU SAEs at ``resid_post`` of ``layers`` with thresholds set for about ``l0`` active features."""
    sites = [f"blocks.{L}.resid_post" for L in layers]
    with torch.no_grad():
        _, cache = im.run_with_cache(ids[:1], sites=sites)  # type: ignore[attr-defined]
    out = []
    for L, site in zip(layers, sites, strict=True):
        sae = saes.JumpReLUSAE(d, width, site=site, dtype=torch.bfloat16, device=device)
        init_tied(sae, generator=torch.Generator().manual_seed(L))
        with torch.no_grad():
            pre = sae.pre_acts(cache[site]).float().flatten()
            sae.threshold.fill_(float(torch.quantile(pre[:16_000_000].cpu(), 1 - l0 / width)))
        sae.requires_grad_(False)
        out.append(sae)
    return out


def section_model(device: torch.device, triton: bool, size: str) -> None:
    say("\n[model] Gemma-2-2B-shaped bf16 forward, three 16k JumpReLU SAEs spliced (one ablation each) vs plain")
    smoke = size == "smoke"
    if device.type != "cuda" and not smoke:
        say("  not measured on CPU (a 2.6B-parameter bf16 forward; run on a CUDA machine: scripts/gpu_check.sh)")
        return
    if smoke:
        say("  smoke run: 2 layers, vocab 4096, 1024-wide SAEs (checks the code path; the numbers mean nothing)")
    im, d = gemma2_2b(device, smoke)
    batch, pos = (1, 16) if smoke else (8, 256)
    ids = torch.randint(4, 4096, (batch, pos), generator=torch.Generator().manual_seed(1)).to(device)
    layers = (0, 1, 1) if smoke else (6, 12, 18)
    sae_list = spliced_saes(im, layers[:2] if smoke else layers, 1024 if smoke else 16384, d, device, ids)
    reps = 1 if smoke else 10

    def run(splice: bool) -> torch.Tensor:
        iv = {s.site: saes.Splice(s, edit=saes.FeatureAblate([0, 1, 2])) for s in sae_list} if splice else None
        return im.run(ids, interventions=iv)  # type: ignore[attr-defined]

    with torch.no_grad():
        plain = bench(lambda: run(False), device, reps)
        say(f"  {batch} x {pos} tokens: plain forward {plain * 1e3:.1f} ms")
        results = {}
        for name in ("torch", "triton") if triton else ("torch",):
            with kernels.backend(name):
                results[name] = run(True)
                t = bench(lambda: run(True), device, reps)
            say(f"  spliced, {name} backend: {t * 1e3:.1f} ms  ->  {t / plain:.3f}x plain (goal <= 1.15x)")
        if "triton" in results:
            diff = float((results["triton"].float() - results["torch"].float()).abs().max())
            say(f"  triton vs torch logits: max abs diff {diff:.3g}")


def section_sweep(device: torch.device, triton: bool, size: str) -> None:
    n_feat = 256
    say(f"\n[sweep] {n_feat} single-feature ablations of a 16k SAE as one {n_feat}-row forward, Gemma-2-2B-shaped bf16")
    smoke = size == "smoke"
    if device.type != "cuda" and not smoke:
        say("  not measured on CPU (benchmarks/saes.py --only sae-sweep measures the CPU sweep on a tiny model)")
        return
    if smoke:
        say("  smoke run: 2 layers, 16 rows, a 1024-wide SAE (checks the code path; the numbers mean nothing)")
    im, d = gemma2_2b(device, smoke)
    pos = 8 if smoke else 32
    n_rows = 16 if smoke else n_feat
    prompt = torch.randint(4, 4096, (1, pos), generator=torch.Generator().manual_seed(2)).to(device)
    (sae,) = spliced_saes(im, (1 if smoke else 12,), 1024 if smoke else 16384, d, device, prompt)
    batch = prompt.repeat(n_rows, 1)
    edit = saes.FeatureAblate(torch.arange(n_rows, device=device)[:, None])
    reps = 1 if smoke else 10
    with torch.no_grad():
        plain = bench(lambda: im.run(batch), device, reps)  # type: ignore[attr-defined]
        say(f"  plain {n_rows}-row forward ({n_rows} x {pos} tokens): {plain * 1e3:.1f} ms")
        outs = {}
        for name in ("torch", "triton") if triton else ("torch",):
            with kernels.backend(name):
                outs[name] = im.run(batch, interventions={sae.site: saes.Splice(sae, edit=edit)})  # type: ignore
                t = bench(lambda: im.run(batch, interventions={sae.site: saes.Splice(sae, edit=edit)}),  # type: ignore
                          device, reps)
            say(f"  {n_rows} ablations, {name} backend: {t * 1e3:.1f} ms  ->  {t / plain:.3f}x plain")
        if "triton" in outs:
            diff = float((outs["triton"].float() - outs["torch"].float()).abs().max())
            say(f"  triton vs torch logits: max abs diff {diff:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: every path runs once")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1)")
    parser.add_argument("--only", choices=["kernels", "model", "sweep"], action="append")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    # CPU: Triton only in its interpreter (TRITON_INTERPRET=1 before start), and only for --smoke (it is slow)
    triton = kernels.triton_unavailable(device) is None and (device.type == "cuda" or size == "smoke")
    say(f"machine: {machine()}")
    if device.type == "cuda":
        say(f"device: {torch.cuda.get_device_name(device)}; Triton: "
            f"{'yes' if triton else 'no (' + str(kernels.triton_unavailable(device)) + ')'}")
    elif triton:
        say("device: cpu, Triton in its interpreter (TRITON_INTERPRET=1): checks the Triton paths; times mean nothing")
    else:
        say("device: cpu -- the torch backend only; GPU numbers are not measured here")
    sections = {"kernels": section_kernels, "model": section_model, "sweep": section_sweep}
    for name, fn in sections.items():
        if args.only is None or name in args.only:
            fn(device, triton, size)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
