"""``mishax-py demo``: an end-to-end interpretability study of a Gemma 2 or Gemma 3 model -- the computation.

This module runs the study and collects every number in one results dict; the analyses it
runs live in :mod:`mishax_py.zoo.analyses`, the prompts in :mod:`mishax_py.zoo.tasks`, and
the report (figures, ``index.html``, ``results.json``, every sentence chosen from the
numbers) in :mod:`mishax_py.zoo.report`. On the bundled ``gemma2-tiny`` (default; offline,
under a minute on 2 CPU cores) or ``gemma3-tiny`` (its SAEs and transcoders in Gemma Scope 2's
layout) the study:

1. **Task accuracy** -- induction and key-value recall accuracy on fresh prompts, by length.
2. **Activation patching** -- clean ``<bos> A A`` vs corrupt ``<bos> B A`` induction prompts;
   the metric is the mean log-probability of the correct next token on the repeated half.
   ``resid_pre`` patched per (layer, position) localises *where* the information flows;
   ``attn.z`` patched per (layer, head) names the heads that carry induction
   (:func:`~mishax_py.zoo.analyses.find_induction_heads`, recovery >= ``HEAD_THRESHOLD``),
   and attribution patching estimates both grids from gradients.
3. **Ground truth** -- independent checks of those heads: prefix-matching and previous-token
   scores, induction accuracy with the named heads zero-ablated versus as many other heads,
   and every head ablated alone.
4. **Attention patterns** of the induction heads (and the strongest previous-token head).
5. **SAE features** (when SAEs are bundled): features of the residual SAE after the induction
   heads that carry the answer (largest direct logit attribution to the correct next token),
   with firing rates, top-activating contexts and the tokens they promote.
6. **Feature edits** -- ablating each position's top carriers versus as many random active
   features, and clamping one feature at the answer position of recall prompts.
7. **Attribution graph** (when transcoders are bundled) of one induction prompt.

``run_demo(out, model=PATH)`` runs the same study on any Gemma 2 or Gemma 3 checkpoint folder
(loaded and instrumented by its ``model_type``, :func:`mishax_py.zoo.models.load_checkpoint`)
with random-token induction prompts drawn from its vocabulary (the SAE sections are skipped).

Why over 500 lines: one function per stage of the study (seven stages, each running its
analyses and laying out every number it measured as JSON-ready results), plus the model
under study (:class:`Subject`); the analyses, prompts and report live elsewhere.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.zoo import analyses as A
from mishax_py.zoo import tasks

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from mishax_py.instrumented import InstrumentedModel
    from saes import SAE

__all__ = ["HEAD_THRESHOLD", "MIN_GAP", "DemoRun", "Subject", "compute_results", "load_subject", "run_demo"]

HEAD_THRESHOLD = 0.2  # a head "carries induction" if patching its z recovers >= this fraction of the gap
MIN_GAP = 0.25  # nats of mean log-prob between clean and corrupt prompts below which no heads are named
PATCH_PROMPTS = 16
PATCH_HALF = 12
EVAL_PROMPTS = 256
OTHER_DRAWS = 10
N_FEATURES = 8
TOP_K_CARRIERS = 5  # features ablated per position in the feature-ablation experiment

Results = dict[str, Any]  # JSON-ready: str keys; str, int, float, bool, None, lists and dicts of them


# --------------------------------------------------------------------------------- the model
@dataclass
class Subject:
    """The model under study.

    Attributes:
        name: the bundled model's name or the checkpoint path.
        model: the ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` (eval mode); im: its ``InstrumentedModel``.
        bundled: a zoo model (task generators and possibly SAEs available).
        token_name: id -> readable token string.
        content_ids: ``[n]`` ids random induction prompts are drawn from.
        bos_id: id placed at position 0 (``None``: no BOS token).
        tokenizer: the model's tokenizer, if it has one.
    """

    name: str
    model: PreTrainedModel
    im: InstrumentedModel
    bundled: bool
    token_name: Callable[[int], str]
    content_ids: torch.Tensor
    bos_id: int | None
    tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def config(self) -> Any:
        """The text decoder's config (``config.text_config`` of a multimodal Gemma 3, else ``config``)."""
        return self.model.config.get_text_config()

    @property
    def n_layers(self) -> int:
        return self.im.family.dims.n_layers

    @property
    def n_heads(self) -> int:
        return self.im.family.dims.n_heads

    @property
    def offset(self) -> int:
        """Tokens before the first content token of a prompt (1 with BOS)."""
        return 0 if self.bos_id is None else 1

    def induction(self, n: int, seed: int, half: int | None = None) -> tasks.TaskBatch:
        """Fresh induction prompts: the task generator (lengths 4..24 unless ``half``) for a bundled
        model, random vocabulary tokens (half-length ``half`` or ``PATCH_HALF``) otherwise."""
        if self.bundled:
            return tasks.induction_batch(n, seq_len=half, seed=seed)
        return tasks.random_induction_batch(n, half=half or PATCH_HALF, content_ids=self.content_ids,
                                            bos_id=self.bos_id, seed=seed)  # fmt: skip

    def clean_corrupt(self, n: int, half: int, seed: int) -> tuple[tasks.TaskBatch, tasks.TaskBatch]:
        """Aligned clean ``[bos] A A`` / corrupt ``[bos] B A`` prompts."""
        if self.bundled:
            return tasks.induction_clean_corrupt(n, seq_len=half, seed=seed)
        return tasks.random_induction_clean_corrupt(n, half=half, content_ids=self.content_ids, bos_id=self.bos_id,
                                                    seed=seed)  # fmt: skip


def load_subject(model: str | None) -> Subject:
    """The bundled model (``None`` or a zoo name) or a local Gemma 2 / Gemma 3 checkpoint folder, instrumented
    (by its ``model_type``: :func:`mishax_py.zoo.models.instrument`).

    Loading is :func:`mishax_py.zoo.models.load_checkpoint` (the CLI's loader); raises
    ``FileNotFoundError`` naming what to fetch when ``model`` is neither.
    """
    from mishax_py.zoo.models import MODELS, instrument, load_checkpoint

    name = model or "gemma2-tiny"
    hf, tok = load_checkpoint(name)
    if name in MODELS:
        names = tasks.token_names()
        content = torch.arange(tasks.CONTENT_START, tasks.VOCAB_SIZE)
        # bundled models are Gemma 2 or Gemma 3: instrument by config.model_type
        return Subject(name, hf, instrument(hf), True, lambda i: names[i], content, tasks.BOS_ID, tok)
    cfg = hf.config.get_text_config()
    special: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, key, None)
        special.update(v if isinstance(v, list) else [v] if v is not None else [])
    if tok is not None:
        special.update(int(i) for i in getattr(tok, "all_special_ids", []) or [])
    vocab = int(cfg.vocab_size)
    lo = min(vocab - 1, 5 if vocab < 1000 else 1000)  # skip the low ids (specials, bytes) of big vocabularies
    pool = torch.tensor([i for i in range(lo, min(vocab, lo + 50_000)) if i not in special], dtype=torch.long)
    if pool.numel() < 2 * PATCH_HALF:
        raise ValueError(f"vocabulary of {vocab} tokens is too small for random induction prompts")

    def token_name(i: int) -> str:
        s = tok.convert_ids_to_tokens(int(i)) if tok is not None else None
        return str(s) if s is not None else str(i)

    bos = cfg.bos_token_id if isinstance(cfg.bos_token_id, int) else None
    return Subject(str(Path(name)), hf, instrument(hf), False, token_name, pool, bos, tok)


# ----------------------------------------------------------------------------------- study
class _Stages:
    """A tqdm bar over the study's stages (stderr) that also records each stage's wall time."""

    def __init__(self, names: list[str], progress: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(names), desc="demo", unit="stage", disable=not progress, file=sys.stderr)
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()
        self._name: str | None = None

    def start(self, name: str) -> None:
        self._close_current()
        self._name = name
        self.bar.set_description(f"demo: {name}")

    def _close_current(self) -> None:
        now = time.perf_counter()
        if self._name is not None:
            self.times[self._name] = round(now - self._t, 2)
            self.bar.update(1)
        self._t, self._name = now, None

    def close(self) -> None:
        self._close_current()
        self.bar.close()


@dataclass
class DemoRun:
    """What :func:`compute_results` measured: ``results`` (every number, JSON-ready) and the
    attribution graph in circuit-tracer's JSON format (``None`` when not built), for its figure."""

    results: Results
    graph: dict[str, Any] | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def compute_results(model: str | None = None, *, progress: bool = True, seed: int = 0) -> DemoRun:
    """Run the study (no files written).

    Args:
        model: ``None`` (the bundled ``gemma2-tiny``), a bundled model name, or a local Gemma 2
            checkpoint folder (random-token induction prompts; no SAE sections).
        progress: a tqdm bar over the stages on stderr.
        seed: offsets every prompt seed (the defaults reproduce the shipped numbers).
    """
    st = _Stages(["load", "accuracy", "patching", "ground truth", "attention", "SAE features", "feature edits",
                  "attribution graph"], progress)  # fmt: skip
    results: Results = {"version": 2}
    graph: dict[str, Any] | None = None
    try:
        st.start("load")
        subject = load_subject(model)
        cfg = subject.config
        results["model"] = {
            "name": subject.name, "bundled": subject.bundled, "n_layers": subject.n_layers,
            "family": "Gemma 3" if str(getattr(subject.model.config, "model_type", "")).startswith("gemma3")
            else "Gemma 2",
            "n_heads": subject.n_heads, "n_kv_heads": int(cfg.num_key_value_heads), "d_model": int(cfg.hidden_size),
            "vocab_size": int(cfg.vocab_size), "layer_types": list(getattr(cfg, "layer_types", None) or []),
            "sliding_window": getattr(cfg, "sliding_window", None),
            "n_params": int(sum(p.numel() for p in subject.model.parameters())),
        }  # fmt: skip
        st.start("accuracy")
        results["accuracy"] = _accuracy(subject, seed)
        st.start("patching")
        clean, corrupt = subject.clean_corrupt(PATCH_PROMPTS, PATCH_HALF, seed + 101)
        results.update(_patching(subject, clean, corrupt))
        named = [(int(a), int(b)) for a, b in results["induction_heads"]["heads"]]
        st.start("ground truth")
        results["ground_truth"] = _ground_truth(subject, named, seed)
        st.start("attention")
        results["attention"] = _attention(subject, clean, named, results["ground_truth"])
        st.start("SAE features")
        results["sae_features"], sae = _sae_features(subject, named, seed)
        st.start("feature edits")
        results["feature_edits"] = _feature_edits(subject, sae, results["sae_features"], seed)
        st.start("attribution graph")
        results["attribution_graph"], graph = _attribution_graph(subject, seed)
    finally:
        st.close()
    results["environment"] = {
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }  # fmt: skip
    return DemoRun(results, graph, dict(st.times))


def run_demo(
    out: str | os.PathLike[str] = "mishax_demo",
    model: str | None = None,
    *,
    progress: bool = True,
    quiet: bool = False,
    seed: int = 0,
) -> Results:
    """Run the study (:func:`compute_results`) and write ``out/index.html``, its figures and ``out/results.json``.

    Args:
        out: the report folder (created).
        model, progress, seed: see :func:`compute_results`.
        quiet: do not print the summary table.

    Returns:
        The results dict (what ``results.json`` holds).
    """
    from mishax_py.zoo import report

    t_start = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = compute_results(model, progress=progress, seed=seed)
    t_report = time.perf_counter()
    report.write_report(out_dir, run.results, graph=run.graph)
    stages = dict(run.stage_seconds, report=round(time.perf_counter() - t_report, 2))
    run.results["timing"] = {"stages_seconds": stages, "total_seconds": round(time.perf_counter() - t_start, 2)}
    report.write_results(out_dir, run.results)
    if not quiet:
        print(report.summary(run.results, out_dir))
    return run.results


# ---------------------------------------------------------------------------------- stages
def _accuracy(subject: Subject, seed: int) -> Results:
    """Task accuracy on fresh prompts: ``rows`` of ``{task, prompts, scored, accuracy}`` and headline numbers."""
    model = subject.model
    rows: list[Results] = []

    def add(task: str, b: tasks.TaskBatch) -> float:
        acc = tasks.batch_accuracy(model, b)
        rows.append({"task": task, "prompts": len(b), "scored": int(b.target_mask.sum()), "accuracy": acc})
        return acc

    if not subject.bundled:
        b = subject.induction(64, 12345 + seed)
        a = add(f"random-token induction (L={PATCH_HALF})", b)
        return {"induction": a, "chance": 1.0 / subject.content_ids.numel(), "rows": rows, "prompts": "random"}
    a_ind = add("induction (L 4–24)", tasks.induction_batch(EVAL_PROMPTS, seed=12345 + seed))
    a_rec = add("recall (2–24 pairs)", tasks.recall_batch(EVAL_PROMPTS, seed=12346 + seed))
    by_len = {f"induction L={L}": add(f"induction L={L}", tasks.induction_batch(64, seq_len=L, seed=5000 + L + seed))
              for L in (4, 8, 16, 24)}  # fmt: skip
    by_len |= {f"recall pairs={P}": add(f"recall pairs={P}", tasks.recall_batch(64, n_pairs=P, seed=6000 + P + seed))
               for P in (4, 8, 16, 24)}  # fmt: skip
    return {"induction": a_ind, "recall": a_rec, "by_length": by_len, "rows": rows, "prompts": "tasks",
            "chance": 1.0 / (tasks.VOCAB_SIZE - tasks.CONTENT_START)}  # fmt: skip


def _patching(subject: Subject, clean: tasks.TaskBatch, corrupt: tasks.TaskBatch) -> Results:
    """Exact patching (resid_pre per position, attn.z per head), the named heads, and attribution patching."""
    from mishax_py.studies import activation_patching, attribution_patching, attribution_patching_sites
    from mishax_py.studies.attribution import pearson

    im, L, off = subject.im, PATCH_HALF, subject.offset
    targets, mask = clean.targets, clean.target_mask
    pos_labels = (["<bos>"] if off else []) + [f"s{i + 1}" for i in range(L)] + [f"s{i + 1}'" for i in range(L)]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return A.mean_logprob(logits, targets, mask)

    resid = activation_patching(im, clean.input_ids, corrupt.input_ids, metric, site="resid_pre", by="pos",
                                pos_labels=pos_labels, progress=False)  # fmt: skip
    search = A.find_induction_heads(im, clean.input_ids, corrupt.input_ids, targets, mask, threshold=HEAD_THRESHOLD,
                                    min_gap=MIN_GAP)  # fmt: skip
    z, zn = search.patching, search.recovery
    est = attribution_patching_sites(im, clean.input_ids, corrupt.input_ids, metric,
                                     sites={"resid_pre": "pos", "attn.z": "head"})  # fmt: skip
    per_layer = attribution_patching(im, clean.input_ids, corrupt.input_ids, metric, site="resid_pre",
                                     method="atp-layer")  # fmt: skip
    atp_heads = A.select_heads(est["attn.z"].effects, float("-inf"))[: max(1, len(search.heads))]
    best = max(A.all_heads(im), key=lambda h: float(zn[h]))
    return {
        "patching": {
            "prompts": PATCH_PROMPTS, "half_len": L,
            "metric": "mean log-prob of the correct next token (repeated half)",
            "direction": "denoise (clean into corrupt)", "clean_metric": resid.clean, "corrupt_metric": resid.corrupt,
            "resid_pre": {"values": resid.values.tolist(), "normalized": resid.normalized().tolist(),
                          "axes": list(resid.axes), "pos_labels": pos_labels},
            "attn_z": {"values": z.values.tolist(), "normalized": zn.tolist(), "axes": list(z.axes)},
        },
        "induction_heads": {
            "heads": [list(h) for h in search.heads], "labels": [_head_label(*h) for h in search.heads],
            "threshold": HEAD_THRESHOLD, "recovery": [float(zn[h]) for h in search.heads], "gap": search.gap,
            "min_gap": MIN_GAP,
            "best_head": list(best), "best_recovery": float(zn[best]),
            "criterion": f"patching the head's attn.z (clean into corrupt, all positions) recovers >= {HEAD_THRESHOLD} "
                         "of the clean-corrupt gap in mean log-prob",
        },
        "attribution_patching": {
            "method": "atp (attribution_patching_sites: one forward/backward for both grids)",
            "pearson_resid_pre": pearson(est["resid_pre"].values, resid.values),
            "pearson_attn_z": pearson(est["attn.z"].values, z.values),
            "attn_z_values": est["attn.z"].values.tolist(), "resid_pre_values": est["resid_pre"].values.tolist(),
            "top_heads": [list(h) for h in atp_heads],
            "atp_layer_resid_pre_values": per_layer.values.tolist(),
            "pearson_atp_layer_resid_pre": pearson(per_layer.values, resid.values),
        },
    }  # fmt: skip


def _ground_truth(subject: Subject, named: list[A.Head], seed: int) -> Results:
    """Prefix-matching / previous-token scores and head ablations (named vs control, one at a time)."""
    im, off = subject.im, subject.offset
    pm_data = subject.induction(32, 7000 + seed, half=PATCH_HALF)
    pm = A.prefix_matching_scores(im, pm_data.input_ids, PATCH_HALF, offset=off)
    prev = A.previous_token_scores(im, pm_data.input_ids, lengths=pm_data.lengths, start=off + 1)
    data = subject.induction(128 if subject.bundled else 32, 8000 + seed)
    ids, targets, mask = data.input_ids, data.targets, data.target_mask
    test = A.ablation_vs_control(im, ids, targets, mask, named, n_controls=OTHER_DRAWS, seed=9000 + seed)
    single = A.single_head_ablation(im, ids, targets, mask)
    heads = A.all_heads(im)
    others = [h for h in heads if h not in named]
    prev_head = max(heads, key=lambda h: float(prev[h]))
    by_pm = sorted(heads, key=lambda h: -float(pm[h]))
    best_other: A.Head | None = max(others, key=lambda h: float(pm[h])) if others else None
    return {
        "prefix_matching": pm.tolist(), "previous_token": prev.tolist(), "prefix_matching_prompts": len(pm_data),
        "prefix_matching_named": [float(pm[h]) for h in named],
        "prefix_matching_others_max": max((float(pm[h]) for h in others), default=float("nan")),
        "prefix_matching_others_argmax": list(best_other) if best_other is not None else None,
        "top_prefix_matching_heads": [list(h) for h in by_pm[: max(len(named), 1)]],
        "previous_token_head": list(prev_head), "previous_token_score": float(prev[prev_head]),
        "named_heads": [list(h) for h in named], "accuracy_clean": test.baseline,
        "accuracy_named_ablated": test.ablated,
        "other_sets": [[list(h) for h in d] for d in test.control_sets],
        "accuracy_others_ablated": test.control_accuracies, "accuracy_others_mean": test.control_mean,
        "accuracy_others_min": test.control_min, "single_head_ablation": single.tolist(),
        "eval_prompts": len(data), "eval_scored": int(mask.sum()),
    }  # fmt: skip


def _attention(subject: Subject, clean: tasks.TaskBatch, named: list[A.Head], gt: Results) -> Results:
    """Attention maps of up to 4 induction heads (else the top prefix-matching head) and the previous-token head
    on one clean prompt, with each head's prefix-matching and previous-token score on that prompt."""
    im, off = subject.im, subject.offset
    ids = clean.input_ids[:1]
    prev_head = (int(gt["previous_token_head"][0]), int(gt["previous_token_head"][1]))
    top_pm = (int(gt["top_prefix_matching_heads"][0][0]), int(gt["top_prefix_matching_heads"][0][1]))
    heads = list(named[:4]) or [top_pm]
    heads += [prev_head] if prev_head not in heads else []
    L = int(clean.info["half_len"][0])
    pats = A.head_patterns(im, ids, heads)[0]
    pm = A.prefix_matching_scores(im, ids, L, offset=off)
    prev = A.previous_token_scores(im, ids, start=off + 1)
    roles = ["induction" if h in named else "previous token" if h == prev_head else "top prefix-matching"
             for h in heads]  # fmt: skip
    return {
        "prompt_tokens": [subject.token_name(int(t)) for t in ids[0]], "half_len": L, "offset": off,
        "heads": [list(h) for h in heads], "roles": roles, "patterns": pats.tolist(),
        "prefix_matching": [float(pm[h]) for h in heads], "previous_token": [float(prev[h]) for h in heads],
    }  # fmt: skip


def _load_saes(subject: Subject, kind: str) -> tuple[dict[str, SAE], str | None]:
    """The bundled SAEs of ``kind`` (``"sae"`` or ``"transcoder"``; ``{}`` and the reason when there are none)."""
    what = {"sae": "SAEs", "transcoder": "transcoders"}[kind]
    if not subject.bundled:
        return {}, f"no bundled {what} for this model"
    try:
        from mishax_py.zoo.saes import SAE_MODELS, has_saes, load_saes

        if subject.name not in SAE_MODELS:
            return {}, f"no {what} are bundled for {subject.name}"
        if not has_saes(subject.name):
            return {}, "the SAE registry is missing (scripts/train_tiny_saes.py)"
        found = load_saes(subject.name, kind=kind)
    except (ImportError, FileNotFoundError, KeyError) as e:
        return {}, str(e)
    return found, (None if found else f"no {what} are registered")


def _contexts(subject: Subject, ids: torch.Tensor, found: list[A.ActivatingContext], source: str) -> list[Results]:
    out = []
    for c in found:
        row, p = ids[c.row], c.pos
        out.append({"activation": c.activation, "source": source, "token": subject.token_name(int(row[p])),
                    "previous": subject.token_name(int(row[p - 1])) if p > 0 else "",
                    "next": subject.token_name(int(row[p + 1])) if p + 1 < row.numel() else ""})  # fmt: skip
    return out


@torch.no_grad()
def _sae_features(subject: Subject, named: list[A.Head], seed: int) -> tuple[Results, SAE | None]:
    """The features of the residual SAE after the induction heads that carry the correct next token."""
    found, why = _load_saes(subject, "sae")
    if not found:
        return {"available": False, "reason": why}, None
    from mishax_py.zoo.saes import sae_registry

    # The residual SAE right after the latest induction head (it reads what the heads wrote), else the last one.
    by_layer = {int(A.sae_site(s).split(".")[1]): (n, s) for n, s in found.items()}
    top_layer = max((h[0] for h in named), default=None)
    layer = min((li for li in by_layer if top_layer is not None and li >= top_layer), default=max(by_layer))
    name, sae = by_layer[layer]
    im, L = subject.im, PATCH_HALF
    data = subject.induction(256, 10_000 + seed, half=L)
    ids, rep = data.input_ids, data.target_mask  # rep: repeated half from its 2nd token (next token predictable)
    f = A.sae_activations(im, sae, ids)
    attr = A.direct_logit_attribution(im, sae, f, data.targets, scale=A.final_norm_scale(im, ids))
    carriers = A.top_k_mask(attr, TOP_K_CARRIERS, rep)
    counts = carriers.sum((0, 1))
    first = (torch.arange(ids.shape[1]) >= 1) & (torch.arange(ids.shape[1]) <= L)  # first half: not predictable
    on = f > 0
    r_rep, r_first = on[rep].float().mean(0), on[:, first].float().mean((0, 1))
    mean_attr = attr[rep].sum(0) / on[rep].sum(0).clamp_min(1)
    shown = [int(i) for i in counts.argsort(descending=True)[:N_FEATURES] if int(counts[i]) > 0]
    rec = tasks.recall_batch(128, n_pairs=8, seed=11_000 + seed)
    ctx_ind = A.top_activating_contexts(im, sae, ids, shown, k=3)
    ctx_rec = A.top_activating_contexts(im, sae, rec.input_ids, shown, k=3)
    promoted = A.promoted_tokens(im, sae, shown, k=3) if shown else torch.zeros(0, 3, dtype=torch.long)
    lens = A.feature_logit_lens(im, sae)
    n_rep = max(int(rep.sum()), 1)
    feats = []
    for j, i in enumerate(shown):
        contexts = _contexts(subject, ids, ctx_ind[j], "induction") + _contexts(subject, rec.input_ids, ctx_rec[j],
                                                                                "recall")  # fmt: skip
        contexts.sort(key=lambda c: -c["activation"])
        top2 = lens[i].topk(2).values
        feats.append({
            "feature": i, "top_carrier_count": int(counts[i]), "top_carrier_fraction": int(counts[i]) / n_rep,
            "freq_repeated": float(r_rep[i]), "freq_first_half": float(r_first[i]),
            "mean_logit_attribution": float(mean_attr[i]),
            "max_activation": max((c["activation"] for c in contexts), default=0.0), "top_contexts": contexts[:6],
            "promoted_tokens": [subject.token_name(int(t)) for t in promoted[j]],
            "promoted_token_ids": [int(t) for t in promoted[j]], "promotion_margin": float(top2[0] - top2[1]),
        })  # fmt: skip
    full_registry = sae_registry(subject.name)
    registry = [{k: e[k] for k in ("name", "kind", "site", "output_site", "d_sae", "l0", "fvu", "delta_lm_loss")
                 if k in e} for e in full_registry["saes"]]  # fmt: skip
    return {
        "available": True, "sae": name, "site": sae.site, "layer": layer, "induction_layer": top_layer,
        "format": full_registry.get("format", "gemma_scope_npz"),
        "d_sae": sae.d_sae, "registry": sae.metadata.get("registry", {}), "bundled_saes": registry,
        "prompts": len(data), "top_k_carriers": TOP_K_CARRIERS, "n_carrier_features": int((counts > 0).sum()),
        "features": feats, "l0_on_prompts": float(on[:, 1:].sum(-1).float().mean()),
        "attribution": "f_i * W_dec[i] · (1 + w_norm) ⊙ (W_U[next] - mean W_U) / rms(final residual)",
    }, sae  # fmt: skip


@torch.no_grad()
def _feature_edits(subject: Subject, sae: SAE | None, sf: Results, seed: int) -> Results:
    """Ablate each position's top carriers vs as many random active features; clamp one feature on recall prompts."""
    if sae is None or not sf.get("features"):
        return {"available": False, "reason": sf.get("reason", "no task features found")}
    im = subject.im
    data = subject.induction(128, 12_000 + seed, half=PATCH_HALF)
    ids, targets, where = data.input_ids, data.targets, data.target_mask
    f = A.sae_activations(im, sae, ids)
    attr = A.direct_logit_attribution(im, sae, f, targets)
    g = torch.Generator().manual_seed(13_000 + seed)
    a0, m0 = A.spliced_accuracy(im, sae, ids, targets, where)
    a_rec, m_rec = A.spliced_accuracy(im, sae, ids, targets, where, keep_error=False)
    ablation: Results = {"reconstruction_only": {"accuracy": a_rec, "mean_logprob": m_rec}}
    ks = sorted({1, 3, TOP_K_CARRIERS})
    for k in ks:
        m_top = A.top_k_mask(attr, k, where)
        m_rnd = A.random_active_mask(f, k, where, exclude=m_top, generator=g)
        for key, m in ((f"top{k}", m_top), (f"random{k}", m_rnd)):
            acc, lp = A.spliced_accuracy(im, sae, ids, targets, where, ablate=m)
            ablation[key] = {"accuracy": acc, "mean_logprob": lp}
    # Clamp the task feature whose decoder most clearly promotes one token at the answer position of recall
    # prompts (at 2x its largest activation seen); count how often the model now outputs that token.
    best = max(sf["features"], key=lambda e: e["promotion_margin"])
    target = int(best["promoted_token_ids"][0])
    rec = tasks.recall_batch(128, n_pairs=8, seed=14_000 + seed)
    qpos = int(rec.info["answer_pos"][0])
    value = 2.0 * max(float(best["max_activation"]), 1e-3)
    before, after = A.feature_clamp_predictions(im, sae, rec.input_ids, int(best["feature"]), value, qpos)
    answer = rec.info["answer"]
    keep = answer != target  # prompts whose answer is not already the clamped token
    return {
        "available": True, "sae": sf["sae"], "site": sae.site, "prompts": len(data), "ks": ks,
        "clean": {"accuracy": a0, "mean_logprob": m0}, "ablation": ablation,
        "clamp": {"feature": int(best["feature"]), "value": value, "position": qpos,
                  "promoted_token": best["promoted_tokens"][0],
                  "rate_before": float((before[keep] == target).float().mean()),
                  "rate_after": float((after[keep] == target).float().mean()),
                  "recall_accuracy_before": float((before == answer).float().mean()),
                  "recall_accuracy_after": float((after == answer).float().mean()), "prompts": int(keep.sum())},
    }  # fmt: skip


def _attribution_graph(subject: Subject, seed: int) -> tuple[Results, dict[str, Any] | None]:
    """A transcoder attribution graph of one induction prompt (predicting the last token of the repeat)."""
    found, why = _load_saes(subject, "transcoder")
    if not found:
        return {"available": False, "reason": why}, None
    try:
        from mishax_py.circuits import attribution_graph
    except ImportError as e:
        return {"available": False, "reason": str(e)}, None
    b = tasks.induction_batch(1, seq_len=5, seed=15_000 + seed)
    ids = b.input_ids[:, :-1]  # predict the last token of the repeat
    with torch.no_grad():
        predicted = int(subject.im.run(ids)[0, -1].argmax())
    graph = attribution_graph(subject.im, ids, list(found.values()), tokenizer=subject.tokenizer, max_n_logits=3,
                              batch_size=64, progress=False)  # fmt: skip
    names = [subject.token_name(i) for i in range(int(subject.config.vocab_size))]
    srcs = [(_node_name(node, names), float(w)) for node, w in graph.top_sources(graph.logit_index(0), k=6)]
    data = graph.to_json()
    return {
        "available": True, "prompt": [names[int(t)] for t in ids[0]], "answer": names[int(b.input_ids[0, -1])],
        "predicted": names[predicted], "n_features": int(graph.n_features),
        "transcoder_layers": [int(x) for x in graph.transcoder_layers],
        "completeness_error": float(graph.completeness_error()),
        "logit_tokens": [names[int(t)] for t in graph.logit_tokens],
        "top_sources_of_top_logit": [[s, w] for s, w in srcs],
        "feature_contexts": _graph_feature_contexts(subject, data, list(found.values()), seed),
    }, data  # fmt: skip


def _graph_feature_contexts(subject: Subject, data: dict[str, Any], transcoders: list[Any], seed: int) -> list[Results]:
    """Top-activating contexts of the pruned graph's features (for the viewer): ``[{layer, feature, contexts}]``,
    the 3 highest activations of each over 128 fresh prompts shaped like the graph's."""
    from mishax_py.circuits.transcoders import transcoder_map

    wanted: dict[int, list[int]] = {}
    for n in data["nodes"]:
        if n["feature_type"] == "cross layer transcoder":
            layer, index = (int(x) for x in str(n["node_id"]).split("_")[:2])
            if index not in wanted.setdefault(layer, []):
                wanted[layer].append(index)
    ids = tasks.induction_batch(128, seq_len=5, seed=16_000 + seed).input_ids
    by_layer = transcoder_map(subject.im, transcoders)
    out: list[Results] = []
    for layer, feats in sorted(wanted.items()):
        found = A.top_activating_contexts(subject.im, by_layer[layer][0], ids, feats, k=3)  # type: ignore[arg-type]
        out.extend({"layer": layer, "feature": f, "contexts": _contexts(subject, ids, ctx, "induction")}
                   for f, ctx in zip(feats, found, strict=True))  # fmt: skip
    return out


def _node_name(node_id: str, names: list[str]) -> str:
    """A readable name for a circuit-tracer node id (``E_tok_pos``, ``layer_feature_pos``, ``layer_-1_pos``)."""
    parts = node_id.split("_")
    try:
        if parts[0] == "E":
            return f"embedding {names[int(parts[1])]}@{parts[2]}"
        layer, idx, p = (int(x) for x in parts)
    except (ValueError, IndexError):
        return node_id
    return f"L{layer} error@{p}" if idx == -1 else f"L{layer} feature {idx}@{p}"
