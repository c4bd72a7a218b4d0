"""``mishax_py.zoo.analyses`` against independent oracles.

Each analysis is recomputed here another way: head scores by Python loops over the cached
attention maps, head ablations by explicit runs that zero ``attn.z`` with a plain ``Hook``,
direct logit attribution through the model's own ``lm_head`` and final-norm weights (and
summed back to the model's actual logits), top-activating contexts by brute force over a
hand-written JumpReLU encoder. Random-weight models (``tests.helpers.make_model``) check the
arithmetic; the bundled ``gemma2-tiny``, whose circuit is known (model card: layer 0 heads
are previous-token heads, layer 1 heads are induction heads), checks that the analyses find it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import instrumentation.gemma2 as g2
import saes
from mishax_py import InstrumentedModel
from mishax_py.interventions import Ablate, Hook
from mishax_py.zoo import analyses as A
from mishax_py.zoo import tasks
from tests.helpers import make_model, needs_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rand_im() -> InstrumentedModel:
    """A 2-layer random Gemma 2 (4 query / 2 KV heads, vocab 64, randomised norm gains)."""
    return g2.instrument(make_model(seed=3))


def repeats(halves: list[int], *, bos: int | None = 2, seed: int = 0, vocab: int = 64) -> torch.Tensor:
    """Right-padded ``[bos] s s`` rows with distinct tokens from 5..vocab-1 (padding id 0)."""
    g = torch.Generator().manual_seed(seed)
    off = 0 if bos is None else 1
    T = off + 2 * max(halves)
    ids = torch.zeros(len(halves), T, dtype=torch.long)
    for b, L in enumerate(halves):
        s = (torch.randperm(vocab - 5, generator=g)[:L] + 5).tolist()
        ids[b, : off + 2 * L] = torch.tensor(([bos] if bos is not None else []) + s + s)
    return ids


def patterns(im: InstrumentedModel, ids: torch.Tensor) -> list[torch.Tensor]:
    _, cache = im.run_with_cache(ids, sites=["blocks.*.attn.pattern"])
    return [cache[f"blocks.{layer}.attn.pattern"] for layer in range(im.n_layers)]


def random_sae(d_in: int, d_sae: int, site: str, seed: int = 0) -> saes.JumpReLUSAE:
    """A JumpReLU SAE with random weights (about half its features fire on a typical input)."""
    g = torch.Generator().manual_seed(seed)
    sae = saes.JumpReLUSAE(d_in, d_sae, site=site)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in))
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / math.sqrt(d_sae))
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        sae.threshold.copy_(torch.rand(d_sae, generator=g) * 0.2)
    return sae


def encode_by_hand(sae: saes.JumpReLUSAE, x: torch.Tensor) -> torch.Tensor:
    """Gemma Scope JumpReLU inference (SPEC §4): ``f = (pre > threshold) * relu(pre)``."""
    pre = x @ sae.W_enc + sae.b_enc
    return (pre > sae.threshold) * torch.relu(pre)


def zero_heads_hooks(heads: list[tuple[int, int]]) -> dict[str, Hook]:
    """Zero the heads' ``attn.z`` ``[batch, pos, head, d_head]`` with plain hooks (not ``Ablate``)."""

    def zero(hs: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(z: torch.Tensor) -> torch.Tensor:
            z = z.clone()
            z[:, :, hs] = 0
            return z

        return fn

    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)
    return {f"blocks.{layer}.attn.z": Hook(zero(hs)) for layer, hs in by_layer.items()}


def acc_by_hand(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    hits = [int(logits[b, p].argmax()) == int(targets[b, p]) for b, p in mask.nonzero().tolist()]
    return sum(hits) / len(hits)


# ------------------------------------------------------------------------------ metrics
def test_accuracy_and_mean_logprob_on_hand_made_logits() -> None:
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]])  # argmax 0, 1, 2
    targets = torch.tensor([[0, 2, 2]])
    mask = torch.tensor([[True, True, False]])
    assert A.accuracy(logits, targets, mask) == 0.5  # position 2 (a hit) is not scored
    lp = torch.log_softmax(logits, -1)
    assert float(A.mean_logprob(logits, targets, mask)) == pytest.approx(float(lp[0, 0, 0] + lp[0, 1, 2]) / 2)


