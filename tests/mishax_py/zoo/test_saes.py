"""The SAEs and transcoders shipped with the bundled tiny models (``mishax_py.zoo.load_saes``).

gemma2-tiny's are loaded through the real Gemma Scope loader (``saes.load`` on ``params.npz``),
gemma3-tiny's through the Gemma Scope 2 loader (``config.json`` + ``params.safetensors`` folders,
sites inferred from the hook points); every registry claim (L0, FVU <= 0.2) is re-measured on fresh
task prompts drawn from seeds neither training nor the registry's held-out set used.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

import saes
from mishax_py.zoo import tasks
from mishax_py.zoo.models import model_path
from mishax_py.zoo.saes import has_saes, load_saes, sae_dir, sae_registry
from tests.helpers import BUNDLED

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops: see conftest.one_thread

FRESH_SEED = 424_242  # not used by scripts/train_tiny_saes.py (train/held-out) nor the model's training
FVU_MAX = 0.2
# what each bundled model's transcoders read (Gemma Scope: the normalised input; Gemma Scope 2: the norm's output)
TC_INPUT = {"gemma2-tiny": "ln2_normalized", "gemma3-tiny": "ln2"}
FORMAT = {"gemma2-tiny": "gemma_scope_npz", "gemma3-tiny": "gemma_scope_2"}


def _available(model: str) -> bool:
    return (model_path(model) / "model.safetensors").is_file() and has_saes(model)


needs_g2 = pytest.mark.skipif(not BUNDLED or not has_saes("gemma2-tiny"),
                              reason="bundled gemma2-tiny weights or its SAEs are not in this build")
needs_g3 = pytest.mark.skipif(not _available("gemma3-tiny"),
                              reason="bundled gemma3-tiny weights or its SAEs are not in this build")


@pytest.fixture(scope="module", params=["gemma2-tiny", "gemma3-tiny"])
def model(request: pytest.FixtureRequest) -> str:
    """Each bundled model with SAEs (skipped where its weights or SAEs are not in this build)."""
    if not _available(request.param):
        pytest.skip(f"bundled {request.param} weights or its SAEs are not in this build")
    return str(request.param)


@pytest.fixture(scope="module")
def registry(model: str) -> dict:
    return sae_registry(model)


@pytest.fixture(scope="module")
def im(model: str):
    """The bundled model, instrumented by its family (``mishax_py.zoo.models.instrument``)."""
    from mishax_py.zoo import load
    from mishax_py.zoo.models import instrument

    return instrument(load(model)[0])


@pytest.fixture(scope="module")
def fresh(model: str, im) -> dict:
    """Fresh mixed task prompts and every shipped SAE's sites cached on them (BOS dropped)."""
    g = torch.Generator().manual_seed(FRESH_SEED)
    batches = [
        tasks.induction_batch(32, seq_len=int(torch.randint(4, 25, (1,), generator=g)), generator=g),
        tasks.recall_batch(32, n_pairs=int(torch.randint(2, 25, (1,), generator=g)), generator=g),
        tasks.induction_batch(32, seq_len=int(torch.randint(4, 25, (1,), generator=g)), generator=g),
        tasks.recall_batch(32, n_pairs=int(torch.randint(2, 25, (1,), generator=g)), generator=g),
    ]
    sites = sorted({s for e in sae_registry(model)["saes"] for s in (e["site"], e["output_site"])})
    acts: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    with torch.no_grad():
        for b in batches:
            _, cache = im.run_with_cache(b.input_ids, sites=sites)
            for s in sites:
                acts[s].append(cache[s][:, 1:].reshape(-1, cache[s].shape[-1]))
    return {"batches": batches, "acts": {s: torch.cat(v) for s, v in acts.items()}}


def test_registry_lists_residual_saes_and_a_transcoder_with_their_numbers(model: str, registry: dict) -> None:
    entries = registry["saes"]
    assert registry["model"] == model and registry["format"] == FORMAT[model]
    res = [e for e in entries if e["kind"] == "sae"]
    tcs = [e for e in entries if e["kind"] == "transcoder"]
    assert len({e["site"] for e in res}) >= 2, "residual SAEs on at least two layers"
    assert all(e["site"].endswith(".resid_post") for e in res)
    assert tcs and all(e["site"].endswith(f".{TC_INPUT[model]}") and e["output_site"].endswith(".mlp_out")
                       for e in tcs)  # fmt: skip
    for e in entries:
        assert 256 <= e["d_sae"] <= 2048
        assert e["fvu"] <= FVU_MAX, f"{e['name']}: FVU {e['fvu']:.3f} at L0 {e['l0']:.1f}"
        assert 0 < e["l0"] < e["d_sae"] / 4
        for key in ("delta_lm_loss", "lm_loss_clean", "lm_loss_spliced"):
            assert math.isfinite(e[key]), (e["name"], key)
        assert e["lm_loss_spliced"] - e["lm_loss_clean"] == pytest.approx(e["delta_lm_loss"])


@needs_g2
def test_files_are_gemma_scope_npz_small_and_match_their_hashes() -> None:
    registry = sae_registry("gemma2-tiny")
    total = 0
    for e in registry["saes"]:
        path = sae_dir("gemma2-tiny") / e["path"]
        assert path.name == "params.npz"
        data = path.read_bytes()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == e["sha256"], e["name"]
        with np.load(path, allow_pickle=False) as npz:
            assert sorted(npz.files) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
            assert all(npz[k].dtype == np.float32 for k in npz.files)
            assert npz["W_enc"].shape == (e["d_in"], e["d_sae"])
            assert npz["W_dec"].shape[0] == e["d_sae"]
    assert total <= 10 * 2**20, f"shipped SAEs take {total / 2**20:.1f} MiB"


