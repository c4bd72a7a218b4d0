"""Activation patching (packed and rows engines) against a plain loop of single patched runs, and
path patching against closed-form answers and its three steps written out."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
from conftest import make_model

import instrumentation.gemma2 as g2
from mishax_py import InstrumentedModel
from mishax_py.interventions import Hook, Patch
from mishax_py.naming import site_kind
from mishax_py.studies.activation_patching import activation_patching
from mishax_py.studies.path_patching import path_patching, path_patching_by_head
from mishax_py.studies.result import PatchingResult, plot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


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


def metric(logits: torch.Tensor) -> torch.Tensor:
    """Reads two positions, so the base run's logits of unpatched positions must be right too."""
    return (logits[:, -1, 5] - logits[:, -1, 9]).mean() + 0.5 * logits[:, 3, 12].mean()


def loop_reference(im, clean, corrupt, site, by, direction="denoise", **hf):
    """A plain loop of single patched runs (one full forward each, as TransformerLens does)."""
    kind = site_kind(site)
    base, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    _, cache = im.run_with_cache(source, **hf)
    n_layers, T = im.n_layers, clean.shape[1]
    n_heads = cache[f"blocks.0.{kind}"].shape[1 if kind == "attn.pattern" else 2] if kind.startswith("attn.") else 0
    grids = {"pos": [range(n_layers), range(T)], "layer": [range(n_layers)],
             "head": [range(n_layers), range(n_heads)], "head_pos": [range(n_layers), range(n_heads), range(T)]}
    grid = grids[by]
    out = torch.zeros(*[len(g) for g in grid])
    for idx in itertools.product(*grid):
        name = f"blocks.{idx[0]}.{kind}"
        out[idx] = float(metric(im.run(base, {name: Hook(_copy(cache[name], kind, by, idx))}, **hf)))
    return out


def _copy(src, kind, by, idx):
    def hook(value):
        value = value.clone()
        if by == "pos":
            value[:, idx[1]] = src[:, idx[1]]
        elif by == "layer":
            value[:] = src
        elif kind == "attn.pattern":  # [batch, head, q_pos, k_pos]
            sel = (slice(None), idx[1]) if by == "head" else (slice(None), idx[1], idx[2])
            value[sel] = src[sel]
        else:  # [batch, pos, head, d_head]
            sel = (slice(None), slice(None), idx[1]) if by == "head" else (slice(None), idx[2], idx[1])
            value[sel] = src[sel]
        return value

    return hook


