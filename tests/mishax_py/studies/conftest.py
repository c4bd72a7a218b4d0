"""The fixtures of the studies' tests: the patching model and prompt pair, and the linear-tail model.

``im`` and ``prompts`` are shared by activation patching, its packed engine, path patching and the
study convention (with :func:`tests.helpers.two_position_metric`); ``linear_tail`` by the AtP and
QK-fix tests, where the estimate must be exact.
"""

from __future__ import annotations

import pytest
import torch

import instrumentation.gemma2 as g2
from tests.helpers import linearise_norm, make_model


@pytest.fixture(scope="module")
def im():
    """The shared tiny Gemma 2 (GQA, soft-caps, sliding window 4 < 7 tokens) with sharper attention, so
    that patching queries, keys and patterns moves the metric visibly."""
    model = make_model(seed=5)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return g2.instrument(model)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    clean = torch.randint(4, 64, (2, 7), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 11) % 60 + 4  # both rows differ at 2, row 0 also at 5
    corrupt[0, 5] = (clean[0, 5] + 5) % 60 + 4
    return clean, corrupt


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


