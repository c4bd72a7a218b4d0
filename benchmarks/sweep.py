"""``sweep``: many intervention variants batched vs one ``im.run`` per variant, measured in one run.

    python benchmarks/sweep.py            # 12 layers, d_model 768, batch 2 x 32 tokens
    python benchmarks/sweep.py --quick    # 4 layers, d_model 256 (smoke test)

Two experiment sets, each timed four ways (fp32, ``torch.no_grad()``, the same metric):

* heads -- zero-ablate every (layer, head) of ``attn.z`` (n_layers x n_heads variants, all positions);
* patch -- patch ``resid_pre`` at every (layer, position) from another run's cache
  (n_layers x n_pos variants; each edits one position).

Modes: ``loop`` (baseline: one ``im.run`` per variant), ``batched`` (``sweep`` stacking only:
``share_prefix=False, share_positions=False``), ``+prefix`` (layers before a chunk's earliest edit
computed once) and ``+positions`` (positions before a chunk's earliest edit from a KV cache, the
default). Every mode's results must equal the loop's to 1e-4 (fp32, batched matmuls reassociate).
Prints seconds and the speed-up over the loop.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from common import build, machine  # noqa: E402 - benchmarks/ is on sys.path when run as a script

import instrumentation.gemma2 as g2
from mishax_py.interventions import Ablate, Patch

SPECS = {
    "full": dict(layers=12, d_model=768, heads=12, kv_heads=4, d_head=64, d_mlp=3072, vocab=2048, batch=2, pos=32),
    "quick": dict(layers=4, d_model=256, heads=4, kv_heads=2, d_head=64, d_mlp=1024, vocab=512, batch=2, pos=16),
}






def timed(fn: Callable[[], list]) -> tuple[float, list]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward (default: sweep's heuristic)")
    args = parser.parse_args()
    spec = SPECS["quick" if args.quick else "full"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    im = g2.instrument(build(spec).to(device))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, spec["vocab"], (spec["batch"], spec["pos"]), generator=g).to(device)
    other = torch.randint(4, spec["vocab"], (spec["batch"], spec["pos"]), generator=g).to(device)
    target = int(ids[0, -1])
    metric = lambda logits: logits[:, -1].log_softmax(-1)[:, target].mean()  # noqa: E731

    with torch.no_grad():
        _, src = im.run_with_cache(other, sites="blocks.*.resid_pre")
    L, H, T = spec["layers"], spec["heads"], spec["pos"]
    sets = {
        "heads": [{f"blocks.{layer}.attn.z": Ablate(heads=[h])} for layer in range(L) for h in range(H)],
        "patch": [{f"blocks.{layer}.resid_pre": Patch(src, positions=[p])} for layer in range(L) for p in range(T)],
    }
    modes: dict[str, Callable[[list], list]] = {
        "loop": lambda vs: [metric(im.run(ids, v)) for v in vs],
        "batched": lambda vs: im.sweep(ids, vs, metric=metric, batch_size=args.batch_size, progress=False,
                                       share_prefix=False, share_positions=False),
        "+prefix": lambda vs: im.sweep(ids, vs, metric=metric, batch_size=args.batch_size, progress=False,
                                       share_positions=False),
        "+positions": lambda vs: im.sweep(ids, vs, metric=metric, batch_size=args.batch_size, progress=False),
    }
    print(f"machine: {machine()}")
    print(f"model: {L} layers, d_model {spec['d_model']}, batch {spec['batch']} x {T} tokens, device {device}")
    with torch.no_grad():
        im.run(ids)  # warm-up
        for name, variants in sets.items():
            times: dict[str, float] = {}
            ref: list | None = None
            for mode, fn in modes.items():
                times[mode], out = timed(lambda fn=fn, variants=variants: fn(variants))
                values = torch.stack([torch.as_tensor(o).float().cpu() for o in out])
                if ref is None:
                    ref = values
                elif not torch.allclose(values, ref, atol=1e-4, rtol=0):
                    diff = float((values - ref).abs().max())
                    raise SystemExit(f"{name}/{mode}: results differ from the loop by {diff}")
            base = times["loop"]
            row = "  ".join(f"{m} {t:7.2f}s ({base / t:5.2f}x)" for m, t in times.items())
            print(f"{name:6s} {len(variants):4d} variants: {row}")


if __name__ == "__main__":
    main()
