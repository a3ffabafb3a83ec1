"""Options and fixtures shared by every test directory (keep this small)."""

from __future__ import annotations


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--rewrite", action="store_true", default=False,
        help="data-driven tests: write the actual output into tests/testdata files instead of comparing",
    )
