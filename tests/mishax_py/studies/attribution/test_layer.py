"""``method="atp-layer"``: each element patched exactly through one decoder layer, first order after.

The oracle is written out with plain interventions: per element, a patched run read at the
stop layer's ``resid_post`` (a ``Hook`` copying the source value into that element), and the
metric's gradient there from a separate target run (``torch.autograd.grad`` through a ``Hook``
that keeps the value). Past the last layer the method must be exact activation patching.
"""

from __future__ import annotations

import pytest
import torch

from mishax_py.interventions import Hook
from mishax_py.runtime import active_context
from mishax_py.studies.activation_patching import activation_patching
from mishax_py.studies.attribution import attribution_patching
from mishax_py.studies.attribution.layer import element_masks, stop_layer
from mishax_py.studies.attribution.plan import site_layout
from tests.helpers import element_slices

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _metric(logits: torch.Tensor) -> torch.Tensor:  # nonlinear: a log-prob and a logit difference
    return logits[:, -1].log_softmax(-1)[:, 5].mean() + (logits[:, 4, 7] - logits[:, 4, 9]).mean()


def _gradient_at(im, ids, site, interventions):
    """The metric's gradient with respect to ``site`` on ``ids`` (and the site's value)."""
    kept = {}

    def keep(v):
        v = v.detach().requires_grad_(True)
        kept["v"] = v
        return v

    with torch.enable_grad():
        m = _metric(im.run(ids, interventions={**interventions, site: Hook(keep)}))
        (g,) = torch.autograd.grad(m, [kept["v"]])
    return kept["v"].detach(), g


def reference(im, source, target, site, by, layers, positions=None, interventions=None):
    """Per element: (resid_post[stop] patched - target) . gradient there; exact past the last layer."""
    interventions = interventions or {}
    with torch.no_grad():
        _, src = im.run_with_cache(source, sites=[f"blocks.{L}.{site}" for L in layers], interventions=interventions)
        base = float(_metric(im.run(target, interventions=interventions)))
    out = []
    for L in layers:
        name = f"blocks.{L}.{site}"
        kind = site_layout(im.site_info(name).dims)
        stop = stop_layer(site, L)
        grid = element_slices(kind, by, src[name].shape)
        if positions is not None and by in ("pos", "head_pos", "layer"):  # keep the chosen positions
            axis = 2 if kind == "map" else 1
            grid = [[ix for ix in row if len(ix) <= axis or ix[axis] in positions] for row in grid]
        if stop < im.n_layers:
            post = f"blocks.{stop}.resid_post"
            tgt_post, grad = _gradient_at(im, target, post, interventions)
        vals = []
        for row in grid:
            for ix in row:
                if not ix:
                    vals.append(0.0)
                    continue

                def patch(v, ix=ix, s=src[name], kind=kind):
                    v = v.clone()
                    if by == "layer" and positions is not None:
                        axis = 2 if kind == "map" else 1
                        sel = [slice(None)] * v.ndim
                        sel[axis] = positions
                        v[tuple(sel)] = s[tuple(sel)]
                    else:
                        v[ix] = s[ix]
                    return v

                with torch.no_grad():
                    ivs = {**interventions, name: Hook(patch)}
                    if stop < im.n_layers:
                        _, c = im.run_with_cache(target, sites=[post], interventions=ivs)
                        vals.append(float(((c[post] - tgt_post) * grad).sum()))
                    else:
                        vals.append(float(_metric(im.run(target, interventions=ivs))) - base)
        t = torch.tensor(vals)
        out.append(t.view(len(grid), -1) if by == "head_pos" else (t[0] if by == "layer" else t))
    return torch.stack(out)


@pytest.mark.parametrize(
    "site,by",
    [("resid_pre", "pos"), ("attn.q", "head_pos"), ("attn.k", "head"), ("attn.z", "head"), ("attn.pattern", "pos"),
     ("mlp_out", "pos"), ("resid_post", "pos"), ("resid_mid", "layer")],
)
def test_atp_layer_matches_a_written_out_reference(tiny_im, ids, site, by):
    im = tiny_im
    corrupt = ids.flip(1)
    layers = list(range(im.n_layers))
    for direction in ("denoise", "noise"):
        src, tgt = (ids, corrupt) if direction == "denoise" else (corrupt, ids)
        res = attribution_patching(im, ids, corrupt, _metric, site=site, by=by, method="atp-layer", direction=direction,
                                   batch_size=6)  # 3 elements per chunk: several chunks per layer
        ref = reference(im, src, tgt, site, by, layers)
        assert res.effects.shape == ref.shape, (site, by)
        scale = float(ref.abs().max())
        assert scale > 1e-5  # a real effect (query/key effects are small on a random model)
        err = float((res.effects - ref).abs().max())
        assert err <= min(1e-4, 1e-2 * scale), (site, by, direction, err, scale)
        assert res.method == "atp-layer" and res.values.shape == res.effects.shape


