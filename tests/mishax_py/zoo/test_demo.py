"""``mishax-py demo``: the report's content, its induction heads against independent ground truth,
and its rendering in headless Chromium.

The demo runs once per module (into a temporary folder) on the bundled ``gemma2-tiny``.
The ground truth is computed here without the demo's code: each head's prefix-matching
score read from the cached attention maps of fresh prompts, and induction accuracy with
heads zero-ablated through a plain ``Hook`` on ``attn.z``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mishax_py.zoo import report, tasks
from tests.helpers import BUNDLED, chromium, needs_model, run_chromium

FIGURES = ["patching_resid_pre.png", "patching_attn_z.png", "prefix_matching.png", "head_ablation.png",
           "single_head_ablation.png", "attention_patterns.png"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops, the demo included: see conftest.one_thread


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Run the demo once on the bundled model; (report folder, results.json)."""
    if not BUNDLED:
        pytest.skip("bundled gemma2-tiny weights are not in this build")
    from mishax_py.zoo.demo import run_demo

    out = tmp_path_factory.mktemp("demo_report")
    run_demo(out=out, progress=False, quiet=True)
    return out, json.loads((out / "results.json").read_text())


# ----------------------------------------------------------------------------- report content
@needs_model
def test_results_json_holds_every_section(demo: tuple[Path, dict]) -> None:
    out, r = demo
    assert r["model"]["name"] == "gemma2-tiny" and r["model"]["bundled"]
    assert r["accuracy"]["induction"] > 0.9 and r["accuracy"]["recall"] > 0.9
    n_layers, n_heads = r["model"]["n_layers"], r["model"]["n_heads"]
    p = r["patching"]
    assert p["clean_metric"] > p["corrupt_metric"] + 1.0  # the model does induction
    assert len(p["resid_pre"]["values"]) == n_layers and len(p["resid_pre"]["values"][0]) == len(
        p["resid_pre"]["pos_labels"])
    assert [len(row) for row in p["attn_z"]["normalized"]] == [n_heads] * n_layers
    heads = r["induction_heads"]["heads"]
    assert heads and all(0 <= lay < n_layers and 0 <= h < n_heads for lay, h in heads)
    at = r["attribution_patching"]  # the estimates, and their Pearson r with the exact grids written out
    for key, exact in (("attn_z", p["attn_z"]["values"]), ("resid_pre", p["resid_pre"]["values"]),
                       ("atp_layer_resid_pre", p["resid_pre"]["values"])):
        est = torch.tensor(at[f"{key}_values"]).flatten().double()
        est = est - est.mean()
        ex = torch.tensor(exact).flatten().double()
        ex = ex - ex.mean()
        r_want = float((est * ex).sum() / (est.norm() * ex.norm()))
        assert at[f"pearson_{key}"] == pytest.approx(r_want, abs=1e-6)
    assert at["pearson_attn_z"] > 0.9 and {tuple(h) for h in at["top_heads"]} == {tuple(h) for h in heads}
    assert at["pearson_atp_layer_resid_pre"] > max(0.8, at["pearson_resid_pre"])  # the layer-exact estimate helps
    assert r["induction_heads"]["labels"] == [f"L{lay}H{h}" for lay, h in heads]
    gt = r["ground_truth"]
    assert gt["accuracy_named_ablated"] < 0.5 <= gt["accuracy_others_mean"]
    sf = r["sae_features"]
    assert sf["available"] and sf["features"], "SAE features section"
    assert sf["site"] == f"blocks.{max(lay for lay, _ in heads)}.resid_post"  # right after the induction heads
    for f in sf["features"]:
        assert f["top_contexts"] and len(f["promoted_tokens"]) == 3 and f["top_carrier_count"] > 0
    fe = r["feature_edits"]
    assert fe["available"]
    k = sf["top_k_carriers"]
    ab = fe["ablation"]
    # ablating the features that carry the answer breaks induction; as many random active ones do not
    assert ab[f"top{k}"]["accuracy"] < 0.8 and ab[f"random{k}"]["accuracy"] > 0.95
    assert ab[f"top{k}"]["mean_logprob"] < ab[f"random{k}"]["mean_logprob"] - 0.5
    assert fe["clamp"]["rate_after"] > fe["clamp"]["rate_before"] + 0.3
    ag = r["attribution_graph"]
    if ag["available"]:
        assert ag["n_features"] > 0 and ag["completeness_error"] < 1e-2
        assert (out / "attribution_graph.png").is_file()
    html = (out / "index.html").read_text()
    omitted = report.omitted_figures(r)  # one-colour grids (on gemma2-tiny: every single-head ablation ~1.0)
    for name in FIGURES:
        if name in omitted:  # a sentence instead of the figure
            assert not (out / name).exists() and f'src="{name}"' not in html and omitted[name] in html
        else:
            assert (out / name).is_file() and f'src="{name}"' in html, name
    assert r["timing"]["total_seconds"] > 0


