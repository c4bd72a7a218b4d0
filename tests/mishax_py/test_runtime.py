"""The site runtime's recording tables: shared between runs, never carrying one run's handlers into another."""

from __future__ import annotations

import copy
import random
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
import torch

import instrumentation.gemma2 as g2
from mishax_py import InstrumentedModel
from mishax_py.interventions import Ablate
from mishax_py.runtime import RecordingTables, RunContext, recording_table

pytestmark = pytest.mark.usefixtures("one_thread")


class _Owner:
    pass


def test_recording_table_records_after_handlers_and_stays_shared() -> None:
    owner = _Owner()
    key = (id(owner), "x")
    template = recording_table([(key, "site.x", 0)])
    ctx = RunContext()
    store: dict[str, torch.Tensor] = {}
    ctx.add(key, "site.x", 0, lambda v, e: v + 1)  # a handler first, then record
    ctx.record_into(store, template)
    out = ctx.dispatch(owner, "x", torch.zeros(2), None)
    assert torch.equal(out, torch.ones(2)) and torch.equal(store["site.x"], torch.ones(2))
    # a run that records first and adds a handler afterwards copies the shared entry
    ctx2, store2 = RunContext(), {}
    ctx2.record_into(store2, template)
    ctx2.add(key, "site.x", 0, lambda v, e: v * 3)
    assert template[key].handlers == []
    assert torch.equal(ctx2.dispatch(owner, "x", torch.ones(2), None), 3 * torch.ones(2))
    assert torch.equal(store2["site.x"], 3 * torch.ones(2))
    # a third run with the template alone records the raw value
    ctx3, store3 = RunContext(), {}
    ctx3.record_into(store3, template)
    value = torch.ones(2, requires_grad=True)
    assert ctx3.dispatch(owner, "x", value, None) is value
    assert torch.equal(store3["site.x"], value) and not store3["site.x"].requires_grad


def test_a_nested_run_keeps_recording_into_the_outer_store() -> None:
    owner = _Owner()
    key = (id(owner), "x")
    outer, outer_store = RunContext(), {}
    outer.record_into(outer_store, recording_table([(key, "site.x", None)]))
    inner = RunContext(outer)
    inner.add(key, "site.x", None, lambda v, e: v - 1)
    assert torch.equal(inner.dispatch(owner, "x", torch.zeros(3), None), -torch.ones(3))
    # the outer run records what its own handlers produced (none here): the value before the inner edit
    assert torch.equal(outer_store["site.x"], torch.zeros(3))
    assert inner.store == {}


def test_caching_runs_do_not_leak_interventions_into_each_other(tiny_im: InstrumentedModel, ids) -> None:
    with torch.no_grad():
        _, plain = tiny_im.run_with_cache(ids)
        _, ablated = tiny_im.run_with_cache(ids, interventions={"blocks.0.attn_out": Ablate()})
        _, again = tiny_im.run_with_cache(ids)
        with tiny_im.intervene({"blocks.1.mlp_out": Ablate()}):
            _, nested = tiny_im.run_with_cache(ids, sites="blocks.1.*")
    assert torch.all(ablated["blocks.0.attn_out"] == 0)
    assert not torch.equal(plain["blocks.0.attn_out"], ablated["blocks.0.attn_out"])
    assert list(plain) == list(again) == tiny_im.site_names()
    for name in plain:
        assert torch.equal(plain[name], again[name]), name
    assert list(nested) == tiny_im.site_names("blocks.1.*")
    assert torch.all(nested["blocks.1.mlp_out"] == 0)
    torch.testing.assert_close(nested["blocks.1.resid_post"], nested["blocks.1.resid_mid"])


def test_each_run_tracks_its_prompt_length_across_forwards() -> None:
    """What ``positions="new"`` selects after: the first forward of a sequence sets the prompt length, KV-cache
    steps and full re-runs keep it, a new sequence (offset 0 after a step) restarts it. Nested runs have their own."""
    ctx = RunContext()
    assert ctx.prompt.length(0, 5) == 5  # prefill of a 5-token prompt
    assert ctx.prompt.length(0, 5) == 5  # another site of the same forward
    assert ctx.prompt.length(5, 1) == 5 and ctx.prompt.length(6, 1) == 5  # decoding steps
    assert ctx.prompt.length(0, 8) == 8  # offset 0 after a decoding step: a new generate call, 8-token prompt
    assert ctx.prompt.length(0, 8) == 8 and ctx.prompt.length(8, 1) == 8
    fresh = RunContext()
    assert fresh.prompt.length(0, 7) == 7 and fresh.prompt.length(0, 9) == 7  # use_cache=False re-runs keep it
    assert fresh.prompt.length(7, 1) == 7 and fresh.prompt.length(0, 4) == 4  # a new sequence restarts
    assert RunContext().prompt.length(3, 2) == 3  # a run that starts mid-sequence: the prompt ends at the offset
    assert RunContext(parent=fresh).prompt.last_offset is None


