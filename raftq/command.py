"""The `raftq` command: one entry point that dispatches to each package's own `main`.

Theory of operation
-------------------
The packages import downward only: `raftq.client` (library, worker runtime, the client commands)
imports nothing of the broker, the chaos suite or the benchmark, so a client-only program never
loads them. The one place that knows all of them is this dispatcher, at the top:

    raftq node ...     -> raftq.cluster.main.main      (a broker process)
    raftq chaos ...    -> raftq.chaos.__main__.main    (the fault-injection suite)
    raftq bench ...    -> raftq.bench.main.main        (the benchmark)
    raftq anything     -> raftq.client.cli.main        (submit, worker, status, queues, job, dlq, ...)

Global options written before the command (`raftq --nodes URL bench`) belong to the client
commands; `bench` takes `--nodes` and `--token` itself, so those are passed on to it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Sequence

#: Commands owned by another package: (module, what `raftq --help` says of it).
DELEGATED = {
    "node": ("raftq.cluster.main", "run a broker node"),
    "bench": ("raftq.bench.main", "the benchmark"),
    "chaos": ("raftq.chaos.__main__", "the fault-injection suite"),
    "admin": ("raftq.admin", "operator commands: backup"),
}
#: Client options that take a value; they may come before the command.
_GLOBAL_VALUED = ("--nodes", "--token", "--timeout")
#: Client options `bench` and `admin` take too: given before the command, they are passed on to it.
_BENCH_GLOBALS = ("--nodes", "--token")
_PASSED_ON_TO = ("bench", "admin")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one `raftq` command and returns its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = split_delegated(argv)
    if delegated is None:
        # Imported here, not above: `raftq node` must import the broker before anything imports
        # aiohttp (raftq.cluster.lean_aiohttp), and the client imports it.
        from raftq.client import cli as client_cli

        return client_cli.main(argv, other_commands={name: help_text for name, (_, help_text) in DELEGATED.items()})
    name, rest = delegated
    package_main = _package_main(name)
    if package_main is None:
        print(f"raftq {name}: {DELEGATED[name][1]} ({DELEGATED[name][0]}) is not part of this install",
              file=sys.stderr)
        return 2
    return package_main(rest)


def split_delegated(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """(command, its arguments) when another package owns the command, else None."""
    index, passed_on = 0, []
    while index < len(argv):
        token = argv[index]
        if token in _GLOBAL_VALUED:
            step = 2
        elif token == "--json" or token.startswith(tuple(f"{flag}=" for flag in _GLOBAL_VALUED)):
            step = 1
        elif token in DELEGATED:
            return token, (passed_on if token in _PASSED_ON_TO else []) + list(argv[index + 1:])
        else:
            return None
        if token.split("=")[0] in _BENCH_GLOBALS:
            passed_on += argv[index:index + step]
        index += step
    return None


def _package_main(name: str) -> Callable[[list[str]], int] | None:
    module_name = DELEGATED[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise  # something the package itself needs is missing: show it
        return None
    return module.main
