"""Cross-layer transcoders (``saes.clt``): the published Gemma Scope 2 layout, the formula, splicing, errors.

The files are written by the tests in the published layout (``params_layer_{k}.safetensors`` with
``w_enc [d_in, d_sae]``, ``w_dec [d_sae, n, d_out]``, ``b_enc``, ``b_dec``, ``threshold``,
``affine_skip_connection [d_in, d_out]``, and ``config.json``; facts and sources in :mod:`saes.clt`);
nothing is downloaded. Every reference below is the formula written out from the raw tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

import instrumentation.gemma2 as g2
import instrumentation.gemma3 as g3
import saes
from mishax_py import InstrumentedModel
from mishax_py.interventions import Ablate, Hook
from saes.clt import CLTSplice, CrossLayerTranscoder
from saes.formats import SAEFileError
from saes.hub import SAEFetchError, parse_hub_ref
from tests.helpers import make_gemma3, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

D, D_SAE = 32, 24  # the test models' d_model; features per layer


def clt_params(n: int, seed: int = 0, *, affine: bool = False, d_out: int = D,
               causal: bool = True) -> list[dict[str, torch.Tensor]]:
    """Random per-layer tensors in the published layout; thresholds fire about half the features.

    ``causal``: the ``w_dec`` slots before each file's own layer are zero (as released)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        w_dec = torch.randn(D_SAE, n, d_out, generator=g) / D_SAE**0.5
        if causal:
            w_dec[:, :k] = 0
        p = {
            "w_enc": torch.randn(D, D_SAE, generator=g) / D**0.5,
            "w_dec": w_dec,
            "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
            "b_dec": torch.randn(d_out, generator=g) * 0.1,
            "threshold": torch.rand(D_SAE, generator=g) * 0.3,
        }
        if affine:
            p["affine_skip_connection"] = torch.randn(D, d_out, generator=g) / D**0.5
        out.append(p)
    return out


