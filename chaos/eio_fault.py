"""Test-only node mode for a failing disk: the WAL's fdatasync fails with EIO once a file appears.

`RAFTQ_EIO_TRIGGER=<path> python -m raftq.chaos.eio_fault <node flags>` runs the ordinary node
(`cluster.main.main`) with one hook: while `<path>` does not exist, the WAL's fdatasync is the
real one; once it exists, every WAL fdatasync raises `OSError(EIO)`, as a dying disk does.

Why a hook: device-mapper's `error` and `flakey` targets give a real EIO over a loop device, but
this machine's kernel has no device-mapper (`/dev/mapper/control` is missing), so the real fault
cannot be had here; ENOSPC is tested for real on a size-limited tmpfs (`test_disk_full.py`).
The hook sits exactly where the OS call is made (`cluster.storage.wal._fdatasync`), so
everything above it (the WAL's failure latch, the node's fail-stop) runs as in production.
"""

from __future__ import annotations

import errno
import os
import sys

TRIGGER_ENV = "RAFTQ_EIO_TRIGGER"


def install(trigger_path: str) -> None:
    """Replaces the WAL's fdatasync in this process with one that fails once trigger_path exists."""
    from raftq.cluster.storage import wal

    assert hasattr(wal, "_fdatasync"), "cluster.storage.wal._fdatasync is gone; update chaos/eio_fault.py"
    real = wal._fdatasync

    def fdatasync(fd: int) -> None:
        if os.path.exists(trigger_path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    wal._fdatasync = fdatasync


def main() -> int:
    install(os.environ[TRIGGER_ENV])
    from raftq.cluster.main import main as node_main

    return node_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
