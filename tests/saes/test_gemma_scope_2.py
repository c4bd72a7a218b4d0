"""Gemma Scope 2 folders (``config.json`` + ``params.safetensors``): loading, sites, formula, errors, hub refs.

The files are written by the tests in the published layout (:mod:`saes.gemma_scope_2`); nothing
is downloaded. Splicing runs on the small random Gemma 2 of ``tests.helpers`` (same site names).
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

import saes
from mishax_py import InstrumentedModel
from saes.formats import SAEFileError
from saes.gemma_scope_2 import parse_folder, sites_from_hook_points
from saes.hub import SAEFetchError, parse_hub_ref

pytestmark = pytest.mark.usefixtures("one_thread")

D, D_SAE = 32, 48  # tests.helpers.tiny_config: d_model 32 = 4 heads x 8 (attn.z flattens to 32)


def gs2_params(seed: int = 0, *, affine: bool = False) -> dict[str, torch.Tensor]:
    """Random Gemma Scope 2 tensors, thresholds set so that roughly half the features fire."""
    g = torch.Generator().manual_seed(seed)
    p = {
        "w_enc": torch.randn(D, D_SAE, generator=g) / D**0.5,
        "w_dec": torch.randn(D_SAE, D, generator=g) / D_SAE**0.5,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "b_dec": torch.randn(D, generator=g) * 0.1,
        "threshold": torch.rand(D_SAE, generator=g) * 0.5,
    }
    if affine:
        p["affine_skip_connection"] = torch.randn(D, D, generator=g) / D**0.5  # [d_in, d_out], not symmetric
    return p


def write_gs2(folder: Path, params: dict[str, torch.Tensor], cfg: dict[str, object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(params, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def hook(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{module}"


# kind: (folder, hf_hook_point_in, hf_hook_point_out, expected (site, output_site), affine)
KINDS = {
    "resid_post": ("resid_post/layer_1_width_16k_l0_small", hook(1, "output"), None,
                   ("blocks.1.resid_post", None), False),
    "attn_out": ("attn_out_all/layer_0_width_16k_l0_medium", hook(0, "self_attn.o_proj.input"), None,
                 ("blocks.0.attn.z", None), False),
    "mlp_out": ("mlp_out/layer_1_width_65k_l0_big", hook(1, "post_feedforward_layernorm.output"), None,
                ("blocks.1.mlp_out", None), False),
    "transcoder": ("transcoder/layer_0_width_262k_l0_small", hook(0, "pre_feedforward_layernorm.output"),
                   hook(0, "post_feedforward_layernorm.output"), ("blocks.0.ln2", "blocks.0.mlp_out"), False),
    "affine": ("transcoder_all/layer_1_width_16k_l0_big_affine", hook(1, "pre_feedforward_layernorm.output"),
               hook(1, "post_feedforward_layernorm.output"), ("blocks.1.ln2", "blocks.1.mlp_out"), True),
}  # fmt: skip


def write_kind(root: Path, kind: str, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    folder, h_in, h_out, _, affine = KINDS[kind]
    params = gs2_params(seed, affine=affine)
    cfg: dict[str, object] = {
        "architecture": "jump_relu",
        "hf_hook_point_in": h_in,
        "model_name": "gemma-v3-1b-pt",
        "width": D_SAE,
        "l0": 20,
        "affine_connection": affine,
    }
    if h_out is not None:
        cfg["hf_hook_point_out"] = h_out
    return write_gs2(root / folder, params, cfg), params


def formula(p: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The published JumpReLU, written out: features and reconstruction (+ the affine skip term)."""
    pre = x @ p["w_enc"] + p["b_enc"]
    f = (pre > p["threshold"]) * torch.relu(pre)
    x_hat = f @ p["w_dec"] + p["b_dec"]
    if "affine_skip_connection" in p:  # x @ A, untransposed (saes.gemma_scope_2 docs: the sources)
        x_hat = x_hat + x @ p["affine_skip_connection"]
    return f, x_hat


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_loads_with_its_site_and_the_published_formula(tmp_path: Path, kind: str) -> None:
    folder, params = write_kind(tmp_path, kind)
    site, output_site, affine = KINDS[kind][3][0], KINDS[kind][3][1], KINDS[kind][4]
    for ref in (folder, folder / "params.safetensors", folder / "config.json"):
        sae = saes.load(ref)
        assert sae.site == site and sae.metadata["format"] == "gemma_scope_2"
        assert sae.metadata["hf_hook_point_in"] == KINDS[kind][1]
    if output_site is None:
        assert type(sae) is saes.JumpReLUSAE
    else:
        assert isinstance(sae, saes.Transcoder) and sae.output_site == output_site
        assert (getattr(sae, "W_skip", None) is not None) == affine
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(7))
    f, x_hat = formula(params, x)
    assert 0 < int((f > 0).sum()) < f.numel()  # some features fire, some do not
    with torch.no_grad():
        assert (sae.encode(x) - f).abs().max().item() <= 1e-5
        assert (sae(x) - x_hat).abs().max().item() <= 1e-5
    if kind == "attn_out":  # the o_proj input is attn.z [.., head, d_head] flattened head-major
        with torch.no_grad():
            assert (sae.encode(x.reshape(3, 5, 4, 8)) - f).abs().max().item() <= 1e-5


