"""The demo report: what ``mishax-py demo`` says about its results, as HTML, figures, JSON and a terminal table.

Everything here reads the results dict of :func:`mishax_py.zoo.demo.compute_results` and
nothing else: no model is run. Every sentence that makes a claim is chosen by comparing
measured numbers (the ``*_sentence`` functions, each a pure function of the results, tested
in ``tests/mishax_py/zoo/test_report.py``): an ablation is said to hurt only when it lowers accuracy by
more than ``MARGIN``, a head set is called specific only when it beats its control by more
than ``MARGIN``, and when no induction head was found the report says so and why. Figures
come from :mod:`mishax_py.zoo.figures`, the page from :mod:`mishax_py.zoo.page`.

Why over 500 lines: the claim sentences (one small function each) and the seven sections that
use them belong together -- a section's prose is only correct with its sentence rules.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mishax_py.zoo.figures import attention_figure, bar_figure, heatmap_figure, looks_constant
from mishax_py.zoo.page import Cell, Section, Table, render_html, text_table

__all__ = [
    "MARGIN",
    "attention_sentence",
    "attribution_patching_sentence",
    "build_sections",
    "carrier_ablation_sentence",
    "clamp_sentence",
    "flat_grid_sentence",
    "graph_sentence",
    "head_ablation_sentence",
    "induction_heads_sentence",
    "omitted_figures",
    "prefix_matching_sentence",
    "previous_token_sentence",
    "sae_site_sentence",
    "single_head_sentence",
    "subtitle",
    "summary",
    "write_figures",
    "write_report",
    "write_results",
]

Results = dict[str, Any]

MARGIN = 0.05  # accuracy changes of at most this much are reported as "no change"


# ------------------------------------------------------------------------------ helpers
def _code(text: object) -> str:
    return f"<code>{html.escape(str(text))}</code>"


def _label(head: Sequence[int]) -> str:
    return f"L{int(head[0])}H{int(head[1])}"


def _labels(heads: Sequence[Sequence[int]]) -> str:
    return ", ".join(_label(h) for h in heads)


def _lower(a: float, b: float, margin: float) -> bool:
    """``a`` is lower than ``b`` by more than ``margin`` (False when either is NaN)."""
    return a < b - margin


def _floor(base: float, margin: float) -> str | None:
    """The sentence to say instead of ablation claims when the baseline accuracy cannot drop by more than
    ``margin`` (the model does not do the task), else ``None``."""
    if base > margin:
        return None
    return (f"Induction accuracy is {base:.3f} without any ablation, so ablations cannot show which heads "
            "induction needs.")


# ------------------------------------------------------------------ claim sentences
def subtitle(results: Results) -> str:
    """The line under the title: the model and the induction heads found (or that none was)."""
    m, ih = results["model"], results["induction_heads"]
    heads = (f"Induction heads found: <b>{_labels(ih['heads'])}</b>." if ih["heads"] else
             f"<b>No induction head found</b> (patching recovery threshold {ih['threshold']:g}).")  # fmt: skip
    family = m.get("family", "Gemma 2")  # results.json from before the family key: Gemma 2
    return (f"Model {_code(m['name'])}: {family}, {m['n_layers']} layers × {m['n_heads']} heads "
            f"({m['n_kv_heads']} KV), d_model {m['d_model']}, vocab {m['vocab_size']}, "
            f"{m['n_params']:,} parameters. {heads} "
            f"All numbers are in {_code('results.json')}.")  # fmt: skip


def induction_heads_sentence(ih: Results) -> str:
    """Which heads patching named, or that none was found and why (gap too small, or no head above threshold)."""
    thr = ih["threshold"]
    if ih["heads"]:
        named = ", ".join(f"{_label(h)} ({r:.2f})" for h, r in zip(ih["heads"], ih["recovery"], strict=True))
        return f"<b>Induction heads named by patching</b> (attn.z recovery ≥ {thr:g}): {named}."
    gap, min_gap = float(ih["gap"]), float(ih["min_gap"])
    if not gap > min_gap:
        return (f"<b>No induction head found</b> (threshold {thr:g}): the clean prompts' mean log-probability "
                f"beats the corrupt ones' by {gap:.3f} nats, not more than {min_gap:g}, so the model does not use "
                "the earlier copy here and no head is named.")  # fmt: skip
    return (f"<b>No induction head found</b> (threshold {thr:g}): no single head's patch recovers {thr:g} of the "
            f"{gap:.3f}-nat clean-corrupt gap; the largest recovery is {_label(ih['best_head'])} "
            f"({ih['best_recovery']:.2f}).")  # fmt: skip


def attribution_patching_sentence(ap: Results, ih: Results) -> str:
    """How well attribution patching matches the exact grids, and whether it picks the same heads."""
    r_z, r_res, r_layer = ap["pearson_attn_z"], ap["pearson_resid_pre"], ap["pearson_atp_layer_resid_pre"]
    s = ("Attribution patching (<code>attribution_patching_sites</code>: both grids from one forward and one "
         f"backward) estimates the same cells: Pearson r = {r_z:.3f} with the exact per-head grid, {r_res:.3f} with "
         "the exact resid_pre grid.")  # fmt: skip
    top = [tuple(h) for h in ap["top_heads"]]
    if ih["heads"]:
        same = set(top) == {tuple(h) for h in ih["heads"]}
        s += (f" Its top {len(top)} head(s) ({_labels(top)}) are "
              + ("the heads named by exact patching." if same else "not the heads named by exact patching."))
    else:
        s += f" Its top head is {_labels(top)}."
    if r_res < 0.8:
        s += (" The first-order estimate misses much of the exact resid_pre grid (r &lt; 0.8); "
              "<code>check_attribution</code> measures such gaps on a sample.")
    better = r_layer > r_res + 0.01
    s += (f" Running each patch exactly through its own layer and first order after "
          f"(<code>method=\"atp-layer\"</code>) gives r = {r_layer:.3f} on resid_pre, "
          + ("better than plain attribution patching." if better else "no better than plain attribution patching."))
    return s


def prefix_matching_sentence(gt: Results) -> str:
    """Whether the heads named by patching are the heads with the highest prefix-matching scores."""
    named = gt["named_heads"]
    pm = gt["prefix_matching"]
    if not named:
        top = gt["top_prefix_matching_heads"][0]
        return (f"No heads were named by patching; the highest prefix-matching score is {_label(top)}'s "
                f"({pm[top[0]][top[1]]:.2f}).")
    lowest = min(gt["prefix_matching_named"])
    other = gt["prefix_matching_others_argmax"]
    if other is None:
        return f"Every head was named by patching (lowest prefix-matching score {lowest:.2f})."
    best_other = gt["prefix_matching_others_max"]
    if lowest > best_other:
        return (f"Every named head scores higher on prefix matching (lowest {lowest:.2f}) than every other head "
                f"(highest: {_label(other)}, {best_other:.2f}): the ground truth picks the same heads as patching.")
    return (f"The named heads do not all score higher on prefix matching than the other heads: the lowest named "
            f"head scores {lowest:.2f}, {_label(other)} (not named) {best_other:.2f}.")


def head_ablation_sentence(gt: Results, margin: float = MARGIN) -> str:
    """Whether ablating the named heads hurts induction, compared to the baseline and to as many other heads."""
    base, acc = gt["accuracy_clean"], gt["accuracy_named_ablated"]
    named = gt["named_heads"]
    if not named:
        return f"No heads were named by patching, so none is ablated; induction accuracy is {base:.3f}."
    floor = _floor(base, margin)
    if floor is not None:
        return f"Zero-ablating the {len(named)} named head(s) gives induction accuracy {acc:.3f}. {floor}"
    k, controls = len(named), gt["accuracy_others_ablated"]
    c_mean, c_min = gt["accuracy_others_mean"], gt["accuracy_others_min"]
    hurts = _lower(acc, base, margin)
    verb = (f"drops induction accuracy from {base:.3f} to <b>{acc:.3f}</b>" if hurts else
            f"leaves induction accuracy at <b>{acc:.3f}</b> (baseline {base:.3f})")  # fmt: skip
    s = f"Zero-ablating the {k} named head(s) at attn.z {verb}"
    if not controls:
        s += f"; there is no set of {k} other heads to compare with."
        return s + ("" if hurts else " Ablating them does not hurt induction.")
    s += (f"; ablating {k} other head(s) gives {c_mean:.3f} on average over {len(controls)} set(s) "
          f"(lowest {c_min:.3f}).")
    if not hurts:
        return s + " Ablating the named heads does not hurt induction."
    if _lower(acc, c_min, margin):
        return s + " The named heads are needed for induction: no control set hurts nearly as much."
    if _lower(acc, c_mean, margin):
        return s + " The named heads hurt more than the average control set, but some control sets hurt as much."
    return s + " Other heads hurt as much: the drop is not specific to the named heads."


def previous_token_sentence(gt: Results, margin: float = MARGIN) -> str:
    """The strongest previous-token head and what ablating it alone does to induction accuracy."""
    head = gt["previous_token_head"]
    base = gt["accuracy_clean"]
    alone = gt["single_head_ablation"][head[0]][head[1]]
    s = f"The head attending most to the previous token is {_label(head)} (score {gt['previous_token_score']:.2f}). "
    if _floor(base, margin) is not None:
        return s + f"Ablating it alone gives induction accuracy {alone:.3f} (baseline {base:.3f})."
    if _lower(alone, base, margin):
        return s + f"Ablating it alone drops induction accuracy to {alone:.3f} (baseline {base:.3f})."
    return s + f"Ablating it alone does not hurt induction: accuracy {alone:.3f} (baseline {base:.3f})."


def single_head_sentence(gt: Results, margin: float = MARGIN) -> str:
    """Whether any single head is necessary (its ablation alone hurts induction)."""
    grid = gt["single_head_ablation"]
    base = gt["accuracy_clean"]
    worst_acc, worst = min((a, (layer, h)) for layer, row in enumerate(grid) for h, a in enumerate(row))
    floor = _floor(base, margin)
    if floor is not None:
        return floor
    if _lower(worst_acc, base, margin):
        hurt = [(layer, h) for layer, row in enumerate(grid) for h, a in enumerate(row) if _lower(a, base, margin)]
        return (f"Ablating a single head hurts induction for {len(hurt)} head(s) ({_labels(hurt)}); the worst is "
                f"{_label(worst)} ({worst_acc:.3f}, baseline {base:.3f}).")
    return (f"No single head is necessary: ablating any one head alone leaves induction accuracy at "
            f"{worst_acc:.3f} or more (baseline {base:.3f}).")


def attention_sentence(att: Results) -> str:
    """Each shown head's attention on the induction stripe and on the previous token, on the prompt shown."""
    off, L = att["offset"], att["half_len"]
    parts = [f"{_label(h)} ({role}): {pm:.2f} on the induction stripe, {prev:.2f} on the previous token"
             for h, role, pm, prev in zip(att["heads"], att["roles"], att["prefix_matching"], att["previous_token"],
                                          strict=True)]  # fmt: skip
    return (f"One clean prompt (first half: positions {off}..{off + L - 1}, repeat: {off + L}..{off + 2 * L - 1}). "
            "An induction head attends from each repeated token to the token after its first occurrence (a stripe "
            f"{L - 1} positions below the diagonal); a previous-token head attends one position back. Mean "
            "attention on this prompt: " + "; ".join(parts) + ".")


