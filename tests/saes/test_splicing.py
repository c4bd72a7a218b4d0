"""saes.Splice and feature edits on a small random Gemma 2 (``tests.helpers.make_model``)."""

from __future__ import annotations

import pytest
import torch

import saes
from mishax_py import InstrumentedModel
from saes.base import init_tied

D_MODEL, N_HEADS, D_HEAD = 32, 4, 8  # tests.helpers.tiny_config


pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops: see conftest.one_thread


def make_sae(
    cls: type[saes.SAE] = saes.JumpReLUSAE,
    d_in: int = D_MODEL,
    d_sae: int = 96,
    site: str = "blocks.1.resid_post",
    seed: int = 0,
    **kw: object,
) -> saes.SAE:
    """A random SAE whose features fire on a good fraction of tokens of the tiny model."""
    sae = cls(d_in, d_sae, site=site, **kw)
    init_tied(sae, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
        if getattr(sae, "threshold", None) is not None:
            sae.threshold.fill_(0.4)
    return sae.requires_grad_(False)


def test_no_edit_leaves_logits_unchanged(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    sae = make_sae()
    with torch.no_grad():
        plain = tiny_im.run(ids)
        spliced = tiny_im.run(ids, interventions={sae.site: saes.Splice(sae)})
        assert (spliced - plain).abs().max().item() <= 1e-5
        z_sae = make_sae(d_in=N_HEADS * D_HEAD, site="blocks.0.attn.z")
        both = {sae.site: saes.Splice(sae), z_sae.site: saes.Splice(z_sae, detach_error=True)}
        assert (tiny_im.run(ids, interventions=both) - plain).abs().max().item() <= 1e-5
        # without the error term the logits do change (the SAE is far from perfect)
        recon = tiny_im.run(ids, interventions={sae.site: saes.Splice(sae, keep_error=False)})
        assert (recon - plain).abs().max().item() > 1e-3


def test_ablation_changes_site_by_decoder_contribution(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    sae = make_sae()
    site = sae.site
    names = [site, f"{site}.sae.features", f"{site}.sae.error"]
    with torch.no_grad():
        _, clean = tiny_im.run_with_cache(ids, sites=names, interventions={site: saes.Splice(sae)})
        f = clean[f"{site}.sae.features"]
        assert f.shape == (*ids.shape, sae.d_sae)
        x = clean[site]
        assert torch.allclose(f, sae.encode(x))
        assert torch.allclose(clean[f"{site}.sae.error"], x - sae.decode(f), atol=1e-6)
        counts = (f > 0).sum((0, 1))
        i = int(counts.argmax())  # an active feature
        assert counts[i] > 0
        _, ablated = tiny_im.run_with_cache(
            ids, sites=names, interventions={site: saes.Splice(sae, edit=saes.FeatureAblate([i]))}
        )
        diff = ablated[site] - x
        contribution = f[..., i : i + 1] * sae.W_dec[i]  # f_i * W_dec[i], per token
        assert (diff + contribution).abs().max().item() <= 1e-5
        assert diff.abs().max().item() > 1e-2
        assert torch.equal(ablated[f"{site}.sae.features"][..., i], torch.zeros_like(f[..., i]))


def test_edits_clamp_steer_callable_positions(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    sae = make_sae()
    site = sae.site
    with torch.no_grad():
        _, c0 = tiny_im.run_with_cache(ids, sites=[site], interventions={site: saes.Splice(sae)})
        x = c0[site]
        f = sae.encode(x)

        def site_after(edit: object) -> torch.Tensor:
            _, c = tiny_im.run_with_cache(
                ids, sites=[site], interventions={site: saes.Splice(sae, edit=edit)}
            )
            return c[site]

        got = site_after(saes.FeatureClamp([3, 5], 2.0))
        want = x + (2.0 - f[..., 3:4]) * sae.W_dec[3] + (2.0 - f[..., 5:6]) * sae.W_dec[5]
        assert torch.allclose(got, want, atol=1e-5)
        got = site_after(saes.FeatureSteer(7, 1.5))
        assert torch.allclose(got, x + 1.5 * sae.W_dec[7], atol=1e-5)
        got = site_after(saes.FeatureSteer([7, 8], torch.tensor([1.0, -2.0])))
        assert torch.allclose(got, x + sae.W_dec[7] - 2.0 * sae.W_dec[8], atol=1e-5)
        got = site_after(lambda feats: feats * 0)  # any callable f -> f'
        assert torch.allclose(got, sae.decode(torch.zeros_like(f)) + x - sae.decode(f), atol=1e-5)
        got = site_after(saes.FeatureSteer(2, 3.0, positions=[0, 4]))
        delta = got - x
        assert torch.allclose(delta[:, [0, 4]], (3.0 * sae.W_dec[2]).expand(2, 2, -1), atol=1e-5)
        assert delta[:, [1, 2, 3, 5, 6, 7, 8, 9]].abs().max() <= 1e-6
        got = site_after([saes.FeatureAblate(range(sae.d_sae)), saes.FeatureClamp(1, 1.0)])  # lists compose
        assert torch.allclose(
            got, x - sae.decode(f) + sae.decode(torch.zeros_like(f)) + sae.W_dec[1], atol=1e-5
        )
    with pytest.raises(IndexError, match="out of range for d_sae=96"):
        tiny_im.run(ids, interventions={site: saes.Splice(sae, edit=saes.FeatureAblate([96]))})


def test_per_row_batched_ablation_equals_separate_runs(tiny_im: InstrumentedModel) -> None:
    """256 variants as 256 rows of one run (per-row ids, no Python loop) == 256 separate runs."""
    sae = make_sae(d_sae=256)
    site = sae.site
    prompt = torch.randint(4, 64, (1, 8), generator=torch.Generator().manual_seed(5))
    n = 256
    with torch.no_grad():
        batched = tiny_im.run(
            prompt.repeat(n, 1),
            interventions={site: saes.Splice(sae, edit=saes.FeatureAblate(torch.arange(n)[:, None]))},
        )
        singles = torch.cat(
            [
                tiny_im.run(prompt, interventions={site: saes.Splice(sae, edit=saes.FeatureAblate([i]))})
                for i in range(n)
            ]
        )
        assert (batched - singles).abs().max().item() <= 1e-4
        plain = tiny_im.run(prompt)
        changed = (singles - plain).abs().amax((1, 2)) > 1e-6
        assert 10 < int(changed.sum()) < n  # some features are active on this prompt, some not

        # the same through im.sweep (each variant its own Splice) on a few variants
        subset = [0, 17, 101, 255]
        swept = tiny_im.sweep(
            prompt, [{site: saes.Splice(sae, edit=saes.FeatureAblate([i]))} for i in subset]
        )
        for i, logits in zip(subset, swept, strict=True):
            assert (logits - singles[i : i + 1]).abs().max().item() <= 1e-4

        # ragged per-row ids (-1 pads), and rows restricted by the run (event.rows)
        ragged = saes.FeatureAblate([[0, 1], [2], []])
        r = tiny_im.run(prompt.repeat(3, 1), interventions={site: saes.Splice(sae, edit=ragged)})
        both = tiny_im.run(prompt, interventions={site: saes.Splice(sae, edit=saes.FeatureAblate([0, 1]))})
        assert (r[0] - both[0]).abs().max() <= 1e-4 and (r[1] - singles[2]).abs().max() <= 1e-4
        assert (r[2] - plain[0]).abs().max() <= 1e-5
        ctx = tiny_im.context(
            {site: saes.Splice(sae, edit=saes.FeatureAblate(torch.tensor([[0], [5], [9]])))},
            rows=torch.tensor([0, 2]),
        )
        from mishax_py.runtime import activate

        with activate(ctx):
            out = tiny_im.forward(prompt.repeat(3, 1))
        assert (out[0] - singles[0]).abs().max() <= 1e-4  # row 0 reads ids[0]
        assert (out[1] - plain[0]).abs().max() <= 1e-5  # row 1 untouched
        assert (out[2] - singles[9]).abs().max() <= 1e-4  # row 2 reads ids[2] (full-batch ids)


def test_attention_z_sae_reads_flattened_heads(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    sae = make_sae(d_in=N_HEADS * D_HEAD, site="blocks.0.attn.z")
    site = sae.site
    with torch.no_grad():
        _, c = tiny_im.run_with_cache(
            ids, sites=[site, f"{site}.sae.features"], interventions={site: saes.Splice(sae)}
        )
        z = c[site]
        assert z.shape == (*ids.shape, N_HEADS, D_HEAD)
        flat = z.reshape(*ids.shape, N_HEADS * D_HEAD)  # head-major
        assert torch.allclose(c[f"{site}.sae.features"], sae.encode(flat))
        i = int((c[f"{site}.sae.features"] > 0).sum((0, 1)).argmax())
        _, c2 = tiny_im.run_with_cache(
            ids, sites=[site], interventions={site: saes.Splice(sae, edit=saes.FeatureAblate(i))}
        )
        delta = (c2[site] - z).reshape(*ids.shape, -1)
        f_i = c[f"{site}.sae.features"][..., i : i + 1]
        assert torch.allclose(delta, -f_i * sae.W_dec[i], atol=1e-5)
    with pytest.raises(ValueError, match="does not match site 'blocks.0.attn.z'"):
        tiny_im.run(ids, interventions={site: saes.Splice(make_sae(d_in=24, site=site))})


def test_transcoder_splice_reads_input_site(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    tc = make_sae(saes.Transcoder, site="blocks.0.ln2_normalized", output_site="blocks.0.mlp_out", skip=True)
    with torch.no_grad():
        tc.W_skip.normal_(0, 0.1)
    with pytest.raises(TypeError, match="TranscoderSplice"):
        saes.Splice(tc)
    with torch.no_grad():
        plain = tiny_im.run(ids)
        assert (tiny_im.run(ids, interventions=saes.splice(tc)) - plain).abs().max() <= 1e-5
        names = ["blocks.0.ln2_normalized", "blocks.0.mlp_out", "blocks.0.mlp_out.sae.features"]
        _, c = tiny_im.run_with_cache(ids, sites=names, interventions=saes.splice(tc, keep_error=False))
        x_in = c["blocks.0.ln2_normalized"]
        pred = tc(x_in)
        assert torch.allclose(c["blocks.0.mlp_out"], pred, atol=1e-5)
        assert torch.allclose(c["blocks.0.mlp_out.sae.features"], tc.encode(x_in))
        ts = saes.TranscoderSplice(tc, edit=saes.FeatureAblate([4]))
        _, clean = tiny_im.run_with_cache(ids, sites=names[:2])
        _, c2 = tiny_im.run_with_cache(ids, sites=names[:2], interventions=ts.interventions())
        f4 = tc.encode(clean["blocks.0.ln2_normalized"])[..., 4:5]
        assert torch.allclose(
            c2["blocks.0.mlp_out"] - clean["blocks.0.mlp_out"], -f4 * tc.W_dec[4], atol=1e-5
        )
        # the splice names its input recorder as a companion: the output site alone is enough
        alone = tiny_im.run(ids, interventions={"blocks.0.mlp_out": ts})
        assert torch.equal(alone, tiny_im.run(ids, interventions=ts.interventions()))
        assert (alone - plain).abs().max() > 1e-4

        # sweeps (one TranscoderSplice per variant) and runs restricted to some rows
        singles = {
            j: tiny_im.run(ids, interventions=saes.splice(tc, edit=saes.FeatureAblate([j]))) for j in (4, 9)
        }
        variants = [{"blocks.0.mlp_out": saes.TranscoderSplice(tc, edit=saes.FeatureAblate([j]))} for j in (4, 9)]
        for j, out in zip((4, 9), tiny_im.sweep(ids, variants), strict=True):
            assert (out - singles[j]).abs().max() <= 1e-5
        from mishax_py.runtime import activate

        ctx = tiny_im.context(saes.TranscoderSplice(tc, edit=saes.FeatureAblate([4])).interventions(),
                              rows=torch.tensor([1]))  # fmt: skip
        with activate(ctx):
            out = tiny_im.forward(ids)
        assert torch.equal(out[0], plain[0]) and (out[1] - singles[4][1]).abs().max() <= 1e-5


def test_detach_error_gradients(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    """With detach_error the upstream gradient flows only through the SAE; without it, through both."""
    sae = make_sae()
    site = sae.site
    up = "blocks.1.resid_mid"

    def grad_at_up(splice: saes.Splice) -> tuple[torch.Tensor, torch.Tensor]:
        logits, c = tiny_im.run_with_cache(
            ids, sites=[up, f"{site}.sae.features"], grad=True, interventions={site: splice}
        )
        logits[:, -1, 5].sum().backward()
        return c[up].grad, c[f"{site}.sae.features"].grad

    g_plain = grad_at_up(saes.Splice(sae))[0]
    logits, c = tiny_im.run_with_cache(ids, sites=[up], grad=True)
    logits[:, -1, 5].sum().backward()
    assert torch.allclose(g_plain, c[up].grad, atol=1e-6)  # splice with the error term is transparent

    g_det, g_feat = grad_at_up(saes.Splice(sae, detach_error=True))
    assert g_feat is not None and g_feat.abs().sum() > 0  # features get gradients (attribution)
    assert not torch.allclose(g_det, g_plain, atol=1e-4)  # upstream now only sees the SAE path


def test_recording_and_dtype(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    sae = make_sae().to(torch.bfloat16)
    site = sae.site
    with torch.no_grad():
        plain = tiny_im.run(ids)
        out = tiny_im.run(ids, interventions={site: saes.Splice(sae)})
        assert torch.equal(out, plain)  # no edit: the value itself, whatever the SAE dtype
        _, c = tiny_im.run_with_cache(
            ids, sites=[f"{site}.sae.features"], interventions={site: saes.Splice(sae, saes.FeatureAblate(0))}
        )
        assert c[f"{site}.sae.features"].dtype == torch.bfloat16
        assert saes.splice(sae).keys() == {site}


def test_feature_edits_on_tensors() -> None:
    f = torch.rand(3, 2, 10) + 0.1
    out = saes.FeatureClamp([1, 2], torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))(f)
    assert torch.equal(
        out[:, :, 1:3], torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])[:, None].expand(3, 2, 2)
    )
    assert torch.equal(out[..., 3:], f[..., 3:])
    steer = saes.FeatureSteer(torch.tensor([[0], [1], [2]]), torch.tensor([[10.0], [20.0], [30.0]]))
    assert torch.allclose((steer(f) - f)[:, 0, :3], torch.diag(torch.tensor([10.0, 20.0, 30.0])))
    ablate = saes.FeatureAblate(torch.arange(3)[:, None])
    assert torch.equal(ablate(f)[:, 0, :3] == 0, torch.eye(3, dtype=torch.bool))
    assert torch.equal(saes.FeatureAblate(4, positions=slice(1, None))(f)[:, :, 4] == 0,
                       torch.tensor([[False, True]] * 3))  # fmt: skip
    with pytest.raises(ValueError, match="do not fit ids"):
        saes.FeatureClamp([1, 2], torch.ones(3))(f)
    with pytest.raises(ValueError, match="have 4 rows but the features have batch 3"):
        saes.FeatureAblate(torch.zeros(4, 1, dtype=torch.long))(f)
    with pytest.raises(TypeError, match="must be integers"):
        saes.FeatureAblate(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="returned"):
        saes.Splice(make_sae(), edit=lambda x: x[..., :3])(torch.randn(1, 2, D_MODEL), _event())
    assert "FeatureClamp([1, 2]" in repr(saes.FeatureClamp([1, 2], 3.0))


def _event() -> object:
    from mishax_py.runtime import RunContext, SiteEvent

    return SiteEvent("blocks.1.resid_post", 1, RunContext())


def test_recorded_error_is_the_unedited_reconstruction_error(tiny_im: InstrumentedModel, ids: torch.Tensor) -> None:
    """Under a feature edit, ``{site}.sae.error`` is ``x - decode(encode(x))`` of the site's value before the
    splice (the error the edit keeps), not of the edited features; ``{site}.sae.features`` are the edited ones.
    The oracle reads ``x`` from a run without the splice and encodes it here."""
    sae = make_sae()
    site = sae.site
    tc = make_sae(saes.Transcoder, site="blocks.0.ln2_normalized", output_site="blocks.0.mlp_out", skip=True)
    with torch.no_grad():
        tc.W_skip.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        _, plain = tiny_im.run_with_cache(ids, sites=[site, tc.site, tc.output_site])
        x = plain[site]
        want = x - sae.decode(sae.encode(x))
        top = (sae.encode(x) > 0).sum((0, 1)).topk(3).indices.tolist()  # often-active features
        edits = [saes.FeatureAblate(top), saes.FeatureClamp(top, 5.0), saes.FeatureSteer(top, 3.0),
                 lambda f: f * 0]
        names = [f"{site}.sae.error", f"{site}.sae.features"]
        for edit in edits:
            for detach in (False, True):
                _, c = tiny_im.run_with_cache(ids, sites=names,
                                              interventions={site: saes.Splice(sae, edit=edit, detach_error=detach)})
                torch.testing.assert_close(c[names[0]], want, rtol=0, atol=1e-6)
                f_edited = saes.edits.apply_edit(edit, sae.encode(x), saes.edits.EditScope(0, None, x.shape[0]))
                torch.testing.assert_close(c[names[1]], f_edited, rtol=0, atol=1e-6)
                # the edit moved the reconstruction: an error taken from it would differ
                assert (sae.decode(f_edited) - sae.decode(sae.encode(x))).abs().max() > 1e-2
        # a transcoder: error = y - (decode(encode(x_in)) + skip(x_in)), of its unedited features
        x_in, y = plain[tc.site], plain[tc.output_site]
        want_tc = y - tc(x_in)
        _, c = tiny_im.run_with_cache(ids, sites=[f"{tc.output_site}.sae.error"],
                                      interventions=saes.splice(tc, edit=saes.FeatureClamp([0, 1, 2], 4.0)))
        torch.testing.assert_close(c[f"{tc.output_site}.sae.error"], want_tc, rtol=0, atol=1e-6)
