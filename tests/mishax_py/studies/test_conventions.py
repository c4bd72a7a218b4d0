"""The shared study vocabulary (mishax_py.studies.conventions): direction, by, layers, positions, labels and
how a study's own edits follow the user's interventions; and activation and path patching following it
(signatures, no old positional calls, the direction spellings)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from mishax_py.interventions import Ablate, Hook, Patch
from mishax_py.studies.activation_patching import activation_patching
from mishax_py.studies.conventions import (
    BY_ALIASES,
    DIRECTIONS,
    by_kind,
    check_direction,
    check_layers,
    check_pos_labels,
    check_positions,
    with_interventions,
)
from mishax_py.studies.path_patching import path_patching, path_patching_by_head
from tests.helpers import two_position_metric as metric

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def test_direction_words() -> None:
    assert DIRECTIONS == ("denoise", "noise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_direction("denoise") == "denoise" and check_direction("noise") == "noise"
    for old, new in (("denoising", "denoise"), ("noising", "noise")):
        with pytest.warns(DeprecationWarning, match=f"direction='{old}' is deprecated.*direction='{new}'"):
            assert check_direction(old) == new
    for bad in ("Denoise", "forward", "", None, 1):
        with pytest.raises(ValueError, match=rf"'denoise'.*'noise'.*got {bad!r}"):
            check_direction(bad)


def test_by_spellings() -> None:
    assert by_kind("pos") == by_kind(("layer", "pos")) == by_kind(["layer", "pos"]) == "pos"
    assert by_kind("layer_head") == by_kind(("head",)) == "head"
    assert by_kind(["layer", "head", "pos"]) == "head_pos" and by_kind("layer") == "layer"
    assert by_kind("neuron") is None and by_kind({"a": 1}) is None  # unhashable: not a spelling
    assert set(BY_ALIASES.values()) == {"pos", "layer", "head", "head_pos"}


def test_layers() -> None:
    assert check_layers(None, 3) == [0, 1, 2]
    assert check_layers([2, 0], 3) == [2, 0]
    for bad in ([3], [-1], [], [1, 1]):
        with pytest.raises(ValueError, match=r"distinct layer indices in \[0, 3\)"):
            check_layers(bad, 3)


def test_positions() -> None:
    assert check_positions(None, 4) == [0, 1, 2, 3]
    assert check_positions([-1, 0], 4) == [3, 0]
    for bad in ([4], [-5], [], [1, -3]):
        with pytest.raises(ValueError, match=r"distinct positions in \[-4, 4\)"):
            check_positions(bad, 4)


def test_pos_labels() -> None:
    check_pos_labels(None, 3)
    check_pos_labels(["a", "b", "c"], 3)
    with pytest.raises(ValueError, match="pos_labels has 2 labels for 3 positions"):
        check_pos_labels(["a", "b"], 3)


def test_the_study_edits_follow_the_user_interventions() -> None:
    def double(v):
        return v * 2

    user_ablate = Ablate()
    patch = Patch(torch.zeros(1))
    merged = with_interventions({"blocks.0.mlp_out": user_ablate, "blocks.1.attn.z": [double]},
                                {"blocks.1.attn.z": [patch], "blocks.0.resid_pre": [patch]})
    assert list(merged) == ["blocks.0.mlp_out", "blocks.1.attn.z", "blocks.0.resid_pre"]
    assert merged["blocks.0.mlp_out"] == [user_ablate]
    first, second = merged["blocks.1.attn.z"]
    assert isinstance(first, Hook) and second is patch
    assert with_interventions(None, {"x": [patch]}) == {"x": [patch]}


@pytest.mark.parametrize(("study", "keywords"), [
    (activation_patching, ["site", "by", "direction", "layers", "positions", "interventions", "batch_size", "progress",
                           "method", "engine", "pos_labels", "max_memory", "hf_kwargs"]),
    (path_patching, ["senders", "receivers", "direction", "interventions", "method", "freeze_mlps",
                     "sender_positions", "receiver_positions", "max_memory", "hf_kwargs"]),
    (path_patching_by_head, ["receivers", "direction", "layers", "interventions", "batch_size", "progress", "method",
                             "freeze_mlps", "sender_positions", "receiver_positions", "max_memory", "hf_kwargs"]),
], ids=lambda x: getattr(x, "__name__", ""))
def test_signatures_follow_the_study_convention(study, keywords):
    params = list(inspect.signature(study).parameters.values())
    assert [p.name for p in params[:4]] == ["im", "clean_ids", "corrupt_ids", "metric"]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:4])
    assert [p.name for p in params[4:]] == keywords
    assert all(p.kind is p.KEYWORD_ONLY for p in params[4:-1]) and params[-1].kind is params[-1].VAR_KEYWORD
    assert inspect.signature(study).parameters["method"].default == "exact"



def test_old_positional_calls_fail_clearly(im, prompts):
    clean, corrupt = prompts
    with pytest.raises(TypeError, match="positional"):
        activation_patching(im, clean, corrupt, metric, "resid_pre")
    with pytest.raises(TypeError, match="positional"):
        activation_patching(im, clean, corrupt, metric, "resid_pre", "pos", "noise", 4, False)
    with pytest.raises(TypeError, match="positional"):
        path_patching(im, clean, corrupt, metric, [(0, 1)], [(1, 2, "q")])
    with pytest.raises(TypeError, match="positional"):
        path_patching_by_head(im, clean, corrupt, metric, [(1, 2, "q")])
    assert inspect.signature(activation_patching).parameters["engine"].default == "auto"



def test_direction_spellings(im, prompts):
    """'denoise' / 'noise' are the words; the old 'denoising' / 'noising' still work, with a DeprecationWarning."""
    clean, corrupt = prompts
    for old, new in (("denoising", "denoise"), ("noising", "noise")):
        with pytest.warns(DeprecationWarning, match=f"direction='{new}'"):
            res = activation_patching(im, clean, corrupt, metric, site="attn_out", direction=old)
        want = activation_patching(im, clean, corrupt, metric, site="attn_out", direction=new)
        assert res.direction == new
        assert torch.equal(res.values, want.values)
    with pytest.raises(ValueError, match="direction must be 'denoise'.*'noise'.*got 'noisy'"):
        path_patching(im, clean, corrupt, metric, senders=[(0, 1)], receivers=[(1, 2, "q")], direction="noisy")
    with pytest.raises(ValueError, match="got 'both'"):
        path_patching_by_head(im, clean, corrupt, metric, receivers=[(1, 2, "q")], direction="both")
    with pytest.raises(ValueError, match="method must be 'exact'"):
        path_patching(im, clean, corrupt, metric, senders=[(0, 1)], receivers=[(1, 2, "q")], method="atp")