def _sae_files(sf: Results) -> str:
    """How the bundled SAEs are stored, by the registry's ``format`` (results.json before it: Gemma Scope)."""
    if sf.get("format") == "gemma_scope_2":
        return ("Gemma Scope 2 folders, <code>params.safetensors</code> + <code>config.json</code> whose hook points "
                "give the sites,")
    return "Gemma Scope <code>params.npz</code> files"


def sae_site_sentence(sf: Results) -> str:
    """Which SAE's features are studied, and where it reads relative to the induction heads."""
    layer, ind = sf["layer"], sf["induction_layer"]
    if ind is None:
        where = "the last residual SAE; no induction heads were named"
    elif layer == ind:
        where = f"the output of layer {ind}, where the induction heads are"
    elif layer > ind:
        where = f"the first residual SAE after the induction heads' layer {ind}"
    else:
        where = f"the latest residual SAE, before the induction heads' layer {ind}"
    return f"Features of {_code(sf['sae'])} ({html.escape(sf['site'])}, {where}) on {sf['prompts']} induction prompts."


def carrier_ablation_sentence(fe: Results, k: int, margin: float = MARGIN) -> str:
    """Whether ablating the top-``k`` carriers hurts induction more than as many random active features."""
    base = fe["clean"]["accuracy"]
    top, rnd = fe["ablation"][f"top{k}"]["accuracy"], fe["ablation"][f"random{k}"]["accuracy"]
    s = (f"Ablating the {k} top carrier(s) per position takes induction accuracy from {base:.3f} to <b>{top:.3f}</b>; "
         f"{k} random active feature(s) per position give {rnd:.3f}.")
    if not _lower(top, base, margin):
        return s + " Ablating the carriers does not hurt induction."
    if _lower(top, rnd, margin):
        return s + " The carriers matter more than random active features."
    return s + " Random active features hurt as much: the drop is not specific to the carriers."


