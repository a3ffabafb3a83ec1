"""Imports point one way: the client imports nothing of the broker, the chaos suite or the
benchmark, and no module of the project imports itself back through others (no import cycles).

Every import counts here, also one inside a function or under `if TYPE_CHECKING:`: a cycle hidden
in a function still ties the two modules together for a reader. `from a import b` counts as an
import of the module `a.b` when that is a module, else of `a`.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The repository's package folders; each installs as `raftq.<folder>` (pyproject's package-dir).
SUBPACKAGES = ("bench", "chaos", "client", "cluster")
PACKAGES = SUBPACKAGES + ("raftq",)
#: Leaf modules every package may import: the wire facts both sides share (they import nothing).
SHARED = ("raftq.protocol",)
#: What each package may never import (its import points downward only). "raftq" is the top
#: package's own modules (the command dispatcher), not its subpackages.
FORBIDDEN = {
    "client": ("cluster", "chaos", "bench", "raftq"),
    "cluster": ("client", "chaos", "bench", "raftq"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] in SUBPACKAGES:
        parts.insert(0, "raftq")
    return ".".join(parts)


def _package_of(module: str) -> str:
    """The repository folder a module lives in: raftq.cluster.server -> cluster, raftq.command -> raftq."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else parts[0]


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
            if _package_of(target) in FORBIDDEN.get(_package_of(name), ()):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_checks_can_fail():
    """The cycle finder finds a planted cycle, and the graph sees a function-level import."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "raftq.client.worker" in graph["raftq.bench.roles"], "imports inside functions must count"
    assert graph["raftq.protocol"] == set(), "the shared protocol module imports nothing of the project"


def test_every_import_goes_through_the_raftq_namespace():
    """`from cluster.x import y` would import a second copy of the module from the repository
    folder (or nothing, once installed): the project is `raftq.cluster`, `raftq.client`, ..."""
    bare = []
    files = [p for folder in PACKAGES + ("tests",) for p in sorted((ROOT / folder).rglob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            bare += [f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
                     for name in names if name.split(".")[0] in SUBPACKAGES]
    assert not bare, "\n".join(bare)


def test_pyproject_installs_every_package_folder():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    on_disk = sorted(_module_name(init.parent / "__init__.py") for folder in PACKAGES
                     for init in (ROOT / folder).rglob("__init__.py"))
    assert sorted(declared) == on_disk
