"""Backups: a consistent copy of the cluster's state, and a new cluster started from one.

Theory of operation
-------------------
**Taking one** (`GET /v1/admin/backup`, `raftq admin backup FILE`). Only the leader answers
(followers redirect, like every client request). It first passes a read barrier (ReadIndex: it
confirms with a majority that it still leads, then waits until it has applied everything committed
before the request), so every write acknowledged before the request is in its state; then it writes
the state machine at its applied index the way its own snapshots are written (a forked child, so
the event loop pauses only for the fork; or a capture on the loop and a worker thread) as a
snapshot file, in the snapshot store's format (body, then a trailer with index, term, length,
sha256 and magic), into a private folder under the node's data directory. The response streams that
file and the folder is deleted when the response is done, whether the client read it all or not.
The answer's headers name the backup's index and term; everything acknowledged before the request
is at or below that index. A backup costs one snapshot's disk space and time while it is taken.

**Restoring one** (`raftq node --restore FILE --id n1 --data-dir DIR`). The file is checked whole
(trailer, size, sha256) and copied into the empty data directory as its only snapshot; the hard
state starts at the snapshot's term, so the node's first election term is past every entry the
snapshot covers. A backup that records a membership (the cluster's had changed) is rewritten with
this node as its only voter. The node then starts as a cluster of one from that snapshot: a new cluster
whose state is the backup's. Other nodes join it afterwards as new, empty members; a restore
never joins an existing cluster, and it refuses a data directory that holds any state.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import struct
import tempfile
from typing import TYPE_CHECKING

from aiohttp import web

from raftq.cluster.api.keys import NODE
from raftq.cluster.errors import ConfigError
from raftq.cluster.queue.state_machine import QueueStateMachine, write_snapshot
from raftq.cluster.raft.membership import Member, Membership
from raftq.cluster.raft.messages import HardState, SnapshotPoint
from raftq.cluster.storage.errors import SnapshotCorruptionError
from raftq.cluster.storage.hard_state import fsync_directory
from raftq.cluster.storage.node_storage import NodeStorage
from raftq.cluster.storage.snapshots import (
    MAGIC, READ_CHUNK_BYTES, TRAILER_BYTES, SnapshotMeta, SnapshotStore, snapshot_file_name)

if TYPE_CHECKING:
    from raftq.cluster.server import Node

log = logging.getLogger("raftq.backup")

BACKUP_PATH = "/v1/admin/backup"
#: Response headers naming the backup's point: every write acknowledged before the request is covered.
INDEX_HEADER = "X-Raftq-Backup-Index"
TERM_HEADER = "X-Raftq-Backup-Term"
#: Folder of the data directory that holds backups while they are sent.
BACKUPS_FOLDER = "backups-in-progress"
_TRAILER = struct.Struct("<QQQ32s8s")


async def backup_view(request: web.Request) -> web.StreamResponse:
    """`GET /v1/admin/backup`: the leader's state as one snapshot file (see the module docstring)."""
    node: Node = request.app[NODE]
    await node.read_barrier()
    index, term = node.queue.last_applied, node.snapshotting.applied_term
    parent = os.path.join(node.config.data_dir, BACKUPS_FOLDER)
    os.makedirs(parent, exist_ok=True)
    folder = tempfile.mkdtemp(dir=parent)
    try:
        # Nothing awaited between the barrier and here: the state is still the one at `index`.
        store = SnapshotStore(folder, logger=log)  # an empty folder just made: nothing for open() to clean
        meta = await node.snapshotting.write_copy(node.queue, store, SnapshotPoint(index, term))
        log.info("backup at %d (term %d): %d bytes, sending it to %s", index, term, meta.size_bytes, request.remote)
        response = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream",
            "Content-Length": str(meta.size_bytes),
            "Content-Disposition": f'attachment; filename="raftq-backup-{index}-{term}.snap"',
            INDEX_HEADER: str(index),
            TERM_HEADER: str(term),
        })
        await response.prepare(request)
        with open(meta.path, "rb") as f:
            while chunk := await asyncio.to_thread(f.read, 1 << 20):
                await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_leftovers(data_dir: str) -> None:
    """Deletes backups a stopped node was sending (called at start, before any backup runs)."""
    shutil.rmtree(os.path.join(data_dir, BACKUPS_FOLDER), ignore_errors=True)


