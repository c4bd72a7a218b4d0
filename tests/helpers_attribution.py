"""Helpers shared by the attribution tests (to join the one shared test-helper module).

:func:`element_slices` spells out the elements of one layer's attribution grid as index tuples,
independently of the library's own bookkeeping (``mishax_py.studies.attribution.layer.element_masks``),
so the references of ``test_attribution.py`` and ``test_attribution_layer.py`` patch them one by one.
"""

from __future__ import annotations

__all__ = ["element_slices"]


def element_slices(kind: str, by: str, shape) -> list[list[tuple]]:
    """The elements of one layer's grid as index tuples into a site value of ``shape`` (batch first),
    one row of the result per row of the ``by`` grid (``head_pos``: a row per head)."""
    A = slice(None)
    if by == "layer":
        return [[(A,)]]
    if kind == "stream":
        return [[(A, p)] for p in range(shape[1])]
    if kind == "head":
        return {"head": [[(A, A, h)] for h in range(shape[2])],
                "pos": [[(A, p)] for p in range(shape[1])],
                "head_pos": [[(A, p, h) for p in range(shape[1])] for h in range(shape[2])]}[by]
    return {"head": [[(A, h)] for h in range(shape[1])],
            "pos": [[(A, A, p)] for p in range(shape[2])],
            "head_pos": [[(A, h, p) for p in range(shape[2])] for h in range(shape[1])]}[by]
