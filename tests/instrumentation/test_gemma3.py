"""Gemma 3 instrumentation: bit-identity when idle, every site once, values against independent math, studies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers.models.gemma3.modeling_gemma3 as modeling_gemma3

import instrumentation.gemma3 as g3
from mishax_py import InstrumentedModel
from mishax_py.interventions import Hook, Patch
from mishax_py.studies.activation_patching import activation_patching
from mishax_py.studies.attribution.api import attribution_patching
from tests.helpers import loop_reference, make_gemma3
from tests.helpers import two_position_metric as metric

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS, T = 6, 24


@pytest.fixture(scope="module")
def g3_ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def g3_im() -> InstrumentedModel:
    return g3.instrument(make_gemma3())


def test_idle_is_bit_identical_across_install_cycles(g3_ids: torch.Tensor) -> None:
    g3.uninstall()
    model = make_gemma3(seed=3)
    with torch.no_grad():
        ref = model(g3_ids).logits
        im = g3.instrument(model)
        assert g3.installed() and g3.instrument(model) is im
        assert torch.equal(model(g3_ids).logits, ref)
        assert torch.equal(im.run(g3_ids), ref)
        for _ in range(2):
            g3.uninstall()
            assert torch.equal(model(g3_ids).logits, ref)
            with pytest.raises(RuntimeError, match=r"instrumentation\.gemma3\.install\(\)"):
                im.run(g3_ids)
            g3.install()
            assert torch.equal(model(g3_ids).logits, ref)
        logits, cache = im.run_with_cache(g3_ids)
        assert torch.equal(logits, ref) and len(cache) == len(im.site_names())


def test_every_site_fires_once_per_layer(g3_im: InstrumentedModel, g3_ids: torch.Tensor) -> None:
    fired: list[str] = []
    g3_im.run(g3_ids, interventions={"*": Hook(lambda v, ev: fired.append(ev.site))})
    assert fired == g3_im.site_names()
    assert len(fired) == len(set(fired)) == 1 + 23 * N_LAYERS + 2
    assert g3_im.site_info("blocks.2.attn.q_normed").alias == "blocks.2.attn.hook_q_normed"
    assert g3_im.site_info("blocks.2.attn.k_normed").alias == "blocks.2.attn.hook_k_normed"


def test_family_reads_the_config(g3_im: InstrumentedModel) -> None:
    fam = g3_im.family
    types = [fam.attention(L).layer_type for L in range(N_LAYERS)]
    assert types == ["sliding_attention"] * 5 + ["full_attention"]
    assert [fam.attention(L).window for L in range(N_LAYERS)] == [8] * 5 + [None]
    assert [fam.attention(L).rope_base for L in range(N_LAYERS)] == [1e4] * 5 + [1e6]
    assert all(fam.attention(L).softcap is None and fam.attention(L).scale == 8 ** -0.5 for L in range(N_LAYERS))
    assert ("blocks.0.attn.q", "blocks.0.attn.q_normed") in fam.frozen_norms
    assert fam.dims.n_kv_heads == 2 and fam.mlp_input_kinds == ("ln2",)


def test_values_agree_with_independent_computations(g3_im: InstrumentedModel, g3_ids: torch.Tensor) -> None:
    model = g3_im.model
    with torch.no_grad():
        hf = model(g3_ids, output_hidden_states=True)
        _, c = g3_im.run_with_cache(g3_ids)
    for L, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        torch.testing.assert_close(c[f"blocks.{L}.attn.q_normed"], attn.q_norm(c[f"blocks.{L}.attn.q"]), rtol=0, atol=0)
        torch.testing.assert_close(c[f"blocks.{L}.attn.k_normed"], attn.k_norm(c[f"blocks.{L}.attn.k"]), rtol=0, atol=0)
        q = c[f"blocks.{L}.attn.rot_q"].transpose(1, 2)  # [b, head, pos, d]
        k = c[f"blocks.{L}.attn.rot_k"].transpose(1, 2).repeat_interleave(2, dim=1)
        scores = q @ k.transpose(-1, -2) * 8 ** -0.5
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        allowed = j <= i
        if L < 5:
            allowed &= i - j < 8
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        got = c[f"blocks.{L}.attn.scores"]
        torch.testing.assert_close(got.masked_fill(~allowed, 0), scores.masked_fill(~allowed, 0), rtol=1e-5, atol=1e-5)
        assert (got[..., ~allowed] < -1e30).all()
        torch.testing.assert_close(c[f"blocks.{L}.attn.pattern"], F.softmax(scores, -1), rtol=1e-5, atol=1e-6)
        if L < N_LAYERS - 1:
            assert torch.equal(c[f"blocks.{L}.resid_post"], hf.hidden_states[L + 1])
    torch.testing.assert_close(c["logits"], hf.logits, rtol=0, atol=0)


def test_interventions_and_sweep(g3_im: InstrumentedModel, g3_ids: torch.Tensor) -> None:
    with torch.no_grad():
        zero = g3_im.run(g3_ids, interventions={"blocks.5.mlp_out": Hook(lambda v, ev: torch.zeros_like(v))})
        _, c = g3_im.run_with_cache(g3_ids)
        expect = g3_im.model.lm_head(g3_im.model.model.norm(c["blocks.5.resid_mid"]))
    torch.testing.assert_close(zero, expect, rtol=1e-5, atol=1e-5)
    variants = [{}, {"blocks.5.mlp_out": Hook(lambda v, ev: torch.zeros_like(v))}]
    out = g3_im.sweep(g3_ids, variants)
    torch.testing.assert_close(out[0], g3_im.run(g3_ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], zero, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("site", "by"), [("resid_pre", "pos"), ("attn.k", "head_pos"), ("attn.pattern", "head")])
def test_activation_patching_packed_equals_rows_and_a_hand_loop(g3_im, g3_ids, site, by) -> None:
    clean = g3_ids[:1]
    corrupt = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(7))
    packed = activation_patching(g3_im, clean, corrupt, metric, site=site, by=by, engine="packed")
    rows = activation_patching(g3_im, clean, corrupt, metric, site=site, by=by, engine="rows")
    torch.testing.assert_close(packed.values, rows.values, rtol=0, atol=1e-5)
    if site == "resid_pre":
        torch.testing.assert_close(rows.values, loop_reference(g3_im, clean, corrupt, site, by), rtol=0, atol=1e-5)
    assert (rows.values - rows.corrupt).abs().max() > 1e-4


def test_attribution_patching_and_the_qk_fix(g3_im, g3_ids) -> None:
    clean = g3_ids[:1]
    corrupt = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(7))
    atp = attribution_patching(g3_im, clean, corrupt, metric, site="attn.z", by="head")
    assert atp.effects.shape == (N_LAYERS, 4) and atp.effects.abs().sum() > 0
    # AtP*'s QK fix (recomputes scores from the corrupt run's rot_q/rot_k, i.e. through the QK norm and RoPE)
    plain = attribution_patching(g3_im, clean, corrupt, metric, site="attn.k", by="head_pos")
    fixed = attribution_patching(g3_im, clean, corrupt, metric, site="attn.k", by="head_pos", qk_fix=True)
    assert fixed.effects.shape == (N_LAYERS, 2, T) and torch.isfinite(fixed.effects).all()
    assert not torch.allclose(fixed.effects, plain.effects)


def test_patch_on_q_normed_changes_scores_as_math_says(g3_im, g3_ids) -> None:
    with torch.no_grad():
        _, c = g3_im.run_with_cache(g3_ids)
        _, p = g3_im.run_with_cache(g3_ids, interventions={"blocks.1.attn.q_normed": Patch(
            torch.zeros_like(c["blocks.1.attn.q_normed"]))})
    assert torch.equal(p["blocks.1.attn.rot_q"], torch.zeros_like(p["blocks.1.attn.rot_q"]))
    assert torch.equal(p["blocks.0.resid_post"], c["blocks.0.resid_post"])


def test_non_gemma3_model_is_a_clear_error(tiny_model) -> None:
    with pytest.raises(TypeError, match="Gemma3ForCausalLM"):
        g3.instrument(tiny_model)


def test_the_language_model_inside_gemma3_for_conditional_generation(g3_ids: torch.Tensor) -> None:
    from transformers import Gemma3Config, SiglipVisionConfig
    text = make_gemma3(seed=5).config
    text.vocab_size = 300
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                       boi_token_index=297, eoi_token_index=298)
    cfg._attn_implementation = "eager"
    torch.manual_seed(5)
    model = modeling_gemma3.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        ref = model(input_ids=g3_ids).logits
        im = g3.instrument(model)
        fired: list[str] = []
        logits = im.run(g3_ids, interventions={"*": Hook(lambda v, ev: fired.append(ev.site))})
    assert torch.equal(logits, ref) and fired == im.site_names()
    assert im.family.attention(5).rope_base == 1e6
