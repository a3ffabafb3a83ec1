"""The pure packages stay pure: cluster/raft and cluster/queue import no I/O, clock or randomness.

h11's "Rule 1 / Rule 2" made cheap to enforce. The Raft core takes an injected random source
(typed by a Protocol); an import guarded by `if TYPE_CHECKING:` never runs, so it is allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE_PACKAGES = ("cluster/raft", "cluster/queue")
FORBIDDEN = frozenset({"asyncio", "aiohttp", "socket", "time", "random"})


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import that can run, skipping `if TYPE_CHECKING:` bodies."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("__import__", "import_module") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def forbidden_imports(source: str, filename: str = "<source>") -> list[str]:
    tree = ast.parse(source, filename)
    return [f"{filename}:{line}: imports {module}" for line, module in _imported_modules(tree)
            if module.split(".")[0] in FORBIDDEN]


def _python_files() -> list[Path]:
    files = [p for package in PURE_PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert files, "no source files found under the pure packages"
    return files


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_package_imports_no_io(path: Path) -> None:
    assert forbidden_imports(path.read_text(), str(path.relative_to(ROOT))) == []


@pytest.mark.parametrize("source, count", [
    ("import time", 1),
    ("import os, socket", 1),
    ("from asyncio import Queue", 1),
    ("import aiohttp.web", 1),
    ("from random import Random", 1),
    ("def f():\n    import random", 1),
    ("mod = __import__('time')", 1),
    ("import importlib\nimportlib.import_module('socket')", 1),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import random", 0),
    ("import typing\nif typing.TYPE_CHECKING:\n    import random\nelse:\n    import time", 1),
    ("import timeit, randomness\nfrom . import time", 0),
])
def test_checker_itself(source: str, count: int) -> None:
    assert len(forbidden_imports(source)) == count
