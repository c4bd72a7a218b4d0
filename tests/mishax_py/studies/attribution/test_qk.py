"""The QK fix of AtP* (``qk.py``): exact where the metric is linear after the attention softmax, and the
closed-form key effect against brute force on saturated rows."""

from __future__ import annotations

import math

import pytest
import torch

from mishax_py.studies.attribution import attribution_patching
from mishax_py.studies.attribution.qk import key_effect
from tests.helpers import exact_patching

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


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
