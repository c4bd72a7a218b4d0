"""The demo report's sentences follow the numbers they are given (``mishax_py.zoo.report``).

Results dicts are written by hand here (a 2-layer, 2-head model), so each claim can be
checked against numbers that contradict the bundled model's: an ablation that does not hurt,
no induction head at all, a previous-token head whose ablation does hurt.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from mishax_py.zoo import report as R
from tests.helpers import synthetic_graph

pytestmark = pytest.mark.usefixtures("one_thread")


def results(**sections: dict[str, Any]) -> dict[str, Any]:
    """A complete results dict of a 2-layer x 2-head model where L1H0 and L1H1 were named; sections
    given as keywords are merged over the defaults."""
    r: dict[str, Any] = {
        "model": {"name": "toy", "bundled": True, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_model": 8,
                  "vocab_size": 20, "n_params": 1234},
        "accuracy": {"induction": 1.0, "chance": 0.05, "prompts": "random",
                     "rows": [{"task": "random-token induction (L=3)", "prompts": 4, "scored": 8, "accuracy": 1.0}]},
        "patching": {"prompts": 4, "half_len": 3, "clean_metric": -0.1, "corrupt_metric": -5.0,
                     "resid_pre": {"values": [[-5.0, -1.0, -4.0, -5.0, -5.0, -5.0, -5.0]] * 2,
                                   "normalized": [[0.0, 0.8, 0.2, 0.0, 0.0, 0.0, 0.0]] * 2,
                                   "pos_labels": ["<bos>", "s1", "s2", "s3", "s1'", "s2'", "s3'"]},
                     "attn_z": {"values": [[-5.0, -5.0], [-2.0, -3.0]], "normalized": [[0.0, 0.0], [0.6, 0.4]]}},
        "induction_heads": {"heads": [[1, 0], [1, 1]], "labels": ["L1H0", "L1H1"], "threshold": 0.2,
                            "recovery": [0.6, 0.4], "gap": 4.9, "min_gap": 0.25, "best_head": [1, 0],
                            "best_recovery": 0.6},
        "attribution_patching": {"pearson_attn_z": 0.99, "pearson_resid_pre": 0.9, "pearson_atp_layer_resid_pre": 0.95,
                                 "top_heads": [[1, 0], [1, 1]]},
        "ground_truth": {
            "prefix_matching": [[0.0, 0.01], [0.9, 0.8]], "previous_token": [[0.9, 0.7], [0.1, 0.1]],
            "prefix_matching_prompts": 4, "prefix_matching_named": [0.9, 0.8], "prefix_matching_others_max": 0.01,
            "prefix_matching_others_argmax": [0, 1], "top_prefix_matching_heads": [[1, 0], [1, 1]],
            "previous_token_head": [0, 0], "previous_token_score": 0.9, "named_heads": [[1, 0], [1, 1]],
            "accuracy_clean": 1.0, "accuracy_named_ablated": 0.0, "other_sets": [[[0, 0], [0, 1]]],
            "accuracy_others_ablated": [0.97], "accuracy_others_mean": 0.97, "accuracy_others_min": 0.97,
            "single_head_ablation": [[1.0, 1.0], [1.0, 1.0]], "eval_prompts": 8, "eval_scored": 16,
        },
        "attention": {"prompt_tokens": ["<bos>", "a", "b", "c", "a", "b", "c"], "half_len": 3, "offset": 1,
                      "heads": [[1, 0], [0, 0]], "roles": ["induction", "previous token"],
                      "patterns": [[[1.0 if k == max(q - 2, 0) else 0.0 for k in range(7)] for q in range(7)]] * 2,
                      "prefix_matching": [0.9, 0.0], "previous_token": [0.1, 0.9]},
        "sae_features": {"available": False, "reason": "no bundled SAEs for this model"},
        "feature_edits": {"available": False, "reason": "no bundled SAEs for this model"},
        "attribution_graph": {"available": False, "reason": "no bundled transcoders for this model"},
    }  # fmt: skip
    for key, value in sections.items():
        r[key] = {**r[key], **value}
    return r


def no_heads(gap: float = 0.01) -> dict[str, Any]:
    """Results where patching named no induction head (and so nothing was ablated)."""
    return results(
        induction_heads={"heads": [], "labels": [], "recovery": [], "gap": gap, "best_head": [0, 1],
                         "best_recovery": 0.12},
        attribution_patching={"top_heads": [[0, 1]]},
        ground_truth={"named_heads": [], "prefix_matching_named": [], "prefix_matching_others_max": 0.9,
                      "prefix_matching_others_argmax": [1, 0], "top_prefix_matching_heads": [[1, 0]],
                      "accuracy_named_ablated": 1.0, "other_sets": [], "accuracy_others_ablated": [],
                      "accuracy_others_mean": float("nan"), "accuracy_others_min": float("nan")},
    )  # fmt: skip


def text_of(path: Path) -> str:
    """The page's visible text (tags removed, entities kept escaped)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", path.read_text()))


