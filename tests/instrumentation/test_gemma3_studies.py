"""Every study runs unchanged on Gemma 3 (QK-norm, 5:1 sliding/global layers, GQA), each against an oracle.

A random 6-layer Gemma 3 (window 8, 24-token prompts, so the sliding layers cut the context):
walk with replacements, generation under ``im.intervene``, path patching in closed form, ``atp-layer``
through the QK-norm against a written-out reference, AtP*'s QK fix against exact patching, feature
circuits with JumpReLU SAEs, attribution graphs with transcoders on ``ln2 -> mlp_out`` and the local
replacement model; prompts with chat-template tokens and ``zero_positions``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import instrumentation.gemma3 as g3
import saes
from mishax_py import InstrumentedModel
from mishax_py.circuits import attribution_graph, feature_circuit, replacement_interventions
from mishax_py.interventions import EmptySelectionWarning, Hook, Steer
from mishax_py.studies.activation_patching import activation_patching
from mishax_py.studies.attribution import attribution_patching
from mishax_py.studies.attribution.plan import site_layout
from mishax_py.studies.path_patching import path_patching
from tests.helpers import element_slices, exact_patching, linearise_norm, make_gemma3, train_transcoder
from tests.helpers import two_position_metric as metric

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS, T = 6, 24


@pytest.fixture(scope="module")
def im() -> InstrumentedModel:
    return g3.instrument(make_gemma3(seed=11))


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(4, 64, (2, T), generator=g)
    corrupt = clean.clone()
    corrupt[:, 3] = torch.randint(4, 64, (2,), generator=g)
    corrupt[:, 17] = torch.randint(4, 64, (2,), generator=g)
    return clean, corrupt


def _nonlinear_metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].log_softmax(-1)[:, 5].mean() + (logits[:, 4, 7] - logits[:, 4, 9]).mean()


# -- walk and generation -----------------------------------------------------------------------------


def test_walk_with_replacements_equals_hooks_in_run(im, pair):
    ids = pair[0]
    seen = []
    with im.walk(ids) as w:
        for site, value in w:
            seen.append(site)
            if site == "blocks.1.attn.q_normed":
                w.replace(value * -1.0)
            if site == "blocks.4.mlp_out":
                w.replace(value * 0)
    ref = im.run(ids, interventions={"blocks.1.attn.q_normed": Hook(lambda v: v * -1.0),
                                     "blocks.4.mlp_out": Hook(lambda v: v * 0)})
    assert seen == im.site_names()
    assert torch.equal(w.output, ref) and not torch.equal(ref, im.run(ids))


def test_generation_steering_new_tokens_equals_a_hand_greedy_loop(im):
    """Steer(positions="new") inside im.intervene with a KV cache (sliding-window cache: 6 + 10 > window 8)
    equals re-running the growing sequence each step with the steer on every position past the prompt."""
    prompt = torch.tensor([[2, 5, 9, 13, 7, 40], [2, 8, 31, 17, 40, 41]])
    n_new, site = 10, "blocks.2.resid_post"
    vec = torch.randn(32, generator=torch.Generator().manual_seed(1)) * 6

    def generate(ivs: dict) -> torch.Tensor:
        with torch.no_grad(), im.intervene(ivs):
            return im.model.generate(prompt, max_new_tokens=n_new, do_sample=False, pad_token_id=0,
                                     eos_token_id=None, use_cache=True)

    out, plain = generate({site: Steer(vec, positions="new")}), generate({})
    seq = prompt
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptySelectionWarning)
        for _ in range(n_new):
            steer = {site: Steer(vec, positions=slice(prompt.shape[1], None))}
            seq = torch.cat([seq, im.run(seq, interventions=steer)[:, -1].argmax(-1, keepdim=True)], 1)
        plain_ref = prompt
        for _ in range(n_new):
            plain_ref = torch.cat([plain_ref, im.run(plain_ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq) and torch.equal(plain, plain_ref)
    assert not torch.equal(out, plain)


# -- path patching ---------------------------------------------------------------------------------


def _attn_out(layer_module, z: torch.Tensor) -> torch.Tensor:
    """What a Gemma 3 decoder layer adds to the residual stream for head outputs z [batch, pos, head, d_head]."""
    return layer_module.post_attention_layernorm(layer_module.self_attn.o_proj(z.flatten(-2)))


def test_path_patching_to_the_logits_and_to_a_query_in_closed_form(im, pair):
    """Receiver = the last resid_post with MLPs frozen: the residual is embed + sum of attention outputs
    (sender heads from the corrupt run) + clean MLP outputs; no final soft-cap on Gemma 3. Receiver = a
    query (before the QK-norm): q_proj of the first layer's closed-form residual."""
    clean, corrupt = pair
    model = im.model
    senders = [(0, 1), (2, 3), (2, 0)]
    got = path_patching(im, clean, corrupt, metric, senders=senders, receivers=[f"blocks.{N_LAYERS - 1}.resid_post"],
                        freeze_mlps=True)
    with torch.no_grad():
        _, cc = im.run_with_cache(clean)
        _, xc = im.run_with_cache(corrupt)

        def mixed(layer, senders):
            z = cc[f"blocks.{layer}.attn.z"].clone()
            for sl, sh in senders:
                if sl == layer:
                    z[:, :, sh] = xc[f"blocks.{layer}.attn.z"][:, :, sh]
            return z

        resid = cc["embed"]
        for layer, mod in enumerate(model.model.layers):
            resid = resid + _attn_out(mod, mixed(layer, senders)) + cc[f"blocks.{layer}.mlp_out"]
        assert model.config.final_logit_softcapping is None
        want = float(metric(model.lm_head(model.model.norm(resid))))
        clean_metric = float(metric(im.run(clean)))
    assert abs(got - want) < 1e-5 and abs(got - clean_metric) > 1e-4

    got_q = path_patching(im, clean, corrupt, metric, senders=[(0, 1)], receivers=[(1, 2, "q")], freeze_mlps=True)
    mod0, mod1 = model.model.layers[:2]
    with torch.no_grad():
        resid = cc["embed"] + _attn_out(mod0, mixed(0, [(0, 1)])) + cc["blocks.0.mlp_out"]
        q = mod1.self_attn.q_proj(mod1.input_layernorm(resid)).unflatten(-1, (-1, 8))

        def set_q(v):
            v = v.clone()
            v[:, :, 2] = q[:, :, 2]
            return v

        want_q = float(metric(im.run(clean, {"blocks.1.attn.q": Hook(set_q)})))
    assert abs(got_q - want_q) < 1e-5 and abs(got_q - clean_metric) > 1e-6


