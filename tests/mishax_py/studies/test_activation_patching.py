"""Activation patching against a plain loop of single patched runs: directions, subsets, the result
object and its plot, interventions, bad input.

The model, prompts and metric are the patching tests' (``conftest.py`` here, ``tests.helpers``);
the engines (packed, rows) are checked in ``test_packed.py``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mishax_py.interventions import Patch
from mishax_py.naming import site_kind
from mishax_py.studies.activation_patching import activation_patching
from mishax_py.studies.result import PatchingResult, plot
from tests.helpers import loop_reference, with_edit
from tests.helpers import two_position_metric as metric

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


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
            ref[idx] = float(metric(im.run(base, with_edit(ivs, name, edit))))
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
