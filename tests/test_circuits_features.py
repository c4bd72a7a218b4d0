"""Sparse feature circuits: node effects (AtP/IG), edges (Jacobian-vector products), ablation metrics."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

import instrumentation.gemma2 as g2
import saes
from mishax_py.circuits import ablate_complement, feature_circuit
from mishax_py.runtime import active_context
from mishax_py.studies.attribution.atp import attribution_patching, site_gradients

SITES = ["blocks.0.resid_post", "blocks.1.resid_mid"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def train_sae(im, site: str, d_sae: int = 64, steps: int = 300, seed: int = 0):
    """A small ReLU SAE trained for a few hundred Adam steps on random prompts."""
    ids = torch.randint(4, 64, (48, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _, cache = im.run_with_cache(ids, sites=[site])
    x = cache[site].reshape(-1, cache[site].shape[-1])
    sae = saes.ReLUSAE(x.shape[-1], d_sae, site=site)
    torch.manual_seed(seed)
    with torch.no_grad():
        sae.W_dec.normal_(0, 0.3 * d_sae ** -0.5)
        sae.W_enc.copy_(sae.W_dec.T * 3)
        sae.b_enc.fill_(-0.1)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(steps):
        f = sae.encode(x)
        loss = ((sae.decode(f) - x) ** 2).sum(-1).mean() + 2e-2 * f.abs().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return sae.requires_grad_(False)


@pytest.fixture(scope="module")
def setup():
    im = g2.instrument(make_model(seed=0))
    sae_map = {s: train_sae(im, s, seed=i) for i, s in enumerate(SITES)}
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(4, 64, (4, 8), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(4, 64, (4,), generator=g)
    corrupt[:, 5] = 7

    def metric(logits):
        return (logits[:, -1, 5] - logits[:, -1, 9]).mean()

    return im, sae_map, clean, corrupt, metric


def test_node_effects_decompose_site_attribution(setup):
    """Per (site, position), feature effects + error effect = AtP of patching that site at that position."""
    im, sae_map, clean, corrupt, metric = setup
    for method in ("atp", "ig"):
        c = feature_circuit(im, clean, sae_map, metric, corrupt, method=method, steps=6, edges=False)
        assert c.ablation == "patch" and c.method == method
        for s in SITES:
            layer, site = int(s.split(".")[1]), s.split(".", 2)[2]
            ref = attribution_patching(im, clean, corrupt, metric, site, direction="noise", layers=[layer],
                                       method=method, steps=6)
            total = c.effects[s].sum(-1) + c.error_effects[s]
            torch.testing.assert_close(total, ref.effects[0], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert c.metric_clean == pytest.approx(float(metric(im.run(clean))), abs=1e-5)


def test_atp_node_effect_is_exact_when_linear():
    """A residual SAE on the last layer's output of a model whose tail is linear: single-node patching is AtP."""
    from test_attribution import linearise_norm

    model = make_model(seed=1, final_logit_softcapping=None)
    linearise_norm(model.model.norm)
    im = g2.instrument(model)
    site = "blocks.1.resid_post"
    sae = train_sae(im, site, steps=150)
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(4, 64, (3, 6), generator=g), torch.randint(4, 64, (3, 6), generator=g)

    def metric(logits):
        return logits[:, -1, 3].mean() - logits[:, 2, 8].mean()

    c = feature_circuit(im, clean, {site: sae}, metric, corrupt, top_k=4, edges=False)
    with torch.no_grad():
        _, cc = im.run_with_cache(clean, sites=[site])
        _, kc = im.run_with_cache(corrupt, sites=[site])
        f, fp = sae.encode(cc[site]), sae.encode(kc[site])
        base = float(metric(im.run(clean)))
    checked = 0
    for node in c.nodes:
        _s, pos, feat = node
        if feat < 0:
            delta = (kc[site] - sae.decode(fp)) - (cc[site] - sae.decode(f))
            delta = delta[:, pos]
        else:
            delta = (fp - f)[:, pos, feat, None] * sae.W_dec[feat]

        with torch.no_grad():
            exact = float(metric(im.run(clean, interventions={site: _add_at(pos, delta)}))) - base
        assert c.effect(node) == pytest.approx(exact, rel=1e-3, abs=1e-5), node
        checked += 1
    assert checked == 4


def _add_at(pos, delta):
    def hook(v):
        v = v.clone()
        v[:, pos] += delta
        return v

    return hook