def test_site_from_folder_name_when_config_has_no_hook_points(tmp_path: Path) -> None:
    p = gs2_params(1, affine=True)
    folder = write_gs2(tmp_path / "transcoder/layer_3_width_16k_l0_medium_affine", p, {"architecture": "jump_relu"})
    tc = saes.load(folder)
    assert isinstance(tc, saes.Transcoder) and (tc.site, tc.output_site) == ("blocks.3.ln2", "blocks.3.mlp_out")
    res = write_gs2(tmp_path / "resid_post_all/layer_2_width_1m_l0_big", gs2_params(2), {"architecture": "jump_relu"})
    assert saes.load(res).site == "blocks.2.resid_post"
    assert saes.load(res, site="blocks.2.resid_mid").site == "blocks.2.resid_mid"


def test_hook_points_and_folder_names() -> None:
    assert sites_from_hook_points("model.language_model.layers.7.output", None) == (
        "blocks.7.resid_post",
        "blocks.7.resid_post",
    )
    assert sites_from_hook_points(
        hook(4, "pre_feedforward_layernorm.output"), hook(4, "post_feedforward_layernorm.output")
    ) == (
        "blocks.4.ln2",
        "blocks.4.mlp_out",
    )
    with pytest.raises(ValueError, match="model.layers.4.mlp.down_proj.output"):
        sites_from_hook_points(hook(4, "mlp.down_proj.output"), None)
    f = parse_folder("google/gemma-scope-2-4b-it/transcoder_all/layer_5_width_16k_l0_big_affine")
    assert f is not None and (f.kind, f.layer, f.width, f.l0, f.affine, f.all_layers) == (
        "transcoder", 5, "16k", "big", True, True,
    )  # fmt: skip
    assert parse_folder("resid_post/layer_12_width_262k_l0_small") is not None
    assert parse_folder("clt/layer_3_width_16k_l0_medium") is None  # cross-layer transcoders: not loaded


def mutate(p: dict[str, torch.Tensor], cfg: dict[str, object], case: str) -> None:
    if case == "missing_w_dec":
        del p["w_dec"]
    elif case == "w_dec_shape":
        p["w_dec"] = torch.zeros(D_SAE + 1, D)
    elif case == "b_enc_shape":
        p["b_enc"] = torch.zeros(D_SAE - 1)
    elif case == "threshold_nan":
        p["threshold"][3] = float("nan")
    elif case == "threshold_int":
        p["threshold"] = torch.zeros(D_SAE, dtype=torch.int32)
    elif case == "skip_shape":
        p["affine_skip_connection"] = torch.zeros(D, D + 1)
    elif case == "affine_without_skip":
        del p["affine_skip_connection"]
    elif case == "skip_without_affine":
        cfg["affine_connection"] = False
    elif case == "affine_string":
        cfg["affine_connection"] = "true"
    elif case == "architecture":
        cfg["architecture"] = "topk"
    elif case == "hook_in_unknown":
        cfg["hf_hook_point_in"] = "model.layers.1.mlp.output"
    elif case == "hook_out_type":
        cfg["hf_hook_point_out"] = 3
    elif case == "width":
        cfg["width"] = D_SAE * 2


