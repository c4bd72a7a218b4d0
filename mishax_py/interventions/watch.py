"""No silent no-ops: an edit whose selectors select nothing in a whole run warns, once per run.

A built-in edit (``Ablate``, ``Clamp``, ``Patch``, ``Steer``) reports the selection it built at every
application (:func:`note_selection`). Each run -- ``im.run``, ``im.run_with_cache``, an
``im.intervene`` block (every forward inside it, ``model.generate`` included) and a sweep -- watches
the interventions it registered (:class:`SelectionWatch`). When the run ends normally, every edit
that was applied but selected no entry in any of its forwards is reported in **one**
:class:`EmptySelectionWarning` per run (a sweep of many such variants gives one warning that counts
them), naming the site and the edit with its selectors. Example: ``Steer(v, positions="new")`` in a
plain ``im.run`` (``"new"`` selects the tokens ``model.generate`` adds, and a plain run adds none),
``index=[]``, or a ``slice`` past the end of the sequence.

Why a warning and not an error: whether a selector selects anything is only known while the run
runs (``"new"`` selects nothing in the prompt's forward and the generated tokens afterwards; slices
and negative positions resolve against the sequence seen so far), and the run's results are valid
(the edit really did nothing), so raising afterwards would throw them away. Turn it into an error
with ``warnings.simplefilter("error", EmptySelectionWarning)`` (the run's context is left as after
any failed run: nothing stays registered). An ``im.intervene`` block in which no forward ran does not
warn. ``Hook`` functions and raw handlers are not watched: what they select is theirs to know.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from mishax_py.interventions.base import Intervention, Interventions, as_intervention_list

if TYPE_CHECKING:
    from mishax_py.interventions.selection import Selection

__all__ = ["EmptySelectionWarning", "SelectionWatch", "note_selection"]

_WATCHES: contextvars.ContextVar[tuple[SelectionWatch, ...]] = contextvars.ContextVar(
    "mishax_py_selection_watches", default=())
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class EmptySelectionWarning(UserWarning):
    """An intervention's selectors selected nothing in a whole run, so it changed nothing (module docs)."""


def note_selection(iv: Intervention, site: str, sel: Selection) -> None:
    """Report the selection ``iv`` built at ``site`` to the innermost run that registered ``iv`` (if any)."""
    watches = _WATCHES.get()
    if not watches:
        return
    for watch in reversed(watches):
        if id(iv) in watch.owned:
            watch.note(iv, site, sel.mask)
            return


class SelectionWatch:
    """Watches one run's interventions; warns on leaving (module docs).

    Args:
        variants: the run's intervention mappings (one for a run, one per variant for a sweep).
        what: the run as it reads in the message (``"im.run"``, ``"sweep"``).
    """

    def __init__(self, variants: Sequence[Interventions | None], what: str) -> None:
        self.what = what
        self.n_variants = len(variants)
        self.owned: dict[int, tuple[Intervention, list[int]]] = {}
        for vi, variant in enumerate(variants):
            if not isinstance(variant, Mapping):
                continue
            for value in variant.values():
                try:
                    ivs = as_intervention_list(value)
                except TypeError:  # reported by the run's own validation
                    continue
                for iv in ivs:
                    self.owned.setdefault(id(iv), (iv, []))[1].append(vi)
        # (id(iv), site) -> whether anything was selected (a bool tensor on the value's device: no sync per call)
        self.hits: dict[tuple[int, str], torch.Tensor | bool] = {}
        self._token: contextvars.Token[tuple[SelectionWatch, ...]] | None = None

    def note(self, iv: Intervention, site: str, mask: torch.Tensor | None) -> None:
        key = (id(iv), site)
        before = self.hits.get(key, False)
        if before is True:
            return
        if mask is None:
            self.hits[key] = True
            return
        hit = mask.any()
        self.hits[key] = hit if before is False else (before | hit)

    def __enter__(self) -> SelectionWatch:
        if self.owned:
            self._token = _WATCHES.set((*_WATCHES.get(), self))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._token is None:
            return
        _WATCHES.reset(self._token)
        self._token = None
        if exc_type is None:
            self.report()

    def empty(self) -> list[tuple[Intervention, str, list[int]]]:
        """``(intervention, site, its variants)`` of every edit applied in the run that selected nothing."""
        out = []
        for (iv_id, site), hit in self.hits.items():
            if not bool(hit):
                iv, variants = self.owned[iv_id]
                out.append((iv, site, variants))
        return out

    def report(self) -> None:
        """Warn once if any edit selected nothing (module docs)."""
        empty = self.empty()
        if not empty:
            return
        shown = "; ".join(f"{iv!r} at site {site!r}" for iv, site, _ in empty[:3])
        more = f"; and {len(empty) - 3} more" if len(empty) > 3 else ""
        if self.n_variants > 1:
            variants = sorted({v for _, _, vs in empty for v in vs})
            head = (f"{self.what}: in {len(variants)} of {self.n_variants} variants an intervention selected nothing "
                    f"and changed nothing (variants {_ranges(variants)}): ")
        else:
            head = f"{self.what}: {len(empty)} intervention(s) selected nothing in this run and changed nothing: "
        hint = ""
        if any("positions='new'" in repr(iv) for iv, _, _ in empty):
            hint = (" positions='new' selects the tokens model.generate adds (inside im.intervene(...)); a plain run "
                    "adds none: select positions of the prompt (e.g. positions=-1) there.")
        warnings.warn(head + shown + more + "." + hint, EmptySelectionWarning, stacklevel=_outside_stacklevel())


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"`` (at most 6 groups shown)."""
    groups: list[list[int]] = []
    for v in values:
        if groups and v == groups[-1][1] + 1:
            groups[-1][1] = v
        else:
            groups.append([v, v])
    text = [f"{a}-{b}" if b > a else f"{a}" for a, b in groups[:6]]
    return ", ".join(text) + (", ..." if len(groups) > 6 else "")


def _outside_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside this package (and contextlib): the user's line."""
    frame: Any = sys._getframe(1)
    level = 1
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE)
                                 or frame.f_code.co_filename == contextlib.__file__):
        frame = frame.f_back
        level += 1
    return level