# --------------------------------------------------------------------------- head scores
@pytest.mark.parametrize("bos", [2, None])
def test_prefix_matching_scores_match_loops_over_the_patterns(rand_im: InstrumentedModel, bos: int | None) -> None:
    halves = [3, 6, 5]  # different lengths: right padding, per-prompt means
    ids = repeats(halves, bos=bos)
    off = 0 if bos is None else 1
    got = A.prefix_matching_scores(rand_im, ids, torch.tensor(halves), offset=off)
    pats = patterns(rand_im, ids)
    want = torch.zeros(rand_im.n_layers, 4)
    for layer, pat in enumerate(pats):
        for h in range(4):
            per_row = []
            for b, L in enumerate(halves):
                vals = [float(pat[b, h, off + L + j - 1, off + j]) for j in range(1, L)]
                per_row.append(sum(vals) / len(vals))
            want[layer, h] = sum(per_row) / len(per_row)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_previous_token_scores_match_loops_over_the_patterns(rand_im: InstrumentedModel) -> None:
    ids = repeats([3, 6, 5])
    lengths = torch.tensor([7, 13, 11])
    got = A.previous_token_scores(rand_im, ids, lengths=lengths, start=2)
    pats = patterns(rand_im, ids)
    want = torch.zeros(rand_im.n_layers, 4)
    for layer, pat in enumerate(pats):
        for h in range(4):
            per_row = [sum(float(pat[b, h, q, q - 1]) for q in range(2, n)) / (n - 2)
                       for b, n in enumerate(lengths.tolist())]  # fmt: skip
            want[layer, h] = sum(per_row) / len(per_row)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_head_scores_reject_prompts_too_short(rand_im: InstrumentedModel) -> None:
    ids = repeats([4, 4])
    with pytest.raises(ValueError, match="half"):
        A.prefix_matching_scores(rand_im, ids, 5)
    with pytest.raises(ValueError, match="start"):
        A.previous_token_scores(rand_im, ids, start=0)


@needs_model
def test_head_scores_find_the_known_circuit_of_the_bundled_model(zoo_im: InstrumentedModel) -> None:
    b = tasks.induction_batch(16, seq_len=10, seed=77)
    pm = A.prefix_matching_scores(zoo_im, b.input_ids, 10)
    prev = A.previous_token_scores(zoo_im, b.input_ids, start=2)
    assert pm[1].min() > 0.9 and torch.cat([pm[0], pm[2:].flatten()]).max() < 0.1  # layer 1: induction heads
    assert prev[0].min() > 0.7 and prev[1:].max() < 0.2  # layer 0: previous-token heads
    assert A.select_heads(pm, 0.5) == sorted(((1, h) for h in range(4)), key=lambda h: -float(pm[h]))


def test_head_patterns_are_the_cached_maps(rand_im: InstrumentedModel) -> None:
    ids = repeats([4, 4])
    got = A.head_patterns(rand_im, ids, [(1, 2), (0, 3)])
    pats = patterns(rand_im, ids)
    assert got.shape == (2, 2, 9, 9)
    torch.testing.assert_close(got[:, 0], pats[1][:, 2])
    torch.testing.assert_close(got[:, 1], pats[0][:, 3])


def test_select_heads_orders_by_score_and_skips_nan() -> None:
    scores = torch.tensor([[0.1, 0.5, float("nan")], [0.9, 0.5, 0.3]])
    assert A.select_heads(scores, 0.3) == [(1, 0), (0, 1), (1, 1), (1, 2)]
    assert A.select_heads(scores, 0.95) == []


