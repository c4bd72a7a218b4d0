"""``mishax-py demo``: an end-to-end interpretability study of a Gemma 2 model, written as a report.

On the bundled ``gemma2-tiny`` (default; offline, about 15 s on 2 CPU cores) the study:

1. **Task accuracy** -- induction and key-value recall accuracy on fresh prompts, by length.
2. **Activation patching** -- clean ``<bos> A A`` vs corrupt ``<bos> B A`` induction prompts
   (:func:`mishax_py.zoo.tasks.induction_clean_corrupt`); the metric is the mean log-probability
   of the correct next token on the repeated half. ``resid_pre`` patched per (layer, position)
   localises *where* the information flows; ``attn.z`` patched per (layer, head) names the
   heads that carry induction: every head whose patch recovers at least
   ``HEAD_THRESHOLD`` of the clean-corrupt gap.
3. **Ground truth** -- independent checks of those heads: each head's prefix-matching score
   (attention from a repeated token to the token right after its first occurrence) and
   previous-token score, and induction accuracy with the named heads zero-ablated versus the
   same number of other heads (random draws), plus every head ablated alone.
4. **Attention patterns** of the induction heads (and the strongest previous-token head).
5. **SAE features** (when SAEs are bundled for the model, :func:`mishax_py.zoo.load_saes`):
   features of the residual SAE right after the induction heads that *carry the answer* --
   at each repeated position, the features with the largest direct logit attribution to the
   correct next token -- with their firing rates, top-activating contexts and the tokens
   their decoder directions promote.
6. **Feature edits** -- ablating each position's top carriers (``saes.Splice`` with the error
   term kept) versus as many random active features, and clamping one feature
   (``FeatureClamp``) at the answer position of recall prompts.
7. **Attribution graph** (when :mod:`mishax_py.circuits` and transcoders are available) of one
   induction prompt, rendered with the circuits package.

``run_demo(out, model=PATH)`` runs the same study on any Gemma 2 checkpoint folder with
random-token induction prompts drawn from its vocabulary (the SAE sections are skipped).
The report is ``out/index.html`` (figures as PNG files beside it) and ``out/results.json``
holds every number.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mishax_py.zoo.report import (
    Section,
    Table,
    attention_figure,
    bar_figure,
    heatmap_figure,
    render_html,
    text_table,
)

__all__ = [
    "HEAD_THRESHOLD",
    "InductionData",
    "Subject",
    "head_ablation_accuracy",
    "induction_data",
    "load_subject",
    "other_head_sets",
    "prefix_matching_scores",
    "run_demo",
]

HEAD_THRESHOLD = 0.2  # a head "carries induction" if patching its z recovers >= this fraction of the gap
MIN_GAP = 0.25  # nats of mean log-prob between clean and corrupt prompts below which no heads are named
PATCH_PROMPTS = 16
PATCH_HALF = 12
EVAL_PROMPTS = 256
OTHER_DRAWS = 10
N_FEATURES = 8


# --------------------------------------------------------------------------------- the model
@dataclass
class Subject:
    """The model under study.

    Attributes:
        name: ``"gemma2-tiny"`` or the checkpoint path.
        model: the ``Gemma2ForCausalLM`` (eval mode).
        im: its ``InstrumentedModel``.
        bundled: a zoo model (task generators and possibly SAEs available).
        token_name: id -> readable token string.
        content_ids: ``[n]`` ids random induction prompts are drawn from.
        bos_id: id placed at position 0 (``None``: no BOS token).
        tokenizer: the model's tokenizer, if it has one.
    """

    name: str
    model: Any
    im: Any
    bundled: bool
    token_name: Callable[[int], str]
    content_ids: torch.Tensor
    bos_id: int | None
    tokenizer: Any = None

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def n_heads(self) -> int:
        return int(self.model.config.num_attention_heads)


def load_subject(model: str | None) -> Subject:
    """Load the bundled model (``None`` or a zoo name) or a local Gemma 2 checkpoint folder, instrumented."""
    import instrumentation.gemma2 as g2
    from mishax_py.zoo import tasks
    from mishax_py.zoo.models import MODELS, load

    if model is None or model in MODELS:
        name = model or "gemma2-tiny"
        hf, tok = load(name)
        names = tasks.token_names()
        content = torch.arange(tasks.CONTENT_START, tasks.VOCAB_SIZE)
        return Subject(name, hf, g2.instrument(hf), True, lambda i: names[i], content, tasks.BOS_ID, tok)
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--model {model!r} is neither a bundled model ({', '.join(MODELS)}) nor a local checkpoint folder"
        )
    from transformers import Gemma2ForCausalLM

    hf = Gemma2ForCausalLM.from_pretrained(path, attn_implementation="eager", local_files_only=True).eval()
    cfg = hf.config
    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # no tokenizer files: show ids
        tok = None
    special = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, key, None)
        special.update(v if isinstance(v, list) else [v] if v is not None else [])
    if tok is not None:
        special.update(int(i) for i in getattr(tok, "all_special_ids", []) or [])
    vocab = int(cfg.vocab_size)
    lo = min(vocab - 1, 5 if vocab < 1000 else 1000)  # skip the low ids (specials, bytes) of big vocabularies
    hi = min(vocab, lo + 50_000)
    pool = torch.tensor([i for i in range(lo, hi) if i not in special], dtype=torch.long)
    if pool.numel() < 2 * PATCH_HALF:
        raise ValueError(f"vocabulary of {vocab} tokens is too small for random induction prompts")

    def token_name(i: int) -> str:
        if tok is None:
            return str(i)
        try:
            s = tok.convert_ids_to_tokens(int(i))
        except Exception:
            s = None
        return str(s) if s is not None else str(i)

    bos = cfg.bos_token_id if isinstance(cfg.bos_token_id, int) else None
    return Subject(str(path), hf, g2.instrument(hf), False, token_name, pool, bos, tok)


# ------------------------------------------------------------------------------ prompts/data
@dataclass
class InductionData:
    """Induction prompts with their scored targets.

    Attributes:
        ids: ``[n, T]`` token ids (right-padded when lengths differ; padding never affects scored logits).
        targets: ``[n, T]`` the next token at each position.
        mask: ``[n, T]`` bool, True where the prediction at that position is scored (repeated half,
            from its second token on).
        half: ``[n]`` half-lengths ``L``.
    """

    ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    half: torch.Tensor


def _random_repeats(subject: Subject, n: int, half: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean ``[bos] A A`` and corrupt ``[bos] B A`` rows of distinct random content tokens."""
    pool = subject.content_ids
    perm = torch.rand(n, pool.numel(), generator=g).argsort(1)
    a, b = pool[perm[:, :half]], pool[perm[:, half : 2 * half]]
    head = [] if subject.bos_id is None else [torch.full((n, 1), subject.bos_id, dtype=torch.long)]
    return torch.cat([*head, a, a], 1), torch.cat([*head, b, a], 1)


