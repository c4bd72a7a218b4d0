"""saes: Gemma Scope npz / SAELens formats, hub references, site inference, bad files."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch

import saes
from saes.formats import SAEFileError, load_npz, load_saelens
from saes.hub import SAEFetchError, parse_hub_ref
from saes.sites import gemma_scope_sites, hook_name_from_site, site_from_hook_name

KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops: see conftest.one_thread


def gemma_scope_params(d_in: int, d_sae: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random parameters with Gemma Scope's keys, shapes and scales (unit-norm decoder rows,
    thresholds giving an L0 of roughly 70 of 16384 on unit-Gaussian inputs)."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return {
        "W_enc": W_enc.numpy(),
        "W_dec": W_dec.numpy(),
        "b_enc": (0.1 * torch.randn(d_sae, generator=g)).numpy(),
        "b_dec": (0.1 * torch.randn(d_in, generator=g)).numpy(),
        "threshold": (2.4 + 0.5 * torch.rand(d_sae, generator=g)).numpy(),
    }


def spec_encode(p: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """SPEC §4 written out: pre = x @ W_enc + b_enc; f = (pre > threshold) * relu(pre)."""
    pre = x @ torch.from_numpy(p["W_enc"]) + torch.from_numpy(p["b_enc"])
    return (pre > torch.from_numpy(p["threshold"])) * torch.relu(pre)


def spec_decode(p: dict[str, np.ndarray], f: torch.Tensor) -> torch.Tensor:
    """SPEC §4: x_hat = f @ W_dec + b_dec."""
    return f @ torch.from_numpy(p["W_dec"]) + torch.from_numpy(p["b_dec"])


def write_npz(path: Path, params: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **params)
    return path


# ------------------------------------------------------------------ full size
@pytest.mark.slow
def test_gemma_scope_shaped_load_matches_spec_and_saelens_round_trip(tmp_path: Path) -> None:
    d_in, d_sae = 2304, 16384
    params = gemma_scope_params(d_in, d_sae)
    assert all(params[k].dtype == np.float32 for k in KEYS)
    repo_dir = tmp_path / "models--google--gemma-scope-2b-pt-res" / "snapshots" / "abc"
    npz = write_npz(repo_dir / "layer_20" / "width_16k" / "average_l0_71" / "params.npz", params)

    sae = saes.load(npz)
    assert isinstance(sae, saes.JumpReLUSAE)
    assert (sae.d_in, sae.d_sae, sae.site) == (d_in, d_sae, "blocks.20.resid_post")
    assert sae.dtype == torch.float32

    x = torch.randn(2, 8, d_in, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = sae.encode(x)
        want_f = spec_encode(params, x)
        assert (f - want_f).abs().max().item() <= 1e-5
        l0 = (f != 0).sum(-1).float().mean().item()
        assert 20 < l0 < 200  # realistic sparsity: the decode takes the sparse path
        x_hat = sae.decode(f)
        assert (x_hat - spec_decode(params, want_f)).abs().max().item() <= 1e-5
        out = sae(x)

    folder = sae.save(tmp_path / "saelens")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["hook_name"] == "blocks.20.hook_resid_post"
    assert (cfg["d_in"], cfg["d_sae"]) == (d_in, d_sae)
    back = saes.load(folder)
    assert isinstance(back, saes.JumpReLUSAE) and back.site == "blocks.20.resid_post"
    for name in KEYS:
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
    with torch.no_grad():
        assert torch.equal(back.encode(x), f)
        assert torch.equal(back(x), out)


# -------------------------------------------------------------- small formats
def test_local_npz_and_folder_and_dtype(tmp_path: Path) -> None:
    p = gemma_scope_params(32, 64, seed=1)
    npz = write_npz(tmp_path / "mine" / "params.npz", p)
    x = torch.randn(5, 32)
    for ref in (npz, str(npz), tmp_path / "mine"):
        sae = saes.load(ref)
        assert sae.site is None  # nothing to infer from
        assert torch.allclose(sae.encode(x), spec_encode(p, x), atol=1e-6)
    sae = saes.load(npz, site="blocks.0.resid_post", dtype=torch.bfloat16)
    assert sae.site == "blocks.0.resid_post" and sae.W_enc.dtype == torch.bfloat16
    assert not sae.W_enc.requires_grad
    assert sae.encode(x).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_saelens_round_trip_each_family_and_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    made: list[saes.SAE] = [
        saes.JumpReLUSAE(16, 48, site="blocks.1.resid_post"),
        saes.TopKSAE(16, 48, k=5, site="blocks.1.mlp_out"),
        saes.ReLUSAE(16, 48, site="blocks.0.attn.z", apply_b_dec_to_input=True),
        saes.Transcoder(16, 48, site="blocks.0.ln2_normalized", output_site="blocks.0.mlp_out", skip=True),
        saes.Transcoder(16, 48, d_out=24, activation="topk", k=3, site="blocks.0.ln2", output_site="x"),
    ]
    x = torch.randn(3, 16)
    for i, sae in enumerate(made):
        with torch.no_grad():
            for prm in sae.parameters():
                prm.normal_()
        sae = sae.to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "x" is not a known site
            back = saes.load(sae.save(tmp_path / f"sae{i}"))
        assert type(back) is type(sae)
        assert (back.site, back.output_site, back.apply_b_dec_to_input) == (
            sae.site,
            sae.output_site,
            sae.apply_b_dec_to_input,
        )
        assert back.dtype == dtype
        assert back.config() == sae.config()
        with torch.no_grad():
            assert torch.equal(back(x), sae(x))


def test_saelens_cfg_honoured(tmp_path: Path) -> None:
    """A SAELens folder written by hand: architecture, apply_b_dec_to_input, hook_name, k."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    W_enc, W_dec = torch.randn(8, 20), torch.randn(20, 8)
    b_enc, b_dec = torch.randn(20), torch.randn(8)
    x = torch.randn(4, 8)

    def folder(name: str, cfg: dict, tensors: dict) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "cfg.json").write_text(json.dumps(cfg))
        save_file(tensors, str(d / "sae_weights.safetensors"))
        return d

    base = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    std = saes.load(
        folder(
            "std",
            {
                "architecture": "standard",
                "d_in": 8,
                "d_sae": 20,
                "hook_name": "blocks.3.hook_mlp_out",
                "apply_b_dec_to_input": True,
            },
            base,
        )
    )
    assert isinstance(std, saes.ReLUSAE) and std.site == "blocks.3.mlp_out"
    assert torch.allclose(std.encode(x), torch.relu((x - b_dec) @ W_enc + b_enc), atol=1e-6)

    topk = saes.load(
        folder(
            "topk",
            {"architecture": "topk", "d_in": 8, "d_sae": 20, "k": 3, "hook_name": "blocks.2.attn.hook_z"},
            base,
        )
    )
    assert isinstance(topk, saes.TopKSAE) and topk.k == 3 and topk.site == "blocks.2.attn.z"
    f = topk.encode(x)
    assert ((f != 0).sum(-1) <= 3).all()
    pre = (x - b_dec) @ W_enc + b_enc  # no apply_b_dec_to_input in its cfg.json: SAELens' default, true
    top = pre.topk(3, dim=-1).indices
    assert torch.allclose(f.gather(-1, top), pre.gather(-1, top).relu())

    old_topk = saes.load(
        folder(
            "oldtopk",
            {
                "architecture": "topk",
                "d_in": 8,
                "d_sae": 20,
                "activation_fn_kwargs": {"k": 2},
                "hook_name": "blocks.0.ln2.hook_normalized",
            },
            base,
        )
    )
    assert old_topk.k == 2 and old_topk.site == "blocks.0.ln2_normalized"

    jr = saes.load(
        folder(
            "jr",
            {"architecture": "jumprelu", "d_in": 8, "d_sae": 20, "hook_name": "blocks.5.hook_resid_post"},
            {**base, "log_threshold": torch.zeros(20)},
        )
    )
    assert isinstance(jr, saes.JumpReLUSAE) and torch.equal(jr.threshold, torch.ones(20))

    with pytest.raises(SAEFileError, match="architecture 'gated' is not supported"):
        saes.load(folder("gated", {"architecture": "gated", "d_in": 8, "d_sae": 20}, base))
    with pytest.raises(SAEFileError, match="d_sae=21"):
        saes.load(folder("badcfg", {"architecture": "standard", "d_in": 8, "d_sae": 21}, base))
    with pytest.raises(SAEFileError, match="without 'k'"):
        saes.load(folder("nok", {"architecture": "topk", "d_in": 8, "d_sae": 20}, base))