def clamp_sentence(fe: Results, margin: float = MARGIN) -> str:
    """What clamping one feature does to the model's output on recall prompts."""
    c = fe["clamp"]
    tok = _code(c["promoted_token"])
    s = (f"<b>Clamp</b>: feature {c['feature']} (its decoder promotes {tok}) clamped to {c['value']:.2f} at the "
         f"answer position of {c['prompts']} recall prompts whose answer is another token: the model outputs {tok} "
         f"on {c['rate_after']:.0%} of them (before: {c['rate_before']:.0%}); recall accuracy "
         f"{c['recall_accuracy_before']:.3f} → {c['recall_accuracy_after']:.3f}.")
    if c["rate_after"] > c["rate_before"] + margin:
        return s + " Clamping the feature makes the model output the token its decoder promotes."
    return s + " The clamp does not make the model output that token."


def graph_sentence(ag: Results) -> str:
    """The attribution graph's prompt, prediction and strongest sources."""
    pred = "the answer" if ag["predicted"] == ag["answer"] else f"not the answer {_code(ag['answer'])}"
    srcs = ", ".join(f"{html.escape(s)} ({w:+.2f})" for s, w in ag["top_sources_of_top_logit"])
    return (f"Transcoder attribution graph (circuit-tracer method, <code>mishax_py.circuits</code>) of "
            f"{_code(' '.join(ag['prompt']))}; the model predicts {_code(ag['predicted'])} ({pred}). "
            f"{ag['n_features']} active transcoder features; completeness error {ag['completeness_error']:.2e}. "
            f"Strongest direct sources of the top logit: {srcs}.")