CASES = [(s, b) for s in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out") for b in ("pos", "layer")]
CASES += [(s, b) for s in ("attn.z", "attn.q", "attn.k", "attn.v", "attn.pattern") for b in ("head", "head_pos")]


@pytest.mark.parametrize(("site", "by"), CASES)
def test_packed_equals_the_plain_loop(im, prompts, site, by):
    clean, corrupt = prompts
    with torch.no_grad():
        ref = loop_reference(im, clean, corrupt, site, by)
    res = activation_patching(im, clean, corrupt, metric, site=site, by=by)
    assert res.values.shape == ref.shape
    torch.testing.assert_close(res.values, ref, rtol=0, atol=1e-5)
    assert (ref - res.corrupt).abs().max() > 1e-3  # the patches do something


@pytest.mark.parametrize(("site", "by"), [("resid_pre", "pos"), ("attn_out", "pos"), ("attn.v", "head_pos"),
                                          ("attn.pattern", "head_pos"), ("attn.z", "head")])
def test_noising_equals_the_plain_loop(im, prompts, site, by):
    clean, corrupt = prompts
    with torch.no_grad():
        ref = loop_reference(im, clean, corrupt, site, by, direction="noise")
    res = activation_patching(im, clean, corrupt, metric, site=site, by=by, direction="noise")
    torch.testing.assert_close(res.values, ref, rtol=0, atol=1e-5)
    assert res.direction == "noise"
    assert (ref - res.clean).abs().max() > 1e-3


def test_rows_method_and_chunking_agree(im, prompts):
    clean, corrupt = prompts
    packed = activation_patching(im, clean, corrupt, metric, site="resid_mid")
    one_row = activation_patching(im, clean, corrupt, metric, site="resid_mid", batch_size=1, progress=True)
    rows = activation_patching(im, clean, corrupt, metric, site="resid_mid", engine="rows", batch_size=3)
    torch.testing.assert_close(one_row.values, packed.values, rtol=0, atol=1e-5)
    torch.testing.assert_close(rows.values, packed.values, rtol=0, atol=1e-5)
    heads = activation_patching(im, clean, corrupt, metric, site="attn.k", by="head_pos", batch_size=2)
    heads_rows = activation_patching(im, clean, corrupt, metric, site="attn.k", by="head_pos", engine="rows")
    torch.testing.assert_close(heads.values, heads_rows.values, rtol=0, atol=1e-5)


def test_padding_mask_uses_rows_and_equals_the_loop(im, prompts):
    clean, corrupt = prompts
    mask = torch.ones_like(clean)
    mask[1, :2] = 0  # row 1 left-padded
    with torch.no_grad():
        ref = loop_reference(im, clean, corrupt, "resid_pre", "pos", attention_mask=mask)
    res = activation_patching(im, clean, corrupt, metric, site="resid_pre", attention_mask=mask)
    torch.testing.assert_close(res.values, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="engine='packed'.*attention_mask"):
        activation_patching(im, clean, corrupt, metric, engine="packed", attention_mask=mask)


def test_inside_intervene_runs_with_the_outer_interventions(im, prompts):
    clean, corrupt = prompts
    outer = {"blocks.0.mlp_out": lambda v: v * 0.5}
    with im.intervene(outer):
        with torch.no_grad():
            ref = loop_reference(im, clean, corrupt, "resid_post", "pos")
        res = activation_patching(im, clean, corrupt, metric, site="resid_post")
    torch.testing.assert_close(res.values, ref, rtol=0, atol=1e-5)


def test_identical_values_are_not_run_and_give_the_base_metric(im, prompts):
    clean, corrupt = prompts
    res = activation_patching(im, clean, corrupt, metric, site="resid_pre")
    assert torch.all(res.values[:, :2] == res.corrupt)  # positions before the first difference
    same = activation_patching(im, clean, clean, metric, site="attn.z", by="head_pos")
    assert torch.all(same.values == same.clean) and same.clean == same.corrupt


def test_layer_and_position_subsets(im, prompts):
    clean, corrupt = prompts
    full = activation_patching(im, clean, corrupt, metric, site="attn.q", by="head_pos")
    part = activation_patching(im, clean, corrupt, metric, site="attn.q", by="head_pos", layers=[1], positions=[6, 3],
                               pos_labels=["six", "three"])
    torch.testing.assert_close(part.values, full.values[[1]][:, :, [6, 3]], rtol=0, atol=1e-6)
    assert part.labels == {"layer": ["1"], "head": ["0", "1", "2", "3"], "pos": ["six", "three"]}
    together = activation_patching(im, clean, corrupt, metric, site="resid_pre", by="layer", positions=[2, 5])
    with torch.no_grad():
        _, cache = im.run_with_cache(clean)
        for layer in range(im.n_layers):
            want = float(metric(im.run(corrupt, {f"blocks.{layer}.resid_pre": Patch(cache, positions=[2, 5])})))
            assert abs(float(together.values[layer]) - want) < 1e-5


def test_result_object(im, prompts):
    clean, corrupt = prompts
    res = activation_patching(im, clean, corrupt, metric, site="hook_resid_pre")
    assert isinstance(res, PatchingResult)
    assert res.axes == ("layer", "pos") and res.shape == (2, 7) and res.site == "resid_pre"
    assert res.labels["pos"] == [str(p) for p in range(7)]
    with torch.no_grad():
        assert abs(res.clean - float(metric(im.run(clean)))) < 1e-6
        assert abs(res.corrupt - float(metric(im.run(corrupt)))) < 1e-6
    norm = res.normalized()
    torch.testing.assert_close(norm[:, :2], torch.zeros(2, 2))
    assert res[0, 3] == res.values[0, 3]
    assert "resid_pre" in repr(res)
    z = activation_patching(im, clean, corrupt, metric, site="z")
    assert z.axes == ("layer", "head") and z.shape == (2, 4)
    k = activation_patching(im, clean, corrupt, metric, site="attn.hook_k", by=("head", "pos"))
    assert k.axes == ("layer", "head", "pos") and k.shape == (2, 2, 7)


def test_plot_writes_png(im, prompts, tmp_path):
    clean, corrupt = prompts
    for by, site in (("pos", "resid_pre"), ("layer", "mlp_out"), ("head_pos", "attn.v")):
        res = activation_patching(im, clean, corrupt, metric, site=site, by=by)
        path = plot(res, tmp_path / f"{site}_{by}.png", title=f"{site} by {by}", normalized=by == "pos")
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_bad_inputs(im, prompts):
    clean, corrupt = prompts
    with pytest.raises(ValueError, match=r"same shape.*\(2, 7\).*\(2, 6\)"):
        activation_patching(im, clean, corrupt[:, :6], metric)
    with pytest.raises(ValueError, match="unsupported site 'ln1'"):
        activation_patching(im, clean, corrupt, metric, site="ln1")
    with pytest.raises(ValueError, match="by='head'.*resid_pre"):
        activation_patching(im, clean, corrupt, metric, site="resid_pre", by="head")
    with pytest.raises(ValueError, match="by='pos'.*attn.z"):
        activation_patching(im, clean, corrupt, metric, site="attn.z", by="pos")
    with pytest.raises(ValueError, match="direction must be 'denoise'.*'noise'.*got 'backwards'"):
        activation_patching(im, clean, corrupt, metric, direction="backwards")
    with pytest.raises(ValueError, match=r"scalar.*shape \(2,\)"):
        activation_patching(im, clean, corrupt, lambda lg: lg[:, -1, 0])
    with pytest.raises(TypeError, match="scalar.*str"):
        activation_patching(im, clean, corrupt, lambda lg: "high")
    with pytest.raises(TypeError, match="metric must be a function"):
        activation_patching(im, clean, corrupt, 3.0)
    with pytest.raises(ValueError, match="layers"):
        activation_patching(im, clean, corrupt, metric, layers=[2])
    with pytest.raises(ValueError, match="positions"):
        activation_patching(im, clean, corrupt, metric, positions=[7])
    with pytest.raises(ValueError, match="pos_labels"):
        activation_patching(im, clean, corrupt, metric, pos_labels=["a"])
    with pytest.raises(ValueError, match="method"):
        activation_patching(im, clean, corrupt, metric, method="fast")
    with pytest.raises(ValueError, match="engine='rows'"):
        activation_patching(im, clean, corrupt, metric, method="rows")  # the old spelling of the engine
    with pytest.raises(ValueError, match="engine"):
        activation_patching(im, clean, corrupt, metric, engine="fast")
    with pytest.raises(TypeError, match="integers"):
        activation_patching(im, clean.float(), corrupt, metric)
    with pytest.raises(ValueError, match="batch_size"):
        activation_patching(im, clean, corrupt, metric, batch_size=0)


# ---------------------------------------------------------------------------------------------
# Path patching
# ---------------------------------------------------------------------------------------------
def _attn_out(layer_module, z: torch.Tensor) -> torch.Tensor:
    """What a decoder layer adds to the residual stream for per-head outputs z [batch, pos, head, d_head]."""
    return layer_module.post_attention_layernorm(layer_module.self_attn.o_proj(z.flatten(-2)))


def _mixed_z(clean_cache, corrupt_cache, layer, senders):
    z = clean_cache[f"blocks.{layer}.attn.z"].clone()
    for sl, sh in senders:
        if sl == layer:
            z[:, :, sh] = corrupt_cache[f"blocks.{layer}.attn.z"][:, :, sh]
    return z


def test_path_patching_direct_path_to_the_logits_in_closed_form(im, prompts):
    """Case: receiver = the last layer's resid_post (the input of the unembedding), freeze_mlps=True.

    In step 2 every head output is frozen (senders to their corrupted value, all others to clean)
    and so is every MLP output, so the final residual stream is a closed-form sum:

        resid_post[L-1] = embed + sum_l post_attn_norm_l(o_proj_l(z_mix_l)) + sum_l mlp_out_l(clean)

    with z_mix_l the clean z of layer l with the sender heads' z taken from the corrupted run.
    Step 3 feeds it to the unembedding: logits = 30·tanh(lm_head(final_norm(resid)) / 30).
    """
    clean, corrupt = prompts
    model = im.model
    senders = [(0, 1), (1, 3), (1, 0)]
    last = im.n_layers - 1
    got = path_patching(im, clean, corrupt, metric, senders=senders, receivers=[f"blocks.{last}.resid_post"],
                        freeze_mlps=True)
    with torch.no_grad():
        _, cc = im.run_with_cache(clean)
        _, xc = im.run_with_cache(corrupt)
        resid = cc["embed"]
        for layer, mod in enumerate(model.model.layers):
            resid = resid + _attn_out(mod, _mixed_z(cc, xc, layer, senders))
            resid = resid + cc[f"blocks.{layer}.mlp_out"]
        cap = model.config.final_logit_softcapping
        logits = cap * torch.tanh(model.lm_head(model.model.norm(resid)) / cap)
        want = float(metric(logits))
        clean_metric = float(metric(im.run(clean)))
    assert abs(got - want) < 1e-5
    assert abs(got - clean_metric) > 1e-3  # a real effect


def test_path_patching_to_a_query_in_closed_form(im, prompts):
    """Case: receiver = the query of head 2 in layer 1, sender = head 1 of layer 0, freeze_mlps=True.

    Step 2 gives layer 1 the residual embed + post_attn_norm_0(o_proj_0(z_mix_0)) + mlp_out_0(clean),
    so the recorded query is q_proj_1(input_layernorm_1(that))[head 2] in closed form; step 3 is the
    clean run with only that head's query replaced.
    """
    clean, corrupt = prompts
    model = im.model
    mod0, mod1 = model.model.layers
    d_head = model.config.head_dim
    got = path_patching(im, clean, corrupt, metric, senders=[(0, 1)], receivers=[(1, 2, "q")], freeze_mlps=True)
    with torch.no_grad():
        _, cc = im.run_with_cache(clean)
        _, xc = im.run_with_cache(corrupt)
        resid = cc["embed"] + _attn_out(mod0, _mixed_z(cc, xc, 0, [(0, 1)])) + cc["blocks.0.mlp_out"]
        q = mod1.self_attn.q_proj(mod1.input_layernorm(resid)).unflatten(-1, (-1, d_head))

        def set_q(v):
            v = v.clone()
            v[:, :, 2] = q[:, :, 2]
            return v

        want = float(metric(im.run(clean, {"blocks.1.attn.q": Hook(set_q)})))
        clean_metric = float(metric(im.run(clean)))
    assert abs(got - want) < 1e-5
    assert abs(got - clean_metric) > 1e-4


def test_path_patching_through_mlps_and_site_senders(im, prompts):
    """Without freeze_mlps the MLPs are recomputed: the path sender -> MLP0 -> receiver counts. With an MLP
    as the only sender (and MLPs frozen), the closed form is the residual sum with mlp_out_0 corrupted."""
    clean, corrupt = prompts
    model = im.model
    last = im.n_layers - 1
    recv = [f"blocks.{last}.resid_post"]
    frozen = path_patching(im, clean, corrupt, metric, senders=[(0, 1)], receivers=recv, freeze_mlps=True)
    through = path_patching(im, clean, corrupt, metric, senders=[(0, 1)], receivers=recv)
    assert abs(frozen - through) > 1e-5
    got = path_patching(im, clean, corrupt, metric, senders=["blocks.0.mlp_out"], receivers=recv, freeze_mlps=True)
    with torch.no_grad():
        _, cc = im.run_with_cache(clean)
        _, xc = im.run_with_cache(corrupt)
        resid = cc["embed"]
        for layer, mod in enumerate(model.model.layers):
            resid = resid + _attn_out(mod, cc[f"blocks.{layer}.attn.z"])
            resid = resid + (xc if layer == 0 else cc)[f"blocks.{layer}.mlp_out"]
        cap = model.config.final_logit_softcapping
        want = float(metric(cap * torch.tanh(model.lm_head(model.model.norm(resid)) / cap)))
    assert abs(got - want) < 1e-5


@pytest.mark.parametrize("sender_positions,receiver_positions", [
    ([2], None),
    ([[2], [2, 5]], [3, 6]),     # one list of sender positions per row
    (None, [[6], [3]]),
])
def test_path_patching_at_positions_in_closed_form(im, prompts, sender_positions, receiver_positions):
    """The direct path to the logits with senders patched only at some positions and receivers only at some:
    with heads and MLPs frozen, the final residual is a per-position sum, so the answer is written out."""
    clean, corrupt = prompts
    model = im.model
    senders = [(0, 1), (1, 3)]
    last = im.n_layers - 1
    got = path_patching(im, clean, corrupt, metric, senders=senders, receivers=[f"blocks.{last}.resid_post"],
                        freeze_mlps=True, sender_positions=sender_positions, receiver_positions=receiver_positions)
    B, T = clean.shape

    def mask(positions):  # [batch, pos] bool
        m = torch.zeros(B, T, dtype=torch.bool)
        if positions is None:
            m[:] = True
        elif isinstance(positions[0], list):
            for row, ps in enumerate(positions):
                m[row, ps] = True
        else:
            m[:, positions] = True
        return m

    send, recv = mask(sender_positions), mask(receiver_positions)
    with torch.no_grad():
        _, cc = im.run_with_cache(clean)
        _, xc = im.run_with_cache(corrupt)
        resid = cc["embed"]
        for layer, mod in enumerate(model.model.layers):
            z = cc[f"blocks.{layer}.attn.z"].clone()
            for sl, sh in senders:
                if sl == layer:
                    z[:, :, sh] = torch.where(send[..., None], xc[f"blocks.{layer}.attn.z"][:, :, sh], z[:, :, sh])
            resid = resid + _attn_out(mod, z) + cc[f"blocks.{layer}.mlp_out"]
        resid = torch.where(recv[..., None], resid, cc[f"blocks.{last}.resid_post"])
        cap = model.config.final_logit_softcapping
        want = float(metric(cap * torch.tanh(model.lm_head(model.model.norm(resid)) / cap)))
        everywhere = path_patching(im, clean, corrupt, metric, senders=senders,
                                   receivers=[f"blocks.{last}.resid_post"], freeze_mlps=True)
    assert abs(got - want) < 1e-5
    assert abs(got - everywhere) > 1e-4  # positions made a difference
    grid = path_patching_by_head(im, clean, corrupt, metric, receivers=[f"blocks.{last}.resid_post"],
                                 freeze_mlps=True,
                                 sender_positions=sender_positions, receiver_positions=receiver_positions)
    one = path_patching(im, clean, corrupt, metric, senders=[(0, 1)], receivers=[f"blocks.{last}.resid_post"],
                        freeze_mlps=True, sender_positions=sender_positions, receiver_positions=receiver_positions)
    assert abs(float(grid.values[0, 1]) - one) < 1e-6


def test_path_patching_without_a_path_is_the_clean_metric(im, prompts):
    clean, corrupt = prompts
    with torch.no_grad():
        clean_metric = float(metric(im.run(clean)))
    # a sender in the receiver's own layer (or later) has no path to its query
    got = path_patching(im, clean, corrupt, metric, senders=[(1, 0), (1, 3)], receivers=[(1, 2, "q"), (1, 1, "k")])
    assert abs(got - clean_metric) < 1e-6
    # identical prompts: nothing to patch
    same = path_patching(im, clean, clean, metric, senders=[(0, 1)], receivers=[(1, 0, "v")])
    assert abs(same - clean_metric) < 1e-6


def test_path_patching_by_head_grid(im, prompts, tmp_path):
    clean, corrupt = prompts
    recv = [(1, 2, "q"), (1, 0, "v")]
    grid = path_patching_by_head(im, clean, corrupt, metric, receivers=recv, freeze_mlps=True)
    assert grid.axes == ("layer", "head") and grid.shape == (2, 4) and grid.direction == "noise"
    for layer, head in [(0, 0), (0, 3)]:
        one = path_patching(im, clean, corrupt, metric, senders=[(layer, head)], receivers=recv, freeze_mlps=True)
        assert abs(float(grid.values[layer, head]) - one) < 1e-6
    assert torch.allclose(grid.values[1], torch.full((4,), grid.clean), atol=1e-6)  # layer 1 cannot reach layer 1
    chunked = path_patching_by_head(im, clean, corrupt, metric, receivers=recv, freeze_mlps=True, batch_size=2,
                                    layers=[1, 0])
    assert torch.allclose(chunked.values, grid.values[[1, 0]], atol=1e-6) and chunked.labels["layer"] == ["1", "0"]
    assert plot(grid, tmp_path / "path.png")


def test_path_patching_by_head_with_padding(im, prompts):
    """Left-padded rows (attention_mask) through the batched sweeps equal path_patching head by head."""
    clean, corrupt = prompts
    mask = torch.ones_like(clean)
    mask[0, :2] = 0
    recv = [(1, 0, "q"), (1, 1, "k")]
    grid = path_patching_by_head(im, clean, corrupt, metric, receivers=recv, receiver_positions=[-1],
                                 attention_mask=mask)
    for layer, head in [(0, 0), (0, 1), (0, 3)]:
        one = path_patching(im, clean, corrupt, metric, senders=[(layer, head)], receivers=recv,
                            receiver_positions=[-1], attention_mask=mask)
        assert abs(float(grid.values[layer, head]) - one) < 1e-5


def test_path_patching_bad_inputs(im, prompts):
    clean, corrupt = prompts
    with pytest.raises(ValueError, match="same shape"):
        path_patching(im, clean, corrupt[:1], metric, senders=[(0, 0)], receivers=[(1, 0, "q")])
    with pytest.raises(ValueError, match="out of range"):
        path_patching(im, clean, corrupt, metric, senders=[(0, 4)], receivers=[(1, 0, "q")])
    with pytest.raises(ValueError, match="out of range.*head in \\[0, 2\\)"):
        path_patching(im, clean, corrupt, metric, senders=[(0, 0)], receivers=[(1, 3, "k")])
    with pytest.raises(ValueError, match="'q' \\| 'k' \\| 'v'"):
        path_patching(im, clean, corrupt, metric, senders=[(0, 0)], receivers=[(1, 0, "z")])
    with pytest.raises(ValueError, match="frozen"):
        path_patching(im, clean, corrupt, metric, senders=[(0, 0)], receivers=["blocks.1.attn.z"])
    with pytest.raises(ValueError, match="at least one"):
        path_patching(im, clean, corrupt, metric, senders=[], receivers=[(1, 0, "q")])
    with pytest.raises(KeyError, match="mlp_outt"):
        path_patching(im, clean, corrupt, metric, senders=["blocks.0.mlp_outt"], receivers=[(1, 0, "q")])
    with pytest.raises(IndexError, match=r"positions=\[9\] out of range at site 'blocks.1.attn.q'"):
        path_patching(im, clean, corrupt, metric, senders=[(0, 0)], receivers=[(1, 0, "q")], receiver_positions=[9])
    with torch.no_grad():
        assert torch.equal(im.run(clean), im.model(clean).logits)  # nothing left active


# ---------------------------------------------------------------------------------------------
# The study convention, engines, interventions, the result as a tensor
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("study", "keywords"), [
    (activation_patching, ["site", "by", "direction", "layers", "positions", "interventions", "batch_size", "progress",
                           "method", "engine", "pos_labels", "hf_kwargs"]),
    (path_patching, ["senders", "receivers", "direction", "interventions", "method", "freeze_mlps",
                     "sender_positions", "receiver_positions", "hf_kwargs"]),
    (path_patching_by_head, ["receivers", "direction", "layers", "interventions", "batch_size", "progress", "method",
                             "freeze_mlps", "sender_positions", "receiver_positions", "hf_kwargs"]),
], ids=lambda x: getattr(x, "__name__", ""))
def test_signatures_follow_the_study_convention(study, keywords):
    params = list(inspect.signature(study).parameters.values())
    assert [p.name for p in params[:4]] == ["im", "clean_ids", "corrupt_ids", "metric"]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:4])
    assert [p.name for p in params[4:]] == keywords
    assert all(p.kind is p.KEYWORD_ONLY for p in params[4:-1]) and params[-1].kind is params[-1].VAR_KEYWORD
    assert inspect.signature(study).parameters["method"].default == "exact"


