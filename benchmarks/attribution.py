"""Attribution patching vs exact activation patching: speed (12-layer model) and accuracy (trained model).

    python benchmarks/attribution.py            # 12 layers, d_model 768, 32 tokens + the zoo model report
    python benchmarks/attribution.py --quick    # a 4-layer model, the loop baseline sampled
    python benchmarks/attribution.py --no-speed # only the accuracy report on the bundled trained model
    python benchmarks/attribution.py --no-speed --circuits --out /tmp/g   # + graph and feature circuit

Speed: attribution patching over every ``resid_pre`` (layer, pos) -- two forwards and one
backward -- against, measured in the same run,

* the plain loop of single patched runs (one full forward of the corrupted prompt per
  (layer, pos), a hook copying the clean value: TransformerLens's ``get_act_patch_resid_pre``),
  the fairest baseline;
* the library's batched exact ``activation_patching`` (``mishax_py.studies.patching``), when present.

Two prompt pairs, as in ``benchmarks/patching.py``: the worst case (the prompts differ at
every position, so exact patching cannot skip anything) and an IOI-like pair (two swapped
tokens; exact patching skips the patches before the first difference, AtP cannot be faster
than two forwards and a backward either way).

Accuracy: on the bundled trained ``gemma2-tiny`` (induction and key-value recall prompt
pairs from ``mishax_py.zoo.tasks``), Pearson correlation between the estimates (AtP, AtP*,
AtP with each element's layer exact, IG per layer, IG along the input path) and exact
activation patching, for ``resid_pre`` by (layer, pos), ``attn.z`` by head and ``attn.q`` by
head (where AtP*'s QK fix matters), denoising and noising. ``--seeds N`` repeats the
``resid_pre``/``attn.z`` rows on N more prompt sets per task.

Circuits (``--circuits``): on one recall prompt, the transcoder attribution graph (completeness
error, pruned size, JSON + PNG written to ``--out``) and whether ablating the features with the
strongest edges into the answer moves it the way the graph says; then sparse feature
circuits with residual SAEs at every layer and their faithfulness / completeness. Bundled
SAEs/transcoders are used when present, else small ones are trained on task data first. The
ablations are also run in the prompt's local replacement model (``replacement_interventions``),
where the graph is exact, and with its attention patterns or norm scales live, to show which
frozen part a disagreement with the real model comes from.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
from common import build, describe, machine, prompt_pairs  # noqa: E402 - benchmarks/ is on sys.path when run as a script

import instrumentation.gemma2 as g2
from mishax_py.interventions import Hook
from mishax_py.studies.attribution import attribution_patching, attribution_patching_sites

THREE = {"resid_pre": "pos", "attn.z": "head", "mlp_out": "pos"}  # several grids from one backward
SPECS = {
    "full": dict(layers=12, d_model=768, heads=12, kv_heads=4, d_head=64, d_mlp=3072, vocab=512, pos=32),
    "quick": dict(layers=4, d_model=256, heads=4, kv_heads=2, d_head=64, d_mlp=1024, vocab=512, pos=16),
}






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


def _than(baseline: float, t: float) -> str:
    return f"{baseline / t:.1f}x faster than" if t <= baseline else f"{t / baseline:.1f}x slower than"


def speed(quick: bool) -> None:
    try:
        from mishax_py.studies.patching import activation_patching
    except ImportError:
        activation_patching = None
    spec = SPECS["quick" if quick else "full"]
    print(f"machine: {machine()}")
    print(f"model: {describe(spec)}")
    im = g2.instrument(build(spec))
    T, n_layers = spec["pos"], spec["layers"]
    clean, worst, ioi, metric = prompt_pairs(spec)
    attribution_patching(im, clean[:, :8], worst[:, :8], metric, site="resid_pre")  # warm-up
    for name, corrupt in (("worst case (all positions differ)", worst), ("IOI-like (2 positions differ)", ioi)):
        _, t_atp = timed(lambda c=corrupt: attribution_patching(im, clean, c, metric, site="resid_pre"))
        _, t_loop = loop_baseline(im, clean, corrupt, metric, n_layers, sample=48 if quick else None)
        line = (f"{name}: attribution patching {t_atp:.3f} s; plain loop {t_loop:.2f} s "
                f"({n_layers * T} forwards{', time extrapolated from 48' if quick else ''}) -> "
                f"{t_loop / t_atp:.1f}x faster")
        if activation_patching is not None:
            with torch.no_grad():
                _, t_batched = timed(lambda c=corrupt: activation_patching(im, clean, c, metric, site="resid_pre"), 1)
            line += f"; batched activation_patching {t_batched:.2f} s -> {t_batched / t_atp:.1f}x faster"
        print(line)
        _, t_sep = timed(lambda c=corrupt: [attribution_patching(im, clean, c, metric, site=k, by=b)
                                            for k, b in THREE.items()])
        _, t_all = timed(lambda c=corrupt: attribution_patching_sites(im, clean, c, metric, sites=THREE))
        print(f"    resid_pre + attn.z + mlp_out: three attribution_patching calls {t_sep:.3f} s, one "
              f"attribution_patching_sites {t_all:.3f} s -> {t_sep / t_all:.2f}x")
        for method in ("atp-layer", "ig", "ig-input"):  # the slower estimates, against the same loop
            _, t_ig = timed(lambda c=corrupt, m=method: attribution_patching(im, clean, c, metric, site="resid_pre",
                                                                            method=m, steps=16), 1)
            what = method if method == "atp-layer" else f"{method} (16 steps)"
            line = f"    {what}: {t_ig:.2f} s -> {_than(t_loop, t_ig)} the plain loop"
            if activation_patching is not None:
                line += f", {_than(t_batched, t_ig)} batched activation_patching"
            print(line + f", {t_ig / t_atp:.1f}x the time of AtP")


def accuracy(seeds: int = 0) -> None:
    try:
        from mishax_py.zoo import load
        model, _tok = load("gemma2-tiny")
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"accuracy report skipped: the bundled model is not available ({type(e).__name__}: {e})")
        return
    from mishax_py.studies.patching import activation_patching

    for task, (clean, corrupt, metric) in trained_tasks().items():
        im = g2.instrument(model)
        print(f"gemma2-tiny, {task}: {clean.shape[0]} prompt pairs x {clean.shape[1]} tokens")
        for direction in ("denoise", "noise"):
            for site, by in (("resid_pre", "pos"), ("attn.z", "head"), ("attn.q", "head")):
                with torch.no_grad():
                    exact = activation_patching(im, clean, corrupt, metric, site=site, by=by, direction=direction)
                for method in ("atp", "atp*", "atp-layer", "ig", "ig-input"):
                    est = attribution_patching(im, clean, corrupt, metric, site=site, by=by, method=method, steps=16,
                                               direction=direction)
                    r = pearson(est.values, exact.values)
                    print(f"    {direction:<7} {site} by {by:<4} {method:<9} Pearson {r:.3f}")
    if seeds:
        more_seeds(model, seeds)


def more_seeds(model, n: int) -> None:
    """Pearson r of AtP, atp-layer and IG on ``n`` more prompt sets per task: min .. max over the sets."""
    from mishax_py.studies.patching import activation_patching

    im = g2.instrument(model)
    rows: dict[tuple[str, str, str, str], list[float]] = {}
    for k in range(1, n + 1):
        for task, (clean, corrupt, metric) in trained_tasks(11 + 100 * k, 12 + 100 * k).items():
            for direction in ("denoise", "noise"):
                for site, by in (("resid_pre", "pos"), ("attn.z", "head")):
                    with torch.no_grad():
                        exact = activation_patching(im, clean, corrupt, metric, site=site, by=by, direction=direction)
                    for method in ("atp", "atp-layer", "ig"):
                        est = attribution_patching(im, clean, corrupt, metric, site=site, by=by, method=method,
                                                   steps=16, direction=direction)
                        rows.setdefault((task.split(" ")[0], direction, f"{site} by {by}", method), []).append(
                            pearson(est.values, exact.values))
    print(f"gemma2-tiny, {n} more prompt sets per task (seeds 11/12 + 100 k): Pearson min .. max")
    for (task, direction, grid, method), rs in rows.items():
        print(f"    {task:<9} {direction:<7} {grid:<19} {method:<9} {min(rs):.3f} .. {max(rs):.3f}")


def trained_tasks(induction_seed: int = 11, recall_seed: int = 12
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
    """Prompt pairs and metrics on the zoo tasks.

    The default seeds are those of ``tests/mishax_py/studies/attribution/test_trained.py``.
    """
    from mishax_py.zoo import tasks

    out = {}
    clean, corrupt = tasks.induction_clean_corrupt(8, seq_len=10, seed=induction_seed)
    scored = clean.labels[:, 1:] != tasks.IGNORE_INDEX
    targets = clean.labels[:, 1:].clamp(min=0)

    def induction_metric(logits: torch.Tensor, scored=scored, targets=targets) -> torch.Tensor:
        lp = logits[:, :-1].log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        return (lp * scored).sum() / scored.sum()

    out["induction (mean log-prob of the repeat)"] = (clean.input_ids, corrupt.input_ids, induction_metric)
    clean, corrupt = tasks.recall_clean_corrupt(8, n_pairs=6, seed=recall_seed)
    pos = int(clean.info["answer_pos"][0])
    right, wrong = clean.info["answer"], corrupt.info["answer"]
    rows = torch.arange(clean.input_ids.shape[0])

    def recall_metric(logits: torch.Tensor, pos=pos, right=right, wrong=wrong, rows=rows) -> torch.Tensor:
        return (logits[rows, pos, right] - logits[rows, pos, wrong]).mean()

    out["recall (logit difference)"] = (clean.input_ids, corrupt.input_ids, recall_metric)
    return out


def _quick_dictionary(x: torch.Tensor, y: torch.Tensor, d_sae: int, site: str, output_site: str | None,
                      steps: int = 400, l1: float = 2e-2, seed: int = 0):
    """A small ReLU SAE (``y is x``) or transcoder trained for a few hundred Adam steps (when none is bundled)."""
    import saes

    d_in, d_out = x.shape[-1], y.shape[-1]
    if output_site is None:
        sae = saes.ReLUSAE(d_in, d_sae, site=site)
    else:
        sae = saes.Transcoder(d_in, d_sae, d_out=d_out, site=site, output_site=output_site, activation="relu")
    torch.manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in ** -0.5)
        sae.W_dec.normal_(0, 0.1 * d_sae ** -0.5)
        sae.b_enc.fill_(-0.05)
    opt = torch.optim.Adam(sae.parameters(), lr=5e-3)
    scale = float(y.pow(2).sum(-1).mean())
    for _ in range(steps):
        f = sae.encode(x)
        loss = ((sae.decode(f) - y) ** 2).sum(-1).mean() / scale + l1 * f.abs().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        f = sae.encode(x)
        fvu = float(((sae.decode(f) - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
        l0 = float((f > 0).float().sum(-1).mean())
    return sae.requires_grad_(False), fvu, l0


def circuits(out_dir: str) -> None:
    """Transcoder attribution graph and a sparse feature circuit on the bundled gemma2-tiny (recall task)."""
    import saes
    from mishax_py.circuits import attribution_graph, feature_circuit, replacement_interventions
    from mishax_py.zoo import load, tasks
    from mishax_py.zoo.saes import has_saes, load_saes

    model, tok = load("gemma2-tiny")
    im = g2.instrument(model)
    n_layers = im.n_layers
    train = torch.cat([tasks.recall_batch(64, n_pairs=6, seed=101).input_ids[:, :15],
                       tasks.induction_batch(64, seq_len=7, seed=102).input_ids[:, :15]])
    sites = [f"blocks.{L}.{s}" for L in range(n_layers) for s in ("ln2_normalized", "mlp_out", "resid_post")]
    with torch.no_grad():
        _, cache = im.run_with_cache(train, sites=sites)
    flat = {k: cache[k].reshape(-1, cache[k].shape[-1]).float() for k in sites}
    bundled = load_saes("gemma2-tiny") if has_saes("gemma2-tiny") else {}
    tcs, res = {}, {}
    for L in range(n_layers):
        tc = next((s for s in bundled.values() if getattr(s, "output_site", None) == f"blocks.{L}.mlp_out"), None)
        sae = next((s for s in bundled.values() if s.site == f"blocks.{L}.resid_post"
                    and getattr(s, "output_site", s.site) == s.site), None)
        if tc is None:
            tc, fvu, l0 = _quick_dictionary(flat[f"blocks.{L}.ln2_normalized"], flat[f"blocks.{L}.mlp_out"], 512,
                                            f"blocks.{L}.ln2_normalized", f"blocks.{L}.mlp_out", seed=L)
            print(f"  transcoder L{L} (trained here): FVU {fvu:.3f}, L0 {l0:.1f}")
        if sae is None:
            sae, fvu, l0 = _quick_dictionary(flat[f"blocks.{L}.resid_post"], flat[f"blocks.{L}.resid_post"], 512,
                                             f"blocks.{L}.resid_post", None, seed=10 + L)
            print(f"  residual SAE L{L} (trained here): FVU {fvu:.3f}, L0 {l0:.1f}")
        tcs[L], res[f"blocks.{L}.resid_post"] = tc, sae

    clean, corrupt = tasks.recall_clean_corrupt(8, n_pairs=6, seed=12)
    pos = int(clean.info["answer_pos"][0])
    ids = clean.input_ids[:1, : pos + 1]  # one prompt, ending at the query key
    t0 = time.perf_counter()
    graph = attribution_graph(im, ids, tcs, tokenizer=tok, batch_size=64)
    t_graph = time.perf_counter() - t0
    data = graph.to_json(os.path.join(out_dir, "recall-graph.json"), slug="gemma2-tiny-recall")
    graph.render(os.path.join(out_dir, "recall-graph.png"))
    answer = tok.decode([int(graph.logit_tokens[0])])
    p0 = float(graph.logit_probabilities[0])
    print(f"attribution graph of {' '.join(graph.tokens)!r} -> {answer!r} (p={p0:.3f}):"
          f" {graph.n_features} active features, {graph.n_nodes} nodes, built in {t_graph:.2f} s; completeness "
          f"error {graph.completeness_error():.2e}; pruned JSON {len(data['nodes'])} nodes / {len(data['links'])} "
          f"links -> {out_dir}/recall-graph.json, .png")
    target = graph.logit_index(0)
    W_U = im.model.get_output_embeddings().weight.detach()
    tok0 = int(graph.logit_tokens[0])

    def logit(interventions=None) -> float:
        with torch.no_grad():
            _, c = im.run_with_cache(ids, sites=["ln_final"], interventions=interventions)
        pre = c["ln_final"][0, -1] @ W_U.T
        return float(pre[tok0] - pre.mean())

    base = logit()
    predicted = graph.ablation_effects(target)  # direct edges + chains through active features
    last = graph.features[:, 1] == graph.n_pos - 1
    # the same ablation in the real model, and in the replacement model the graph describes (all frozen, then
    # with the attention patterns or the norm scales live)
    models = {"real": None, "replacement": {}, "patterns live": {"freeze_attention": False},
              "norms live": {"freeze_norms": False}}
    for where, pool in (("anywhere", torch.ones_like(last)), ("at the answer position", last)):
        agree = dict.fromkeys(models, 0)
        cand = predicted.abs().masked_fill(~pool, -1.0)
        for i in cand.topk(5).indices.tolist():
            L, p, f = (int(v) for v in graph.features[i])
            moved = {}
            for name, kw in models.items():
                ivs = (saes.splice(tcs[L], edit=saes.FeatureClamp([f], 0.0, positions=[p])) if kw is None
                       else replacement_interventions(im, ids, tcs, [(L, p, f, 0.0)], **kw))
                moved[name] = logit(ivs) - base
                agree[name] += (moved[name] * float(predicted[i])) > 0
            print(f"    ablate {L}_{f}_{p}: graph predicts {float(predicted[i]):+.3f} for {answer!r} (direct edge "
                  f"{float(graph.adjacency[target, i]):+.3f}); moves: " + ", ".join(f"{k} {v:+.3f}"
                                                                                    for k, v in moved.items()))
        print(f"  top 5 features {where}: ablations that move the logit the way the graph predicts: "
              + ", ".join(f"{k} {v}/5" for k, v in agree.items()))

    right, wrong, rows = clean.info["answer"], corrupt.info["answer"], torch.arange(8)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[rows, pos, right] - logits[rows, pos, wrong]).mean()

    for k in (5, 20, 50):
        t0 = time.perf_counter()
        circ = feature_circuit(im, clean.input_ids, corrupt.input_ids, metric, saes=res, top_k=k, edges=k == 5)
        t_c = time.perf_counter() - t0
        ev = circ.evaluate(im, metric)
        print(f"feature circuit (recall, residual SAEs at every layer, top {k} nodes per site, patch ablation): "
              f"{len(circ.nodes)} nodes, {len(circ.edges)} edges, {t_c:.2f} s; faithfulness {ev['faithfulness']:.3f},"
              f" completeness {ev['completeness']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 4-layer model, loop baseline sampled")
    parser.add_argument("--no-speed", action="store_true", help="only the accuracy report")
    parser.add_argument("--no-accuracy", action="store_true", help="no accuracy report")
    parser.add_argument("--seeds", type=int, default=0, help="repeat the accuracy report on N more prompt sets")
    parser.add_argument("--circuits", action="store_true", help="also the graph / feature-circuit report")
    parser.add_argument("--out", default=".", help="where --circuits writes its graph JSON and PNG")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared machine more threads mostly spin)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_speed:
        speed(args.quick)
    if not args.no_accuracy:
        accuracy(args.seeds)
    if args.circuits:
        circuits(args.out)


if __name__ == "__main__":
    main()
