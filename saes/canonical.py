"""Canonical Gemma Scope SAEs: which ``average_l0_N`` a ``.../canonical`` reference means.

``CANONICAL_L0[repo]["L/width"] = N`` maps ``{repo}/layer_L/width_{width}/canonical`` to
``{repo}/layer_L/width_{width}/average_l0_N/params.npz``.

This table is PARTIAL. It was transcribed from SAELens' ``pretrained_saes.yaml``
(the ``gemma-scope-*-canonical`` releases, i.e. the SAEs shown on Neuronpedia); only
entries copied from that source are listed and nothing is guessed. Missing
combinations (e.g. attention SAEs, transcoders, 9B pt) raise a clear error asking
for an explicit ``average_l0_N``. To extend it, add ``"L/width": N`` entries below, or
call :func:`register_canonical` at run time.
"""

from __future__ import annotations

__all__ = ["CANONICAL_L0", "canonical_l0", "register_canonical"]

CANONICAL_L0: dict[str, dict[str, int]] = {
    "google/gemma-scope-2b-pt-res": {
        "0/16k": 105, "1/16k": 102, "2/16k": 141, "3/16k": 59, "4/16k": 124, "5/16k": 68,
        "6/16k": 70, "7/16k": 69, "8/16k": 71, "9/16k": 73, "10/16k": 77, "11/16k": 80,
        "12/16k": 82, "13/16k": 84, "14/16k": 84, "15/16k": 78, "16/16k": 78, "17/16k": 77,
        "18/16k": 74, "19/16k": 73, "20/16k": 71, "21/16k": 70, "22/16k": 72, "23/16k": 75,
        "24/16k": 73, "25/16k": 116,
        "5/1m": 114, "12/1m": 107, "19/1m": 88, "12/262k": 121, "12/32k": 76, "12/524k": 115,
        "0/65k": 73, "1/65k": 121, "2/65k": 77, "3/65k": 89, "4/65k": 89, "5/65k": 105,
        "6/65k": 107, "7/65k": 107, "8/65k": 111, "9/65k": 118, "10/65k": 128, "11/65k": 70,
        "12/65k": 72, "13/65k": 75, "14/65k": 73, "15/65k": 127, "16/65k": 128, "17/65k": 125,
        "18/65k": 116, "19/65k": 115, "20/65k": 114, "21/65k": 111, "22/65k": 116, "23/65k": 123,
        "24/65k": 124, "25/65k": 93,
    },
    "google/gemma-scope-2b-pt-mlp": {
        "0/16k": 119, "1/16k": 105, "2/16k": 95, "3/16k": 95, "4/16k": 85, "5/16k": 114,
        "6/16k": 133, "7/16k": 60, "8/16k": 136, "9/16k": 88, "10/16k": 110, "11/16k": 98,
        "12/16k": 108, "13/16k": 112, "14/16k": 97, "15/16k": 80, "16/16k": 72, "17/16k": 68,
        "18/16k": 106, "19/16k": 109, "20/16k": 109, "21/16k": 113, "22/16k": 121, "23/16k": 128,
        "24/16k": 73, "25/16k": 126,
        "0/65k": 72, "1/65k": 127, "2/65k": 134, "3/65k": 68, "4/65k": 66, "5/65k": 86,
        "6/65k": 101, "7/65k": 115, "8/65k": 110, "9/65k": 77, "10/65k": 95, "11/65k": 88,
        "12/65k": 96, "13/65k": 98, "14/65k": 89, "15/65k": 72, "16/65k": 66, "17/65k": 136,
        "18/65k": 88, "19/65k": 88, "20/65k": 88, "21/65k": 86, "22/65k": 92, "23/65k": 102,
        "24/65k": 128, "25/65k": 107,
    },
    "google/gemma-scope-9b-it-res": {
        "9/16k": 88, "20/16k": 91, "31/16k": 76, "9/131k": 121, "20/131k": 81, "31/131k": 109,
    },
    "google/gemma-scope-27b-pt-res": {
        "10/131k": 106, "22/131k": 82, "34/131k": 72,
    },
}  # fmt: skip


def canonical_l0(repo: str, layer: int, width: str) -> int | None:
    """The canonical ``average_l0`` for ``(repo, layer, width)``, or ``None`` if not in the table."""
    return CANONICAL_L0.get(repo, {}).get(f"{layer}/{width}")


def register_canonical(repo: str, layer: int, width: str, l0: int) -> None:
    """Add (or override) a canonical entry.

    Example: ``register_canonical("google/gemma-scope-2b-pt-att", 5, "16k", 59)``.
    """
    CANONICAL_L0.setdefault(repo, {})[f"{layer}/{width}"] = int(l0)
