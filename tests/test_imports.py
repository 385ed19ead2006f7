"""The package's modules import one another without a cycle (imports inside functions included, since
a function-level import that dodges a cycle is still one)."""

from __future__ import annotations

import ast
from pathlib import Path

import onepass

ROOT = Path(onepass.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules `path` imports: `from X import Y` is X.Y where that is a module (a submodule,
    or a subpackage's __init__), else X itself (a name defined in X, packages' __init__ included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        found.update(name for name in names if name in modules)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for other in sorted(graph[node]):
            if state.get(other) == 1:
                return stack[stack.index(other):] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_src_onepass_has_no_import_cycle():
    files = {module_name(path): path for path in ROOT.rglob("*.py")}
    graph = {name: imports_of(path, set(files)) - {"onepass", name} for name, path in files.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
