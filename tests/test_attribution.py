"""Attribution patching (AtP, AtP*, IG) against exact activation patching on small Gemma 2 models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model
from helpers_attribution import element_slices

import instrumentation.gemma2 as g2
from mishax_py.interventions import Hook
from mishax_py.runtime import active_context
from mishax_py.studies.activation_patching import activation_patching
from mishax_py.studies.attribution import AttributionResult, attribution_patching, attribution_patching_sites
from mishax_py.studies.attribution.plan import site_layout
from mishax_py.studies.attribution.qk import key_effect
from mishax_py.studies.result import PatchingResult

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def exact_patching(im, source, target, metric, site, by, layers=None):
    """Reference: exact activation patching, effect = metric(patched) - metric(target) per element.

    Every element is its own patched run; for speed the runs are stacked along the batch
    (rows of one element never interact), which is exact, not an approximation.
    """
    layers = range(im.n_layers) if layers is None else layers
    names = [f"blocks.{L}.{site}" for L in layers]
    with torch.no_grad():
        _, cache = im.run_with_cache(source, sites=names)
        base = float(metric(im.run(target)))
    kind = site_layout(im.site_info(names[0]).dims)
    b = target.shape[0]
    out = []
    for n in names:
        s = cache[n]
        grid = element_slices(kind, by, s.shape)
        flat = [ix for row in grid for ix in row]

        def make_hook(s, flat):
            def hook(v):
                v = v.clone()
                for i, ix in enumerate(flat):
                    v[i * b:(i + 1) * b][ix] = s[ix]
                return v

            return hook

        with torch.no_grad():
            logits = im.run(target.repeat(len(flat), 1), interventions={n: make_hook(s, flat)})
        vals = torch.tensor([float(metric(logits[i * b:(i + 1) * b])) - base for i in range(len(flat))])
        out.append(vals.view(len(grid), -1) if by == "head_pos" else vals)
    return torch.stack(out)


def linearise_norm(norm, gain: float = 1e15) -> None:
    """Make a Gemma 2 RMSNorm exactly linear: with eps = 1e30, mean(x^2) + eps == eps in float32 (for
    mean(x^2) < ~6e22), so rsqrt(.) is the constant 1e-15; the gain (1 + w) = 1e15 restores the scale."""
    norm.eps = 1e30
    with torch.no_grad():
        norm.weight.fill_(gain - 1)


@pytest.fixture(scope="module")
def linear_tail():
    """A 2-layer Gemma 2 whose metric is *linear* in everything after the last layer's attention softmax.

    Last layer: MLP output zeroed (down_proj = 0), post-attention norm linearised; final norm
    linearised; final logit soft-cap off. Then the logits are an affine function of the last
    layer's pattern, v, z, attn_out, resid_mid and resid_post, so AtP there is exact. Its
    query/key weights are scaled up so attention is saturated: plain AtP on q/k is then far
    off, while the QK fix (exact softmax, then linear) is exact.
    """
    model = make_model(seed=0, final_logit_softcapping=None)
    last = model.model.layers[-1]
    linearise_norm(last.post_attention_layernorm)
    linearise_norm(model.model.norm)
    with torch.no_grad():
        last.mlp.down_proj.weight.zero_()
        last.self_attn.q_proj.weight.mul_(40)
        last.self_attn.k_proj.weight.mul_(40)
        last.self_attn.v_proj.weight.mul_(10)
        last.self_attn.o_proj.weight.mul_(10)
    im = g2.instrument(model)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(4, 64, (2, 8), generator=g)
    corrupt = torch.randint(4, 64, (2, 8), generator=g)

    def metric(logits):
        return (logits[:, -1, 7] - logits[:, -1, 9]).mean() + logits[:, 4, 3].sum()

    return im, clean, corrupt, metric


@pytest.mark.parametrize(
    "site,by",
    [("resid_post", "pos"), ("resid_mid", "pos"), ("attn_out", "pos"), ("attn.z", "head"), ("attn.z", "head_pos"),
     ("attn.v", "head"), ("attn.pattern", "head"), ("attn.pattern", "head_pos")],
)
def test_atp_equals_patching_when_metric_is_linear(linear_tail, site, by):
    im, clean, corrupt, metric = linear_tail
    last = im.n_layers - 1
    for direction in ("denoise", "noise"):
        src, tgt = (clean, corrupt) if direction == "denoise" else (corrupt, clean)
        res = attribution_patching(im, clean, corrupt, metric, site=site, by=by, layers=[last], direction=direction)
        ref = exact_patching(im, src, tgt, metric, site, by, layers=[last])
        assert res.effects.shape == ref.shape
        assert ref.abs().max() > 1e-3  # a real effect
        assert (res.effects - ref).abs().max() <= 1e-4, (site, by, direction)
        torch.testing.assert_close(res.values, res.effects + res.target_metric)
        if site in ("resid_post", "resid_mid", "attn_out", "attn.z", "attn.v", "attn.pattern"):
            # the library's exact patching, same conventions and shapes
            with torch.no_grad():
                exact = activation_patching(im, clean, corrupt, metric, site=site, by=by, direction=direction,
                                            layers=[last])
            assert exact.axes == res.axes and exact.labels == res.labels
            assert (res.values - exact.values).abs().max() <= 1e-4


@pytest.mark.parametrize("site,by", [("attn.q", "head"), ("attn.q", "head_pos"), ("attn.k", "head"),
                                     ("attn.k", "head_pos"), ("attn.k", "pos"), ("attn.scores", "head_pos")])
def test_qk_fix_is_exact_when_linear_after_the_softmax(linear_tail, site, by):
    im, clean, corrupt, metric = linear_tail
    last = im.n_layers - 1
    ref = exact_patching(im, clean, corrupt, metric, site, by, layers=[last])
    fixed = attribution_patching(im, clean, corrupt, metric, site=site, by=by, layers=[last], qk_fix=True)
    assert fixed.qk_fix
    assert (fixed.effects - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))
    if site != "attn.scores":  # plain AtP linearises through the saturated softmax and misses
        plain = attribution_patching(im, clean, corrupt, metric, site=site, by=by, layers=[last])
        assert (plain.effects - ref).abs().max() > 0.2 * ref.abs().max()


def test_key_effect_closed_form_matches_bruteforce_on_saturated_rows():
    torch.manual_seed(0)
    b, h, t = 1, 2, 6
    S = torch.randn(b, h, t, t, dtype=torch.float64) * 3
    S[0, 0, 3] = torch.tensor([60.0, -40.0, -45.0, -50.0, 0.0, 0.0])  # saturated on key 0
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    S = S.masked_fill(mask, torch.finfo(torch.float32).min)
    delta = torch.randn(b, h, t, t, dtype=torch.float64) * 30
    delta[0, 0, 3, 0] = -100.0  # the patched key loses its saturation
    G = torch.randn(b, h, t, t, dtype=torch.float64)
    E = key_effect(S, delta, G)
    Sm = S.masked_fill(mask, -math.inf)
    A = torch.softmax(Sm, -1)
    for s in range(t):
        for k in range(s + 1):
            row = Sm[0, :, s].clone()
            row[:, k] += delta[0, :, s, k]
            want = (G[0, :, s] * (torch.softmax(row, -1) - A[0, :, s])).sum(-1)
            torch.testing.assert_close(E[0, :, s, k], want, rtol=1e-9, atol=1e-12)
    assert E[0, 0, 3, 0].abs() > 0.1  # the saturated case is not lost to rounding


def test_graddrop_matches_explicit_detached_backward(tiny_im, ids):
    im = tiny_im
    corrupt = ids.clone()
    corrupt[:, 2] = 5

    def metric(logits):
        return logits[:, -1, 3].mean() - logits[:, -1, 4].mean()

    res = attribution_patching(im, ids, corrupt, metric, site="resid_pre", method="atp*", batch_size=2)
    assert res.graddrop is not None and res.graddrop.shape == (im.n_layers, im.n_layers, ids.shape[1])
    plain = attribution_patching(im, ids, corrupt, metric, site="resid_pre")
    torch.testing.assert_close(res.effects, plain.effects)
    torch.testing.assert_close(res.score, res.graddrop.abs().sum(0) / (im.n_layers - 1))
    # I_l by hand: detach layer l's attn_out and mlp_out, take the gradient at resid_pre
    names = [f"blocks.{L}.resid_pre" for L in range(im.n_layers)]
    with torch.no_grad():
        _, clean_cache = im.run_with_cache(ids, sites=names)
    for drop in range(im.n_layers):
        ivs = {f"blocks.{drop}.attn_out": lambda v: v.detach(), f"blocks.{drop}.mlp_out": lambda v: v.detach()}
        logits, cache = im.run_with_cache(corrupt, sites=names, grad=True, interventions=ivs)
        grads = torch.autograd.grad(metric(logits), [cache[n] for n in names])
        want = torch.stack([((clean_cache[n] - cache[n].detach()) * g).sum((0, 2))
                            for n, g in zip(names, grads, strict=True)])
        torch.testing.assert_close(res.graddrop[drop], want, rtol=1e-4, atol=1e-6)
        # dropping layer l only changes nodes upstream of it: resid_pre of layers <= l
        for L in range(drop + 1, im.n_layers):
            torch.testing.assert_close(res.graddrop[drop][L], plain.effects[L], rtol=1e-4, atol=1e-6)
    worst = res.worst_case()
    allv = torch.cat([plain.effects[None], res.graddrop])
    torch.testing.assert_close(worst.abs(), allv.abs().amax(0))


def _const(value):
    return lambda v: value


def test_ig_completeness_and_chunking(tiny_im, ids):
    """IG over a layer's whole site converges to the exact effect of patching that whole site."""
    im = tiny_im
    corrupt = ids.clone()
    corrupt[:, 3] = 7
    corrupt[:, 6] = 9

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, 5].mean()

    res = attribution_patching(im, ids, corrupt, metric, site="resid_mid", method="ig", steps=12, batch_size=10)
    names = [f"blocks.{L}.resid_mid" for L in range(im.n_layers)]
    with torch.no_grad():
        _, cache = im.run_with_cache(ids, sites=names)
        base = float(metric(im.run(corrupt)))
        for L, n in enumerate(names):
            whole = float(metric(im.run(corrupt, interventions={n: _const(cache[n])}))) - base
            assert abs(float(res.effects[L].sum()) - whole) <= 2e-3 * max(1.0, abs(whole)), (L, whole)
    assert res.steps == 12 and res.method == "ig"