# ------------------------------------------------------------------------- head ablations
def test_ablation_that_does_not_hurt_is_not_said_to_hurt(tmp_path: Path) -> None:
    r = results(ground_truth={"accuracy_named_ablated": 1.0, "accuracy_others_ablated": [1.0],
                              "accuracy_others_mean": 1.0, "accuracy_others_min": 1.0})  # fmt: skip
    s = R.head_ablation_sentence(r["ground_truth"])
    assert "does not hurt induction" in s and "drops" not in s and "needed" not in s
    prev = R.previous_token_sentence(r["ground_truth"])  # L0H0 ablated alone: accuracy 1.0, as the baseline
    assert "does not hurt induction" in prev and "drops" not in prev
    page = text_of(R.write_report(tmp_path, r))
    assert "also hurts" not in page and "drops induction accuracy" not in page
    assert "No single head is necessary" in page


def test_small_drops_within_the_margin_are_no_change() -> None:
    gt = results(ground_truth={"accuracy_named_ablated": 1.0 - R.MARGIN / 2})["ground_truth"]
    assert "does not hurt" in R.head_ablation_sentence(gt)
    gt = results(ground_truth={"accuracy_named_ablated": 1.0 - 2 * R.MARGIN})["ground_truth"]
    assert "drops induction accuracy from 1.000 to" in R.head_ablation_sentence(gt)


def test_a_drop_is_called_specific_only_when_the_controls_do_not_drop_as_much() -> None:
    needed = results()["ground_truth"]  # 0.0 ablated vs controls at 0.97
    s = R.head_ablation_sentence(needed)
    assert "drops induction accuracy from 1.000 to <b>0.000</b>" in s and "needed for induction" in s
    same = results(ground_truth={"accuracy_named_ablated": 0.3, "accuracy_others_ablated": [0.3, 0.25],
                                 "accuracy_others_mean": 0.275, "accuracy_others_min": 0.25})["ground_truth"]
    s = R.head_ablation_sentence(same)
    assert "not specific to the named heads" in s and "needed" not in s
    some = results(ground_truth={"accuracy_named_ablated": 0.3, "accuracy_others_ablated": [0.9, 0.3],
                                 "accuracy_others_mean": 0.6, "accuracy_others_min": 0.3})["ground_truth"]  # fmt: skip
    s = R.head_ablation_sentence(some)
    assert "some control sets hurt as much" in s and "needed" not in s
    alone = results(ground_truth={"accuracy_others_ablated": [], "accuracy_others_mean": float("nan"),
                                  "accuracy_others_min": float("nan")})["ground_truth"]  # fmt: skip
    assert "no set of 2 other heads" in R.head_ablation_sentence(alone)


def test_previous_token_head_whose_ablation_hurts_is_said_to() -> None:
    gt = results(ground_truth={"single_head_ablation": [[0.4, 1.0], [1.0, 1.0]]})["ground_truth"]
    s = R.previous_token_sentence(gt)
    assert "L0H0 (score 0.90)" in s and "drops induction accuracy to 0.400 (baseline 1.000)" in s
    one = R.single_head_sentence(gt)
    assert "1 head(s) (L0H0)" in one and "No single head" not in one


# -------------------------------------------------------------------------- no heads found
def test_no_induction_head_found_is_said_instead_of_an_empty_name(tmp_path: Path) -> None:
    r = no_heads(gap=0.01)
    sub = R.subtitle(r)
    assert "<b>No induction head found</b> (patching recovery threshold 0.2)" in sub and "<b></b>" not in sub
    s = R.induction_heads_sentence(r["induction_heads"])
    assert "No induction head found</b> (threshold 0.2)" in s and "0.010 nats" in s and "Induction heads named" not in s
    assert "none is ablated" in R.head_ablation_sentence(r["ground_truth"])
    assert "highest prefix-matching score is L1H0's (0.90)" in R.prefix_matching_sentence(r["ground_truth"])
    page = R.write_report(tmp_path, r)
    html = page.read_text()
    assert "Induction heads found: <b></b>" not in html and "No induction head found" in html
    assert (tmp_path / "head_ablation.png").is_file()
    assert "none (threshold 0.2)" in R.summary(r, tmp_path)


def test_no_head_above_threshold_names_the_best_one() -> None:
    s = R.induction_heads_sentence(no_heads(gap=3.0)["induction_heads"])
    assert "No induction head found</b> (threshold 0.2)" in s and "L0H1 (0.12)" in s and "3.000-nat" in s