# ----------------------------------------------------------------------------- ablations
@pytest.fixture(scope="module")
def own_predictions(rand_im: InstrumentedModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts scored against the random model's own greedy predictions (baseline accuracy 1)."""
    ids = torch.randint(3, 64, (6, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        targets = rand_im.run(ids).argmax(-1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 4:] = True
    return ids, targets, mask


SETS = [[], [(0, 1)], [(1, 0), (1, 3)], [(0, 0), (1, 2)], [(0, h) for h in range(4)] + [(1, h) for h in range(4)]]


def test_head_ablation_accuracy_matches_explicit_runs(rand_im: InstrumentedModel, own_predictions) -> None:
    ids, targets, mask = own_predictions
    got = A.head_ablation_accuracy(rand_im, ids, targets, mask, SETS)
    n = int(mask.sum())
    with torch.no_grad():
        for heads, acc in zip(SETS, got, strict=True):
            by_hook = acc_by_hand(rand_im.run(ids, interventions=zero_heads_hooks(heads)), targets, mask)
            by_layer: dict[int, list[int]] = {}
            for layer, h in heads:
                by_layer.setdefault(layer, []).append(h)
            explicit = {f"blocks.{layer}.attn.z": Ablate(heads=hs) for layer, hs in by_layer.items()}
            by_ablate = acc_by_hand(rand_im.run(ids, interventions=explicit), targets, mask)
            assert acc == pytest.approx(by_hook, abs=1.5 / n) and acc == pytest.approx(by_ablate, abs=1.5 / n)
    assert got[0] == 1.0 and got[-1] < 0.9  # the oracle is not trivially 1: ablations change predictions


def test_other_head_sets_are_combinations_or_seeded_draws() -> None:
    pool = [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert A.other_head_sets(pool, 2, 10, seed=0) == [[a, b] for i, a in enumerate(pool) for b in pool[i + 1:]]
    draws = A.other_head_sets(pool, 2, 3, seed=5)
    assert len(draws) == 3 and len({tuple(d) for d in draws}) == 3
    assert all(len(d) == 2 and set(d) <= set(pool) and d == sorted(d) for d in draws)
    assert draws == A.other_head_sets(pool, 2, 3, seed=5)
    assert A.other_head_sets(pool, 0, 3, seed=0) == [] and A.other_head_sets(pool, 5, 3, seed=0) == []


def test_ablation_vs_control_uses_disjoint_sets_of_the_same_size(rand_im: InstrumentedModel, own_predictions) -> None:
    ids, targets, mask = own_predictions
    heads = [(1, 0), (1, 3)]
    test = A.ablation_vs_control(rand_im, ids, targets, mask, heads, n_controls=4, seed=1)
    assert test.heads == heads and len(test.control_sets) == 4
    assert all(len(c) == 2 and not set(c) & set(heads) for c in test.control_sets)
    with torch.no_grad():
        want = [acc_by_hand(rand_im.run(ids, interventions=zero_heads_hooks(hs)), targets, mask)
                for hs in [[], heads, *test.control_sets]]  # fmt: skip
    n = int(mask.sum())
    assert test.baseline == pytest.approx(want[0]) and test.ablated == pytest.approx(want[1], abs=1.5 / n)
    assert test.control_accuracies == pytest.approx(want[2:], abs=1.5 / n)
    assert test.control_mean == pytest.approx(sum(want[2:]) / 4, abs=1.5 / n)
    assert test.control_min == pytest.approx(min(want[2:]), abs=1.5 / n)


def test_single_head_ablation_grid_matches_explicit_runs(rand_im: InstrumentedModel, own_predictions) -> None:
    ids, targets, mask = own_predictions
    grid = A.single_head_ablation(rand_im, ids, targets, mask)
    assert grid.shape == (2, 4)
    n = int(mask.sum())
    with torch.no_grad():
        for layer, h in [(0, 2), (1, 1), (1, 3)]:
            want = acc_by_hand(rand_im.run(ids, interventions=zero_heads_hooks([(layer, h)])), targets, mask)
            assert float(grid[layer, h]) == pytest.approx(want, abs=1.5 / n)


@needs_model
def test_ablating_the_induction_layer_breaks_the_bundled_model_and_controls_do_not(zoo_im: InstrumentedModel) -> None:
    b = tasks.induction_batch(64, seed=404)
    test = A.ablation_vs_control(zoo_im, b.input_ids, b.targets, b.target_mask, [(1, h) for h in range(4)],
                                 n_controls=6, seed=0)  # fmt: skip
    assert test.baseline > 0.95 and test.ablated < 0.2 and test.control_mean > 0.8


# ------------------------------------------------------------------------- finding heads
@needs_model
def test_find_induction_heads_names_layer_1_of_the_bundled_model(zoo_im: InstrumentedModel) -> None:
    clean, corrupt = tasks.induction_clean_corrupt(8, seq_len=8, seed=3)
    args = (zoo_im, clean.input_ids, corrupt.input_ids, clean.targets, clean.target_mask)
    found = A.find_induction_heads(*args)
    assert sorted(found.heads) == [(1, h) for h in range(4)] and found.reason is None
    assert found.gap > 5 and found.recovery.shape == (4, 4)
    assert [float(found.recovery[h]) for h in found.heads] == sorted((float(found.recovery[h]) for h in found.heads),
                                                                     reverse=True)  # fmt: skip
    strict = A.find_induction_heads(*args, threshold=1.5)
    assert strict.heads == [] and strict.reason == "threshold"


def test_find_induction_heads_names_none_without_a_gap(rand_im: InstrumentedModel) -> None:
    clean, corrupt = repeats([5, 5], seed=1), repeats([5, 5], seed=2)
    targets = torch.zeros_like(clean)
    targets[:, :-1] = clean[:, 1:]
    mask = torch.zeros_like(clean, dtype=torch.bool)
    mask[:, 6:10] = True
    args = (rand_im, clean, corrupt, targets, mask)
    every = A.find_induction_heads(*args, threshold=float("-inf"), min_gap=float("-inf"))
    assert len(every.heads) == 8 and every.reason is None  # recoveries are finite: every head passes -inf
    found = A.find_induction_heads(*args, threshold=float("-inf"), min_gap=abs(every.gap) + 1.0)
    assert found.heads == [] and found.reason == "gap"  # the gap rule alone names none


# -------------------------------------------------------------------------- SAE features
@pytest.fixture(scope="module")
def last_layer_sae(rand_im: InstrumentedModel) -> saes.JumpReLUSAE:
    return random_sae(32, 48, "blocks.1.resid_post", seed=2)  # the 2-layer model's last layer output


def unembed_by_hand(im: InstrumentedModel, v: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """De-meaned logits of residual vectors ``v [..., d_model]`` through the model's own final-norm gain
    and ``lm_head``, with the norm's ``1/rms`` frozen at ``scale``."""
    model = im.model
    gain = 1.0 + model.model.norm.weight.detach()
    s = scale[..., None] if isinstance(scale, torch.Tensor) else scale
    z = model.lm_head(v * s * gain)
    return z - z.mean(-1, keepdim=True)


def test_direct_logit_attribution_sums_to_the_models_logits(rand_im: InstrumentedModel, last_layer_sae) -> None:
    sae = last_layer_sae
    ids = torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        logits, cache = rand_im.run_with_cache(ids, sites=[sae.site])
        x = cache[sae.site]
        f = encode_by_hand(sae, x)
        targets = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(9))
        scale = torch.rsqrt(x.pow(2).mean(-1) + rand_im.model.model.norm.eps)
        attr = A.direct_logit_attribution(rand_im, sae, f, targets, scale=scale)
        assert attr.shape == (3, 9, 48)
        # the rest of the residual stream (bias, reconstruction error) through the same frozen norm
        rest = unembed_by_hand(rand_im, x - f @ sae.W_dec, scale).gather(-1, targets[..., None])[..., 0]
        z = 30.0 * torch.atanh(logits.double() / 30.0)  # undo the final soft-cap
        want = (z - z.mean(-1, keepdim=True)).gather(-1, targets[..., None])[..., 0]
        torch.testing.assert_close((attr.sum(-1) + rest).double(), want, atol=1e-4, rtol=1e-4)
        # per feature: its own decoder row through the model's lm_head
        for b, p, i in [(0, 0, 0), (1, 4, 7), (2, 8, 47)]:
            one = unembed_by_hand(rand_im, f[b, p, i] * sae.W_dec[i], scale[b, p])[targets[b, p]]
            assert float(attr[b, p, i]) == pytest.approx(float(one), abs=1e-5)
        # without a scale: the same up to the per-position factor
        torch.testing.assert_close(A.direct_logit_attribution(rand_im, sae, f, targets) * scale[..., None], attr)
        assert float(A.final_norm_scale(rand_im, ids).sub(scale).abs().max()) < 1e-6


def test_feature_logit_lens_and_promoted_tokens(rand_im: InstrumentedModel, last_layer_sae) -> None:
    sae = last_layer_sae
    with torch.no_grad():
        lens = A.feature_logit_lens(rand_im, sae)
        assert lens.shape == (48, 64)
        for i in (0, 13, 47):
            torch.testing.assert_close(lens[i], unembed_by_hand(rand_im, sae.W_dec[i]), atol=1e-5, rtol=1e-5)
        top = A.promoted_tokens(rand_im, sae, [5, 20], k=3)
        for row, i in zip(top.tolist(), (5, 20), strict=True):
            order = sorted(range(64), key=lambda t: -float(lens[i, t]))
            assert row == order[:3]


def test_direct_logit_attribution_rejects_an_sae_off_the_residual_stream(rand_im: InstrumentedModel) -> None:
    sae = saes.JumpReLUSAE(24, 16, site="blocks.0.attn.z")  # decodes to 24 dims; the residual stream has 32
    with pytest.raises(ValueError, match="residual stream"):
        A.direct_logit_attribution(rand_im, sae, torch.ones(2, 16), torch.tensor([1, 2]))


def test_top_activating_contexts_match_brute_force(rand_im: InstrumentedModel) -> None:
    sae = random_sae(32, 40, "blocks.0.resid_post", seed=6)
    ids = torch.randint(3, 64, (5, 7), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1] = False  # this prompt is not eligible
    feats = [0, 3, 17, 39]
    got = A.top_activating_contexts(rand_im, sae, ids, feats, k=4, mask=mask)
    with torch.no_grad():
        _, cache = rand_im.run_with_cache(ids, sites=[sae.site])
        f = encode_by_hand(sae, cache[sae.site])
    assert len(got) == len(feats)
    for i, ctx in zip(feats, got, strict=True):
        cands = sorted(((float(f[b, p, i]), b, p) for b in range(5) for p in range(7) if b != 1 and f[b, p, i] > 0),
                       reverse=True)[:4]  # fmt: skip
        assert [(c.row, c.pos) for c in ctx] == [(b, p) for _, b, p in cands]
        assert [c.activation for c in ctx] == pytest.approx([a for a, _, _ in cands], abs=1e-5)
    assert any(len(c) == 4 for c in got)


def test_top_k_and_random_active_masks() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.relu(torch.randn(3, 5, 20, generator=g))
    where = torch.zeros(3, 5, dtype=torch.bool)
    where[:, 2:] = True
    top = A.top_k_mask(f, 3, where)
    assert not top[~where].any() and (top[where].sum(-1) == 3).all()
    assert torch.equal(top[where], torch.zeros_like(f[where], dtype=torch.bool).scatter_(-1, f[where].topk(3).indices,
                                                                                          True))  # fmt: skip
    rnd = A.random_active_mask(f, 3, where, exclude=top, generator=torch.Generator().manual_seed(1))
    assert not rnd[~where].any() and not (rnd & top).any() and not (rnd & (f <= 0)).any()
    available = ((f > 0) & ~top).sum(-1)
    assert torch.equal(rnd.sum(-1)[where], available[where].clamp(max=3))


def test_spliced_accuracy_matches_a_hand_written_splice(rand_im: InstrumentedModel, own_predictions) -> None:
    ids, targets, mask = own_predictions
    sae = random_sae(32, 48, "blocks.0.resid_post", seed=11)
    ablate = torch.zeros(*ids.shape, 48, dtype=torch.bool)
    ablate[:, 4:, :24] = True

    def by_hand(x: torch.Tensor) -> torch.Tensor:  # x + decode(f with features zeroed) - decode(f)
        f = encode_by_hand(sae, x)
        return x + (f.masked_fill(ablate, 0.0) - f) @ sae.W_dec

    with torch.no_grad():
        lg = rand_im.run(ids, interventions={sae.site: Hook(by_hand)})
    acc, lp = A.spliced_accuracy(rand_im, sae, ids, targets, mask, ablate=ablate)
    n = int(mask.sum())
    assert acc == pytest.approx(acc_by_hand(lg, targets, mask), abs=1.5 / n) and acc < 1.0
    lp_want = float(torch.log_softmax(lg, -1).gather(-1, targets[..., None])[..., 0][mask].mean())
    assert lp == pytest.approx(lp_want, abs=1e-4)
    assert A.spliced_accuracy(rand_im, sae, ids, targets, mask)[0] == 1.0  # error term kept, no edit: unchanged


def test_feature_clamp_predictions_match_a_hand_written_clamp(rand_im: InstrumentedModel) -> None:
    sae = random_sae(32, 48, "blocks.1.resid_post", seed=12)
    ids = torch.randint(3, 64, (8, 6), generator=torch.Generator().manual_seed(13))
    feature, value, pos = 7, 25.0, 4

    def by_hand(x: torch.Tensor) -> torch.Tensor:
        f = encode_by_hand(sae, x)
        f2 = f.clone()
        f2[:, pos, feature] = value
        return x + (f2 - f) @ sae.W_dec

    before, after = A.feature_clamp_predictions(rand_im, sae, ids, feature, value, pos)
    with torch.no_grad():
        want_before = rand_im.run(ids)[:, pos].argmax(-1)
        want_after = rand_im.run(ids, interventions={sae.site: Hook(by_hand)})[:, pos].argmax(-1)
    assert torch.equal(before, want_before) and torch.equal(after, want_after)
    assert not torch.equal(before, after)  # a clamp this large changes predictions: the oracle can tell
