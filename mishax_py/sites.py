"""The site catalogue of an instrumented model: names, shapes, aliases, and name lookup.

A :class:`SiteSpec` says where a site lives (the module passed to ``tag`` and the
local name used there), what it is called canonically and in TransformerLens, its
symbolic shape, and where in the model's source it sits. A :class:`SiteCatalogue`
holds the sites of one model in forward order and resolves user patterns: canonical
names, TransformerLens aliases, and ``fnmatch`` globs over either
(``"blocks.*.resid_post"``, ``"blocks.3.attn.hook_*"``).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mishax_py.runtime import SiteKey

__all__ = ["SiteCatalogue", "SiteInfo", "SiteSpec", "UnknownSiteError"]

# Symbolic dimensions filled in per run; every other dimension is a fixed int.
BATCH, POS, KEY_POS = "batch", "pos", "key_pos"


class UnknownSiteError(KeyError):
    """A site name or pattern that matches no site; the message lists the closest names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class SiteSpec:
    """One site of one model instance.

    Attributes:
        name: canonical name, e.g. ``"blocks.3.attn.z"``.
        owner: the module passed to ``tag`` at this site.
        local: the local name used in that ``tag`` call.
        layer: the decoder layer, or ``None`` outside the blocks.
        dims: symbolic shape, ints and ``"batch"``/``"pos"``/``"key_pos"``.
        where: where in the model's source the value is taken.
        alias: the TransformerLens hook name, if the meaning is the same.
        dtype: the value's dtype where it differs from the model's (e.g. fp32 norms).
    """

    name: str
    owner: nn.Module
    local: str
    layer: int | None
    dims: tuple[int | str, ...]
    where: str
    alias: str | None = None
    dtype: torch.dtype | None = None

    @property
    def key(self) -> SiteKey:
        return (id(self.owner), self.local)


@dataclass(frozen=True)
class SiteInfo:
    """What ``InstrumentedModel.site_info`` reports about a site."""

    name: str
    layer: int | None
    dims: tuple[int | str, ...]
    dtype: torch.dtype
    where: str
    alias: str | None

    @property
    def shape(self) -> tuple[int | str, ...]:
        """The symbolic shape, e.g. ``("batch", "pos", 8, 256)``."""
        return self.dims

    def concrete_shape(self, batch: int | None, pos: int | None) -> tuple[int | None, ...]:
        """The shape for a run of ``batch`` rows and ``pos`` positions (``None`` where unknown)."""
        sub = {BATCH: batch, POS: pos, KEY_POS: pos}
        return tuple(sub[d] if isinstance(d, str) else d for d in self.dims)

    def __str__(self) -> str:
        dims = "[" + ", ".join(str(d) for d in self.dims) + "]"
        dtype = str(self.dtype).replace("torch.", "")
        alias = f"  (TL: {self.alias})" if self.alias else ""
        return f"{self.name:28s} {dims:26s} {dtype:8s} {self.where}{alias}"


_GLOB_CHARS = re.compile(r"[*?\[]")


class SiteCatalogue:
    """The sites of one model in forward order, with name and alias resolution."""

    def __init__(self, specs: Sequence[SiteSpec]) -> None:
        self.specs: list[SiteSpec] = list(specs)
        self.by_name: dict[str, SiteSpec] = {s.name: s for s in self.specs}
        if len(self.by_name) != len(self.specs):
            raise ValueError("duplicate site names in catalogue")
        self.alias_to_name: dict[str, str] = {s.alias: s.name for s in self.specs if s.alias}
        self._order = {s.name: i for i, s in enumerate(self.specs)}

    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def canonical(self, name: str) -> str:
        """The canonical name for a canonical name or an alias; raises :class:`UnknownSiteError`."""
        if name in self.by_name:
            return name
        if name in self.alias_to_name:
            return self.alias_to_name[name]
        raise UnknownSiteError(self._unknown_message(name))

    def resolve(self, pattern: str) -> list[str]:
        """Canonical names matched by a name, alias or glob, in forward order."""
        if not _GLOB_CHARS.search(pattern):
            return [self.canonical(pattern)]
        found = {s.name for s in self.specs if fnmatch.fnmatchcase(s.name, pattern)}
        found |= {n for a, n in self.alias_to_name.items() if fnmatch.fnmatchcase(a, pattern)}
        if not found:
            raise UnknownSiteError(self._unknown_message(pattern))
        return sorted(found, key=self._order.__getitem__)

    def resolve_all(self, patterns: str | Iterable[str]) -> list[str]:
        if isinstance(patterns, str):
            patterns = [patterns]
        out: dict[str, None] = {}
        for p in patterns:
            out.update(dict.fromkeys(self.resolve(p)))
        return sorted(out, key=self._order.__getitem__)

    def order(self, name: str) -> int:
        return self._order[name]

    def _unknown_message(self, name: str) -> str:
        pool = list(self.by_name) + list(self.alias_to_name)
        close = difflib.get_close_matches(name, pool, n=5, cutoff=0.5)
        hint = f" Closest: {', '.join(close)}." if close else ""
        return (
            f"unknown site {name!r}.{hint} Call site_names() for the full list; globs such as "
            f"'blocks.*.resid_post' and TransformerLens aliases are accepted."
        )