# ---------------------------------------------------------------------------- sections
def _skipped(title: str, anchor: str, reason: str) -> Section:
    return Section(title, [f'<span class="na">Skipped: {html.escape(reason)}.</span>'], anchor=anchor)


def _accuracy_section(r: Results) -> Section:
    acc = r["accuracy"]
    if acc.get("prompts") == "random":
        note = ("Random-token induction prompts <code>[bos] A A</code> with A drawn from the model's vocabulary; "
                "scored on the repeated half from its second token.")
    else:
        note = ("Fresh prompts (seeds never used in training). Induction: <code>&lt;bos&gt; s1..sL s1..sL</code>, "
                "scored on s2..sL of the repeat; recall: <code>&lt;bos&gt; k1 v1 .. kn vn ? ki</code> → vi.")
    note += f" Chance is {acc['chance']:.3f}."
    rows: list[list[Cell]] = [[x["task"], x["prompts"], x["scored"], x["accuracy"]] for x in acc["rows"]]
    return Section("Task accuracy", [note], [Table(["task", "prompts", "scored targets", "accuracy"], rows)],
                   anchor="accuracy")  # fmt: skip


def _best_positions(p: Results) -> str:
    grid = torch.tensor(p["resid_pre"]["normalized"], dtype=torch.float64)
    if not bool(torch.isfinite(grid).all()):
        grid = torch.tensor(p["resid_pre"]["values"], dtype=torch.float64)
    labels = p["resid_pre"]["pos_labels"]
    return ", ".join(f"layer {i}: {html.escape(labels[j])}" for i, j in enumerate(grid.argmax(-1).tolist()))


def _patching_section(r: Results) -> Section:
    p, ih = r["patching"], r["induction_heads"]
    return Section(
        "Activation patching: where induction happens",
        [
            f"{p['prompts']} clean prompts <code>&lt;bos&gt; A A</code> and corrupt ones <code>&lt;bos&gt; B A</code> "
            f"(A, B: {p['half_len']} distinct random tokens; the repeated half is identical, but only the clean prompt "
            "lets the model predict it). Metric: mean log-probability of the correct next token on the repeated half "
            f"— clean {p['clean_metric']:.3f}, corrupt {p['corrupt_metric']:.3f}. Each cell patches one clean "
            "activation into the corrupt run (denoising); colours show the fraction of the gap recovered.",
            f"Per layer, the position where patching resid_pre recovers most: {_best_positions(p)}."
            + ("" if ih["gap"] > ih["min_gap"] else " With a clean-corrupt gap this small, these positions are noise."),
            induction_heads_sentence(ih),
            attribution_patching_sentence(r["attribution_patching"], ih),
        ],
        figures=[("patching_resid_pre.png", "resid_pre patched per (layer, position): the exact grid, then the "
                  "attribution patching (AtP) and atp-layer estimates of it, on one colour scale"),
                 ("patching_attn_z.png", "attn.z patched per (layer, head): exact (left) and the AtP estimate (right); "
                  "outlined: the named induction heads")],
        anchor="patching",
    )  # fmt: skip