@needs_model
def test_figures_decode(demo: tuple[Path, dict]) -> None:
    from PIL import Image

    out, _ = demo
    for img in re.findall(r'<img src="([^"]+)"', (out / "index.html").read_text()):
        with Image.open(out / img) as im:
            im.load()
            assert im.width > 100 and im.height > 100, img


@needs_model
def test_report_sentences_follow_the_measured_numbers(demo: tuple[Path, dict]) -> None:
    """The page says what results.json measured: no claim that ablating a head hurts when its accuracy
    did not drop, and the induction heads (or 'no induction head found') as patching named them."""
    from mishax_py.zoo import report

    out, r = demo
    html = (out / "index.html").read_text()
    gt, ih = r["ground_truth"], r["induction_heads"]
    for sentence in (report.induction_heads_sentence(ih), report.head_ablation_sentence(gt),
                     report.previous_token_sentence(gt), report.single_head_sentence(gt)):
        assert sentence in html
    base = gt["accuracy_clean"]
    prev = gt["previous_token_head"]
    if gt["single_head_ablation"][prev[0]][prev[1]] >= base - report.MARGIN:
        assert "Ablating it alone does not hurt induction" in html
    assert "also hurts induction" not in html
    if gt["accuracy_named_ablated"] < min(gt["accuracy_others_ablated"]) - report.MARGIN:
        assert "needed for induction" in html
    assert f"Induction heads found: <b>{', '.join(ih['labels'])}</b>" in html
    assert "&lt;bos&gt;" in html and " <bos> " not in html  # token names are escaped in the prose


# ------------------------------------------------------------------------------ ground truth
def prefix_matching(im, n: int = 48, half: int = 10, seed: int = 31_337) -> torch.Tensor:
    """``[n_layers, n_heads]``: attention from the 2nd occurrence of s_j to s_{j+1}'s first occurrence."""
    b = tasks.induction_batch(n, seq_len=half, seed=seed)
    n_layers = im.n_layers
    with torch.no_grad():
        _, cache = im.run_with_cache(b.input_ids, sites=[f"blocks.{i}.attn.pattern" for i in range(n_layers)])
    j = torch.arange(1, half)  # s_j for j = 1..L-1 sits at j (first) and L + j (second); s_{j+1} first at j + 1
    return torch.stack([cache[f"blocks.{i}.attn.pattern"][:, :, half + j, j + 1].mean((0, 2))
                        for i in range(n_layers)])  # fmt: skip


def accuracy_with_heads_ablated(im, heads: list[tuple[int, int]], n: int = 192, seed: int = 27_182) -> float:
    """Induction accuracy on fresh prompts with ``heads`` zeroed at attn.z (a plain Hook per layer)."""
    from mishax_py.interventions import Hook

    def zero(hs: list[int]):
        def fn(z: torch.Tensor) -> torch.Tensor:
            z = z.clone()
            z[:, :, hs] = 0
            return z

        return Hook(fn)

    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)
    b = tasks.induction_batch(n, seed=seed)
    with torch.no_grad():
        logits = im.run(b.input_ids, interventions={f"blocks.{i}.attn.z": zero(hs) for i, hs in by_layer.items()})
    hits = (logits.argmax(-1) == b.targets) & b.target_mask
    return float(hits.sum() / b.target_mask.sum())


@needs_model
def test_named_induction_heads_match_ground_truth(demo: tuple[Path, dict], zoo_im) -> None:
    """The heads the patching study names are exactly the heads with a high prefix-matching score;
    ablating them breaks induction (< 50%), ablating as many other heads does not."""
    _, r = demo
    named = sorted(tuple(h) for h in r["induction_heads"]["heads"])
    pm = prefix_matching(zoo_im)
    n_layers, n_heads = pm.shape
    all_heads = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    high = sorted(h for h in all_heads if float(pm[h]) > 0.3)
    assert named == high, f"named {named}, prefix-matching scores {pm.tolist()}"
    others = [h for h in all_heads if h not in named]
    assert max(float(pm[h]) for h in others) < min(float(pm[h]) for h in named)

    base = accuracy_with_heads_ablated(zoo_im, [])
    assert base > 0.9
    assert accuracy_with_heads_ablated(zoo_im, named) < 0.5
    g = torch.Generator().manual_seed(5)
    other_accs = []
    for _ in range(6):
        pick = [others[i] for i in torch.randperm(len(others), generator=g)[: len(named)].tolist()]
        other_accs.append(accuracy_with_heads_ablated(zoo_im, pick))
    assert sum(other_accs) / len(other_accs) >= 0.5, other_accs


