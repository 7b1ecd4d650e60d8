"""The command line's modules import no module that imports them back, at module or at function level.

A function-level import counts: it defers an import, it does not remove the dependency (the house rule
allows one only to defer a heavy third-party package). ``command`` imports ``cli`` inside ``main`` to defer
Lightning; ``cli`` must not import ``command``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "deeplab_lit"
WATCHED = ("deeplab_lit.cli", "deeplab_lit.command")


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """The dotted names an import statement of ``tree`` names, ``if TYPE_CHECKING:`` blocks left out."""
    names: set[str] = set()
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*package, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        todo.extend(ast.iter_child_nodes(node))
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, with the packages above them that run on the way.

    ``import a.b.c`` runs ``a/b/__init__.py`` first: an edge to ``a.b`` too, unless the importer lies in
    ``a.b`` (which is already running then). The package root imports nothing of its own at import.
    """
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = {t for t in _imported(tree, name, path.name == "__init__.py") if t in modules}
        for target in list(targets):
            parts = target.split(".")
            for end in range(2, len(parts)):
                parent = ".".join(parts[:end])
                if not (name == parent or name.startswith(parent + ".")):
                    targets.add(parent)
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_passes_through_the_command_line():
    graph = import_graph()
    assert "deeplab_lit.cli" in graph["deeplab_lit.command"]  # the graph sees function-level imports
    through = [c for c in cycles(graph) if any(m.startswith(WATCHED) for m in c)]
    assert through == []


def test_the_graph_has_the_packages_that_run_on_the_way_and_finds_a_planted_cycle():
    graph = import_graph()
    lightning_cli = graph["deeplab_lit.cli.lightning_cli"]
    assert "deeplab_lit.callbacks.guards" in lightning_cli and "deeplab_lit.callbacks" in lightning_cli
    assert "deeplab_lit.cli" not in lightning_cli  # its own package is already running
    lightning_cli.add("deeplab_lit.command")  # the cycle this package once had: cli took PROG from command
    assert ["deeplab_lit.cli", "deeplab_lit.cli.lightning_cli", "deeplab_lit.command"] in cycles(graph)
