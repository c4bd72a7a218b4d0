"""Attribution graphs with cross-layer transcoders (circuit-tracer's CLT arithmetic).

A CLT feature at ``(L, p, i)`` with activation ``a`` writes ``a * W_dec[L -> L'][i]`` to the MLP output
of every layer ``L' >= L``; its edge to a target sums its direct effects through all of them. Checked
on a random Gemma 3 and a random Gemma 2 with random CLTs: completeness; equality with a graph of
single-layer transcoders when the cross-layer decoders are zero (a second, independent code path);
and a feature's edge to a logit against a perturbation of the frozen replacement model written out
with hooks (no autograd).
"""

from __future__ import annotations

import pytest
import torch

import instrumentation.gemma2 as g2
import instrumentation.gemma3 as g3
import saes
from mishax_py import InstrumentedModel
from mishax_py.circuits import attribution_graph
from mishax_py.circuits.build import norm_scale
from mishax_py.interventions import Hook
from saes.clt import CrossLayerTranscoder
from tests.helpers import make_gemma3, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

D_SAE = 16


def random_clt(im: InstrumentedModel, input_kind: str, *, seed: int, skip: bool = False,
               cross: bool = True) -> CrossLayerTranscoder:
    """A CLT over every layer with random weights (about a third of the features fire on these models)."""
    d = im.family.dims.d_model
    n = im.n_layers
    g = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(n, d, D_SAE, input_kind=input_kind, skip=skip)
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(n, d, D_SAE, generator=g) * 2.0 / d**0.5)
        clt.b_enc.copy_(torch.randn(n, D_SAE, generator=g) * 0.1)
        clt.threshold.copy_(torch.rand(n, D_SAE, generator=g) * 0.5)
        clt.b_dec.copy_(torch.randn(n, d, generator=g) * 0.1)
        for j in range(n):
            W = torch.randn(n - j, D_SAE, d, generator=g) / D_SAE**0.5
            if not cross:
                W[1:] = 0
            clt.W_dec[j].copy_(W)
        if clt.W_skip is not None:
            clt.W_skip.copy_(torch.randn(n, d, d, generator=g) * 0.3 / d**0.5)
    clt.requires_grad_(False)
    return clt


def models() -> dict[str, tuple[InstrumentedModel, str]]:
    return {
        "gemma3": (g3.instrument(make_gemma3(seed=5)), "ln2"),
        "gemma2": (g2.instrument(make_model(seed=6, num_hidden_layers=4)), "ln2_normalized"),
    }


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
@pytest.mark.parametrize("skip", [False, True])
def test_a_clt_graph_is_complete(family: str, skip: bool) -> None:
    im, kind = models()[family]
    clt = random_clt(im, kind, seed=1, skip=skip)
    ids = torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    graph = attribution_graph(im, ids, clt, batch_size=16)
    assert graph.transcoder_layers == list(range(im.n_layers))
    assert graph.features.shape[0] > 20
    err = graph.completeness_error()
    assert err <= 1e-4, err
    # the cross-layer writes are real edges: zeroing them changes the feature -> logit edges
    flat = attribution_graph(im, ids, random_clt(im, kind, seed=1, skip=skip, cross=False), batch_size=16)
    n_f = graph.features.shape[0]
    assert torch.equal(graph.features, flat.features)
    assert (graph.adjacency[-1, :n_f] - flat.adjacency[-1, :n_f]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_a_clt_without_cross_layer_decoders_gives_the_single_layer_transcoder_graph(family: str) -> None:
    im, kind = models()[family]
    clt = random_clt(im, kind, seed=3, skip=True, cross=False)
    tcs = {}
    for L in range(im.n_layers):  # the same weights as saes.Transcoder (the single-layer code path)
        tc = saes.Transcoder(clt.d_in, D_SAE, site=im.layer_site(L, kind), output_site=im.layer_site(L, "mlp_out"),
                             skip=True)
        with torch.no_grad():
            tc.W_enc.copy_(clt.W_enc[L])
            tc.b_enc.copy_(clt.b_enc[L])
            assert tc.threshold is not None and tc.W_skip is not None
            tc.threshold.copy_(clt.threshold[L])
            tc.W_dec.copy_(clt.W_dec[L][0])
            tc.b_dec.copy_(clt.b_dec[L])
            tc.W_skip.copy_(clt.W_skip[L])
        tcs[L] = tc.requires_grad_(False)
    ids = torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(4))
    a = attribution_graph(im, ids, clt, batch_size=8)
    b = attribution_graph(im, ids, tcs, batch_size=8)
    assert torch.equal(a.features, b.features)
    assert torch.allclose(a.activations, b.activations, atol=1e-6)
    assert (a.adjacency - b.adjacency).abs().max() < 1e-5
    assert (a.bias - b.bias).abs().max() < 1e-5


