"""Writing a snapshot file from a forked child process, so the node's event loop never stops for it.

Theory of operation
-------------------
Redis's BGSAVE model. Capturing a million jobs on the event loop took 0.4-2.5 s (one row per job,
`QueueStateMachine.capture`), during which the node answered nothing, not even heartbeats. A
`fork()` gives a child process the whole state as it is at that instant, copy-on-write, for the
price of copying the parent's page tables (about 10-15 ms per GiB of RSS here): the parent goes
on applying entries at once, and the child captures, encodes and writes the file with the same
two calls the in-process path makes (`capture()`, `write_snapshot()`), so the file holds the
same bytes, then leaves with `os._exit`.

The child is the one thread that called fork; every other thread of the node is gone in it, and a
lock one of them held stays held there forever. So the child touches only the state machine's
objects, msgpack, a sha256 object made before the fork (OpenSSL takes internal locks when it makes
one) and os-level file calls: no logging, no asyncio, no executor. It stops signals from reaching
the parent's event loop (Python's handlers write to a wakeup fd the two share), runs at a lower CPU
priority than the node (`CHILD_NICENESS`), asks the kernel to kill it if the node dies
(`PR_SET_PDEATHSIG`), and reports the outcome through a pipe: the file's size, or the OSError that
stopped it (errno, file, message). Its exit status tells a child that was killed from one that
finished.

The parent waits for the child in a worker thread (`os.waitpid`), so the loop never blocks on it.
A child that failed leaves no snapshot: its writer deletes the temporary file when it can, and
the parent deletes what a killed child left. While the child lives, every page either process
writes is copied: the child writes the reference counts of every object it reads, so its
private memory grows toward the node's RSS by the end of the capture (the price of the
model, paid in memory instead of in pause; `--snapshot-writer thread` is the old way).

Linux only (fork is unsafe with threads on macOS, absent on Windows): elsewhere `available()`
is False and snapshots use the in-process path.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import os
import signal
import sys
from dataclasses import dataclass

from raftq.cluster.queue.state_machine import QueueStateMachine, write_snapshot
from raftq.cluster.storage.errors import DiskWriteError
from raftq.cluster.storage.snapshots import SnapshotMeta, SnapshotStore

#: Bytes the child may report through the pipe (one OSError's text); a pipe holds 4 KiB atomically.
REPORT_BYTES_MAX = 4096
#: The child's niceness above the node's: its encoding (seconds of CPU at a million jobs) must
#: not take a core from the event loop it forked off, which answers heartbeats meanwhile.
CHILD_NICENESS = 10
_PR_SET_PDEATHSIG = 1
_EXIT_OK = 0
_EXIT_FAILED = 1


class SnapshotChildFailed(Exception):
    """The child writing a snapshot died without reporting a result (killed, or crashed)."""


def available() -> bool:
    """Whether snapshots can be written by a forked child here."""
    return sys.platform == "linux" and hasattr(os, "fork")


@dataclass(frozen=True)
class ForkedSnapshot:
    """A child writing the snapshot at (index, term)."""

    pid: int
    report_fd: int  #: read end of the pipe the child reports through; `wait` closes it
    index: int
    term: int


def start(queue: QueueStateMachine, store: SnapshotStore, index: int, term: int) -> ForkedSnapshot:
    """Forks a child that writes `queue`'s state as the snapshot at (index, term); returns at once.

    Runs on the event loop between two applies: the child sees the state as it is now.

    Raises:
        OSError: the fork failed (EAGAIN, ENOMEM); no child exists.
    """
    hasher = hashlib.sha256()  # made here: see the module docstring
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:  # the child: never returns
        status = _EXIT_FAILED
        try:
            os.close(read_fd)
            _become_quiet_child(parent)
            report = _write(queue, store, index, term, hasher)
            status = _EXIT_OK
        except OSError as exc:
            report = f"{exc.errno or 0}\t{exc.filename or ''}\t{exc.strerror or exc}"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which logs it
            report = f"0\t\t{type(exc).__name__}: {exc}"
        finally:
            try:
                os.write(write_fd, report.encode("utf-8", errors="replace")[:REPORT_BYTES_MAX])
            finally:
                os._exit(status)
    os.close(write_fd)
    return ForkedSnapshot(pid, read_fd, index, term)


def wait(child: ForkedSnapshot, store: SnapshotStore) -> SnapshotMeta:
    """Blocks (call it in a worker thread) until the child exits; returns the snapshot it wrote.

    Raises:
        DiskWriteError: the disk refused (ENOSPC, EIO...): the child's OSError, naming the file.
        SnapshotChildFailed: the child was killed or failed otherwise; what it left is deleted.
    """
    try:
        _, status = os.waitpid(child.pid, 0)
        report = _read_all(child.report_fd)
    finally:
        os.close(child.report_fd)
    if os.waitstatus_to_exitcode(status) == _EXIT_OK:
        return SnapshotMeta(child.index, child.term, store.path_of(child.index, child.term), int(report))
    store.remove_unfinished(child.index, child.term)  # a killed child could not
    if not report:
        exit_code = os.waitstatus_to_exitcode(status)
        how = f"killed by signal {-exit_code}" if exit_code < 0 else f"exited with status {exit_code}"
        raise SnapshotChildFailed(f"the process writing snapshot {child.index} {how}")
    error_number, filename, message = report.split("\t", 2)
    if int(error_number):
        raise DiskWriteError(filename or store.path_of(child.index, child.term),
                             OSError(int(error_number), message))
    raise SnapshotChildFailed(f"the process writing snapshot {child.index} failed: {message}")


def _become_quiet_child(parent: int) -> None:
    """Cuts the child off from the parent's signal handling, and ties its life to the parent's."""
    gc.disable()  # a collection would walk (and copy) every page of the parent's objects
    os.nice(CHILD_NICENESS)
    try:
        signal.set_wakeup_fd(-1)  # Python's handlers would wake the parent's loop through it
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(number, signal.SIG_DFL)
    except ValueError:  # not the main thread of the main interpreter: no handlers to undo there
        pass
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the node died before the line above
        os._exit(_EXIT_FAILED)


def _write(queue: QueueStateMachine, store: SnapshotStore, index: int, term: int, hasher) -> str:
    with store.writer(index, term, hasher=hasher) as writer:
        write_snapshot(queue.capture(), writer.write)
        meta = writer.commit()
    return str(meta.size_bytes)


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, REPORT_BYTES_MAX):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")

