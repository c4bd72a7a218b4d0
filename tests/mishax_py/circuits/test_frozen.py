"""The frozen replacement model's batched backward: the folded attention product equals the model's own gradient."""

from __future__ import annotations

import pytest
import torch

import instrumentation.gemma2 as g2
import instrumentation.gemma3 as g3
import saes
from mishax_py.circuits.frozen import FrozenReplacement
from mishax_py.circuits.transcoders import transcoder_map
from tests.helpers import make_gemma3, make_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _random_tcs(im, kind: str, d_sae: int = 16) -> dict:
    d = im.family.dims.d_model
    g = torch.Generator().manual_seed(3)
    out = {}
    for layer in range(im.n_layers):
        tc = saes.Transcoder(d, d_sae, site=im.layer_site(layer, kind), output_site=im.layer_site(layer, "mlp_out"),
                             activation="relu")
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d, d_sae, generator=g))
            tc.W_dec.copy_(torch.randn(d_sae, d, generator=g))
        out[layer] = tc.requires_grad_(False)
    return out


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_folded_attention_gradient_equals_the_models(family):
    """Every layer takes the shortcut (Gemma 2: sliding and global layers, GQA; Gemma 3: QK norm, 5:1 layers), and
    its gradients equal those through the model's own attention code for random cotangents of every target."""
    if family == "gemma2":
        im, kind = g2.instrument(make_model(seed=2, num_hidden_layers=4)), "ln2_normalized"
    else:
        im, kind = g3.instrument(make_gemma3(seed=2)), "ln2"
    tcs = transcoder_map(im, _random_tcs(im, kind))
    T = 70  # more than one 64-position block: the block-sparse product skips some
    ids = torch.randint(4, 64, (1, T), generator=torch.Generator().manual_seed(0))
    sites = ["embed", *[im.layer_site(layer, "mlp_out") for layer in range(im.n_layers)]]
    with torch.no_grad():
        _, cache = im.run_with_cache(ids, sites=sites)
    sources = {s: cache[s] for s in sites}
    fast = FrozenReplacement(im, ids, tcs, sources)
    slow = FrozenReplacement(im, ids, tcs, sources, shortcut=False)
    assert fast.shortcut_layers == list(range(im.n_layers)) and slow.shortcut_layers == []
    g = torch.Generator().manual_seed(1)
    cots = [torch.randn(5, *fast.target_shape(t), generator=g) for t in fast.targets]
    for a, b in zip(fast.backward(cots), slow.backward(cots), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
