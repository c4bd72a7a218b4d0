"""The study convention for attribution: signatures, the direction vocabulary, result types and the family boundary.

* the signatures of ``attribution_patching``, ``attribution_patching_sites`` and
  ``check_attribution`` follow ``(im, clean_ids, corrupt_ids, metric, *, site=, by=, direction=,
  layers=, positions=, interventions=, batch_size=, progress=, method=, **hf_kwargs)``;
* ``direction`` is ``"denoise"``/``"noise"``; the old spellings still work with a warning;
* results combine with activation patching's as tensors (``exact - estimate``);
* ``attribution_patching_sites`` returns a mapping that plots itself; ``site_gradients`` a
  named tuple; IG's ``steps`` default is 16;
* the QK fix takes each layer's scale and soft-cap from ``im.family.attention(layer)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Mapping

import pytest
import torch

from mishax_py.family import AttentionSpec
from mishax_py.interventions import Hook
from mishax_py.studies.activation_patching import activation_patching
from mishax_py.studies.attribution import (
    AttributionResult,
    AttributionResults,
    SiteGradients,
    attribution_patching,
    attribution_patching_sites,
    check_attribution,
    site_gradients,
)
from mishax_py.studies.attribution.qk import ScoreFn
from tests.mishax_py.toy_family import instrument_toy, make_toy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

LEADING = ["im", "clean_ids", "corrupt_ids", "metric"]
COMMON = ["site", "by", "direction", "layers", "positions", "interventions", "batch_size", "progress", "method"]


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].log_softmax(-1)[:, 5].mean()


def _check_convention(fn, *, required_keywords=()) -> inspect.Signature:
    """The leading four positional parameters, everything else keyword-only, the common ones in order."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    assert [p.name for p in params[:4]] == LEADING, fn.__name__
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[:4]), fn.__name__
    rest = params[4:]
    assert rest[-1].kind is inspect.Parameter.VAR_KEYWORD and rest[-1].name == "hf_kwargs", fn.__name__
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest[:-1]), fn.__name__
    names = [p.name for p in rest]
    present = [n for n in names if n in COMMON]
    assert present == [n for n in COMMON if n in present], (fn.__name__, present)  # the convention's order
    for name in required_keywords:
        assert sig.parameters[name].default is inspect.Parameter.empty, (fn.__name__, name)
    if "direction" in sig.parameters:
        assert sig.parameters["direction"].default == "denoise"
    return sig


def test_signatures_follow_the_study_convention():
    sig = _check_convention(attribution_patching)
    assert [n for n in sig.parameters if n in COMMON] == COMMON  # every common keyword
    assert sig.parameters["site"].default == "resid_pre" and sig.parameters["method"].default == "atp"
    assert sig.parameters["steps"].default == 16  # the one IG default
    sites_sig = _check_convention(attribution_patching_sites, required_keywords=["sites"])
    assert sites_sig.parameters["method"].default == "atp"
    check_sig = _check_convention(check_attribution, required_keywords=["result"])
    assert {"k", "n_random", "seed"} <= set(check_sig.parameters)
    grads_sig = inspect.signature(site_gradients)
    assert grads_sig.parameters["steps"].default == 16
    assert [p.name for p in list(grads_sig.parameters.values())[:4]] == ["im", "ids", "metric", "sites"]


def test_site_and_result_are_keywords_only(tiny_im, ids):
    corrupt = ids.flip(1)
    with pytest.raises(TypeError):
        attribution_patching(tiny_im, ids, corrupt, _metric, "resid_pre")
    with pytest.raises(TypeError):
        attribution_patching_sites(tiny_im, ids, corrupt, _metric, ["resid_pre"])
    est = attribution_patching(tiny_im, ids, corrupt, _metric, site="resid_pre")
    with pytest.raises(TypeError):
        check_attribution(tiny_im, est, ids, corrupt, _metric)