def test_named_heads_are_listed_with_their_recovery() -> None:
    s = R.induction_heads_sentence(results()["induction_heads"])
    assert s.endswith("L1H0 (0.60), L1H1 (0.40).") and "No induction head" not in s
    assert "Induction heads found: <b>L1H0, L1H1</b>" in R.subtitle(results())


def test_subtitle_names_the_models_family() -> None:
    r = results()
    assert ": Gemma 2, 2 layers" in R.subtitle(r)  # results.json written before the family key
    r["model"]["family"] = "Gemma 3"
    assert ": Gemma 3, 2 layers" in R.subtitle(r) and "Gemma 2" not in R.subtitle(r)


# ------------------------------------------------------------------------- other claims
def test_prefix_matching_agreement_follows_the_scores() -> None:
    assert "picks the same heads as patching" in R.prefix_matching_sentence(results()["ground_truth"])
    gt = results(ground_truth={"prefix_matching_named": [0.9, 0.005]})["ground_truth"]
    s = R.prefix_matching_sentence(gt)
    assert "do not all score higher" in s and "L0H1 (not named) 0.01" in s


def test_attribution_patching_sentence_follows_the_correlations() -> None:
    ih = results()["induction_heads"]
    good = R.attribution_patching_sentence(results()["attribution_patching"], ih)
    assert "are the heads named by exact patching" in good and "better than plain" in good and "misses" not in good
    ap = results(attribution_patching={"pearson_resid_pre": 0.5, "pearson_atp_layer_resid_pre": 0.49,
                                       "top_heads": [[0, 0], [1, 1]]})["attribution_patching"]  # fmt: skip
    bad = R.attribution_patching_sentence(ap, ih)
    assert "not the heads named" in bad and "no better than plain" in bad and "(r &lt; 0.8)" in bad


def test_sae_and_edit_sentences_follow_the_numbers() -> None:
    sf = {"sae": "res-L1", "site": "blocks.1.resid_post", "layer": 1, "induction_layer": 1, "prompts": 9}
    assert "where the induction heads are" in R.sae_site_sentence(sf)
    assert "before the induction heads' layer 2" in R.sae_site_sentence({**sf, "induction_layer": 2})
    assert "no induction heads were named" in R.sae_site_sentence({**sf, "induction_layer": None})
    fe = {"clean": {"accuracy": 1.0}, "ablation": {"top5": {"accuracy": 0.4}, "random5": {"accuracy": 1.0}},
          "clamp": {"feature": 3, "promoted_token": "<v>", "value": 2.0, "prompts": 10, "rate_before": 0.0,
                    "rate_after": 0.6, "recall_accuracy_before": 1.0, "recall_accuracy_after": 0.3}}  # fmt: skip
    assert "matter more than random" in R.carrier_ablation_sentence(fe, 5)
    same = copy.deepcopy(fe)
    same["ablation"]["random5"]["accuracy"] = 0.42
    assert "not specific to the carriers" in R.carrier_ablation_sentence(same, 5)
    same["ablation"]["top5"]["accuracy"] = 0.99
    assert "does not hurt induction" in R.carrier_ablation_sentence(same, 5)
    assert "makes the model output" in R.clamp_sentence(fe) and "&lt;v&gt;" in R.clamp_sentence(fe)
    fe["clamp"]["rate_after"] = 0.02
    assert "does not make the model output" in R.clamp_sentence(fe)


def test_graph_sentence_escapes_tokens_and_says_whether_the_prediction_is_right() -> None:
    ag = {"prompt": ["<bos>", "a", "b", "a"], "predicted": "b", "answer": "b", "n_features": 3,
          "completeness_error": 1e-6, "top_sources_of_top_logit": [["embedding b@2", 1.5]]}  # fmt: skip
    s = R.graph_sentence(ag)
    assert "&lt;bos&gt; a b a" in s and "<bos>" not in s and "(the answer)" in s
    assert "not the answer <code>c</code>" in R.graph_sentence({**ag, "answer": "c"})


def test_attention_sentence_reports_each_heads_measured_attention() -> None:
    s = R.attention_sentence(results()["attention"])
    assert "positions 1..3, repeat: 4..6" in s and "2 positions below the diagonal" in s
    assert "L1H0 (induction): 0.90 on the induction stripe, 0.10 on the previous token" in s


def test_no_ablation_claims_when_the_model_does_not_do_the_task() -> None:
    """At a baseline accuracy of 0.01 no ablation can drop it by the margin: saying 'no single head is
    necessary' or 'does not hurt' would be vacuous, so the report says ablations cannot tell."""
    gt = results(ground_truth={"accuracy_clean": 0.01, "accuracy_named_ablated": 0.0, "accuracy_others_ablated": [0.02],
                               "accuracy_others_mean": 0.02, "accuracy_others_min": 0.02,
                               "single_head_ablation": [[0.0, 0.01], [0.02, 0.01]]})["ground_truth"]  # fmt: skip
    for s in (R.head_ablation_sentence(gt), R.single_head_sentence(gt)):
        assert "cannot show which heads" in s and "necessary" not in s and "hurt" not in s and "needed" not in s
    prev = R.previous_token_sentence(gt)
    assert "hurt" not in prev and "drops" not in prev and "accuracy 0.000 (baseline 0.010)" in prev


