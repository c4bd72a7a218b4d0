"""Plain AtP and AtP* (``atp.py``): exact where the metric is linear after the site, and GradDrop against
explicit detached backward passes."""

from __future__ import annotations

import pytest
import torch

from mishax_py.studies.activation_patching import activation_patching
from mishax_py.studies.attribution import attribution_patching
from tests.helpers import exact_patching

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


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
