"""The AST patcher on a toy module written by the test."""

from __future__ import annotations

import importlib.util
import random
import sys
import threading
import traceback
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from mishax_py.ast_patcher import ModuleASTPatcher, PatchError, Replace, normalize_source

TOY_SOURCE = '''
import functools


def double(x):
    # a comment the matcher must ignore
    y = x * 2
    return y


def deco(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


class Base:
    def value(self):
        return 1


class Child(Base):
    @deco
    def value(self):
        base = super().value()
        return base + 10

    def steps(self, x):
        x = x + 1
        x = x + 1
        return x

    def explode(self):
        raise RuntimeError("boom")
'''


def _load_toy(folder: Path, name: str = "toy_module_for_patching") -> types.ModuleType:
    """A freshly imported copy of TOY_SOURCE (nothing patched yet), registered in ``sys.modules``."""
    path = folder / f"{name}.py"
    path.write_text(TOY_SOURCE)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def toy(tmp_path: Path) -> Iterator[types.ModuleType]:
    module = _load_toy(tmp_path)
    yield module
    sys.modules.pop(module.__name__, None)


def test_match_ignores_formatting_and_comments(toy: types.ModuleType) -> None:
    # Different spacing and quotes than the source; the comment in the source is ignored.
    p = ModuleASTPatcher(toy, {"double": [Replace("y  =  x*2", "y = x * 3")]})
    with p:
        assert toy.double(5) == 15
    assert toy.double(5) == 10


def test_uninstall_restores_exact_code_objects_and_install_is_idempotent(toy: types.ModuleType) -> None:
    original_code = toy.double.__code__
    original_fn = toy.double
    p = ModuleASTPatcher(toy, {"double": [Replace("x * 2", "x * 4")]}, extra_globals={"EXTRA": 1})
    p.install()
    p.install()  # no-op
    assert toy.double(1) == 4 and toy.EXTRA == 1
    assert toy.double is original_fn  # same function object, new code
    p.uninstall()
    assert toy.double.__code__ is original_code
    # the added global stays (inert): a frame still running patched code may look it up after uninstall()
    assert toy.EXTRA == 1
    p.uninstall()  # no-op
    assert toy.double(1) == 2


def test_decorated_method_with_super_closure(toy: types.ModuleType) -> None:
    # `super()` needs the `__class__` cell; the decorator must stay applied.
    obj = toy.Child()  # created before install: must see the patch
    p = ModuleASTPatcher(toy, {"Child.value": [Replace("base + 10", "base + 100")]})
    with p:
        assert obj.value() == 101
        assert toy.Child().value() == 101
    assert obj.value() == 11


def test_multiline_snippet_and_count(toy: types.ModuleType) -> None:
    with pytest.raises(PatchError) as err:
        ModuleASTPatcher(toy, {"Child.steps": [Replace("x = x + 1", "x = x + 5")]}).install()
    msg = str(err.value)
    assert "Child.steps" in msg and "exactly 1" in msg and "found 2" in msg
    assert "x = x + 1" in msg and "return x" in msg  # shows the snippet and the target's source
    p = ModuleASTPatcher(toy, {"Child.steps": [Replace("x = x + 1", "x = x + 5", count=2)]})
    with p:
        assert toy.Child().steps(0) == 10
    p2 = ModuleASTPatcher(toy, {"Child.steps": [Replace("x = x + 1\nx = x + 1\nreturn x", "return x - 7")]})
    with p2:
        assert toy.Child().steps(0) == -7


def test_one_statement_to_several(toy: types.ModuleType) -> None:
    p = ModuleASTPatcher(toy, {"double": [Replace("y = x * 2", "y = x * 2\ny = y + 1")]})
    with p:
        assert toy.double(3) == 7


def test_no_match_names_target_and_snippet_and_leaves_module_untouched(toy: types.ModuleType) -> None:
    before = toy.double.__code__
    p = ModuleASTPatcher(
        toy,
        {"double": [Replace("x * 2", "x * 9")], "Child.steps": [Replace("x = x + 2", "x = 0")]},
    )
    with pytest.raises(PatchError) as err:
        p.install()
    assert "Child.steps" in str(err.value) and "x = x + 2" in str(err.value)
    assert toy.double.__code__ is before and not p.installed


def test_identifier_boundaries(toy: types.ModuleType) -> None:
    # `x` must not match inside another identifier; "y" occurs as a whole name twice.
    with pytest.raises(PatchError, match="found 2"):
        ModuleASTPatcher(toy, {"double": [Replace("y", "z")]}).install()


def test_missing_target_and_bad_snippet(toy: types.ModuleType) -> None:
    with pytest.raises(PatchError, match="no 'Child.nope'"):
        ModuleASTPatcher(toy, {"Child.nope": [Replace("a", "b")]}).install()
    with pytest.raises(PatchError, match="not valid Python"):
        ModuleASTPatcher(toy, {"double": [Replace("y = = 2", "b")]}).install()