def _scored(ids: torch.Tensor, half: torch.Tensor, offset: int) -> InductionData:
    """Targets/mask for ``[bos] s s`` rows: score the repeated half from its 2nd token (``offset`` = BOS len)."""
    n, T = ids.shape
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    pos = torch.arange(T)[None, :]
    start = offset + half[:, None]  # position of the first repeated token
    mask = (pos >= start) & (pos < start + half[:, None] - 1)
    return InductionData(ids, targets, mask, half.clone())


def induction_data(subject: Subject, n: int, seed: int, *, half: int | None = None) -> InductionData:
    """Fresh induction prompts: the tasks' generator for the bundled model (lengths 4..24 unless ``half``),
    random vocabulary tokens (half-length ``half`` or ``PATCH_HALF``) for any other checkpoint."""
    if subject.bundled:
        from mishax_py.zoo import tasks

        b = tasks.induction_batch(n, seq_len=half, seed=seed)
        return InductionData(b.input_ids, b.targets, b.target_mask, b.info["half_len"])
    g = torch.Generator().manual_seed(seed)
    L = half or PATCH_HALF
    clean, _ = _random_repeats(subject, n, L, g)
    return _scored(clean, torch.full((n,), L), 0 if subject.bos_id is None else 1)


def clean_corrupt(subject: Subject, n: int, half: int, seed: int) -> tuple[InductionData, torch.Tensor]:
    """Aligned clean ``[bos] A A`` / corrupt ``[bos] B A`` prompts; returns (clean data, corrupt ids)."""
    if subject.bundled:
        from mishax_py.zoo import tasks

        c, k = tasks.induction_clean_corrupt(n, seq_len=half, seed=seed)
        return InductionData(c.input_ids, c.targets, c.target_mask, c.info["half_len"]), k.input_ids
    g = torch.Generator().manual_seed(seed)
    clean, corrupt = _random_repeats(subject, n, half, g)
    return _scored(clean, torch.full((n,), half), 0 if subject.bos_id is None else 1), corrupt


def accuracy(logits: torch.Tensor, data: InductionData) -> float:
    """Fraction of scored targets predicted (greedy)."""
    hits = (logits.argmax(-1) == data.targets) & data.mask
    return float(hits.sum()) / max(int(data.mask.sum()), 1)


def mean_logprob(logits: torch.Tensor, data: InductionData) -> torch.Tensor:
    """Mean log-probability of the correct next token over the scored positions (0-dim)."""
    lp = torch.log_softmax(logits.float(), -1).gather(-1, data.targets.unsqueeze(-1)).squeeze(-1)
    return lp[data.mask].mean()


