"""Snapshots of one node (Raft §7): when to take one, writing it off the loop, compaction after
it, installing one a leader sent, and restoring the newest one at start.

Theory of operation
-------------------
After `snapshot_every_entries` entries or `snapshot_every_bytes` log bytes since the last one (or
`snapshot_interval_s` after it, if anything was applied since), the drive loop calls `maybe_start`.
By default (`snapshot_writer` "fork", on Linux) it forks a child that writes the state as it was
at that instant into a snapshot file (tmp, fsync, rename; snapshot_child.py), and a worker thread
waits for the child: the loop pauses only for the fork. Otherwise (or when the fork fails) it
captures the state machine on the loop (a copy of immutable rows: 0.4-2.5 s at a million jobs)
and a worker thread encodes it into the file. Both write the same bytes. Once durable,
`handle_events` (called by the drive loop between Readys, when nothing else touches the WAL)
has the core drop log entries up to the snapshot minus `compact_keep_entries` (and at most
`compact_keep_bytes` of them stay), and the WAL drop whole segments up to the *older* of the two
snapshots kept, so a damaged newest snapshot can fall back on the older one plus the log.

A follower whose next entries are gone gets the snapshot file in chunks (snapshot_transfer.py),
the receiver hands the core a SNAP message naming it, and when the core accepts it
(`Ready.snapshot`) `install` restores a fresh state machine from the file and resets the WAL after
its point. At start `recover` restores the newest valid snapshot and returns only the log after it.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import logging
import os
import time
from typing import Callable, Protocol, Sequence

from raftq.cluster import recovery, snapshot_child
from raftq.cluster.config import NodeConfig
from raftq.cluster.queue.state_machine import QueueStateMachine, SnapshotCapture, write_snapshot
from raftq.cluster.raft.messages import Entry, SnapshotPoint
from raftq.cluster.raft.node import RaftNode
from raftq.cluster.storage.errors import CompactedError, DiskWriteError, SnapshotCorruptionError, StorageError
from raftq.cluster.storage.snapshots import SnapshotMeta, SnapshotStore
from raftq.cluster.storage.wal import WriteAheadLog
from raftq.cluster.storage_threads import StorageThreads

log = logging.getLogger("raftq.node")


def _load_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent on macOS and musl
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


def return_free_memory_to_os() -> float:
    """Asks glibc to give freed heap pages back to the OS; returns the seconds it took.

    After a burst, the records and keys that expired are freed, but glibc keeps their pages
    (above all in the worker threads' arenas, where snapshots are encoded) until told otherwise:
    measured after a million jobs, a node whose state was empty again still held its peak RSS.
    """
    if _malloc_trim is None:
        return 0.0
    started = time.perf_counter()
    _malloc_trim(0)
    return time.perf_counter() - started


#: After a snapshot failed to write (a full disk, a killed child), the next attempt waits this long:
#: each attempt costs a fork (or a capture on the event loop) and a whole state's encoding.
SNAPSHOT_RETRY_S = 10.0


class StartupError(StorageError):
    """The node cannot rebuild its state from disk without losing acknowledged data."""


class _Wakeup(Protocol):
    def set(self) -> None: ...


class Snapshotting:
    """The snapshot side of one node; the drive loop calls it, and it reads the figures metrics export."""

    def __init__(self, config: NodeConfig, wakeup: _Wakeup, storage_threads: StorageThreads) -> None:
        self.config = config
        self._wakeup = wakeup
        self._storage_threads = storage_threads  # the node's stop waits for them before closing the WAL
        self.store: SnapshotStore | None = None  # set by the node's start
        self.wal: WriteAheadLog | None = None
        self.applied_term = 0  # term of the entry at queue.last_applied (a snapshot's point needs it)
        self._bytes_since_snapshot = 0  # log bytes applied since the newest snapshot's point
        self._task: asyncio.Task | None = None
        self._last_snapshot_at = time.monotonic()
        self._retry_at = 0.0  # monotonic; after a failed snapshot, none before it
        self.snapshot_failures_count = 0
        self._done: list[tuple[SnapshotPoint, int]] = []  # (point, older snapshot's index)
        self._reports: list[tuple[str, bool]] = []  # (peer, delivered)
        self._wal_compacted_to = 0
        self.snapshots_taken_count = 0
        self.snapshots_installed_count = 0
        self.last_snapshot_seconds = 0.0
        self.last_snapshot_capture_seconds = 0.0
        self.last_snapshot_bytes = 0
        self.last_trim_seconds = 0.0
        self._fork = config.snapshot_writer == "fork" and snapshot_child.available()

    async def close(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    # ------------------------------------------------------------------ at start

    def recover(self, queue: QueueStateMachine) -> tuple[SnapshotPoint, list[Entry]]:
        """Runs in a thread at start: restores the newest valid snapshot that the log continues
        into `queue`, and returns its point and the log entries the core should hold.

        Raises:
            StartupError: no valid snapshot reaches the log's first entry (the entries between are
                gone): starting anyway would silently lose acknowledged jobs.
        """
        store, wal = self.store, self.wal
        assert store is not None and wal is not None
        damaged: list[str] = []
        damaged_paths: list[str] = []
        for meta in reversed(store.list()):
            try:
                store.verify(meta)
            except SnapshotCorruptionError as exc:
                log.error("snapshot damaged, trying an older one: %s", exc)
                damaged.append(str(exc))
                damaged_paths.append(meta.path)
                continue
            try:
                recovery.check_log_reaches(meta.index, wal.first_index)
            except recovery.RecoveryRefused as exc:
                raise StartupError(f"{exc} (snapshot {meta.path}, log in {wal.directory})"
                                   + (f"; damaged newer snapshots: {'; '.join(damaged)}" if damaged else "")) from None
            with store.open_body(meta) as body:
                queue.restore_from(body)
            assert queue.last_applied == meta.index, (meta.path, queue.last_applied)
            for path in damaged_paths:
                # Kept for inspection, out of the way: the next snapshots must not count it as
                # one of the two kept, or the log would be compacted up to a file no one can read.
                os.replace(path, path + ".damaged")
                log.warning("set the damaged snapshot aside as %s.damaged", path)
            if not recovery.log_continues(SnapshotPoint(meta.index, meta.term), wal.first_index, wal.last_index,
                                          self._wal_term):
                if wal.first_index:  # an empty log (a restored backup) drops nothing
                        log.warning("log entries %d..%d do not continue snapshot %d (term %d): dropped, not committed",
                                wal.first_index, wal.last_index, meta.index, meta.term)
                wal.reset_after(meta.index, meta.term)
            self.applied_term = meta.term
            first = recovery.first_entry_to_load(meta.index, wal.first_index, self.config.compact_keep_entries)
            return SnapshotPoint(meta.index, meta.term), wal.entries(first) if wal.first_index else []
        try:
            recovery.check_log_reaches(None, wal.first_index)
        except recovery.RecoveryRefused as exc:
            raise StartupError(f"{exc} (log in {wal.directory})"
                               + (f"; damaged snapshots: {'; '.join(damaged)}" if damaged else "")) from None
        if damaged:
            log.warning("no valid snapshot; replaying the whole log from index 1")
        return SnapshotPoint(), wal.entries()

    def _wal_term(self, index: int) -> int | None:
        """The WAL's term at `index`, None where compaction dropped it."""
        assert self.wal is not None
        try:
            return self.wal.term(index)
        except CompactedError:
            return None

    # ------------------------------------------------------------------ taking one

    def note_applied(self, entries: Sequence[Entry]) -> None:
        """The drive loop applied these entries: they count toward the next snapshot."""
        self.applied_term = entries[-1].term
        self._bytes_since_snapshot += sum(len(entry.data) for entry in entries)

    def maybe_start(self, raft: RaftNode, queue: QueueStateMachine) -> None:
        """Starts a snapshot when enough log has been applied since the last one (and none runs)."""
        if self._task is not None:
            return
        if self._retry_at and time.monotonic() < self._retry_at:
            return
        since = queue.last_applied - raft.snapshot.index
        due = (since >= self.config.snapshot_every_entries
               or self._bytes_since_snapshot >= self.config.snapshot_every_bytes
               or (since > 0 and time.monotonic() - self._last_snapshot_at >= self.config.snapshot_interval_s))
        if not due:
            return
        started = time.perf_counter()
        point = SnapshotPoint(queue.last_applied, self.applied_term)
        write = self._forked(queue, point) if self._fork else None
        if write is None:
            # The capture allocates one tuple per job: a collection in the middle would only walk
            # objects that are all alive (measured at 1M jobs: 784 ms with the collector, 604 without).
            gc.disable()
            try:
                capture = queue.capture()
            finally:
                gc.enable()
            write = functools.partial(self._write_file, capture, point)
        self.last_snapshot_capture_seconds = time.perf_counter() - started
        self._bytes_since_snapshot = 0
        self._last_snapshot_at = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._take(write, point, started), name="snapshot")

    def _forked(self, queue: QueueStateMachine, point: SnapshotPoint) -> Callable[[], tuple[SnapshotMeta, int]] | None:
        """Forks the child that writes the snapshot; returns the blocking wait for its file, or
        None when the fork failed (the in-process path writes this one)."""
        assert self.store is not None
        try:
            child = snapshot_child.start(queue, self.store, point.index, point.term)
        except OSError as exc:  # EAGAIN or ENOMEM: a snapshot is still better taken the slow way
            log.warning("snapshot at %d: fork failed (%s); capturing on the event loop instead", point.index, exc)
            return None
        return functools.partial(self._wait_for_child, child)

    async def _take(self, write: Callable[[], tuple[SnapshotMeta, int]], point: SnapshotPoint, started: float) -> None:
        try:
            meta, older_snapshot_index = await asyncio.to_thread(write)
        # A full or failing disk, or a child killed (the OOM killer, an operator): a snapshot is an
        # optimisation, the log has it all.
        except (OSError, snapshot_child.SnapshotChildFailed) as exc:
            self.snapshot_failures_count += 1
            self._retry_at = time.monotonic() + SNAPSHOT_RETRY_S
            log.warning("snapshot at %d not written: %s; the log keeps every entry; trying again in %g s",
                        point.index, exc, SNAPSHOT_RETRY_S)
            return
        except Exception:  # a snapshot that failed leaves the log as it was: nothing is lost
            self.snapshot_failures_count += 1
            self._retry_at = time.monotonic() + SNAPSHOT_RETRY_S
            log.exception("snapshot at %d failed; the log keeps every entry until the next one", point.index)
            return
        finally:
            self._task = None
        self.snapshots_taken_count += 1
        self.last_snapshot_seconds = time.perf_counter() - started
        self.last_snapshot_bytes = meta.size_bytes
        log.info("snapshot at %d (term %d): %d bytes in %.2f s (%.3f s on the loop, %.3f s returning memory)",
                 point.index, point.term, meta.size_bytes, self.last_snapshot_seconds,
                 self.last_snapshot_capture_seconds, self.last_trim_seconds)
        self._done.append((point, older_snapshot_index))
        self._wakeup.set()

    def _write_file(self, capture: SnapshotCapture, point: SnapshotPoint) -> tuple[SnapshotMeta, int]:
        """Runs in a worker thread: the snapshot file, and the index of the older snapshot kept
        (the WAL keeps what that one needs, so a damaged newest one can fall back on it)."""
        store = self.store
        assert store is not None
        # Memory freed since the last snapshot (expired records, the last capture) goes back now.
        self.last_trim_seconds = return_free_memory_to_os()
        with store.writer(point.index, point.term) as writer:
            try:
                write_snapshot(capture, writer.write)
                meta = writer.commit()
            except OSError as exc:  # a write() on an open file names no file: say which
                raise DiskWriteError(exc.filename or writer.path, exc) from exc
        return meta, self._retain()

    def _wait_for_child(self, child: snapshot_child.ForkedSnapshot) -> tuple[SnapshotMeta, int]:
        """Runs in a worker thread: the forked child's snapshot file, once it exited, and the index
        of the older snapshot kept (see `_write_file`)."""
        assert self.store is not None
        meta = snapshot_child.wait(child, self.store)
        # The node's own memory freed since the last snapshot goes back now (the child's is gone).
        self.last_trim_seconds = return_free_memory_to_os()
        return meta, self._retain()

    def _retain(self) -> int:
        """Deletes all but the two newest snapshots; returns the index of the older one kept (0: none)."""
        store = self.store
        assert store is not None
        store.retain(2)
        kept = store.list()
        return kept[-2].index if len(kept) >= 2 else 0

    async def write_copy(self, queue: QueueStateMachine, store: SnapshotStore, point: SnapshotPoint) -> SnapshotMeta:
        """Writes `queue`'s state, as it is now, as the snapshot at `point` into `store` (a backup's
        folder), the way this node writes its own snapshots: by a forked child, or by a capture
        on the loop and a worker thread.

        Raises:
            OSError: the disk refused (DiskWriteError names the file); no file was made.
            snapshot_child.SnapshotChildFailed: the child was killed; no file was made.
        """
        if self._fork:
            try:
                child = snapshot_child.start(queue, store, point.index, point.term)
            except OSError as exc:
                log.warning("copy of the state at %d: fork failed (%s); capturing on the event loop instead",
                            point.index, exc)
            else:
                return await asyncio.to_thread(snapshot_child.wait, child, store)
        capture = queue.capture()

        def write() -> SnapshotMeta:
            with store.writer(point.index, point.term) as writer:
                write_snapshot(capture, writer.write)
                return writer.commit()
        return await asyncio.to_thread(write)

    # ------------------------------------------------------------------ between Readys

    def transfer_reported(self, peer: str, delivered: bool) -> None:
        """The snapshot sender's report on one transfer; the core hears it in `handle_events`."""
        self._reports.append((peer, delivered))
        self._wakeup.set()

    async def handle_events(self, raft: RaftNode) -> None:
        """Tells the core how transfers ended, and compacts after each snapshot that became durable."""
        reports, self._reports = self._reports, []
        for peer, delivered in reports:
            raft.report_snapshot(peer, delivered=delivered)
        done, self._done = self._done, []
        for point, older_snapshot_index in done:
            compaction = raft.compact_after_snapshot(point, keep_entries=self.config.compact_keep_entries,
                                                     keep_bytes=self.config.compact_keep_bytes)
            # The WAL keeps what the older snapshot needs, so a damaged newest one can fall back.
            wal_compact_to = min(compaction.upto_index, older_snapshot_index)
            log.info("snapshot at %d durable; %d entries dropped from memory", point.index, compaction.dropped_count)
            if wal_compact_to > self._wal_compacted_to:
                assert self.wal is not None
                # Here, between Readys, nothing else touches the WAL (it is not thread-safe).
                await self._storage_threads.run(self.wal.compact, min(wal_compact_to, self.wal.last_index))
                self._wal_compacted_to = wal_compact_to

    # ------------------------------------------------------------------ installing one

    async def install(self, point: SnapshotPoint) -> QueueStateMachine:
        """Follower: the core accepted a snapshot the receiver stored; returns the state machine
        restored from it (the node's new one), with the WAL reset to an empty log after it."""
        store, wal = self.store, self.wal
        assert store is not None and wal is not None
        meta = store.find(point.index, point.term)
        assert meta is not None, f"the core installs snapshot {point} that is not on disk"
        queue = QueueStateMachine(retention_ms=self.config.retention_ms,
                                  idempotency_window_ms=self.config.idempotency_window_ms)

        def install() -> None:
            with store.open_body(meta) as body:
                queue.restore_from(body)
            wal.reset_after(point.index, point.term)

        started = time.perf_counter()
        # The restore makes millions of objects: the collector would walk all of them again and
        # again, each full pass holding the GIL for most of a second, and the loop waits for it.
        # Installed state is long-lived, like the state recovered at start: frozen like it.
        gc.disable()
        try:
            await self._storage_threads.run(install)
        finally:
            gc.enable()
        gc.freeze()
        self.applied_term = point.term
        self._bytes_since_snapshot = 0
        self._wal_compacted_to = 0
        self.snapshots_installed_count += 1
        log.info("installed snapshot at %d (term %d, %d jobs) in %.2f s", point.index, point.term,
                 queue.job_count(), time.perf_counter() - started)
        return queue