def test_patched_code_lives_in_a_real_file_for_tracebacks(toy: types.ModuleType) -> None:
    p = ModuleASTPatcher(toy, {"Child.explode": [Replace("RuntimeError('boom')", "RuntimeError('patched boom')")]})
    with p:
        with pytest.raises(RuntimeError) as err:
            toy.Child().explode()
        frames = traceback.extract_tb(err.value.__traceback__)
        last = frames[-1]
        assert Path(last.filename).is_file()
        assert "patched boom" in Path(last.filename).read_text()
        assert last.line is not None and "patched boom" in last.line


def test_normalize_source() -> None:
    assert normalize_source("a  =  f( 1,2 )  # c") == normalize_source("a = f(1, 2)")


# -- threads ---------------------------------------------------------------------------------------
def _churn(patcher: ModuleASTPatcher, n_threads: int, calls: int, seed: int) -> list[BaseException]:
    """``n_threads`` threads, released together, each calling install/uninstall ``calls`` times in random order."""
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        try:
            barrier.wait(timeout=30)
            for _ in range(calls):
                patcher.install() if rng.random() < 0.5 else patcher.uninstall()
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_install_and_uninstall_record_the_originals_once(tmp_path: Path) -> None:
    """8 threads installing and uninstalling at once, 20 times on a freshly imported module each: the
    originals are recorded from the unpatched functions only, so ``uninstall()`` restores them exactly and
    ``install()`` works again (before the lock, a second thread recorded already-patched code as original)."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: widens every race window
    try:
        for round_ in range(20):
            toy = _load_toy(tmp_path, f"toy_module_for_threads_{round_}")
            originals = {name: fn.__code__ for name, fn in (("double", toy.double), ("steps", toy.Child.steps))}
            p = ModuleASTPatcher(toy, {"double": [Replace("x * 2", "x * 4")],
                                       "Child.steps": [Replace("x = x + 1", "x = x + 5", count=2)]},
                                 extra_globals={"EXTRA": 1})
            errors = _churn(p, n_threads=8, calls=30, seed=round_)
            assert not errors, errors
            p.uninstall()
            assert toy.double.__code__ is originals["double"] and toy.Child.steps.__code__ is originals["steps"]
            assert toy.double(1) == 2 and toy.Child().steps(0) == 2
            with p:
                assert toy.double(1) == 4 and toy.Child().steps(0) == 10
            assert toy.double.__code__ is originals["double"] and toy.Child.steps.__code__ is originals["steps"]
            sys.modules.pop(toy.__name__, None)
    finally:
        sys.setswitchinterval(switch)


def test_uninstall_while_patched_code_runs_keeps_the_names_it_calls(toy: types.ModuleType) -> None:
    """A frame already running patched code finishes it after another thread's ``uninstall()``: the
    injected globals it looks up later (here ``helper``, after waiting in ``gate``) are still there."""
    inside, release = threading.Event(), threading.Event()

    def gate() -> None:
        inside.set()
        assert release.wait(timeout=30)

    p = ModuleASTPatcher(toy, {"double": [Replace("y = x * 2", "gate()\ny = helper(x) * 2")]},
                         extra_globals={"gate": gate, "helper": lambda x: x + 1})
    p.install()
    results: list[object] = []

    def call() -> None:
        try:
            results.append(toy.double(3))
        except BaseException as e:  # noqa: BLE001 - checked below
            results.append(e)

    thread = threading.Thread(target=call)
    thread.start()
    assert inside.wait(timeout=30)
    p.uninstall()  # the other thread is inside the patched double(), before `helper` is looked up
    release.set()
    thread.join()
    assert results == [8]  # the patched code ran to its end
    assert toy.double(3) == 6  # new calls run the original


def test_a_module_name_that_differs_from_an_injected_global_is_refused(toy: types.ModuleType) -> None:
    """The patched code would call the module's own object instead of ours: refused, naming the name."""
    toy.EXTRA = "the module's own"
    before = toy.double.__code__
    p = ModuleASTPatcher(toy, {"double": [Replace("x * 2", "x * EXTRA")]}, extra_globals={"EXTRA": 4})
    with pytest.raises(PatchError, match="EXTRA"):
        p.install()
    assert toy.double.__code__ is before and not p.installed and toy.EXTRA == "the module's own"


def test_a_second_patcher_never_records_patched_code_as_original(toy: types.ModuleType) -> None:
    """Another patcher of the same function while the first is installed: refused, so uninstalling
    the first still restores the original exactly."""
    original = toy.double.__code__
    first = ModuleASTPatcher(toy, {"double": [Replace("x * 2", "x * 4")]})
    second = ModuleASTPatcher(toy, {"double": [Replace("x * 4", "x * 8")]})
    first.install()
    with pytest.raises(PatchError, match="double.*already patched"):
        second.install()
    first.uninstall()
    assert toy.double.__code__ is original and not second.installed
