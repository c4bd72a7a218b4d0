"""im.walk(): the Mishax loop over (site, value) in forward order, with replacements."""

from __future__ import annotations

import pytest
import torch

from mishax_py.interventions import Hook
from mishax_py.runtime import active_context

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def test_walk_without_replacement_is_a_plain_run(tiny_im, ids):
    ref = tiny_im.run(ids)
    _, cache = tiny_im.run_with_cache(ids)
    seen = []
    with tiny_im.walk(ids) as w:
        for site, value in w:
            seen.append(site)
            assert torch.equal(value, cache[site]), site
    assert seen == tiny_im.site_names()  # every site, once, in forward order
    assert torch.equal(w.output, ref)


def test_sites_subset_in_forward_order(tiny_im, ids):
    with tiny_im.walk(ids, sites=["blocks.*.mlp_out", "hook_embed", "logits"]) as w:
        seen = [site for site, _ in w]
    assert seen == ["embed", "blocks.0.mlp_out", "blocks.1.mlp_out", "logits"]
    assert torch.equal(w.output, tiny_im.run(ids))


def test_replacement_equals_hook_in_run(tiny_im, ids):
    with tiny_im.walk(ids) as w:
        for site, value in w:
            if site == "blocks.0.mlp_out":
                w.replace(value * 0)
            if site == "blocks.1.attn.z":
                w.replace(value * 2.0)
    ref = tiny_im.run(ids, interventions={"blocks.0.mlp_out": Hook(lambda v: v * 0),
                                          "blocks.1.attn.z": Hook(lambda v: v * 2.0)})
    assert torch.equal(w.output, ref)
    assert not torch.equal(ref, tiny_im.run(ids))


def test_replace_never_skips_a_site(tiny_im, ids):
    """The generator-send pitfall: a replacement at every site must still visit every site."""
    seen = []
    with tiny_im.walk(ids) as w:
        for site, value in w:
            seen.append(site)
            w.replace(value.clone())
    assert seen == tiny_im.site_names()
    assert torch.equal(w.output, tiny_im.run(ids))


def test_later_values_see_the_replacement(tiny_im, ids):
    with tiny_im.walk(ids, sites=["blocks.0.resid_post", "blocks.1.resid_pre"]) as w:
        for site, value in w:
            if site == "blocks.0.resid_post":
                new = value + 1.0
                w.replace(new)
            else:
                assert torch.equal(value, new)


def test_break_finishes_the_forward_with_the_pending_replacement(tiny_im, ids):
    with tiny_im.walk(ids) as w:
        for site, value in w:
            if site == "blocks.0.attn.pattern":
                w.replace(torch.zeros_like(value))
                break
    ref = tiny_im.run(ids, interventions={"blocks.0.attn.pattern": Hook(torch.zeros_like)})
    assert torch.equal(w.output, ref)
    assert active_context() is None


def test_break_without_with_block(tiny_im, ids):
    w = tiny_im.walk(ids)
    for site, _ in w:
        if site == "blocks.1.ln1":
            break
    assert torch.equal(w.output, tiny_im.run(ids))


def test_exception_in_body_aborts_and_leaves_nothing_active(tiny_im, ids):
    ref = tiny_im.run(ids)
    with pytest.raises(KeyError, match="boom"):
        with tiny_im.walk(ids) as w:
            for site, value in w:
                if site == "blocks.1.attn.q":
                    w.replace(value * 0)
                    raise KeyError("boom")
    assert w._child is None  # the forward greenlet was unwound
    with pytest.raises(RuntimeError, match="did not finish"):
        _ = w.output
    assert active_context() is None
    assert torch.equal(tiny_im.run(ids), ref)
    assert torch.equal(tiny_im.model(input_ids=ids).logits, ref)


def test_exception_without_with_block_leaves_nothing_active(tiny_im, ids):
    ref = tiny_im.run(ids)
    w = tiny_im.walk(ids)
    with pytest.raises(ZeroDivisionError):
        for site, _ in w:
            if site == "blocks.0.mlp.post":
                raise ZeroDivisionError
    assert w._child is None
    assert active_context() is None
    assert torch.equal(tiny_im.run(ids), ref)