def test_atp_layer_is_exact_past_the_last_layer(tiny_im, ids):
    """resid_post and attn.z of the last layer have no decoder layer left to linearise: exact patching."""
    im = tiny_im
    corrupt = ids.flip(1)
    last = [im.n_layers - 1]
    for site, by in (("resid_post", "pos"), ("attn.z", "head_pos"), ("mlp_out", "layer")):
        for direction in ("denoise", "noise"):
            est = attribution_patching(im, ids, corrupt, _metric, site=site, by=by, method="atp-layer", layers=last,
                                       direction=direction)
            with torch.no_grad():
                exact = activation_patching(im, ids, corrupt, _metric, site=site, by=by, layers=last,
                                            direction=direction)
            assert est.axes == exact.axes and est.labels == exact.labels
            assert (est.values - exact.values).abs().max() <= 1e-4, (site, by, direction)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in row 1: the replicas carry the mask too
    est = attribution_patching(im, ids, corrupt, _metric, site="attn.z", by="head", method="atp-layer", layers=last,
                               attention_mask=mask)
    with torch.no_grad():
        exact = activation_patching(im, ids, corrupt, _metric, site="attn.z", by="head", layers=last,
                                    attention_mask=mask)
        unmasked = activation_patching(im, ids, corrupt, _metric, site="attn.z", by="head", layers=last)
    assert (est.values - exact.values).abs().max() <= 1e-4
    assert (exact.values - unmasked.values).abs().max() > 1e-4  # the mask mattered


def test_atp_layer_positions_and_interventions(tiny_im, ids):
    """A subset of positions (in the order given) and runs under an intervention, against the reference."""
    im = tiny_im
    corrupt = ids.flip(1)
    iv = {"blocks.0.attn_out": Hook(lambda v: 0.5 * v)}
    res = attribution_patching(im, ids, corrupt, _metric, site="resid_pre", method="atp-layer", positions=[7, 2, 5],
                               interventions=iv)
    ref = reference(im, ids, corrupt, "resid_pre", "pos", list(range(im.n_layers)), interventions=iv)
    assert res.positions == [7, 2, 5] and res.labels["pos"] == ["7", "2", "5"]
    assert (res.effects - ref[:, [7, 2, 5]]).abs().max() <= 1e-4
    plain = attribution_patching(im, ids, corrupt, _metric, site="resid_pre", method="atp-layer", positions=[7, 2, 5])
    assert (plain.effects - res.effects).abs().max() > 1e-3  # the intervention mattered
    together = attribution_patching(im, ids, corrupt, _metric, site="resid_pre", by="layer", method="atp-layer",
                                    positions=[2, 5])
    ref = reference(im, ids, corrupt, "resid_pre", "layer", list(range(im.n_layers)), positions=[2, 5])
    assert (together.effects - ref.flatten()).abs().max() <= 1e-4
    assert active_context() is None


def test_atp_layer_skips_elements_equal_in_both_runs(tiny_im, ids):
    """One differing token: the elements before it are equal in both runs (effect 0, not run); the rest as the
    reference."""
    im = tiny_im
    corrupt = ids.clone()
    corrupt[:, 6] = 9
    for site, by in (("resid_pre", "pos"), ("attn.z", "head_pos")):
        res = attribution_patching(im, ids, corrupt, _metric, site=site, by=by, method="atp-layer")
        ref = reference(im, ids, corrupt, site, by, list(range(im.n_layers)))
        assert (res.effects - ref).abs().max() <= 1e-4, site
        assert bool((res.effects[..., :6] == 0).all()) and bool((res.effects[..., 6:] != 0).any())


def test_element_masks_cover_each_element_once():
    pos_mask = torch.tensor([True, False, True, True])
    masks, index, shape = element_masks("head", "head_pos", (4, 3, 8), pos_mask)
    assert shape == (3, 4) and masks.shape == (9, 4, 3, 1)
    assert masks.sum((1, 2, 3)).eq(1).all()  # one (pos, head) each
    assert sorted(index.tolist()) == sorted(h * 4 + p for h in range(3) for p in (0, 2, 3))
    masks, index, shape = element_masks("map", "head", (2, 4, 4), pos_mask)
    assert shape == (2,) and masks.shape == (2, 2, 4, 1) and masks[0, 0, :, 0].tolist() == pos_mask.tolist()
    assert [stop_layer(s, 2) for s in ("resid_pre", "attn.k", "attn.pattern", "attn.z", "mlp_out", "resid_post")] \
        == [2, 2, 2, 3, 3, 3]
    with pytest.raises(ValueError, match="per-head site"):
        element_masks("stream", "head", (4, 8), pos_mask)


def test_atp_layer_bad_input(tiny_im, ids):
    im = tiny_im
    corrupt = ids.flip(1)
    with pytest.raises(ValueError, match="qk_fix is an AtP correction"):
        attribution_patching(im, ids, corrupt, _metric, site="attn.q", method="atp-layer", qk_fix=True)
    with pytest.raises(ValueError, match="graddrop"):
        attribution_patching(im, ids, corrupt, _metric, site="resid_pre", method="atp-layer", graddrop=True)
    with pytest.raises(ValueError, match="scalar"):
        attribution_patching(im, ids, corrupt, lambda lg: lg[:, -1, 3], site="resid_pre", method="atp-layer")
    assert active_context() is None
