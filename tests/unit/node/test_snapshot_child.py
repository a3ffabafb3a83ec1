"""Snapshots written by a forked child (cluster/snapshot_child.py) and by the node's Snapshotting.

Real forks, real files: the child's file must hold exactly the bytes the in-process path writes
for the same state (replicas compare digests of them), whatever the parent applies meanwhile;
a child that is killed or meets a full device leaves nothing behind and is retried.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import signal

import pytest

from raftq.cluster import snapshot_child, snapshotting
from raftq.cluster.config import NodeConfig
from raftq.cluster.raft.node import RaftConfig, RaftNode
from raftq.cluster.raft.messages import HardState
from raftq.cluster.snapshotting import Snapshotting
from raftq.cluster.storage.errors import DiskWriteError
from raftq.cluster.storage.snapshots import SnapshotStore
from raftq.cluster.storage_threads import StorageThreads
from tests.unit.queue.test_state_machine_snapshot import busy_machine, reference_snapshot, some_commands

pytestmark = pytest.mark.skipif(not snapshot_child.available(), reason="snapshots are forked on Linux only")


def body_of(store: SnapshotStore, meta) -> bytes:
    store.verify(meta)
    with store.open_body(meta) as body:
        return body.read()


def children_of_this_thread() -> set[int]:
    """The processes this (main) thread forked that have not been reaped: other tests' too."""
    with open(f"/proc/self/task/{os.getpid()}/children") as f:
        return {int(pid) for pid in f.read().split()}


def test_the_child_writes_the_state_at_the_fork_whatever_the_parent_applies_next(tmp_path):
    m = busy_machine()
    expected = reference_snapshot(m.sm)
    index = m.sm.last_applied
    store = SnapshotStore.open(tmp_path / "snapshots")
    child = snapshot_child.start(m.sm, store, index, 3)
    some_commands(m)  # the parent goes on at once; the child's copy of the state does not move
    meta = snapshot_child.wait(child, store)
    assert body_of(store, meta) == expected
    assert (meta.index, meta.term) == (index, 3) and m.sm.last_applied > index
    assert meta.size_bytes == os.path.getsize(meta.path)
    assert reference_snapshot(m.sm) != expected  # the commands did change the parent's state


def test_a_killed_child_leaves_nothing_and_says_how_it_died(tmp_path):
    m = busy_machine()
    store = SnapshotStore.open(tmp_path / "snapshots")
    index = m.sm.last_applied
    # The child blocks opening its temporary file (a FIFO nobody reads), so the kill lands mid-write.
    os.mkfifo(store.path_of(index, 1) + ".tmp")
    child = snapshot_child.start(m.sm, store, index, 1)
    os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(snapshot_child.SnapshotChildFailed, match=f"killed by signal {signal.SIGKILL.value}"):
        snapshot_child.wait(child, store)
    assert os.listdir(store.directory) == []


def test_a_full_device_is_the_childs_disk_error_naming_the_file(tmp_path):
    m = busy_machine()
    store = SnapshotStore.open(tmp_path / "snapshots")
    index = m.sm.last_applied
    os.symlink("/dev/full", store.path_of(index, 1) + ".tmp")  # every write there fails with ENOSPC
    child = snapshot_child.start(m.sm, store, index, 1)
    with pytest.raises(DiskWriteError) as raised:
        snapshot_child.wait(child, store)
    assert raised.value.errno == errno.ENOSPC, raised.value
    assert raised.value.filename == store.path_of(index, 1)  # as the in-process path names it
    assert store.list() == [] and os.listdir(store.directory) == []


class _Wakeup:
    def __init__(self) -> None:
        self.count = 0

    def set(self) -> None:
        self.count += 1


def _snapshotting(tmp_path, name: str, writer: str) -> Snapshotting:
    config = NodeConfig(node_id="n1", data_dir=str(tmp_path / name), snapshot_every_entries=1,
                        snapshot_writer=writer)
    taking = Snapshotting(config, _Wakeup(), StorageThreads())
    taking.store = SnapshotStore.open(tmp_path / name / "snapshots")
    taking.applied_term = 2
    return taking


def test_fork_and_thread_writers_make_the_same_file_and_a_killed_child_is_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshotting, "SNAPSHOT_RETRY_S", 0.0)
    m = busy_machine()
    expected = reference_snapshot(m.sm)
    raft = RaftNode(RaftConfig(node_id="n1", peer_ids=()), hard_state=HardState(), entries=[], rng=random.Random(1))
    forked = _snapshotting(tmp_path, "forked", "fork")
    threaded = _snapshotting(tmp_path, "threaded", "thread")
    blocked_tmp = forked.store.path_of(m.sm.last_applied, 2) + ".tmp"
    os.mkfifo(blocked_tmp)

    earlier_children = children_of_this_thread()

    async def run() -> None:
        forked.maybe_start(raft, m.sm)  # the child blocks on the FIFO: killed below
        threaded.maybe_start(raft, m.sm)
        children = children_of_this_thread() - earlier_children
        for child in children:  # whatever happens, no child stays blocked on the FIFO
            os.kill(child, signal.SIGKILL)
        assert len(children) == 1, children
        await forked.close()
        await threaded.close()
        assert forked.snapshot_failures_count == 1 and forked.snapshots_taken_count == 0
        assert not os.path.exists(blocked_tmp)
        forked._last_snapshot_at -= 1  # the retry is due (SNAPSHOT_RETRY_S is 0 here)
        forked.maybe_start(raft, m.sm)  # the same state again: the retry
        await forked.close()

    asyncio.run(run())
    assert threaded.snapshots_taken_count == 1 and forked.snapshots_taken_count == 1
    (forked_meta,) = forked.store.list()
    (threaded_meta,) = threaded.store.list()
    assert body_of(forked.store, forked_meta) == body_of(threaded.store, threaded_meta) == expected
    assert (forked_meta.index, forked_meta.term) == (threaded_meta.index, threaded_meta.term) == (m.sm.last_applied, 2)
    assert forked.last_snapshot_bytes == forked_meta.size_bytes
    assert children_of_this_thread() <= earlier_children  # every child reaped