def _input_path_ig(im, source, target, metric, site, steps):
    """Reference for method="ig-input", written out: a loop over alphas, a Hook replacing the embeddings,
    gradients from run_with_cache(grad=True); returns the per-element products (a_s - a_t) * mean gradient."""
    names = [f"blocks.{L}.{site}" for L in range(im.n_layers)]
    with torch.no_grad():
        _, src = im.run_with_cache(source, sites=[*names, "embed"])
        _, tgt = im.run_with_cache(target, sites=[*names, "embed"])
    mean_grad = {n: torch.zeros_like(tgt[n]) for n in names}
    for k in range(steps):
        alpha = (k + 0.5) / steps
        emb = tgt["embed"] + alpha * (src["embed"] - tgt["embed"])
        logits, cache = im.run_with_cache(target, sites=names, grad=True, interventions={"embed": Hook(_const(emb))})
        grads = torch.autograd.grad(metric(logits), [cache[n] for n in names])
        for n, g in zip(names, grads, strict=True):
            mean_grad[n] += g / steps
    return [(src[n] - tgt[n]) * mean_grad[n] for n in names]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_ig_input_matches_a_written_out_loop(tiny_im, ids, direction):
    """method="ig-input" (one path: embeddings interpolated, gradients read at every layer) against a hand loop."""
    im = tiny_im
    corrupt = ids.clone()
    corrupt[:, 2] = 7
    corrupt[:, 5] = 9

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, 5].mean()

    src, tgt = (ids, corrupt) if direction == "denoise" else (corrupt, ids)
    for site, by, reduce in (("resid_pre", "pos", lambda x: x.sum(-1).sum(0)),
                             ("attn.z", "head", lambda x: x.sum((0, 1, 3)))):
        res = attribution_patching(im, ids, corrupt, metric, site=site, by=by, method="ig-input", steps=6, batch_size=8,
                                   direction=direction)
        ref = torch.stack([reduce(x) for x in _input_path_ig(im, src, tgt, metric, site, steps=6)])
        assert res.method == "ig-input" and res.steps == 6
        torch.testing.assert_close(res.effects, ref, rtol=1e-4, atol=1e-6)
        assert ref.abs().max() > 1e-3  # a real effect


