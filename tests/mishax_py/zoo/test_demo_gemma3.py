"""``mishax-py demo --model gemma3-tiny``: the same report as gemma2-tiny's, its induction heads against
independent ground truth, and the demo on a Gemma 3 checkpoint folder.

The demo runs once per module (through the CLI's ``main``, into a temporary folder) on the bundled
``gemma3-tiny`` with its Gemma Scope 2 SAEs and transcoders. The ground truth is computed here without
mishax-py: prefix-matching scores from transformers' own attention maps (``output_attentions=True``) on
fresh prompts whose earlier copy lies beyond the sliding window, and induction accuracy with heads
zeroed by a plain PyTorch pre-hook on ``o_proj`` (its input is the heads' outputs side by side).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mishax_py.zoo import report, tasks
from mishax_py.zoo.models import model_path
from mishax_py.zoo.saes import has_saes

FIGURES = ["patching_resid_pre.png", "patching_attn_z.png", "prefix_matching.png", "head_ablation.png",
           "single_head_ablation.png", "attention_patterns.png", "attribution_graph.png"]  # fmt: skip
HALF = 20  # induction prompts <bos> s1..s20 s1..s20: the earlier copy is beyond the window of 8

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops, the demo included: see conftest.one_thread
needs_gemma3_tiny = pytest.mark.skipif(
    not (model_path("gemma3-tiny") / "model.safetensors").is_file() or not has_saes("gemma3-tiny"),
    reason="bundled gemma3-tiny weights or its SAEs are not in this build",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Run ``mishax-py demo --model gemma3-tiny`` once; (report folder, results.json)."""
    from mishax_py.cli import main

    out = tmp_path_factory.mktemp("demo_gemma3")
    assert main(["demo", "--model", "gemma3-tiny", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def hf_model():
    """The bundled gemma3-tiny as a plain transformers model (not instrumented)."""
    from mishax_py.zoo import load

    return load("gemma3-tiny")[0]


# ----------------------------------------------------------------------------- report content
@needs_gemma3_tiny
def test_the_report_has_every_section_with_numbers(demo: tuple[Path, dict]) -> None:
    out, r = demo
    m = r["model"]
    assert (m["name"], m["family"], m["bundled"], m["n_layers"]) == ("gemma3-tiny", "Gemma 3", True, 6)
    assert r["accuracy"]["induction"] > 0.95 and r["accuracy"]["recall"] > 0.95
    p = r["patching"]
    assert p["clean_metric"] > p["corrupt_metric"] + 1.0
    heads = [tuple(h) for h in r["induction_heads"]["heads"]]
    assert heads and r["induction_heads"]["labels"] == [f"L{lay}H{h}" for lay, h in heads]
    gt = r["ground_truth"]
    assert gt["accuracy_named_ablated"] < 0.5 <= gt["accuracy_others_mean"]

    sf = r["sae_features"]  # the residual SAE after the induction heads, a Gemma Scope 2 folder
    assert sf["available"] and sf["features"], sf.get("reason")
    assert sf["site"] == f"blocks.{max(lay for lay, _ in heads)}.resid_post"
    assert sf["registry"]["path"].startswith("resid_post/layer_")
    for f in sf["features"]:
        assert f["top_contexts"] and len(f["promoted_tokens"]) == 3 and f["top_carrier_count"] > 0
    assert {e["kind"] for e in sf["bundled_saes"]} == {"sae", "transcoder"}

    fe = r["feature_edits"]
    assert fe["available"]
    k = sf["top_k_carriers"]
    ab = fe["ablation"]
    assert ab["reconstruction_only"]["accuracy"] > 0.95  # the SAE alone keeps induction working
    # ablating the features that carry the answer breaks induction; as many random active ones do not
    assert ab[f"top{k}"]["accuracy"] < 0.8 and ab[f"random{k}"]["accuracy"] > 0.95
    assert ab[f"top{k}"]["mean_logprob"] < ab[f"random{k}"]["mean_logprob"] - 0.5
    assert fe["clamp"]["rate_after"] > fe["clamp"]["rate_before"] + 0.3

    ag = r["attribution_graph"]  # transcoders ln2 -> mlp_out on every layer (Gemma Scope 2's reading point)
    assert ag["available"], ag.get("reason")
    assert ag["transcoder_layers"] == list(range(6)) and ag["n_features"] > 0
    assert ag["completeness_error"] <= 1e-4
    assert ag["top_sources_of_top_logit"] and ag["feature_contexts"]

    html = (out / "index.html").read_text()
    for name in FIGURES:
        if name in report.omitted_figures(r):
            assert not (out / name).exists()
        else:
            assert (out / name).is_file() and f'src="{name}"' in html, name
    assert f"Induction heads found: <b>{', '.join(r['induction_heads']['labels'])}</b>" in html
    assert 'href="graph.html"' in html and (out / "graph.html").is_file()
    assert "not available" not in html
    assert r["timing"]["total_seconds"] > 0


@needs_gemma3_tiny
def test_same_sections_as_the_gemma2_report(demo: tuple[Path, dict]) -> None:
    """Every section of results.json that gemma2-tiny's report has, with the same keys (no section empty)."""
    _, r = demo
    for section, keys in {
        "sae_features": ("sae", "site", "layer", "d_sae", "features", "l0_on_prompts", "bundled_saes"),
        "feature_edits": ("clean", "ablation", "clamp", "ks"),
        "attribution_graph": ("prompt", "answer", "predicted", "n_features", "completeness_error", "logit_tokens"),
        "ground_truth": ("prefix_matching", "previous_token", "single_head_ablation", "accuracy_others_ablated"),
        "attribution_patching": ("pearson_attn_z", "pearson_resid_pre", "pearson_atp_layer_resid_pre"),
    }.items():
        assert all(key in r[section] for key in keys), (section, sorted(r[section]))


# ------------------------------------------------------------------------------ ground truth
def hf_prefix_matching(model, n: int = 32, seed: int = 31_337) -> torch.Tensor:
    """``[n_layers, n_heads]``: attention (transformers' own maps) from the 2nd occurrence of s_j to s_{j+1}'s first."""
    ids = tasks.induction_batch(n, seq_len=HALF, seed=seed).input_ids
    with torch.no_grad():
        attn = model(input_ids=ids, output_attentions=True).attentions
    q = torch.arange(HALF + 1, 2 * HALF)  # s_j's second copy sits at HALF + j; s_{j+1}'s first at j + 1
    return torch.stack([a[:, :, q, q - HALF + 1].mean((0, 2)) for a in attn])


def hf_accuracy_with_heads_ablated(model, heads: list[tuple[int, int]], n: int = 128, seed: int = 27_182) -> float:
    """Induction accuracy on fresh prompts (earlier copy beyond the window) with ``heads`` zeroed at the input of
    ``o_proj`` by plain PyTorch pre-hooks."""
    d_head = int(model.config.head_dim)
    handles = []
    for layer in sorted({lay for lay, _ in heads}):
        hs = [h for lay, h in heads if lay == layer]

        def zero(_module: torch.nn.Module, args: tuple, hs: list[int] = hs) -> tuple:
            z = args[0].clone()
            for h in hs:
                z[..., h * d_head:(h + 1) * d_head] = 0
            return (z, *args[1:])

        handles.append(model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(zero))
    try:
        b = tasks.induction_batch(n, seq_len=HALF, seed=seed)
        with torch.no_grad():
            logits = model(input_ids=b.input_ids).logits
    finally:
        for h in handles:
            h.remove()
    hits = (logits.argmax(-1) == b.targets) & b.target_mask
    return float(hits.sum() / b.target_mask.sum())


@needs_gemma3_tiny
def test_named_induction_heads_match_ground_truth(demo: tuple[Path, dict], hf_model) -> None:
    """The heads the demo names are exactly the heads with a high prefix-matching score in transformers' own
    attention maps; zeroing them breaks induction beyond the window (< 50%), zeroing as many others does not."""
    _, r = demo
    named = sorted(tuple(h) for h in r["induction_heads"]["heads"])
    pm = hf_prefix_matching(hf_model)
    n_layers, n_heads = pm.shape
    all_heads = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    high = sorted(h for h in all_heads if float(pm[h]) > 0.3)
    assert named == high, f"named {named}, prefix-matching scores {pm.tolist()}"
    others = [h for h in all_heads if h not in named]
    assert max(float(pm[h]) for h in others) < min(float(pm[h]) for h in named)

    assert hf_accuracy_with_heads_ablated(hf_model, []) > 0.95
    assert hf_accuracy_with_heads_ablated(hf_model, named) < 0.5
    g = torch.Generator().manual_seed(5)
    other_accs = [hf_accuracy_with_heads_ablated(
        hf_model, [others[i] for i in torch.randperm(len(others), generator=g)[: len(named)].tolist()])
        for _ in range(6)]  # fmt: skip
    assert sum(other_accs) / len(other_accs) >= 0.5, other_accs


# ----------------------------------------------------------------------- any Gemma 3 checkpoint
def test_demo_on_a_gemma3_checkpoint_folder(tmp_path: Path) -> None:
    """``mishax-py demo --model DIR`` on a random Gemma 3 folder: loaded and instrumented as Gemma 3 (by its
    model_type), random-token induction prompts, the SAE sections skipped."""
    from mishax_py.cli import main
    from tests.helpers import make_gemma3

    ckpt = tmp_path / "ckpt"
    make_gemma3(seed=1, n_layers=2).save_pretrained(ckpt)
    out = tmp_path / "report"
    assert main(["demo", "--out", str(out), "--model", str(ckpt), "--no-progress"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["model"]["family"] == "Gemma 3" and not r["model"]["bundled"] and r["model"]["n_layers"] == 2
    assert not r["sae_features"]["available"] and not r["attribution_graph"]["available"]
    assert len(r["ground_truth"]["prefix_matching"]) == 2
    assert (out / "index.html").is_file()