# -- attribution: atp-layer through the QK-norm, AtP*'s QK fix -----------------------------------------


def _atp_layer_reference(im, source, target, site, by, layers):
    """Per element: exact patching up to layer L's resid_post, then the metric's gradient there.

    Every site kind used here (attn.q, attn.k, attn.q_normed, resid_pre) is read by layer L's own
    attention, so layer L is where the exact part stops (``attn.z`` and later would stop at L + 1).
    """
    with torch.no_grad():
        _, src = im.run_with_cache(source, sites=[f"blocks.{L}.{site}" for L in layers])
    out = []
    for L in layers:
        name, post = f"blocks.{L}.{site}", f"blocks.{L}.resid_post"
        kept = {}

        def keep(v, kept=kept):
            kept["v"] = v.detach().requires_grad_(True)
            return kept["v"]

        with torch.enable_grad():
            (grad,) = torch.autograd.grad(_nonlinear_metric(im.run(target, interventions={post: Hook(keep)})),
                                          [kept["v"]])
        vals = []
        for row in element_slices(site_layout(im.site_info(name).dims), by, src[name].shape):
            for ix in row:
                def patch(v, ix=ix, s=src[name]):
                    v = v.clone()
                    v[ix] = s[ix]
                    return v

                with torch.no_grad():
                    _, c = im.run_with_cache(target, sites=[post], interventions={name: Hook(patch)})
                vals.append(float(((c[post] - kept["v"].detach()) * grad).sum()))
        out.append(torch.tensor(vals))
    return torch.stack(out)


@pytest.mark.parametrize(("site", "by"), [("attn.q", "head"), ("attn.k", "head"), ("attn.q_normed", "head"),
                                          ("resid_pre", "pos")])
