"""The engines of activation patching: the packed engine (``packed.py``) against a plain loop of single
patched runs and against the rows engine, chunking, and when ``engine="auto"`` falls back to rows
(padding masks, a family without key/value prefixes)."""

from __future__ import annotations

import pytest
import torch

from mishax_py import InstrumentedModel
from mishax_py.studies.activation_patching import activation_patching
from tests.helpers import loop_reference
from tests.helpers import two_position_metric as metric

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


CASES = [(s, b) for s in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out") for b in ("pos", "layer")]
CASES += [(s, b) for s in ("attn.z", "attn.q", "attn.k", "attn.v", "attn.pattern") for b in ("head", "head_pos")]


@pytest.mark.parametrize(("site", "by"), CASES)
def test_packed_equals_the_plain_loop(im, prompts, site, by):
    clean, corrupt = prompts
    with torch.no_grad():
        ref = loop_reference(im, clean, corrupt, site, by)
    res = activation_patching(im, clean, corrupt, metric, site=site, by=by)
    assert res.values.shape == ref.shape
    torch.testing.assert_close(res.values, ref, rtol=0, atol=1e-5)
    assert (ref - res.corrupt).abs().max() > 1e-3  # the patches do something


def test_rows_method_and_chunking_agree(im, prompts):
    clean, corrupt = prompts
    packed = activation_patching(im, clean, corrupt, metric, site="resid_mid")
    one_row = activation_patching(im, clean, corrupt, metric, site="resid_mid", batch_size=1, progress=True)
    rows = activation_patching(im, clean, corrupt, metric, site="resid_mid", engine="rows", batch_size=3)
    torch.testing.assert_close(one_row.values, packed.values, rtol=0, atol=1e-5)
    torch.testing.assert_close(rows.values, packed.values, rtol=0, atol=1e-5)
    heads = activation_patching(im, clean, corrupt, metric, site="attn.k", by="head_pos", batch_size=2)
    heads_rows = activation_patching(im, clean, corrupt, metric, site="attn.k", by="head_pos", engine="rows")
    torch.testing.assert_close(heads.values, heads_rows.values, rtol=0, atol=1e-5)


def test_padding_mask_uses_rows_and_equals_the_loop(im, prompts):
    clean, corrupt = prompts
    mask = torch.ones_like(clean)
    mask[1, :2] = 0  # row 1 left-padded
    with torch.no_grad():
        ref = loop_reference(im, clean, corrupt, "resid_pre", "pos", attention_mask=mask)
    res = activation_patching(im, clean, corrupt, metric, site="resid_pre", attention_mask=mask)
    torch.testing.assert_close(res.values, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="engine='packed'.*attention_mask"):
        activation_patching(im, clean, corrupt, metric, engine="packed", attention_mask=mask)


@pytest.mark.parametrize(("site", "by"), [("resid_pre", "pos"), ("mlp_out", "layer"), ("attn.v", "head_pos"),
                                          ("attn.pattern", "head"), ("attn.q", "head_pos")])
def test_packed_engine_equals_rows_engine(im, prompts, site, by):
    clean, corrupt = prompts
    packed = activation_patching(im, clean, corrupt, metric, site=site, by=by, engine="packed")
    rows = activation_patching(im, clean, corrupt, metric, site=site, by=by, engine="rows")
    auto = activation_patching(im, clean, corrupt, metric, site=site, by=by)
    torch.testing.assert_close(packed.values, rows.values, rtol=0, atol=1e-5)
    assert torch.equal(auto.values, packed.values)  # auto runs the packed engine here
    assert (rows.values - rows.corrupt).abs().max() > 1e-3


class _NoPrefixFamily:
    """The model's own family, except that it does not take key/value prefixes."""

    supports_kv_prefix = False

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_family_without_kv_prefixes_runs_the_rows_engine(im, prompts):
    clean, corrupt = prompts
    plain = InstrumentedModel(im.model, im.catalogue, _NoPrefixFamily(im.family))
    with torch.no_grad():
        ref = loop_reference(im, clean, corrupt, "attn.k", "head_pos")
    res = activation_patching(plain, clean, corrupt, metric, site="attn.k", by="head_pos")
    torch.testing.assert_close(res.values, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="engine='packed'.*supports_kv_prefix"):
        activation_patching(plain, clean, corrupt, metric, engine="packed")
