"""Path patching against closed-form answers and its three steps written out; ``path_patching_by_head``
against ``path_patching`` head by head."""

from __future__ import annotations

import pytest
import torch

from mishax_py.interventions import Hook, Patch
from mishax_py.studies.path_patching import path_patching, path_patching_by_head
from mishax_py.studies.result import PatchingResult, plot
from tests.helpers import two_position_metric as metric
from tests.helpers import with_edit

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


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
            step2 = with_edit(step2, f"blocks.{layer}.attn.z", Patch(z))
        _, s2 = im.run_with_cache(base, interventions=step2)
        step3 = with_edit(with_edit(ivs, "blocks.1.attn.q", Patch(s2["blocks.1.attn.q"], heads=[2])),
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
