"""Fail when the code imports a package that pyproject.toml does not declare where it is needed.

Rules (every import is read from the source with :mod:`ast`, not executed):

* ``deeplab_lit/``: an import at module level must be a core dependency (``[project] dependencies``);
  an import inside a function (the package's way of making a library optional) must be core or in an
  extra; ``if TYPE_CHECKING:`` imports are annotations only and are not checked.
* ``tests/``, ``tools/``, ``notebooks/`` and ``hubconf.py``: core or the ``dev`` extra (with the extras it
  names); ``benchmarks/``: also the ``bench`` extra.
* Every core dependency is imported somewhere in ``deeplab_lit/`` (else it belongs in an extra).

Import names are mapped to distributions by the installed metadata
(:func:`importlib.metadata.packages_distributions`), so the check runs where the dev extra is installed.
Usage: ``python -m tools.check_dependencies [ROOT]``; exit status 1 and one line per problem on failure.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib  # Python >= 3.11; CI runs 3.11
from packaging.requirements import Requirement

FIRST_PARTY = {"deeplab_lit", "tests", "benchmarks", "tools", "hubconf"}
#: Core dependencies whose floor .ci/floors installs and tests (the package registry serves them with
#: wheels for this Python; torch/torchvision are pinned by the machine, the rest are not API-sensitive).
TESTED_FLOORS = ("lightning", "torchmetrics", "albumentations", "jsonargparse")


@dataclass(frozen=True)
class Import:
    """One ``import`` statement's top-level module, where it is and whether it runs on import."""

    module: str
    path: Path
    line: int
    top_level: bool  # at module level (runs when the file is imported), not inside a function
    optional: bool  # under ``if TYPE_CHECKING:`` or in ``try: ... except ImportError``


def normalize(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(pyproject: Path) -> dict[str, set[str]]:
    """Return ``{"core": names, extra: names}`` with each extra's own extras expanded."""
    project = tomllib.loads(pyproject.read_text())["project"]
    own = normalize(project["name"])
    groups: dict[str, list[Requirement]] = {"core": [Requirement(r) for r in project.get("dependencies", [])]}
    for extra, requirements in project.get("optional-dependencies", {}).items():
        groups[extra] = [Requirement(r) for r in requirements]

    def expand(group: str, seen: frozenset[str] = frozenset()) -> set[str]:
        names: set[str] = set()
        for requirement in groups[group]:
            if normalize(requirement.name) == own:  # "deeplab-lit[crf,wandb]"
                for extra in requirement.extras - seen:
                    names |= expand(extra, seen | {extra})
            else:
                names.add(normalize(requirement.name))
        return names

    return {group: expand(group) for group in groups}


def _is_optional_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (annotations only) or ``try:`` with an ``except ImportError`` branch."""
    if isinstance(node, ast.If):
        return "TYPE_CHECKING" in ast.unparse(node.test)
    if isinstance(node, ast.Try):
        caught = " ".join(ast.unparse(h.type) for h in node.handlers if h.type is not None)
        return "ImportError" in caught or "ModuleNotFoundError" in caught
    return False


def _imports_in(tree: ast.AST, path: Path) -> Iterator[Import]:
    def visit(node: ast.AST, in_function: bool, optional: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                if isinstance(child, ast.ImportFrom) and (child.level or child.module is None):
                    continue  # relative import: first party
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module]
                for name in names:
                    if name is not None:
                        yield Import(name.split(".")[0], path, child.lineno, not in_function, optional)
                continue
            function = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            guarded = optional or _is_optional_block(child)
            yield from visit(child, function, guarded)

    yield from visit(tree, False, False)


def imports(path: Path) -> Iterator[Import]:
    """Yield the imports of a ``.py`` file or of a notebook's code cells."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        source = "\n".join(
            "".join(line for line in c["source"] if not line.lstrip().startswith(("%", "!")))
            for c in cells
            if c["cell_type"] == "code"
        )
    else:
        source = path.read_text()
    yield from _imports_in(ast.parse(source, str(path)), path)


def problems(root: Path) -> list[str]:
    """Return one line per undeclared import or unused core dependency under ``root`` (empty: all good)."""
    groups = declared(root / "pyproject.toml")
    core = groups["core"]
    anywhere = set().union(*groups.values())
    dev = core | groups.get("dev", set())
    installed = packages_distributions()
    distributions = {module: {normalize(d) for d in dists} for module, dists in installed.items()}
    stdlib = set(sys.stdlib_module_names)
    found: list[str] = []
    used_by_package: set[str] = set()

    def check(item: Import, allowed: set[str], where: str) -> None:
        if item.module in stdlib or item.module in FIRST_PARTY or item.optional:
            return
        # not installed (e.g. the bench extra here): the distribution named like the module, if declared
        candidates = distributions.get(item.module) or {normalize(item.module)} & allowed
        if not candidates:
            found.append(f"{item.path}:{item.line}: imports {item.module!r}, which no package here provides")
        elif not candidates & allowed:
            found.append(
                f"{item.path}:{item.line}: imports {item.module!r} (distribution "
                f"{'/'.join(sorted(candidates))}) but pyproject.toml does not declare it {where}"
            )
        if item.path.is_relative_to(root / "deeplab_lit"):
            used_by_package.update(candidates or ())

    for path in sorted((root / "deeplab_lit").rglob("*.py")):
        for item in imports(path):
            if item.top_level:
                check(item, core, "in [project] dependencies (imported at module level)")
            else:
                check(item, anywhere, "in the dependencies or an extra")
    bench = dev | groups.get("bench", set())
    others = [*root.glob("tests/**/*.py"), *root.glob("tools/**/*.py"), *root.glob("notebooks/*.ipynb")]
    others += [root / "hubconf.py"] if (root / "hubconf.py").is_file() else []
    for path in sorted(others):
        for item in imports(path):
            check(item, dev, "in the dependencies or the dev extra")
    for path in sorted(root.glob("benchmarks/**/*.py")):
        for item in imports(path):
            check(item, bench, "in the dependencies or the dev/bench extras")
    for name in sorted(core - used_by_package):
        found.append(f"pyproject.toml: core dependency {name!r} is unused by deeplab_lit/: use an extra")
    return found


def floors(pyproject: Path) -> list[str]:
    """Return ``name[extras]==floor`` of the :data:`TESTED_FLOORS` core dependencies (their ``>=`` bound)."""
    pins = []
    for text in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        requirement = Requirement(text)
        if normalize(requirement.name) in TESTED_FLOORS:
            (low,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
            extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
            pins.append(f"{requirement.name}{extras}=={low}")
    return pins


def main(argv: list[str] | None = None) -> int:
    """Print the problems under ROOT (default: the current folder); 1 if there are any.

    ``--floors`` prints the pins that install the tested floors instead, one per line.
    """
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--floors"]:
        print("\n".join(floors(Path(args[1] if len(args) > 1 else ".") / "pyproject.toml")))
        return 0
    root = Path(args[0] if args else ".").resolve()
    found = problems(root)
    for line in found:
        print(line)
    print(f"check_dependencies: {len(found)} problem(s) in {root}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
