"""The SAEs and transcoders shipped with the bundled tiny Gemma 2 (``mishax_py.zoo.load_saes``).

They are loaded through the real Gemma Scope loader (``saes.load`` on ``params.npz``) and
their registry claims (L0, FVU <= 0.2) are re-measured on fresh task prompts drawn from
seeds neither training nor the registry's held-out set used.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

import saes
from mishax_py.zoo import tasks
from mishax_py.zoo.saes import has_saes, load_saes, sae_dir, sae_registry
from tests.helpers import BUNDLED

pytestmark = [
    pytest.mark.skipif(not BUNDLED or not has_saes("gemma2-tiny"),
                       reason="bundled gemma2-tiny weights or its SAEs are not in this build"),
    pytest.mark.usefixtures("one_thread"),  # small CPU ops: see conftest.one_thread
]

FRESH_SEED = 424_242  # not used by scripts/train_tiny_saes.py (train/held-out) nor the model's training
FVU_MAX = 0.2


@pytest.fixture(scope="module")
def registry() -> dict:
    return sae_registry("gemma2-tiny")


@pytest.fixture(scope="module")
def fresh(zoo_im) -> dict:
    """Fresh mixed task prompts and every shipped SAE's sites cached on them (BOS dropped)."""
    g = torch.Generator().manual_seed(FRESH_SEED)
    batches = [
        tasks.induction_batch(32, seq_len=int(torch.randint(4, 25, (1,), generator=g)), generator=g),
        tasks.recall_batch(32, n_pairs=int(torch.randint(2, 25, (1,), generator=g)), generator=g),
        tasks.induction_batch(32, seq_len=int(torch.randint(4, 25, (1,), generator=g)), generator=g),
        tasks.recall_batch(32, n_pairs=int(torch.randint(2, 25, (1,), generator=g)), generator=g),
    ]
    sites = sorted({s for e in sae_registry("gemma2-tiny")["saes"] for s in (e["site"], e["output_site"])})
    acts: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    with torch.no_grad():
        for b in batches:
            _, cache = zoo_im.run_with_cache(b.input_ids, sites=sites)
            for s in sites:
                acts[s].append(cache[s][:, 1:].reshape(-1, cache[s].shape[-1]))
    return {"batches": batches, "acts": {s: torch.cat(v) for s, v in acts.items()}}


def test_registry_lists_residual_saes_and_a_transcoder_with_their_numbers(registry: dict) -> None:
    entries = registry["saes"]
    res = [e for e in entries if e["kind"] == "sae"]
    tcs = [e for e in entries if e["kind"] == "transcoder"]
    assert len({e["site"] for e in res}) >= 2, "residual SAEs on at least two layers"
    assert all(e["site"].endswith(".resid_post") for e in res)
    assert tcs and all(e["site"].endswith(".ln2_normalized") and e["output_site"].endswith(".mlp_out") for e in tcs)
    for e in entries:
        assert 256 <= e["d_sae"] <= 2048
        assert e["fvu"] <= FVU_MAX, f"{e['name']}: FVU {e['fvu']:.3f} at L0 {e['l0']:.1f}"
        assert 0 < e["l0"] < e["d_sae"] / 4
        for key in ("delta_lm_loss", "lm_loss_clean", "lm_loss_spliced"):
            assert math.isfinite(e[key]), (e["name"], key)
        assert e["lm_loss_spliced"] - e["lm_loss_clean"] == pytest.approx(e["delta_lm_loss"])


def test_files_are_gemma_scope_npz_small_and_match_their_hashes(registry: dict) -> None:
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


def test_load_saes_goes_through_the_gemma_scope_loader(registry: dict) -> None:
    loaded = load_saes("gemma2-tiny")
    assert list(loaded) == [e["name"] for e in registry["saes"]]
    for e in registry["saes"]:
        sae = loaded[e["name"]]
        assert sae.metadata["format"] == "gemma_scope_npz"
        assert sae.site == e["site"] and sae.output_site == e["output_site"]
        assert isinstance(sae, saes.Transcoder if e["kind"] == "transcoder" else saes.JumpReLUSAE)
        assert sae.d_sae == e["d_sae"]
        direct = saes.load(sae_dir("gemma2-tiny") / e["path"], site=e["site"], output_site=e["output_site"])
        assert torch.equal(direct.W_enc, sae.W_enc) and torch.equal(direct.threshold, sae.threshold)
    assert list(load_saes("gemma2-tiny", kind="transcoder")) == [e["name"] for e in registry["saes"]
                                                                  if e["kind"] == "transcoder"]  # fmt: skip
    with pytest.raises(KeyError, match="available"):
        load_saes("gemma2-tiny", names=["nope"])
    with pytest.raises(KeyError, match="gemma2-tiny"):
        load_saes("gemma2-huge")


def test_fvu_and_l0_claims_hold_on_fresh_task_data(registry: dict, fresh: dict) -> None:
    """Re-measure every SAE's L0 and FVU on prompts it has never seen: FVU <= 0.2, L0 near the claim."""
    loaded = load_saes("gemma2-tiny")
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


def test_splicing_keeps_the_tasks_working(zoo_im, registry: dict, fresh: dict) -> None:
    """Replacing a site by the reconstruction (no error term) costs little task loss on fresh prompts."""
    loaded = load_saes("gemma2-tiny")
    batch = fresh["batches"][0]
    with torch.no_grad():
        clean = zoo_im.run(batch.input_ids)
    mask = batch.target_mask
    targets = batch.targets

    def loss(logits: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(logits[mask].float(), targets[mask]))

    base = loss(clean)
    for e in registry["saes"]:
        with torch.no_grad():
            spliced = zoo_im.run(batch.input_ids, interventions=saes.splice(loaded[e["name"]], keep_error=False))
        delta = loss(spliced) - base
        assert delta <= max(0.5, 3 * abs(e["delta_lm_loss"]) + 0.1), (e["name"], delta, e["delta_lm_loss"])