BAD = {  # case: (file, key named in the message)
    "missing_w_dec": ("params.safetensors", "'w_dec'"),
    "w_dec_shape": ("params.safetensors", "'w_dec'"),
    "b_enc_shape": ("params.safetensors", "'b_enc'"),
    "threshold_nan": ("params.safetensors", "'threshold'"),
    "threshold_int": ("params.safetensors", "'threshold'"),
    "skip_shape": ("params.safetensors", "'affine_skip_connection'"),
    "affine_without_skip": ("config.json", "'affine_connection'"),
    "skip_without_affine": ("config.json", "'affine_connection'"),
    "affine_string": ("config.json", "'affine_connection'"),
    "architecture": ("config.json", "'architecture'"),
    "hook_in_unknown": ("config.json", "'hf_hook_point_in'"),
    "hook_out_type": ("config.json", "'hf_hook_point_out'"),
    "width": ("config.json", "'width'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_name_file_and_key(tmp_path: Path, case: str) -> None:
    folder, h_in, h_out, _, _ = KINDS["affine"]
    p = gs2_params(3, affine=True)
    cfg: dict[str, object] = {
        "architecture": "jump_relu", "hf_hook_point_in": h_in, "hf_hook_point_out": h_out,
        "affine_connection": True, "width": D_SAE,
    }  # fmt: skip
    mutate(p, cfg, case)
    path = write_gs2(tmp_path / folder, p, cfg)
    file, key = BAD[case]
    with pytest.raises(SAEFileError) as e:
        saes.load(path)
    msg = str(e.value)
    assert str(path / file) in msg and key in msg, msg


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    folder, _ = write_kind(tmp_path, "resid_post")
    data = (folder / "params.safetensors").read_bytes()
    (folder / "params.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFileError, match="params.safetensors"):
        saes.load(folder)
    (folder / "config.json").write_text('{"architecture": "jump_')
    with pytest.raises(SAEFileError, match="config.json.*invalid JSON"):
        saes.load(folder)
    (folder / "params.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks params.safetensors"):
        saes.load(folder / "config.json")


def test_hub_references_parse() -> None:
    ref = "google/gemma-scope-2-1b-pt/resid_post_all/layer_10_width_262k_l0_small"
    h = parse_hub_ref(ref)
    assert (h.repo_id, h.path, h.kind) == (
        "google/gemma-scope-2-1b-pt",
        "resid_post_all/layer_10_width_262k_l0_small",
        "gemma_scope_2",
    )
    assert h.files == (
        "resid_post_all/layer_10_width_262k_l0_small/config.json",
        "resid_post_all/layer_10_width_262k_l0_small/params.safetensors",
    )
    short = parse_hub_ref("gemma-scope-2-1b-pt/resid_post_all/layer_10_width_262k_l0_small")
    assert (short.repo_id, short.path, short.files) == (h.repo_id, h.path, h.files)
    assert parse_hub_ref(ref + "/params.safetensors").files == h.files
    assert (
        parse_hub_ref("google/gemma-scope-2-27b-it/transcoder/layer_3_width_16k_l0_big_affine").kind == "gemma_scope_2"
    )
    with pytest.raises(ValueError, match="must name a folder"):
        parse_hub_ref("google/gemma-scope-2-1b-pt/resid_post/canonical")
    # Gemma Scope 1 references are unchanged
    assert parse_hub_ref("google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71").kind == "npz"


def test_hub_reference_loads_and_offline_names_what_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "hub"
    folder = "transcoder_all/layer_1_width_16k_l0_big_affine"
    params = gs2_params(4, affine=True)
    write_gs2(
        root / "google--gemma-scope-2-270m-pt" / folder,
        params,
        {"architecture": "jump_relu", "affine_connection": True},
    )
    calls: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str, **kwargs: object) -> str:
        calls.append((repo_id, filename))
        path = root / repo_id.replace("/", "--") / filename
        if not path.exists():
            raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id}/{filename} not found")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    tc = saes.load(f"google/gemma-scope-2-270m-pt/{folder}")
    assert calls == [("google/gemma-scope-2-270m-pt", f"{folder}/config.json"),
                     ("google/gemma-scope-2-270m-pt", f"{folder}/params.safetensors")]  # fmt: skip
    assert isinstance(tc, saes.Transcoder) and (tc.site, tc.output_site) == ("blocks.1.ln2", "blocks.1.mlp_out")
    assert tc.metadata["hub_ref"] == f"google/gemma-scope-2-270m-pt/{folder}"
    with pytest.raises(
        SAEFetchError,
        match=r"'google/gemma-scope-2-1b-it'.*mlp_out/layer_2_width_16k_l0_small/config.json.*hf download",
    ):
        saes.load("google/gemma-scope-2-1b-it/mlp_out/layer_2_width_16k_l0_small")


def test_skip_transcoder_spliced_with_no_edit_leaves_logits(
    tmp_path: Path, tiny_im: InstrumentedModel, ids: torch.Tensor
) -> None:
    folder, _ = write_kind(tmp_path, "affine", seed=5)
    tc = saes.load(folder)
    zf, _ = write_kind(tmp_path, "attn_out", seed=6)
    z = saes.load(zf)
    with torch.no_grad():
        plain = tiny_im.run(ids)
        assert (tiny_im.run(ids, interventions=saes.splice(tc)) - plain).abs().max().item() <= 1e-5
        assert (tiny_im.run(ids, interventions=saes.splice(z)) - plain).abs().max().item() <= 1e-5
        # without the error term the prediction replaces mlp_out, so the logits move
        off = tiny_im.run(ids, interventions=saes.splice(tc, keep_error=False))
        assert (off - plain).abs().max().item() > 1e-3
        _, c = tiny_im.run_with_cache(ids, sites=["blocks.1.ln2"])
        _, x_hat = formula(gs2_params(5, affine=True), c["blocks.1.ln2"])
        _, c2 = tiny_im.run_with_cache(ids, sites=["blocks.1.mlp_out"], interventions=saes.splice(tc, keep_error=False))
        assert (c2["blocks.1.mlp_out"] - x_hat).abs().max().item() <= 1e-5