def test_atp_layer_through_the_qk_norm_matches_a_written_out_reference(im, pair, site, by):
    clean, corrupt = pair
    layers = [1, 5]  # a sliding and the global layer
    res = attribution_patching(im, clean, corrupt, _nonlinear_metric, site=site, by=by, method="atp-layer",
                               layers=layers)
    ref = _atp_layer_reference(im, clean, corrupt, site, by, layers)  # denoise: clean values into the corrupt run
    scale = float(ref.abs().max())
    assert scale > 1e-6
    assert float((res.effects - ref).abs().max()) <= min(1e-4, 1e-2 * scale), (site, by)


def test_atp_layer_is_exact_patching_past_the_last_layer(im, pair):
    clean, corrupt = pair
    last = [N_LAYERS - 1]
    for site, by in (("attn.z", "head"), ("resid_post", "pos")):
        est = attribution_patching(im, clean, corrupt, _nonlinear_metric, site=site, by=by, method="atp-layer",
                                   layers=last)
        with torch.no_grad():
            exact = activation_patching(im, clean, corrupt, _nonlinear_metric, site=site, by=by, layers=last)
        assert float((est.values - exact.values).abs().max()) <= 1e-4, site


@pytest.fixture(scope="module")
def linear_tail():
    """A Gemma 3 whose metric is linear after the last layer's softmax (its MLP off, post-attention and final
    norms linearised, no soft-cap), with saturated attention there (QK-norm gains scaled up: scaling q_proj
    would be undone by the QK-norm)."""
    model = make_gemma3(seed=4)
    last = model.model.layers[-1]
    linearise_norm(last.post_attention_layernorm)
    linearise_norm(model.model.norm)
    with torch.no_grad():
        last.mlp.down_proj.weight.zero_()
        for norm in (last.self_attn.q_norm, last.self_attn.k_norm):
            norm.weight.copy_(6 * (1 + norm.weight) - 1)
        last.self_attn.v_proj.weight.mul_(10)
    im = g3.instrument(model)
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(4, 64, (2, T), generator=g), torch.randint(4, 64, (2, T), generator=g)

    def lin_metric(logits):
        return (logits[:, -1, 7] - logits[:, -1, 9]).mean() + logits[:, 4, 3].sum()

    return im, clean, corrupt, lin_metric


@pytest.mark.parametrize(("site", "by"), [("attn.q", "head_pos"), ("attn.k", "head"), ("attn.k", "pos"),
                                          ("attn.q_normed", "head")])
def test_qk_fix_through_the_qk_norm_is_exact_where_linear(linear_tail, site, by):
    im, clean, corrupt, lin_metric = linear_tail
    last = N_LAYERS - 1
    ref = exact_patching(im, clean, corrupt, lin_metric, site, by, layers=[last])
    fixed = attribution_patching(im, clean, corrupt, lin_metric, site=site, by=by, layers=[last], qk_fix=True)
    plain = attribution_patching(im, clean, corrupt, lin_metric, site=site, by=by, layers=[last])
    scale = float(ref.abs().max())
    assert scale > 1e-3
    assert float((fixed.effects - ref).abs().max()) <= 1e-4 * max(1.0, scale), site
    assert float((plain.effects - ref).abs().max()) > 1e-2 * scale  # plain AtP linearises the softmax and misses


# -- feature circuits ------------------------------------------------------------------------------


def _jumprelu(im, site: str, seed: int, d_sae: int = 48) -> saes.JumpReLUSAE:
    """A random JumpReLU SAE on ``site`` whose features fire on about half the positions."""
    g = torch.Generator().manual_seed(seed)
    sae = saes.JumpReLUSAE(32, d_sae, site=site)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(32, d_sae, generator=g) / 32 ** 0.5)
        sae.W_dec.copy_(torch.randn(d_sae, 32, generator=g) / d_sae ** 0.5)
        sae.threshold.fill_(0.05)
    return sae.requires_grad_(False)


def test_feature_circuit_node_effects_decompose_the_site_attribution(im, pair):
    """Per (site, position): feature effects + error effect = AtP of patching that site there (both directions)."""
    clean, corrupt = pair
    sites = ["blocks.1.resid_post", "blocks.4.resid_mid"]
    sae_map = {s: _jumprelu(im, s, i) for i, s in enumerate(sites)}
    for direction in ("noise", "denoise"):
        c = feature_circuit(im, clean, corrupt, metric, saes=sae_map, direction=direction, top_k=3)
        for s in sites:
            layer, kind = int(s.split(".")[1]), s.split(".", 2)[2]
            ref = attribution_patching(im, clean, corrupt, metric, site=kind, direction=direction, layers=[layer])
            torch.testing.assert_close(c.effects[s].sum(-1) + c.error_effects[s], ref.effects[0], rtol=1e-4, atol=1e-6)
            assert c.effects[s].abs().sum() > 0


