"""check_attribution: sampled exact patches against the estimate, on a small random Gemma 2."""

from __future__ import annotations

import math

import pytest
import torch

import instrumentation.gemma2 as g2
from mishax_py.interventions import Ablate, Patch
from mishax_py.studies.activation_patching import activation_patching
from mishax_py.studies.attribution import AttributionCheck, attribution_patching, check_attribution
from tests.helpers import make_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def setup():
    im = g2.instrument(make_model(seed=3))
    g = torch.Generator().manual_seed(4)
    clean = torch.randint(4, 64, (2, 7), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(4, 64, (2,), generator=g)
    corrupt[:, 5] = torch.randint(4, 64, (2,), generator=g)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, 7].mean() - logits[:, -1, 9].mean()

    return im, clean, corrupt, metric


@pytest.mark.parametrize("site,by,direction,positions", [
    ("resid_pre", "pos", "denoise", None),
    ("resid_mid", "pos", "noise", [1, 5, -1]),
    ("attn.z", "head", "denoise", None),
    ("attn.z", "head", "noise", [2, 5]),
    ("attn.v", "head_pos", "denoise", None),
    ("mlp_out", "layer", "denoise", [0, 2, 3]),
])
def test_exact_values_match_the_full_grid(setup, site, by, direction, positions):
    """The sampled exact values are the full activation-patching grid at the same elements (second code path)."""
    im, clean, corrupt, metric = setup
    est = attribution_patching(im, clean, corrupt, metric, site=site, by=by, direction=direction, positions=positions)
    check = check_attribution(im, clean, corrupt, metric, result=est, k=3, n_random=4, seed=1)
    with torch.no_grad():
        grid = activation_patching(im, clean, corrupt, metric, site=site, by=by, direction=direction,
                                   positions=positions)
    assert grid.values.shape == est.values.shape
    n = min(7, est.values.numel())
    assert len(check.elements) == n and check.sample == ["top"] * min(3, n) + ["random"] * (n - min(3, n))
    assert len(set(check.elements)) == n  # no element twice
    for j, el in enumerate(check.elements):
        assert float(check.exact[j]) == pytest.approx(float(grid.values[el]), abs=1e-4)
        assert float(check.estimated[j]) == float(est.values[el])
        assert check.labels[j] == tuple(est.labels[a][c] for a, c in zip(est.axes, el, strict=True))
    # the "top" elements are the highest-scored ones
    top_scores = sorted(est.score.flatten().tolist(), reverse=True)[: min(3, n)]
    assert [float(est.score[el]) for el in check.elements[: len(top_scores)]] == pytest.approx(top_scores)
    # the summary statistics are the formulas written out
    err = (check.estimated - check.exact).abs().max()
    assert check.max_abs_error == pytest.approx(float(err))
    r = torch.corrcoef(torch.stack([check.estimated.double(), check.exact.double()]))[0, 1]
    assert math.isnan(check.pearson) if torch.isnan(r) else check.pearson == pytest.approx(float(r), abs=1e-9)
    assert "Pearson" in str(check) and len(str(check).splitlines()) == n + 2


def test_seed_changes_the_random_sample_only(setup):
    im, clean, corrupt, metric = setup
    est = attribution_patching(im, clean, corrupt, metric, site="resid_pre", by="pos")
    a = check_attribution(im, clean, corrupt, metric, result=est, k=2, n_random=5, seed=0)
    b = check_attribution(im, clean, corrupt, metric, result=est, k=2, n_random=5, seed=1)
    assert a.elements[:2] == b.elements[:2]
    assert a.elements[2:] != b.elements[2:]


def test_a_wrong_estimate_shows_in_the_check(setup):
    """A tampered estimate (one top element's value moved by 5) is caught as a 5-unit error on that element."""
    im, clean, corrupt, metric = setup
    est = attribution_patching(im, clean, corrupt, metric, site="resid_pre", by="pos")
    good = check_attribution(im, clean, corrupt, metric, result=est, k=4, n_random=0)
    est.values[good.elements[0]] += 5.0
    bad = check_attribution(im, clean, corrupt, metric, result=est, k=4, n_random=0)
    assert bad.max_abs_error >= 5.0 - good.max_abs_error


def test_bad_input(setup):
    im, clean, corrupt, metric = setup
    est = attribution_patching(im, clean, corrupt, metric, site="resid_pre", by="pos")
    with pytest.raises(TypeError, match="AttributionResult"):
        check_attribution(im, clean, corrupt, metric, result=est.values)
    with pytest.raises(ValueError, match="k must be"):
        check_attribution(im, clean, corrupt, metric, result=est, k=-1)
    with pytest.raises(ValueError, match="nothing to check"):
        check_attribution(im, clean, corrupt, metric, result=est, k=0, n_random=0)
    under = attribution_patching(im, clean, corrupt, metric, site="resid_pre", by="pos",
                                 interventions={"blocks.0.attn_out": Ablate()})
    under.interventions = None  # a result that lost its interventions cannot be rerun under them
    with pytest.raises(ValueError, match="interventions"):
        check_attribution(im, clean, corrupt, metric, result=under)
    assert isinstance(check_attribution(im, clean, corrupt, metric, result=est, k=1, n_random=0), AttributionCheck)


def test_a_check_reruns_the_estimate_under_its_interventions(setup):
    """An estimate made under an ablation is checked under the same ablation: the exact values equal single
    patched runs written out with the ablation and a Patch from the (ablated) source run."""
    im, clean, corrupt, metric = setup
    ablation = {"blocks.0.attn.z": Ablate(heads=[1, 2])}
    est = attribution_patching(im, clean, corrupt, metric, site="resid_mid", by="pos", interventions=ablation)
    check = check_attribution(im, clean, corrupt, metric, result=est, k=3, n_random=3)
    with torch.no_grad():
        _, source = im.run_with_cache(clean, sites="blocks.*.resid_mid", interventions=ablation)
        for j, (li, pi) in enumerate(check.elements):
            site = f"blocks.{est.layers[li]}.resid_mid"
            run = im.run(corrupt, interventions={**ablation, site: Patch(source, positions=[est.positions[pi]])})
            assert float(check.exact[j]) == pytest.approx(float(metric(run)), abs=1e-5)
        plain = activation_patching(im, clean, corrupt, metric, site="resid_mid", by="pos")
    assert any(abs(float(check.exact[j]) - float(plain.values[el])) > 1e-3 for j, el in enumerate(check.elements))