def test_error_in_the_forward_propagates(tiny_im, ids):
    def bad(value):
        raise ArithmeticError("inside the model")

    with tiny_im.intervene({"blocks.1.resid_pre": bad}):
        with pytest.raises(ArithmeticError, match="inside the model"):
            with tiny_im.walk(ids) as w:
                for _ in w:
                    pass
    assert active_context() is None
    assert torch.equal(tiny_im.run(ids), tiny_im.model(input_ids=ids).logits)


def test_close_aborts(tiny_im, ids):
    w = tiny_im.walk(ids)
    it = iter(w)
    next(it)
    w.close()
    with pytest.raises(RuntimeError):
        _ = w.output


def test_run_context_is_not_visible_in_the_loop_body(tiny_im, ids):
    """The walked run is active only inside the forward greenlet: a plain run in the body is independent."""
    ref = tiny_im.run(ids)
    with tiny_im.walk(ids) as w:
        for site, value in w:
            assert active_context() is None
            if site == "blocks.0.resid_mid":
                w.replace(value * 0)
                assert torch.equal(tiny_im.run(ids), ref)
    assert not torch.equal(w.output, ref)


def test_enclosing_intervene_applies_first(tiny_im, ids):
    with tiny_im.intervene({"blocks.0.mlp_out": lambda v: v * 0}):
        with tiny_im.walk(ids, sites="blocks.0.mlp_out") as w:
            for _, value in w:
                assert torch.count_nonzero(value) == 0
    assert torch.equal(w.output, tiny_im.run(ids, interventions={"blocks.0.mlp_out": lambda v: v * 0}))


def test_bad_replacements(tiny_im, ids):
    with tiny_im.walk(ids, sites="blocks.0.attn.z") as w:
        for _site, value in w:
            with pytest.raises(ValueError, match=r"blocks\.0\.attn\.z.*\(2, 10, 4, 7\).*\(2, 10, 4, 8\)"):
                w.replace(torch.zeros(2, 10, 4, 7))
            with pytest.raises(TypeError, match="blocks.0.attn.z"):
                w.replace(value.double())
            with pytest.raises(TypeError, match="Tensor"):
                w.replace(3.0)
    with pytest.raises(RuntimeError, match="inside the loop body"):
        w.replace(torch.zeros(1))
    with pytest.raises(RuntimeError, match="once"):
        iter(w)
    with pytest.raises(RuntimeError, match="iterate"):
        _ = tiny_im.walk(ids).output


def test_unknown_site(tiny_im, ids):
    with pytest.raises(KeyError, match="mlp_outt"):
        tiny_im.walk(ids, sites="blocks.0.mlp_outt")


def test_no_grad(tiny_im, ids):
    with torch.no_grad():
        with tiny_im.walk(ids) as w:
            for site, value in w:
                assert not value.requires_grad
                if site == "blocks.0.ln2":
                    w.replace(value * 0.5)
        assert not torch.is_grad_enabled()
        ref = tiny_im.run(ids, interventions={"blocks.0.ln2": lambda v: v * 0.5})
    assert not w.output.requires_grad
    assert torch.equal(w.output, ref)


def test_gradients_flow_like_a_hooked_run(tiny_im, ids):
    model = tiny_im.model
    weight = model.model.layers[0].mlp.up_proj.weight

    with tiny_im.walk(ids) as w:
        for site, value in w:
            assert torch.is_grad_enabled()
            if site == "blocks.1.resid_pre":
                assert value.requires_grad
                w.replace(value * 3.0)
    w.output[:, -1, 5].sum().backward()
    got = weight.grad.clone()
    model.zero_grad()

    ref = tiny_im.run(ids, interventions={"blocks.1.resid_pre": lambda v: v * 3.0})
    ref[:, -1, 5].sum().backward()
    assert torch.equal(w.output, ref)
    torch.testing.assert_close(got, weight.grad, rtol=0, atol=0)
    model.zero_grad()


def test_grad_mode_of_the_body_does_not_leak_into_the_forward(tiny_im, ids):
    """The loop body may switch grad mode; the model keeps the mode the walk started with."""
    with tiny_im.walk(ids, sites=["blocks.0.resid_post", "blocks.1.resid_post"]) as w:
        for _, value in w:
            assert value.requires_grad
            torch.set_grad_enabled(False)  # left off on purpose; the forward must not see it
    torch.set_grad_enabled(True)
    assert w.output.requires_grad