def _ground_truth_section(r: Results) -> Section:
    gt = r["ground_truth"]
    pm, prev, single = gt["prefix_matching"], gt["previous_token"], gt["single_head_ablation"]
    named = {tuple(h) for h in gt["named_heads"]}
    heads = [(layer, h) for layer in range(len(pm)) for h in range(len(pm[0]))]
    rows: list[list[Cell]] = [
        [_label(h), pm[h[0]][h[1]], prev[h[0]][h[1]], single[h[0]][h[1]], "yes" if h in named else ""]
        for h in sorted(heads, key=lambda h: -pm[h[0]][h[1]])
    ]
    return Section(
        "Ground truth: are these the induction heads?",
        [
            "Independent checks of the heads named by patching. <b>Prefix-matching score</b>: attention from the "
            "second occurrence of a token to the token right after its first occurrence (an induction head's "
            f"signature), averaged over the repeated half of {gt['prefix_matching_prompts']} fresh prompts. "
            "<b>Previous-token score</b>: attention to the immediately preceding token. Accuracies are measured on "
            f"{gt['eval_prompts']} fresh induction prompts ({gt['eval_scored']} scored tokens); changes of at most "
            f"{MARGIN:g} count as no change.",
            prefix_matching_sentence(gt),
            head_ablation_sentence(gt),
            previous_token_sentence(gt) + " " + single_head_sentence(gt),
        ],
        [Table(["head", "prefix-matching", "previous-token", "accuracy ablated alone", "named by patching"], rows)],
        [("prefix_matching.png", "prefix-matching score per head (outlined: named by patching)"),
         ("head_ablation.png", "induction accuracy with head sets zero-ablated (dashed: 50%)"),
         ("single_head_ablation.png", "induction accuracy with each head ablated alone")],
        anchor="ground-truth",
    )  # fmt: skip


def _attention_section(r: Results) -> Section:
    fig = ("attention_patterns.png", "attention maps; rows: query positions, columns: key positions")
    return Section("Attention patterns", [attention_sentence(r["attention"])], figures=[fig], anchor="attention")


def _context(c: Results) -> str:
    return f"{c['previous']} [{c['token']}] → {c['next'] or '∅'}"


def _sae_section(r: Results) -> Section:
    title, anchor = "SAE features on the task", "sae-features"
    sf = r["sae_features"]
    if not sf["available"]:
        return _skipped(title, anchor, sf["reason"])
    k = sf["top_k_carriers"]
    reg: list[list[Cell]] = [
        [e["name"], e["site"] + (" → " + e["output_site"] if e.get("kind") == "transcoder" else ""), e["d_sae"],
         e["l0"], e["fvu"], e["delta_lm_loss"]] for e in sf["bundled_saes"]
    ]  # fmt: skip
    rows: list[list[Cell]] = [[f["feature"], f"{f['top_carrier_count']} ({f['top_carrier_fraction']:.1%})",
                               f["freq_repeated"], f["freq_first_half"], f["mean_logit_attribution"],
                               f["max_activation"], "; ".join(_context(c) for c in f["top_contexts"][:4]),
                               " ".join(f["promoted_tokens"])] for f in sf["features"]]  # fmt: skip
    return Section(
        title,
        [
            f"Bundled JumpReLU SAEs and transcoders ({_sae_files(sf)} loaded with "
            "<code>saes.load</code>; numbers measured on held-out task prompts; Δ LM loss: increase of the "
            "cross-entropy on the tasks' scored tokens when the site is replaced by the reconstruction).",
            sae_site_sentence(sf) + " At every position of the repeated half, each feature's direct effect on the "
            "correct next token's logit (direct logit attribution: <code>f_i · W_dec[i] · (1 + w) ⊙ (W_U[next] − "
            f"mean W_U) / rms</code>, the final norm's gain folded in) ranks the features; the {k} largest are that "
            f"position's <b>carriers</b>. {sf['n_carrier_features']} features are a carrier somewhere; the table "
            f"lists the {len(sf['features'])} that are carriers most often, with their firing rates on the repeated "
            "and first half, their top-activating contexts and the tokens they promote.",
        ],
        [Table(["SAE", "site", "d_sae", "L0", "FVU", "Δ LM loss"], reg, "Bundled SAEs"),
         Table(["feature", "top carrier at", "fires on repeat", "fires on 1st half", "mean attribution (logits)",
                "max act.", "top-activating contexts: previous [token] → next", "promoted tokens"], rows,
               f"Task features of {sf['sae']}")],
        anchor=anchor,
    )  # fmt: skip


def _feature_edit_section(r: Results) -> Section:
    title, anchor = "Feature ablation and clamping", "feature-edits"
    fe = r["feature_edits"]
    if not fe["available"]:
        return _skipped(title, anchor, fe["reason"])
    ab = fe["ablation"]
    rows: list[list[Cell]] = [["none", "", fe["clean"]["accuracy"], fe["clean"]["mean_logprob"]],
                              ["SAE reconstruction only (no error term)", "", ab["reconstruction_only"]["accuracy"],
                               ab["reconstruction_only"]["mean_logprob"]]]  # fmt: skip
    for k in fe["ks"]:
        rows.append([f"ablate the top {k} carrier(s) per position", k, ab[f"top{k}"]["accuracy"],
                     ab[f"top{k}"]["mean_logprob"]])  # fmt: skip
        rows.append([f"ablate {k} random active feature(s) per position", k, ab[f"random{k}"]["accuracy"],
                     ab[f"random{k}"]["mean_logprob"]])  # fmt: skip
    return Section(
        title,
        [
            f"Edits go through <code>saes.Splice</code> at {html.escape(fe['site'])} with the error term kept, so only "
            f"the edit changes the run. At each position of the repeated half of {fe['prompts']} fresh induction "
            "prompts we ablate the features that carry the correct next token (largest direct logit attribution, see "
            "above) versus as many random features active at the same position. "
            + carrier_ablation_sentence(fe, max(fe["ks"])),
            clamp_sentence(fe),
        ],
        [Table(["edit", "features per position", "induction accuracy", "mean log-prob"], rows)],
        anchor=anchor,
    )  # fmt: skip


