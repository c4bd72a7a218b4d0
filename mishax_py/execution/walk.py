"""The Mishax loop: walk a real forward pass site by site, reading and optionally replacing values.

.. code-block:: python

    with im.walk(ids) as w:                  # or im.walk(ids, sites="blocks.*.mlp_out")
        for site, value in w:                # (canonical site name, value) in forward order
            if site == "blocks.3.mlp_out":
                w.replace(value * 0)         # the model continues with this value
    logits = w.output                        # [batch, pos, vocab]

How it works
------------
The forward pass runs in a child greenlet. A handler registered at every walked site
switches back to the loop with ``(site, value)`` and waits; when the loop asks for the next
item, the child is resumed with the replacement given to :meth:`Walker.replace` (or none) and
runs on to the next site. Everything happens on one thread, so autograd, ``torch.no_grad()``
and the model's own code behave as in a plain run (grad mode is saved and restored on every
switch, so the loop body and the model each see their own).

``replace`` only records the replacement; it is delivered when the loop resumes, so there is
no ``generator.send`` pitfall (``send`` both delivers a value *and* advances the generator,
skipping an item when mixed with ``for``): every site is yielded exactly once.

The run context is activated *inside* the child greenlet (greenlet >= 3 gives every greenlet
its own ``contextvars`` context), so the caller's context never has a run set, not even while
the walk is suspended mid-forward: a plain ``im.run`` inside the loop body is an ordinary,
independent run. Interventions of an enclosing ``im.intervene(...)`` block apply to the walked
forward (before the walker sees each value).

Leaving the loop early and errors
---------------------------------
* ``break`` (or any normal exit from the ``with`` block before the loop is exhausted) **finishes
  the forward without further yields**: a replacement given at the last yielded site is applied,
  every later site keeps the model's own value, and ``w.output`` is the full logits.
* An exception raised in the loop body **aborts the forward**: the child greenlet is killed
  (``GreenletExit`` unwinds the model code), the exception propagates unchanged, and nothing is
  left active; ``w.output`` then raises.
* An exception raised by the forward itself propagates out of the ``for`` statement.
* Without a ``with`` block, leaving the loop early (break or exception) finishes the forward
  when the loop's iterator is closed (immediately, in CPython); call :meth:`Walker.close` to
  abort instead.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from greenlet import GreenletExit, getcurrent, greenlet

from mishax_py.memory import check_budget, estimate_run
from mishax_py.runtime import SiteEvent, activate

if TYPE_CHECKING:
    from mishax_py.instrumented import InstrumentedModel

__all__ = ["Walker"]


class _State(enum.Enum):
    NEW = "new"  # not iterated yet
    RUNNING = "running"  # the forward is suspended at a site (or between two)
    LEFT = "left"  # the loop was left early inside a with block; finished or aborted on exit
    DONE = "done"  # the forward finished; output available
    FAILED = "failed"  # the forward raised
    ABORTED = "aborted"  # the forward was killed (exception in the loop body, or close())


class _Channel:
    """What the site handler shares with the loop: deliberately no reference to the Walker or the child
    greenlet, so dropping an unfinished Walker frees the child (greenlet then unwinds it with GreenletExit)."""

    __slots__ = ("detached", "loop")

    def __init__(self) -> None:
        self.loop: greenlet | None = None  # the greenlet running the loop (switched to at each site)
        self.detached = False  # True: run the rest of the forward without yielding


class Walker:
    """Iterate ``(site, value)`` over a real forward pass of ``ids``; see the module docs.

    Args:
        im: the instrumented model.
        ids: token ids ``[batch, pos]`` (or ``[pos]``, or a list), text or a tokenizer's output
            (:mod:`mishax_py.inputs`).
        sites: names, TransformerLens aliases or globs of the sites to visit (default: every site).
        **hf_kwargs: passed to the model's forward (``attention_mask``, ...).

    A Walker runs one forward pass; iterate it once.
    """

    def __init__(self, im: InstrumentedModel, ids: Any, *, sites: str | Iterable[str] | None = None,
                 **hf_kwargs: Any) -> None:
        from mishax_py.inputs import model_inputs

        self.im = im
        max_memory = hf_kwargs.pop("max_memory", None)
        self.ids, hf_kwargs = model_inputs(ids, im, hf_kwargs)  # text and tokenizer output too; checked
        # one forward: fail before it starts when its estimate exceeds the budget (mishax_py.memory)
        rows, pos = self.ids.shape
        check_budget(estimate_run(im, rows, pos, grad=torch.is_grad_enabled()),
                     f"im.walk (one forward of {rows} rows x {pos} positions)", device=self.ids.device,
                     max_memory=max_memory, reduce="walk fewer rows or positions at a time")
        self.sites: list[str] = im.site_names() if sites is None else im.resolve(sites)
        self.hf_kwargs = hf_kwargs
        self._state = _State.NEW
        self._channel = _Channel()
        self._child: greenlet | None = None
        self._in_with = False
        self._site: str | None = None  # the site just yielded (while the loop body runs)
        self._value: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self._output: torch.Tensor | None = None

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> Walker:
        self._in_with = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._in_with = False  # returns None: an exception from the loop body propagates
        if self._state in (_State.RUNNING, _State.LEFT):
            if exc_type is not None:
                self._abort()
            else:
                self._finish()

    # -- the loop ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._state is not _State.NEW:
            raise RuntimeError("a Walker walks one forward pass and can be iterated once; call im.walk(...) again")
        self._start()
        return self._iterate()

    def _iterate(self) -> Iterator[tuple[str, torch.Tensor]]:
        try:
            msg = self._resume(None)  # runs the forward up to the first walked site
            while self._state is _State.RUNNING:
                site, value = msg
                self._site, self._value, self._pending = site, value, None
                yield site, value
                reply, self._site, self._value, self._pending = self._pending, None, None, None
                msg = self._resume(reply)
        except GeneratorExit:  # the loop was left early (break, or an exception in its body)
            if self._state is _State.RUNNING:
                if self._in_with:
                    self._state = _State.LEFT  # __exit__ knows whether it was an exception
                else:
                    self._finish()
            raise
        finally:
            self._site = self._value = None

    def replace(self, value: torch.Tensor) -> None:
        """Continue the forward with ``value`` at the site just yielded (call inside the loop body).

        ``value`` must have the site's shape, dtype and device. Calling ``replace`` twice at one
        site keeps the last value. The replacement is applied when the loop moves on (or finishes).
        """
        if self._site is None or self._value is None:
            raise RuntimeError("Walker.replace() must be called inside the loop body, for the site just yielded")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"replacement for site {self._site!r} must be a Tensor, got {type(value).__name__}")
        cur = self._value
        if value.shape != cur.shape:
            raise ValueError(
                f"replacement for site {self._site!r} has shape {tuple(value.shape)}, expected {tuple(cur.shape)}"
            )
        if value.dtype != cur.dtype or value.device != cur.device:
            raise TypeError(
                f"replacement for site {self._site!r} is {value.dtype} on {value.device}, expected {cur.dtype} on "
                f"{cur.device} (convert it with .to(value))"
            )
        self._pending = value

    @property
    def site(self) -> str | None:
        """The site just yielded (inside the loop body), else ``None``."""
        return self._site

    @property
    def output(self) -> torch.Tensor:
        """The forward's logits ``[batch, pos, vocab]`` (after the loop; finishes an early-left walk)."""
        if self._state is _State.DONE:
            assert self._output is not None
            return self._output
        if self._state is _State.LEFT:
            self._finish()
            assert self._output is not None
            return self._output
        if self._state is _State.RUNNING:
            raise RuntimeError("Walker.output is available after the loop (the forward is still being walked)")
        if self._state is _State.NEW:
            raise RuntimeError("Walker.output: the walk has not run; iterate over the walker first")
        raise RuntimeError(f"Walker.output: the forward did not finish ({self._state.value}); there is no output")

    def close(self) -> None:
        """Abort an unfinished walk (the forward is unwound; no output). A no-op otherwise."""
        if self._state in (_State.RUNNING, _State.LEFT):
            self._abort()

    # -- the forward greenlet ------------------------------------------------------------------------
    def _start(self) -> None:
        im, ids, hf_kwargs, channel = self.im, self.ids, self.hf_kwargs, self._channel
        # Built here, in the caller's context: an enclosing im.intervene(...) run is the parent.
        ctx = im.context(batch=ids.shape[0], pos=ids.shape[1])
        handler = _site_handler(channel)
        for name in self.sites:
            im.add_handler(ctx, name, handler)

        def forward(*_: Any) -> torch.Tensor:  # started by the loop's first switch (its reply is None)
            with activate(ctx):  # in the child's own contextvars context
                return im.forward(ids, **hf_kwargs)

        self._child = greenlet(forward)
        self._state = _State.RUNNING

    def _resume(self, reply: Any) -> Any:
        """Switch into the forward with ``reply``; return the next (site, value) or the output."""
        assert self._child is not None
        self._channel.loop = getcurrent()
        grad = torch.is_grad_enabled()
        try:
            msg = self._child.switch(reply)
        except BaseException:
            self._state = _State.FAILED
            self._child = None
            raise
        finally:
            torch.set_grad_enabled(grad)
        if self._child.dead:
            self._state = _State.DONE
            self._output = msg
            self._child = None
        return msg

    def _finish(self) -> None:
        """Run the rest of the forward without yielding (applying a pending replacement)."""
        self._channel.detached = True
        reply, self._pending = self._pending, None
        self._state = _State.RUNNING
        self._resume(reply)
        if self._state is not _State.DONE:  # cannot happen: a detached handler never switches
            raise RuntimeError("internal error: the walked forward did not finish")

    def _abort(self) -> None:
        child, self._child = self._child, None
        self._state = _State.ABORTED
        self._pending = None
        if child is not None and not child.dead:
            grad = torch.is_grad_enabled()
            try:
                child.throw(GreenletExit)
            finally:
                torch.set_grad_enabled(grad)

    def __repr__(self) -> str:
        return f"Walker({len(self.sites)} sites, ids {tuple(self.ids.shape)}, {self._state.value})"


def _site_handler(channel: _Channel) -> Any:
    """The handler registered at every walked site: hand (site, value) to the loop, take its reply."""

    def handle(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        if channel.detached or channel.loop is None:
            return value
        grad = torch.is_grad_enabled()
        try:
            reply = channel.loop.switch((event.site, value))
        finally:
            torch.set_grad_enabled(grad)
        return value if reply is None else reply

    return handle