def test_old_positional_calls_fail_clearly(im, prompts):
    clean, corrupt = prompts
    with pytest.raises(TypeError, match="positional"):
        activation_patching(im, clean, corrupt, metric, "resid_pre")
    with pytest.raises(TypeError, match="positional"):
        activation_patching(im, clean, corrupt, metric, "resid_pre", "pos", "noise", 4, False)
    with pytest.raises(TypeError, match="positional"):
        path_patching(im, clean, corrupt, metric, [(0, 1)], [(1, 2, "q")])
    with pytest.raises(TypeError, match="positional"):
        path_patching_by_head(im, clean, corrupt, metric, [(1, 2, "q")])
    assert inspect.signature(activation_patching).parameters["engine"].default == "auto"


def test_direction_spellings(im, prompts):
    """'denoise' / 'noise' are the words; the old 'denoising' / 'noising' still work, with a DeprecationWarning."""
    clean, corrupt = prompts
    for old, new in (("denoising", "denoise"), ("noising", "noise")):
        with pytest.warns(DeprecationWarning, match=f"direction='{new}'"):
            res = activation_patching(im, clean, corrupt, metric, site="attn_out", direction=old)
        want = activation_patching(im, clean, corrupt, metric, site="attn_out", direction=new)
        assert res.direction == new
        assert torch.equal(res.values, want.values)
    with pytest.raises(ValueError, match="direction must be 'denoise'.*'noise'.*got 'noisy'"):
        path_patching(im, clean, corrupt, metric, senders=[(0, 1)], receivers=[(1, 2, "q")], direction="noisy")
    with pytest.raises(ValueError, match="got 'both'"):
        path_patching_by_head(im, clean, corrupt, metric, receivers=[(1, 2, "q")], direction="both")
    with pytest.raises(ValueError, match="method must be 'exact'"):
        path_patching(im, clean, corrupt, metric, senders=[(0, 1)], receivers=[(1, 2, "q")], method="atp")


