"""Sparse feature circuits: node effects (AtP/IG), edges (Jacobian-vector products), ablation metrics."""

from __future__ import annotations

import inspect

import pytest
import torch

import instrumentation.gemma2 as g2
import saes
from mishax_py.circuits import ablate_complement, feature_circuit
from mishax_py.runtime import active_context
from mishax_py.studies.attribution import attribution_patching, site_gradients
from tests.helpers import linearise_norm, make_model

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
    """Per (site, position), feature effects + error effect = AtP of patching that site at that position,
    in both directions (denoise: the clean values patched into the corrupted run)."""
    im, sae_map, clean, corrupt, metric = setup
    for direction, run in (("noise", clean), ("denoise", corrupt)):
        for method in ("atp", "ig"):
            c = feature_circuit(im, clean, corrupt, metric, saes=sae_map, direction=direction, method=method,
                                steps=6, edges=False)
            assert c.ablation == "patch" and c.method == method and c.direction == direction
            assert torch.equal(c.clean_ids, run)
            for s in SITES:
                layer, site = int(s.split(".")[1]), s.split(".", 2)[2]
                ref = attribution_patching(im, clean, corrupt, metric, site=site, direction=direction,
                                           layers=[layer], method=method, steps=6)
                total = c.effects[s].sum(-1) + c.error_effects[s]
                torch.testing.assert_close(total, ref.effects[0], rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            assert c.metric_clean == pytest.approx(float(metric(im.run(run))), abs=1e-5)


def test_signature_follows_the_study_convention():
    """(im, clean_ids, corrupt_ids, metric, *, ...): everything after the metric keyword-only, the common
    keywords in the convention's order, method names the estimator, IG steps default to 16."""
    params = inspect.signature(feature_circuit).parameters
    names = list(params)
    assert names[:4] == ["im", "clean_ids", "corrupt_ids", "metric"]
    assert all(params[n].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for n in names[:4])
    assert all(params[n].default is inspect.Parameter.empty for n in names[:4])  # corrupt_ids=None is explicit
    rest = [params[n] for n in names[4:]]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest[:-1])
    assert rest[-1].kind is inspect.Parameter.VAR_KEYWORD and rest[-1].name == "hf_kwargs"
    assert params["saes"].default is inspect.Parameter.empty  # required, by keyword
    common = [n for n in names if n in ("direction", "batch_size", "progress", "method")]
    assert common == ["direction", "batch_size", "progress", "method"]
    assert params["direction"].default == "noise" and params["method"].default == "atp"
    assert params["steps"].default == 16


def test_direction_vocabulary(setup):
    im, sae_map, clean, corrupt, metric = setup
    with pytest.warns(DeprecationWarning, match="noising"):
        old = feature_circuit(im, clean, corrupt, metric, saes=sae_map, direction="noising", edges=False)
    new = feature_circuit(im, clean, corrupt, metric, saes=sae_map, direction="noise", edges=False)
    assert old.direction == "noise" and old.nodes == new.nodes
    with pytest.raises(ValueError, match="direction must be"):
        feature_circuit(im, clean, corrupt, metric, saes=sae_map, direction="sideways")
    with pytest.raises(ValueError, match="needs corrupt_ids"):
        feature_circuit(im, clean, None, metric, saes=sae_map, direction="denoise")
    with pytest.raises(ValueError, match="ablation='patch'"):
        feature_circuit(im, clean, corrupt, metric, saes=sae_map, direction="denoise", ablation="mean")