def test_ig_input_is_ig_at_the_embeddings(tiny_im, ids):
    """At layer 0, resid_pre is the embedding itself, so both IG paths are the same estimate; summed over
    positions it converges to the exact effect of patching the whole input (completeness)."""
    im = tiny_im
    corrupt = ids.flip(1)

    def metric(logits):
        return logits[:, -1, 3].mean()

    a = attribution_patching(im, ids, corrupt, metric, site="resid_pre", layers=[0], method="ig", steps=32)
    b = attribution_patching(im, ids, corrupt, metric, site="resid_pre", layers=[0], method="ig-input", steps=32)
    torch.testing.assert_close(a.effects, b.effects, rtol=1e-4, atol=1e-5)
    whole = b.clean - b.corrupt
    assert abs(float(b.effects.sum()) - whole) <= 2e-3 * max(1.0, abs(whole))


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_patching_sites_equals_one_call_per_site(tiny_im, ids, direction):
    """Several sites from one forward/backward: the same estimates as attribution_patching site by site."""
    corrupt = ids.flip(1)

    def metric(lg):
        return lg[:, -1].log_softmax(-1)[:, 3].mean()

    spec = {"resid_pre": None, "blocks.*.attn.hook_z": "head", "mlp_out": "pos", "attn.pattern": "head_pos",
            "attn.k": "layer"}
    got = attribution_patching_sites(tiny_im, ids, corrupt, metric, sites=spec, direction=direction, layers=[1, 0])
    assert list(got) == list(spec)
    for key, by in spec.items():
        one = attribution_patching(tiny_im, ids, corrupt, metric, site=key, by=by, direction=direction, layers=[1, 0])
        res = got[key]
        assert (res.axes, res.labels, res.site, res.by, res.sites) == (one.axes, one.labels, one.site, one.by,
                                                                         one.sites)
        torch.testing.assert_close(res.effects, one.effects, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res.values, one.values, rtol=1e-5, atol=1e-5)
        assert (res.clean, res.corrupt) == pytest.approx((one.clean, one.corrupt), abs=1e-5)
    lst = attribution_patching_sites(tiny_im, ids, corrupt, metric, sites=["attn.z"])
    assert lst["attn.z"].by == "head" and lst["attn.z"].values.shape == (2, 4)
    with pytest.raises(ValueError, match="at least one site"):
        attribution_patching_sites(tiny_im, ids, corrupt, metric, sites=[])
    with pytest.raises(ValueError, match="by='head'"):
        attribution_patching_sites(tiny_im, ids, corrupt, metric, sites={"resid_pre": "head"})