# --------------------------------------------------------------------------- ground truth
@torch.no_grad()
def prefix_matching_scores(im: Any, data: InductionData, offset: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head prefix-matching and previous-token scores ``[n_layers, n_heads]`` each.

    For ``[bos] s1..sL s1..sL`` prompts (``offset`` = 1 with BOS): the prefix-matching score is the
    mean attention from the second occurrence of ``s_j`` (position ``offset + L + j - 1``) to
    ``s_{j+1}``'s first occurrence (position ``offset + j``), j = 1..L-1; the previous-token score is
    the mean attention from each non-initial token of the sequence to the position before it.
    """
    _, cache = im.run_with_cache(data.ids, sites=["blocks.*.attn.pattern"])
    n_layers = im.n_layers
    pm, prev = [], []
    for layer in range(n_layers):
        pat = cache[f"blocks.{layer}.attn.pattern"].float()  # [b, h, q, k]
        pm_rows, prev_rows = [], []
        for b in range(pat.shape[0]):
            L = int(data.half[b])
            j = torch.arange(1, L)
            q = offset + L + j - 1
            k = offset + j
            pm_rows.append(pat[b, :, q, k].mean(-1))
            qs = torch.arange(offset + 1, offset + 2 * L)
            prev_rows.append(pat[b, :, qs, qs - 1].mean(-1))
        pm.append(torch.stack(pm_rows).mean(0))
        prev.append(torch.stack(prev_rows).mean(0))
    return torch.stack(pm), torch.stack(prev)


def _ablate_heads(heads: list[tuple[int, int]]) -> dict[str, Any]:
    """``{blocks.L.attn.z: Ablate(heads=[...])}`` zero-ablating ``(layer, head)`` pairs."""
    from mishax_py.interventions import Ablate

    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)
    return {f"blocks.{layer}.attn.z": Ablate(heads=sorted(hs)) for layer, hs in sorted(by_layer.items())}


@torch.no_grad()
def head_ablation_accuracy(im: Any, data: InductionData, head_sets: list[list[tuple[int, int]]]) -> list[float]:
    """Induction accuracy with each set of ``(layer, head)`` zero-ablated at ``attn.z`` (one batched sweep)."""
    variants = [_ablate_heads(hs) for hs in head_sets]
    return [float(x) for x in im.sweep(data.ids, variants, metric=lambda lg: accuracy(lg, data), progress=False)]


def other_head_sets(others: list[tuple[int, int]], k: int, n: int, seed: int) -> list[list[tuple[int, int]]]:
    """Up to ``n`` distinct sets of ``k`` heads from ``others``: all of them if there are at most ``n``,
    else ``n`` seeded random draws. Empty for ``k == 0``."""
    if k == 0 or k > len(others):
        return []
    if math.comb(len(others), k) <= n:
        return [list(c) for c in itertools.combinations(others, k)]
    g = torch.Generator().manual_seed(seed)
    draws: list[list[tuple[int, int]]] = []
    while len(draws) < n:
        pick = sorted(others[i] for i in torch.randperm(len(others), generator=g)[:k].tolist())
        if pick not in draws:
            draws.append(pick)
    return draws


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


def _head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def run_demo(
    out: str | os.PathLike[str] = "mishax_demo",
    model: str | None = None,
    *,
    progress: bool = True,
    quiet: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the study and write ``out/index.html``, the figures and ``out/results.json``.

    Args:
        out: the report folder (created).
        model: ``None`` (the bundled ``gemma2-tiny``), a bundled model name, or a local Gemma 2
            checkpoint folder (random-token induction prompts; no SAE sections).
        progress: tqdm bars on stderr.
        quiet: do not print the summary table.
        seed: offsets every prompt seed (the defaults reproduce the shipped numbers).

    Returns:
        The results dict (what ``results.json`` holds).
    """
    t_start = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage_names = ["load", "accuracy", "patching", "ground truth", "attention", "SAE features", "feature edits",
                   "attribution graph", "report"]  # fmt: skip
    st = _Stages(stage_names, progress)
    results: dict[str, Any] = {"version": 1}
    sections: list[Section] = []
    try:
        st.start("load")
        subject = load_subject(model)
        cfg = subject.model.config
        offset = 0 if subject.bos_id is None else 1
        results["model"] = {
            "name": subject.name, "bundled": subject.bundled, "n_layers": subject.n_layers,
            "n_heads": subject.n_heads, "n_kv_heads": int(cfg.num_key_value_heads), "d_model": int(cfg.hidden_size),
            "vocab_size": int(cfg.vocab_size),
            "layer_types": list(getattr(cfg, "layer_types", None) or []),
            "sliding_window": getattr(cfg, "sliding_window", None),
            "n_params": int(sum(p.numel() for p in subject.model.parameters())),
        }  # fmt: skip

        st.start("accuracy")
        sections.append(_accuracy_section(subject, results, seed))

        st.start("patching")
        clean, corrupt = clean_corrupt(subject, PATCH_PROMPTS, PATCH_HALF, seed + 101)
        sections.append(_patching_section(subject, clean, corrupt, results, out_dir))
        named = [tuple(h) for h in results["induction_heads"]["heads"]]

        st.start("ground truth")
        sections.append(_ground_truth_section(subject, named, results, out_dir, seed, offset))

        st.start("attention")
        sections.append(_attention_section(subject, clean, named, results, out_dir, offset))

        st.start("SAE features")
        sae_sec, feats = _sae_section(subject, named, results, out_dir, seed)
        sections.append(sae_sec)

        st.start("feature edits")
        sections.append(_feature_edit_section(subject, feats, results, seed))

        st.start("attribution graph")
        sections.append(_graph_section(subject, results, out_dir, seed))

        st.start("report")
        results["timing"] = {"stages_seconds": dict(st.times), "total_seconds": None}
        results["environment"] = {
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        }  # fmt: skip
        results["timing"]["total_seconds"] = round(time.perf_counter() - t_start, 2)
        _write(out_dir, subject, sections, results)
    finally:
        st.close()
    results["timing"]["stages_seconds"] = dict(st.times)
    results["timing"]["total_seconds"] = round(time.perf_counter() - t_start, 2)
    (out_dir / "results.json").write_text(json.dumps(_json_safe(results), indent=2) + "\n", encoding="utf-8")
    if not quiet:
        print(_summary(results, out_dir))
    return results


# ---------------------------------------------------------------------------------- sections
def _accuracy_section(subject: Subject, results: dict[str, Any], seed: int) -> Section:
    im = subject.im
    rows: list[list[Any]] = []
    acc: dict[str, Any] = {}
    if subject.bundled:
        from mishax_py.zoo import tasks

        with torch.no_grad():
            ind = tasks.induction_batch(EVAL_PROMPTS, seed=12345 + seed)
            rec = tasks.recall_batch(EVAL_PROMPTS, seed=12346 + seed)
            a_ind = tasks.batch_accuracy(im.model, ind)
            a_rec = tasks.batch_accuracy(im.model, rec)
            rows.append(["induction (L 4–24)", EVAL_PROMPTS, int(ind.target_mask.sum()), a_ind])
            rows.append(["recall (2–24 pairs)", EVAL_PROMPTS, int(rec.target_mask.sum()), a_rec])
            by_len: dict[str, float] = {}
            for L in (4, 8, 16, 24):
                b = tasks.induction_batch(64, seq_len=L, seed=5000 + L + seed)
                by_len[f"induction L={L}"] = tasks.batch_accuracy(im.model, b)
                rows.append([f"induction L={L}", 64, int(b.target_mask.sum()), by_len[f"induction L={L}"]])
            for P in (4, 8, 16, 24):
                b = tasks.recall_batch(64, n_pairs=P, seed=6000 + P + seed)
                by_len[f"recall pairs={P}"] = tasks.batch_accuracy(im.model, b)
                rows.append([f"recall pairs={P}", 64, int(b.target_mask.sum()), by_len[f"recall pairs={P}"]])
        acc = {"induction": a_ind, "recall": a_rec, "by_length": by_len,
               "chance": 1.0 / (tasks.VOCAB_SIZE - tasks.CONTENT_START)}  # fmt: skip
        note = (
            "Fresh prompts (seeds never used in training). Induction: <code>&lt;bos&gt; s1..sL s1..sL</code>, "
            "scored on s2..sL of the repeat; recall: <code>&lt;bos&gt; k1 v1 .. kn vn ? ki</code> → vi. "
            f"Chance is {acc['chance']:.3f}."
        )
    else:
        data = induction_data(subject, 64, 12345 + seed)
        with torch.no_grad():
            a_ind = accuracy(im.run(data.ids), data)
        rows.append([f"random-token induction (L={PATCH_HALF})", 64, int(data.mask.sum()), a_ind])
        acc = {"induction": a_ind, "chance": 1.0 / subject.content_ids.numel()}
        note = (
            "Random-token induction prompts <code>[bos] A A</code> with A drawn from the model's vocabulary; "
            "scored on the repeated half from its second token."
        )
    results["accuracy"] = acc
    return Section("Task accuracy", [note], [Table(["task", "prompts", "scored targets", "accuracy"], rows)],
                   anchor="accuracy")  # fmt: skip


def _patching_section(
    subject: Subject, clean: InductionData, corrupt: torch.Tensor, results: dict[str, Any], out_dir: Path
) -> Section:
    from mishax_py.patching import activation_patching

    im = subject.im
    L = PATCH_HALF
    T = clean.ids.shape[1]
    off = T - 2 * L
    pos_labels = (["<bos>"] if off else []) + [f"s{i + 1}" for i in range(L)] + [f"s{i + 1}'" for i in range(L)]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return mean_logprob(logits, clean)

    resid = activation_patching(im, clean.ids, corrupt, metric, site="resid_pre", by="pos", pos_labels=pos_labels,
                                progress=False)  # fmt: skip
    z = activation_patching(im, clean.ids, corrupt, metric, site="attn.z", by="head", progress=False)
    rn, zn = resid.normalized(), z.normalized()
    n_layers, n_heads = zn.shape
    order = sorted(((float(zn[layer, h]), layer, h) for layer in range(n_layers) for h in range(n_heads)),
                   reverse=True)  # fmt: skip
    gap = resid.clean - resid.corrupt
    # No heads are named when the model does not do induction (clean barely beats corrupt): the
    # normalised recoveries would only be noise divided by a tiny gap.
    named = [(layer, h) for v, layer, h in order if v >= HEAD_THRESHOLD] if gap > MIN_GAP else []
    heatmap_figure(
        rn, out_dir / "patching_resid_pre.png",
        title="Activation patching, resid_pre (fraction of clean log-prob recovered)",
        row_labels=[f"layer {i}" for i in range(n_layers)], col_labels=pos_labels, xlabel="position (s' = repeat)",
        ylabel="layer", colorbar_label="normalised recovery",
    )  # fmt: skip
    heatmap_figure(
        zn, out_dir / "patching_attn_z.png", title="Activation patching, attn.z per head (all positions)",
        row_labels=[f"layer {i}" for i in range(n_layers)], col_labels=[f"H{h}" for h in range(n_heads)],
        xlabel="head", ylabel="layer", annotate=True, colorbar_label="normalised recovery", highlight=named,
    )  # fmt: skip
    results["patching"] = {
        "prompts": PATCH_PROMPTS, "half_len": L, "metric": "mean log-prob of the correct next token (repeated half)",
        "direction": "denoise (clean into corrupt)", "clean_metric": resid.clean, "corrupt_metric": resid.corrupt,
        "resid_pre": {"values": resid.values.tolist(), "normalized": rn.tolist(), "axes": list(resid.axes),
                      "pos_labels": pos_labels},
        "attn_z": {"values": z.values.tolist(), "normalized": zn.tolist(), "axes": list(z.axes)},
    }  # fmt: skip
    results["induction_heads"] = {
        "heads": [list(h) for h in named], "labels": [_head_label(*h) for h in named],
        "threshold": HEAD_THRESHOLD, "recovery": [float(zn[h]) for h in named], "gap": gap, "min_gap": MIN_GAP,
        "criterion": f"patching the head's attn.z (clean into corrupt, all positions) recovers >= {HEAD_THRESHOLD} "
                     "of the clean-corrupt gap in mean log-prob",
    }  # fmt: skip
    # Attribution patching: the same grids from gradients (one backward for both), against the exact ones
    from mishax_py.attribution import attribution_patching, attribution_patching_sites
    from mishax_py.attribution_check import pearson

    est = attribution_patching_sites(im, clean.ids, corrupt, metric, {"resid_pre": "pos", "attn.z": "head"})
    r_resid, r_z = pearson(est["resid_pre"].values, resid.values), pearson(est["attn.z"].values, z.values)
    per_layer = attribution_patching(im, clean.ids, corrupt, metric, "resid_pre", method="atp-layer")
    r_layer = pearson(per_layer.values, resid.values)
    top_est = sorted(((float(est["attn.z"].effects[layer, h]), layer, h) for layer in range(n_layers)
                      for h in range(n_heads)), reverse=True)[: max(1, len(named))]  # fmt: skip
    results["attribution_patching"] = {
        "method": "atp (attribution_patching_sites: one forward/backward for both grids)",
        "pearson_resid_pre": r_resid, "pearson_attn_z": r_z,
        "attn_z_values": est["attn.z"].values.tolist(), "resid_pre_values": est["resid_pre"].values.tolist(),
        "top_heads": [[layer, h] for _, layer, h in top_est],
        "atp_layer_resid_pre_values": per_layer.values.tolist(), "pearson_atp_layer_resid_pre": r_layer,
    }  # fmt: skip
    rec_row = rn.argmax(-1).tolist()
    return Section(
        "Activation patching: where induction happens",
        [
            f"{PATCH_PROMPTS} clean prompts <code>&lt;bos&gt; A A</code> and corrupt ones <code>&lt;bos&gt; B A</code> "
            f"(A, B: {L} distinct random tokens; the repeated half is identical, but only the clean prompt lets the "
            "model predict it). Metric: mean log-probability of the correct next token on the repeated half — "
            f"clean {resid.clean:.3f}, corrupt {resid.corrupt:.3f}. Each cell patches one clean activation into the "
            "corrupt run (denoising); colours show the fraction of the gap recovered.",
            "Per layer, the position where patching resid_pre helps most: "
            + ", ".join(f"layer {i}: {pos_labels[p]}" for i, p in enumerate(rec_row)) + ".",
            (("<b>Induction heads named by patching</b> (attn.z recovery ≥ "
              f"{HEAD_THRESHOLD}): " + ", ".join(f"{_head_label(*h)} ({float(zn[h]):.2f})" for h in named) + ".")
             if named else f"<b>No induction heads named</b>: the clean-corrupt gap ({gap:.3f} nats) is below "
             f"{MIN_GAP} or no head recovers {HEAD_THRESHOLD} of it — the model does not do induction."),
            "Attribution patching (<code>attribution_patching_sites</code>: both grids from one forward and one "
            f"backward) estimates the same cells: Pearson r = {r_z:.3f} with the exact per-head grid, "
            f"{r_resid:.3f} with the exact resid_pre grid"
            + (" (single-token patches of this task interact strongly, which a first-order estimate cannot see; "
               "<code>check_attribution</code> measures such gaps on a sample)" if r_resid < 0.8 else "")
            + ". Its top heads: " + ", ".join(_head_label(layer, h) for _, layer, h in top_est) + ". "
            "With each patch run exactly through its own layer and first order after "
            f"(<code>method=\"atp-layer\"</code>), the resid_pre estimate reaches r = {r_layer:.3f}.",
        ],
        figures=[("patching_resid_pre.png", "resid_pre patched per (layer, position)"),
                 ("patching_attn_z.png", "attn.z patched per (layer, head); outlined: the named induction heads")],
        anchor="patching",
    )  # fmt: skip


def _ground_truth_section(
    subject: Subject, named: list[tuple[int, int]], results: dict[str, Any], out_dir: Path, seed: int, offset: int
) -> Section:
    im = subject.im
    n_layers, n_heads = subject.n_layers, subject.n_heads
    data_pm = induction_data(subject, 32, 7000 + seed, half=PATCH_HALF)
    pm, prev = prefix_matching_scores(im, data_pm, offset)
    data = induction_data(subject, 128 if subject.bundled else 32, 8000 + seed)
    all_heads = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    others = [h for h in all_heads if h not in named]
    k = len(named)
    draws = other_head_sets(others, k, OTHER_DRAWS, 9000 + seed)
    sets = [[], list(named)] + draws + [[h] for h in all_heads]
    accs = head_ablation_accuracy(im, data, sets)
    base, acc_named = accs[0], accs[1]
    acc_others = accs[2 : 2 + len(draws)]
    single = torch.tensor(accs[2 + len(draws) :]).reshape(n_layers, n_heads)
    prev_head = max(all_heads, key=lambda h: float(prev[h]))
    heatmap_figure(
        pm, out_dir / "prefix_matching.png", title="Prefix-matching score (ground truth)",
        row_labels=[f"layer {i}" for i in range(n_layers)], col_labels=[f"H{h}" for h in range(n_heads)],
        xlabel="head", ylabel="layer", cmap="Greens", vrange=(0.0, 1.0), annotate=True, highlight=named,
        colorbar_label="attention to the token after the first occurrence",
    )  # fmt: skip
    heatmap_figure(
        single, out_dir / "single_head_ablation.png", title="Induction accuracy with one head zero-ablated",
        row_labels=[f"layer {i}" for i in range(n_layers)], col_labels=[f"H{h}" for h in range(n_heads)],
        xlabel="head", ylabel="layer", cmap="viridis", vrange=(0.0, 1.0), annotate=True, highlight=named,
        colorbar_label=f"accuracy (clean {base:.2f})",
    )  # fmt: skip
    labels = ["none", "named: " + "+".join(_head_label(*h) for h in named)] + [
        "+".join(_head_label(*h) for h in d) for d in draws
    ]
    bar_figure(labels, {"induction accuracy": [base, acc_named, *acc_others]}, out_dir / "head_ablation.png",
               title=f"Zero-ablating the {k} named head(s) vs {len(draws)} sets of {k} other head(s)",
               ylabel="accuracy", hline=0.5, ylim=(0, 1.05))  # fmt: skip
    results["ground_truth"] = {
        "prefix_matching": pm.tolist(), "previous_token": prev.tolist(),
        "prefix_matching_named": [float(pm[h]) for h in named],
        "prefix_matching_others_max": max((float(pm[h]) for h in others), default=float("nan")),
        "top_prefix_matching_heads": [list(h) for h in sorted(all_heads, key=lambda h: -float(pm[h]))[:max(k, 1)]],
        "previous_token_head": list(prev_head), "previous_token_score": float(prev[prev_head]),
        "accuracy_clean": base, "accuracy_named_ablated": acc_named,
        "other_sets": [[list(h) for h in d] for d in draws], "accuracy_others_ablated": acc_others,
        "accuracy_others_mean": sum(acc_others) / len(acc_others) if acc_others else float("nan"),
        "accuracy_others_min": min(acc_others, default=float("nan")),
        "single_head_ablation": single.tolist(), "eval_prompts": int(data.ids.shape[0]),
    }  # fmt: skip
    gt = results["ground_truth"]
    rows = [[_head_label(*h), float(pm[h]), float(prev[h]), float(single[h]), "yes" if h in named else ""]
            for h in sorted(all_heads, key=lambda h: -float(pm[h]))]  # fmt: skip
    return Section(
        "Ground truth: are these the induction heads?",
        [
            "Independent checks of the heads named by patching. <b>Prefix-matching score</b>: attention from the "
            "second occurrence of a token to the token right after its first occurrence (an induction head's "
            "signature), averaged over the repeated half of 32 fresh prompts. <b>Previous-token score</b>: attention "
            "to the immediately preceding token.",
            (f"Zero-ablating the named head(s) at attn.z drops induction accuracy from {base:.3f} to "
             f"<b>{acc_named:.3f}</b>; ablating {k} other head(s) gives {gt['accuracy_others_mean']:.3f} on average "
             f"over {len(draws)} sets (lowest {gt['accuracy_others_min']:.3f}). " if named else
             f"No heads were named by patching; induction accuracy {base:.3f}. ")
            + f"The strongest previous-token head is "
            f"{_head_label(*prev_head)} (score {float(prev[prev_head]):.2f}): it feeds the induction heads, so "
            "ablating it also hurts induction.",
        ],
        [Table(["head", "prefix-matching", "previous-token", "accuracy ablated alone", "named by patching"], rows)],
        [("prefix_matching.png", "prefix-matching score per head (outlined: named by patching)"),
         ("head_ablation.png", "induction accuracy with head sets zero-ablated (dashed: 50%)"),
         ("single_head_ablation.png", "induction accuracy with each head ablated alone")],
        anchor="ground-truth",
    )  # fmt: skip


def _attention_section(
    subject: Subject, clean: InductionData, named: list[tuple[int, int]], results: dict[str, Any], out_dir: Path,
    offset: int,
) -> Section:
    im = subject.im
    ids = clean.ids[:1]
    prev_head = tuple(results["ground_truth"]["previous_token_head"])
    top_pm = tuple(results["ground_truth"]["top_prefix_matching_heads"][0])
    heads = list(named[:4]) or [top_pm]
    heads += [prev_head] if prev_head not in heads else []
    with torch.no_grad():
        sites = [f"blocks.{layer}.attn.pattern" for layer in sorted({h[0] for h in heads})]
        _, cache = im.run_with_cache(ids, sites=sites)
    tokens = [subject.token_name(int(t)) for t in ids[0]]
    pats = [cache[f"blocks.{layer}.attn.pattern"][0, h] for layer, h in heads]
    role = {h: "top prefix-matching" for h in heads} | {prev_head: "previous token"} | {h: "induction" for h in named}
    titles = [f"{_head_label(*h)} ({role[h]})" for h in heads]
    attention_figure(pats, titles, tokens, out_dir / "attention_patterns.png",
                     suptitle="Attention patterns on a clean induction prompt")  # fmt: skip
    results["attention"] = {"prompt_tokens": tokens, "heads": [list(h) for h in heads]}
    L = int(clean.half[0])
    return Section(
        "Attention patterns",
        [
            f"One clean prompt (first half: positions {offset}..{offset + L - 1}, repeat: {offset + L}.."
            f"{offset + 2 * L - 1}). "
            "An induction head's query at the repeated token attends to the token right after that token's first "
            "occurrence: an off-diagonal stripe L-1 positions below the diagonal. The previous-token head attends "
            "one position back.",
        ],
        figures=[("attention_patterns.png", "attention maps; rows: query positions, columns: key positions")],
        anchor="attention",
    )  # fmt: skip


def _not_available(title: str, why: str, anchor: str) -> Section:
    return Section(title, [f'<span class="na">Not available in this build: {why}</span>'], anchor=anchor)


@dataclass
class _Features:
    """What the SAE section found, for the feature-edit section."""

    sae: Any
    name: str
    shown: list[int]  # the task features in the table (most often among the top carriers first)
    promotes: dict[int, int]  # feature -> the token its decoder direction promotes most (logit lens)
    max_act: dict[int, float]


TOP_K_CARRIERS = 5  # features ablated per position in the feature-ablation experiment


def direct_logit_attribution(sae: Any, f: torch.Tensor, W_U: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[n, T, d_sae]``: each feature's direct contribution to the (de-meaned) logit of ``targets [n, T]``.

    ``f[..., i] * W_dec[i] · (W_U[target] - mean_v W_U[v])``: the logit lens of the feature's output,
    ignoring the final norm's per-token scale (which rescales every feature of a position alike).
    """
    dirs = W_U[targets] - W_U.mean(0)  # [n, T, d_model]
    return f * torch.einsum("ntm,dm->ntd", dirs, sae.W_dec.detach().float())


@torch.no_grad()
def _sae_section(
    subject: Subject, named: list[tuple[int, int]], results: dict[str, Any], out_dir: Path, seed: int
) -> tuple[Section, _Features | None]:
    title, anchor = "SAE features on the task", "sae-features"
    if not subject.bundled:
        results["sae_features"] = {"available": False, "reason": "no bundled SAEs for this model"}
        return Section(title, ['<span class="na">Skipped: no SAEs are bundled for this model.</span>'],
                       anchor=anchor), None  # fmt: skip
    try:
        from mishax_py.zoo.saes import has_saes, load_saes, sae_registry

        if not has_saes(subject.name):
            raise FileNotFoundError("the SAE registry is missing (scripts/train_tiny_saes.py)")
        all_saes = load_saes(subject.name, kind="sae")
        if not all_saes:
            raise FileNotFoundError("no residual SAEs are registered")
    except (ImportError, FileNotFoundError, KeyError) as e:
        results["sae_features"] = {"available": False, "reason": str(e)}
        return _not_available(title, str(e), anchor), None
    from mishax_py.zoo import tasks

    # The residual SAE right after the latest induction head (it reads what the heads wrote), else the last one.
    by_layer = {int(s.site.split(".")[1]): (n, s) for n, s in all_saes.items()}
    top_layer = max((h[0] for h in named), default=subject.n_layers - 1)
    layer = min((li for li in by_layer if li >= top_layer), default=max(by_layer))
    name, sae = by_layer[layer]
    site = sae.site
    L = PATCH_HALF
    data = induction_data(subject, 256, 10_000 + seed, half=L)
    _, cache = subject.im.run_with_cache(data.ids, sites=[site])
    f = sae.encode(cache[site])  # [n, T, d_sae]
    T = data.ids.shape[1]
    pos = torch.arange(T)
    first = (pos >= 1) & (pos <= L)  # first half: the next token is not predictable
    rep = data.mask  # [n, T] repeated half from its 2nd token: the next token is predictable
    W_U = subject.model.get_output_embeddings().weight.detach().float()
    attr = direct_logit_attribution(sae, f, W_U, data.targets)
    top = attr.topk(TOP_K_CARRIERS, -1).indices[rep]  # [n_rep, k]: the top carriers of each repeated position
    carrier_counts = torch.bincount(top.flatten(), minlength=sae.d_sae)
    on = f > 0
    r_rep = on[rep].float().mean(0)
    r_first = on[:, first].float().mean((0, 1))
    mean_attr = attr[rep].sum(0) / on[rep].sum(0).clamp_min(1)
    shown = [int(i) for i in carrier_counts.argsort(descending=True)[:N_FEATURES] if int(carrier_counts[i]) > 0]
    rec = tasks.recall_batch(128, n_pairs=8, seed=11_000 + seed)
    _, cache_r = subject.im.run_with_cache(rec.input_ids, sites=[site])
    f_r = sae.encode(cache_r[site])
    logit_dirs = sae.W_dec.detach().float() @ (W_U - W_U.mean(0)).T  # [d_sae, vocab]
    names = tasks.token_names()
    rows, feats_json, max_act, promotes = [], [], {}, {}
    for i in shown:
        contexts = []
        for src_ids, acts in ((data.ids, f[..., i]), (rec.input_ids, f_r[..., i])):
            flat = acts.flatten()
            for j in flat.argsort(descending=True)[:3].tolist():
                b, p = divmod(j, acts.shape[1])
                if float(flat[j]) <= 0:
                    continue
                prev = names[int(src_ids[b, p - 1])] if p > 0 else ""
                after = names[int(src_ids[b, p + 1])] if p + 1 < src_ids.shape[1] else "∅"
                contexts.append((float(flat[j]), f"{prev} [{names[int(src_ids[b, p])]}] → {after}"))
        contexts.sort(key=lambda c: -c[0])
        prom = logit_dirs[i].argsort(descending=True)[:3].tolist()
        promotes[i] = prom[0]
        max_act[i] = max([c[0] for c in contexts], default=0.0)
        n_rep = int(rep.sum())
        rows.append([i, f"{int(carrier_counts[i])} ({int(carrier_counts[i]) / n_rep:.1%})", float(r_rep[i]),
                     float(r_first[i]), float(mean_attr[i]), max_act[i], "; ".join(c[1] for c in contexts[:4]),
                     " ".join(names[t] for t in prom)])  # fmt: skip
        feats_json.append({
            "feature": i, "top_carrier_count": int(carrier_counts[i]), "freq_repeated": float(r_rep[i]),
            "freq_first_half": float(r_first[i]), "mean_logit_attribution": float(mean_attr[i]),
            "max_activation": max_act[i], "top_contexts": [c[1] for c in contexts[:6]],
            "promoted_tokens": [names[t] for t in prom],
        })  # fmt: skip
    results["sae_features"] = {
        "available": True, "sae": name, "site": site, "d_sae": sae.d_sae, "registry": sae.metadata.get("registry", {}),
        "top_k_carriers": TOP_K_CARRIERS, "n_carrier_features": int((carrier_counts > 0).sum()),
        "features": feats_json, "l0_on_prompts": float(on[:, 1:].sum(-1).float().mean()),
    }  # fmt: skip
    sae_rows = [[e["name"], e["site"] + (" → " + e["output_site"] if e["kind"] == "transcoder" else ""),
                 e["d_sae"], e["l0"], e["fvu"], e["delta_lm_loss"]] for e in sae_registry(subject.name)["saes"]]
    section = Section(
        title,
        [
            "Bundled JumpReLU SAEs and transcoders (Gemma Scope <code>params.npz</code> files loaded with "
            "<code>saes.load</code>; numbers measured on held-out task prompts; Δ LM loss: increase of the "
            "cross-entropy on the tasks' scored tokens when the site is replaced by the reconstruction).",
            f"Features of <code>{name}</code> ({site}, right after the induction heads) on 256 induction prompts. "
            "At every position of the repeated half, each feature's direct effect on the correct next token's "
            "logit is its activation times its decoder direction's logit lens "
            f"(<code>f_i · W_dec[i] · W_U[next]</code>); the {TOP_K_CARRIERS} largest are that position's "
            f"<b>carriers</b>. {results['sae_features']['n_carrier_features']} features carry the answer somewhere; "
            "the table lists those that do so most often, with their firing rates on the repeated and first half, "
            "their top-activating contexts and the tokens they promote.",
        ],
        [Table(["SAE", "site", "d_sae", "L0", "FVU", "Δ LM loss"], sae_rows, "Bundled SAEs"),
         Table(["feature", "top carrier at", "fires on repeat", "fires on 1st half", "mean attribution", "max act.",
                "top-activating contexts: previous [token] → next", "promoted tokens"], rows,
               f"Task features of {name}")],
        anchor=anchor,
    )  # fmt: skip
    return section, _Features(sae, name, shown, promotes, max_act)


@torch.no_grad()
def _feature_edit_section(subject: Subject, feats: _Features | None, results: dict[str, Any], seed: int) -> Section:
    title, anchor = "Feature ablation and clamping", "feature-edits"
    if feats is None or not feats.shown:
        why = results.get("sae_features", {}).get("reason", "no task features found")
        results["feature_edits"] = {"available": False, "reason": why}
        return Section(title, [f'<span class="na">Skipped: {why}.</span>'], anchor=anchor)
    import saes
    from mishax_py.zoo import tasks

    im, sae = subject.im, feats.sae
    site = sae.site
    data = induction_data(subject, 128, 12_000 + seed, half=PATCH_HALF)
    _, cache = im.run_with_cache(data.ids, sites=[site])
    f = sae.encode(cache[site])
    W_U = subject.model.get_output_embeddings().weight.detach().float()
    attr = direct_logit_attribution(sae, f, W_U, data.targets)
    g = torch.Generator().manual_seed(13_000 + seed)
    ablation: dict[str, Any] = {}
    rows = []

    def run_masked(mask: torch.Tensor) -> tuple[float, float]:
        edit = (lambda ff: ff.masked_fill(mask.to(ff.device), 0.0)) if mask is not None else None
        lg = im.run(data.ids, interventions={site: saes.Splice(sae, edit=edit)})
        return accuracy(lg, data), float(mean_logprob(lg, data))

    a0, m0 = run_masked(None)
    rows.append(["none", "", a0, m0])
    lg_rec = im.run(data.ids, interventions={site: saes.Splice(sae, keep_error=False)})
    rows.append(["SAE reconstruction only (no error term)", "", accuracy(lg_rec, data),
                 float(mean_logprob(lg_rec, data))])  # fmt: skip
    ablation["reconstruction_only"] = {"accuracy": rows[-1][2], "mean_logprob": rows[-1][3]}
    for k in (1, 3, TOP_K_CARRIERS):
        where = data.mask[..., None]
        m_top = torch.zeros_like(f, dtype=torch.bool).scatter_(-1, attr.topk(k, -1).indices, True) & where
        noise = torch.rand(f.shape, generator=g) * (f > 0)
        noise[m_top] = 0.0
        m_rnd = torch.zeros_like(f, dtype=torch.bool).scatter_(-1, noise.topk(k, -1).indices, True) & where & (f > 0)
        (a_top, lp_top), (a_rnd, lp_rnd) = run_masked(m_top), run_masked(m_rnd)
        rows.append([f"ablate the top {k} carrier(s) per position", k, a_top, lp_top])
        rows.append([f"ablate {k} random active feature(s) per position", k, a_rnd, lp_rnd])
        ablation[f"top{k}"] = {"accuracy": a_top, "mean_logprob": lp_top}
        ablation[f"random{k}"] = {"accuracy": a_rnd, "mean_logprob": lp_rnd}
    # Clamp: the task feature whose decoder most clearly promotes one token; clamp it at the answer position of
    # recall prompts (at 2x its largest activation seen) and count how often the model now outputs that token.
    logit_dirs = sae.W_dec.detach().float() @ (W_U - W_U.mean(0)).T
    margin = {i: float(logit_dirs[i].topk(2).values[0] - logit_dirs[i].topk(2).values[1]) for i in feats.shown}
    best = max(feats.shown, key=lambda i: margin[i])
    target = feats.promotes[best]
    rec = tasks.recall_batch(128, n_pairs=8, seed=14_000 + seed)
    qpos = int(rec.info["answer_pos"][0])
    value = 2.0 * max(feats.max_act[best], 1e-3)
    base_logits = im.run(rec.input_ids)
    clamp_logits = im.run(rec.input_ids, interventions={
        site: saes.Splice(sae, edit=saes.FeatureClamp([best], value, positions=[qpos]))})  # fmt: skip
    keep = rec.info["answer"] != target  # prompts whose answer is not already the clamped token
    before = float((base_logits[keep, qpos].argmax(-1) == target).float().mean())
    after = float((clamp_logits[keep, qpos].argmax(-1) == target).float().mean())
    acc_before = float((base_logits[:, qpos].argmax(-1) == rec.info["answer"]).float().mean())
    acc_after = float((clamp_logits[:, qpos].argmax(-1) == rec.info["answer"]).float().mean())
    names = tasks.token_names()
    results["feature_edits"] = {
        "available": True, "sae": feats.name, "site": site, "prompts": int(data.ids.shape[0]),
        "clean": {"accuracy": a0, "mean_logprob": m0}, "ablation": ablation,
        "clamp": {"feature": best, "value": value, "position": qpos, "promoted_token": names[target],
                  "rate_before": before, "rate_after": after, "recall_accuracy_before": acc_before,
                  "recall_accuracy_after": acc_after, "prompts": int(keep.sum())},
    }  # fmt: skip
    k = TOP_K_CARRIERS
    return Section(
        title,
        [
            f"Edits go through <code>saes.Splice</code> at {site} with the error term kept, so only the edit "
            "changes the run. At each position of the repeated half of 128 fresh induction prompts we ablate the "
            "features that carry the correct next token (largest direct logit attribution, see above) versus as "
            f"many random features active at the same position: ablating {k} carriers per position takes "
            f"induction accuracy from {a0:.3f} to <b>{ablation[f'top{k}']['accuracy']:.3f}</b>; {k} random active "
            f"features leave {ablation[f'random{k}']['accuracy']:.3f}.",
            f"<b>Clamp</b>: feature {best} (its decoder promotes <code>{names[target]}</code>) clamped to "
            f"{value:.2f} at the answer position of {int(keep.sum())} recall prompts whose answer is another "
            f"token: the model outputs <code>{names[target]}</code> on {after:.0%} of them (before: {before:.0%}); "
            f"recall accuracy {acc_before:.3f} → {acc_after:.3f}.",
        ],
        [Table(["edit", "features per position", "induction accuracy", "mean log-prob"], rows)],
        anchor=anchor,
    )  # fmt: skip


def _graph_section(subject: Subject, results: dict[str, Any], out_dir: Path, seed: int) -> Section:
    title, anchor = "Attribution graph", "attribution-graph"
    if not subject.bundled:
        results["attribution_graph"] = {"available": False, "reason": "no bundled transcoders for this model"}
        return Section(title, ['<span class="na">Skipped: no transcoders are bundled for this model.</span>'],
                       anchor=anchor)  # fmt: skip
    try:
        from mishax_py.circuits import attribution_graph, render_graph
        from mishax_py.zoo.saes import has_saes, load_saes

        if not has_saes(subject.name):
            raise FileNotFoundError("no bundled transcoders")
        tcs = list(load_saes(subject.name, kind="transcoder").values())
        if not tcs:
            raise FileNotFoundError("no bundled transcoders")
    except (ImportError, FileNotFoundError, KeyError) as e:
        results["attribution_graph"] = {"available": False, "reason": str(e)}
        return _not_available(title, str(e), anchor)
    from mishax_py.zoo import tasks

    b = tasks.induction_batch(1, seq_len=5, seed=15_000 + seed)
    ids = b.input_ids[:, :-1]  # predict the last token of the repeat
    names = tasks.token_names()
    tokens = [names[int(t)] for t in ids[0]]
    with torch.no_grad():
        logits = subject.im.run(ids)
    answer = int(b.input_ids[0, -1])
    graph = attribution_graph(subject.im, ids, tcs, tokenizer=subject.tokenizer, max_n_logits=3, batch_size=64,
                              progress=False)  # fmt: skip
    render_graph(graph, out_dir / "attribution_graph.png",
                 title=f"Attribution graph: {' '.join(tokens)} → {names[answer]}")  # fmt: skip
    top_logit = graph.logit_index(0)
    srcs = [(_node_name(node, names), w) for node, w in graph.top_sources(top_logit, k=6)]
    results["attribution_graph"] = {
        "available": True, "prompt": tokens, "answer": names[answer],
        "predicted": names[int(logits[0, -1].argmax())],
        "n_features": int(graph.n_features), "transcoder_layers": [int(x) for x in graph.transcoder_layers],
        "completeness_error": float(graph.completeness_error()),
        "logit_tokens": [names[int(t)] for t in graph.logit_tokens],
        "top_sources_of_top_logit": [[s, float(w)] for s, w in srcs],
    }  # fmt: skip
    ag = results["attribution_graph"]
    return Section(
        title,
        [
            f"Transcoder attribution graph (circuit-tracer method, <code>mishax_py.circuits</code>) of "
            f"<code>{' '.join(tokens)}</code>; the model predicts <code>{ag['predicted']}</code> "
            f"(answer <code>{names[answer]}</code>). {ag['n_features']} active transcoder features; completeness "
            f"error {ag['completeness_error']:.2e}. Strongest direct sources of the top logit: "
            + ", ".join(f"{s} ({w:+.2f})" for s, w in srcs) + ".",
        ],
        figures=[("attribution_graph.png", "pruned attribution graph (red: positive, blue: negative edges)")],
        anchor=anchor,
    )  # fmt: skip


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


# ------------------------------------------------------------------------------------ output
def _json_safe(x: Any) -> Any:
    """``x`` with NaN/inf floats replaced by ``None`` and tuples by lists (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _write(out_dir: Path, subject: Subject, sections: list[Section], results: dict[str, Any]) -> None:
    m = results["model"]
    heads = ", ".join(results["induction_heads"]["labels"])
    sub = (
        f"Model <code>{subject.name}</code>: Gemma 2, {m['n_layers']} layers × {m['n_heads']} heads "
        f"({m['n_kv_heads']} KV), d_model {m['d_model']}, vocab {m['vocab_size']}, {m['n_params']:,} parameters. "
        f"Induction heads found: <b>{heads}</b>. All numbers are in <code>results.json</code>."
    )
    render_html(out_dir / "index.html", title="mishax-py demo report", subtitle=sub, sections=sections,
                footer="Generated by <code>mishax-py demo</code> (mishax_py.zoo.demo).")  # fmt: skip


def _summary(results: dict[str, Any], out_dir: Path) -> str:
    rows: list[list[Any]] = []
    acc = results["accuracy"]
    rows.append(["induction accuracy", acc["induction"]])
    if "recall" in acc:
        rows.append(["recall accuracy", acc["recall"]])
    ih = results["induction_heads"]
    gt = results["ground_truth"]
    rows.append(["induction heads (patching)", ", ".join(ih["labels"]) or "none"])
    rows.append(["prefix-matching of those heads", ", ".join(f"{x:.2f}" for x in gt["prefix_matching_named"])])
    rows.append(["max prefix-matching, other heads", gt["prefix_matching_others_max"]])
    rows.append(["accuracy, named heads ablated", gt["accuracy_named_ablated"]])
    rows.append(["accuracy, other heads ablated (mean)", gt["accuracy_others_mean"]])
    fe = results.get("feature_edits", {})
    if fe.get("available"):
        k = results["sae_features"]["top_k_carriers"]
        rows.append([f"accuracy, top-{k} SAE carriers ablated", fe["ablation"][f"top{k}"]["accuracy"]])
        rows.append([f"accuracy, {k} random SAE features ablated", fe["ablation"][f"random{k}"]["accuracy"]])
        c = fe["clamp"]
        rows.append([f"clamp feature {c['feature']} → {c['promoted_token']}", f"{c['rate_before']:.0%} → "
                     f"{c['rate_after']:.0%}"])  # fmt: skip
    ag = results.get("attribution_graph", {})
    rows.append(["attribution graph", f"{ag['n_features']} features" if ag.get("available") else "not available"])
    rows.append(["wall time (s)", results["timing"]["total_seconds"]])
    return text_table(["result", "value"], rows) + f"\nreport: {(out_dir / 'index.html').resolve()}"
