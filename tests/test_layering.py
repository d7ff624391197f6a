"""The packages import each other in one direction only (ARCHITECTURE.md, "Layers").

The graph is read from the source (every `import scaleforge.x` and `from scaleforge.x import`,
those inside functions and under TYPE_CHECKING included), so a cycle fails here even when no
test happens to import both ends.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Each top-level folder with an __init__.py is the package scaleforge.<folder> (pyproject.toml).
PACKAGES = sorted(
    path.parent.name for path in REPO.glob("*/__init__.py") if path.parent.name != "tests"
)
# What each layer may import, bottom to top (launch/ and bench/, the top, may import all).
# torch_compat (torch's private names, a leaf like errors) may be imported by every layer.
ALLOWED = {
    "errors": set(),
    "torch_compat": set(),
    "csrc": {"errors", "torch_compat"},
    "models": {"errors", "torch_compat", "csrc"},
    "parallel": {"errors", "torch_compat", "csrc", "models"},
    "data_pipeline": {"errors", "torch_compat"},
    "core": {"errors", "torch_compat", "csrc", "models", "parallel", "data_pipeline"},
    "scaling": {"errors", "torch_compat", "csrc", "models", "parallel", "data_pipeline", "core"},
    "planner": {"errors", "torch_compat", "csrc", "models", "parallel", "data_pipeline", "core"},
}


def imported_packages(source: Path) -> Iterator[tuple[str, int]]:
    """(scaleforge package, line) for each import of our own code in `source`."""
    tree = ast.parse(source.read_text(), filename=str(source))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "scaleforge":
                names = [f"scaleforge.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "scaleforge" and len(parts) > 1:
                yield parts[1], node.lineno


def import_graph() -> dict[str, dict[str, str]]:
    """package -> {imported package: 'file:line' of one such import}, self-imports left out."""
    graph: dict[str, dict[str, str]] = {package: {} for package in PACKAGES}
    for package in PACKAGES:
        for source in sorted((REPO / package).rglob("*.py")):
            for target, line in imported_packages(source):
                if target != package:
                    where = f"{source.relative_to(REPO)}:{line}"
                    graph[package].setdefault(target, where)
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with a path stack)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_reports_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": "", "c": ""}, "b": {"c": ""}, "c": {}}) is None


def test_the_packages_are_found():
    assert {"errors", "csrc", "models", "parallel", "data_pipeline", "core", "launch"} <= set(
        PACKAGES
    )


def test_no_import_cycle_between_packages():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle is not None:
        steps = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)]
        raise AssertionError("import cycle between packages: " + "; ".join(steps))


def test_lower_layers_import_only_what_lies_below_them():
    graph = import_graph()
    for package, allowed in ALLOWED.items():
        extra = {target: where for target, where in graph[package].items()
                 if target not in allowed}
        assert not extra, f"{package} may import only {sorted(allowed)}, but imports {extra}"