def test_result_metadata_labels_and_positions(tiny_im, ids, tmp_path):
    corrupt = ids.flip(1)

    def metric(lg):
        return lg[:, -1, 3].mean()

    res = attribution_patching(tiny_im, ids, corrupt, metric, site="attn.z", by="head_pos", layers=[1])
    assert isinstance(res, AttributionResult) and isinstance(res, PatchingResult)
    assert res.values.shape == (1, 4, ids.shape[1])
    assert res.axes == ("layer", "head", "pos")
    assert res.labels["layer"] == ["1"] and res.labels["head"] == ["0", "1", "2", "3"]
    assert res.sites == ["blocks.1.attn.z"] and res.direction == "denoise"
    with torch.no_grad():
        assert abs(res.corrupt - float(metric(tiny_im.run(corrupt)))) < 1e-5
        assert abs(res.clean - float(metric(tiny_im.run(ids)))) < 1e-5
    torch.testing.assert_close(res.normalized(), (res.values - res.corrupt) / (res.clean - res.corrupt))
    assert len(res.top(3)) == 3
    assert "AttributionResult(atp" in repr(res)
    png = res.plot(str(tmp_path / "atp.png"))
    assert (tmp_path / "atp.png").stat().st_size > 1000 and png.endswith("atp.png")
    k = attribution_patching(tiny_im, ids, corrupt, metric, site="attn.hook_k")
    assert k.values.shape == (2, 2)  # kv heads
    assert attribution_patching(tiny_im, ids, corrupt, metric, site="blocks.*.hook_resid_pre",
                                by="layer").values.shape == (2,)
    # positions: a subset along the pos axis, or patched together for by="head"/"layer"
    full = attribution_patching(tiny_im, ids, corrupt, metric, site="attn.z", by=("layer", "head", "pos"))
    sub = attribution_patching(tiny_im, ids, corrupt, metric, site="attn.z", by="head_pos", positions=[-1, 2],
                               pos_labels=["last", "two"])
    torch.testing.assert_close(sub.effects, full.effects[:, :, [ids.shape[1] - 1, 2]])
    assert sub.labels["pos"] == ["last", "two"]
    together = attribution_patching(tiny_im, ids, corrupt, metric, site="attn.z", by="head", positions=[2, 5])
    torch.testing.assert_close(together.effects, full.effects[:, :, [2, 5]].sum(-1), rtol=1e-5, atol=1e-7)
    for site, by in [("attn.k", "head"), ("attn.q", "head"), ("attn.scores", "head")]:
        f = attribution_patching(tiny_im, ids, corrupt, metric, site=site, by="head_pos", qk_fix=True)
        if site == "attn.k":  # keys patched together: a joint softmax recomputation, not a sum
            t = attribution_patching(tiny_im, ids, corrupt, metric, site=site, by=by, positions=[3], qk_fix=True)
            torch.testing.assert_close(t.effects, f.effects[:, :, 3], rtol=1e-4, atol=1e-7)
        else:  # query rows are independent: the sum over positions
            t = attribution_patching(tiny_im, ids, corrupt, metric, site=site, by=by, positions=[2, 5], qk_fix=True)
            torch.testing.assert_close(t.effects, f.effects[:, :, [2, 5]].sum(-1), rtol=1e-4, atol=1e-7)