def _graph_section(r: Results, has_figure: bool, has_viewer: bool) -> Section:
    title, anchor = "Attribution graph", "attribution-graph"
    ag = r["attribution_graph"]
    if not ag["available"]:
        return _skipped(title, anchor, ag["reason"])
    paragraphs = [graph_sentence(ag)]
    if has_viewer:
        paragraphs.append('<a href="graph.html"><b>Open the interactive graph viewer</b></a> (one self-contained '
                          "file: hover a node for its layer, position, activation and top-activating contexts; click "
                          "it to trace its strongest paths; sliders tighten the pruning).")
    figs = [("attribution_graph.png", "pruned attribution graph (red: positive, blue: negative edges; "
             "width: |weight|)")]
    return Section(title, paragraphs, figures=figs if has_figure else [], anchor=anchor)


def _grids(r: Results) -> list[tuple[str, str, list[torch.Tensor], tuple[float, float] | None, float]]:
    """The report's heatmaps: ``(figure name, what it shows, grids, colour range, atol)`` (:func:`omitted_figures`)."""
    gt = r["ground_truth"]
    return [("patching_resid_pre.png", "Patching resid_pre (fraction of the gap recovered)",
            [g for _, g in _patching_panels(r, "resid_pre")], None, 1e-3),
           ("patching_attn_z.png", "Patching attn.z per head (fraction of the gap recovered)",
            [g for _, g in _patching_panels(r, "attn_z")], None, 1e-3),
           ("prefix_matching.png", "The prefix-matching score of every head", [torch.tensor(gt["prefix_matching"])],
            (0.0, 1.0), 0.0),
           ("single_head_ablation.png", "Induction accuracy with any one head ablated",
            [torch.tensor(gt["single_head_ablation"])], (0.0, 1.0), 0.0)]  # fmt: skip


def flat_grid_sentence(what: str, grids: list[torch.Tensor], vrange: tuple[float, float] | None = None,
                       atol: float = 0.0) -> str | None:
    """The sentence said instead of a heatmap whose cells would all be one colour (:func:`looks_constant` on the
    common colour scale of ``grids``), or ``None`` when the figure shows something."""
    values = torch.cat([g.double().flatten() for g in grids])
    scale = vrange
    if scale is None:
        m = float(values[torch.isfinite(values)].abs().max()) if bool(torch.isfinite(values).any()) else 1.0
        scale = (-m, m)
    if not all(looks_constant(g, scale, atol=atol) for g in grids):
        return None
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return f"{what}: no cell has a value, so there is no figure."
    lo, hi = float(finite.min()), float(finite.max())
    same = f"{lo:.3g}" == f"{hi:.3g}"
    cells = f"every cell is {lo:.3g}" if same else f"every cell lies between {lo:.3g} and {hi:.3g}"
    return f"{what}: {cells}, so the grid is not drawn (it would be a single colour)."


def omitted_figures(results: Results) -> dict[str, str]:
    """``{figure name: sentence}`` for the heatmaps that would be one colour: the report says the sentence instead."""
    out = {}
    for name, what, grids, vrange, atol in _grids(results):
        sentence = flat_grid_sentence(what, grids, vrange, atol)
        if sentence is not None:
            out[name] = sentence
    return out


def build_sections(results: Results, *, graph_figure: bool = True, graph_viewer: bool = False) -> list[Section]:
    """The report's sections, from the results alone (``graph_figure``: the graph's PNG is drawn;
    ``graph_viewer``: ``graph.html`` is written). A heatmap that would be one colour is replaced by
    a sentence (:func:`omitted_figures`)."""
    sections = [_accuracy_section(results), _patching_section(results), _ground_truth_section(results),
                _attention_section(results), _sae_section(results), _feature_edit_section(results),
                _graph_section(results, graph_figure, graph_viewer)]  # fmt: skip
    omitted = omitted_figures(results)
    for s in sections:
        s.paragraphs.extend(omitted[name] for name, _ in s.figures if name in omitted)
        s.figures = [(name, cap) for name, cap in s.figures if name not in omitted]
    return sections


