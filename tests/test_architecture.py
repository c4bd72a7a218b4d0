"""The architecture, checked from the source: import graph, private names, the family boundary, the
study convention.

* No import cycle among the modules of ``mishax_py``, ``instrumentation`` and ``saes`` (imports under
  ``if TYPE_CHECKING:`` are for the type checker only and do not count; imports inside functions do).
* No private name (``_x``) imported from another module, or read as an attribute of an imported
  module, anywhere in the packages, tests, benchmarks or scripts (the tests' own modules included).
* No test imports a test module or a ``conftest``: shared helpers are in ``tests.helpers``.
* No core module names Gemma outside docstrings (the core is ``mishax_py`` minus the application
  layer: ``zoo/`` and ``cli.py``).
* Every study has the signature ``(im, clean_ids, corrupt_ids, metric, *, ...)`` with the common
  keywords in the conventional order.
"""

from __future__ import annotations

import ast
import inspect
import io
import tokenize
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT as ROOT

PACKAGES = ("mishax_py", "instrumentation", "saes")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def suite_modules() -> dict[str, Path]:
    """The test suite's own modules (``tests`` is a package): helpers, conftests, test modules."""
    return {module_name(p): p for p in sorted((ROOT / "tests").rglob("*.py"))}


def resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, target] if target else base)


