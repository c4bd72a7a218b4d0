"""Activation patching (resid_pre by layer × position): mishax-py's packed, batched patching vs the
TransformerLens-style loop of one full forward per patch, measured in the same run.

    python benchmarks/patching.py                # 12 layers, d_model 768, 32 tokens, IOI-like prompt pair
    python benchmarks/patching.py --case both    # also the worst case (a second 384-forward loop)
    python benchmarks/patching.py --quick        # a 4-layer model (smoke test)

The baseline is what TransformerLens's ``get_act_patch_resid_pre`` does: for every (layer, pos),
one forward of the corrupted prompt with a hook on ``blocks.{layer}.resid_pre`` that copies the
clean value at ``pos``. Both sides use fp32 and ``torch.no_grad()``; results must agree to 1e-5.

Two prompt pairs:
* IOI-like (the default) -- the prompts differ at two positions (as when swapping two names), so
  patches before the first difference copy an identical value and are not run (their result is
  exactly the corrupted metric);
* worst case (``--case worst`` / ``both``) -- the corrupted prompt differs from the clean one at
  *every* position, so no patch is skipped and every patch recomputes its whole suffix. The exact
  structure then saves 3.6x of the loop's FLOPs (sum over layers l and positions p of
  (L - l)(P - p) = 78 * 528 token-layers instead of 384 * 12 * 32); the rest of the speed-up is
  batching efficiency, which on a 2-core CPU is about 1.5-2x (much more on a GPU).

Runs with 1 torch thread by default: on a shared machine, OpenMP threads spinning on cores busy
with other jobs slow batch-1 forwards down by 10x or more (which would flatter the ratio). Pass
``--threads 2`` on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from common import build, describe, machine, prompt_pairs  # noqa: E402 - benchmarks/ is on sys.path when run as a script

import instrumentation.gemma2 as g2
from mishax_py.interventions import Hook
from mishax_py.studies.activation_patching import activation_patching

SPECS = {
    "full": dict(layers=12, d_model=768, heads=12, kv_heads=4, d_head=64, d_mlp=3072, vocab=512, pos=32),
    "quick": dict(layers=4, d_model=256, heads=4, kv_heads=2, d_head=64, d_mlp=1024, vocab=512, pos=16),
}






def loop_baseline(im, clean, corrupt, metric, n_layers: int) -> torch.Tensor:
    """TransformerLens's get_act_patch_resid_pre: one full forward per (layer, pos)."""
    _, clean_cache = im.run_with_cache(clean, sites="blocks.*.resid_pre")
    T = clean.shape[1]
    out = torch.zeros(n_layers, T)
    for layer in range(n_layers):
        src = clean_cache[f"blocks.{layer}.resid_pre"]
        for pos in range(T):
            hook = Hook(_copy_at(src, pos))
            out[layer, pos] = float(metric(im.run(corrupt, interventions={f"blocks.{layer}.resid_pre": hook})))
    return out


def _copy_at(src: torch.Tensor, pos: int):
    def hook(value: torch.Tensor) -> torch.Tensor:  # the clean value at `pos`, the corrupted one elsewhere
        value = value.clone()
        value[:, pos] = src[:, pos]
        return value

    return hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 4-layer model")
    parser.add_argument("--case", choices=("ioi", "worst", "both"), default="ioi", help="which prompt pair(s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see the module docs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    spec = SPECS["quick" if args.quick else "full"]
    print(f"machine: {machine()}")
    print(f"model: {describe(spec)}")
    im = g2.instrument(build(spec))
    clean, worst, ioi, metric = prompt_pairs(spec)  # metric: logit difference at the last position
    T = spec["pos"]
    with torch.no_grad():
        activation_patching(im, clean[:, :8], worst[:, :8], metric)  # warm-up
        cases = {"ioi": [("IOI-like (2 positions differ)", ioi)], "worst": [("worst case (all differ)", worst)]}
        chosen = cases["ioi"] + cases["worst"] if args.case == "both" else cases[args.case]
        for name, corrupt in chosen:
            t0 = time.perf_counter()
            fast = activation_patching(im, clean, corrupt, metric, site="resid_pre")
            t_fast = time.perf_counter() - t0
            t0 = time.perf_counter()
            ref = loop_baseline(im, clean, corrupt, metric, spec["layers"])
            t_loop = time.perf_counter() - t0
            err = float((fast.values - ref).abs().max())
            ratio = t_loop / t_fast
            print(f"{name}: loop {t_loop:.2f} s ({spec['layers'] * T} forwards), activation_patching {t_fast:.2f} s, "
                  f"speed-up {ratio:.1f}x, max |diff| {err:.1e}")
            assert err <= 1e-5, f"results differ by {err}"
    print(f"load avg at the end: {os.getloadavg()[0]:.2f}; total wall time {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
