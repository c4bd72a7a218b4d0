"""The attribution studies (``api.py``): several sites at once equal one call per site, the result's
metadata, labels and positions, and bad input."""

from __future__ import annotations

import pytest
import torch

from mishax_py.runtime import active_context
from mishax_py.studies.attribution import AttributionResult, attribution_patching, attribution_patching_sites
from mishax_py.studies.result import PatchingResult

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_patching_sites_equals_one_call_per_site(tiny_im, ids, direction):
    """Several sites from one forward/backward: the same estimates as attribution_patching site by site."""
    corrupt = ids.flip(1)

    def metric(lg):
        return lg[:, -1].log_softmax(-1)[:, 3].mean()

    spec = {"resid_pre": None, "blocks.*.attn.hook_z": "head", "mlp_out": "pos", "attn.pattern": "head_pos",
            "attn.k": "layer"}
    got = attribution_patching_sites(tiny_im, ids, corrupt, metric, sites=spec, direction=direction, layers=[1, 0])
    assert list(got) == list(spec)
    for key, by in spec.items():
        one = attribution_patching(tiny_im, ids, corrupt, metric, site=key, by=by, direction=direction, layers=[1, 0])
        res = got[key]
        assert (res.axes, res.labels, res.site, res.by, res.sites) == (one.axes, one.labels, one.site, one.by,
                                                                         one.sites)
        torch.testing.assert_close(res.effects, one.effects, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res.values, one.values, rtol=1e-5, atol=1e-5)
        assert (res.clean, res.corrupt) == pytest.approx((one.clean, one.corrupt), abs=1e-5)
    lst = attribution_patching_sites(tiny_im, ids, corrupt, metric, sites=["attn.z"])
    assert lst["attn.z"].by == "head" and lst["attn.z"].values.shape == (2, 4)
    with pytest.raises(ValueError, match="at least one site"):
        attribution_patching_sites(tiny_im, ids, corrupt, metric, sites=[])
    with pytest.raises(ValueError, match="by='head'"):
        attribution_patching_sites(tiny_im, ids, corrupt, metric, sites={"resid_pre": "head"})


def test_result_metadata_labels_and_positions(tiny_im, ids, tmp_path):
    corrupt = ids.flip(1)

    def metric(lg):
        return lg[:, -1, 3].mean()

    res = attribution_patching(tiny_im, ids, corrupt, metric, site="attn.z", by="head_pos", layers=[1])
    assert isinstance(res, AttributionResult) and isinstance(res, PatchingResult)
    assert res.values.shape == (1, 4, ids.shape[1])
    assert res.axes == ("layer", "head", "pos")
    assert res.labels["layer"] == ["1"] and res.labels["head"] == ["0", "1", "2", "3"]
    assert res.sites == ["blocks.1.attn.z"] and res.direction == "denoise"
    with torch.no_grad():
        assert abs(res.corrupt - float(metric(tiny_im.run(corrupt)))) < 1e-5
        assert abs(res.clean - float(metric(tiny_im.run(ids)))) < 1e-5
    torch.testing.assert_close(res.normalized(), (res.values - res.corrupt) / (res.clean - res.corrupt))
    assert len(res.top(3)) == 3
    assert "AttributionResult(atp" in repr(res)
    png = res.plot(str(tmp_path / "atp.png"))
    assert (tmp_path / "atp.png").stat().st_size > 1000 and png.endswith("atp.png")
    k = attribution_patching(tiny_im, ids, corrupt, metric, site="attn.hook_k")
    assert k.values.shape == (2, 2)  # kv heads
    assert attribution_patching(tiny_im, ids, corrupt, metric, site="blocks.*.hook_resid_pre",
                                by="layer").values.shape == (2,)
    # positions: a subset along the pos axis, or patched together for by="head"/"layer"
    full = attribution_patching(tiny_im, ids, corrupt, metric, site="attn.z", by=("layer", "head", "pos"))
    sub = attribution_patching(tiny_im, ids, corrupt, metric, site="attn.z", by="head_pos", positions=[-1, 2],
                               pos_labels=["last", "two"])
    torch.testing.assert_close(sub.effects, full.effects[:, :, [ids.shape[1] - 1, 2]])
    assert sub.labels["pos"] == ["last", "two"]
    together = attribution_patching(tiny_im, ids, corrupt, metric, site="attn.z", by="head", positions=[2, 5])
    torch.testing.assert_close(together.effects, full.effects[:, :, [2, 5]].sum(-1), rtol=1e-5, atol=1e-7)
    for site, by in [("attn.k", "head"), ("attn.q", "head"), ("attn.scores", "head")]:
        f = attribution_patching(tiny_im, ids, corrupt, metric, site=site, by="head_pos", qk_fix=True)
        if site == "attn.k":  # keys patched together: a joint softmax recomputation, not a sum
            t = attribution_patching(tiny_im, ids, corrupt, metric, site=site, by=by, positions=[3], qk_fix=True)
            torch.testing.assert_close(t.effects, f.effects[:, :, 3], rtol=1e-4, atol=1e-7)
        else:  # query rows are independent: the sum over positions
            t = attribution_patching(tiny_im, ids, corrupt, metric, site=site, by=by, positions=[2, 5], qk_fix=True)
            torch.testing.assert_close(t.effects, f.effects[:, :, [2, 5]].sum(-1), rtol=1e-4, atol=1e-7)


def test_bad_input_errors_and_no_context_left(tiny_im, ids):
    im = tiny_im
    corrupt = ids.flip(1)
    with torch.no_grad():
        before = im.model(ids).logits
    with pytest.raises(ValueError, match="scalar"):
        attribution_patching(im, ids, corrupt, lambda lg: lg[:, -1, 3], site="resid_pre")
    with pytest.raises(TypeError, match="scalar torch.Tensor"):
        attribution_patching(im, ids, corrupt, lambda lg: 1.0, site="resid_pre")
    with pytest.raises(ValueError, match="differentiabl"):
        attribution_patching(im, ids, corrupt, lambda lg: lg[:, -1, 3].mean().detach(), site="resid_pre")
    with pytest.raises(ValueError, match="same shape"):
        attribution_patching(im, ids, corrupt[:, :-1], lambda lg: lg.mean(), site="resid_pre")
    with pytest.raises(ValueError, match="by='head'"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_pre", by="head")
    with pytest.raises(KeyError, match="unknown site"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_prex")
    with pytest.raises(ValueError, match="qk_fix"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="attn.z", qk_fix=True)
    with pytest.raises(ValueError, match="steps"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_pre", method="ig", steps=0)
    with pytest.raises(ValueError, match="steps"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_pre", method="ig-input", steps=1.5)
    with pytest.raises(ValueError, match="qk_fix is an AtP correction"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="attn.q", method="ig-input", qk_fix=True)
    with pytest.raises(ValueError, match="method"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_pre", method="gradient")
    with pytest.raises(ValueError, match="layers"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_pre", layers=[5])
    with pytest.raises(ValueError, match="positions"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_pre", positions=[99])
    with pytest.raises(ValueError, match="direction"):
        attribution_patching(im, ids, corrupt, lambda lg: lg.mean(), site="resid_pre", direction="sideways")
    assert active_context() is None
    with torch.no_grad():
        assert torch.equal(im.model(ids).logits, before)
