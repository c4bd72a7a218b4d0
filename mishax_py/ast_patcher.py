"""Source-level patches of functions and methods in an imported module.

A patch rewrites the source of a function (``"Class.method"`` or ``"function"``) by
replacing snippets of code, recompiles it from a real file on disk (so tracebacks
and debuggers show the patched code), and swaps the new code object into the
original function object. Swapping ``__code__`` rather than the attribute keeps
decorators, registries that hold the function, and model instances created before
``install()`` pointing at the same (now patched) function.

Matching is on the AST: both the target's source and each snippet are parsed and
unparsed (``ast.unparse``), so formatting, comments and quote style do not matter.
Each replacement must match exactly ``count`` times (default once); otherwise
:class:`PatchError` shows the snippet and the normalised source it was looked for in.

Example::

    patcher = ModuleASTPatcher(
        my_module,
        {"MLP.forward": [Replace("self.act(h)", "tag(self, 'post', self.act(h))")]},
        extra_globals={"tag": tag},
    )
    with patcher:
        ...  # MLP.forward now calls tag(...)

Threads: ``install()`` and ``uninstall()`` are atomic and idempotent under any interleaving of
threads (one lock, shared by every patcher: they swap code objects of shared modules). The original
code objects are recorded once, at the first install, from unpatched functions only (a function
whose code another patcher compiled is refused with :class:`PatchError`), and kept: every later
install swaps the same patched code objects in again. A frame already running patched code when
another thread uninstalls finishes that code, so the names the patched code calls
(``extra_globals``) stay in the module's namespace after ``uninstall()``; they are the patcher's own,
inert objects (``tag`` returns its value when no run is active).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import linecache
import os
import re
import tempfile
import textwrap
import threading
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ModuleASTPatcher", "PatchError", "Replace", "normalize_source"]


class PatchError(Exception):
    """A patch could not be applied: a snippet did not match, or the target is missing."""


@dataclass(frozen=True)
class Replace:
    """Replace ``old`` by ``new`` in a target's source.

    ``old``/``new`` are Python expressions or statements (one or several lines);
    they are normalised with ``ast.unparse`` before matching. ``count`` is how many
    times ``old`` must occur (``None``: at least once, all replaced).
    """

    old: str
    new: str
    count: int | None = 1


def normalize_source(source: str) -> str:
    """Parse and unparse ``source``: formatting-, comment- and quote-insensitive text."""
    return ast.unparse(ast.parse(textwrap.dedent(source)))


def _innermost(fn: Any) -> types.FunctionType:
    """The function at the bottom of a ``functools.wraps`` chain (what decorators call)."""
    seen = set()
    while hasattr(fn, "__wrapped__") and id(fn) not in seen:
        seen.add(id(fn))
        fn = fn.__wrapped__
    if isinstance(fn, (staticmethod, classmethod)):
        fn = fn.__func__
    if not isinstance(fn, types.FunctionType):
        raise PatchError(f"target is not a Python function: {fn!r}")
    return fn


def _apply_replace(source: str, rep: Replace, target: str) -> str:
    """Apply one replacement to normalised ``source``; raise PatchError unless it matches as asked."""
    try:
        old = normalize_source(rep.old)
        new = normalize_source(rep.new)
    except SyntaxError as e:
        raise PatchError(f"patch snippet for {target} is not valid Python: {e}") from e
    old_lines = old.splitlines()
    new_lines = new.splitlines()
    if len(old_lines) == 1:
        # Single line: a substring, bounded so that `x` does not match inside `xy`.
        left = r"(?<![\w.])" if re.match(r"\w", old) else ""
        right = r"(?!\w)" if re.search(r"\w$", old) else ""
        pattern = re.compile(left + re.escape(old) + right)
        matches = list(pattern.finditer(source))
        _check_count(len(matches), rep, target, old, source)
        if len(new_lines) == 1:
            return pattern.sub(lambda _: new, source)
        # A one-line statement replaced by several: keep the matched line's indentation.
        out_lines: list[str] = []
        for line in source.splitlines():
            if pattern.search(line) and line.strip() == old:
                indent = line[: len(line) - len(line.lstrip())]
                out_lines.extend(indent + n for n in new_lines)
            else:
                out_lines.append(line)
        result = "\n".join(out_lines)
        if result == source:
            raise PatchError(
                f"patch for {target}: multi-line replacement needs `old` to be a whole statement\n"
                f"--- snippet ---\n{old}"
            )
        return result
    # Several lines: match whole lines at any one indentation.
    lines = source.splitlines()
    hits: list[tuple[int, str]] = []
    for i in range(len(lines) - len(old_lines) + 1):
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        if all(lines[i + j] == indent + ol for j, ol in enumerate(old_lines)):
            hits.append((i, indent))
    _check_count(len(hits), rep, target, old, source)
    for i, indent in reversed(hits):
        lines[i : i + len(old_lines)] = [indent + nl for nl in new_lines]
    return "\n".join(lines)


def _check_count(found: int, rep: Replace, target: str, old: str, source: str) -> None:
    ok = found >= 1 if rep.count is None else found == rep.count
    if not ok:
        expected = "at least once" if rep.count is None else f"exactly {rep.count} time(s)"
        raise PatchError(
            f"patch for {target}: snippet expected {expected}, found {found} time(s).\n"
            f"--- snippet (normalised) ---\n{old}\n"
            f"--- source of {target} (normalised) ---\n{source}"
        )


class ModuleASTPatcher:
    """Patches for functions of one module; ``install()``/``uninstall()`` or use as a context manager.

    Args:
        module: the imported module whose functions are patched.
        patches: ``{"Class.method" or "function": [Replace(...), ...]}``.
        extra_globals: names the patched code uses (e.g. ``tag``), added to the module's
            namespace at the first install and left there (see the module docstring: frames
            still running patched code look them up after ``uninstall()``). A module that
            already binds one of these names to another object is refused (``PatchError``).

    Installing twice is a no-op; ``uninstall()`` restores the original code objects
    exactly. All patches are built (and validated) before any is swapped in, so a
    failing patch leaves the module untouched. Thread-safe (see the module docstring).
    """

    def __init__(
        self,
        module: types.ModuleType,
        patches: Mapping[str, Sequence[Replace]],
        extra_globals: Mapping[str, Any] | None = None,
    ) -> None:
        self.module = module
        self.patches = dict(patches)
        self.extra_globals = dict(extra_globals or {})
        # target -> (function, its original code, its patched code): built once, under _LOCK
        self._built: dict[str, tuple[types.FunctionType, types.CodeType, types.CodeType]] = {}
        self.installed = False

    # -- building -------------------------------------------------------------------
    def _resolve(self, target: str) -> types.FunctionType:
        obj: Any = self.module
        for part in target.split("."):
            holder = obj
            try:
                obj = inspect.getattr_static(holder, part)
            except AttributeError:
                raise PatchError(f"{self.module.__name__} has no {target!r} (missing {part!r})") from None
        return _innermost(obj)

    def patched_source(self, target: str) -> str:
        """The patched source of ``target`` (normalised), without installing anything."""
        fn = self._resolve(target)
        return self._patch_source(target, fn, self._original_code(target, fn))

    def _patch_source(self, target: str, fn: types.FunctionType, code: types.CodeType) -> str:
        source = self._source_of(fn, code, target)
        for rep in self.patches[target]:
            source = _apply_replace(source, rep, target)
        return source

    def _original_code(self, target: str, fn: types.FunctionType) -> types.CodeType:
        """``fn``'s unpatched code: the one recorded at the first install, else its current code if unpatched."""
        built = self._built.get(target)
        if built is not None and built[0] is fn:
            return built[1]
        code = fn.__code__
        if _is_patched(code):
            raise PatchError(
                f"{self.module.__name__}.{target} is already patched (its code was compiled from {code.co_filename}) "
                "by another ModuleASTPatcher: uninstall that one first; its code must not be recorded as the original"
            )
        return code

    def _source_of(self, fn: types.FunctionType, code: types.CodeType, target: str) -> str:
        try:
            lines, _ = inspect.findsource(code)
            block = inspect.getblock(lines[code.co_firstlineno - 1 :])
            raw = "".join(block)
        except (OSError, TypeError) as e:
            raise PatchError(f"cannot read the source of {target}: {e}") from e
        tree = ast.parse(textwrap.dedent(raw))
        func = tree.body[0]
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            raise PatchError(f"source of {target} is not a function definition")
        func.decorator_list = []  # decorators stay applied to the original object
        return ast.unparse(func)

    def _compile(self, target: str, fn: types.FunctionType, source: str) -> types.CodeType:
        freevars = fn.__code__.co_freevars
        # Compile inside a factory that declares the original's free variables, so the
        # new code object closes over the same names (e.g. `__class__` for super()).
        body = textwrap.indent(source, "    ")
        header = f"def __mishax_factory__({', '.join(freevars)}):\n" if freevars else ""
        text = (header + body + f"\n    return {fn.__code__.co_name}\n") if freevars else source + "\n"
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        path = os.path.join(_patched_dir(), f"{self.module.__name__}.{target}.{digest}.py")
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write(text)
        linecache.cache[path] = (len(text), None, text.splitlines(True), path)
        module_code = compile(text, path, "exec")
        outer = next(c for c in module_code.co_consts if isinstance(c, types.CodeType))
        new_code = (
            next(c for c in outer.co_consts if isinstance(c, types.CodeType) and c.co_name == fn.__code__.co_name)
            if freevars
            else outer
        )
        if new_code.co_freevars != freevars:
            raise PatchError(
                f"patched {target} closes over {new_code.co_freevars}, the original over {freevars}; "
                "a patch must not add or remove references to enclosing variables"
            )
        return new_code.replace(co_name=fn.__code__.co_name, co_qualname=fn.__code__.co_qualname)

    # -- installing -----------------------------------------------------------------
    def install(self) -> None:
        """Swap the patched code in (no-op if already installed). Atomic: see the module docstring."""
        with _LOCK:
            if self.installed:
                return
            fns = {target: self._resolve(target) for target in self.patches}
            built = dict(self._built)
            for target, fn in fns.items():
                if target in built and built[target][0] is fn:
                    if fn.__code__ is not built[target][1]:
                        raise PatchError(
                            f"{self.module.__name__}.{target}'s code was replaced by someone else since this patcher "
                            f"recorded its original (now from {fn.__code__.co_filename}); not patching over it"
                        )
                    continue
                original = self._original_code(target, fn)  # unpatched, or PatchError
                built[target] = (fn, original, self._compile(target, fn, self._patch_source(target, fn, original)))
            for name, value in self.extra_globals.items():
                present = self.module.__dict__.get(name, value)
                if present is not value:
                    raise PatchError(
                        f"{self.module.__name__} already defines {name!r} ({present!r}); the patched code would call "
                        f"it instead of {value!r}"
                    )
            # everything is validated: nothing below can fail
            self._built = built
            for name, value in self.extra_globals.items():
                self.module.__dict__[name] = value
            for fn, _, patched in built.values():
                fn.__code__ = patched
            self.installed = True

    def uninstall(self) -> None:
        """Restore the original code objects (no-op if not installed). The added globals stay: see the module
        docstring."""
        with _LOCK:
            if not self.installed:
                return
            for fn, original, _ in self._built.values():
                fn.__code__ = original
            self.installed = False

    def __enter__(self) -> ModuleASTPatcher:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


# One lock for every patcher's install/uninstall (re-entrant: a family's install() holds it around its own).
_LOCK = threading.RLock()

_PATCHED_DIR: str | None = None


def _patched_dir() -> str:
    """A per-process folder holding the patched sources (real files, for tracebacks)."""
    global _PATCHED_DIR
    with _LOCK:
        if _PATCHED_DIR is None:
            _PATCHED_DIR = tempfile.mkdtemp(prefix="mishax_py_patched_")
        return _PATCHED_DIR


def _is_patched(code: types.CodeType) -> bool:
    """Whether ``code`` was compiled by a patcher of this process (its file is in the patched-sources folder)."""
    return _PATCHED_DIR is not None and os.path.dirname(code.co_filename) == _PATCHED_DIR