def write_clt(folder: Path, params: list[dict[str, torch.Tensor]], cfg: dict[str, object] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, p in enumerate(params):
        save_file(p, str(folder / f"params_layer_{k}.safetensors"))
    if cfg is not None:
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def clt_cfg(n: int, affine: bool = False) -> dict[str, object]:
    """The config.json of a Gemma Scope 2 CLT (keys and values as transcribed from the release)."""
    return {
        "hf_hook_point_in": "model.layers.{all}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.{all}.post_feedforward_layernorm.output",
        "width": n * D_SAE, "model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu", "l0": 150,
        "affine_connection": affine, "type": "clt",
    }  # fmt: skip


def reference(params: list[dict[str, torch.Tensor]], xs: list[torch.Tensor]) -> tuple[list, list]:
    """The formula written out: per layer k, ``f_k = (pre > θ_k) * relu(pre)``, ``pre = x_k @ w_enc + b_enc``;
    output ``y_k = sum_{j <= k} f_j @ w_dec_j[:, k] + b_dec_k (+ x_k @ affine_k)``."""
    n = len(params)
    feats = []
    for k in range(n):
        p = params[k]
        pre = xs[k] @ p["w_enc"] + p["b_enc"]
        feats.append((pre > p["threshold"]) * torch.relu(pre))
    outs = []
    for k in range(n):
        y = params[k]["b_dec"].expand(*xs[k].shape[:-1], -1).clone()
        for j in range(k + 1):
            y = y + feats[j] @ params[j]["w_dec"][:, k, :]
        if "affine_skip_connection" in params[k]:
            y = y + xs[k] @ params[k]["affine_skip_connection"]
        outs.append(y)
    return feats, outs


# ------------------------------------------------------------------------------------ the format
@pytest.mark.parametrize("affine", [False, True])
def test_a_clt_folder_loads_with_its_sites_and_the_published_formula(tmp_path: Path, affine: bool) -> None:
    n = 5
    params = clt_params(n, seed=1, affine=affine)
    folder = write_clt(tmp_path / f"clt/width_16k_l0_medium{'_affine' if affine else ''}", params,
                       clt_cfg(n, affine))
    clt = saes.load(folder)
    assert isinstance(clt, CrossLayerTranscoder)
    assert clt.layers == tuple(range(n)) and (clt.d_in, clt.d_sae, clt.d_out) == (D, D_SAE, D)
    assert [clt.site(L) for L in clt.layers] == [f"blocks.{L}.ln2" for L in range(n)]
    assert [clt.output_site(L) for L in clt.layers] == [f"blocks.{L}.mlp_out" for L in range(n)]
    assert (clt.W_skip is not None) == affine and not any(p.requires_grad for p in clt.parameters())
    xs = [torch.randn(3, 7, D, generator=torch.Generator().manual_seed(10 + k)) for k in range(n)]
    feats, outs = reference(params, xs)
    assert 0.1 < float((feats[2] > 0).float().mean()) < 0.9  # the thresholds matter
    for k in range(n):
        assert torch.allclose(clt.encode(xs[k], k), feats[k], atol=1e-5)
    got = clt({k: xs[k] for k in range(n)})
    for k in range(n):
        assert (got[k] - outs[k]).abs().max() < 1e-5
    # a file or the config inside the folder load the same model
    for path in (folder / "params_layer_3.safetensors", folder / "config.json"):
        again = saes.load(path)
        assert isinstance(again, CrossLayerTranscoder)
        assert torch.equal(again.W_dec[1], clt.W_dec[1])


def test_the_layer_views_are_the_single_layer_transcoders_of_the_clt(tmp_path: Path) -> None:
    params = clt_params(3, seed=2, affine=True)
    clt = saes.load(write_clt(tmp_path / "clt/width_16k_l0_small_affine", params, clt_cfg(3, True)))
    assert isinstance(clt, CrossLayerTranscoder)
    views = clt.layer_transcoders()
    v = views[1]
    assert (v.site, v.output_site) == ("blocks.1.ln2", "blocks.1.mlp_out")
    assert torch.equal(v.W_enc, params[1]["w_enc"]) and torch.equal(v.W_dec, params[1]["w_dec"][:, 1])
    assert torch.equal(v.b_dec, params[1]["b_dec"])
    assert sorted(v.cross_W_dec) == [2] and torch.equal(v.cross_W_dec[2], params[1]["w_dec"][:, 2])
    assert views[2].cross_W_dec == {}
    x = torch.randn(4, D)
    f = v.activation(v.pre_acts(x))
    assert torch.allclose(v.decode(f), f @ params[1]["w_dec"][:, 1] + params[1]["b_dec"], atol=1e-6)
    skip = v.skip_term(x)
    assert skip is not None and torch.allclose(skip, x @ params[1]["affine_skip_connection"], atol=1e-6)
    with pytest.raises(ValueError, match="layer 2's features write to layers \\[2\\], not to layer 1"):
        clt.decoder(2, 1)


def test_save_writes_the_published_layout_and_loads_back(tmp_path: Path) -> None:
    params = clt_params(4, seed=3, affine=True)
    clt = saes.load(write_clt(tmp_path / "a/clt/width_16k_l0_big_affine", params, clt_cfg(4, True)))
    assert isinstance(clt, CrossLayerTranscoder)
    out = clt.save(tmp_path / "b/clt/width_16k_l0_big_affine")
    files = ["config.json"] + [f"params_layer_{k}.safetensors" for k in range(4)]
    assert sorted(p.name for p in out.iterdir()) == files
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hf_hook_point_in"] == "model.layers.{all}.pre_feedforward_layernorm.output"
    assert cfg["type"] == "clt" and cfg["width"] == 4 * D_SAE and cfg["affine_connection"] is True
    back = saes.load(out)
    assert isinstance(back, CrossLayerTranscoder)
    for a, b in zip(clt.parameters(), back.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_crosscoder_folder_reads_and_writes_its_four_residual_layers(tmp_path: Path) -> None:
    layers = [1, 2, 4, 5]
    params = clt_params(4, seed=4)
    cfg = {"hf_hook_point_in": "model.layers.{1,2,4,5}.output", "hf_hook_point_out": "model.layers.{1,2,4,5}.output",
           "width": 4 * D_SAE, "architecture": "jump_relu", "l0": 150, "affine_connection": False,
           "type": "crosscoder"}  # fmt: skip
    cc = saes.load(write_clt(tmp_path / "crosscoder/layer_1_2_4_5_width_16k_l0_big", params, cfg))
    assert isinstance(cc, CrossLayerTranscoder) and cc.layers == tuple(layers)
    assert [cc.site(L) for L in layers] == [cc.output_site(L) for L in layers] == [
        f"blocks.{L}.resid_post" for L in layers]
    xs = [torch.randn(2, 5, D) for _ in layers]
    _, outs = reference(params, xs)
    got = cc(dict(zip(layers, xs, strict=True)))
    for L, want in zip(layers, outs, strict=True):
        assert (got[L] - want).abs().max() < 1e-5
    # no config: the folder name gives the layers and kinds
    (tmp_path / "crosscoder/layer_1_2_4_5_width_16k_l0_big/config.json").unlink()
    again = saes.load(tmp_path / "crosscoder/layer_1_2_4_5_width_16k_l0_big")
    assert isinstance(again, CrossLayerTranscoder) and again.layers == tuple(layers)
    assert again.site(4) == "blocks.4.resid_post"


def test_nonzero_decoder_slots_before_a_layer_warn_and_are_dropped(tmp_path: Path) -> None:
    params = clt_params(3, seed=5, causal=False)
    folder = write_clt(tmp_path / "clt/width_16k_l0_small", params, clt_cfg(3))
    with pytest.warns(UserWarning, match=r"params_layer_1\.safetensors.*params_layer_2\.safetensors"):
        clt = saes.load(folder)
    assert isinstance(clt, CrossLayerTranscoder)
    xs = [torch.randn(4, D) for _ in range(3)]
    _, outs = reference(params, xs)  # the reference reads only the slots of a layer and later ones
    got = clt(dict(enumerate(xs)))
    assert all((got[k] - outs[k]).abs().max() < 1e-5 for k in range(3))


def test_a_clt_for_gemma_2_reads_ln2_normalized_when_told(tmp_path: Path) -> None:
    folder = write_clt(tmp_path / "clt/width_16k_l0_small", clt_params(2), None)
    clt = saes.load(folder, site="ln2_normalized")
    assert isinstance(clt, CrossLayerTranscoder) and clt.site(1) == "blocks.1.ln2_normalized"
    assert clt.output_site(1) == "blocks.1.mlp_out"
    with pytest.raises(ValueError, match="pass the kind"):
        saes.load(folder, site="blocks.0.ln2_normalized")


# ------------------------------------------------------------------------------------ bad files
def _bad(case: str, folder: Path) -> str:
    """Break the written folder; return what the error must name besides the file."""
    p0 = folder / "params_layer_0.safetensors"
    p1 = folder / "params_layer_1.safetensors"
    params = clt_params(3, seed=6)
    cfg = clt_cfg(3)
    if case == "missing_key":
        del params[1]["threshold"]
        save_file(params[1], str(p1))
        return "'threshold'"
    if case == "w_dec_shape":
        params[1]["w_dec"] = params[1]["w_dec"][:, :2].contiguous()
        save_file(params[1], str(p1))
        return "'w_dec'"
    if case == "b_dec_shape":
        params[0]["b_dec"] = torch.zeros(D + 1)
        save_file(params[0], str(p0))
        return "'b_dec'"
    if case == "d_sae_differs":
        params[1] = clt_params(3, seed=6)[1]
        params[1]["w_enc"] = torch.zeros(D, D_SAE + 1)
        for key in ("b_enc", "threshold"):
            params[1][key] = torch.zeros(D_SAE + 1)
        params[1]["w_dec"] = torch.zeros(D_SAE + 1, 3, D)
        save_file(params[1], str(p1))
        return "'w_enc'"
    if case == "nan":
        params[1]["b_enc"][3] = float("nan")
        save_file(params[1], str(p1))
        return "'b_enc'"
    if case == "int_dtype":
        params[1]["threshold"] = torch.zeros(D_SAE, dtype=torch.int32)
        save_file(params[1], str(p1))
        return "'threshold'"
    if case == "gap":
        p1.unlink()
        return "params_layer_1.safetensors"
    if case == "truncated":
        p1.write_bytes(p1.read_bytes()[:200])
        return "safetensors"
    if case == "affine_mismatch":
        cfg["affine_connection"] = True
        (folder / "config.json").write_text(json.dumps(cfg))
        return "'affine_connection'"
    if case == "skip_in_one_file":
        params[1]["affine_skip_connection"] = torch.zeros(D, D)
        save_file(params[1], str(p1))
        return "'affine_skip_connection'"
    if case == "bad_type":
        cfg["type"] = "sae"
        (folder / "config.json").write_text(json.dumps(cfg))
        return "'type'"
    if case == "bad_hook":
        cfg["hf_hook_point_in"] = "model.layers.{all}.mlp.down_proj.input"
        (folder / "config.json").write_text(json.dumps(cfg))
        return "'hf_hook_point_in'"
    if case == "hook_without_placeholder":
        cfg["hf_hook_point_out"] = "model.layers.3.post_feedforward_layernorm.output"
        (folder / "config.json").write_text(json.dumps(cfg))
        return "'hf_hook_point_out'"
    if case == "width":
        cfg["width"] = 7
        (folder / "config.json").write_text(json.dumps(cfg))
        return "'width'"
    if case == "architecture":
        cfg["architecture"] = "topk"
        (folder / "config.json").write_text(json.dumps(cfg))
        return "'architecture'"
    raise AssertionError(case)


BAD = ["missing_key", "w_dec_shape", "b_dec_shape", "d_sae_differs", "nan", "int_dtype", "gap", "truncated",
       "affine_mismatch", "skip_in_one_file", "bad_type", "bad_hook", "hook_without_placeholder", "width",
       "architecture"]


@pytest.mark.parametrize("case", BAD)
def test_bad_files_name_file_and_key(tmp_path: Path, case: str) -> None:
    folder = write_clt(tmp_path / "clt/width_16k_l0_small", clt_params(3, seed=6), clt_cfg(3))
    names = _bad(case, folder)
    with pytest.raises(SAEFileError) as err:
        saes.load(folder)
    msg = str(err.value)
    assert names in msg, msg
    assert str(folder) in msg, msg  # the file (or the folder, for a missing file) is named


# ------------------------------------------------------------------------------------ hub references
def test_hub_references_parse_to_the_whole_folder() -> None:
    ref = parse_hub_ref("google/gemma-scope-2-1b-pt/clt/width_262k_l0_medium_affine")
    assert (ref.repo_id, ref.path, ref.kind) == ("google/gemma-scope-2-1b-pt", "clt/width_262k_l0_medium_affine",
                                                 "gemma_scope_2_multi")
    assert ref.files[0] == "clt/width_262k_l0_medium_affine/params_layer_0.safetensors"
    assert len(ref.files) == 27 and ref.files[-1].endswith("/config.json")
    assert len(parse_hub_ref("gemma-scope-2-270m-it/clt/width_262k_l0_big").files) == 19
    cc = parse_hub_ref("google/gemma-scope-2-4b-pt/crosscoder/layer_9_17_22_29_width_65k_l0_medium")
    assert cc.kind == "gemma_scope_2_multi" and len(cc.files) == 5
    with pytest.raises(ValueError, match="cross-layer transcoders for the 1b, 270m models only"):
        parse_hub_ref("google/gemma-scope-2-4b-pt/clt/width_262k_l0_medium")
    with pytest.raises(ValueError, match="must name a folder"):
        parse_hub_ref("google/gemma-scope-2-1b-pt/clt")


def test_hub_reference_loads_and_offline_names_what_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    folder = "clt/width_16k_l0_medium"
    n = 18  # the 270M model's layers
    params = clt_params(n, seed=7)
    write_clt(tmp_path / "cache" / folder, params, clt_cfg(n))
    asked: list[tuple[str, str]] = []

    def download(repo_id: str, filename: str, **_: object) -> str:
        asked.append((repo_id, filename))
        return str(tmp_path / "cache" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    clt = saes.load(f"google/gemma-scope-2-270m-pt/{folder}")
    assert isinstance(clt, CrossLayerTranscoder) and clt.layers == tuple(range(n))
    assert clt.metadata["hub_ref"] == f"google/gemma-scope-2-270m-pt/{folder}"
    assert len(asked) == n + 1 and {r for r, _ in asked} == {"google/gemma-scope-2-270m-pt"}

    def offline(repo_id: str, filename: str, **_: object) -> str:
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SAEFetchError) as err:
        saes.load("google/gemma-scope-2-1b-it/clt/width_262k_l0_medium_affine")
    msg = str(err.value)
    assert "google/gemma-scope-2-1b-it" in msg and "params_layer_0.safetensors" in msg
    assert "--include 'clt/width_262k_l0_medium_affine/*'" in msg and "HF_HUB_OFFLINE" in msg


# ------------------------------------------------------------------------------------ splicing
def gemma3_im() -> InstrumentedModel:
    return g3.instrument(make_gemma3(seed=3))


def gemma2_im() -> InstrumentedModel:
    return g2.instrument(make_model(seed=4, num_hidden_layers=4))


def random_clt(im: InstrumentedModel, tmp_path: Path, *, affine: bool, input_kind: str, seed: int = 8
               ) -> tuple[CrossLayerTranscoder, list[dict[str, torch.Tensor]]]:
    n = im.n_layers
    params = clt_params(n, seed=seed, affine=affine)
    for p in params:  # ln2 values are O(1) per unit; scale so that about half the features fire
        p["w_enc"] *= 2.0
    clt = saes.load(write_clt(tmp_path / "clt/width_16k_l0_small", params, clt_cfg(n, affine)), site=input_kind)
    assert isinstance(clt, CrossLayerTranscoder)
    return clt, params


def hand_replacement(im: InstrumentedModel, params: list[dict[str, torch.Tensor]], input_kind: str,
                     clamps: dict[int, tuple[int, float]] | None = None, keep_error: bool = True
                     ) -> dict[str, list[Hook]]:
    """The splice written out as hooks: record x_L, and at each mlp_out write the formula's
    ``y_hat(f') + (y - y_hat(f))`` (or ``y_hat(f')``), ``clamps = {layer: (feature, value)}``."""
    xs: dict[int, torch.Tensor] = {}
    out: dict[str, list[Hook]] = {}
    n = len(params)

    def feats(k: int, clamped: bool) -> torch.Tensor:
        pre = xs[k].float() @ params[k]["w_enc"] + params[k]["b_enc"]
        f = (pre > params[k]["threshold"]) * torch.relu(pre)
        if clamped and clamps and k in clamps:
            f = f.clone()
            f[..., clamps[k][0]] = clamps[k][1]
        return f

    def y_hat(k: int, clamped: bool) -> torch.Tensor:
        y = params[k]["b_dec"] + sum(feats(j, clamped) @ params[j]["w_dec"][:, k] for j in range(k + 1))
        if "affine_skip_connection" in params[k]:
            y = y + xs[k].float() @ params[k]["affine_skip_connection"]
        return y

    for k in range(n):
        def rec(v: torch.Tensor, k: int = k) -> None:
            xs[k] = v

        def write(v: torch.Tensor, k: int = k) -> torch.Tensor:
            new = y_hat(k, True) + (v.float() - y_hat(k, False)) if keep_error else y_hat(k, True)
            return new.to(v.dtype)

        out[im.layer_site(k, input_kind)] = [Hook(rec)]
        out[im.layer_site(k, "mlp_out")] = [Hook(write)]
    return out


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_a_clt_spliced_with_no_edit_leaves_the_logits_and_its_error_terms_add_up(tmp_path: Path, family: str
                                                                                 ) -> None:
    im = gemma3_im() if family == "gemma3" else gemma2_im()
    kind = "ln2" if family == "gemma3" else "ln2_normalized"
    clt, params = random_clt(im, tmp_path, affine=True, input_kind=kind)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    base = im.run(ids)
    spliced = im.run(ids, interventions=CLTSplice(clt).interventions())
    assert (spliced - base).abs().max() < 1e-5
    # with the error term a constant for autograd the values are the same
    detached = im.run(ids, interventions=CLTSplice(clt, detach_error=True).interventions())
    assert (detached - base).abs().max() < 1e-5
    # recorded features and errors: reconstruction + error == the MLP output at every layer
    sites = [f"{clt.site(L)}.sae.features" for L in clt.layers] + [f"{clt.output_site(L)}.sae.error"
                                                                   for L in clt.layers]
    _, cache = im.run_with_cache(ids, sites=sites + [clt.site(L) for L in clt.layers]
                                 + [clt.output_site(L) for L in clt.layers],
                                 interventions=CLTSplice(clt).interventions())
    feats, outs = reference(params, [cache[clt.site(L)].float() for L in clt.layers])
    for L in clt.layers:
        assert (cache[f"{clt.site(L)}.sae.features"] - feats[L]).abs().max() < 1e-5
        total = outs[L] + cache[f"{clt.output_site(L)}.sae.error"]
        assert (total - cache[clt.output_site(L)].float()).abs().max() < 1e-5
    assert max(float(cache[f"{clt.output_site(L)}.sae.error"].abs().max()) for L in clt.layers) > 0.1
    # the pure reconstruction (no error terms) is the formula written out, and not the model
    pure = im.run(ids, interventions=CLTSplice(clt, keep_error=False).interventions())
    by_hand = im.run(ids, interventions=hand_replacement(im, params, kind, keep_error=False))
    assert (pure - by_hand).abs().max() < 1e-4
    assert (pure - base).abs().max() > 1e-2


def test_feature_edits_move_every_later_layer_by_the_formula(tmp_path: Path) -> None:
    im = gemma3_im()
    clt, params = random_clt(im, tmp_path, affine=False, input_kind="ln2", seed=9)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    base = im.run(ids)
    clamp = {1: saes.FeatureClamp([5], 3.0)}
    got = im.run(ids, interventions=CLTSplice(clt, edits=clamp).interventions())
    assert (got - base).abs().max() > 1e-2
    # written out: feature 5 of layer 1 set to 3.0, every layer's y_hat(f') + (y - y_hat(f)) by hand
    hand = im.run(ids, interventions=hand_replacement(im, params, "ln2", clamps={1: (5, 3.0)}))
    assert (got - hand).abs().max() < 1e-4
    # a clamp at the last layer moves its MLP output by exactly (3 - f) * its decoder row
    last = im.n_layers - 1
    _, cache = im.run_with_cache(ids, sites=[f"{clt.site(last)}.sae.features", clt.output_site(last)],
                                 interventions=CLTSplice(clt).interventions())
    _, cache2 = im.run_with_cache(ids, sites=[clt.output_site(last)], interventions=CLTSplice(
        clt, edits={last: saes.FeatureClamp([2], 5.0)}).interventions())
    f = cache[f"{clt.site(last)}.sae.features"][..., 2]
    want = (5.0 - f)[..., None] * params[last]["w_dec"][2, last]
    assert (cache2[clt.output_site(last)] - cache[clt.output_site(last)] - want).abs().max() < 1e-5


def test_a_splice_composes_with_other_interventions(tmp_path: Path) -> None:
    im = gemma3_im()
    clt, params = random_clt(im, tmp_path, affine=True, input_kind="ln2", seed=10)
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(2))
    ablate = {"blocks.2.attn.z": Ablate(heads=[1])}
    got = im.run(ids, interventions={**CLTSplice(clt, edits={0: saes.FeatureSteer([4], 2.0)}).interventions(),
                                     **ablate})
    # written out: steering layer 0's feature 4 by 2.0 adds 2.0 * its decoder row to every layer's MLP output
    by_hand = {im.layer_site(k, "mlp_out"): Hook(lambda v, k=k: v + 2.0 * params[0]["w_dec"][4, k].to(v.dtype))
               for k in range(im.n_layers)}
    want = im.run(ids, interventions={**by_hand, **ablate})
    assert (got - want).abs().max() < 1e-4
    assert (got - im.run(ids, interventions=ablate)).abs().max() > 1e-3


def test_a_splice_missing_its_input_sites_names_them(tmp_path: Path) -> None:
    im = gemma3_im()
    clt, _ = random_clt(im, tmp_path, affine=False, input_kind="ln2")
    parts = CLTSplice(clt, edits={0: saes.FeatureAblate([1])}).interventions()
    only_out = {s: v for s, v in parts.items() if s.endswith("mlp_out")}
    with pytest.raises(RuntimeError, match=r"no features of layer\(s\) \[0\]"):
        im.run(torch.randint(0, 64, (1, 8)), interventions=only_out)
    with pytest.raises(ValueError, match="layer 9 is not one of"):
        CLTSplice(clt, edits={9: saes.FeatureAblate([1])})


def test_a_crosscoder_spliced_at_its_residual_sites(tmp_path: Path) -> None:
    im = gemma3_im()
    layers = [1, 3, 4, 5]
    params = clt_params(4, seed=12)
    cfg = {"hf_hook_point_in": "model.layers.{1,3,4,5}.output", "hf_hook_point_out": "model.layers.{1,3,4,5}.output",
           "architecture": "jump_relu", "type": "crosscoder"}
    cc = saes.load(write_clt(tmp_path / "crosscoder/layer_1_3_4_5_width_16k_l0_big", params, cfg))
    assert isinstance(cc, CrossLayerTranscoder)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    base = im.run(ids)
    parts = CLTSplice(cc).interventions()
    assert list(parts) == [f"blocks.{L}.resid_post" for L in layers]  # one [encode, write] list per site
    sites = [f"blocks.{L}.resid_post.sae.{what}" for L in layers for what in ("features", "error")]
    logits, cache = im.run_with_cache(ids, sites=sites + [f"blocks.{L}.resid_post" for L in layers],
                                      interventions=parts)
    assert (logits - base).abs().max() < 1e-5
    feats, outs = reference(params, [cache[f"blocks.{L}.resid_post"].float() for L in layers])
    for k, L in enumerate(layers):
        assert (cache[f"blocks.{L}.resid_post.sae.features"] - feats[k]).abs().max() < 1e-5
        total = outs[k] + cache[f"blocks.{L}.resid_post.sae.error"]
        assert (total - cache[f"blocks.{L}.resid_post"]).abs().max() < 1e-4
    pure = im.run(ids, interventions=CLTSplice(cc, keep_error=False).interventions())
    assert (pure - base).abs().max() > 1e-2


def test_splices_in_a_sweep_equal_each_run_alone(tmp_path: Path) -> None:
    im = gemma3_im()
    clt, _ = random_clt(im, tmp_path, affine=True, input_kind="ln2", seed=13)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    variants = [CLTSplice(clt, edits={L: saes.FeatureClamp([3], v)}).interventions()
                for L, v in ((0, 2.0), (2, 0.0), (4, 5.0))]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, :5]

    swept = im.sweep(ids, variants, metric=metric)
    alone = torch.stack([metric(im.run(ids, interventions=v)) for v in variants])
    assert swept.shape == alone.shape and (swept - alone).abs().max() < 1e-5
    assert (alone[0] - alone[2]).abs().max() > 1e-3