# -- the recording-table cache under threads (issue 13 A3) ------------------------------------------
@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads as often as the interpreter allows (every race window is as wide as it gets)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _threads(n: int, work: Callable[[int], None]) -> list[BaseException]:
    """Run ``work(i)`` in ``n`` threads released together; the exceptions they raised."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            work(i)
        except BaseException as e:  # noqa: BLE001 - returned to the test
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.usefixtures("fast_switching")
def test_recording_tables_from_many_threads_and_site_lists() -> None:
    """8 threads looking up 500 distinct keys in an 8-table cache (evicting all the time): no error, the
    cache stays bounded, and each table records exactly its own sites."""
    owner = _Owner()
    tables = RecordingTables(size=8)
    keys = [tuple(f"site.{j}" for j in random.Random(i).sample(range(40), 3)) for i in range(500)]

    def work(i: int) -> None:
        rng = random.Random(i)
        for _ in range(3000):
            key = rng.choice(keys)
            table = tables.get(key, lambda key=key: [((id(owner), n), n, None) for n in key])
            assert [entry.site for entry in table.values()] == list(key)
            assert len(tables) <= 8

    errors = _threads(8, work)
    assert not errors, errors[:3]
    first = tables.get(keys[0], lambda: [((id(owner), n), n, None) for n in keys[0]])
    assert tables.get(keys[0], lambda: []) is first  # kept and shared while it is among the last 8


@pytest.mark.usefixtures("fast_switching")
def test_run_with_cache_from_many_threads_with_many_site_lists(tiny_im: InstrumentedModel) -> None:
    """Issue 13 A3: ``run_with_cache`` from 8 threads over 500 distinct site lists. Before the lock, evicting
    (``next(iter(d))`` then ``pop``) raised ``KeyError``/``RuntimeError`` in another thread. The forward is
    stubbed in the first part (only the table cache is exercised, thousands of calls in a second); the second
    part runs the real forward and checks every cache against a single-threaded one."""
    ids = torch.randint(4, 64, (1, 4), generator=torch.Generator().manual_seed(0))
    names = tiny_im.site_names()
    lists = [random.Random(i).sample(names, 3) for i in range(500)]
    stub = torch.zeros(1, 4, 64)
    tiny_im.forward = lambda ids, **kwargs: stub  # type: ignore[method-assign]
    try:
        errors = _threads(8, lambda i: [tiny_im.run_with_cache(ids, sites=random.Random(i * 7919 + k).choice(lists))
                                        for k in range(2000)])
    finally:
        del tiny_im.forward
    assert not errors, errors[:3]

    with torch.no_grad():
        ref_logits, ref = tiny_im.run_with_cache(ids)

    def work(i: int) -> None:
        rng = random.Random(i)
        for _ in range(20):
            sites = rng.choice(lists)
            with torch.no_grad():
                logits, cache = tiny_im.run_with_cache(ids, sites=sites)
            assert torch.equal(logits, ref_logits)
            assert list(cache) == sites  # in the order asked for
            assert all(torch.equal(cache[n], ref[n]) for n in sites)

    errors = _threads(4, work)
    assert not errors, errors[:3]


def test_a_deep_copied_model_records_its_own_sites(tiny_im: InstrumentedModel) -> None:
    """The cached recording tables are keyed by ``id()`` of the original's modules: a deep copy of the model
    (and its InstrumentedModel) must not reuse them (it did, and its cache of that site list came back empty)."""
    ids = torch.randint(4, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, before = tiny_im.run_with_cache(ids, sites="blocks.0.resid_post")
        twin = copy.deepcopy(tiny_im.model)
        im2 = g2.instrument(twin)
        assert im2 is not tiny_im and im2.model is twin
        _, after = im2.run_with_cache(ids, sites="blocks.0.resid_post")
    assert list(after) == ["blocks.0.resid_post"]
    assert torch.equal(after["blocks.0.resid_post"], before["blocks.0.resid_post"])


def test_a_caching_run_inside_a_recording_run_fills_both_caches(tiny_im: InstrumentedModel, ids) -> None:
    """A model-level nested run: an outer run that records (and edits ``blocks.0.mlp_out`` itself), and inside
    it ``run_with_cache`` with an edit at the same site. Oracle: single, non-nested runs. The outer store holds
    the forward's values with the outer edit only at that site (it records before the inner edit) and the
    forward's real values downstream; the inner cache holds every value after both edits."""
    from mishax_py.interventions import Steer
    from mishax_py.runtime import activate

    site = "blocks.0.mlp_out"
    names = ["blocks.0.attn_out", site, "blocks.0.resid_post", "blocks.1.mlp_out", "logits"]
    outer_edit, inner_edit = Steer(0.75), Ablate(positions=[1, 4])
    with torch.no_grad():
        _, outer_only = tiny_im.run_with_cache(ids, sites=names, interventions={site: outer_edit})
        logits_both, both = tiny_im.run_with_cache(ids, sites=names, interventions={site: [outer_edit, inner_edit]})
        outer = tiny_im.context({site: outer_edit})
        outer_store: dict[str, torch.Tensor] = {}
        specs = [tiny_im.catalogue.by_name[n] for n in names]
        outer.record_into(outer_store, recording_table([(s.key, s.name, s.layer) for s in specs]))
        with activate(outer):
            logits, inner = tiny_im.run_with_cache(ids, sites=names, interventions={site: inner_edit})
    torch.testing.assert_close(logits, logits_both, rtol=0, atol=0)
    assert list(inner) == names and sorted(outer_store) == sorted(names)
    for name in names:
        torch.testing.assert_close(inner[name], both[name], rtol=0, atol=0, msg=lambda m, n=name: f"inner {n}: {m}")
        want = outer_only[name] if name in ("blocks.0.attn_out", site) else both[name]
        torch.testing.assert_close(outer_store[name], want, rtol=0, atol=0, msg=lambda m, n=name: f"outer {n}: {m}")
    assert not torch.equal(outer_only[site], both[site])  # the inner edit is visible in one cache only