# ---------------------------------------------------------------------------------- figures
def test_a_grid_of_one_colour_is_said_not_drawn(tmp_path: Path) -> None:
    """Every head ablated alone leaves accuracy at 1.0 (the bundled model: 0.9994..1): no single-colour heatmap,
    a sentence giving the range instead; a grid whose colours differ is still drawn."""
    r = results(ground_truth={"single_head_ablation": [[1.0, 0.9994], [0.9994, 1.0]]})
    assert R.flat_grid_sentence("x", [torch.tensor(r["ground_truth"]["single_head_ablation"])], (0.0, 1.0)) == (
        "x: every cell lies between 0.999 and 1, so the grid is not drawn (it would be a single colour).")
    assert set(R.omitted_figures(r)) == {"single_head_ablation.png"}
    page = R.write_report(tmp_path, r)
    html = page.read_text()
    assert not (tmp_path / "single_head_ablation.png").exists() and "single_head_ablation.png" not in html
    assert "Induction accuracy with any one head ablated: every cell lies between 0.999 and 1" in text_of(page)
    assert (tmp_path / "prefix_matching.png").is_file() and 'src="prefix_matching.png"' in html
    (tmp_path / "other").mkdir()
    drawn = R.write_figures(tmp_path / "other", results(ground_truth={"single_head_ablation": [[0.4, 1.0],
                                                                                             [1.0, 1.0]]}))
    assert "single_head_ablation.png" in drawn


def test_patching_grids_are_drawn_with_their_estimates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attribution estimates are drawn next to the exact grids, as fractions of the same gap."""
    calls: dict[str, dict[str, Any]] = {}

    def spy(values: Any, path: Path, **kwargs: Any) -> str:
        calls[Path(path).name] = {"values": values, **kwargs}
        return str(path)

    monkeypatch.setattr(R, "heatmap_figure", spy)
    est = {"resid_pre_values": [[-5.0, -0.1, -4.0, -5.0, -5.0, -5.0, -5.0]] * 2,
           "atp_layer_resid_pre_values": [[-5.0, -1.0, -4.0, -5.0, -5.0, -5.0, -5.0]] * 2,
           "attn_z_values": [[-5.0, -5.0], [-2.55, -3.0]]}  # fmt: skip
    R.write_figures(tmp_path, results(attribution_patching=est))
    resid, heads = calls["patching_resid_pre.png"], calls["patching_attn_z.png"]
    assert resid["panel_title"] == "exact (activation patching)"
    assert [t for _, t in resid["panels"]] == ["AtP estimate (Pearson r = 0.90)",
                                               "atp-layer estimate (Pearson r = 0.95)"]
    # (estimate - corrupt) / (clean - corrupt): -0.1 -> 1.0, -2.55 -> 0.5
    assert float(resid["panels"][0][0][0, 1]) == pytest.approx(1.0)
    assert float(heads["panels"][0][0][1, 0]) == pytest.approx(0.5)
    assert [t for _, t in heads["panels"]] == ["AtP estimate (Pearson r = 0.99)"]
    calls.clear()
    R.write_figures(tmp_path, results())  # no estimates in the results: the exact grid alone
    assert calls["patching_resid_pre.png"]["panels"] == []


def test_the_report_writes_and_links_the_graph_viewer(tmp_path: Path) -> None:
    graph = synthetic_graph(seed=1).to_json()
    feat = next(n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, index = (int(x) for x in feat["node_id"].split("_")[:2])
    ctx = {"activation": 2.5, "source": "induction", "token": "k7", "previous": "v3", "next": "v9"}
    ag = {"available": True, "prompt": ["<bos>", "a"], "answer": "b", "predicted": "b", "n_features": 3,
          "completeness_error": 1e-6, "top_sources_of_top_logit": [["embedding b@2", 1.5]],
          "feature_contexts": [{"layer": layer, "feature": index, "contexts": [ctx]}]}  # fmt: skip
    page = R.write_report(tmp_path, results(attribution_graph=ag), graph=graph)
    assert 'href="graph.html"' in page.read_text() and (tmp_path / "attribution_graph.png").is_file()
    viewer = (tmp_path / "graph.html").read_text()
    assert "v3 [k7] \\u2192 v9  (2.50)" in viewer or "v3 [k7] → v9  (2.50)" in viewer
    no_graph = R.write_report(tmp_path / "none", results())
    assert "graph.html" not in no_graph.read_text() and not (tmp_path / "none" / "graph.html").exists()
