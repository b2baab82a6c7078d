"""The package's import graph has layers: no circle of imports between its parts, lazy imports included.

A part is a subpackage (``engine``, ``layers``, ``models``, ``data``, ``tasks``) or a top-level module
(``registry``, ``paper``, ``profile``, ``bench``, ...). Imports inside functions count as much as those at
the top: a lazy import hides a circle, it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyconv_core"


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of ``package`` -> the modules of the package it imports anywhere in its code."""
    modules = {_module_name(path, package): path for path in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package.name:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    imported.add(submodule if submodule in modules else node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.split(".")[0] == package.name}
        graph[name] = imported - {name}
    return graph


def _part(module: str) -> str:
    """The subpackage or top-level module that ``module`` belongs to (the package's own ``__init__``: itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` (its nodes in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once all it reaches is explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def part_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between parts; the package's ``__init__`` (which imports what it re-exports) is left out,
    since every module's import runs it first anyway."""
    root = PACKAGE.name
    parts: dict[str, set[str]] = {}
    for module, imported in graph.items():
        if module == root:
            continue
        parts.setdefault(_part(module), set()).update(_part(m) for m in imported if m != root)
    return {part: targets - {part} for part, targets in parts.items()}


def test_the_cycle_finder_finds_a_circle_and_accepts_layers():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "low").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low" / "__init__.py").write_text("")
    (package / "low" / "leaf.py").write_text("def f():\n    from pkg.high import g\n    return g\n")
    (package / "high.py").write_text("from pkg.low.leaf import f\n")
    graph = import_graph(package)
    assert graph["pkg.low.leaf"] == {"pkg.high"} and graph["pkg.high"] == {"pkg.low.leaf"}


def test_no_module_of_the_package_imports_itself_back_in_a_circle():
    assert find_cycle(import_graph()) is None


def test_the_packages_parts_form_layers_without_a_circle():
    parts = part_graph(import_graph())
    assert find_cycle(parts) is None, parts


@pytest.mark.parametrize(
    "part, below",
    [
        ("registry", set()),  # a leaf: the models register themselves (timm, torchvision)
        ("engine", set()),  # generic: it trains any model of any task
        ("layers", {"engine"}),
        ("models", {"engine", "layers", "registry"}),
    ],
)
def test_the_lower_layers_import_only_what_lies_below_them(part, below):
    assert part_graph(import_graph()).get(part, set()) <= below