def test_edges_match_finite_differences(setup):
    """edge(u -> d) = dm/dd * dd/du * du, checked by perturbing u alone and re-encoding d."""
    im, sae_map, clean, corrupt, metric = setup
    c = feature_circuit(im, clean, sae_map, metric, corrupt, top_k=6, edge_threshold=0.0)
    assert c.edges and all(u[0] == SITES[0] and d[0] == SITES[1] for u, d in c.edges)
    up, down = SITES
    sae_u, sae_d = sae_map[up], sae_map[down]
    _, grads, _ = site_gradients(im, clean, metric, [down])
    g_d = grads[down]
    with torch.no_grad():
        _, cc = im.run_with_cache(clean, sites=[up])
        _, kc = im.run_with_cache(corrupt, sites=[up])
        f_u, fp_u = sae_u.encode(cc[up]), sae_u.encode(kc[up])
        e_u, ep_u = cc[up] - sae_u.decode(f_u), kc[up] - sae_u.decode(fp_u)

    def downstream_value(node_d, shift):
        _s, pos, feat = node_d
        with torch.no_grad():
            _, cache = im.run_with_cache(clean, sites=[down], interventions={up: lambda v: v + shift})
            y = cache[down]
            if feat < 0:  # dm/de . e
                return float((g_d[:, pos] * (y - sae_d.decode(sae_d.encode(y)))[:, pos]).sum())
            gf = g_d[:, pos] @ sae_d.W_dec[feat]
            return float((gf * sae_d.encode(y)[:, pos, feat]).sum())

    strongest = sorted(c.edges.items(), key=lambda kv: -abs(kv[1]))[:4]
    for (u, d), w in strongest:
        _s, pos, feat = u
        direction = torch.zeros_like(cc[up])
        if feat < 0:
            direction[:, pos] = (ep_u - e_u)[:, pos]
        else:
            direction[:, pos] = (fp_u - f_u)[:, pos, feat, None] * sae_u.W_dec[feat]
        eps = 1e-3
        fd = (downstream_value(d, eps * direction) - downstream_value(d, -eps * direction)) / (2 * eps)
        assert w == pytest.approx(fd, rel=2e-2, abs=1e-6), (u, d)


def test_faithfulness_and_completeness_numbers(setup):
    im, sae_map, clean, corrupt, metric = setup
    for ablation, kw in (("mean", {}), ("patch", {"corrupt_ids": corrupt}), ("zero", {})):
        c = feature_circuit(im, clean, sae_map, metric, ablation=ablation, node_threshold=1e-3, edges=False, **kw)
        full = c.evaluate(im, metric, nodes=c.all_nodes())
        assert full["faithfulness"] == pytest.approx(1.0, abs=1e-5)
        assert full["completeness"] == pytest.approx(0.0, abs=1e-5)
        empty = c.evaluate(im, metric, nodes=[])
        assert empty["faithfulness"] == pytest.approx(0.0, abs=1e-5)
        assert empty["completeness"] == pytest.approx(1.0, abs=1e-5)
        with torch.no_grad():  # the spliced model with every node kept is the model
            assert full["m_full"] == pytest.approx(float(metric(im.run(clean))), abs=1e-4)
        res = c.evaluate(im, metric)
        assert set(res) >= {"faithfulness", "completeness", "n_nodes"} and res["n_nodes"] == len(c.nodes)
        assert c.metric_patch == pytest.approx(res["m_empty"], abs=1e-6)
    # all nodes with |IE| above a threshold, keeping more nodes, ends up at faithfulness 1
    c = feature_circuit(im, clean, sae_map, metric, corrupt, node_threshold=0.0, edges=False)
    assert c.evaluate(im, metric)["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    ivs = ablate_complement(c, c.nodes[:3])
    assert set(ivs) == set(SITES)
    assert active_context() is None


def test_bad_input(setup):
    im, sae_map, clean, corrupt, metric = setup
    with pytest.raises(ValueError, match="no SAE for the requested site"):
        feature_circuit(im, clean, sae_map, metric, sites=["blocks.0.resid_post", "blocks.1.resid_post"])
    with pytest.raises(ValueError, match="width"):
        feature_circuit(im, clean, {"blocks.0.mlp.post": sae_map[SITES[0]]}, metric)
    with pytest.raises(ValueError, match="scalar"):
        feature_circuit(im, clean, sae_map, lambda lg: lg[:, -1, 5], corrupt)
    with pytest.raises(ValueError, match="corrupt_ids"):
        feature_circuit(im, clean, sae_map, metric, ablation="patch")
    with pytest.raises(ValueError, match="same shape"):
        feature_circuit(im, clean, sae_map, metric, corrupt[:, :-1])
    tc = saes.Transcoder(32, 8, site="blocks.0.ln2_normalized", output_site="blocks.0.mlp_out")
    with pytest.raises(ValueError, match="transcoders"):
        feature_circuit(im, clean, [tc], metric)
    with pytest.raises(TypeError, match="encode"):
        feature_circuit(im, clean, {SITES[0]: object()}, metric)
    assert active_context() is None
