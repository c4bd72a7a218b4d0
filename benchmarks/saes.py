"""SAE kernels and SAE sweeps, each against a baseline measured in the same run.

    python benchmarks/saes.py              # full sizes (Gemma Scope 16k on Gemma 2 2B widths)
    python benchmarks/saes.py --quick      # smaller, for a smoke test
    python benchmarks/saes.py --threads 2  # intra-op threads (default 1: stable on a shared machine)

Sections (every result is checked against its baseline before it is timed):

1. decode -- sparse (``embedding_bag`` gather of active decoder rows) vs dense (``f @ W_dec``) at
   L0 ~ 70 of d_sae 16384, d_in 2304 (Gemma Scope 2B residual, 16k), fp32; and a density sweep
   that locates the crossover behind ``saes.kernels.SPARSE_DECODE_MAX_DENSITY``.
2. encode -- the fused JumpReLU (``addmm`` + one ``where`` against ``max(threshold, 0)``) vs the
   textbook ``x @ W_enc + b_enc`` then ``(pre > threshold) * relu(pre)``: the activation step alone
   and the whole encode (dominated by the GEMM).
3. cpu-half -- a bf16 GEMM run natively vs upcast to fp32 (why CPU half-precision SAEs compute
   their GEMMs in fp32).
4. sae-sweep -- ablate each of 256 SAE features, one per variant, on a small random Gemma 2
   (2 layers, d_model 64, 4 heads / 2 KV heads of 16, vocab 128, eager attention):
   baseline = 256 separate ``im.run`` calls; ``rows`` = one ``im.run`` over 256 rows with per-row
   ``FeatureAblate(torch.arange(256)[:, None])``; ``im.sweep`` = 256 variants through the sweep API.

Prints times and ratios (baseline / candidate; > 1 means the candidate is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

# Run as a script, this file's folder is sys.path[0] and this file would shadow the ``saes``
# package; drop the folder and make sure the repository root is importable instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
sys.modules.pop("saes", None)

import torch  # noqa: E402
from transformers import Gemma2Config, Gemma2ForCausalLM  # noqa: E402

import instrumentation.gemma2 as g2  # noqa: E402
import saes  # noqa: E402
from benchmarks.common import machine  # noqa: E402 - the repo root is on sys.path (above)
from saes import kernels  # noqa: E402
from saes.base import init_tied  # noqa: E402


def bench(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def features(n: int, d_sae: int, l0: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, d_sae, generator=g) < l0 / d_sae
    return (mask * (0.5 + torch.rand(n, d_sae, generator=g))).to(dtype)


def section_decode(quick: bool) -> None:
    d_sae, d_in, n, l0 = (4096, 576, 128, 70) if quick else (16384, 2304, 256, 70)
    reps = 3 if quick else 5
    print(f"\n[decode] d_sae={d_sae} d_in={d_in} tokens={n}")
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d_sae, d_in, generator=g) / d_in**0.5
    b = torch.zeros(d_in)
    f = features(n, d_sae, l0, torch.float32)
    dense, sparse = kernels.decode_dense(f, W, b), kernels.decode_sparse(f, W, b)
    assert torch.allclose(dense, sparse, atol=1e-4), "sparse decode disagrees with dense"
    with torch.no_grad():
        td = bench(lambda: kernels.decode_dense(f, W, b), reps)
        ts = bench(lambda: kernels.decode_sparse(f, W, b), reps)
    actual = (f != 0).sum(-1).float().mean().item()
    print(f"  L0 {actual:.1f} (density {actual / d_sae:.2%}), fp32: dense {td * 1e3:.1f} ms, "
          f"sparse {ts * 1e3:.1f} ms  ->  sparse/dense speed-up {td / ts:.1f}x")  # fmt: skip
    print("  density sweep (dense/sparse ratio; > 1: sparse wins):")
    crossover = None
    for density in (0.005, 0.01, 0.02, 0.04, 0.08, 0.16):
        fd = features(n, d_sae, density * d_sae, torch.float32, seed=1)
        with torch.no_grad():
            r = bench(lambda fd=fd: kernels.decode_dense(fd, W, b), reps) / bench(
                lambda fd=fd: kernels.decode_sparse(fd, W, b), reps
            )
        if r >= 1.0:
            crossover = density
        print(f"    density {density:6.1%}: {r:5.2f}x")
    print(f"  sparse wins up to density ~{crossover:.1%}" if crossover else "  sparse never wins here")
    print(f"  saes.kernels.SPARSE_DECODE_MAX_DENSITY = {kernels.SPARSE_DECODE_MAX_DENSITY:.1%}")


def section_encode(quick: bool) -> None:
    d_sae, d_in, n = (4096, 576, 128) if quick else (16384, 2304, 256)
    reps = 3 if quick else 5
    print(f"\n[encode] JumpReLU d_sae={d_sae} d_in={d_in} tokens={n}, fp32")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=g)
    W = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    b = torch.zeros(d_sae)
    thr = torch.full((d_sae,), 2.6)

    def textbook() -> torch.Tensor:
        pre = x @ W + b
        return (pre > thr) * torch.relu(pre)

    pre = x @ W + b
    with torch.no_grad():
        assert torch.equal(textbook(), kernels.jumprelu_encode(x, W, b, thr))
        ta = bench(lambda: (pre > thr) * torch.relu(pre), reps * 3)
        tfa = bench(lambda: kernels.jumprelu(pre, thr), reps * 3)
        tt = bench(textbook, reps)
        tf = bench(lambda: kernels.jumprelu_encode(x, W, b, thr), reps)
    print(
        f"  activation step: textbook {ta * 1e3:.2f} ms, fused where {tfa * 1e3:.2f} ms"
        f"  ->  speed-up {ta / tfa:.1f}x"
    )
    print(
        f"  whole encode (GEMM-bound): textbook {tt * 1e3:.1f} ms, fused {tf * 1e3:.1f} ms"
        f"  ->  {tt / tf:.2f}x"
    )


def section_cpu_half(quick: bool) -> None:
    n, k, m = (16, 576, 1024) if quick else (32, 2304, 4096)
    print(f"\n[cpu-half] bf16 GEMM [{n}x{k}] @ [{k}x{m}]")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, k, generator=g).bfloat16()
    w = torch.randn(k, m, generator=g).bfloat16()
    with torch.no_grad():
        tn = bench(lambda: a @ w, 2)
        tu = bench(lambda: (a.float() @ w.float()).bfloat16(), 2)
    print(
        f"  native bf16 {tn * 1e3:.1f} ms, fp32 upcast {tu * 1e3:.1f} ms  ->  upcast speed-up {tn / tu:.1f}x"
    )


def section_sweep(quick: bool) -> None:
    n_feat, pos = (64, 8) if quick else (256, 16)
    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=64,
        attn_implementation="eager",
    )  # fmt: skip
    im = g2.instrument(Gemma2ForCausalLM(cfg).eval())
    sae = saes.JumpReLUSAE(64, n_feat, site="blocks.1.resid_post")
    init_tied(sae, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.threshold.fill_(0.05)
    sae.requires_grad_(False)
    site = sae.site
    prompt = torch.randint(4, 128, (1, pos), generator=torch.Generator().manual_seed(1))
    print(f"\n[sae-sweep] ablate each of {n_feat} features of a {n_feat}-feature SAE at {site}; "
          f"tiny Gemma 2, 1 x {pos} tokens")  # fmt: skip

    def loop() -> torch.Tensor:
        return torch.cat([
            im.run(prompt, interventions={site: saes.Splice(sae, edit=saes.FeatureAblate([i]))})
            for i in range(n_feat)
        ])  # fmt: skip

    per_row = saes.FeatureAblate(torch.arange(n_feat)[:, None])
    batch_ids = prompt.repeat(n_feat, 1)

    def rows() -> torch.Tensor:
        return im.run(batch_ids, interventions={site: saes.Splice(sae, edit=per_row)})

    variants = [{site: saes.Splice(sae, edit=saes.FeatureAblate([i]))} for i in range(n_feat)]

    def swept() -> torch.Tensor:
        return im.sweep(prompt, variants, batch_size=n_feat, progress=False).flatten(0, 1)

    with torch.no_grad():
        ref = loop()
        assert (rows() - ref).abs().max().item() <= 1e-4, "per-row batch disagrees with separate runs"
        assert (swept() - ref).abs().max().item() <= 1e-4, "im.sweep disagrees with separate runs"
        changed = int(((ref - im.run(prompt)).abs().amax((1, 2)) > 1e-6).sum())
        reps = 3
        tl, tr, ts = bench(loop, reps), bench(rows, reps), bench(swept, reps)
    print(
        f"  {changed}/{n_feat} ablations change the logits; all {n_feat} variants equal separate runs (1e-4)"
    )
    print(f"  loop of {n_feat} im.run: {tl * 1e3:.0f} ms")
    print(
        f"  one im.run, {n_feat} rows, per-row FeatureAblate: {tr * 1e3:.0f} ms  ->  speed-up {tl / tr:.1f}x"
    )
    print(f"  im.sweep, {n_feat} variants: {ts * 1e3:.0f} ms  ->  speed-up {tl / ts:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--only", choices=["decode", "encode", "cpu-half", "sae-sweep"], action="append")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    sections = {
        "decode": section_decode,
        "encode": section_encode,
        "cpu-half": section_cpu_half,
        "sae-sweep": section_sweep,
    }
    for name, fn in sections.items():
        if args.only is None or name in args.only:
            fn(args.quick)


if __name__ == "__main__":
    main()
