"""The house's layering, read from the code's own imports (ARCHITECTURE: the rules).

Every ``import``/``from ... import`` of package code is read with :mod:`ast`, at module level and inside
functions (imports under ``if TYPE_CHECKING:`` never run and are left out).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import deeplab_lit

PACKAGE = Path(deeplab_lit.__file__).parent
#: Modules that may import package code inside a function: to defer Lightning (the front door stays
#: light, ``deeplab-lit --version`` in milliseconds; ``import deeplab_lit`` without Lightning).
DEFERRING = {"deeplab_lit", "deeplab_lit.command"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _target(name: str, imported: str | None) -> str:
    """The package module an import loads: ``from a.b import c`` is ``a.b.c`` where that is a module."""
    if imported is not None and f"{name}.{imported}" in MODULES:
        return f"{name}.{imported}"
    return name


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name | ast.Attribute) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported package module, whether inside a function) for every import ``module`` runs."""
    return imports_in(MODULES[module].read_text())


def imports_in(source: str) -> list[tuple[str, bool]]:
    """(imported package module, whether inside a function) for every import ``source`` runs."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((alias.name, inner) for alias in child.names if alias.name in MODULES)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module in MODULES:
                found.extend((_target(child.module, alias.name), inner) for alias in child.names)
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, with the packages that run on the way.

    ``import a.b.c`` runs ``a/b/__init__.py`` first: an edge to ``a.b`` too, unless the importer lies in
    ``a.b`` (whose ``__init__`` is already running then).
    """
    graph = {}
    for module in MODULES:
        targets = {target for target, _ in imports(module)}
        for target in list(targets):
            parts = target.split(".")
            for end in range(2, len(parts)):
                parent = ".".join(parts[:end])
                if not (module == parent or module.startswith(parent + ".")):
                    targets.add(parent)
        graph[module] = targets - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    return components


def test_the_reader_sees_imports_at_both_levels_and_skips_type_checking_ones():
    source = (
        "from typing import TYPE_CHECKING\n"
        "import deeplab_lit.metrics\n"
        "from deeplab_lit.weights import registry\n"
        "if TYPE_CHECKING:\n    from deeplab_lit.models import deeplab\n"
        "def f():\n    from deeplab_lit.crf.params import CRFParams\n"
    )
    assert imports_in(source) == [
        ("deeplab_lit.metrics", False),
        ("deeplab_lit.weights.registry", False),
        ("deeplab_lit.crf.params", True),
    ]


def test_the_import_graph_has_no_circles():
    graph = _graph()
    assert "deeplab_lit.cli" in graph["deeplab_lit.command"]  # the graph sees function-level imports
    assert "deeplab_lit.callbacks" in graph["deeplab_lit.cli.lightning_cli"]  # and packages on the way
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("room", ["deeplab_lit.models", "deeplab_lit.crf"])
def test_the_pure_rooms_import_only_themselves(room):
    """models/ and crf/ never import weights/, Lightning layers, data or callbacks: they read no file."""
    upward = {
        module: sorted(target for target, _ in imports(module) if not target.startswith(room))
        for module in MODULES
        if module.startswith(room)
    }
    assert {module: targets for module, targets in upward.items() if targets} == {}


def test_package_code_is_imported_inside_a_function_only_to_defer_lightning():
    inside = {
        module: sorted(target for target, in_function in imports(module) if in_function)
        for module in MODULES
        if module not in DEFERRING
    }
    assert {module: targets for module, targets in inside.items() if targets} == {}
