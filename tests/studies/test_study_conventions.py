"""The shared study vocabulary (mishax_py.studies.conventions): direction, by, layers, positions, labels and
how a study's own edits follow the user's interventions."""

from __future__ import annotations

import warnings

import pytest
import torch

from mishax_py.interventions import Ablate, Hook, Patch
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