# -- attribution graphs and the replacement model --------------------------------------------------


@pytest.fixture(scope="module")
def graph_setup(im):
    assert im.family.mlp_input_kinds == ("ln2",)
    frozen = {b for _, b in im.family.frozen_norms}
    assert {"blocks.0.attn.q_normed", "blocks.0.attn.k_normed"} <= frozen  # the QK-norms are frozen too
    tcs = [train_transcoder(im, L, d_sae=32, steps=60, seed=L, in_kind="ln2") for L in range(N_LAYERS)]
    ids = torch.randint(4, 64, (1, T), generator=torch.Generator().manual_seed(9))
    return tcs, ids, attribution_graph(im, ids, tcs, batch_size=64, progress=False)


def test_attribution_graph_completeness_and_the_replacement_model(im, graph_setup):
    tcs, ids, graph = graph_setup
    assert graph.n_features > 0 and graph.completeness_error() <= 1e-4
    with torch.no_grad():
        plain = im.run(ids)
        for kw in ({}, {"freeze_attention": False}, {"freeze_norms": False}):
            out = im.run(ids, interventions=replacement_interventions(im, ids, tcs, **kw))
            assert float((out - plain).abs().max()) <= 1e-5, kw
    # the graph is exact for its replacement model: a last-layer ablation moves the logit node as predicted
    target, tok = graph.logit_index(0), int(graph.logit_tokens[0])
    sel = (graph.features[:, 0] == N_LAYERS - 1).nonzero().flatten()
    i = int(sel[graph.ablation_effects(target)[sel].abs().argmax()])
    layer, pos, feat = (int(v) for v in graph.features[i])
    W_U = im.model.get_output_embeddings().weight.detach()

    def logit_node(ivs=None) -> float:
        with torch.no_grad():
            _, c = im.run_with_cache(ids, sites=["ln_final"], interventions=ivs)
        pre = c["ln_final"][0, -1] @ W_U.T
        return float(pre[tok] - pre.mean())

    moved = logit_node(replacement_interventions(im, ids, tcs, [(layer, pos, feat, 0.0)])) - logit_node()
    predicted = float(graph.clamp_effect(i, 0.0)[target])
    assert abs(predicted) > 1e-5 and moved == pytest.approx(predicted, rel=1e-3, abs=1e-5)


def test_chat_template_tokens_are_ordinary_tokens_and_zero_positions(im, graph_setup):
    """A prompt led by chat-template tokens (stand-ins: ``<bos><start_of_turn>user\\n`` as ids 2, 60, 61, 62)
    runs through the studies like any other; ``zero_positions=4`` drops the template's features from the
    graph, keeps completeness, and leaves every edge among the other nodes unchanged."""
    tcs, ids, _ = graph_setup
    prompt = torch.cat([torch.tensor([[2, 60, 61, 62]]), ids[:, 4:]], 1)
    corrupt = prompt.clone()
    corrupt[0, 10] = 5
    res = activation_patching(im, prompt, corrupt, metric, site="resid_pre", by="pos", layers=[0])
    assert res.values.shape == (1, T) and torch.isfinite(res.values).all()
    full = attribution_graph(im, prompt, tcs, zero_bos=False, batch_size=64, progress=False)
    g = attribution_graph(im, prompt, tcs, zero_bos=False, zero_positions=4, batch_size=64, progress=False)
    assert g.settings["zero_positions"] == [0, 1, 2, 3]
    assert int((full.features[:, 1] < 4).sum()) > 0 and int((g.features[:, 1] < 4).sum()) == 0
    assert g.completeness_error() <= 1e-4 and full.completeness_error() <= 1e-4
    keep = [full.feature_index(*(int(v) for v in f)) for f in g.features] + list(range(full.n_features, full.n_nodes))
    sub = full.adjacency[keep][:, keep].clone()
    for layer in range(N_LAYERS):
        for p in range(4):
            assert g.adjacency[:, g.error_index(layer, p)].abs().sum() == 0
            sub[:, g.error_index(layer, p)] = 0
    torch.testing.assert_close(g.adjacency, sub, rtol=1e-5, atol=1e-6)
