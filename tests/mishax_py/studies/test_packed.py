"""The engines of activation patching: the packed engine (``packed.py``) against a plain loop of single
patched runs and against the rows engine, chunking, and when ``engine="auto"`` falls back to rows
(padding masks, a family without key/value prefixes)."""

from __future__ import annotations

import pytest
import torch

from mishax_py import InstrumentedModel
from mishax_py.interventions import Patch
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


# -- rows whose prompts first differ at different positions ----------------------------------------
def _staggered_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 first differs at position 4, row 1 already at position 1 (earlier than row 0): a patch at
    positions 1..3 leaves row 0 unchanged but not row 1, so it must be run."""
    g = torch.Generator().manual_seed(13)
    clean = torch.randint(4, 64, (2, 7), generator=g)
    corrupt = clean.clone()
    corrupt[0, 4] = (clean[0, 4] + 9) % 60 + 4
    corrupt[1, 1] = (clean[1, 1] + 17) % 60 + 4
    corrupt[1, 5] = (clean[1, 5] + 3) % 60 + 4
    return clean, corrupt


def _patch_loop(im, clean, corrupt, site, by, direction):
    """Activation patching written out: one ``im.run`` with one ``Patch`` (from the source run's cache) per
    grid cell, over the whole batch, read with the patching tests' metric."""
    base, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    names = [im.layer_site(layer, site) for layer in range(im.n_layers)]
    _, cache = im.run_with_cache(source, sites=names)
    T = clean.shape[1]
    n_heads = im.family.dims.n_kv_heads if site in ("attn.k", "attn.v") else im.family.dims.n_heads
    out = {"pos": torch.zeros(im.n_layers, T), "layer": torch.zeros(im.n_layers),
           "head_pos": torch.zeros(im.n_layers, n_heads, T)}[by]
    for layer, name in enumerate(names):
        if by == "layer":
            out[layer] = float(metric(im.run(base, {name: Patch(cache)})))
        elif by == "pos":
            for p in range(T):
                out[layer, p] = float(metric(im.run(base, {name: Patch(cache, positions=[p])})))
        else:
            for h in range(n_heads):
                for p in range(T):
                    out[layer, h, p] = float(metric(im.run(base, {name: Patch(cache, heads=[h], positions=[p])})))
    return out


@pytest.mark.parametrize(("site", "by", "direction"), [
    ("resid_pre", "pos", "denoise"), ("attn_out", "pos", "noise"), ("resid_mid", "layer", "denoise"),
    ("attn.v", "head_pos", "denoise"), ("attn.pattern", "head_pos", "noise"),
])
def test_rows_that_first_differ_at_different_positions_equal_the_plain_loop(im, site, by, direction):
    """What counts as unchanged (and is not run) must hold for every row, not row 0 alone: here row 1 differs
    from position 1 on while row 0 only from position 4, so positions 1..3 change the metric through row 1."""
    clean, corrupt = _staggered_prompts()
    with torch.no_grad():
        ref = _patch_loop(im, clean, corrupt, site, by, direction)
        base_metric = float(metric(im.run(corrupt if direction == "denoise" else clean)))
    for engine in ("packed", "rows"):
        res = activation_patching(im, clean, corrupt, metric, site=site, by=by, direction=direction, engine=engine)
        torch.testing.assert_close(res.values, ref, rtol=0, atol=1e-5, msg=lambda m, e=engine: f"{e}: {m}")
    if by != "layer":  # the cells only row 1 sees move the metric (else this case would test nothing)
        assert (ref[..., 1:4] - base_metric).abs().max() > 5e-4  # 50x the tolerance
