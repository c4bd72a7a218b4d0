"""Ablate / Clamp / Patch / Steer and their selectors, each against a formula written out here.

Pattern: record the clean value of a site, run with the intervention while recording the same
site (values are recorded after the site's interventions), and compare with the edit done by
hand on the clean value; downstream effects are checked against the model's own modules.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import instrumentation.gemma2 as g2
from mishax_py import InstrumentedModel, UnknownSiteError
from mishax_py.interventions import Ablate, Clamp, Hook, Patch, Positions, Steer
from mishax_py.runtime import activate
from tests.helpers import make_model

B, P = 3, 9


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture
def ids3() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randint(4, 64, (B, P), generator=g)


@pytest.fixture
def other_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(12)
    return torch.randint(4, 64, (B, P), generator=g)


def clean_value(im: InstrumentedModel, ids: torch.Tensor, site: str) -> torch.Tensor:
    with torch.no_grad():
        return im.run_with_cache(ids, sites=[site])[1][site]


def edited_value(im: InstrumentedModel, ids: torch.Tensor, site: str, iv) -> torch.Tensor:
    with torch.no_grad():
        return im.run_with_cache(ids, sites=[site], interventions={site: iv})[1][site]


# ---------------------------------------------------------------------------------------------
# Each edit and selector on each layout, against a hand-written formula
# ---------------------------------------------------------------------------------------------


def test_ablate_heads_and_positions_on_a_per_head_site(tiny_im: InstrumentedModel, ids3: torch.Tensor) -> None:
    site = "blocks.0.attn.z"  # [batch, pos, head, d_head]: heads on dim 2
    clean = clean_value(tiny_im, ids3, site)
    with torch.no_grad():
        iv = Ablate(heads=[1, 3], positions=[2, 5])
        _, cache = tiny_im.run_with_cache(ids3, sites=[site, "blocks.0.attn_out_pre_norm"], interventions={site: iv})
    expected = clean.clone()
    for p in (2, 5):
        for h in (1, 3):
            expected[:, p, h, :] = 0
    assert torch.equal(cache[site], expected)
    # downstream: o_proj of the edited z (heads concatenated head-major)
    o_proj = tiny_im.model.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        by_hand = o_proj(expected.reshape(B, P, -1))
    torch.testing.assert_close(cache["blocks.0.attn_out_pre_norm"], by_hand, atol=1e-6, rtol=1e-6)


def test_attention_map_selectors_use_head_dim_1_and_query_positions(tiny_im: InstrumentedModel, ids3) -> None:
    site = "blocks.1.attn.pattern"  # [batch, head, q, k]
    clean = clean_value(tiny_im, ids3, site)
    got = edited_value(tiny_im, ids3, site, Clamp(0.25, heads=2, positions=[4, -1], index=[0, 1]))
    expected = clean.clone()
    for q in (4, P - 1):
        expected[:, 2, q, 0:2] = 0.25
    assert torch.equal(got, expected)
    # downstream: z = pattern @ v (GQA: head h reads kv head h // 2)
    with torch.no_grad():
        _, cache = tiny_im.run_with_cache(
            ids3, sites=["blocks.1.attn.v", "blocks.1.attn.z"],
            interventions={site: Clamp(0.25, heads=2, positions=[4, -1], index=[0, 1])},
        )
    v = cache["blocks.1.attn.v"]  # [b, k, kv_head, d]
    z_head2 = torch.einsum("bqk,bkd->bqd", expected[:, 2], v[:, :, 1])
    torch.testing.assert_close(cache["blocks.1.attn.z"][:, :, 2], z_head2, atol=1e-5, rtol=1e-5)


def test_scores_clamped_to_minus_inf_like_masking(tiny_im: InstrumentedModel, ids3) -> None:
    site = "blocks.0.attn.scores"
    clean = clean_value(tiny_im, ids3, site)
    with torch.no_grad():
        iv = Clamp(-1e9, index=0, positions=slice(1, None))
        _, cache = tiny_im.run_with_cache(ids3, sites=[site, "blocks.0.attn.pattern"], interventions={site: iv})
    expected = clean.clone()
    expected[:, :, 1:, 0] = -1e9
    assert torch.equal(cache[site], expected)
    torch.testing.assert_close(cache["blocks.0.attn.pattern"], expected.softmax(-1), atol=1e-6, rtol=1e-6)
    assert float(cache["blocks.0.attn.pattern"][:, :, 1:, 0].abs().max()) == 0.0


def test_rows_index_and_slices_on_the_residual_stream(tiny_im: InstrumentedModel, ids3) -> None:
    site = "blocks.0.resid_mid"
    clean = clean_value(tiny_im, ids3, site)
    got = edited_value(tiny_im, ids3, site, Ablate(rows=[0, 2], index=slice(4, 12), positions=slice(None, None, 3)))
    expected = clean.clone()
    for r in (0, 2):
        expected[r, 0::3, 4:12] = 0
    assert torch.equal(got, expected)


def test_per_row_positions_ragged_lists_and_tensors(tiny_im: InstrumentedModel, ids3) -> None:
    site = "blocks.1.mlp.post"
    clean = clean_value(tiny_im, ids3, site)
    got = edited_value(tiny_im, ids3, site, Clamp(3.0, positions=[[0], [], [2, -1, 5]]))
    expected = clean.clone()
    expected[0, 0] = 3.0
    expected[2, [2, P - 1, 5]] = 3.0
    assert torch.equal(got, expected)
    per_row = torch.tensor([[1, 4], [0, 0], [8, 3]])
    got = edited_value(tiny_im, ids3, site, Clamp(3.0, positions=per_row))
    expected = clean.clone()
    for b in range(B):
        expected[b, per_row[b]] = 3.0
    assert torch.equal(got, expected)


def test_clamp_tensor_values_follow_the_selection_order(tiny_im: InstrumentedModel, ids3) -> None:
    site = "blocks.0.mlp.pre"
    clean = clean_value(tiny_im, ids3, site)
    got = edited_value(tiny_im, ids3, site, Clamp(torch.tensor([1.0, 2.0]), index=[7, 3], positions=-1))
    expected = clean.clone()
    expected[:, -1, 7] = 1.0
    expected[:, -1, 3] = 2.0
    assert torch.equal(got, expected)
    # one value per selected head and position: [k_pos, k_head, d_head]
    site = "blocks.0.attn.q"
    clean = clean_value(tiny_im, ids3, site)
    vals = torch.arange(2 * 2 * 8, dtype=torch.float32).reshape(2, 2, 8)
    got = edited_value(tiny_im, ids3, site, Clamp(vals, positions=[6, 1], heads=[3, 0]))
    expected = clean.clone()
    for i, p in enumerate([6, 1]):
        for j, h in enumerate([3, 0]):
            expected[:, p, h] = vals[i, j]
    assert torch.equal(got, expected)


def test_steer_vectors_scales_and_per_position_tensors(tiny_im: InstrumentedModel, ids3) -> None:
    site = "blocks.0.resid_post"
    clean = clean_value(tiny_im, ids3, site)
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(32, generator=g)
    got = edited_value(tiny_im, ids3, site, Steer(vec, scale=-2.5, positions=[1, 3]))
    expected = clean.clone()
    expected[:, [1, 3]] += -2.5 * vec
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    per_pos = torch.randn(P, 32, generator=g)
    got = edited_value(tiny_im, ids3, site, Steer(per_pos))
    torch.testing.assert_close(got, clean + per_pos, atol=0, rtol=0)
    got = edited_value(tiny_im, ids3, site, Steer(torch.tensor([1.0, -1.0]), index=[0, 31], rows=1))
    expected = clean.clone()
    expected[1, :, 0] += 1.0
    expected[1, :, 31] -= 1.0
    assert torch.equal(got, expected)
    # downstream: the next layer's ln1 is input_layernorm of the steered residual
    with torch.no_grad():
        _, cache = tiny_im.run_with_cache(ids3, sites=["blocks.1.ln1"], interventions={site: Steer(vec, 3.0)})
        by_hand = tiny_im.model.model.layers[1].input_layernorm(clean + 3.0 * vec)
    torch.testing.assert_close(cache["blocks.1.ln1"], by_hand, atol=1e-6, rtol=1e-6)


def test_patch_from_a_cache_batch_b_and_batch_1(tiny_im: InstrumentedModel, ids3, other_ids) -> None:
    sites = "blocks.*.attn.z"
    with torch.no_grad():
        _, src = tiny_im.run_with_cache(other_ids, sites=[sites])
        clean = tiny_im.run_with_cache(ids3, sites=[sites])[1]
        # blocks.0 patched; the cache is looked up under each site's own name
        _, got = tiny_im.run_with_cache(ids3, sites=["blocks.0.attn.z"],
                                        interventions={"blocks.0.attn.z": Patch(src, heads=[2], positions=[4])})
    expected = clean["blocks.0.attn.z"].clone()
    expected[:, 4, 2] = src["blocks.0.attn.z"][:, 4, 2]
    assert torch.equal(got["blocks.0.attn.z"], expected)
    # the whole of layer 0's z from the other run: layer 1 sees exactly the other run's resid if everything patched
    with torch.no_grad():
        full = tiny_im.run(ids3, interventions={"blocks.0.resid_post": Patch(
            tiny_im.run_with_cache(other_ids, sites=["blocks.0.resid_post"])[1])})
        want = tiny_im.run(other_ids)
    torch.testing.assert_close(full, want, atol=1e-6, rtol=1e-6)
    # batch-1 source broadcasts to every row
    one = src["blocks.0.attn.z"][1:2]
    got1 = edited_value(tiny_im, ids3, "blocks.0.attn.z", Patch(one, positions=Positions.ALL))
    assert torch.equal(got1, one.expand(B, -1, -1, -1))


def test_patch_from_a_tensor_with_rows(tiny_im: InstrumentedModel, ids3, other_ids) -> None:
    site = "blocks.1.resid_pre"
    clean = clean_value(tiny_im, ids3, site)
    src = clean_value(tiny_im, other_ids, site)
    got = edited_value(tiny_im, ids3, site, Patch(src, rows=[2], positions=slice(5, None)))
    expected = clean.clone()
    expected[2, 5:] = src[2, 5:]
    assert torch.equal(got, expected)


def test_mean_ablation_per_position_over_positions_and_precomputed(tiny_im: InstrumentedModel, ids3, other_ids) -> None:
    site = "blocks.0.mlp_out"
    clean = clean_value(tiny_im, ids3, site)
    with torch.no_grad():
        _, ref = tiny_im.run_with_cache(other_ids, sites=[site])
    per_pos = ref[site].mean(0)  # [P, d]
    got = edited_value(tiny_im, ids3, site, Ablate(mean=ref, positions=[0, 7]))
    expected = clean.clone()
    expected[:, [0, 7]] = per_pos[[0, 7]]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    overall = ref[site].mean((0, 1))  # [d]
    got = edited_value(tiny_im, ids3, site, Ablate(mean=ref[site], mean_over_positions=True, rows=[1]))
    expected = clean.clone()
    expected[1] = overall
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    got = edited_value(tiny_im, ids3, site, Ablate(mean=overall, index=[5, 6]))
    expected = clean.clone()
    expected[..., 5:7] = overall[5:7]
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_mean_ablation_leaves_the_reference_padding_out(tiny_im: InstrumentedModel, ids3, other_ids) -> None:
    """A cache of a left-padded batch carries its attention mask; the mean is over real tokens only,
    per position (a position with no real token takes the plain mean) and over positions."""
    mask = torch.ones(B, P, dtype=torch.long)
    mask[0, :4] = 0  # row 0 left-padded by 4, row 1 by 2
    mask[1, :2] = 0
    padded = other_ids.clone()
    padded[mask == 0] = 0
    for site in ("blocks.0.mlp_out", "blocks.1.attn.z", "blocks.1.attn.pattern"):
        with torch.no_grad():
            _, ref = tiny_im.run_with_cache(padded, sites=[site], attention_mask=mask)
        assert torch.equal(ref.attention_mask, mask)
        r = ref[site]
        pos_dim = 2 if site.endswith("pattern") else 1
        # written out: for each position, the mean over the rows that are real tokens there
        per_pos = []
        for p in range(P):
            rows = [b for b in range(B) if mask[b, p]]
            take = r.select(pos_dim, p)
            per_pos.append(take[rows].mean(0) if rows else take.mean(0))
        want = torch.stack(per_pos, dim=pos_dim - 1)
        got = edited_value(tiny_im, ids3, site, Ablate(mean=ref))
        torch.testing.assert_close(got, want.unsqueeze(0).expand_as(got), atol=1e-6, rtol=0)
        assert not torch.allclose(want, r.mean(0), atol=1e-4)  # padding would have changed it
        # over positions: the mean over every real (row, position) entry
        real = r.movedim(pos_dim, 1)[mask.bool()].mean(0)  # [..] without batch/pos
        got = edited_value(tiny_im, ids3, site, Ablate(mean=ref, mean_over_positions=True))
        torch.testing.assert_close(got, real.unsqueeze(pos_dim - 1).unsqueeze(0).expand_as(got), atol=1e-6, rtol=0)
    # an explicit mask for a tensor reference; a mask that does not fit is an error before the run
    site = "blocks.0.mlp_out"
    with torch.no_grad():
        _, ref = tiny_im.run_with_cache(padded, sites=[site], attention_mask=mask)
    got = edited_value(tiny_im, ids3, site, Ablate(mean=ref[site], mean_mask=mask))
    torch.testing.assert_close(got, edited_value(tiny_im, ids3, site, Ablate(mean=ref)), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"mean mask of shape \(3, 8\).*of shape \(3, 9, 32\).*= \(3, 9\)"):
        edited_value(tiny_im, ids3, site, Ablate(mean=ref[site], mean_mask=mask[:, 1:]))
    with pytest.raises(ValueError, match="mean_mask= applies to mean="):
        Ablate(mean_mask=mask)
    with torch.no_grad():
        assert torch.equal(tiny_im.run(ids3), tiny_im.model(ids3).logits)


def test_masked_mean_against_nanmean_and_garbage_in_the_padding(tiny_im: InstrumentedModel, ids3, other_ids) -> None:
    """A second, independent check of masked mean ablation, on another padding: a 4-row reference whose
    position 0 is padding in every row (so it takes the plain mean) and whose rows are padded by 3, 2, 1 and 1.
    Oracle: ``torch.nanmean`` of the reference with NaN at its padding; and the padding's values must not
    matter (garbage written there, at positions that have a real token, leaves the result unchanged)."""
    mask = torch.ones(4, P, dtype=torch.long)
    for row, n_pad in enumerate([3, 2, 1, 1]):
        mask[row, :n_pad] = 0
    ref_ids = torch.cat([other_ids, ids3[:1]]).clone()
    ref_ids[mask == 0] = 0
    for site in ("blocks.0.attn_out", "blocks.1.attn.pattern"):
        pos_dim = 2 if site.endswith("pattern") else 1
        with torch.no_grad():
            _, cache = tiny_im.run_with_cache(ref_ids, sites=[site], attention_mask=mask)
        r = cache[site]
        pad = (mask == 0).view(4, *([1] * (pos_dim - 1)), P, *([1] * (r.ndim - pos_dim - 1))).expand_as(r)
        nan_padded = r.masked_fill(pad, float("nan"))
        want = nan_padded.nanmean(0)
        want.select(pos_dim - 1, 0).copy_(r.select(pos_dim, 0).mean(0))  # no real token at position 0
        got = edited_value(tiny_im, ids3, site, Ablate(mean=cache))
        torch.testing.assert_close(got, want.unsqueeze(0).expand_as(got), atol=1e-6, rtol=0)
        real = nan_padded.movedim(pos_dim, 1).flatten(0, 1).nanmean(0).unsqueeze(pos_dim - 1).unsqueeze(0)
        got = edited_value(tiny_im, ids3, site, Ablate(mean=cache, mean_over_positions=True))
        torch.testing.assert_close(got, real.expand_as(got), atol=1e-6, rtol=0)
        garbage = r.masked_fill(pad & (torch.arange(P) > 0).view(*([1] * pos_dim), P, *([1] * (r.ndim - pos_dim - 1))),
                                1e3)
        assert not torch.equal(garbage, r)
        for over in (False, True):
            a = edited_value(tiny_im, ids3, site, Ablate(mean=garbage, mean_mask=mask, mean_over_positions=over))
            b = edited_value(tiny_im, ids3, site, Ablate(mean=cache, mean_over_positions=over))
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_resample_takes_other_rows_seeded(tiny_im: InstrumentedModel, ids3) -> None:
    site = "blocks.0.attn.v"  # KV heads
    clean = clean_value(tiny_im, ids3, site)
    got = edited_value(tiny_im, ids3, site, Ablate(resample=True, heads=[1], seed=3))
    # unselected head untouched; the selected head of row b is the same head of another row
    assert torch.equal(got[:, :, 0], clean[:, :, 0])
    sources = []
    for b in range(B):
        matches = [r for r in range(B) if torch.equal(got[b, :, 1], clean[r, :, 1])]
        assert len(matches) == 1 and matches[0] != b
        sources.append(matches[0])
    assert sorted(sources) == list(range(B))  # a permutation without fixed points
    again = edited_value(tiny_im, ids3, site, Ablate(resample=True, heads=[1], seed=3))
    assert torch.equal(got, again)


def test_a_list_composes_in_order(tiny_im: InstrumentedModel, ids3) -> None:
    site = "blocks.0.ln2"
    clean = clean_value(tiny_im, ids3, site)
    got = edited_value(tiny_im, ids3, site, [Steer(torch.ones(32)), Clamp(0.0, index=[0])])
    expected = clean + 1
    expected[..., 0] = 0
    assert torch.equal(got, expected)
    got = edited_value(tiny_im, ids3, site, [Clamp(0.0, index=[0]), Steer(torch.ones(32))])
    expected = clean.clone()
    expected[..., 0] = 0
    assert torch.equal(got, expected + 1)


def test_event_rows_restrict_the_edit_and_index_sources_consistently(tiny_im: InstrumentedModel, ids3, other_ids):
    """Under event.rows an edit runs on value[rows] as if alone; full-batch sources are read at rows."""
    site = "blocks.0.resid_pre"
    clean = clean_value(tiny_im, ids3, site)
    src = clean_value(tiny_im, other_ids, site)
    rows = torch.tensor([2, 0])
    cases = [
        (Patch(src[[2, 0]]), lambda e: e.__setitem__(rows, src[rows])),  # source rows == len(rows): relative
        (Patch(src), lambda e: e.__setitem__(rows, src[rows])),  # the run's batch: read at rows
        (Ablate(rows=[1]), lambda e: e.__setitem__(0, 0.0)),  # rows= selects inside the sub-batch: row rows[1]
        (Clamp(1.0, positions=[[3], [5]]), lambda e: (e[2].__setitem__(3, 1.0), e[0].__setitem__(5, 1.0))),
    ]
    def run_rows(iv) -> torch.Tensor:
        # batch=None: under rows the edit sees a sub-batch, so the check cannot use the full batch
        ctx = tiny_im.context({site: iv}, batch=None, pos=P, rows=rows)
        store: dict[str, torch.Tensor] = {}
        tiny_im.add_handler(ctx, site, lambda v, e: store.setdefault("v", v))
        with torch.no_grad(), activate(ctx):
            tiny_im.forward(ids3)
        return store["v"]

    for iv, edit in cases:
        expected = clean.clone()
        edit(expected)
        assert torch.equal(run_rows(iv), expected), iv
    # resampling under rows only mixes those rows
    got = run_rows(Ablate(resample=True))
    assert torch.equal(got[1], clean[1])
    assert torch.equal(got[0], clean[2]) and torch.equal(got[2], clean[0])


# ---------------------------------------------------------------------------------------------
# Property test: the mask equals plain indexing, for random selectors on every layout
# ---------------------------------------------------------------------------------------------

LAYOUT_SITES = ["blocks.1.resid_post", "blocks.0.attn.z", "blocks.1.attn.k", "blocks.0.attn.scores", "blocks.1.mlp.pre"]


@st.composite
def selections(draw):
    site = draw(st.sampled_from(LAYOUT_SITES))
    is_map = site.endswith("scores")
    is_heads = site.endswith((".z", ".k")) or is_map
    n_heads = 2 if site.endswith(".k") else 4
    last = {"blocks.1.resid_post": 32, "blocks.1.mlp.pre": 64}.get(site, P if is_map else 8)
    subset = lambda n: draw(st.one_of(st.none(), st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True)))
    kw = dict(rows=subset(B), positions=subset(P), index=subset(last))
    if is_heads:
        kw["heads"] = subset(n_heads)
    kind = draw(st.sampled_from(["ablate", "clamp", "steer"]))
    return site, kind, kw, is_map


@pytest.fixture(scope="module")
def layout_cleans() -> tuple[InstrumentedModel, torch.Tensor, dict[str, torch.Tensor]]:
    """One model and the clean values of LAYOUT_SITES, shared by every example of the property test."""
    im = g2.instrument(make_model())
    ids = torch.randint(4, 64, (B, P), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        _, cache = im.run_with_cache(ids, sites=LAYOUT_SITES)
    return im, ids, dict(cache)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sel=selections())
def test_selection_equals_plain_indexing(layout_cleans, sel) -> None:
    im, ids, cleans = layout_cleans
    site, kind, kw, is_map = sel
    iv = {"ablate": Ablate(**kw), "clamp": Clamp(2.5, **kw), "steer": Steer(1.5, **kw)}[kind]
    clean = cleans[site]
    got = edited_value(im, ids, site, iv)
    expected = clean.clone()
    full = lambda key, n: kw.get(key) if kw.get(key) is not None else list(range(n))
    shape = clean.shape
    head_dim, pos_dim = (1, 2) if is_map else (2, 1)
    for b in full("rows", shape[0]):
        for p in full("positions", shape[pos_dim]):
            for h in full("heads", shape[head_dim]) if clean.ndim == 4 else [None]:
                idx = [b, None, None, None][: clean.ndim]
                idx[pos_dim] = p
                if h is not None:
                    idx[head_dim] = h
                idx[-1] = torch.tensor(full("index", shape[-1]))
                key = tuple(idx)
                new = {"ablate": 0.0, "clamp": 2.5, "steer": None}[kind]
                expected[key] = expected[key] + 1.5 if new is None else new
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "site,make",
    [
        ("blocks.0.attn.z", lambda src, vec: Ablate(heads=[0], positions=[1])),
        ("blocks.0.resid_post", lambda src, vec: Ablate(mean=src, positions=[2])),
        ("blocks.0.mlp.post", lambda src, vec: Ablate(resample=True, index=[0, 5])),
        ("blocks.0.attn.pattern", lambda src, vec: Clamp(0.1, heads=1, positions=[3])),
        ("blocks.0.resid_post", lambda src, vec: Patch(src, rows=[0], positions=[4])),
        ("blocks.0.resid_post", lambda src, vec: Steer(vec, 0.5, positions=Positions.ALL)),
    ],
)
def test_gradients_flow_through_every_edit(tiny_im: InstrumentedModel, ids3, other_ids, site, make) -> None:
    model = tiny_im.model
    _, cache = tiny_im.run_with_cache(other_ids, sites=[site], grad=True)
    src = {site: cache[site]}  # a source that is itself in a graph
    vec = torch.randn(32, requires_grad=True)
    model.zero_grad()
    logits = tiny_im.run(ids3, interventions={site: make(src, vec)})
    logits.square().sum().backward()
    for p in (model.model.embed_tokens.weight, model.model.layers[0].self_attn.q_proj.weight,
              model.model.layers[1].mlp.down_proj.weight):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)
    iv = make(src, vec)
    if isinstance(iv, Steer):
        assert vec.grad is not None and bool(vec.grad.abs().sum() > 0)
    if isinstance(iv, Patch) or (isinstance(iv, Ablate) and iv.mean is not None):
        assert cache[site].grad is not None and bool(cache[site].grad.abs().sum() > 0)
    model.zero_grad()


def test_steer_vector_gradient_matches_the_formula(tiny_im: InstrumentedModel, ids3) -> None:
    """d loss / d vec = sum over the selected positions of d loss / d resid."""
    site = "blocks.1.resid_pre"
    vec = torch.zeros(32, requires_grad=True)
    tiny_im.run(ids3, interventions={site: Steer(vec, positions=[2, 6])}).sum().backward()
    logits, cache = tiny_im.run_with_cache(ids3, sites=[site], grad=True)
    logits.sum().backward()
    expected = cache[site].grad[:, [2, 6]].sum((0, 1))
    torch.testing.assert_close(vec.grad, expected, atol=1e-5, rtol=1e-5)
    tiny_im.model.zero_grad()


# ---------------------------------------------------------------------------------------------
# Errors name the site and shapes; the model is left clean
# ---------------------------------------------------------------------------------------------


RES = r"\(3, 9, 32\)"  # the residual sites' shape in these tests
ERROR_CASES = [
    ("blocks.0.resid_post", Ablate(heads=[0]), ValueError, r"heads=.*'blocks.0.resid_post'.*" + RES),
    ("blocks.0.attn.z", Ablate(heads=[4]), IndexError, r"heads=\[4\].*'blocks.0.attn.z'.*\(3, 9, 4, 8\)"),
    ("blocks.0.attn.k", Ablate(heads=[2]), IndexError, r"heads=\[2\].*'blocks.0.attn.k'.*\(3, 9, 2, 8\)"),
    ("blocks.0.attn.pattern", Ablate(heads=[-5]), IndexError, r"'blocks.0.attn.pattern'.*\(3, 4, 9, 9\)"),
    ("blocks.1.resid_mid", Clamp(0.0, positions=[9]), IndexError, r"positions=\[9\].*'blocks.1.resid_mid'.*" + RES),
    ("blocks.1.resid_mid", Clamp(0.0, positions=[[1], [12], [0]]), IndexError, r"'blocks.1.resid_mid'.*" + RES),
    ("blocks.1.resid_mid", Clamp(0.0, positions=[[1], [2]]), ValueError, r"2 rows.*'blocks.1.resid_mid'.*" + RES),
    ("blocks.1.mlp.post", Ablate(index=[64]), IndexError, r"index=\[64\].*'blocks.1.mlp.post'.*\(3, 9, 64\)"),
    ("blocks.1.mlp.post", Ablate(rows=[3]), IndexError, r"rows=\[3\].*'blocks.1.mlp.post'.*\(3, 9, 64\)"),
    ("blocks.0.resid_post", Patch(torch.zeros(3, 8, 32)), ValueError, r"\(3, 8, 32\).*'blocks.0.resid_post'.*" + RES),
    ("blocks.0.resid_post", Patch(torch.zeros(2, 9, 32)), ValueError, r"\(2, 9, 32\).*'blocks.0.resid_post'.*" + RES),
    ("blocks.0.attn.z", Patch(torch.zeros(3, 9, 32)), ValueError, r"\(3, 9, 32\).*'blocks.0.attn.z'.*\(3, 9, 4, 8"),
    ("blocks.0.resid_post", Patch({"blocks.1.resid_post": torch.zeros(3, 9, 32)}), ValueError,
     r"no entry for site 'blocks.0.resid_post'"),
    ("blocks.0.resid_post", Steer(torch.zeros(31)), ValueError, r"\(31,\).*'blocks.0.resid_post'.*" + RES),
    ("blocks.0.mlp.pre", Steer(torch.zeros(3), index=[1, 2]), ValueError, r"\(3,\).*'blocks.0.mlp.pre'.*\(3, 9, 64"),
    ("blocks.0.resid_post", Clamp(torch.zeros(9, 31)), ValueError, r"\(9, 31\).*'blocks.0.resid_post'"),
    ("blocks.0.resid_post", Ablate(mean=torch.zeros(4, 7, 32)), ValueError, r"\(4, 7, 32\).*'blocks.0.resid_post'"),
]


@pytest.mark.parametrize("site,iv,exc,pattern", ERROR_CASES)
def test_bad_input_is_a_clear_error_and_leaves_the_model_clean(tiny_im, ids3, site, iv, exc, pattern) -> None:
    with torch.no_grad():
        ref = tiny_im.model(ids3).logits
        with pytest.raises(exc, match=pattern):
            tiny_im.run(ids3, interventions={site: iv})
        assert torch.equal(tiny_im.model(ids3).logits, ref)
        assert torch.equal(tiny_im.run(ids3), ref)


def test_errors_found_only_during_the_run_also_leave_the_model_clean(tiny_im: InstrumentedModel, ids3) -> None:
    with torch.no_grad():
        ref = tiny_im.model(ids3).logits
        with pytest.raises(ValueError, match=r"resample.*'blocks.0.resid_post'.*\(1, 9, 32\)"):
            with tiny_im.intervene({"blocks.0.resid_post": Ablate(resample=True)}):  # batch unknown until the run
                tiny_im.model(ids3[:1])
        with pytest.raises(ValueError, match=r"Patch source of shape \(3, 9, 32\).*'blocks.0.resid_post'.*\(2, 9, 32"):
            with tiny_im.intervene({"blocks.0.resid_post": Patch(torch.zeros(3, 9, 32))}):
                tiny_im.model(ids3[:2])
        with pytest.raises(UnknownSiteError, match="blocks.0.resid_post"):
            tiny_im.run(ids3, interventions={"blocks.0.resid_pots": Ablate()})
        assert torch.equal(tiny_im.model(ids3).logits, ref)


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="not both"):
        Ablate(mean=torch.zeros(3), resample=True)
    with pytest.raises(ValueError, match="positions='middle'"):
        Ablate(positions="middle")
    with pytest.raises(TypeError, match="integers"):
        Ablate(heads=torch.tensor([0.5]))
    with pytest.raises(TypeError, match="Patch source"):
        Patch(3.0)  # type: ignore[arg-type]


def test_reprs_are_readable() -> None:
    assert repr(Ablate(heads=[1], positions="new")) == "Ablate(heads=[1], positions='new')"
    assert repr(Steer(torch.zeros(4), 2.0, index=[1])) == "Steer(<tensor (4,)>, scale=2.0, index=[1])"
    assert repr(Clamp(1.0, rows=[0])) == "Clamp(1.0, rows=[0])"
    assert "Hook" in repr(Hook(lambda v: v))


def test_hook_arity_counts_only_required_positional_parameters(tiny_im, ids) -> None:
    seen: list[object] = []

    def one_arg_with_defaults(v, scale=2.0, sink=seen):  # defaults bind values: fn(value)
        sink.append(type(v))
        return v * scale

    def two_args(v, event):
        seen.append(event.site)
        return v

    with torch.no_grad():
        plain = tiny_im.run(ids)
        doubled = tiny_im.run(ids, interventions={"logits": Hook(one_arg_with_defaults)})
        tiny_im.run(ids, interventions={"blocks.0.resid_post": Hook(two_args)})
    assert torch.equal(doubled, plain * 2.0)
    assert seen == [torch.Tensor, "blocks.0.resid_post"]