@pytest.mark.parametrize(("site", "by"), [("resid_pre", "pos"), ("mlp_out", "layer"), ("attn.v", "head_pos"),
                                          ("attn.pattern", "head"), ("attn.q", "head_pos")])
def test_packed_engine_equals_rows_engine(im, prompts, site, by):
    clean, corrupt = prompts
    packed = activation_patching(im, clean, corrupt, metric, site=site, by=by, engine="packed")
    rows = activation_patching(im, clean, corrupt, metric, site=site, by=by, engine="rows")
    auto = activation_patching(im, clean, corrupt, metric, site=site, by=by)
    torch.testing.assert_close(packed.values, rows.values, rtol=0, atol=1e-5)
    assert torch.equal(auto.values, packed.values)  # auto runs the packed engine here
    assert (rows.values - rows.corrupt).abs().max() > 1e-3


class _NoPrefixFamily:
    """The model's own family, except that it does not take key/value prefixes."""

    supports_kv_prefix = False

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_family_without_kv_prefixes_runs_the_rows_engine(im, prompts):
    clean, corrupt = prompts
    plain = InstrumentedModel(im.model, im.catalogue, _NoPrefixFamily(im.family))
    with torch.no_grad():
        ref = loop_reference(im, clean, corrupt, "attn.k", "head_pos")
    res = activation_patching(plain, clean, corrupt, metric, site="attn.k", by="head_pos")
    torch.testing.assert_close(res.values, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="engine='packed'.*supports_kv_prefix"):
        activation_patching(plain, clean, corrupt, metric, engine="packed")