# ------------------------------------------------------------------------------- output
def _patching_panels(r: Results, key: str) -> list[tuple[str, torch.Tensor]]:
    """The exact patching grid ``key`` (``"resid_pre"``/``"attn_z"``) and the attribution estimates of it, each as
    ``(panel title, fraction of the clean-corrupt gap recovered)``; estimates missing from the results are left out."""
    p, ap = r["patching"], r["attribution_patching"]
    gap = float(p["clean_metric"]) - float(p["corrupt_metric"])

    def recovered(values: Any) -> torch.Tensor:
        v = torch.tensor(values, dtype=torch.float64)
        return (v - float(p["corrupt_metric"])) / gap if gap != 0 else v * float("nan")

    panels = [("exact (activation patching)", torch.tensor(p[key]["normalized"], dtype=torch.float64))]
    estimates = {"resid_pre": [("resid_pre_values", "pearson_resid_pre", "AtP"),
                               ("atp_layer_resid_pre_values", "pearson_atp_layer_resid_pre", "atp-layer")],
                 "attn_z": [("attn_z_values", "pearson_attn_z", "AtP")]}[key]  # fmt: skip
    for values, pearson, name in estimates:
        if values in ap:
            panels.append((f"{name} estimate (Pearson r = {float(ap[pearson]):.2f})", recovered(ap[values])))
    return panels


def _feature_contexts(ag: Results) -> dict[str | tuple[int, int], list[str]]:
    """``{(layer, feature): ["previous [token] -> next (activation)", ...]}`` from the graph's results."""
    return {(int(e["layer"]), int(e["feature"])): [f"{_context(c)}  ({c['activation']:.2f})" for c in e["contexts"]]
            for e in ag.get("feature_contexts", [])}  # fmt: skip


def write_figures(out_dir: Path, results: Results, graph: dict[str, Any] | None = None) -> list[str]:
    """Draw the report's PNG figures into ``out_dir`` from the results (and the graph's JSON); returns their names.

    Heatmaps that would be one colour (:func:`omitted_figures`) are not drawn. With a graph, the
    interactive viewer ``graph.html`` is written too (not in the returned list).
    """
    p, ih, gt, att = results["patching"], results["induction_heads"], results["ground_truth"], results["attention"]
    n_layers, n_heads = results["model"]["n_layers"], results["model"]["n_heads"]
    layers, head_cols = [f"layer {i}" for i in range(n_layers)], [f"H{h}" for h in range(n_heads)]
    named = [(int(a), int(b)) for a, b in ih["heads"]]
    omitted = omitted_figures(results)
    names: list[str] = []

    def heatmap(name: str, panels: list[tuple[str, torch.Tensor]], **kwargs: Any) -> None:
        if name not in omitted:
            (first_title, first), rest = panels[0], panels[1:]
            heatmap_figure(first, out_dir / name, panel_title=first_title if rest else "",
                           panels=[(v, t) for t, v in rest], **kwargs)  # fmt: skip
            names.append(name)

    recovery = "fraction of the clean-corrupt gap recovered"
    heatmap("patching_resid_pre.png", _patching_panels(results, "resid_pre"),
            title="Patching resid_pre per (layer, position): exact, and the attribution estimates of it",
            row_labels=layers, col_labels=p["resid_pre"]["pos_labels"], xlabel="position (s' = repeat)",
            colorbar_label=recovery)  # fmt: skip
    heatmap("patching_attn_z.png", _patching_panels(results, "attn_z"),
            title="Patching attn.z per head (all positions): exact, and the AtP estimate", row_labels=layers,
            col_labels=head_cols, xlabel="head", annotate=True, colorbar_label=recovery, highlight=named)  # fmt: skip
    heatmap("prefix_matching.png", [("", torch.tensor(gt["prefix_matching"]))],
            title="Prefix-matching score (ground truth)", row_labels=layers, col_labels=head_cols, xlabel="head",
            cmap="Greens", vrange=(0.0, 1.0), annotate=True, highlight=named,
            colorbar_label="attention to the token after\nthe first occurrence")  # fmt: skip
    base = gt["accuracy_clean"]
    heatmap("single_head_ablation.png", [("", torch.tensor(gt["single_head_ablation"]))],
            title="Induction accuracy with one head zero-ablated", row_labels=layers, col_labels=head_cols,
            xlabel="head", cmap="viridis", vrange=(0.0, 1.0), annotate=True, highlight=named,
            colorbar_label=f"accuracy (clean {base:.2f})")  # fmt: skip
    k, sets = len(named), gt["other_sets"]
    groups = ["none"] + (["named: " + "+".join(_label(h) for h in named)] if named else [])
    groups += ["+".join(_label(h) for h in d) for d in sets]
    vals = [base] + ([gt["accuracy_named_ablated"]] if named else []) + list(gt["accuracy_others_ablated"])
    bar_figure(groups, {"induction accuracy": vals}, out_dir / "head_ablation.png",
               title=(f"Zero-ablating the {k} named head(s) vs {len(sets)} sets of {k} other head(s)" if named else
                      "No heads named: nothing ablated"), ylabel="accuracy", hline=0.5, ylim=(0, 1.05))  # fmt: skip
    names.append("head_ablation.png")
    roles = att["roles"]
    off, half = int(att["offset"]), int(att["half_len"])
    attention_figure([torch.tensor(x) for x in att["patterns"]],
                     [f"{_label(h)} ({role})" for h, role in zip(att["heads"], roles, strict=True)],
                     att["prompt_tokens"], out_dir / "attention_patterns.png",
                     suptitle="Attention patterns on a clean induction prompt (dashed: where the repeat starts)",
                     boundaries=[off + half])  # fmt: skip
    names.append("attention_patterns.png")
    ag = results["attribution_graph"]
    if graph is not None and ag.get("available"):
        from mishax_py.circuits import render_graph
        from mishax_py.circuits.viewer import graph_to_html

        title = f"Attribution graph: {' '.join(ag['prompt'])} → {ag['answer']}"
        render_graph(graph, out_dir / "attribution_graph.png", title=title)
        names.append("attribution_graph.png")
        graph_to_html(graph, out_dir / "graph.html", contexts=_feature_contexts(ag), title=title)
    return names