def frozen_logit(im: InstrumentedModel, ids: torch.Tensor, token: int, mlp_delta: dict[int, torch.Tensor]) -> float:
    """The de-meaned pre-soft-cap logit of ``token`` in the frozen replacement model, written out as hooks:
    attention patterns and the family's norm scales fixed at their values on ``ids``, every MLP output a
    constant (its value on ``ids``) plus ``mlp_delta[layer]`` ``[pos, d_model]``."""
    n = im.n_layers
    norms = list(im.family.frozen_norms)
    patterns = [im.layer_site(L, "attn.pattern") for L in range(n)]
    mlps = [im.layer_site(L, "mlp_out") for L in range(n)]
    sites = sorted({s for pair in norms for s in pair} | set(patterns) | set(mlps) | {"ln_final"})
    with torch.no_grad():
        _, base = im.run_with_cache(ids, sites=sites)
        current: dict[str, torch.Tensor] = {}
        hooks: dict[str, list[Hook]] = {}

        def add(site: str, fn: object) -> None:
            hooks.setdefault(site, []).append(Hook(fn))  # type: ignore[arg-type]

        for x_site, y_site in norms:
            c = norm_scale(base[x_site], base[y_site])
            add(x_site, lambda v, s=x_site: current.__setitem__(s, v))
            add(y_site, lambda v, s=x_site, c=c: current[s] * c.to(v.dtype))
        for L in range(n):
            add(patterns[L], lambda v, p=base[patterns[L]]: p.to(v.dtype))
            new = base[mlps[L]].clone()
            if L in mlp_delta:
                new[0] = new[0] + mlp_delta[L].to(new.dtype)
            add(mlps[L], lambda v, y=new: y.to(v.dtype))
        _, cache = im.run_with_cache(ids, sites=["ln_final"], interventions=hooks)
        W_U = im.model.get_output_embeddings().weight.float()
        logits = cache["ln_final"][0, -1].float() @ W_U.T
        return float(logits[token] - logits.mean())


def test_a_clt_feature_edge_to_a_logit_is_its_effect_through_every_layer_it_writes() -> None:
    im, kind = models()["gemma3"]
    clt = random_clt(im, kind, seed=7)
    ids = torch.randint(3, 64, (1, 10), generator=torch.Generator().manual_seed(8))
    graph = attribution_graph(im, ids, clt, batch_size=16)
    n_f = graph.features.shape[0]
    token = int(graph.logit_tokens[0])
    logit_row = graph.adjacency[n_f + im.n_layers * ids.shape[1] + ids.shape[1]]
    # features of the first two layers at the last positions: they write to (almost) every layer after them
    feats = [i for i in range(n_f) if int(graph.features[i, 0]) <= 1 and int(graph.features[i, 1]) >= 6][:4]
    assert len(feats) == 4
    base = frozen_logit(im, ids, token, {})
    for i in feats:
        L, p, f = (int(v) for v in graph.features[i])
        a = float(graph.activations[i])
        delta = {}
        for Lp in range(L, im.n_layers):  # remove the feature's writes from every layer it reaches
            d = torch.zeros(ids.shape[1], clt.d_out)
            d[p] = -a * clt.decoder(L, Lp)[f]
            delta[Lp] = d
        effect = base - frozen_logit(im, ids, token, delta)
        assert abs(float(logit_row[i]) - effect) < 1e-4 * max(1.0, abs(effect)), (i, float(logit_row[i]), effect)
        own_only = base - frozen_logit(im, ids, token, {L: delta[L]})
        assert abs(own_only - effect) > 1e-4  # the later layers' writes matter to this edge


def test_the_replacement_model_of_a_clt_is_the_model_and_clamps_follow_the_graph() -> None:
    """replacement_interventions with a CLT: no clamp reproduces the model; a small clamp of an early feature
    (which writes to every later layer) moves the logit node by what the graph's clamp_effect says."""
    from mishax_py.circuits import replacement_interventions

    im, kind = models()["gemma3"]
    clt = random_clt(im, kind, seed=11, skip=True)
    ids = torch.randint(3, 64, (1, 10), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        plain = im.run(ids)
        again = im.run(ids, interventions=replacement_interventions(im, ids, clt))
    assert (again - plain).abs().max() <= 1e-5
    graph = attribution_graph(im, ids, clt, batch_size=16)
    target = graph.logit_index(0)
    tok = int(graph.logit_tokens[0])
    W_U = im.model.get_output_embeddings().weight.detach()

    def logit_node(interventions: object = None) -> float:
        with torch.no_grad():
            _, cache = im.run_with_cache(ids, sites=["ln_final"], interventions=interventions)  # type: ignore[arg-type]
        pre = cache["ln_final"][0, -1] @ W_U.T
        return float(pre[tok] - pre.mean())

    base = logit_node()
    sel = (graph.features[:, 0] == 0).nonzero().flatten()
    i = int(sel[graph.ablation_effects(target)[sel].abs().argmax()])
    _, pos, feat = (int(v) for v in graph.features[i])
    value = 0.99 * float(graph.activations[i])
    predicted = float(graph.clamp_effect(i, value)[target])
    moved = logit_node(replacement_interventions(im, ids, clt, [(0, pos, feat, value)])) - base
    assert abs(predicted) > 1e-5
    assert moved == pytest.approx(predicted, rel=1e-3, abs=1e-6)
