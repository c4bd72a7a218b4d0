"""The AST patcher on a toy module written by the test."""

from __future__ import annotations

import importlib.util
import sys
import traceback
import types
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


@pytest.fixture
def toy(tmp_path: Path) -> types.ModuleType:
    path = tmp_path / "toy_module_for_patching.py"
    path.write_text(TOY_SOURCE)
    spec = importlib.util.spec_from_file_location("toy_module_for_patching", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


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
    assert not hasattr(toy, "EXTRA")
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