def write_report(out_dir: str | os.PathLike[str], results: Results, *, graph: dict[str, Any] | None = None) -> Path:
    """Write ``index.html``, its figures and (with a graph) the viewer ``graph.html`` into ``out_dir`` (created);
    returns the page's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(out, results, graph)
    has_graph = "attribution_graph.png" in figures  # drawn together with graph.html
    sections = build_sections(results, graph_figure=has_graph, graph_viewer=has_graph)
    path = out / "index.html"
    render_html(path, title="mishax-py demo report", subtitle=subtitle(results), sections=sections,
                footer="Generated by <code>mishax-py demo</code> (mishax_py.zoo.demo).")  # fmt: skip
    return path


def _json_safe(x: object) -> object:
    """``x`` with NaN/inf floats replaced by ``None`` and tuples by lists (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def write_results(out_dir: str | os.PathLike[str], results: Results) -> Path:
    """Write ``results.json`` (strict JSON: NaN and inf as ``null``); returns its path."""
    path = Path(out_dir) / "results.json"
    path.write_text(json.dumps(_json_safe(results), indent=2) + "\n", encoding="utf-8")
    return path


def summary(results: Results, out_dir: str | os.PathLike[str]) -> str:
    """The terminal summary: a text table of the headline numbers and the report's path."""
    acc, ih, gt = results["accuracy"], results["induction_heads"], results["ground_truth"]
    rows: list[list[Cell]] = [["induction accuracy", acc["induction"]]]
    if "recall" in acc:
        rows.append(["recall accuracy", acc["recall"]])
    rows.append(["induction heads (patching)", _labels(ih["heads"]) or f"none (threshold {ih['threshold']:g})"])
    if ih["heads"]:
        rows.append(["prefix-matching of those heads", ", ".join(f"{x:.2f}" for x in gt["prefix_matching_named"])])
        rows.append(["max prefix-matching, other heads", gt["prefix_matching_others_max"]])
        rows.append(["accuracy, named heads ablated", gt["accuracy_named_ablated"]])
        rows.append(["accuracy, other heads ablated (mean)", gt["accuracy_others_mean"]])
    fe = results.get("feature_edits", {})
    if fe.get("available"):
        k = max(fe["ks"])
        rows.append([f"accuracy, top-{k} SAE carriers ablated", fe["ablation"][f"top{k}"]["accuracy"]])
        rows.append([f"accuracy, {k} random SAE features ablated", fe["ablation"][f"random{k}"]["accuracy"]])
        c = fe["clamp"]
        rows.append([f"clamp feature {c['feature']} → {c['promoted_token']}",
                     f"{c['rate_before']:.0%} → {c['rate_after']:.0%}"])  # fmt: skip
    ag = results.get("attribution_graph", {})
    rows.append(["attribution graph", f"{ag['n_features']} features" if ag.get("available") else "not available"])
    if "timing" in results:
        rows.append(["wall time (s)", results["timing"]["total_seconds"]])
    return text_table(["result", "value"], rows) + f"\nreport: {(Path(out_dir) / 'index.html').resolve()}"