# ------------------------------------------------------------------- sites
def test_saelens_apply_b_dec_to_input_default_is_saelens_own(tmp_path: Path) -> None:
    """A second check of the ``apply_b_dec_to_input`` default, against SAELens' own rule rather than a formula
    of ours: SAELens loads a ``cfg.json`` without the key as ``apply_b_dec_to_input=True``
    (``handle_config_defaulting``/``handle_pre_6_0_config`` call ``setdefault("apply_b_dec_to_input", True)``,
    and ``SAEConfig`` of 6.x defaults it to True), so ``b_dec`` is subtracted before encoding; an explicit
    ``false`` is honoured. Standard and JumpReLU folders (the other test's default case is TopK); our own
    ``save`` always writes the key, so its files never depend on the default."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(9)
    W_enc, W_dec = torch.randn(6, 10, generator=g), torch.randn(10, 6, generator=g)
    b_enc, b_dec = torch.randn(10, generator=g), 3 * torch.randn(6, generator=g)
    threshold = torch.rand(10, generator=g)
    x = torch.randn(5, 6, generator=g)
    pre = {True: (x - b_dec) @ W_enc + b_enc, False: x @ W_enc + b_enc}
    arches = {"standard": (lambda p: torch.relu(p), {}),
              "jumprelu": (lambda p: (p > threshold) * torch.relu(p), {"threshold": threshold})}
    for arch, (act, extra) in arches.items():
        for given in (None, True, False):
            cfg = {"architecture": arch, "d_in": 6, "d_sae": 10, "hook_name": "blocks.1.hook_resid_post"}
            if given is not None:
                cfg["apply_b_dec_to_input"] = given
            d = tmp_path / f"{arch}-{given}"
            d.mkdir()
            (d / "cfg.json").write_text(json.dumps(cfg))
            save_file({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec, **extra},
                      str(d / "sae_weights.safetensors"))
            sae = saes.load(d)
            want = True if given is None else given
            assert sae.apply_b_dec_to_input is want, (arch, given)
            torch.testing.assert_close(sae.encode(x), act(pre[want]), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(act(pre[True]), act(pre[False]), atol=1e-3)  # the setting matters here
            saved = json.loads((sae.save(tmp_path / f"saved-{arch}-{given}") / "cfg.json").read_text())
            assert saved["apply_b_dec_to_input"] is want


def test_site_aliases() -> None:
    cases = {
        "blocks.20.hook_resid_post": "blocks.20.resid_post",
        "blocks.3.hook_resid_pre": "blocks.3.resid_pre",
        "blocks.3.hook_resid_mid": "blocks.3.resid_mid",
        "blocks.4.attn.hook_z": "blocks.4.attn.z",
        "blocks.5.hook_mlp_out": "blocks.5.mlp_out",
        "blocks.6.hook_attn_out": "blocks.6.attn_out",
        "blocks.7.ln2.hook_normalized": "blocks.7.ln2_normalized",
        "blocks.7.mlp.hook_post": "blocks.7.mlp.post",
        "hook_embed": "embed",
        "blocks.2.resid_post": "blocks.2.resid_post",  # canonical names pass through
    }
    for hook, site in cases.items():
        assert site_from_hook_name(hook) == site
        if hook.startswith(("blocks.", "hook_")) and "hook" in hook:
            assert hook_name_from_site(site) == hook
    with pytest.warns(UserWarning, match="no canonical mishax-py site"):
        assert site_from_hook_name("blocks.1.ln1.hook_normalized") == "blocks.1.ln1.hook_normalized"
    assert hook_name_from_site("blocks.1.ln1") == "blocks.1.ln1"


def test_gemma_scope_site_inference() -> None:
    assert gemma_scope_sites("google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71") == (
        "blocks.20.resid_post",
        "blocks.20.resid_post",
    )
    assert gemma_scope_sites("google/gemma-scope-9b-pt-mlp/layer_3/width_131k/average_l0_9") == (
        "blocks.3.mlp_out",
        "blocks.3.mlp_out",
    )
    assert gemma_scope_sites("google/gemma-scope-2b-pt-att/layer_7/width_16k/average_l0_99") == (
        "blocks.7.attn.z",
        "blocks.7.attn.z",
    )
    assert gemma_scope_sites("google/gemma-scope-2b-pt-transcoders/layer_4/width_16k/average_l0_8") == (
        "blocks.4.ln2_normalized",
        "blocks.4.mlp_out",
    )
    assert gemma_scope_sites("google/gemma-scope-2b-pt-res/embedding/width_4k/average_l0_6") == (
        "embed",
        "embed",
    )
    assert gemma_scope_sites("/somewhere/else/params.npz") is None


def test_parse_hub_refs_and_canonical_table() -> None:
    r = parse_hub_ref("google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")
    assert (r.repo_id, r.kind, r.files) == (
        "google/gemma-scope-2b-pt-res",
        "npz",
        ("layer_20/width_16k/average_l0_71/params.npz",),
    )
    for ref in (
        "google/gemma-scope-2b-pt-res/layer_20/width_16k/canonical",
        "gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical",
        "hf://google/gemma-scope-2b-pt-res/layer_20/width_16k/canonical",
    ):
        r = parse_hub_ref(ref)
        assert r.repo_id == "google/gemma-scope-2b-pt-res"
        assert r.files == ("layer_20/width_16k/average_l0_71/params.npz",)
    r = parse_hub_ref("someone/my-saes/blocks.3.hook_resid_post")
    assert r.kind == "saelens"
    assert r.files == (
        "blocks.3.hook_resid_post/cfg.json",
        "blocks.3.hook_resid_post/sae_weights.safetensors",
    )
    with pytest.raises(ValueError, match="no canonical entry .*register_canonical"):
        parse_hub_ref("google/gemma-scope-2b-pt-transcoders/layer_3/width_16k/canonical")
    with pytest.raises(ValueError, match="no canonical entry"):  # a width without a canonical SAE at that layer
        parse_hub_ref("google/gemma-scope-2b-pt-res/layer_3/width_1m/canonical")
    assert parse_hub_ref("google/gemma-scope-9b-pt-att/layer_41/width_131k/canonical").files[0].startswith(
        "layer_41/width_131k/average_l0_")
    with pytest.raises(ValueError, match="owner/repo/path"):
        parse_hub_ref("google/gemma-scope-2b-pt-res")
    from saes.canonical import CANONICAL_L0, register_canonical

    register_canonical("google/gemma-scope-2b-pt-transcoders", 3, "16k", 55)
    try:
        assert parse_hub_ref("google/gemma-scope-2b-pt-transcoders/layer_3/width_16k/canonical").files == (
            "layer_3/width_16k/average_l0_55/params.npz",
        )
    finally:
        del CANONICAL_L0["google/gemma-scope-2b-pt-transcoders"]


def test_canonical_table_covers_every_layer() -> None:
    """Each pt release lists a canonical 16k SAE for every layer (2B: 26, 9B: 42), and its second width too."""
    from saes.canonical import CANONICAL_L0

    for size, n_layers, wide in (("2b", 26, "65k"), ("9b", 42, "131k")):
        for kind in ("res", "mlp", "att"):
            table = CANONICAL_L0[f"google/gemma-scope-{size}-pt-{kind}"]
            for width in ("16k", wide):
                assert {f"{L}/{width}" for L in range(n_layers)} <= set(table), (size, kind, width)
    for table in CANONICAL_L0.values():
        assert all(isinstance(n, int) and 1 <= n <= 1000 for n in table.values())


# --------------------------------------------------------------------- hub
@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """hf_hub_download replaced by a lookup in a local folder laid out like the hub cache."""
    calls: list[tuple[str, str]] = []
    root = tmp_path / "hub"

    def fake_download(repo_id: str, filename: str, **kwargs: object) -> str:
        calls.append((repo_id, filename))
        path = root / repo_id.replace("/", "--") / filename
        if not path.exists():
            raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id}/{filename} not found")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    p16 = gemma_scope_params(16, 40, seed=2)
    write_npz(root / "google--gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71/params.npz", p16)
    write_npz(root / "google--gemma-scope-2b-pt-mlp/layer_5/width_16k/average_l0_114/params.npz", p16)
    write_npz(root / "google--gemma-scope-2b-pt-att/layer_3/width_16k/average_l0_55/params.npz", p16)
    p_tc = dict(p16, W_dec=np.ones((40, 12), np.float32), b_dec=np.zeros(12, np.float32))
    write_npz(root / "google--gemma-scope-2b-pt-transcoders/layer_4/width_16k/average_l0_8/params.npz", p_tc)
    sae = saes.ReLUSAE(16, 40, site="blocks.2.resid_pre")
    sae.save(root / "someone--my-saes" / "blocks.2.hook_resid_pre")
    return calls


def test_hub_reference_end_to_end(fake_hub: list[tuple[str, str]]) -> None:
    sae = saes.load("google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")
    assert fake_hub[-1] == ("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71/params.npz")
    assert isinstance(sae, saes.JumpReLUSAE) and sae.site == "blocks.20.resid_post"
    assert sae.metadata["hub_ref"] == "google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71"

    canon = saes.load("google/gemma-scope-2b-pt-res/layer_20/width_16k/canonical")
    assert fake_hub[-1][1] == "layer_20/width_16k/average_l0_71/params.npz"
    assert torch.equal(canon.W_enc, sae.W_enc)

    assert saes.load("google/gemma-scope-2b-pt-mlp/layer_5/width_16k/canonical").site == "blocks.5.mlp_out"
    att = saes.load("google/gemma-scope-2b-pt-att/layer_3/width_16k/average_l0_55")
    assert att.site == "blocks.3.attn.z"
    assert att.encode(torch.randn(1, 2, 2, 8)).shape == (1, 2, 40)  # [.., head, d_head] flattened

    tc = saes.load("google/gemma-scope-2b-pt-transcoders/layer_4/width_16k/average_l0_8")
    assert isinstance(tc, saes.Transcoder)
    assert (tc.site, tc.output_site, tc.d_in, tc.d_out) == (
        "blocks.4.ln2_normalized",
        "blocks.4.mlp_out",
        16,
        12,
    )

    over = saes.load(
        "google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71", site="blocks.20.resid_mid"
    )
    assert over.site == "blocks.20.resid_mid"

    sl = saes.load("someone/my-saes/blocks.2.hook_resid_pre")
    assert isinstance(sl, saes.ReLUSAE) and sl.site == "blocks.2.resid_pre"
    assert fake_hub[-2:] == [
        ("someone/my-saes", "blocks.2.hook_resid_pre/cfg.json"),
        ("someone/my-saes", "blocks.2.hook_resid_pre/sae_weights.safetensors"),
    ]

    with pytest.raises(
        SAEFetchError, match="gemma-scope-2b-pt-res.*layer_1/width_16k/average_l0_9/params.npz"
    ):
        saes.load("google/gemma-scope-2b-pt-res/layer_1/width_16k/average_l0_9")


def test_offline_hub_reference_names_repo_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real hf_hub_download, forced offline with an empty cache: a clear error, no download."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(SAEFetchError) as e:
        saes.load("google/gemma-scope-2b-pt-res/layer_20/width_16k/canonical")
    msg = str(e.value)
    assert "'google/gemma-scope-2b-pt-res'" in msg
    assert "layer_20/width_16k/average_l0_71/params.npz" in msg
    assert "offline" in msg and "hf download" in msg and "huggingface-cli" not in msg
    with pytest.raises(FileNotFoundError, match="no such SAE file"):
        saes.load(tmp_path / "does-not-exist.npz")
    with pytest.raises(FileNotFoundError, match="neither an existing local path nor a hub reference"):
        saes.load("my_sae_folder")


# ---------------------------------------------------------------- bad files
def test_bad_npz_files_raise_clear_errors(tmp_path: Path) -> None:
    good = gemma_scope_params(8, 12, seed=3)

    missing = write_npz(tmp_path / "missing.npz", {k: v for k, v in good.items() if k != "threshold"})
    with pytest.raises(SAEFileError, match=r"missing\.npz: missing key\(s\) \['threshold'\]"):
        saes.load(missing)

    wrong = write_npz(tmp_path / "wrong.npz", dict(good, b_enc=np.zeros(13, np.float32)))
    with pytest.raises(SAEFileError, match=r"wrong\.npz: key 'b_enc' has shape \(13,\), expected \[12\]"):
        saes.load(wrong)
    wrong_dec = write_npz(tmp_path / "wrongdec.npz", dict(good, W_dec=np.zeros((12, 9), np.float32)))
    with pytest.raises(SAEFileError, match=r"key 'W_dec' has shape \(12, 9\), expected \[12, 8\]"):
        saes.load(wrong_dec)

    bad = dict(good)
    bad["W_enc"] = good["W_enc"].copy()
    bad["W_enc"][0, 0] = np.nan
    with pytest.raises(
        SAEFileError, match=r"nan\.npz: key 'W_enc' \(shape \(8, 12\)\) has 1 non-finite value\(s\) \(1 NaN"
    ):
        saes.load(write_npz(tmp_path / "nan.npz", bad))

    full = write_npz(tmp_path / "full.npz", good).read_bytes()
    for cut in (len(full) // 2, len(full) - 40, 30):
        trunc = tmp_path / f"trunc{cut}.npz"
        trunc.write_bytes(full[:cut])
        with pytest.raises(SAEFileError, match=rf"trunc{cut}\.npz.*(truncated|corrupt)"):
            saes.load(trunc)

    obj = tmp_path / "obj.npz"
    np.savez(obj, **dict(good, threshold=np.array([{"evil": 1}], dtype=object)))
    with pytest.raises(SAEFileError, match=r"obj\.npz: key 'threshold' holds a pickled object array"):
        saes.load(obj)

    ints = write_npz(tmp_path / "ints.npz", dict(good, b_dec=np.zeros(8, np.int64)))
    with pytest.raises(SAEFileError, match="key 'b_dec' has dtype torch.int64"):
        saes.load(ints)


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(_Boom.target),))

    target: Path = Path("/nonexistent")


def test_pickle_payloads_never_execute(tmp_path: Path) -> None:
    """A pickled payload disguised as an npz member or as the whole file is refused, not run."""
    _Boom.target = tmp_path / "PWNED"
    good = gemma_scope_params(8, 12, seed=4)
    path = tmp_path / "evil.npz"
    np.savez(path, **good, threshold2=np.array([_Boom()], dtype=object))  # a pickled member
    payload = pickle.dumps(_Boom())
    sae = None
    with pytest.raises(SAEFileError, match="threshold2.*pickled object"):
        sae = saes.load(path)
    assert sae is None and not _Boom.target.exists()

    raw = tmp_path / "raw.npz"
    raw.write_bytes(payload)
    with pytest.raises(SAEFileError, match=r"raw\.npz: holds pickled data"):
        saes.load(raw)
    assert not _Boom.target.exists()


def test_bad_saelens_files(tmp_path: Path) -> None:
    sae = saes.JumpReLUSAE(8, 12, site="blocks.0.resid_post")
    folder = sae.save(tmp_path / "ok")
    weights = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(SAEFileError, match=r"sae_weights\.safetensors: not a readable safetensors file"):
        saes.load(folder)

    folder2 = sae.save(tmp_path / "cfg")
    (folder2 / "cfg.json").write_text('{"architecture": "jumprelu", "d_in": ')
    with pytest.raises(SAEFileError, match=r"cfg\.json: invalid JSON"):
        saes.load(folder2)

    from safetensors.torch import save_file

    folder3 = sae.save(tmp_path / "nan")
    tensors = {n: p.detach().clone() for n, p in sae.named_parameters()}
    tensors["b_dec"][3] = float("inf")
    save_file(tensors, str(folder3 / "sae_weights.safetensors"))
    with pytest.raises(
        SAEFileError, match=r"key 'b_dec' \(shape \(8,\)\) has 1 non-finite value\(s\) \(0 NaN, 1 inf\)"
    ):
        saes.load(folder3)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(SAEFileError, match=r"neither a SAELens pair .* contains \['notes.txt'\]"):
        saes.load(tmp_path / "empty")


# ------------------------------------------------------- cfg.json value types
def _topk_folder(tmp_path: Path, name: str, **cfg_changes: object) -> Path:
    """A TopK SAELens folder (d_in 8, d_sae 12, k 3) whose cfg.json gets ``cfg_changes``
    (``None`` deletes a key)."""
    folder = saes.TopKSAE(8, 12, k=3, site="blocks.0.resid_post").save(tmp_path / name)
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in cfg_changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(
    ("key", "value", "expected", "shown"),
    [
        ("apply_b_dec_to_input", "false", "boolean", '"false"'),
        ("apply_b_dec_to_input", 0, "boolean", "0"),
        ("k", 3.7, "positive integer", "3.7"),
        ("k", True, "positive integer", "true"),
        ("k", "3", "positive integer", '"3"'),
        ("k", 0, "positive integer", "0"),
        ("hook_name", 123, "string", "123"),
        ("mishax_site", ["blocks.0.resid_post"], "string", r'\["blocks.0.resid_post"\]'),
        ("d_in", "abc", "integer", '"abc"'),
        ("d_sae", 12.0, "integer", "12.0"),
        ("d_in", False, "integer", "false"),
        ("architecture", 5, "string", "5"),
        ("normalize_activations", 1, "string", "1"),
        ("metadata", "x", "object", '"x"'),
        ("activation_fn_kwargs", [3], "object", r"\[3\]"),
        ("model_name", 7, "string", "7"),
    ],
)
def test_saelens_cfg_values_of_the_wrong_type(
    tmp_path: Path, key: str, value: object, expected: str, shown: str
) -> None:
    """A cfg.json value of the wrong JSON type is a SAEFileError naming the file, the key, the expected
    type and the value (before: ``"false"`` loaded as True, ``3.7`` as 3, others raised bare
    TypeError/ValueError without the file)."""
    folder = _topk_folder(tmp_path, "bad", **{key: value})
    with pytest.raises(SAEFileError, match=rf"bad/cfg\.json: key '{key}' must be a JSON {expected}.*got {shown}"):
        saes.load(folder)


def test_saelens_cfg_nested_values_of_the_wrong_type(tmp_path: Path) -> None:
    folder = _topk_folder(tmp_path, "nested", k=None, activation_fn_kwargs={"k": 2.5})
    with pytest.raises(SAEFileError, match=r"key 'activation_fn_kwargs\.k' must be a JSON positive integer.*got 2\.5"):
        saes.load(folder)
    folder = _topk_folder(tmp_path, "meta", hook_name=None, mishax_site=None, metadata={"hook_name": 4})
    with pytest.raises(SAEFileError, match=r"key 'metadata\.hook_name' must be a JSON string.*got 4"):
        saes.load(folder)
    tc = saes.Transcoder(8, 12, site="blocks.0.ln2_normalized", output_site="blocks.0.mlp_out")
    tc_folder = tc.save(tmp_path / "tc")
    for key, value in (("d_out", "8"), ("activation", 1), ("mishax_output_site", 2), ("hook_name_out", False)):
        cfg = json.loads((tc_folder / "cfg.json").read_text())
        (tc_folder / "cfg.json").write_text(json.dumps(dict(cfg, **{key: value})))
        with pytest.raises(SAEFileError, match=rf"tc/cfg\.json: key '{key}' must be a JSON"):
            saes.load(tc_folder)
        (tc_folder / "cfg.json").write_text(json.dumps(cfg))
    # null means "not given"; JSON values of the right type load as before
    ok = saes.load(_topk_folder(tmp_path, "nulls", apply_b_dec_to_input=None, normalize_activations=None))
    assert isinstance(ok, saes.TopKSAE) and ok.k == 3 and ok.apply_b_dec_to_input is True  # SAELens' default


# ---------------------------------------------------------------- npz bombs
def write_zero_bomb(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """An ``.npz`` of float32 zero arrays of ``shapes``, written without ever holding one in memory.

    Each member is a raw-deflate stream built from one compressed 16 MiB block of zeros repeated
    (each block ends in a full flush, so copies concatenate into a valid stream); the zip file is
    written by hand (members under 4 GiB, no zip64). A GiB of zeros takes about 1 MB on disk.
    """
    import struct
    import zlib

    chunk = 16 << 20
    zeros = bytes(chunk)
    out = bytearray()
    central = bytearray()
    for name, shape in shapes.items():
        header = _npy_header(shape)
        payload = int(np.prod(shape)) * 4
        comp = zlib.compressobj(9, zlib.DEFLATED, -15)
        data = bytearray(comp.compress(header) + comp.flush(zlib.Z_FULL_FLUSH))
        block = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
        crc = zlib.crc32(header)
        n_full, rest = divmod(payload, chunk)
        data += block * n_full
        for _ in range(n_full):
            crc = zlib.crc32(zeros, crc)
        data += comp.compress(bytes(rest)) + comp.flush()
        crc = zlib.crc32(bytes(rest), crc)
        size = len(header) + payload
        fname = (name + ".npy").encode()
        offset = len(out)
        out += struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, 8, 0, 33, crc, len(data), size, len(fname), 0)
        out += fname + data
        central += struct.pack(
            "<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, 8, 0, 33, crc, len(data), size, len(fname),
            0, 0, 0, 0, 0o644 << 16, offset,
        )  # fmt: skip
        central += fname
    out += central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(shapes), len(shapes), len(central),
                                 len(out), 0)  # fmt: skip
    path.write_bytes(out)
    return path


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` (version 1.0) header of a little-endian float32 C-order array of ``shape``."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_zero_bomb_helper_writes_a_valid_npz(tmp_path: Path) -> None:
    path = write_zero_bomb(tmp_path / "small.npz", {"a": (3, 5), "b": ((1 << 22) + 7,)})
    with np.load(path) as npz:
        assert npz["a"].shape == (3, 5) and not npz["a"].any()
        assert npz["b"].shape == ((1 << 22) + 7,) and not npz["b"].any()


_BOMB_CHILD = """
import resource, sys
import saes
from saes.formats import SAEFileError
for path in sys.argv[1:]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        saes.load(path)
        print("LOADED")
    except SAEFileError as e:
        print("SAEFileError:", e)
    except Exception as e:
        print("OTHER:", type(e).__name__, e)
    print("RSS_DELTA_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, flush=True)
"""

# One member far larger than the others say it can be: refused from the .npy headers.
_INCONSISTENT_BOMB = (
    {"W_enc": (8, 12), "W_dec": (12, 8), "b_enc": (12,), "b_dec": (8,), "threshold": (1 << 28,)},
    r"bomb0\.npz: key 'threshold' has shape \(268435456,\), expected \[12\]",
)
# Every member consistent, but 2.25 GiB of zeros in 2.3 MB: refused from the zip headers.
_CONSISTENT_BOMB = (
    {"W_enc": (8, 1 << 25), "W_dec": (1 << 25, 8), "b_enc": (1 << 25,), "b_dec": (8,), "threshold": (1 << 25,)},
    r"bomb1\.npz: member 'W_enc\.npy' would decompress to 1073741952 bytes from \d+",
)


def test_npz_bombs_are_refused_before_decompressing(tmp_path: Path) -> None:
    """An npz whose members decompress to gigabytes is refused from its headers: the error names the
    file, member and size, and the loading process's peak RSS grows by less than 100 MB (before: it
    decompressed 0.8-2 GiB before a shape check failed, or loaded the 2.25 GiB)."""
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    bombs = [_INCONSISTENT_BOMB, _CONSISTENT_BOMB]
    paths = [str(write_zero_bomb(tmp_path / f"bomb{i}.npz", shapes)) for i, (shapes, _) in enumerate(bombs)]
    assert all(Path(p).stat().st_size < 4 << 20 for p in paths)
    proc = subprocess.run(
        [sys.executable, "-c", _BOMB_CHILD, *paths], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
    )
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout.strip())
    reports = proc.stdout.strip().split("RSS_DELTA_KB")
    for (_, message), report, tail in zip(bombs, reports, reports[1:], strict=False):
        delta_mb = int(tail.split()[0]) / 1024
        assert "SAEFileError:" in report and re.search(message, report), report
        assert delta_mb < 100, f"peak RSS grew by {delta_mb:.0f} MB while refusing {message}"


# ------------------------------------------------------ FIFOs and devices
def _within(seconds: float, fn: Callable[[], object], unblock: Sequence[Path] = ()) -> object:
    """``fn()``'s exception (or result) within ``seconds``; a hang fails the test (FIFOs in ``unblock`` are
    then opened for writing so the stuck thread can finish)."""
    import os
    import threading

    box: list[object] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        for fifo in unblock:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        pytest.fail(f"{fn} hung for {seconds} s")
    return box[0]


def test_fifo_and_device_paths_are_refused_at_once(tmp_path: Path) -> None:
    """An SAE path that is a FIFO or a device (directly, or as a file inside an SAE folder, or through a
    symlink) is a SAEFileError naming the path and what it is, without opening it (before:
    NotADirectoryError or a FileNotFoundError for a path that exists)."""
    import os

    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    npz_dir = tmp_path / "npzdir"
    npz_dir.mkdir()
    os.mkfifo(npz_dir / "params.npz")
    lens_dir = saes.JumpReLUSAE(8, 12).save(tmp_path / "lens")
    (lens_dir / "cfg.json").unlink()
    os.mkfifo(lens_dir / "cfg.json")
    link_dir = tmp_path / "linkdir"
    link_dir.mkdir()
    (link_dir / "params.npz").symlink_to("/dev/zero")
    fifos = [fifo, npz_dir / "params.npz", lens_dir / "cfg.json"]
    cases = [
        (fifo, r"pipe\.npz: is a FIFO"),
        (npz_dir, r"npzdir/params\.npz: is a FIFO"),
        (lens_dir, r"lens/cfg\.json: is a FIFO"),
        (lens_dir / "sae_weights.safetensors", r"lens/cfg\.json: is a FIFO"),
        (Path("/dev/zero"), r"/dev/zero: is a character device"),
        (link_dir, r"linkdir/params\.npz: is a character device"),
    ]
    for ref, message in cases:
        err = _within(20, lambda ref=ref: saes.load(ref), unblock=fifos)
        assert isinstance(err, SAEFileError) and re.search(message, str(err)), (ref, err)
        assert "not a regular file" in str(err)
    for err in (_within(20, lambda: load_npz(fifo), fifos), _within(20, lambda: load_saelens(lens_dir), fifos)):
        assert isinstance(err, SAEFileError), err
