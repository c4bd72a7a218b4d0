"""What every transformers family module shares: one patcher under one lock, the version warning,
the switch to eager attention and the ``instrument()`` wrapper.

A family module (``instrumentation/gemma2.py``, ``instrumentation/gemma3.py``) builds one
:class:`SourcePatches` at import (so two threads can never build two patchers of the same functions)
and delegates ``install``/``uninstall``/``installed`` to it; its ``instrument()`` checks the model's
class and calls :func:`instrument_with`.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import transformers

from mishax_py.ast_patcher import ModuleASTPatcher, Replace
from mishax_py.instrumented import InstrumentedModel
from mishax_py.runtime import begin_forward, skip_layer, tag

__all__ = ["SourcePatches", "instrument_with", "use_eager_attention"]

# Where an instrumented model keeps its wrapper (instrument() is idempotent per model).
WRAPPER_ATTR = "_mishax_py_instrumented"


class SourcePatches:
    """The source patches of one transformers modelling module, installed and removed atomically.

    Args:
        module: the modelling module (e.g. ``transformers.models.gemma3.modeling_gemma3``).
        patches: ``{"Class.method": [Replace(old, new), ...]}``.
        label: the family's name in messages (``"Gemma 3"``).
        family_module: the instrumentation module's dotted name, named by errors (``install()``).
        verified: the transformers versions the patches are verified against; another version warns
            once per process (the patches applied, but the suite should be run).

    ``install()`` and ``uninstall()`` are idempotent and serialised by one re-entrant lock (the
    version warning included); the original code objects are recorded once, by the patcher.
    """

    def __init__(self, module: ModuleType, patches: dict[str, list[Replace]], *, label: str, family_module: str,
                 verified: tuple[str, ...]) -> None:
        self.patcher = ModuleASTPatcher(
            module, patches, extra_globals={"tag": tag, "begin_forward": begin_forward, "skip_layer": skip_layer},
        )
        self.label = label
        self.family_module = family_module
        self.verified = verified
        self.lock = threading.RLock()
        self.warned = False

    def install(self, stacklevel: int = 3) -> None:
        """Patch the module (idempotent, thread-safe); existing model instances are covered too."""
        with self.lock:
            if transformers.__version__ not in self.verified and not self.warned:
                warnings.warn(
                    f"mishax-py's {self.label} patches are verified against transformers {', '.join(self.verified)}; "
                    f"found {transformers.__version__}. They applied, but run the test suite to be sure.",
                    stacklevel=stacklevel,
                )
                self.warned = True
            self.patcher.install()

    def uninstall(self) -> None:
        """Restore the original code objects exactly (idempotent, thread-safe)."""
        with self.lock:
            self.patcher.uninstall()

    @property
    def installed(self) -> bool:
        """Whether the module is patched now."""
        return self.patcher.installed

    def ensure_installed(self) -> None:
        """Raise unless the patches are in place: after ``uninstall()`` runs are refused, never re-patched silently."""
        if not self.patcher.installed:
            raise RuntimeError(
                f"transformers' {self.label} code is not instrumented (uninstall() was called); call "
                f"{self.family_module}.install() or instrument(model) again"
            )


def use_eager_attention(model: Any, switch_to_eager: bool, why: str = "") -> None:
    """Switch ``model`` to eager attention (warning), or raise when ``switch_to_eager`` is False.

    ``attn.scores`` and ``attn.pattern`` exist only in transformers' eager attention function.
    ``why``: a family-specific reason appended to the warning.
    """
    impl = model.config._attn_implementation
    if impl == "eager":
        return
    if not switch_to_eager:
        raise ValueError(
            f"the model uses attn_implementation={impl!r}; the sites attn.scores and attn.pattern exist only "
            "under eager attention. Load with attn_implementation='eager' or pass switch_to_eager=True."
        )
    warnings.warn(
        f"switching the model from attn_implementation={impl!r} to 'eager' so that attention scores and "
        f"patterns are observable{why}.",
        stacklevel=4,
    )
    model.set_attn_implementation("eager")


def instrument_with(model: Any, patches: SourcePatches, make: Callable[[], InstrumentedModel], *,
                    tokenizer: Any, switch_to_eager: bool, eager_why: str = "") -> InstrumentedModel:
    """The body of a family's ``instrument()``, after its class check; idempotent per model.

    An already instrumented model gets its wrapper back (patches re-installed, ``tokenizer`` set when
    given); otherwise the model is switched to eager attention, the patches installed and
    ``make()`` (which builds the :class:`InstrumentedModel`) stored on the model.
    """
    existing = model.__dict__.get(WRAPPER_ATTR)
    if isinstance(existing, InstrumentedModel):
        patches.install(stacklevel=4)
        if tokenizer is not None:
            existing.tokenizer = tokenizer
        return existing
    use_eager_attention(model, switch_to_eager, eager_why)
    patches.install(stacklevel=4)
    im = make()
    model.__dict__[WRAPPER_ATTR] = im
    return im
