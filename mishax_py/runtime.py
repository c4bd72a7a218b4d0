"""The site runtime: what the ``tag(...)`` calls placed by source patches do.

Instrumented model code calls ``tag(owner_module, "local_name", value)`` at every
activation site. With no run active this is one context-variable read and the value
comes straight back, so an idle instrumented model computes exactly what the
unpatched one does. Inside a run (``InstrumentedModel.run``, ``intervene``, ``walk``,
a sweep, ...) the active :class:`RunContext` maps ``(owner, local_name)`` to a
canonical site name and passes the value through the handlers registered there
(cache recorders, interventions), in order.

Runs live in a :class:`contextvars.ContextVar`, so they are per thread and per
asyncio task: two threads experimenting on one model never see each other's
interventions or caches.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Handler",
    "PromptTracker",
    "RecordingTables",
    "RunContext",
    "SiteEvent",
    "SiteKey",
    "active_context",
    "activate",
    "begin_forward",
    "recording_table",
    "skip_layer",
    "tag",
]

# (id(owner module), local name) -> how a tag call is looked up.
SiteKey = tuple[int, str]

_ACTIVE: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("mishax_py_run", default=None)


def tag(owner: object, name: str, value: Any, transpose: tuple[int, int] | None = None) -> Any:
    """Expose ``value`` as the site ``name`` of ``owner``; return it or its replacement.

    ``transpose``: the canonical layout of the site is ``value.transpose(*transpose)``
    (e.g. per-head tensors that the model keeps as ``[batch, head, pos, d_head]`` are
    shown as ``[batch, pos, head, d_head]``). The transpose is only done when a run
    is active, and a replacement is transposed back.
    """
    ctx = _ACTIVE.get()
    if ctx is None:
        return value
    return ctx.dispatch(owner, name, value, transpose)


def begin_forward(owner: object, kv_cache: Any) -> None:
    """Called by the patched model at the start of each forward: note the KV-cache offset.

    During generation with a KV cache, the positions of a forward start at the number of
    tokens already cached; interventions that select absolute positions use this.
    """
    ctx = _ACTIVE.get()
    if ctx is None:
        return
    ctx.position_offset = int(kv_cache.get_seq_length()) if kv_cache is not None else 0


def skip_layer(owner: object, layer: int) -> bool:
    """Whether the patched model should skip decoder layer ``layer`` in this forward.

    Sweeps that only intervene at layers >= l start the batch from a cached clean
    ``resid_pre`` of layer l (set by a handler at that site) and skip layers < l.
    """
    ctx = _ACTIVE.get()
    return ctx is not None and layer < ctx.start_layer


# A handler receives the site's value (canonical layout) and the event; it returns the
# value to pass on (the same tensor to leave it unchanged).
Handler = Callable[[torch.Tensor, "SiteEvent"], torch.Tensor]


class SiteEvent:
    """What a handler knows about the site call it is handling.

    Attributes:
        site: canonical site name, e.g. ``"blocks.3.attn.z"``.
        layer: the layer index, or ``None`` for sites outside the blocks.
        context: the active run (positions offset during generation, recording).
        rows: for batched sweeps, the batch rows this handler applies to (a
            LongTensor), else ``None`` for all rows.

    Events a run builds for its own table hold the run weakly (``weak_context=True``):
    a strong reference back would make every run a reference cycle, keeping a cache's
    tensors alive until the garbage collector's next pass instead of freeing them at once.
    """

    __slots__ = ("site", "layer", "rows", "_context")

    def __init__(
        self,
        site: str,
        layer: int | None,
        context: RunContext,
        rows: torch.Tensor | None = None,
        *,
        weak_context: bool = False,
    ) -> None:
        self.site = site
        self.layer = layer
        self.rows = rows
        self._context: Callable[[], RunContext | None] = weakref.ref(context) if weak_context else lambda: context

    @property
    def context(self) -> RunContext:
        ctx = self._context()
        if ctx is None:
            raise RuntimeError(f"the run of site event {self.site!r} has ended")
        return ctx

    @property
    def position_offset(self) -> int:
        """Absolute index of the first position in this forward (> 0 when decoding with a KV cache)."""
        return self.context.position_offset

    def record(self, suffix: str, value: torch.Tensor) -> None:
        """Offer a derived tensor ``f"{site}.{suffix}"`` (e.g. SAE features) to the run's cache."""
        self.context.record_derived(f"{self.site}.{suffix}", value)

    def __repr__(self) -> str:
        return f"SiteEvent(site={self.site!r}, layer={self.layer!r}, rows={self.rows!r})"


