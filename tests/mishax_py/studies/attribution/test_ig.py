"""Integrated gradients (``ig.py``, ``method="ig"`` and ``"ig-input"``): completeness, chunking, and the
input path against a written-out loop."""

from __future__ import annotations

import pytest
import torch

from mishax_py.interventions import Hook
from mishax_py.studies.attribution import attribution_patching

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


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