def imports(path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, ast.ImportFrom | ast.Import, bool]]:
    """``(imported module, node, only_for_type_checking)`` for every import statement of a file."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node, id(node) in type_only
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = resolve_relative(me, path.name == "__init__.py", node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in modules else base), node, id(node) in type_only


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _, type_only in imports(path, modules):
            if not type_only and target in modules and target != name:
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = import_graph()
    planted = {k: set(v) for k, v in graph.items()}
    planted["mishax_py.runtime"].add("mishax_py.instrumented")  # instrumented imports runtime
    assert find_cycle(planted) is not None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(path: Path, modules: dict[str, Path]) -> list[str]:
    """``from m import _x`` of a project module, and ``m._x`` read from an imported project module."""
    found = []
    imported_modules: set[str] = set()  # local names bound to project modules
    seen: set[int] = set()
    for target, node, _ in imports(path, modules):
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, ast.ImportFrom):
            base = target if target in modules and not any(target.endswith("." + a.name) for a in node.names) else (
                target.rsplit(".", 1)[0])
            for alias in node.names:
                if is_private(alias.name) and base.split(".")[0] in (*PACKAGES, "tests"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name} from {base}")
                if f"{base}.{alias.name}" in modules:
                    imported_modules.add(alias.asname or alias.name)
        else:
            for alias in node.names:
                if alias.name.split(".")[0] in (*PACKAGES, "tests"):
                    imported_modules.add(alias.asname or alias.name.split(".")[0])
    for attr in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(attr, ast.Attribute) and is_private(attr.attr):
            root = attr.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in imported_modules:
                found.append(f"{path.relative_to(ROOT)}:{attr.lineno} reads {ast.unparse(attr)}")
    return found


def checked_files() -> list[Path]:
    out = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    for folder in ("tests", "benchmarks", "scripts"):
        out += sorted((ROOT / folder).rglob("*.py"))
    return out


def test_no_private_name_is_imported_across_modules() -> None:
    modules = project_modules() | suite_modules()
    found = [line for path in checked_files() for line in private_imports(path, modules)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_private_name_check_catches_a_planted_import(tmp_path: Path) -> None:
    planted = ROOT / "tests" / "_planted_private_import_check.py"
    planted.write_text("from mishax_py.naming import _LAYER_RE\nimport mishax_py.memory as memory\nmemory._libc\n"
                       "from tests.helpers import _copy\n")
    try:
        found = private_imports(planted, project_modules() | suite_modules())
    finally:
        planted.unlink()
    assert len(found) == 3, found


# -- the test suite's own imports ------------------------------------------------------------------
def imported_test_modules(path: Path, modules: dict[str, Path]) -> list[str]:
    """Imports of a ``test_*`` module or of a ``conftest`` (a fixture module pytest loads itself)."""
    return [f"{path.relative_to(ROOT)}:{node.lineno} imports {target}" for target, node, _ in imports(path, modules)
            if any(part == "conftest" or part.startswith("test_") for part in target.split("."))]


def test_no_test_imports_a_test_module_or_a_conftest() -> None:
    modules = project_modules() | suite_modules()
    found = [line for path in suite_modules().values() for line in imported_test_modules(path, modules)]
    assert not found, "test modules or conftests imported (shared helpers belong in tests.helpers):\n" + "\n".join(
        found)


def test_the_test_import_check_catches_planted_imports() -> None:
    planted = ROOT / "tests" / "_planted_test_import_check.py"
    planted.write_text("from conftest import make_model\nfrom tests.mishax_py.zoo.test_demo import prefix_matching\n"
                       "from tests.mishax_py import test_family\nfrom tests.helpers import make_model\n")
    try:
        found = imported_test_modules(planted, project_modules() | suite_modules())
    finally:
        planted.unlink()
    assert len(found) == 3, found


def code_tokens_outside_docstrings(path: Path) -> Iterator[tokenize.TokenInfo]:
    source = path.read_text()
    tree = ast.parse(source)
    doc_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str):
                doc_lines |= set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.start[0] not in doc_lines:
            yield tok


def core_files() -> list[Path]:
    core = ROOT / "mishax_py"
    return [p for p in sorted(core.rglob("*.py")) if "zoo" not in p.relative_to(core).parts and p.name != "cli.py"]


def test_no_core_module_names_gemma() -> None:
    found = [f"{p.relative_to(ROOT)}:{tok.start[0]}: {tok.string.strip()[:80]}"
             for p in core_files() for tok in code_tokens_outside_docstrings(p) if "gemma" in tok.string.lower()]
    assert not found, "Gemma named in core code or comments:\n" + "\n".join(found)


def test_the_gemma_check_sees_comments_and_code_but_not_docstrings(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text('"""About Gemma 2."""\n\nx = 1  # gemma soft-cap\n\n\n'
                 'def f():\n    """Gemma."""\n    return "Gemma2"\n')
    hits = [tok.start[0] for tok in code_tokens_outside_docstrings(f) if "gemma" in tok.string.lower()]
    assert hits == [3, 8]


# -- the study convention --------------------------------------------------------------------------
CONVENTION = ("site", "by", "direction", "layers", "positions", "interventions", "batch_size", "progress", "method")


def studies() -> list[Callable[..., object]]:
    from mishax_py.circuits import feature_circuit
    from mishax_py.studies import (
        activation_patching,
        attribution_patching,
        attribution_patching_sites,
        check_attribution,
        path_patching,
        path_patching_by_head,
    )

    return [activation_patching, path_patching, path_patching_by_head, attribution_patching,
            attribution_patching_sites, check_attribution, feature_circuit]


@pytest.mark.parametrize("study", studies(), ids=lambda f: f.__name__)
def test_every_study_has_the_signature_convention(study: Callable[..., object]) -> None:
    params = list(inspect.signature(study).parameters.values())
    assert [p.name for p in params[:4]] == ["im", "clean_ids", "corrupt_ids", "metric"]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:4])
    rest = params[4:]
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in rest), [(p.name, p.kind) for p in rest]
    assert rest and rest[-1].kind is rest[-1].VAR_KEYWORD and rest[-1].name == "hf_kwargs"
    names = [p.name for p in rest]
    common = [n for n in names if n in CONVENTION]
    assert common == [n for n in CONVENTION if n in common], f"common keywords out of order: {common}"
    assert "method" in common and "direction" in common or study.__name__ == "check_attribution"
    if "direction" in names:
        assert inspect.signature(study).parameters["direction"].default in ("denoise", "noise")
    if "steps" in names:
        assert inspect.signature(study).parameters["steps"].default == 16
