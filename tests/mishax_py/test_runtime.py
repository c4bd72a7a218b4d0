"""The site runtime's recording tables: shared between runs, never carrying one run's handlers into another."""

from __future__ import annotations

import torch

from mishax_py import InstrumentedModel
from mishax_py.interventions import Ablate
from mishax_py.runtime import RunContext, recording_table


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
