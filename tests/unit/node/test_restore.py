"""`raftq node --restore FILE` on disk (cluster/backup.py): what the data directory starts with."""

from __future__ import annotations

import pytest

from raftq.cluster.backup import restore_data_dir, verify_backup
from raftq.cluster.errors import ConfigError
from raftq.cluster.queue.state_machine import QueueStateMachine, write_snapshot
from raftq.cluster.raft.membership import Member, Membership
from raftq.cluster.storage.node_storage import NodeStorage
from raftq.cluster.storage.snapshots import SnapshotStore

OLD = Membership((Member("n1", "https://a:7001", True), Member("n2", "https://b:7001", True),
                  Member("n4", "https://d:7001", True)), removed=("n3",))


def _backup(tmp_path, membership: Membership | None) -> str:
    queue = QueueStateMachine()
    queue.membership = membership.encode() if membership is not None else None
    queue.last_applied = 120  # as a snapshot at index 120 holds
    store = SnapshotStore.open(tmp_path / "backup")
    with store.writer(120, 7) as writer:
        write_snapshot(queue.capture(), writer.write)
        return writer.commit().path


def _restored(data_dir: str) -> tuple[QueueStateMachine, int]:
    storage = NodeStorage.open(data_dir, wal_segment_bytes=1 << 20, logger=None)
    try:
        (meta,) = storage.snapshots.list()
        queue = QueueStateMachine()
        with storage.snapshots.open_body(meta) as body:
            queue.restore_from(body)
        return queue, storage.log.hard_state.term
    finally:
        storage.close()


def test_a_restored_node_is_the_only_voter_and_starts_past_the_backups_term(tmp_path):
    backup = _backup(tmp_path, OLD)
    assert verify_backup(backup) == (120, 7)
    meta = restore_data_dir(backup, str(tmp_path / "new"), node_id="r1", url="https://r:7001",
                            wal_segment_bytes=1 << 20)
    assert (meta.index, meta.term) == (120, 7)
    queue, term = _restored(str(tmp_path / "new"))
    assert term == 7 and queue.last_applied == 120
    assert Membership.decode(queue.membership) == Membership((Member("r1", "https://r:7001", True),), ("n3",))


def test_a_backup_without_a_membership_keeps_none(tmp_path):
    restore_data_dir(_backup(tmp_path, None), str(tmp_path / "new"), node_id="n1", url="http://x:1",
                     wal_segment_bytes=1 << 20)
    assert _restored(str(tmp_path / "new"))[0].membership is None


def test_a_second_restore_into_the_same_directory_is_refused(tmp_path):
    backup = _backup(tmp_path, None)
    restore_data_dir(backup, str(tmp_path / "new"), node_id="n1", url="http://x:1", wal_segment_bytes=1 << 20)
    with pytest.raises(ConfigError, match="holds a node's state already"):
        restore_data_dir(backup, str(tmp_path / "new"), node_id="n1", url="http://x:1", wal_segment_bytes=1 << 20)