@needs_g3
def test_gemma3_files_are_gemma_scope_2_folders_small_and_match_their_hashes() -> None:
    """gemma3-tiny's SAEs in Gemma Scope 2's layout: ``{resid_post|transcoder}/layer_L_width_W_l0_small/`` with
    ``params.safetensors`` (the release's five lower-case keys, float32) and ``config.json`` whose hook points
    name the transformers modules the site reads and writes; ``saes.load`` on the bare folder infers the sites."""
    import json

    from safetensors.torch import load_file

    from saes.gemma_scope_2 import parse_folder

    registry = sae_registry("gemma3-tiny")
    hooks = {"resid_post": "model.layers.{}.output", "ln2": "model.layers.{}.pre_feedforward_layernorm.output",
             "mlp_out": "model.layers.{}.post_feedforward_layernorm.output"}  # fmt: skip
    total = 0
    for e in registry["saes"]:
        folder = sae_dir("gemma3-tiny") / e["path"]
        parsed = parse_folder(e["path"])
        layer = int(e["site"].split(".")[1])
        assert parsed is not None and parsed.kind == ("transcoder" if e["kind"] == "transcoder" else "resid_post")
        assert (parsed.layer, parsed.width, parsed.affine) == (layer, str(e["d_sae"]), False), e["path"]
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "params.safetensors"]
        data = (folder / "params.safetensors").read_bytes()
        total += len(data) + (folder / "config.json").stat().st_size
        assert hashlib.sha256(data).hexdigest() == e["sha256"], e["name"]
        params = load_file(str(folder / "params.safetensors"))
        assert sorted(params) == ["b_dec", "b_enc", "threshold", "w_dec", "w_enc"]
        assert all(t.dtype == torch.float32 for t in params.values())
        assert params["w_enc"].shape == (e["d_in"], e["d_sae"]) and params["w_dec"].shape[0] == e["d_sae"]
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["architecture"] == "jump_relu" and cfg["affine_connection"] is False and cfg["width"] == e["d_sae"]
        kind_in, kind_out = e["site"].split(".", 2)[2], e["output_site"].split(".", 2)[2]
        assert (cfg["hf_hook_point_in"], cfg["hf_hook_point_out"]) == (hooks[kind_in].format(layer),
                                                                       hooks[kind_out].format(layer))
        bare = saes.load(folder)  # no site given: from the hook points
        assert (bare.site, bare.output_site) == (e["site"], e["output_site"])
        assert bare.metadata["format"] == "gemma_scope_2"
    assert total <= 4 * 2**20, f"shipped gemma3-tiny SAEs take {total / 2**20:.1f} MiB"


def test_load_saes_goes_through_the_real_loader(model: str, registry: dict) -> None:
    loaded = load_saes(model)
    assert list(loaded) == [e["name"] for e in registry["saes"]]
    for e in registry["saes"]:
        sae = loaded[e["name"]]
        assert sae.metadata["format"] == FORMAT[model]
        assert sae.site == e["site"] and sae.output_site == e["output_site"]
        assert isinstance(sae, saes.Transcoder if e["kind"] == "transcoder" else saes.JumpReLUSAE)
        assert sae.d_sae == e["d_sae"]
        direct = saes.load(sae_dir(model) / e["path"], site=e["site"], output_site=e["output_site"])
        assert torch.equal(direct.W_enc, sae.W_enc) and torch.equal(direct.threshold, sae.threshold)
    assert list(load_saes(model, kind="transcoder")) == [e["name"] for e in registry["saes"]
                                                          if e["kind"] == "transcoder"]  # fmt: skip
    with pytest.raises(KeyError, match="available"):
        load_saes(model, names=["nope"])
    with pytest.raises(KeyError, match="gemma2-tiny"):
        load_saes("gemma2-huge")


def test_fvu_and_l0_claims_hold_on_fresh_task_data(model: str, registry: dict, fresh: dict) -> None:
    """Re-measure every SAE's L0 and FVU on prompts it has never seen: FVU <= 0.2, L0 near the claim."""
    loaded = load_saes(model)
    for e in registry["saes"]:
        sae = loaded[e["name"]]
        x = fresh["acts"][e["site"]]
        y = fresh["acts"][e["output_site"]]
        with torch.no_grad():
            f = sae.encode(x)
            y_hat = sae.decode(f)
        l0 = float((f != 0).sum(-1).float().mean())
        fvu = float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        assert fvu <= FVU_MAX, f"{e['name']}: fresh FVU {fvu:.3f} (registry {e['fvu']:.3f})"
        assert abs(fvu - e["fvu"]) <= 0.05, (e["name"], fvu, e["fvu"])
        assert l0 == pytest.approx(e["l0"], rel=0.25), (e["name"], l0, e["l0"])


def test_splicing_keeps_the_tasks_working(model: str, im, registry: dict, fresh: dict) -> None:
    """Replacing a site by the reconstruction (no error term) costs little task loss on fresh prompts."""
    loaded = load_saes(model)
    batch = fresh["batches"][0]
    with torch.no_grad():
        clean = im.run(batch.input_ids)
    mask = batch.target_mask
    targets = batch.targets

    def loss(logits: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(logits[mask].float(), targets[mask]))

    base = loss(clean)
    for e in registry["saes"]:
        with torch.no_grad():
            spliced = im.run(batch.input_ids, interventions=saes.splice(loaded[e["name"]], keep_error=False))
        delta = loss(spliced) - base
        assert delta <= max(0.5, 3 * abs(e["delta_lm_loss"]) + 0.1), (e["name"], delta, e["delta_lm_loss"])
