"""The vocabulary every study shares, checked in one place.

Every study takes ``(im, clean_ids, corrupt_ids, metric, *, site=, by=, direction=, layers=,
positions=, interventions=, batch_size=, progress=, method=, **hf_kwargs)``; this module checks
the common keywords the same way for all of them:

* ``direction``: ``"denoise"`` (the clean value is patched into the corrupted run) or
  ``"noise"`` (the corrupted value into the clean run) -- :func:`check_direction`;
* ``by``: the grid of a result, spelled as in TransformerLens's ``get_act_patch_*`` family
  (``"pos"``, ``("layer", "pos")``, ...) -- :data:`BY_ALIASES`;
* ``layers`` / ``positions``: distinct indices, negative positions counted from the end --
  :func:`check_layers`, :func:`check_positions`, :func:`check_pos_labels`;
* ``interventions``: applied in every run of a study, before the study's own edits at a site
  they share -- :func:`with_interventions`.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

from mishax_py.interventions.base import as_intervention_list

if TYPE_CHECKING:
    from mishax_py.interventions import Intervention, InterventionLike, Interventions

__all__ = [
    "BY_ALIASES",
    "DIRECTIONS",
    "by_kind",
    "check_direction",
    "check_layers",
    "check_pos_labels",
    "check_positions",
    "with_interventions",
]

#: The two directions of a patching study.
DIRECTIONS: tuple[str, str] = ("denoise", "noise")
_OLD_DIRECTIONS = {"denoising": "denoise", "noising": "noise"}

#: ``by=`` spellings -> canonical grid kind (``"pos"`` ``[layer, pos]``, ``"layer"`` ``[layer]``,
#: ``"head"`` ``[layer, head]``, ``"head_pos"`` ``[layer, head, pos]``); lists are looked up as tuples.
BY_ALIASES: dict[Hashable, str] = {
    "pos": "pos", "layer_pos": "pos", ("layer", "pos"): "pos",
    "layer": "layer", ("layer",): "layer",
    "head": "head", "layer_head": "head", ("layer", "head"): "head", ("head",): "head",
    "head_pos": "head_pos", "layer_head_pos": "head_pos", ("head", "pos"): "head_pos",
    ("layer", "head", "pos"): "head_pos",
}


def check_direction(direction: object) -> str:
    """``"denoise"`` or ``"noise"``; the old ``"denoising"``/``"noising"`` with a DeprecationWarning.

    Anything else is a ``ValueError`` that names the value and the two choices.
    """
    if isinstance(direction, str):
        if direction in DIRECTIONS:
            return direction
        if direction in _OLD_DIRECTIONS:
            new = _OLD_DIRECTIONS[direction]
            warnings.warn(f"direction={direction!r} is deprecated; spell it direction={new!r}",
                          DeprecationWarning, stacklevel=3)
            return new
    raise ValueError(f"direction must be 'denoise' (the clean value patched into the corrupted run) or 'noise' "
                     f"(the corrupted value patched into the clean run), got {direction!r}")


def by_kind(by: object) -> str | None:
    """The canonical grid kind of a ``by=`` spelling (lists as tuples), or ``None`` if it is not one."""
    key = tuple(by) if isinstance(by, list) else by
    try:
        return BY_ALIASES.get(key)
    except TypeError:  # unhashable
        return None


def check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """The layers to study, in the given order (default all ``range(n_layers)``).

    They must be distinct indices in ``[0, n_layers)`` and at least one; otherwise a ``ValueError``.
    """
    if layers is None:
        return list(range(n_layers))
    out = [int(x) for x in layers]
    if not out or any(not 0 <= x < n_layers for x in out) or len(set(out)) != len(out):
        raise ValueError(f"layers must be distinct layer indices in [0, {n_layers}), got {list(layers)}")
    return out


def check_positions(positions: Sequence[int] | None, n_pos: int) -> list[int]:
    """The positions to study as absolute indices, in the given order (default all ``range(n_pos)``).

    Negative positions count from the end (``-1`` is the last token). They must be distinct,
    in ``[-n_pos, n_pos)`` and at least one; otherwise a ``ValueError``.
    """
    if positions is None:
        return list(range(n_pos))
    out = [int(p) + n_pos if int(p) < 0 else int(p) for p in positions]
    if not out or any(not 0 <= p < n_pos for p in out) or len(set(out)) != len(out):
        raise ValueError(f"positions must be distinct positions in [-{n_pos}, {n_pos}), got {list(positions)}")
    return out


def check_pos_labels(pos_labels: Sequence[str] | None, n: int) -> None:
    """``pos_labels`` (tick labels of the position axis) must be ``None`` or one label per studied position."""
    if pos_labels is not None and len(pos_labels) != n:
        raise ValueError(f"pos_labels has {len(pos_labels)} labels for {n} positions")


def with_interventions(interventions: Interventions | None, own: Mapping[str, Sequence[InterventionLike]]
                       ) -> dict[str, list[Intervention]]:
    """The user's ``interventions=`` followed by a study's ``own`` edits, as one ``{site: [interventions]}``.

    The user's sites come first (in their order); where a study edits a site spelled the same way,
    its edits follow the user's there, so the study's patch sees (and overrides) their value.
    """
    merged: dict[str, list[Intervention]] = {site: as_intervention_list(ivs)
                                             for site, ivs in (interventions or {}).items()}
    for site, ivs in own.items():
        merged[site] = merged.get(site, []) + as_intervention_list(list(ivs))
    return merged
