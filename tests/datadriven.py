"""A small data-driven test runner (the idea of cockroachdb/datadriven, used by etcd-io/raft).

A test file is a sequence of cases separated by blank lines; `#` lines are comments:

    # What this case shows.
    directive arg key=value key=(a,b)
    optional input lines
    ----
    expected output

The expected output ends at the first blank line. Output that itself contains blank lines is
written between two separator lines (`----` then `----`) and closed by `----` `----` again.
`handler(case) -> str` produces the actual output; pytest's `--rewrite` option (tests/conftest.py)
writes actual outputs back into the file instead of comparing. Review rewritten files like code.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SEPARATOR = "----"
_ARG = re.compile(r"([^\s=]+)=\(([^)]*)\)|([^\s=]+)=(\S+)|(\S+)")


@dataclass(frozen=True)
class CmdArg:
    """`key`, `key=value` or `key=(v1,v2)`; vals is () for a bare word."""

    key: str
    vals: tuple[str, ...] = ()


@dataclass
class TestCase:
    __test__ = False  # not a pytest test class despite the name

    path: str
    line: int  # 1-based line of the directive
    directive: str
    args: list[CmdArg]
    input: str
    expected: str
    raw: str = ""  # the directive line as written (kept verbatim on rewrite)
    actual: str = field(default="")

    def arg(self, key: str, default: str | None = None) -> str | None:
        """The single value of key=value, or default."""
        for arg in self.args:
            if arg.key == key and arg.vals:
                return arg.vals[0]
        return default

    def vals(self, key: str) -> tuple[str, ...]:
        return next((arg.vals for arg in self.args if arg.key == key), ())

    def words(self) -> list[str]:
        """The bare words (positional arguments), in order."""
        return [arg.key for arg in self.args if not arg.vals]

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def parse_args(text: str) -> list[CmdArg]:
    args = []
    for m in _ARG.finditer(text):
        if m.group(1):
            args.append(CmdArg(m.group(1), tuple(v.strip() for v in m.group(2).split(",") if v.strip())))
        elif m.group(3):
            args.append(CmdArg(m.group(3), (m.group(4),)))
        else:
            args.append(CmdArg(m.group(5)))
    return args


def _parse(path: str, lines: list[str]) -> list[TestCase | str]:
    """Cases and the verbatim text (comments, blank lines) between them, in file order."""
    chunks: list[TestCase | str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            chunks.append(line)
            i += 1
            continue
        start = i
        directive, _, rest = line.partition(" ")
        i += 1
        input_lines = []
        while i < len(lines) and lines[i] != SEPARATOR:
            input_lines.append(lines[i])
            i += 1
        assert i < len(lines), f"{path}:{start + 1}: missing {SEPARATOR!r} after the directive"
        i += 1
        expected: list[str] = []
        if i < len(lines) and lines[i] == SEPARATOR:  # the blank-line-tolerant form
            i += 1
            while i + 1 < len(lines) and not (lines[i] == SEPARATOR and lines[i + 1] == SEPARATOR):
                expected.append(lines[i])
                i += 1
            i += 2
        else:
            while i < len(lines) and lines[i].strip():
                expected.append(lines[i])
                i += 1
        chunks.append(TestCase(path, start + 1, directive, parse_args(rest), "\n".join(input_lines),
                               "\n".join(expected), raw=line))
    return chunks


def _render(case: TestCase, output: str) -> list[str]:
    head = [case.raw] + (case.input.split("\n") if case.input else [])
    body = output.rstrip("\n").split("\n") if output.strip() else []
    if any(not line.strip() for line in body):
        return head + [SEPARATOR, SEPARATOR] + body + [SEPARATOR, SEPARATOR]
    return head + [SEPARATOR] + body


def run_file(path: str | Path, handler: Callable[[TestCase], str], *, rewrite: bool = False) -> None:
    """Run every case of a file through handler, in order.

    Args:
        path: the test file.
        handler: returns the actual output of one case (cases share whatever state it keeps).
        rewrite: write the actual outputs into the file instead of comparing.

    Raises:
        AssertionError: on the first case whose output differs, with a diff and file:line.
    """
    path = Path(path)
    chunks = _parse(str(path), path.read_text().split("\n"))
    new_lines: list[str] = []
    for chunk in chunks:
        if isinstance(chunk, str):
            new_lines.append(chunk)
            continue
        chunk.actual = handler(chunk).rstrip("\n")
        new_lines.extend(_render(chunk, chunk.actual))
        if not rewrite and chunk.actual != chunk.expected:
            diff = "\n".join(difflib.unified_diff(chunk.expected.split("\n"), chunk.actual.split("\n"),
                                                  "expected", "actual", lineterm=""))
            raise AssertionError(f"{chunk.where()}: output of {chunk.directive!r} differs "
                                 f"(rerun with --rewrite to accept):\n{diff}")
    if rewrite:
        text = "\n".join(new_lines)
        path.write_text(text if text.endswith("\n") else text + "\n")
