"""An intervention whose selectors select nothing in a whole run warns once per run (EmptySelectionWarning),
naming the site and the selector; generation, where ``positions="new"`` selects the generated tokens, does not."""

from __future__ import annotations

import warnings

import pytest
import torch

from mishax_py.interventions import Ablate, Clamp, EmptySelectionWarning, Patch, Steer

pytestmark = pytest.mark.usefixtures("one_thread")

SITE = "blocks.0.resid_post"


def _empty_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, EmptySelectionWarning)]


def _steer(positions) -> Steer:
    return Steer(torch.ones(32), scale=3.0, positions=positions)


def test_steer_new_in_a_plain_run_warns_once_naming_site_and_selector(tiny_im, ids):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        logits = tiny_im.run(ids, interventions={SITE: _steer("new")})
    found = _empty_warnings(record)
    assert len(found) == 1, found
    assert SITE in found[0] and "positions='new'" in found[0] and "Steer" in found[0], found[0]
    torch.testing.assert_close(logits, tiny_im.run(ids), rtol=0, atol=0)  # what it warns about: nothing changed


@pytest.mark.parametrize("make", [
    lambda: Clamp(0.0, index=[]),
    lambda: Ablate(positions=slice(50, None)),
    lambda: Ablate(heads=[], positions=[1]),
], ids=["index=[]", "slice past the end", "heads=[]"])
def test_other_empty_selections_warn_too(tiny_im, ids, make):
    iv = make()
    site = "blocks.0.attn.z" if "heads" in repr(iv) else SITE
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tiny_im.run(ids, interventions={site: iv})
    found = _empty_warnings(record)
    assert len(found) == 1 and site in found[0], found


def test_run_with_cache_warns_and_a_selection_that_selects_does_not(tiny_im, ids):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tiny_im.run_with_cache(ids, sites=SITE, interventions={SITE: _steer("new")})
        assert len(_empty_warnings(record)) == 1
        record.clear()
        tiny_im.run(ids, interventions={SITE: _steer([3]), "blocks.1.mlp_out": Ablate(),
                                        "blocks.0.attn.z": Ablate(heads=[1], positions=-1)})
        tiny_im.run(ids, interventions={SITE: Patch(torch.zeros(2, 10, 32), positions=[[1], []])})  # row 0 only
    assert _empty_warnings(record) == []


def test_generation_with_new_positions_edits_and_does_not_warn(tiny_im):
    prompt = torch.tensor([[2, 5, 9, 13, 7]])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    seen: dict[str, list[torch.Tensor]] = {"steered": [], "plain": []}

    def rec(key: str):
        return lambda v: seen[key].append(v.detach()) or None

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad(), tiny_im.intervene({SITE: [_steer("new"), rec("steered")]}):
            tiny_im.model.generate(prompt, **kw)
        with torch.no_grad(), tiny_im.intervene({SITE: rec("plain")}):
            tiny_im.model.generate(prompt, **kw)
    assert _empty_warnings(record) == []
    # the prefill (the prompt) is untouched; the first decoding step sees the same token and is steered by 3
    assert len(seen["steered"]) == 4
    torch.testing.assert_close(seen["steered"][0], seen["plain"][0], rtol=0, atol=0)
    torch.testing.assert_close(seen["steered"][1], seen["plain"][1] + 3.0)
    # generating no new token: the block selected nothing, and says so
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad(), tiny_im.intervene({SITE: _steer("new")}):
            tiny_im.run(prompt)
    assert len(_empty_warnings(record)) == 1


def test_an_intervene_block_without_a_forward_does_not_warn(tiny_im):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with tiny_im.intervene({SITE: _steer("new")}):
            pass
    assert _empty_warnings(record) == []


def test_a_sweep_warns_once_for_many_empty_variants(tiny_im, ids):
    variants = [{SITE: _steer("new")} for _ in range(40)] + [{SITE: _steer([2])}]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            tiny_im.sweep(ids, variants, lambda lg: lg[:, -1, 5].sum(), batch_size=8)
    found = _empty_warnings(record)
    assert len(found) == 1, found
    assert "40 of 41" in found[0] and SITE in found[0], found[0]


def test_the_warning_can_be_made_an_error_and_leaves_nothing_behind(tiny_im, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptySelectionWarning)
        with pytest.raises(EmptySelectionWarning):
            tiny_im.run(ids, interventions={SITE: _steer("new")})
    torch.testing.assert_close(tiny_im.run(ids), tiny_im.model(ids).logits, rtol=0, atol=0)
