"""saes.base: the families' shapes, the circuit protocols they satisfy, and what ``save`` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import saes
from mishax_py.circuits.dictionaries import SAELike, TranscoderLike
from saes.base import fold_to_width, init_tied
from saes.files import SAELENS_CFG, SAELENS_WEIGHTS, write_json_atomic

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops: see conftest.one_thread


def test_families_satisfy_the_circuit_protocols() -> None:
    """Feature circuits and attribution graphs take any SAELike / TranscoderLike; every family is one."""
    for sae in (saes.JumpReLUSAE(8, 16), saes.ReLUSAE(8, 16), saes.TopKSAE(8, 16, k=2)):
        assert isinstance(sae, SAELike)
    tc = saes.Transcoder(8, 16, d_out=6, site="blocks.1.ln2_normalized", output_site="blocks.1.mlp_out")
    assert isinstance(tc, TranscoderLike)
    assert not isinstance(torch.nn.Linear(8, 16), SAELike)  # the check can fail


def test_fold_to_width() -> None:
    x = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)  # [batch, pos, head, d_head]
    assert fold_to_width(x, 5) is x
    folded = fold_to_width(x, 20)
    assert folded is not None and folded.shape == (2, 3, 20)
    assert torch.equal(folded[1, 2, 5:10], x[1, 2, 1])  # head-major
    assert fold_to_width(x, 7) is None


def test_saelens_config_of_a_transcoder(tmp_path: Path) -> None:
    tc = saes.Transcoder(
        8, 16, d_out=6, site="blocks.1.ln2_normalized", output_site="blocks.1.mlp_out", activation="topk", k=3
    )
    init_tied(tc, generator=torch.Generator().manual_seed(0))
    tc.metadata["release"] = "somewhere"
    folder = tc.save(tmp_path / "tc")
    assert sorted(p.name for p in folder.iterdir()) == sorted([SAELENS_CFG, SAELENS_WEIGHTS])  # no temp files
    cfg = json.loads((folder / SAELENS_CFG).read_text())
    assert cfg == tc.saelens_config()
    assert cfg["architecture"] == "topk_transcoder"
    assert (cfg["hook_name"], cfg["hook_layer"], cfg["hook_name_out"]) == (
        "blocks.1.ln2.hook_normalized",
        1,
        "blocks.1.hook_mlp_out",
    )
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"], cfg["k"], cfg["release"]) == (8, 16, 6, 3, "somewhere")
    back = saes.load(folder)
    assert isinstance(back, saes.Transcoder) and (back.site, back.output_site) == (tc.site, tc.output_site)
    x = torch.randn(5, 8)
    torch.testing.assert_close(back(x), tc(x))


def test_write_json_atomic_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "meta.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    write_json_atomic(path, {"b": 2, "a": 0}, sort_keys=True)
    assert path.read_text() == '{\n  "a": 0,\n  "b": 2\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]
