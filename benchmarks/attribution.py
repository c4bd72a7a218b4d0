"""Attribution patching vs exact activation patching: speed (12-layer model) and accuracy (trained model).

    python benchmarks/attribution.py            # 12 layers, d_model 768, 32 tokens + the zoo model report
    python benchmarks/attribution.py --quick    # a 4-layer model, the loop baseline sampled
    python benchmarks/attribution.py --no-speed # only the accuracy report on the bundled trained model

Speed: attribution patching over every ``resid_pre`` (layer, pos) -- two forwards and one
backward -- against, measured in the same run,

* the plain loop of single patched runs (one full forward of the corrupted prompt per
  (layer, pos), a hook copying the clean value: TransformerLens's ``get_act_patch_resid_pre``),
  the fairest baseline;
* the library's batched exact ``activation_patching`` (``mishax_py.patching``), when present.

Two prompt pairs, as in ``benchmarks/patching.py``: the worst case (the prompts differ at
every position, so exact patching cannot skip anything) and an IOI-like pair (two swapped
tokens; exact patching skips the patches before the first difference, AtP cannot be faster
than two forwards and a backward either way).

Accuracy: on the bundled trained ``gemma2-tiny`` (induction and key-value recall prompt
pairs from ``mishax_py.zoo.tasks``), Pearson correlation between the estimates (AtP, AtP*,
IG) and exact activation patching, for ``resid_pre`` by (layer, pos), ``attn.z`` by head and
``attn.q`` by head (where AtP*'s QK fix matters).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

import instrumentation.gemma2 as g2
from mishax_py.attribution import attribution_patching
from mishax_py.interventions import Hook

SPECS = {
    "full": dict(layers=12, d_model=768, heads=12, kv_heads=4, d_head=64, d_mlp=3072, vocab=512, pos=32),
    "quick": dict(layers=4, d_model=256, heads=4, kv_heads=2, d_head=64, d_mlp=1024, vocab=512, pos=16),
}


def build(spec: dict[str, int]) -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=spec["vocab"], hidden_size=spec["d_model"], intermediate_size=spec["d_mlp"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
        head_dim=spec["d_head"], sliding_window=spec["pos"] // 2, max_position_embeddings=256,
        attn_implementation="eager",
    )
    return Gemma2ForCausalLM(config).eval()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"python {platform.python_version()}, load avg {load:.2f}")


def loop_baseline(im, clean, corrupt, metric, n_layers: int, sample: int | None = None) -> tuple[torch.Tensor, float]:
    """One full patched forward per (layer, pos). Returns (effects, seconds for the whole grid).

    With ``sample`` only every k-th element is run and the time is scaled to the full grid
    (reported as such); unsampled entries are NaN.
    """
    with torch.no_grad():
        _, clean_cache = im.run_with_cache(clean, sites="blocks.*.resid_pre")
        base = float(metric(im.run(corrupt)))
        T = clean.shape[1]
        out = torch.full((n_layers, T), float("nan"))
        grid = [(layer, pos) for layer in range(n_layers) for pos in range(T)]
        todo = grid if sample is None else grid[:: max(1, len(grid) // sample)]
        t0 = time.perf_counter()
        for layer, pos in todo:
            src = clean_cache[f"blocks.{layer}.resid_pre"]
            hook = Hook(_copy_at(src, pos))
            out[layer, pos] = float(metric(im.run(corrupt, interventions={f"blocks.{layer}.resid_pre": hook}))) - base
        seconds = (time.perf_counter() - t0) * len(grid) / len(todo)
    return out, seconds


def _copy_at(src: torch.Tensor, pos: int):
    def hook(value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        value[:, pos] = src[:, pos]
        return value

    return hook


def timed(fn: Callable[[], object], repeats: int = 3) -> tuple[object, float]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    keep = torch.isfinite(a) & torch.isfinite(b)
    return float(torch.corrcoef(torch.stack([a[keep], b[keep]]))[0, 1])


def speed(quick: bool) -> None:
    try:
        from mishax_py.patching import activation_patching
    except ImportError:
        activation_patching = None
    spec = SPECS["quick" if quick else "full"]
    print(f"machine: {machine()}")
    print(f"model: {spec['layers']} layers, d_model {spec['d_model']}, {spec['heads']} heads ({spec['kv_heads']} kv), "
          f"d_head {spec['d_head']}, d_mlp {spec['d_mlp']}, vocab {spec['vocab']}; "
          f"batch 1 x {spec['pos']} tokens, fp32")
    im = g2.instrument(build(spec))
    T, V, n_layers = spec["pos"], spec["vocab"], spec["layers"]
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(4, V, (1, T), generator=g)
    worst = clean.clone()
    while bool((worst == clean).any()):
        worst = torch.where(worst == clean, torch.randint(4, V, (1, T), generator=g), worst)
    ioi = clean.clone()
    ioi[0, T // 3], ioi[0, T // 2] = clean[0, T // 2], clean[0, T // 3]
    answer, other = int(clean[0, T // 3]), int(clean[0, T // 2])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, answer] - logits[:, -1, other]).mean()

    attribution_patching(im, clean[:, :8], worst[:, :8], metric, "resid_pre")  # warm-up
    for name, corrupt in (("worst case (all positions differ)", worst), ("IOI-like (2 positions differ)", ioi)):
        _, t_atp = timed(lambda c=corrupt: attribution_patching(im, clean, c, metric, "resid_pre"))
        _, t_loop = loop_baseline(im, clean, corrupt, metric, n_layers, sample=48 if quick else None)
        line = (f"{name}: attribution patching {t_atp:.3f} s; plain loop {t_loop:.2f} s "
                f"({n_layers * T} forwards{', time extrapolated from 48' if quick else ''}) -> "
                f"{t_loop / t_atp:.1f}x faster")
        if activation_patching is not None:
            with torch.no_grad():
                _, t_batched = timed(lambda c=corrupt: activation_patching(im, clean, c, metric, "resid_pre"), 1)
            line += f"; batched activation_patching {t_batched:.2f} s -> {t_batched / t_atp:.1f}x faster"
        print(line)


def accuracy() -> None:
    try:
        from mishax_py.zoo import load
        model, _tok = load("gemma2-tiny")
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"accuracy report skipped: the bundled model is not available ({type(e).__name__}: {e})")
        return
    from mishax_py.patching import activation_patching

    for task, (clean, corrupt, metric) in trained_tasks().items():
        im = g2.instrument(model)
        print(f"gemma2-tiny, {task}: {clean.shape[0]} prompt pairs x {clean.shape[1]} tokens")
        for site, by in (("resid_pre", "pos"), ("attn.z", "head"), ("attn.q", "head")):
            with torch.no_grad():
                exact = activation_patching(im, clean, corrupt, metric, site, by)
            for method in ("atp", "atp*", "ig"):
                est = attribution_patching(im, clean, corrupt, metric, site, by, method=method, steps=16)
                r = pearson(est.values, exact.values)
                print(f"    {site} by {by:<4} {method:<5} Pearson {r:.3f}")


def trained_tasks() -> dict[str, tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
    """Prompt pairs and metrics on the zoo tasks (shared with tests/test_attribution_trained.py)."""
    from mishax_py.zoo import tasks

    out = {}
    clean, corrupt = tasks.induction_clean_corrupt(8, seq_len=10, seed=11)
    scored = clean.labels[:, 1:] != tasks.IGNORE_INDEX
    targets = clean.labels[:, 1:].clamp(min=0)

    def induction_metric(logits: torch.Tensor, scored=scored, targets=targets) -> torch.Tensor:
        lp = logits[:, :-1].log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        return (lp * scored).sum() / scored.sum()

    out["induction (mean log-prob of the repeat)"] = (clean.input_ids, corrupt.input_ids, induction_metric)
    clean, corrupt = tasks.recall_clean_corrupt(8, n_pairs=6, seed=12)
    pos = int(clean.info["answer_pos"][0])
    right, wrong = clean.info["answer"], corrupt.info["answer"]
    rows = torch.arange(clean.input_ids.shape[0])

    def recall_metric(logits: torch.Tensor, pos=pos, right=right, wrong=wrong, rows=rows) -> torch.Tensor:
        return (logits[rows, pos, right] - logits[rows, pos, wrong]).mean()

    out["recall (logit difference)"] = (clean.input_ids, corrupt.input_ids, recall_metric)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 4-layer model, loop baseline sampled")
    parser.add_argument("--no-speed", action="store_true", help="only the accuracy report")
    parser.add_argument("--no-accuracy", action="store_true", help="only the speed benchmark")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared machine more threads mostly spin)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_speed:
        speed(args.quick)
    if not args.no_accuracy:
        accuracy()


if __name__ == "__main__":
    main()
