"""The deploy scripts leave every shipped module's bytecode cached and current.

An editable install compiles nothing, and with PYTHONDONTWRITEBYTECODE set (as on some machines)
no process ever writes a cache: each node would compile its modules from source at every start,
keeping the compiler's garbage in its RSS. `deploy/_venv.sh` compiles them, as pip does for a
regular install; this runs its function and checks the cache of every module a node, client or
benchmark imports.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("bench", "chaos", "client", "cluster", "raftq")
#: A .pyc header (PEP 552): magic, flags, then the source's mtime and size for the default
#: timestamp-based invalidation.
HEADER_BYTES = 16


def _stale_or_missing() -> list[str]:
    wrong = []
    for package in SHIPPED:
        for source in sorted((REPO / package).rglob("*.py")):
            cached = Path(importlib.util.cache_from_source(str(source)))
            if not cached.exists():
                wrong.append(f"{source.relative_to(REPO)}: no {cached.name}")
                continue
            header = cached.read_bytes()[:HEADER_BYTES]
            stat = source.stat()
            mtime = int.from_bytes(header[8:12], "little")
            size = int.from_bytes(header[12:16], "little")
            if header[:4] != importlib.util.MAGIC_NUMBER or (mtime, size) != (int(stat.st_mtime) & 0xFFFFFFFF,
                                                                             stat.st_size & 0xFFFFFFFF):
                wrong.append(f"{source.relative_to(REPO)}: {cached.name} does not match the source")
    return wrong


def test_the_venv_script_caches_the_bytecode_of_every_shipped_module() -> None:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(["bash", "-c", "source deploy/_venv.sh && raftq_compile_sources"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    wrong = _stale_or_missing()
    assert not wrong, f"expected current bytecode for every module of {SHIPPED}; wrong: {wrong[:10]}"
