"""The family boundary, proven by a second, non-Hugging-Face family (``toy_family.py`` beside this file).

Each check compares the library's answer on the toy model with an independent computation:
the plain model, a hand-written loop of single runs, or a formula written out.
"""

from __future__ import annotations

import torch

from mishax_py.family import ModelFamily
from mishax_py.interventions import Ablate, Hook, Patch, Steer
from mishax_py.studies import activation_patching, attribution_patching
from tests.mishax_py.toy_family import instrument_toy, make_toy

MODEL = make_toy()
IM = instrument_toy(MODEL)
CLEAN = torch.tensor([[1, 5, 7, 3, 9, 2], [4, 4, 8, 1, 6, 2]])
CORRUPT = torch.tensor([[1, 5, 11, 3, 9, 2], [4, 13, 8, 1, 6, 2]])


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 3] - logits[:, -1, 7]).mean()


def test_the_toy_family_implements_the_protocol() -> None:
    assert isinstance(IM.family, ModelFamily)
    assert IM.n_layers == 2 and "toy" in repr(IM)
    assert IM.site_info("blocks.1.attn.hook_z").name == "blocks.1.attn.z"


def test_run_and_cache_equal_the_plain_model() -> None:
    plain = MODEL(input_ids=CLEAN).logits
    assert torch.equal(IM.run(CLEAN), plain)
    logits, cache = IM.run_with_cache(CLEAN)
    assert torch.equal(logits, plain)
    assert list(cache.keys()) == IM.site_names()  # every site fired, once, in forward order
    # the pattern is the softmax of q.k / sqrt(d_head), causally masked, written out
    q, k = cache["blocks.1.attn.q"], cache["blocks.1.attn.k"]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8 ** 0.5
    scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(cache["blocks.1.attn.pattern"], scores.softmax(-1))
    torch.testing.assert_close(cache["blocks.0.resid_post"], cache["blocks.1.resid_pre"], rtol=0, atol=0)


def test_interventions_edit_what_they_select() -> None:
    _, clean = IM.run_with_cache(CLEAN)
    vector = torch.randn(16)
    edits = {"blocks.0.attn.z": Ablate(heads=[1]), "blocks.1.resid_pre": Patch(clean, positions=[2]),
             "blocks.1.resid_post": Steer(vector, scale=2.0, positions=[5])}

    _, cache = IM.run_with_cache(CORRUPT, interventions=edits)
    _, plain = IM.run_with_cache(CORRUPT, sites=["blocks.0.attn.z"])
    assert torch.equal(cache["blocks.0.attn.z"][:, :, 1], torch.zeros_like(cache["blocks.0.attn.z"][:, :, 1]))
    assert torch.equal(cache["blocks.0.attn.z"][:, :, 0], plain["blocks.0.attn.z"][:, :, 0])
    assert torch.equal(cache["blocks.1.resid_pre"][:, 2], clean["blocks.1.resid_pre"][:, 2])

    def steer(value: torch.Tensor) -> torch.Tensor:
        out = value.clone()
        out[:, 5] += 2.0 * vector
        return out

    hand = IM.run(CORRUPT, interventions={**edits, "blocks.1.resid_post": Hook(steer)})
    torch.testing.assert_close(IM.run(CORRUPT, interventions=edits), hand)


def test_sweep_equals_each_variant_alone() -> None:
    variants = [{"blocks.0.attn.z": Ablate(heads=[h])} for h in range(2)] + [{"blocks.1.mlp_out": Ablate()}]
    swept = torch.as_tensor(IM.sweep(CLEAN, variants, metric=logit_diff))
    alone = torch.stack([logit_diff(IM.run(CLEAN, interventions=v)) for v in variants])
    torch.testing.assert_close(swept.reshape(-1), alone, rtol=1e-5, atol=1e-5)


def test_walk_visits_every_site_and_replaces() -> None:
    _, cache = IM.run_with_cache(CLEAN)
    seen: list[str] = []
    with IM.walk(CLEAN) as w:
        for site, value in w:
            if "blocks.0.mlp_out" not in seen:  # values equal the plain run's until the replacement
                assert torch.equal(value, cache[site]), site
            seen.append(site)
            if site == "blocks.0.mlp_out":
                w.replace(value * 0)
    assert seen == IM.site_names()
    torch.testing.assert_close(w.output, IM.run(CLEAN, interventions={"blocks.0.mlp_out": Ablate()}))


def test_activation_patching_equals_a_loop_of_single_patches() -> None:
    res = activation_patching(IM, CLEAN, CORRUPT, logit_diff, site="resid_pre", by="pos")
    _, clean = IM.run_with_cache(CLEAN)
    loop = torch.tensor([[float(logit_diff(IM.run(CORRUPT, interventions={
        f"blocks.{layer}.resid_pre": Patch(clean, positions=[p])}))) for p in range(6)] for layer in range(2)])
    torch.testing.assert_close(torch.as_tensor(res), loop, rtol=1e-5, atol=1e-5)


def test_attribution_patching_equals_the_formula_written_out() -> None:
    est = attribution_patching(IM, CLEAN, CORRUPT, logit_diff, site="attn.z", by="head", method="atp")
    _, clean = IM.run_with_cache(CLEAN, sites="blocks.*.attn.z")
    logits, corrupt = IM.run_with_cache(CORRUPT, sites="blocks.*.attn.z", grad=True)
    logit_diff(logits).backward()
    expected = torch.stack([
        ((clean[f"blocks.{layer}.attn.z"] - corrupt[f"blocks.{layer}.attn.z"].detach())
         * corrupt[f"blocks.{layer}.attn.z"].grad).sum((0, 1, 3))
        for layer in range(2)
    ]) + float(logit_diff(logits))
    torch.testing.assert_close(torch.as_tensor(est), expected, rtol=1e-4, atol=1e-5)