# --------------------------------------------------------------------------------- browser
@needs_model
def test_report_links_the_graph_viewer(demo: tuple[Path, dict]) -> None:
    """graph.html sits next to index.html, which links it; it embeds the pruned graph with the features'
    top-activating contexts (results.json's feature_contexts)."""
    out, r = demo
    assert 'href="graph.html"' in (out / "index.html").read_text()
    text = (out / "graph.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', text, re.S)[1])
    feats = [n for n in data["nodes"] if n["type"] == "feature"]
    assert feats and all(n["contexts"] for n in feats)
    assert {(e["layer"], e["feature"]) for e in r["attribution_graph"]["feature_contexts"]} == {
        (n["layer"], n["feature"]) for n in feats}
    assert len(text.encode()) < 200_000


@needs_model
@pytest.mark.browser
def test_report_renders_in_headless_chromium(demo: tuple[Path, dict], tmp_path: Path) -> None:
    """Screenshot is not blank; after load no <img> failed to decode (the page's own check, via --dump-dom);
    the graph viewer passes its own check (every node drawn, a click highlights edges) with no console output."""
    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); .ci/run installs it")
    import numpy as np
    from PIL import Image

    out, _ = demo
    url = (out / "index.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    proc = run_chromium([f"--screenshot={shot}", "--window-size=1200,2000", url], tmp_path / "profile1")
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as img:
        px = np.asarray(img.convert("L"), dtype=np.float32)
    assert px.shape == (2000, 1200)
    assert px.std() > 10, "screenshot is blank"
    assert (px < 200).mean() > 0.02, "screenshot has almost no content"

    proc = run_chromium(["--dump-dom", url], tmp_path / "profile2")
    dom = proc.stdout
    assert 'data-report-ready="1"' in dom, proc.stderr[-2000:]
    n_imgs = len(re.findall(r"<img\b", dom))
    assert n_imgs >= len(FIGURES)
    assert 'data-broken-images="0"' in dom, re.findall(r'<img[^>]*data-broken[^>]*>', dom)
    assert len(re.findall(r'data-loaded="1"', dom)) == n_imgs

    viewer = (out / "graph.html").resolve().as_uri() + "#selftest"
    proc = run_chromium(["--dump-dom", viewer], tmp_path / "profile3", console=True)
    assert 'data-selftest="pass"' in proc.stdout, re.findall(r'<pre id="selftest">.*?</pre>', proc.stdout, re.S)
    assert [line for line in proc.stderr.splitlines() if ":CONSOLE" in line] == []


# ----------------------------------------------------------------------- any Gemma 2 checkpoint
def test_demo_on_a_checkpoint_folder_via_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``mishax-py demo --model DIR``: random-token induction prompts; the SAE sections are skipped.
    ``--no-progress`` shows no bar even on a terminal (transformers' weight loading included); a missing
    ``--model`` is one line on stderr and status 2."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    import mishax_py.cli
    from mishax_py.cli import main

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                       max_position_embeddings=64, attn_implementation="eager")  # fmt: skip
    ckpt = tmp_path / "ckpt"
    Gemma2ForCausalLM(cfg).eval().save_pretrained(ckpt)
    out = tmp_path / "report"
    capsys.readouterr()
    monkeypatch.setattr(mishax_py.cli, "_on_terminal", lambda: True)
    assert main(["demo", "--out", str(out), "--model", str(ckpt), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    r = json.loads((out / "results.json").read_text())
    assert r["model"]["bundled"] is False and r["model"]["n_layers"] == 2
    assert not r["sae_features"]["available"] and not r["feature_edits"]["available"]
    assert not r["attribution_graph"]["available"]
    assert len(r["ground_truth"]["prefix_matching"]) == 2
    assert (out / "index.html").is_file() and (out / "attention_patterns.png").is_file()
    assert main(["demo", "--out", str(out), "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("mishax-py: --model ") and "neither" in err
