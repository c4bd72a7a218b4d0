"""Path patching by head: the batched sweep of ``path_patching_by_head`` vs one head at a time.

    python benchmarks/path_patching.py            # 12 layers, d_model 768, 12 heads, 32 tokens
    python benchmarks/path_patching.py --quick    # a 4-layer model (smoke test)

Both sides compute the same grid: for every sender head (layer, head), the three-step path
patching of Wang et al. (IOI) into the queries of the last layer's heads at the final position
(``receiver_positions=[-1]``), MLPs frozen. The clean and corrupted caches are computed once on
both sides. The baseline then runs steps 2 and 3 head by head (two forwards per head: what
``path_patching_by_head`` did before it was batched, and what a TransformerLens loop does);
``path_patching_by_head`` runs them as two batched sweeps. Results must agree to 1e-4.
One torch thread by default (see ``benchmarks/patching.py`` for why).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import build, describe, machine, prompt_pairs  # noqa: E402 - benchmarks/ is on sys.path when run as a script

import instrumentation.gemma2 as g2
from mishax_py.interventions import Patch
from mishax_py.studies.path_patching import path_patching_by_head

SPECS = {
    "full": dict(layers=12, d_model=768, heads=12, kv_heads=4, d_head=64, d_mlp=3072, vocab=512, pos=32),
    "quick": dict(layers=4, d_model=256, heads=4, kv_heads=2, d_head=64, d_mlp=1024, vocab=512, pos=16),
}


def head_by_head(im, clean, corrupt, metric, receivers, receiver_positions) -> torch.Tensor:
    """Steps 2 and 3 written out for one sender head at a time (two forwards per head), caches computed once."""
    n_layers, n_heads = im.n_layers, im.family.dims.n_heads
    recv: dict[str, list[int]] = {}
    for layer, head, kind in receivers:
        recv.setdefault(im.layer_site(layer, f"attn.{kind}"), []).append(head)
    z_sites = [im.layer_site(i, "attn.z") for i in range(n_layers)]
    mlp_sites = [im.layer_site(i, "mlp_out") for i in range(n_layers)]
    out = torch.zeros(n_layers, n_heads)
    with torch.no_grad():
        _, clean_cache = im.run_with_cache(clean, sites=z_sites + mlp_sites)
        _, corrupt_cache = im.run_with_cache(corrupt, sites=z_sites)
        for layer in range(n_layers):
            for head in range(n_heads):
                # 2. the sender head from the corrupted run, every other head and every MLP frozen to clean
                step2 = {z: [Patch(clean_cache[z])] for z in z_sites}
                step2[z_sites[layer]].append(Patch(corrupt_cache[z_sites[layer]], heads=[head]))
                step2.update({m: [Patch(clean_cache[m])] for m in mlp_sites})
                _, step2_cache = im.run_with_cache(clean, sites=list(recv), interventions=step2)
                # 3. the clean run with only the receivers patched
                step3 = {site: Patch(step2_cache[site], heads=heads, positions=receiver_positions)
                         for site, heads in recv.items()}
                out[layer, head] = float(metric(im.run(clean, interventions=step3)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = SPECS["quick" if args.quick else "full"]
    print(f"machine: {machine()}")
    print(f"model: {describe(spec)}")
    im = g2.instrument(build(spec))
    clean, _worst, corrupt, metric = prompt_pairs(spec)  # IOI-like: two names swapped
    last = spec["layers"] - 1
    receivers = [(last, h, "q") for h in range(spec["heads"])]
    kw = dict(freeze_mlps=True, receiver_positions=[-1])
    path_patching_by_head(im, clean[:, :8], corrupt[:, :8], metric, receivers=receivers, layers=[0], **kw)  # warm-up

    t0 = time.perf_counter()
    batched = path_patching_by_head(im, clean, corrupt, metric, receivers=receivers, progress=False, **kw)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop = head_by_head(im, clean, corrupt, metric, receivers, [-1])
    t_loop = time.perf_counter() - t0
    diff = float((batched.values - loop).abs().max())
    n = spec["layers"] * spec["heads"]
    print(f"{n} sender heads: head by head {t_loop:.2f} s ({2 * n} forwards); path_patching_by_head "
          f"{t_batched:.2f} s -> {t_loop / t_batched:.2f}x faster; max abs diff {diff:.2g}")
    if diff > 1e-4:
        raise SystemExit("results differ")


if __name__ == "__main__":
    main()