def _with(interventions, site, edit):
    """``interventions`` plus ``edit`` at ``site`` (after theirs there), written out."""
    out = {k: (list(v) if isinstance(v, list) else [v]) for k, v in interventions.items()}
    out[site] = out.get(site, []) + [edit]
    return out


@pytest.mark.parametrize(("site", "by", "direction"), [("resid_pre", "pos", "denoise"), ("attn.z", "head", "noise"),
                                                       ("mlp_out", "layer", "denoise")])
def test_interventions_apply_in_every_run(im, prompts, site, by, direction):
    """Against a written-out loop: the base and source runs under the interventions, and each patched run
    under the interventions plus the patch (after them at a site they share: attn.z of layer 1)."""
    from mishax_py.interventions import Ablate

    clean, corrupt = prompts
    ivs = {"blocks.0.mlp_out": lambda v: v * 0.5, "blocks.1.attn.z": Ablate(heads=[1]),
           "blocks.1.mlp_out": Ablate(positions=[4])}
    base, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    kind = site_kind(site)
    with torch.no_grad():
        _, cache = im.run_with_cache(source, interventions=ivs)
        n_heads = im.family.dims.n_heads
        grid = {"pos": [range(im.n_layers), range(7)], "layer": [range(im.n_layers)],
                "head": [range(im.n_layers), range(n_heads)]}[by]
        ref = torch.zeros(*[len(g) for g in grid])
        for idx in itertools.product(*grid):
            name = f"blocks.{idx[0]}.{kind}"
            edit = (Patch(cache[name], positions=[idx[1]]) if by == "pos" else
                    Patch(cache[name], heads=[idx[1]]) if by == "head" else Patch(cache[name]))
            ref[idx] = float(metric(im.run(base, _with(ivs, name, edit))))
        base_metric = float(metric(im.run(base, ivs)))
        plain = activation_patching(im, clean, corrupt, metric, site=site, by=by, direction=direction)
    res = activation_patching(im, clean, corrupt, metric, site=site, by=by, direction=direction, interventions=ivs)
    torch.testing.assert_close(res.values, ref, rtol=0, atol=1e-5)
    assert abs((res.corrupt if direction == "denoise" else res.clean) - base_metric) < 1e-6
    assert (res.values - plain.values).abs().max() > 1e-3  # the interventions matter
    with pytest.raises(ValueError, match="engine='packed'.*interventions"):
        activation_patching(im, clean, corrupt, metric, site=site, by=by, interventions=ivs, engine="packed")


