"""Imports point one way: the client imports nothing of the broker, the chaos suite or the
benchmark, and no module of the project imports itself back through others (no import cycles).

Every import counts here, also one inside a function or under `if TYPE_CHECKING:`: a cycle hidden
in a function still ties the two modules together for a reader. `from a import b` counts as an
import of the module `a.b` when that is a module, else of `a`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bench", "chaos", "client", "cluster", "raftq")
#: Leaf modules every package may import: the wire facts both sides share (they import nothing).
SHARED = ("raftq.protocol",)
#: What each package may never import (its import points downward only).
FORBIDDEN = {
    "client": ("cluster", "chaos", "bench", "raftq"),
    "cluster": ("client", "chaos", "bench", "raftq"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (anywhere in the file)."""
    tree = ast.parse(path.read_text(), str(path))
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != this:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph.get(name, ())):
            # A package's __init__ importing its own submodules is how packages re-export names.
            if name and target.startswith(name + "."):
                continue
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_packages_import_downward_only():
    wrong = []
    for name, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            if target in SHARED:
                continue
            if target.split(".")[0] in FORBIDDEN.get(name.split(".")[0], ()):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_checks_can_fail():
    """The cycle finder finds a planted cycle, and the graph sees a function-level import."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "client.worker" in graph["bench.roles"], "imports inside functions must count"
    assert graph["raftq.protocol"] == set(), "the shared protocol module imports nothing of the project"
