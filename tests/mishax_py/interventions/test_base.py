"""The Intervention base and Hook: a Hook must return the site's dtype (and shape), or a clear error names the site."""

from __future__ import annotations

import pytest
import torch

from mishax_py.interventions import Hook

pytestmark = pytest.mark.usefixtures("one_thread")

SITE = "blocks.0.resid_pre"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64])
def test_a_hook_returning_another_dtype_names_the_site_and_both_dtypes(tiny_im, ids, dtype):
    hook = Hook(lambda v: v.to(dtype))
    for run in (lambda: tiny_im.run(ids, interventions={SITE: hook}),
                lambda: tiny_im.sweep(ids, [{SITE: hook}, {"blocks.1.mlp_out": hook}])):
        with pytest.raises(TypeError) as err:
            run()
        msg = str(err.value)
        assert SITE in msg and str(dtype) in msg and "torch.float32" in msg, msg
    torch.testing.assert_close(tiny_im.run(ids), tiny_im.model(ids).logits, rtol=0, atol=0)  # nothing left behind


def test_a_hook_returning_another_shape_names_the_site(tiny_im, ids):
    with pytest.raises(ValueError, match=rf"{SITE}.*\(2, 10, 31\)|\(2, 10, 31\).*{SITE}"):
        tiny_im.run(ids, interventions={SITE: lambda v: v[..., :31]})


def test_a_hook_returning_the_same_dtype_or_none_is_fine(tiny_im, ids):
    out = tiny_im.run(ids, interventions={SITE: [lambda v: None, lambda v: v * 1.0, Hook(lambda v, e: v.clone())]})
    torch.testing.assert_close(out, tiny_im.run(ids), rtol=0, atol=0)