def test_the_result_is_a_tensor(im, prompts, tmp_path):
    clean, corrupt = prompts
    res = activation_patching(im, clean, corrupt, metric, site="resid_pre")
    t = torch.as_tensor(res)
    assert isinstance(t, torch.Tensor) and torch.equal(t, res.values) and t.shape == (2, 7)
    assert int(res.argmax()) == int(res.values.argmax())
    est = activation_patching(im, clean, corrupt, metric, site="resid_pre", engine="rows")
    diff = res - est
    assert isinstance(diff, torch.Tensor) and diff.abs().max() < 1e-5
    assert torch.equal(res.topk(3).indices, res.values.topk(3).indices)
    assert torch.equal(res[0], res.values[0]) and torch.equal(res.max(), res.values.max())
    data = open(res.plot(tmp_path / "res.png"), "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Path patching: the result, the three steps written out, denoising, interventions
# ---------------------------------------------------------------------------------------------
def _path_by_hand(im, base, source, senders, ivs=None):
    """Steps 1-3 written out for receivers (1, 2, 'q') and blocks.1.resid_mid, heads frozen (not MLPs)."""
    ivs = ivs or {}
    with torch.no_grad():
        _, bc = im.run_with_cache(base, interventions=ivs)
        _, sc = im.run_with_cache(source, interventions=ivs)
        step2 = dict(ivs)
        for layer in range(im.n_layers):
            z = bc[f"blocks.{layer}.attn.z"].clone()
            for sl, sh in senders:
                if sl == layer:
                    z[:, :, sh] = sc[f"blocks.{layer}.attn.z"][:, :, sh]
            step2 = _with(step2, f"blocks.{layer}.attn.z", Patch(z))
        _, s2 = im.run_with_cache(base, interventions=step2)
        step3 = _with(_with(ivs, "blocks.1.attn.q", Patch(s2["blocks.1.attn.q"], heads=[2])),
                      "blocks.1.resid_mid", Patch(s2["blocks.1.resid_mid"]))
        return float(metric(im.run(base, step3)))


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_path_patching_returns_a_result_equal_to_its_steps_written_out(im, prompts, direction):
    clean, corrupt = prompts
    senders = [(0, 1), (0, 3)]
    recv = [(1, 2, "q"), "blocks.1.resid_mid"]
    base, source = (clean, corrupt) if direction == "noise" else (corrupt, clean)
    res = path_patching(im, clean, corrupt, metric, senders=senders, receivers=recv, direction=direction)
    want = _path_by_hand(im, base, source, senders)
    assert isinstance(res, PatchingResult) and res.axes == () and res.shape == () and res.site == "path"
    assert res.direction == direction and res.labels == {}
    assert abs(float(res) - want) < 1e-5
    with torch.no_grad():
        assert abs(res.clean - float(metric(im.run(clean)))) < 1e-6
        assert abs(res.corrupt - float(metric(im.run(corrupt)))) < 1e-6
    base_metric = res.clean if direction == "noise" else res.corrupt
    assert abs(float(res) - base_metric) > 1e-4  # a real effect
    assert torch.as_tensor(res).shape == () and f"{res:.3f}" == f"{want:.3f}"
    grid = path_patching_by_head(im, clean, corrupt, metric, receivers=recv, direction=direction)
    assert grid.direction == direction and grid.clean == res.clean and grid.corrupt == res.corrupt
    for layer, head in [(0, 1), (0, 2)]:
        one = path_patching(im, clean, corrupt, metric, senders=[(layer, head)], receivers=recv, direction=direction)
        assert abs(float(grid[layer, head]) - float(one)) < 1e-5


def test_path_patching_with_interventions(im, prompts):
    """interventions= hold in every run: both caches, step 2 and step 3 (written out)."""
    clean, corrupt = prompts
    ivs = {"blocks.0.mlp_out": lambda v: v * 0.5, "blocks.1.resid_mid": lambda v: v + 0.1}
    senders = [(0, 0), (0, 2)]
    recv = [(1, 2, "q"), "blocks.1.resid_mid"]
    res = path_patching(im, clean, corrupt, metric, senders=senders, receivers=recv, interventions=ivs)
    want = _path_by_hand(im, clean, corrupt, senders, ivs)
    plain = path_patching(im, clean, corrupt, metric, senders=senders, receivers=recv)
    assert abs(float(res) - want) < 1e-5
    assert abs(float(res) - float(plain)) > 1e-4  # the interventions matter
    with torch.no_grad():
        assert abs(res.clean - float(metric(im.run(clean, ivs)))) < 1e-6
    grid = path_patching_by_head(im, clean, corrupt, metric, receivers=recv, interventions=ivs, layers=[0])
    one = path_patching(im, clean, corrupt, metric, senders=[(0, 2)], receivers=recv, interventions=ivs)
    assert abs(float(grid[0, 2]) - float(one)) < 1e-5