def test_bad_input_errors_and_no_context_left(tiny_im, ids):
    im = tiny_im
    corrupt = ids.flip(1)
    with torch.no_grad():
        before = im.model(ids).logits
    with pytest.raises(ValueError, match="scalar"):
        attribution_patching(im, ids, corrupt, lambda lg: lg[:, -1, 3], site="resid_pre")
    with pytest.raises(TypeError, match="scalar torch.Tensor"):
        attribution_patching(im, ids, corrupt, lambda lg: 1.0, site="resid_pre")
    with pytest.raises(ValueError, match="differentiabl"):
        attribution_patching(im, ids, corrupt, lambda lg: lg[:, -1, 3].mean().detach(), site="resid_pre")
    with pytest.raises(ValueError, match="same shape"):
        attribution_patching(im, ids, corrupt[:, :-1], lambda lg: lg.mean(), site="resid_pre")
    with pytest.raises(ValueError, match="by='head'"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_pre", by="head")
    with pytest.raises(KeyError, match="unknown site"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_prex")
    with pytest.raises(ValueError, match="qk_fix"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="attn.z", qk_fix=True)
    with pytest.raises(ValueError, match="steps"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_pre", method="ig", steps=0)
    with pytest.raises(ValueError, match="steps"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_pre", method="ig-input", steps=1.5)
    with pytest.raises(ValueError, match="qk_fix is an AtP correction"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="attn.q", method="ig-input", qk_fix=True)
    with pytest.raises(ValueError, match="method"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_pre", method="gradient")
    with pytest.raises(ValueError, match="layers"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_pre", layers=[5])
    with pytest.raises(ValueError, match="positions"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_pre", positions=[99])
    with pytest.raises(ValueError, match="direction"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_pre", direction="sideways")
    assert active_context() is None
    with torch.no_grad():
        assert torch.equal(im.model(ids).logits, before)
