"""The one progress-bar rule of the library.

``progress=True`` shows a bar, ``False`` never, ``None`` (the default everywhere) shows one
only for work of more than :data:`AUTO_MIN_STEPS` steps when stderr is a terminal, so
scripts and tests stay quiet while long interactive runs say where they are.
"""

from __future__ import annotations

import sys
from typing import Protocol

__all__ = ["AUTO_MIN_STEPS", "ProgressBar", "progress_bar"]

#: With ``progress=None``, work of more steps than this shows a bar (on a terminal).
AUTO_MIN_STEPS = 8


class ProgressBar(Protocol):
    """What callers use of a bar: advance it and close it."""

    def update(self, n: float | None = 1) -> bool | None: ...

    def close(self) -> None: ...


class _NoBar:
    def update(self, n: float | None = 1) -> bool | None:
        return None

    def close(self) -> None:
        return None


def progress_bar(total: int, desc: str, progress: bool | None, *, unit: str = "it") -> ProgressBar:
    """A tqdm bar on stderr over ``total`` steps, or a bar that shows nothing (see the module docs)."""
    show = progress if progress is not None else total > AUTO_MIN_STEPS and sys.stderr.isatty()
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)
