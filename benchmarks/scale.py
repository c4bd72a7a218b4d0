"""Scale benchmark: estimated vs measured peak memory, and a Gemma-2-2B-shaped model in bf16 on this machine.

Sections (``--only SECTION``, repeatable; default all):

* ``estimates``: every study on small random fp32 Gemma 2 models whose peaks are dominated in turn by the
  vocabulary, the MLP, attention maps and the residual stream: :func:`mishax_py.memory.estimate_memory`
  against the measured peak;
* ``2b-cache-all``, ``2b-sae``, ``2b-patching``, ``2b-attribution``: a Gemma-2-2B-shaped random model
  (vocabulary 256,000, 26 layers, d_model 2,304, 8 heads / 4 kv heads of 256, d_mlp 9,216, sliding window
  4,096) built on the meta device and initialised in bf16 (no fp32 copy is ever made): a run caching every
  site, a run with one 16k JumpReLU SAE spliced into ``blocks.12.resid_post``, ``resid_pre`` activation
  patching and attribution patching, at 64 tokens;
* ``graph-lengths``, ``graph-2b``: attribution graphs, run by ``benchmarks/scale_graphs.py``
  (``graph_lengths(args)``, ``graph_2b(args)``) where that module exists.

What is measured: each run happens in a fresh subprocess (``--run NAME``), after the model (and SAE) are built
and one warm-up forward has run: freed heap memory is trimmed (``malloc_trim``), the kernel's high-water mark is
reset (``/proc/self/clear_refs`` ``5``), the run is made, and the peak is ``VmHWM - VmRSS`` at the reset: the
resident memory the run itself added at its peak. The subprocesses run with glibc's mmap threshold fixed at
128 KiB (``MALLOC_MMAP_THRESHOLD_``) and ``MISHAX_PY_KEEP_FREED_MEMORY=0``, so every tensor is its own mapping,
returned when freed: the peak is that of the live memory, the same from run to run. (With glibc's default
dynamic threshold, freed blocks stay in the heap and the same run measured up to 40% more or less from one
process to the next.) The estimate is
:func:`mishax_py.memory.estimate_memory` of the same call, which counts the same thing: what the study
allocates (activations, caches, autograd's saved tensors and gradients, held logits and results), not the
weights of the model and SAEs passed to it, which exist before the call. ``ratio`` is estimate / measured;
the acceptance is ``0.8 <= ratio <= 1.2``.

The 2B-shaped runs need about 6 GiB each; run them one at a time with the other big-model benchmarks
(``flock /tmp/mishax_big.lock python benchmarks/scale.py``). ``--quick`` runs fewer layers and positions in
the 2B patching (and smaller ``estimates`` models).
Recorded results: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import machine  # noqa: E402

GEMMA2_2B = dict(vocab=256_000, layers=26, d_model=2304, heads=8, kv_heads=4, d_head=256, d_mlp=9216,
                 window=4096)
TOKENS = 64
RUNS_2B = ("2b-cache-all", "2b-sae", "2b-patching", "2b-attribution")


# -- measuring ---------------------------------------------------------------------------------------------
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def measure_peak(fn: Callable[[], Any]) -> tuple[Any, int, float]:
    """``(fn(), peak bytes of resident memory fn added, seconds)``: trim the heap, reset VmHWM, run, read it."""
    gc.collect()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, _status("VmHWM") - base, seconds


# -- the 2B-shaped model -----------------------------------------------------------------------------------
def build_2b(layers: int | None = None) -> Any:
    """A random Gemma-2-2B-shaped model in bf16, built on the meta device and initialised in place.

    Weights ``N(0, 0.02)``, norm gains 0 (Gemma's ``1 + w``); the non-persistent buffers (RoPE inverse
    frequencies in fp32, the embedding scale) are recomputed after ``to_empty``.
    """
    from transformers import Gemma2Config, Gemma2ForCausalLM
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding

    s = GEMMA2_2B
    config = Gemma2Config(
        vocab_size=s["vocab"], hidden_size=s["d_model"], intermediate_size=s["d_mlp"],
        num_hidden_layers=layers or s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        head_dim=s["d_head"], sliding_window=s["window"], query_pre_attn_scalar=s["d_head"],
        max_position_embeddings=8192, attn_implementation="eager", dtype=torch.bfloat16,
    )
    with torch.device("meta"):
        model = Gemma2ForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
            p.requires_grad_(False)
        for module in model.modules():
            if isinstance(module, Gemma2RotaryEmbedding):
                inv_freq, _ = module.compute_default_rope_parameters(config)
                module.inv_freq = inv_freq
                module.original_inv_freq = inv_freq.clone()
            if hasattr(module, "scalar_embed_scale"):
                module.embed_scale = torch.tensor(module.scalar_embed_scale, dtype=torch.float32)
    return model


def _prompts(vocab: int, T: int) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(4, vocab, (1, T), generator=g)
    corrupt = clean.clone()
    corrupt[0, T // 3], corrupt[0, T // 2] = clean[0, T // 2], clean[0, T // 3]
    a, b = int(clean[0, T // 3]), int(clean[0, T // 2])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, a] - logits[:, -1, b]).float().mean()

    return clean, corrupt, metric


def run_2b(name: str, quick: bool) -> dict[str, Any]:
    """One 2B-shaped run in this process: build, warm up, estimate, measure."""
    import instrumentation.gemma2 as g2
    import saes
    from mishax_py.memory import estimate_memory
    from mishax_py.studies import activation_patching, attribution_patching

    t0 = time.perf_counter()
    model = build_2b()
    im = g2.instrument(model)
    build_s = time.perf_counter() - t0
    clean, corrupt, metric = _prompts(GEMMA2_2B["vocab"], TOKENS)
    with torch.no_grad():
        im.run(clean)  # warm-up: one-time allocations (thread pools, oneDNN kernels) are not the run's
    call: Callable[[], Any]
    kwargs: dict[str, Any] = {}
    if name == "2b-cache-all":
        with torch.no_grad():  # estimates follow the grad mode the call runs in
            est = estimate_memory(im.run_with_cache, clean)

        def call() -> Any:
            with torch.no_grad():
                return im.run_with_cache(clean)[1].keys()
    elif name == "2b-sae":
        sae = saes.JumpReLUSAE(GEMMA2_2B["d_model"], 16384, site="blocks.12.resid_post", dtype=torch.bfloat16)
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_(0.0, 0.02)
            sae.threshold.fill_(0.05)
        ivs = {sae.site: saes.Splice(sae)}
        with torch.no_grad():
            est = estimate_memory(im.run_with_cache, clean, sites=[f"{sae.site}.sae.features"], interventions=ivs)

        def call() -> Any:
            with torch.no_grad():
                return im.run_with_cache(clean, sites=[f"{sae.site}.sae.features"], interventions=ivs)[1].keys()
    elif name == "2b-patching":
        # the full 26 x 64 grid is ~1,100 suffix forwards of a 2B model (about half an hour on 2 cores): every layer
        # at the two swapped tokens and the last one, or (--quick) 3 layers at the 12 positions from the first swap
        kwargs = dict(site="resid_pre", layers=[0, 13, 25] if quick else None,
                      positions=(list(range(TOKENS // 3, TOKENS // 2 + 1)) if quick
                                 else [TOKENS // 3, TOKENS // 2, TOKENS - 1]))
        est = estimate_memory(activation_patching, im, clean, corrupt, metric, **kwargs)

        def call() -> Any:
            return activation_patching(im, clean, corrupt, metric, **kwargs).values.shape
    elif name == "2b-attribution":
        kwargs = dict(site="resid_pre", method="atp")
        est = estimate_memory(attribution_patching, im, clean, corrupt, metric, **kwargs)

        def call() -> Any:
            return attribution_patching(im, clean, corrupt, metric, **kwargs).values.shape
    else:
        raise SystemExit(f"unknown run {name!r}; runs: {', '.join(RUNS_2B)}")
    out, peak, seconds = measure_peak(call)
    return dict(name=name, estimate=est.total, parts=dict(est.parts), measured=peak, seconds=seconds,
                build_s=build_s, result=str(out)[:80], chunks=dict(getattr(est, "chunks", {}) or {}))


# -- sections ------------------------------------------------------------------------------------------------
def _child(run: str, quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run", run] + (["--quick"] if quick else [])
    # each tensor its own mapping (glibc's mmap threshold fixed, freed memory not kept): the peak resident size is
    # the peak of live memory, the same from run to run (see the module docs)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), MISHAX_PY_KEEP_FREED_MEMORY="0",
               MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(name=run, error=(proc.stderr or proc.stdout)[-2000:])
    return json.loads(lines[-1])


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.3f} GiB" if abs(n) >= 1 << 28 else f"{n / (1 << 20):.1f} MiB"


def print_row(r: dict[str, Any]) -> bool:
    """Print one run's estimate, measurement and ratio; ``True`` when the ratio is within 20%."""
    if "error" in r:
        print(f"  {r['name']:<34} FAILED: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
        return False
    ratio = r["estimate"] / max(r["measured"], 1)
    ok = 0.8 <= ratio <= 1.2
    extra = f", build {r['build_s']:.0f} s" if "build_s" in r else ""
    chunks = f", chunks {r['chunks']}" if r.get("chunks") else ""
    print(f"  {r['name']:<34} estimate {_gib(r['estimate']):>11}  measured {_gib(r['measured']):>11}  "
          f"ratio {ratio:.2f} {'ok' if ok else 'OUTSIDE 20%'}  ({r['seconds']:.1f} s{extra}{chunks})", flush=True)
    return ok


def section_2b(args: argparse.Namespace, runs: list[str]) -> bool:
    print(f"Gemma-2-2B-shaped random model, bf16, {TOKENS} tokens (a fresh process per run):", flush=True)
    ok = True
    for run in runs:
        ok &= print_row(_child(run, args.quick))
    return ok


def graph_section(args: argparse.Namespace, name: str) -> bool:
    path = HERE / "scale_graphs.py"
    if not path.exists():
        print(f"{name}: skipped (benchmarks/scale_graphs.py is not there)")
        return True
    spec = importlib.util.spec_from_file_location("scale_graphs", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fn = mod.graph_lengths if name == "graph-lengths" else mod.graph_2b
    result = fn(args)
    return result is not False


SECTIONS = ("estimates", *RUNS_2B, "graph-lengths", "graph-2b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    parser.add_argument("--quick", action="store_true", help="smaller models and grids")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one measured run in this process
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.run:
        if args.run in RUNS_2B:
            print(json.dumps(run_2b(args.run, args.quick)), flush=True)
        else:
            print(json.dumps(run_small(args.run, args.quick)), flush=True)
        return
    print(machine())
    chosen = args.only or list(SECTIONS)
    ok = True
    if "estimates" in chosen:
        ok &= section_estimates(args)
    runs = [r for r in RUNS_2B if r in chosen]
    if runs:
        ok &= section_2b(args, runs)
    for name in ("graph-lengths", "graph-2b"):
        if name in chosen:
            ok &= graph_section(args, name)
    print("all estimates within 20% of the measured peak" if ok else "SOME RUNS FAILED OR WERE OUTSIDE 20%")


# -- small models: every study ---------------------------------------------------------------------------
SMALL = dict(vocab=32768, layers=4, d_model=256, heads=4, kv_heads=2, d_head=64, d_mlp=1024, rows=2, pos=128)
SMALL_QUICK = dict(SMALL, vocab=16384, pos=64)
SMALL_RUNS = ("run_with_cache", "sweep", "walk", "activation_patching", "activation_patching(rows)",
              "path_patching", "path_patching_by_head", "attribution_patching(atp)", "attribution_patching(atp*)",
              "attribution_patching(ig)", "attribution_patching(atp-layer)", "attribution_patching_sites",
              "site_gradients(ig)", "feature_circuit")


def run_small(name: str, quick: bool) -> dict[str, Any]:
    """One study on a small random fp32 Gemma 2 in this process: warm up, estimate, measure."""
    import warnings

    from transformers import Gemma2Config, Gemma2ForCausalLM

    import instrumentation.gemma2 as g2
    import saes
    from mishax_py.circuits import feature_circuit
    from mishax_py.interventions import Ablate
    from mishax_py.memory import estimate_memory
    from mishax_py.studies import (
        activation_patching,
        attribution_patching,
        attribution_patching_sites,
        path_patching,
        path_patching_by_head,
    )
    from mishax_py.studies.attribution import site_gradients

    warnings.simplefilter("ignore")
    c = SMALL_QUICK if quick else SMALL
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=c["vocab"], hidden_size=c["d_model"], intermediate_size=c["d_mlp"],
                       num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
                       head_dim=c["d_head"], sliding_window=c["pos"] // 2, max_position_embeddings=1024,
                       attn_implementation="eager")
    model = Gemma2ForCausalLM(cfg).eval().requires_grad_(False)
    im = g2.instrument(model)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(4, c["vocab"], (c["rows"], c["pos"]), generator=g)
    corrupt = clean.clone()
    corrupt[:, c["pos"] // 2] = (clean[:, c["pos"] // 2] + 1) % c["vocab"]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, 5] - logits[:, -1, 7]).mean()

    sae = saes.JumpReLUSAE(c["d_model"], 2048, site="blocks.2.resid_post")
    sae2 = saes.JumpReLUSAE(c["d_model"], 2048, site="blocks.1.resid_post")
    with torch.no_grad():
        for p in [*sae.parameters(), *sae2.parameters()]:
            p.normal_(0.0, 0.05)
    pair = (im, clean, corrupt, metric)
    calls: dict[str, tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], bool]] = {
        # name: (entry point, args, kwargs, under no_grad)
        "run_with_cache": (im.run_with_cache, (clean,), {}, True),
        "sweep": (im.sweep, (clean, [{f"blocks.{i}.attn.z": Ablate(heads=[h])} for i in range(c["layers"])
                                     for h in range(c["heads"])], metric), {}, True),
        "walk": (im.walk, (clean,), {}, True),
        "activation_patching": (activation_patching, pair, dict(site="resid_pre"), False),
        "activation_patching(rows)": (activation_patching, pair, dict(site="attn.z", engine="rows"), False),
        "path_patching": (path_patching, pair, dict(senders=[(0, 1)], receivers=["blocks.3.resid_post"]), False),
        "path_patching_by_head": (path_patching_by_head, pair, dict(receivers=[(3, 0, "q")]), False),
        "attribution_patching(atp)": (attribution_patching, pair, dict(site="resid_pre"), False),
        "attribution_patching(atp*)": (attribution_patching, pair, dict(site="attn.q", method="atp*"), False),
        "attribution_patching(ig)": (attribution_patching, pair, dict(site="resid_pre", method="ig", steps=4), False),
        "attribution_patching(atp-layer)": (attribution_patching, pair, dict(site="mlp_out", method="atp-layer",
                                                                             positions=[-1, -2]), False),
        "attribution_patching_sites": (attribution_patching_sites, pair,
                                       dict(sites={"attn.z": "head", "resid_pre": "pos"}), False),
        "site_gradients(ig)": (site_gradients, (im, clean, metric, ["blocks.1.resid_pre", "blocks.2.mlp_out"]),
                               dict(method="ig", steps=4, toward={}), False),
        "feature_circuit": (feature_circuit, pair, dict(saes=[sae2, sae], top_k=3), False),
    }
    fn, args, kwargs, no_grad = calls[name]
    if name == "site_gradients(ig)":
        with torch.no_grad():
            _, cache = im.run_with_cache(corrupt, sites=args[3])
        kwargs["toward"] = {n: cache[n] for n in args[3]}
    grad_mode = torch.no_grad() if no_grad else torch.enable_grad()

    def call() -> Any:
        with grad_mode:
            if name == "walk":
                with fn(*args, **kwargs) as w:
                    for _site, _value in w:
                        pass
                return tuple(w.output.shape)
            out = fn(*args, **kwargs)
            return type(out).__name__

    with torch.no_grad():
        im.run(clean)  # warm-up
    with grad_mode:
        est = estimate_memory(fn, *args, **kwargs)
    out, peak, seconds = measure_peak(call)
    return dict(name=name, estimate=est.total, parts=dict(est.parts), measured=peak, seconds=seconds,
                result=str(out)[:80], chunks=dict(est.chunks), what=est.what)


def section_estimates(args: argparse.Namespace) -> bool:
    c = SMALL_QUICK if args.quick else SMALL
    print(f"Every study on a small random fp32 Gemma 2 ({c['layers']} layers, d_model {c['d_model']}, d_mlp "
          f"{c['d_mlp']}, vocab {c['vocab']}; {c['rows']} rows x {c['pos']} tokens; a fresh process per run):",
          flush=True)
    ok = True
    for name in SMALL_RUNS:
        ok &= print_row(_child(name, args.quick))
    return ok


if __name__ == "__main__":
    main()
