"""``sweep``: many variants batched along the batch, each equal to running it alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import instrumentation.gemma2 as g2
from mishax_py import InstrumentedModel, UnknownSiteError
from mishax_py.execution.sweep import default_batch_size, sweep
from mishax_py.interventions import Ablate, Clamp, Hook, Patch, Steer
from tests.helpers import make_model

B, P = 3, 8
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def setup() -> dict:
    """One model, a base batch (plain and left-padded) and a source cache, shared by the property tests."""
    im = g2.instrument(make_model())
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(4, 64, (B, P), generator=g)
    other = torch.randint(4, 64, (B, P), generator=g)
    padded = ids.clone()
    mask = torch.ones(B, P, dtype=torch.long)
    for row, n_pad in enumerate([0, 3, 5]):
        padded[row, :n_pad] = 0
        mask[row, :n_pad] = 0
    with torch.no_grad():
        _, src = im.run_with_cache(other)
    return {"im": im, "ids": ids, "padded": padded, "mask": mask, "src": src}


def alone(im: InstrumentedModel, ids: torch.Tensor, variant: dict, **kw) -> torch.Tensor:
    with torch.no_grad():
        return im.run(ids, interventions=variant, **kw)


def assert_all_close(results: list, expected: list) -> None:
    assert len(results) == len(expected)
    for i, (r, e) in enumerate(zip(results, expected, strict=True)):
        torch.testing.assert_close(r, e, atol=ATOL, rtol=0, msg=lambda m, i=i: f"variant {i}: {m}")


# ---------------------------------------------------------------------------------------------
# Property test: random variants, sites, selectors, chunkings and paddings
# ---------------------------------------------------------------------------------------------

SITES = [
    "embed", "blocks.0.resid_pre", "blocks.0.attn.q", "blocks.0.attn.v", "blocks.0.attn.pattern", "blocks.0.attn.z",
    "blocks.0.mlp.post", "blocks.0.resid_post", "blocks.1.attn.k", "blocks.1.attn.scores", "blocks.1.attn_out",
    "blocks.1.ln2_normalized", "blocks.1.mlp_out", "blocks.1.resid_post", "ln_final", "logits",
]


@st.composite
def interventions(draw, im: InstrumentedModel, src) -> tuple[str, object]:
    site = draw(st.sampled_from(SITES))
    shape = im.site_info(site).concrete_shape(B, P)
    is_map = site.endswith(("scores", "pattern"))
    head_dim = 1 if is_map else (2 if len(shape) == 4 else None)
    pos_dim = 2 if is_map else 1

    def subset(n: int):
        return draw(st.one_of(st.none(), st.lists(st.integers(-n, n - 1), min_size=1, max_size=3, unique=True)))

    kw: dict = {"rows": subset(B), "index": subset(shape[-1])}
    per_row = st.lists(st.lists(st.integers(0, P - 1), max_size=2), min_size=B, max_size=B)
    starts = st.builds(slice, st.integers(0, P - 1), st.none())
    kw["positions"] = draw(st.one_of(st.none(), starts, per_row,
                                     st.lists(st.integers(0, shape[pos_dim] - 1), min_size=1, max_size=3)))
    if head_dim is not None:
        kw["heads"] = subset(shape[head_dim])
    kind = draw(st.sampled_from(["zero", "mean", "resample", "clamp", "patch", "patch1", "steer", "hook"]))
    if kind == "zero":
        return site, Ablate(**kw)
    if kind == "mean":
        return site, Ablate(mean=src, mean_over_positions=draw(st.booleans()), **kw)
    if kind == "resample":
        return site, Ablate(resample=True, seed=draw(st.integers(0, 3)), **kw)
    if kind == "clamp":
        return site, Clamp(draw(st.floats(-2, 2)), **kw)
    if kind == "patch":
        return site, Patch(src, **kw)
    if kind == "patch1":
        return site, Patch(src[site][1:2], **kw)
    if kind == "steer":
        vec = torch.randn(shape[-1], generator=torch.Generator().manual_seed(draw(st.integers(0, 9))))
        return site, Steer(vec, draw(st.floats(-2, 2)), **kw)
    return site, Hook(lambda v: v * 0.5)


@st.composite
def sweeps(draw, im: InstrumentedModel, src):
    n_variants = draw(st.integers(1, 6))
    variants = []
    for _ in range(n_variants):
        variant: dict = {}
        for _ in range(draw(st.integers(0, 3))):
            site, iv = draw(interventions(im, src))
            variant.setdefault(site, []).append(iv)
        variants.append(variant)
    batch_size = draw(st.one_of(st.none(), st.integers(1, B * n_variants + 2)))
    return variants, batch_size, draw(st.booleans())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_sweep_equals_running_each_variant_alone(setup: dict, data) -> None:
    im, src = setup["im"], setup["src"]
    variants, batch_size, padded = data.draw(sweeps(im, src))
    ids = setup["padded"] if padded else setup["ids"]
    kw = {"attention_mask": setup["mask"]} if padded else {}
    with torch.no_grad():
        results = sweep(im, ids, variants, batch_size=batch_size, progress=False, **kw)
    assert_all_close(results, [alone(im, ids, v, **kw) for v in variants])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_sweep_with_a_metric_and_without_prefix_sharing(setup: dict, data) -> None:
    im, src = setup["im"], setup["src"]
    variants, batch_size, _ = data.draw(sweeps(im, src))
    ids = setup["ids"]
    metric = lambda logits: logits[:, -1].log_softmax(-1)[:, 7]  # noqa: E731
    with torch.no_grad():
        shared = sweep(im, ids, variants, metric=metric, batch_size=batch_size)
        unshared = im.sweep(ids, variants, metric=metric, batch_size=batch_size, share_prefix=False,
                            share_positions=False)
    expected = [metric(alone(im, ids, v)) for v in variants]
    assert_all_close(shared, expected)
    assert_all_close(unshared, expected)


# ---------------------------------------------------------------------------------------------
# Specific behaviours
# ---------------------------------------------------------------------------------------------


def test_layers_before_the_earliest_intervention_run_once(setup: dict) -> None:
    im, ids = setup["im"], setup["ids"]
    calls = {0: 0, 1: 0}
    hooks = [im.model.model.layers[i].register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i in (0, 1)]
    starts: list[int] = []
    record_start = Hook(lambda v, e: starts.append(e.context.start_layer))
    variants = [{"blocks.1.attn.z": [Ablate(heads=[h]), record_start]} for h in range(4)]
    try:
        with torch.no_grad():
            results = im.sweep(ids, variants, batch_size=2 * B)  # two chunks of two variants
    finally:
        for h in hooks:
            h.remove()
    assert calls == {0: 1, 1: 3}  # layer 0: the clean run only; layer 1: clean run + 2 chunks
    assert starts == [1, 1, 1, 1]
    assert_all_close(results, [alone(im, ids, v) for v in variants])


def test_positions_before_the_earliest_edit_come_from_a_kv_cache(setup: dict) -> None:
    im = setup["im"]
    lengths: list[int] = []
    hook = im.model.model.layers[1].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    variants = [
        {"blocks.1.attn.z": Ablate(heads=[1], positions=[5, 6])},
        {"blocks.1.mlp_out": Clamp(1.0, positions=[[4], [7], []])},
        {"blocks.1.resid_mid": Steer(0.1, positions=slice(6, None))},
        {"blocks.1.attn.pattern": Steer(0.1, positions=slice(6, None))},  # maps: always in full
    ]
    cases = [
        # no padding: KV prefixes of 5 and 4 tokens; chunks [v2, v0] from position 5, [v1, v3] from 0
        (setup["ids"], {}, [P, 5, P - 5, P]),
        # left padding: padded positions attend to every key (future ones too), so nothing is shared
        (setup["padded"], {"attention_mask": setup["mask"]}, [P, P, P]),
    ]
    try:
        for ids, kw, expected_lengths in cases:
            lengths.clear()
            with torch.no_grad():
                results = im.sweep(ids, variants, batch_size=2 * B, **kw)
            assert sorted(lengths) == sorted(expected_lengths)
            expected = [alone(im, ids, v, **kw) for v in variants]
            assert_all_close(results, expected)
            with torch.no_grad():
                assert_all_close(im.sweep(ids, variants, batch_size=2 * B, share_positions=False, **kw), expected)
    finally:
        hook.remove()


def test_chunks_group_variants_by_earliest_layer(setup: dict) -> None:
    im, ids = setup["im"], setup["ids"]
    starts: dict[int, int] = {}

    def mark(i: int) -> Hook:
        return Hook(lambda v, e: starts.__setitem__(i, e.context.start_layer))

    variants = [
        {"blocks.0.mlp_out": [Ablate(), mark(0)]},
        {"blocks.1.mlp_out": [Ablate(), mark(1)]},
        {"blocks.0.attn.z": [Ablate(heads=1), mark(2)]},
        {"logits": [Clamp(0.0, index=3), mark(3)]},
        {"blocks.1.resid_pre": [Steer(1.0), mark(4)]},
    ]
    with torch.no_grad():
        results = im.sweep(ids, variants, batch_size=3 * B)
    # sorted by start layer (1, 1, 1 | 0, 0): the layer-1 variants share a chunk that skips layer 0
    assert [starts[i] for i in range(5)] == [0, 1, 0, 1, 1]
    assert_all_close(results, [alone(im, ids, v) for v in variants])


def test_resample_sees_only_its_own_variant(setup: dict) -> None:
    im, ids = setup["im"], setup["ids"]
    variants = [{"blocks.0.resid_post": Ablate(resample=True, seed=s)} for s in range(4)] + [{}]
    with torch.no_grad():
        results = im.sweep(ids, variants, batch_size=100)  # all in one chunk
    assert_all_close(results, [alone(im, ids, v) for v in variants])


def test_per_row_patch_sources_follow_their_variant(setup: dict) -> None:
    im, ids, src = setup["im"], setup["ids"], setup["src"]
    variants = [{"blocks.0.attn.z": Patch(src, positions=[[p], [p + 1], []], heads=[p % 4])} for p in range(5)]
    with torch.no_grad():
        results = im.sweep(ids, variants, batch_size=7)
    assert_all_close(results, [alone(im, ids, v) for v in variants])


def test_gradients_flow_through_a_sweep(setup: dict) -> None:
    im, ids = setup["im"], setup["ids"]
    model = im.model

    def grads(run) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        vec = torch.zeros(32, requires_grad=True)
        run(vec).backward()
        g = (vec.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad.clone())
        model.zero_grad()
        return g

    variants = lambda vec: [{"blocks.1.resid_pre": Steer(vec, positions=[p])} for p in range(3)]  # noqa: E731
    metric = lambda logits: logits[:, -1, 5].sum()  # noqa: E731
    swept = grads(lambda vec: im.sweep(ids, variants(vec), metric=metric, batch_size=2 * B, grad=True).sum())
    listed = grads(lambda vec: sum(sweep(im, ids, variants(vec), metric=metric, batch_size=2 * B)))
    single = grads(lambda vec: sum(metric(im.run(ids, v)) for v in variants(vec)))
    for got in (swept, listed):
        torch.testing.assert_close(got[0], single[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[1], single[1], atol=1e-5, rtol=1e-4)  # through the shared prefix
    assert bool(swept[0].abs().sum() > 0) and bool(swept[1].abs().sum() > 0)
    # grad=True turns autograd on whatever the caller's mode; without it the result is detached
    vec = torch.zeros(32, requires_grad=True)
    with torch.no_grad():
        assert im.sweep(ids, variants(vec), metric=metric, grad=True).requires_grad
    assert not im.sweep(ids, variants(vec), metric=metric).requires_grad


def test_sweep_inside_intervene_composes_with_the_outer_edit(setup: dict) -> None:
    im, ids = setup["im"], setup["ids"]
    outer = {"blocks.0.mlp_out": Steer(torch.ones(32))}
    variants = [{"blocks.1.attn.z": Ablate(heads=[h])} for h in range(3)] + [{}]
    with torch.no_grad(), im.intervene(outer):
        results = im.sweep(ids, variants, batch_size=2 * B)
        expected = [im.run(ids, interventions=v) for v in variants]
    assert_all_close(results, expected)
    assert not torch.allclose(results[-1], alone(im, ids, {}))


def test_empty_inputs_and_clean_variants(setup: dict) -> None:
    im, ids = setup["im"], setup["ids"]
    assert sweep(im, ids, []) == []
    assert im.sweep(ids, []).shape == (0, B, P, 64)  # [n_variants, batch, pos, vocab]
    assert im.sweep(ids, [], metric=lambda logits: logits.sum()).shape == (0,)
    with torch.no_grad():
        a, b = sweep(im, ids, [{}, {}])
        clean = im.run(ids)
    assert torch.equal(a, clean) and torch.equal(b, clean) and a is not b
    both = im.sweep(ids, [{}, {}])
    assert both.shape == (2, B, P, 64) and torch.equal(both[0], clean) and torch.equal(both[1], clean)


def test_im_sweep_stacks_the_results_into_one_tensor(setup: dict) -> None:
    im, ids = setup["im"], setup["ids"]
    variants = [{"blocks.1.attn.z": Ablate(heads=[h])} for h in range(4)] + [{"blocks.0.mlp_out": Clamp(3.0)}]
    metric = lambda logits: logits[:, -1].log_softmax(-1)[:, 7].mean()  # noqa: E731
    alone_values = torch.stack([metric(alone(im, ids, v)) for v in variants])
    swept = im.sweep(ids, variants, metric=metric, batch_size=2 * B)
    assert swept.shape == (len(variants),) and not swept.requires_grad
    torch.testing.assert_close(swept, alone_values, atol=ATOL, rtol=0)
    assert int(swept.argmax()) == int(alone_values.argmax()) and int(swept.argmin()) == int(alone_values.argmin())
    assert len(set(alone_values.tolist())) == len(variants)  # distinct values: argmax/argmin mean something
    # a float metric, a tensor metric of shape S -> [n_variants, *S], no metric -> the logits
    floats = im.sweep(ids, variants, metric=lambda logits: float(metric(logits)))
    torch.testing.assert_close(floats, alone_values, atol=ATOL, rtol=0)
    per_row = im.sweep(ids, variants, metric=lambda logits: logits[:, -1, :3])
    assert per_row.shape == (len(variants), B, 3)
    logits = im.sweep(ids, variants)
    assert logits.shape == (len(variants), B, P, 64)
    assert_all_close(list(logits), [alone(im, ids, v) for v in variants])
    torch.testing.assert_close(per_row, logits[:, :, -1, :3])
    # what cannot be stacked says so, and names the list-returning sweep
    with pytest.raises(TypeError, match=r"variant 0 .*NoneType.*mishax_py.execution.sweep.sweep"):
        im.sweep(ids, variants, metric=lambda logits: None)
    assert sweep(im, ids, variants, metric=lambda logits: None) == [None] * len(variants)
    ragged = iter(range(1, 10))
    with pytest.raises(ValueError, match=r"variant 1 returned shape \(2,\) and variant 0 shape \(1,\)"):
        im.sweep(ids, variants, metric=lambda logits: torch.zeros(next(ragged)))


def test_progress_bar(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    im, ids = setup["im"], setup["ids"]
    variants = [{"blocks.1.mlp_out": Ablate(index=[i])} for i in range(3)]
    with torch.no_grad():
        im.sweep(ids, variants, batch_size=B, progress=True)
        err = capsys.readouterr().err  # the library's bars are cleared when done (mishax_py.progress)
        assert "sweep:" in err and "0/3 " in err and "chunk" in err  # one step per chunk of one variant
        im.sweep(ids, variants, batch_size=B)  # auto: few chunks, not a tty -> no bar
        assert "/3 " not in capsys.readouterr().err


def test_default_batch_size_is_a_whole_number_of_variants(setup: dict) -> None:
    im = setup["im"]
    for b, p in ((1, 8), (3, 8), (5, 200)):
        with torch.no_grad():
            rows = default_batch_size(im, b, p)
        assert rows >= b and rows % b == 0
    assert default_batch_size(im, 4, 100_000) == 4  # too big for any budget: one variant per chunk


def test_bad_variants_fail_before_any_forward_and_name_variant_site_shape(setup: dict) -> None:
    im, ids = setup["im"], setup["ids"]
    calls = []
    hook = im.model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    good = {"blocks.0.resid_post": Ablate()}
    try:
        with torch.no_grad():
            ref = im.model(ids).logits
            calls.clear()
            with pytest.raises(ValueError, match=r"sweep variant 2: Patch source of shape \(3, 5, 32\).*"
                                                 r"'blocks.1.resid_pre'.*\(3, 8, 32\)"):
                im.sweep(ids, [good, good, {"blocks.1.resid_pre": Patch(torch.zeros(3, 5, 32))}])
            with pytest.raises(IndexError, match=r"sweep variant 1: heads=\[7\].*'blocks.0.attn.z'.*\(3, 8, 4, 8\)"):
                im.sweep(ids, [good, {"blocks.0.attn.z": Ablate(heads=[7])}])
            with pytest.raises(UnknownSiteError, match=r"sweep variant 0: .*blocks.0.resid_post"):
                im.sweep(ids, [{"blocks.0.resid_pots": Ablate()}])
            with pytest.raises(TypeError, match="variant 0"):
                im.sweep(ids, [[Ablate()]])  # type: ignore[list-item]
            assert calls == []
            with pytest.raises(RuntimeError, match="boom"):  # an error during the run
                im.sweep(ids, [good, {"blocks.1.mlp_out": Hook(lambda v: (_ for _ in ()).throw(RuntimeError("boom")))}])
    finally:
        hook.remove()
    with torch.no_grad():
        assert torch.equal(im.model(ids).logits, ref)
        assert torch.equal(im.run(ids), ref)


def test_variants_after_the_blocks_run_no_decoder_layer() -> None:
    """Variants at ``ln_final``/``logits`` change no decoder layer, so no layer runs for them: with a clean
    run (an empty variant), every layer runs exactly once, on the base batch; the chunks start after the
    blocks from the clean run's ``ln_final``. Counted with forward pre-hooks on the decoder layers of a
    3-layer model."""
    im = g2.instrument(make_model(seed=2, num_hidden_layers=3))
    ids = torch.randint(4, 64, (B, P), generator=torch.Generator().manual_seed(4))
    rows: dict[int, list[int]] = {i: [] for i in range(3)}
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: rows[i].append(a[0].shape[0]))
             for i, layer in enumerate(im.model.model.layers)]
    variants = [{"ln_final": Steer(0.5)}, {"logits": Clamp(0.0, index=3)}, {"ln_final": Ablate(positions=[2])},
                {"logits": Hook(lambda v: v * 2)}, {}]
    try:
        with torch.no_grad():
            results = im.sweep(ids, variants, batch_size=2 * B)  # chunks of 2 + 2 variants, and the clean run
    finally:
        for h in hooks:
            h.remove()
    assert rows == {0: [B], 1: [B], 2: [B]}  # the clean run only: no decoder layer runs twice
    assert_all_close(list(results), [alone(im, ids, v) for v in variants])