@dataclass
class _SiteEntry:
    site: str
    layer: int | None
    # (handler, its event): events are built once at registration, not per call.
    handlers: list[tuple[Handler, SiteEvent]] = field(default_factory=list)
    # store the value (after the handlers, detached) in the run's ``store`` under ``site``
    record: bool = False
    # entries of a recording template are shared between runs: copied before handlers are added
    shared: bool = False


def recording_table(entries: Iterable[tuple[SiteKey, str, int | None]]) -> dict[SiteKey, _SiteEntry]:
    """A reusable table that records ``(key, site, layer)`` entries; see :meth:`RunContext.record_into`."""
    return {key: _SiteEntry(site, layer, [], record=True, shared=True) for key, site, layer in entries}


class RecordingTables:
    """The recording tables of the last ``size`` site lists (:func:`recording_table`), built once and shared.

    Thread-safe: runs in several threads look up, build and evict under one lock (evicting the oldest
    list). A copy (``copy.deepcopy`` of an instrumented model, pickling) starts empty: a table's keys
    hold ``id(owner)`` of the original's modules, which the copy's modules do not have.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._tables: dict[Hashable, dict[SiteKey, _SiteEntry]] = {}
        self._lock = threading.Lock()

    def get(
        self, key: Hashable, entries: Callable[[], Iterable[tuple[SiteKey, str, int | None]]]
    ) -> dict[SiteKey, _SiteEntry]:
        """The table stored under ``key``, else ``recording_table(entries())`` stored under it."""
        with self._lock:
            table = self._tables.get(key)
            if table is None:
                while len(self._tables) >= self.size:
                    del self._tables[next(iter(self._tables))]
                table = self._tables[key] = recording_table(entries())
            return table

    def __len__(self) -> int:
        return len(self._tables)

    def __deepcopy__(self, memo: dict[int, Any]) -> RecordingTables:
        return RecordingTables(self.size)

    def __getstate__(self) -> dict[str, int]:
        return {"size": self.size}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.size, self._tables, self._lock = state["size"], {}, threading.Lock()


class PromptTracker:
    """The prompt length of the sequence a run's forwards belong to (what ``positions="new"`` selects after).

    A sequence starts at a forward with offset 0 that is the first of the run or follows a forward
    with offset > 0 (a new ``generate`` call); its length is the prompt length (the offset itself if
    a run starts mid-sequence). Later forwards (KV-cache steps, or full re-runs with
    ``use_cache=False``) keep it.
    """

    __slots__ = ("last_offset", "prompt_length")

    def __init__(self) -> None:
        self.last_offset: int | None = None  # offset of the last forward seen (None: none yet)
        self.prompt_length = 0

    def length(self, offset: int, n: int) -> int:
        """The prompt length, seen from a site of a forward covering positions ``[offset, offset + n)``."""
        if self.last_offset is None or (offset == 0 and self.last_offset > 0):
            self.prompt_length = n if offset == 0 else offset
        self.last_offset = offset
        return self.prompt_length


class RunContext:
    """One active run: the site table and the handlers registered on it.

    ``table`` maps ``(id(owner), local_name)`` to the canonical site and its handlers.
    Only keys with at least one handler (or recorded) are in the table, so untouched
    sites cost a single dict lookup. ``store`` receives the values of recorded sites
    (:meth:`record_into`), without a handler call per site. ``prompt`` tracks the prompt length
    across the forwards of a generation (:class:`PromptTracker`; each run, nested ones included,
    has its own).
    """

    def __init__(self, parent: RunContext | None = None) -> None:
        self.table: dict[SiteKey, _SiteEntry] = {}
        self.derived_sinks: list[Callable[[str, torch.Tensor], None]] = []
        self.position_offset: int = 0
        self.start_layer: int = 0
        self.store: dict[str, torch.Tensor] = {}
        self.prompt = PromptTracker()
        if parent is not None:  # nested runs see the outer run's handlers first
            for key, entry in parent.table.items():
                # re-bind the parent's handlers to this context (so .record and offsets reach this run)
                handlers = [(h, SiteEvent(ev.site, ev.layer, self, ev.rows, weak_context=True))
                            for h, ev in entry.handlers]
                if entry.record:  # the outer run keeps recording into its own store
                    event = SiteEvent(entry.site, entry.layer, self, weak_context=True)
                    handlers.append((_StoreRecorder(parent.store, entry.site), event))
                self.table[key] = _SiteEntry(entry.site, entry.layer, handlers)
            self.derived_sinks = list(parent.derived_sinks)

    def record_into(self, store: dict[str, torch.Tensor], template: dict[SiteKey, _SiteEntry]) -> None:
        """Record the sites of ``template`` (from :func:`recording_table`) into ``store``.

        Values are stored detached, after the site's handlers, in firing order. The
        template is shared, not copied: registering a handler later copies the entry.
        """
        self.store = store
        if not self.table:
            self.table.update(template)
            return
        for key, entry in template.items():
            mine = self.table.get(key)
            if mine is None:
                self.table[key] = entry
            else:
                mine.record = True

    def add(
        self,
        key: SiteKey,
        site: str,
        layer: int | None,
        handler: Handler,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Register ``handler`` at ``key`` (applied after handlers registered before it)."""
        entry = self.table.get(key)
        if entry is None:
            entry = self.table[key] = _SiteEntry(site, layer)
        elif entry.shared:
            entry = self.table[key] = _SiteEntry(site, layer, [], record=entry.record)
        entry.handlers.append((handler, SiteEvent(site, layer, self, rows, weak_context=True)))

    def dispatch(self, owner: object, name: str, value: Any, transpose: tuple[int, int] | None) -> Any:
        entry = self.table.get((id(owner), name))
        if entry is None:
            return value
        canonical = value.transpose(*transpose) if transpose is not None else value
        if not entry.handlers:  # recorded only
            if entry.record:
                self.store[entry.site] = canonical.detach() if canonical.requires_grad else canonical
            return value
        out = canonical
        for handler, event in entry.handlers:
            out = handler(out, event)
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"handler {handler!r} at site {entry.site!r} returned {type(out).__name__}, "
                    "expected a Tensor"
                )
        if entry.record:
            self.store[entry.site] = out.detach() if out.requires_grad else out
        if out is canonical and transpose is None:
            return value
        # Transposed sites always continue through the canonical view (even when unchanged),
        # so gradients taken with respect to the tensor a handler saw are connected.
        if out.shape != canonical.shape:
            raise ValueError(
                f"intervention at site {entry.site!r} returned shape {tuple(out.shape)}, "
                f"expected {tuple(canonical.shape)}"
            )
        return out.transpose(*transpose) if transpose is not None else out

    def record_derived(self, name: str, value: torch.Tensor) -> None:
        for sink in self.derived_sinks:
            sink(name, value)


class _StoreRecorder:
    """A handler storing values (detached) into a given store: an outer recording run seen from a nested one."""

    __slots__ = ("store", "site")

    def __init__(self, store: dict[str, torch.Tensor], site: str) -> None:
        self.store, self.site = store, site

    def __call__(self, value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        self.store[self.site] = value.detach() if value.requires_grad else value
        return value


def active_context() -> RunContext | None:
    """The run active in this thread/task, if any."""
    return _ACTIVE.get()


@contextlib.contextmanager
def activate(ctx: RunContext) -> Iterator[RunContext]:
    """Make ``ctx`` the active run for the duration of the block (restored on exit, even on error)."""
    token = _ACTIVE.set(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.reset(token)
