"""Interventions around ``model.generate``: absolute positions with a KV cache.

Each test generates greedily inside ``im.intervene`` and compares (exact token equality) with
a manual greedy loop that re-runs the growing sequence with ``im.run`` and the same edit,
expressed with the positions a full re-run sees.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

from mishax_py import InstrumentedModel
from mishax_py.interventions import Ablate, Clamp, EmptySelectionWarning, Patch, Positions, Steer

N_NEW = 8
PROMPT = torch.tensor([[2, 5, 9, 13, 7], [2, 8, 31, 17, 40]])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def generate(im: InstrumentedModel, ivs: dict, prompt: torch.Tensor = PROMPT, **kw) -> torch.Tensor:
    kw.setdefault("use_cache", True)
    with torch.no_grad(), im.intervene(ivs):
        return im.model.generate(prompt, max_new_tokens=N_NEW, do_sample=False, pad_token_id=0,
                                 eos_token_id=None, **kw)


def greedy(
    im: InstrumentedModel,
    make: Callable[[int], dict],
    prompt: torch.Tensor = PROMPT,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full re-run of the growing sequence each step; ``make(seq_len)`` gives that step's edit.

    The first step's sequence is the prompt, where an edit of the new positions selects nothing, as it
    should (and warns: EmptySelectionWarning, silenced here).
    """
    seq = prompt
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptySelectionWarning)
        for _ in range(N_NEW):
            kw = {} if attention_mask is None else {"attention_mask": attention_mask}
            nxt = im.run(seq, interventions=make(seq.shape[1]), **kw)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, torch.ones_like(nxt)], 1)
    return seq


@pytest.fixture
def plain(tiny_im: InstrumentedModel) -> torch.Tensor:
    return generate(tiny_im, {})


def vector(seed: int, scale: float = 4.0, *shape: int) -> torch.Tensor:
    return torch.randn(*(shape or (32,)), generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("position", [2, 4, 7, 11])  # in the prompt, its last token, generated tokens
def test_steer_at_a_fixed_absolute_position(tiny_im: InstrumentedModel, plain: torch.Tensor, position: int) -> None:
    vec = vector(position)
    site = "blocks.0.resid_post"
    out = generate(tiny_im, {site: Steer(vec, positions=position)})
    ref = greedy(tiny_im, lambda n: {site: Steer(vec, positions=position)} if n > position else {})
    assert torch.equal(out, ref)
    assert not torch.equal(out, plain)  # the edit mattered
    assert torch.equal(out[:, : position + 1], plain[:, : position + 1])  # nothing before it changed


def test_steer_every_new_token(tiny_im: InstrumentedModel, plain: torch.Tensor) -> None:
    vec = vector(1)
    site = "blocks.1.resid_pre"
    prompt_len = PROMPT.shape[1]
    for new in ("new", Positions.NEW):
        out = generate(tiny_im, {site: Steer(vec, positions=new)})
        ref = greedy(tiny_im, lambda n: {site: Steer(vec, positions=slice(prompt_len, None))})
        assert torch.equal(out, ref)
        assert not torch.equal(out, plain)
        # the first generated token comes from the prompt's last position: unaffected
        assert torch.equal(out[:, : prompt_len + 1], plain[:, : prompt_len + 1])


def test_every_position_is_the_default(tiny_im: InstrumentedModel, plain: torch.Tensor) -> None:
    vec = vector(2)
    site = "blocks.0.mlp_out"
    out = generate(tiny_im, {site: Steer(vec)})
    assert torch.equal(out, generate(tiny_im, {site: Steer(vec, positions="all")}))
    assert torch.equal(out, greedy(tiny_im, lambda n: {site: Steer(vec)}))
    assert not torch.equal(out, plain)


def test_head_ablation_on_new_tokens_and_pattern_clamp_at_query_positions(tiny_im: InstrumentedModel, plain) -> None:
    out = generate(tiny_im, {"blocks.1.attn.z": Ablate(heads=[0, 2], positions=Positions.NEW)})
    ref = greedy(tiny_im, lambda n: {"blocks.1.attn.z": Ablate(heads=[0, 2], positions=slice(5, None))})
    assert torch.equal(out, ref) and not torch.equal(out, plain)
    qs = [4, 6, 9]
    out = generate(tiny_im, {"blocks.1.attn.pattern": Clamp(0.0, positions=qs, heads=[1, 3])})
    ref = greedy(tiny_im, lambda n: {"blocks.1.attn.pattern": Clamp(0.0, positions=[q for q in qs if q < n],
                                                                       heads=[1, 3])})
    assert torch.equal(out, ref) and not torch.equal(out, plain)


def test_sources_longer_than_the_sequence_are_read_at_absolute_positions(tiny_im: InstrumentedModel, plain) -> None:
    total = PROMPT.shape[1] + N_NEW
    other = torch.randint(4, 64, (2, total), generator=torch.Generator().manual_seed(5))
    site = "blocks.0.resid_post"
    with torch.no_grad():
        src = tiny_im.run_with_cache(other, sites=[site])[1][site]  # [2, total, 32]
    out = generate(tiny_im, {site: Patch(src, positions=[3, 8])})
    ref = greedy(tiny_im, lambda n: {site: Patch(src[:, :n], positions=[p for p in (3, 8) if p < n])})
    assert torch.equal(out, ref) and not torch.equal(out, plain)
    per_pos = vector(6, 3.0, total, 32)  # one steering vector per absolute position
    out = generate(tiny_im, {site: Steer(per_pos)})
    ref = greedy(tiny_im, lambda n: {site: Steer(per_pos[:n])})
    assert torch.equal(out, ref) and not torch.equal(out, plain)


def test_left_padded_generation_uses_column_positions(tiny_im: InstrumentedModel) -> None:
    prompt = torch.tensor([[2, 5, 9, 13, 7], [0, 0, 2, 8, 31]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    vec = vector(7)
    site = "blocks.0.resid_mid"
    for pos, manual in ((6, lambda n: {site: Steer(vec, positions=6)} if n > 6 else {}),
                        ("new", lambda n: {site: Steer(vec, positions=slice(5, None))})):
        out = generate(tiny_im, {site: Steer(vec, positions=pos)}, prompt, attention_mask=mask)
        ref = greedy(tiny_im, manual, prompt, attention_mask=mask)
        assert torch.equal(out, ref)


def test_new_without_a_kv_cache_and_across_generate_calls(tiny_im: InstrumentedModel) -> None:
    vec = vector(8)
    site = "blocks.0.resid_post"
    with_cache = generate(tiny_im, {site: Steer(vec, positions="new")})
    without = generate(tiny_im, {site: Steer(vec, positions="new")}, use_cache=False)
    assert torch.equal(with_cache, without)
    # one intervene block, two prompts of different lengths: "new" restarts with each generate call
    short = PROMPT[:, :3]
    with torch.no_grad(), tiny_im.intervene({site: Steer(vec, positions="new")}):
        a = tiny_im.model.generate(PROMPT, max_new_tokens=N_NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
        b = tiny_im.model.generate(short, max_new_tokens=N_NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(a, with_cache)
    assert torch.equal(b, greedy(tiny_im, lambda n: {site: Steer(vec, positions=slice(3, None))}, short))


def test_generation_leaves_the_model_clean(tiny_im: InstrumentedModel, plain: torch.Tensor) -> None:
    generate(tiny_im, {"blocks.0.resid_post": Steer(vector(9), positions="new")})
    assert torch.equal(generate(tiny_im, {}), plain)
    with torch.no_grad():
        assert torch.equal(tiny_im.model(PROMPT).logits, tiny_im.run(PROMPT))