def test_direction_vocabulary(tiny_im, ids):
    """"denoise"/"noise"; the old "denoising"/"noising" give the same result with a DeprecationWarning."""
    corrupt = ids.flip(1)
    for old, new in (("denoising", "denoise"), ("noising", "noise")):
        want = attribution_patching(tiny_im, ids, corrupt, _metric, site="attn.z", direction=new)
        with pytest.warns(DeprecationWarning, match=new):
            got = attribution_patching(tiny_im, ids, corrupt, _metric, site="attn.z", direction=old)
        assert got.direction == new
        torch.testing.assert_close(got.values, want.values)
        with pytest.warns(DeprecationWarning, match=new):
            sites = attribution_patching_sites(tiny_im, ids, corrupt, _metric, sites=["attn.z"], direction=old)
        assert sites["attn.z"].direction == new
        torch.testing.assert_close(sites["attn.z"].values, want.values, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the canonical spellings warn about nothing
        attribution_patching(tiny_im, ids, corrupt, _metric, site="resid_pre", direction="noise")
    for bad in ("sideways", "Denoise", None):
        with pytest.raises(ValueError, match="direction"):
            attribution_patching(tiny_im, ids, corrupt, _metric, direction=bad)
        with pytest.raises(ValueError, match="direction"):
            attribution_patching_sites(tiny_im, ids, corrupt, _metric, sites=["resid_pre"], direction=bad)


def test_estimate_and_exact_patching_combine_as_tensors(tiny_im, ids):
    """``exact - estimate`` (TransformerLens style): the elementwise error of the estimate, as a tensor."""
    corrupt = ids.flip(1)
    est = attribution_patching(tiny_im, ids, corrupt, _metric, site="resid_pre")
    with torch.no_grad():
        exact = activation_patching(tiny_im, ids, corrupt, _metric, site="resid_pre")
    err = exact - est
    torch.testing.assert_close(torch.as_tensor(err), exact.values - est.values)
    assert float(torch.as_tensor(err).abs().max()) > 0  # first order is not exact here
    torch.testing.assert_close(torch.as_tensor(est), est.values)
    assert int(est.argmax()) == int(est.values.argmax())
    assert est.shape == tuple(est.values.shape) == (tiny_im.n_layers, ids.shape[1])


def test_attribution_patching_sites_returns_a_mapping_that_plots(tiny_im, ids, tmp_path):
    corrupt = ids.flip(1)
    got = attribution_patching_sites(tiny_im, ids, corrupt, _metric, sites={"resid_pre": None, "attn.hook_z": "head"})
    assert isinstance(got, AttributionResults) and isinstance(got, Mapping)
    assert list(got) == ["resid_pre", "attn.hook_z"] and len(got) == 2
    assert all(isinstance(r, AttributionResult) for r in got.values())
    assert dict(got)["attn.hook_z"] is got["attn.hook_z"]
    with pytest.raises(KeyError):
        got["mlp_out"]
    paths = got.plot(tmp_path / "grids")
    assert list(paths) == ["resid_pre", "attn.hook_z"]
    assert len(set(paths.values())) == 2
    for p in paths.values():
        assert p.startswith(str(tmp_path / "grids")) and p.endswith(".png")
        assert (tmp_path / "grids" / p.rsplit("/", 1)[1]).stat().st_size > 1000
    assert "AttributionResults(" in repr(got)
    with pytest.raises(ValueError, match="method must be 'atp'"):
        attribution_patching_sites(tiny_im, ids, corrupt, _metric, sites=["resid_pre"], method="ig")


def test_site_gradients_is_a_named_tuple_with_ig_steps_16(tiny_im, ids):
    names = ["blocks.0.resid_mid", "blocks.1.attn.z"]
    out = site_gradients(tiny_im, ids, _metric, names)
    assert isinstance(out, SiteGradients) and isinstance(out, tuple)
    values, grads, m = out  # tuple unpacking keeps working
    assert (values, grads, m) == (out.values, out.grads, out.metric)
    with torch.no_grad():
        assert m == pytest.approx(float(_metric(tiny_im.run(ids))), abs=1e-6)
    # the gradient, written out
    logits, cache = tiny_im.run_with_cache(ids, sites=names, grad=True)
    want = torch.autograd.grad(_metric(logits), [cache[n] for n in names])
    for n, g in zip(names, want, strict=True):
        torch.testing.assert_close(grads[n], g.float())
    toward = {n: torch.zeros_like(values[n]) for n in names}
    default = site_gradients(tiny_im, ids, _metric, names, method="ig", toward=toward)
    sixteen = site_gradients(tiny_im, ids, _metric, names, method="ig", toward=toward, steps=16)
    ten = site_gradients(tiny_im, ids, _metric, names, method="ig", toward=toward, steps=10)
    for n in names:
        torch.testing.assert_close(default.grads[n], sixteen.grads[n])
    assert any(not torch.allclose(default.grads[n], ten.grads[n]) for n in names)
    with pytest.raises(ValueError, match="steps"):
        site_gradients(tiny_im, ids, _metric, names, method="ig", toward=toward, steps=0)


class _Family:
    """The model's family with the attention facts of some layers replaced (everything else delegated)."""

    def __init__(self, family, attention: dict[int, AttentionSpec]) -> None:
        self._family, self._attention = family, attention

    def attention(self, layer: int) -> AttentionSpec:
        return self._attention.get(layer) or self._family.attention(layer)

    def __getattr__(self, name: str):
        return getattr(self._family, name)


def test_qk_fix_uses_each_layers_attention_spec(tiny_im, ids):
    """The QK fix of layer L recomputes scores with ``im.family.attention(L)``: a wrong scale on layer 1 only
    breaks layer 1; a family whose facts are right gives the same estimate as the model's own."""
    corrupt = ids.flip(1)
    spec = tiny_im.family.attention(1)
    fn = ScoreFn(spec)
    assert (fn.scale, fn.softcap) == (spec.scale, spec.softcap)
    want = attribution_patching(tiny_im, ids, corrupt, _metric, site="attn.q", method="atp*")
    tiny_im.family = _Family(tiny_im.family, {1: dataclasses.replace(spec, scale=2 * spec.scale)})
    one = attribution_patching(tiny_im, ids, corrupt, _metric, site="attn.q", method="atp*", layers=[0])
    torch.testing.assert_close(one.values, want.values[:1])
    with pytest.raises(ValueError, match="cannot reproduce blocks.1.attn.scores"):
        attribution_patching(tiny_im, ids, corrupt, _metric, site="attn.q", method="atp*", layers=[1])
    tiny_im.family = _Family(tiny_im.family._family, {1: dataclasses.replace(spec, softcap=1e-4)})
    with pytest.raises(ValueError, match="cannot reproduce"):  # layer 1's soft-cap matters as well
        attribution_patching(tiny_im, ids, corrupt, _metric, site="attn.k", qk_fix=True, layers=[1])


def test_qk_fix_on_a_family_without_rotary_embeddings():
    """The toy family (no RoPE: it tags attn.q/attn.k, no rot_q/rot_k) gets the QK fix from its own attention spec.

    The metric reads the last layer's attention pattern linearly (through a Hook that keeps it), so the fix --
    exact through the softmax, linear after it -- must equal patching each query row / key column exactly,
    written out as a loop of single patched runs.
    """
    im = instrument_toy(make_toy())
    clean = torch.tensor([[1, 5, 7, 3, 9, 2], [4, 4, 8, 1, 6, 2]])
    corrupt = torch.tensor([[1, 5, 11, 3, 9, 2], [4, 13, 8, 1, 6, 2]])
    last = im.n_layers - 1
    n_heads, n_pos = im.family.dims.n_heads, clean.shape[1]
    weights = torch.randn(n_heads, n_pos, n_pos)
    kept: dict[str, torch.Tensor] = {}

    def keep(value: torch.Tensor) -> torch.Tensor:
        kept["pattern"] = value
        return value

    def pattern_metric(logits: torch.Tensor) -> torch.Tensor:  # linear in the kept pattern
        return (kept["pattern"] * weights).sum() + 0 * logits.sum()

    ivs = {im.layer_site(last, "attn.pattern"): Hook(keep)}
    for kind in ("attn.q", "attn.k"):
        name = im.layer_site(last, kind)
        est = attribution_patching(im, clean, corrupt, pattern_metric, site=kind, by="head_pos", layers=[last],
                                   qk_fix=True, interventions=ivs)
        with torch.no_grad():
            _, source = im.run_with_cache(clean, sites=[name])
            base = float(pattern_metric(im.run(corrupt, interventions=ivs)))
            exact = torch.zeros(n_heads, n_pos)
            for h in range(n_heads):
                for p in range(n_pos):
                    def patch(v, h=h, p=p, src=source[name]):
                        v = v.clone()
                        v[:, p, h] = src[:, p, h]
                        return v

                    run = im.run(corrupt, interventions={**ivs, name: Hook(patch)})
                    exact[h, p] = float(pattern_metric(run)) - base
        assert float(exact.abs().max()) > 1e-3, kind  # a real effect
        torch.testing.assert_close(est.effects[0], exact, rtol=1e-4, atol=1e-5)
    im.family = _Family(im.family, {last: AttentionSpec(scale=1.0)})
    with pytest.raises(ValueError, match="cannot reproduce"):
        attribution_patching(im, clean, corrupt, pattern_metric, site="attn.q", layers=[last], qk_fix=True,
                             interventions=ivs)