def verify_backup(path: str) -> tuple[int, int]:
    """(index, term) of a backup file, checked whole: trailer, length and the body's sha256.

    Raises:
        SnapshotCorruptionError: not a raftq backup, cut short, or damaged.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < TRAILER_BYTES:
            raise SnapshotCorruptionError(path, f"{size} bytes: too short for a raftq backup")
        f.seek(size - TRAILER_BYTES)
        index, term, body_bytes, digest, magic = _TRAILER.unpack(f.read(TRAILER_BYTES))
        if magic != MAGIC:
            raise SnapshotCorruptionError(path, "not a raftq backup (no snapshot trailer at its end)")
        if body_bytes != size - TRAILER_BYTES:
            raise SnapshotCorruptionError(path, f"the trailer counts {body_bytes} body bytes, the file holds "
                                                f"{size - TRAILER_BYTES}: cut short or damaged")
        f.seek(0)
        body_hash, left = hashlib.sha256(), body_bytes
        while left:
            chunk = f.read(min(left, READ_CHUNK_BYTES))
            if not chunk:
                raise SnapshotCorruptionError(path, "shrank while being read")
            body_hash.update(chunk)
            left -= len(chunk)
    if body_hash.digest() != digest:
        raise SnapshotCorruptionError(path, "the body's sha256 does not match its trailer: damaged")
    return index, term


def _as_cluster_of_one(store: SnapshotStore, meta: SnapshotMeta, node_id: str, url: str) -> SnapshotMeta:
    """The snapshot, rewritten so that its membership (if it records one) is this node alone.

    A backup of a cluster whose membership changed records its voters; restored as they are, the
    new node would wait for votes from the old cluster's boxes. Ids the old cluster removed for
    good stay removed.
    """
    queue = QueueStateMachine()
    with store.open_body(meta) as body:
        queue.restore_from(body)
    if queue.membership is None:  # never changed: the node's flags say who votes
        return meta
    removed = Membership.decode(queue.membership).removed
    queue.membership = Membership((Member(node_id, url, True),), tuple(r for r in removed if r != node_id)).encode()
    with store.writer(meta.index, meta.term) as writer:  # replaces the file under the same name
        write_snapshot(queue.capture(), writer.write)
        return writer.commit()


def restore_data_dir(backup_path: str, data_dir: str, *, node_id: str, url: str,
                     wal_segment_bytes: int) -> SnapshotMeta:
    """Makes `data_dir` (empty or missing) start from the backup; see the module docstring.

    Raises:
        ConfigError: the data directory holds state already, or the file is not a sound backup.
    """
    try:
        index, term = verify_backup(backup_path)
    except OSError as exc:
        raise ConfigError(f"cannot read the backup {backup_path!r}: {exc}") from None
    except SnapshotCorruptionError as exc:
        raise ConfigError(f"not restoring: {exc}") from None
    storage = NodeStorage.open(data_dir, wal_segment_bytes=wal_segment_bytes, logger=log)
    try:
        if storage.log.last_index > 0 or storage.snapshots.list() or storage.log.hard_state.term > 0:
            raise ConfigError(f"not restoring into {data_dir!r}: it holds a node's state already (a restore "
                              "starts a new cluster in an empty data directory)")
        # The first election must be past every term the snapshot covers.
        storage.log.save_hard_state(HardState(term=term))
        # Copied under a temporary name (the store deletes such leftovers when it opens), made
        # durable, then renamed: the store never lists a partial file.
        final = os.path.join(storage.snapshots.directory, snapshot_file_name(index, term))
        shutil.copyfile(backup_path, final + ".tmp")
        with open(final + ".tmp", "rb") as f:
            os.fsync(f.fileno())
        os.replace(final + ".tmp", final)
        fsync_directory(storage.snapshots.directory)
        meta = SnapshotMeta(index, term, final, os.path.getsize(final))
        try:
            storage.snapshots.verify(meta)
        except SnapshotCorruptionError as exc:  # the copy went wrong: leave the directory empty
            storage.snapshots.remove(meta)
            storage.log.save_hard_state(HardState())
            raise ConfigError(f"not restoring: the copy is damaged: {exc}") from None
        return _as_cluster_of_one(storage.snapshots, meta, node_id, url)
    finally:
        storage.close()