def test_atp_node_effect_is_exact_when_linear():
    """A residual SAE on the last layer's output of a model whose tail is linear: single-node patching is AtP."""
    model = make_model(seed=1, final_logit_softcapping=None)
    linearise_norm(model.model.norm)
    im = g2.instrument(model)
    site = "blocks.1.resid_post"
    sae = train_sae(im, site, steps=150)
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(4, 64, (3, 6), generator=g), torch.randint(4, 64, (3, 6), generator=g)

    def metric(logits):
        return logits[:, -1, 3].mean() - logits[:, 2, 8].mean()

    c = feature_circuit(im, clean, corrupt, metric, saes={site: sae}, top_k=4, edges=False)
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
    c = feature_circuit(im, clean, corrupt, metric, saes=sae_map, top_k=6, edge_threshold=0.0)
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
    for ablation, corrupt_ids in (("mean", None), ("patch", corrupt), ("zero", None)):
        c = feature_circuit(im, clean, corrupt_ids, metric, saes=sae_map, ablation=ablation, node_threshold=1e-3,
                            edges=False)
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
    c = feature_circuit(im, clean, corrupt, metric, saes=sae_map, node_threshold=0.0, edges=False)
    assert c.evaluate(im, metric)["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    ivs = ablate_complement(c, c.nodes[:3])
    assert set(ivs) == set(SITES)
    assert active_context() is None


def test_bad_input(setup):
    im, sae_map, clean, corrupt, metric = setup
    with pytest.raises(ValueError, match="no SAE for the requested site"):
        feature_circuit(im, clean, None, metric, saes=sae_map, sites=["blocks.0.resid_post", "blocks.1.resid_post"])
    with pytest.raises(ValueError, match="width"):
        feature_circuit(im, clean, None, metric, saes={"blocks.0.mlp.post": sae_map[SITES[0]]})
    with pytest.raises(ValueError, match="scalar"):
        feature_circuit(im, clean, corrupt, lambda lg: lg[:, -1, 5], saes=sae_map)
    with pytest.raises(ValueError, match="corrupt_ids"):
        feature_circuit(im, clean, None, metric, saes=sae_map, ablation="patch")
    with pytest.raises(ValueError, match="same shape"):
        feature_circuit(im, clean, corrupt[:, :-1], metric, saes=sae_map)
    tc = saes.Transcoder(32, 8, site="blocks.0.ln2_normalized", output_site="blocks.0.mlp_out")
    with pytest.raises(ValueError, match="transcoders"):
        feature_circuit(im, clean, None, metric, saes=[tc])
    with pytest.raises(TypeError, match="encode"):
        feature_circuit(im, clean, None, metric, saes={SITES[0]: object()})
    with pytest.raises(TypeError, match="positional"):  # the SAEs are keyword-only now
        feature_circuit(im, clean, corrupt, metric, sae_map)
    assert active_context() is None


def test_evaluate_against_runs_written_out(setup):
    """``evaluate`` against runs that share none of its ablation code: with ``ablation="patch"``, m(empty)
    is the clean run with every SAE site -- features and error nodes, i.e. the whole site value -- patched
    from the corrupted run by a plain ``Patch``; m(full) is the plain clean run; m(circuit) is the clean run
    with a hand-written splice at each site that keeps the circuit's nodes and takes every other feature and
    error node from the corrupted run (features re-encoded in the run, as ablations upstream change them)."""
    from mishax_py.interventions import Patch

    im, sae_map, clean, corrupt, metric = setup
    c = feature_circuit(im, clean, corrupt, metric, saes=sae_map, top_k=4, edges=False)
    assert c.ablation == "patch" and any(n[2] < 0 for n in c.all_nodes())
    res = c.evaluate(im, metric)
    with torch.no_grad():
        _, src = im.run_with_cache(corrupt, sites=SITES)
        m_patched = float(metric(im.run(clean, {s: Patch(src) for s in SITES})))
        m_clean = float(metric(im.run(clean)))
        m_corrupt = float(metric(im.run(corrupt)))
    assert abs(m_patched - m_clean) > 1e-2  # the patch moves the metric
    assert res["m_empty"] == pytest.approx(m_patched, abs=1e-5)
    assert c.metric_patch == pytest.approx(m_patched, abs=1e-5)
    assert res["m_full"] == pytest.approx(m_clean, abs=1e-5)
    # the last SAE site is the whole residual stream: patching it entirely is the corrupted run
    assert m_patched == pytest.approx(m_corrupt, abs=1e-5)

    def keep_nodes(site):
        sae = sae_map[site]
        keep_f = torch.zeros(clean.shape[1], sae.d_sae, dtype=torch.bool)
        keep_e = torch.zeros(clean.shape[1], dtype=torch.bool)
        for s, pos, feat in c.nodes:
            if s == site and feat < 0:
                keep_e[pos] = True
            elif s == site:
                keep_f[pos, feat] = True
        x_src = src[site]
        f_src = sae.encode(x_src)
        e_src = x_src - sae.decode(f_src)

        def hook(x):
            f = sae.encode(x)
            e = x - sae.decode(f)
            f = torch.where(keep_f, f, f_src)
            e = torch.where(keep_e[:, None], e, e_src)
            return sae.decode(f) + e

        return hook

    with torch.no_grad():
        m_circ = float(metric(im.run(clean, {s: keep_nodes(s) for s in SITES})))
    assert res["m_circuit"] == pytest.approx(m_circ, abs=1e-5)
    assert abs(m_circ - m_patched) > 1e-3 and abs(m_circ - m_clean) > 1e-3
