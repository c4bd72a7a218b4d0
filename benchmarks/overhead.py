"""Overhead of instrumentation: idle instrumented and cache-everything forwards vs the unpatched model.

Same weights, same inputs, measured in one run, alternating the three modes so machine
noise hits them alike; prints medians and ratios against the unpatched baseline.

    python benchmarks/overhead.py                  # every config (Gemma 2 and Gemma 3)
    python benchmarks/overhead.py --quick          # fewer repetitions
    python benchmarks/overhead.py --family gemma3  # one family only

Targets (issue 2, and issue 16 for Gemma 3): idle ≤ 1.02× on 12 layers × d_model 768 (batch 4 × 128
tokens), ≤ 1.10× on 4 layers × d_model 256 (batch 1 × 16 tokens); cache-all ≤ 1.15×. The Gemma 3
configs are the same sizes with QK-norm and the 5:1 sliding/global layer pattern (two RoPE bases).

``run_with_cache`` keeps a freed cache's memory for the next run (``mishax_py.memory``);
run with ``MISHAX_PY_KEEP_FREED_MEMORY=0`` to measure glibc's default behaviour instead.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from types import ModuleType

import torch
from common import build, build_gemma3  # noqa: E402 - benchmarks/ is on sys.path when run as a script

import instrumentation.gemma2 as g2
import instrumentation.gemma3 as g3

LARGE = dict(layers=12, d_model=768, heads=12, kv_heads=4, d_head=64, d_mlp=3072, vocab=2048, batch=4, pos=128)
SMALL = dict(layers=4, d_model=256, heads=4, kv_heads=2, d_head=64, d_mlp=1024, vocab=2048, batch=1, pos=16)

# name -> (family, spec, builder, instrumentation module). Gemma 3's 12 layers are 5:1 sliding/global
# (layers 5 and 11 global); its 4-layer config is all sliding (the first global layer is the sixth).
CONFIGS: dict[str, tuple[str, dict[str, int], Callable[[dict[str, int]], torch.nn.Module], ModuleType]] = {
    "12L-d768 (batch 4 x 128)": ("gemma2", LARGE, build, g2),
    "4L-d256 (batch 1 x 16)": ("gemma2", SMALL, build, g2),
    "Gemma 3 12L-d768 (batch 4 x 128)": ("gemma3", LARGE, build_gemma3, g3),
    "Gemma 3 4L-d256 (batch 1 x 16)": ("gemma3", SMALL, build_gemma3, g3),
}


def time_per_call(fn: Callable[[], object], min_seconds: float) -> float:
    """Mean seconds per call over a burst lasting at least ``min_seconds``."""
    fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / n


def bench(name: str, spec: dict[str, int], rounds: int, burst: float, *,
          builder: Callable[[dict[str, int]], torch.nn.Module] = build, inst: ModuleType = g2) -> dict[str, float]:
    """Median seconds per forward of each mode (unpatched, idle, cache_all) for one config.

    ``builder`` makes the random model from ``spec``; ``inst`` is its instrumentation module
    (``install``/``uninstall``/``instrument``).
    """
    model = builder(spec)
    ids = torch.randint(4, spec["vocab"], (spec["batch"], spec["pos"]))
    inst.uninstall()
    im = inst.instrument(model)  # installs

    def unpatched() -> object:
        inst.uninstall()
        try:
            return model(ids, use_cache=False).logits
        finally:
            inst.install()

    # install/uninstall themselves are not timed: switch once per burst instead.
    modes: dict[str, Callable[[], object]] = {
        "unpatched": lambda: model(ids, use_cache=False).logits,
        "idle": lambda: model(ids, use_cache=False).logits,
        "cache_all": lambda: im.run_with_cache(ids)[0],
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    with torch.no_grad():
        names = list(modes)
        for r in range(rounds):
            # rotate the order each round so no mode always follows the same one
            for mode in names[r % len(names):] + names[: r % len(names)]:
                fn = modes[mode]
                if mode == "unpatched":
                    inst.uninstall()
                times[mode].append(time_per_call(fn, burst))
                if mode == "unpatched":
                    inst.install()
        # sanity: the three agree
        ref = unpatched()
        assert torch.equal(ref, model(ids, use_cache=False).logits)
        assert torch.equal(ref, im.run_with_cache(ids)[0])
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"\n{name}: {len(im.site_names())} sites, {rounds} alternations, medians")
    for mode in modes:
        print(f"  {mode:10s} {med[mode] * 1e3:9.3f} ms   ratio vs unpatched {med[mode] / med['unpatched']:.3f}x")
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--family", choices=("gemma2", "gemma3"), default=None,
                        help="run only this family's configs (default: every config)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 is steadier on a loaded machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, burst = (3, 0.5) if args.quick else (7, 1.0)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    for name, (family, spec, builder, inst) in CONFIGS.items():
        if args.family in (None, family):
            bench(name, spec, rounds, burst, builder=builder, inst=inst)


if __name__ == "__main__":
    main()
