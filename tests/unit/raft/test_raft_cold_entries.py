"""Cold entries (raft/log.py): applied entries past `warm_bytes` keep only their index and term
in memory, and their data is read back from storage when a follower needs them."""

from __future__ import annotations

import pytest

from raftq.cluster.raft.log import ColdEntry, RaftLog, entry_size_bytes
from raftq.cluster.raft.messages import Entry, EntryKind, MessageType, SnapshotPoint
from raftq.cluster.raft.node import RaftNode

from tests.unit.raft.test_raft_node import accept, make_leader, msg

T = MessageType


def entry(index: int, term: int = 1, size: int = 100) -> Entry:
    return Entry(index, term, EntryKind.NORMAL, bytes([index % 256]) * size)


class Store:
    """The shell's stored log, counting what is read back."""

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = {e.index: e for e in entries}
        self.reads: list[tuple[int, int]] = []

    def load(self, lo: int, hi: int) -> list[Entry]:
        self.reads.append((lo, hi))
        return [self.entries[i] for i in range(lo, hi + 1)]


def applied_log(count: int, warm_bytes: int, store: Store | None = None) -> RaftLog:
    entries = [entry(i) for i in range(1, count + 1)]
    store = store or Store(entries)
    log = RaftLog(entries, load=store.load, warm_bytes=warm_bytes)
    log.commit_to(count)
    log.take_committed_entries()
    log.applied_to(count)
    log.check_invariants()
    return log


def test_applied_entries_past_the_warm_bytes_go_cold_oldest_first() -> None:
    size = entry_size_bytes(entry(1))
    log = applied_log(10, warm_bytes=3 * size)
    assert log.cold_index == 7  # the newest three stay whole
    assert [type(e) for e in log.slice(1, 10, 1 << 20)] == [Entry] * 10  # cold ones come back whole


def test_slice_reads_back_exactly_the_cold_part_and_returns_what_was_stored() -> None:
    entries = [entry(i) for i in range(1, 11)]
    store = Store(entries)
    log = applied_log(10, warm_bytes=0, store=store)
    assert log.cold_index == 10
    assert log.slice(4, 3, 1 << 20) == tuple(entries[3:6])
    assert store.reads == [(4, 6)]
    # A byte bound counts a cold entry at its stored size: only what fits is read.
    store.reads.clear()
    assert len(log.slice(2, 10, 2 * entry_size_bytes(entries[0]))) == 2
    assert store.reads == [(2, 3)]


def test_without_load_or_with_room_nothing_goes_cold() -> None:
    entries = [entry(i) for i in range(1, 6)]
    log = RaftLog(entries)  # no load: everything stays in memory
    log.commit_to(5)
    log.take_committed_entries()
    log.applied_to(5)
    assert log.cold_index == 0
    store = Store(entries)
    log = applied_log(5, warm_bytes=1 << 20, store=store)
    assert log.cold_index == 0 and log.slice(1, 5, 1 << 20) == tuple(entries) and store.reads == []


def test_unapplied_entries_stay_whole_whatever_the_bound() -> None:
    entries = [entry(i) for i in range(1, 11)]
    log = RaftLog(entries, load=Store(entries).load, warm_bytes=0)
    log.commit_to(10)
    log.take_committed_entries()
    log.applied_to(4)
    assert log.cold_index == 4
    assert log.entry(5) is entries[4]
    with pytest.raises(AssertionError, match="cold"):
        log.entry(4)


def test_compaction_and_trailing_bytes_count_cold_entries_at_their_size() -> None:
    log_warm = applied_log(10, warm_bytes=1 << 20)
    log_cold = applied_log(10, warm_bytes=0)
    assert log_cold.trailing_start(10, 350) == log_warm.trailing_start(10, 350) == 7
    for log in (log_warm, log_cold):
        log.snapshot_taken(SnapshotPoint(8, 1))
        assert log.compact(5) == 5
        log.check_invariants()
    assert log_cold.cold_index == 10 and log_cold.slice(6, 10, 1 << 20) == log_warm.slice(6, 10, 1 << 20)


def test_a_stored_entry_that_differs_from_the_log_is_caught() -> None:
    entries = [entry(i) for i in range(1, 6)]
    store = Store(entries)
    log = applied_log(5, warm_bytes=0, store=store)
    store.entries[3] = entry(3, term=2)
    with pytest.raises(AssertionError, match="differ"):
        log.slice(1, 5, 1 << 20)


class StoringShell:
    """A perfect shell that keeps what each Ready persists, as the WAL does."""

    def __init__(self) -> None:
        self.stored: dict[int, Entry] = {}
        self.reads: list[tuple[int, int]] = []
        self.fail: OSError | None = None

    def load(self, lo: int, hi: int) -> list[Entry]:
        if self.fail is not None:
            raise self.fail
        self.reads.append((lo, hi))
        return [self.stored[i] for i in range(lo, hi + 1)]

    def drain(self, node: RaftNode):
        ready = node.ready()
        self.stored.update({e.index: e for e in ready.entries})
        node.advance(ready)
        return ready


def leader_with_cold_log(shell: StoringShell, proposals: int) -> RaftNode:
    """n1 leading with its NOOP and `proposals` entries committed by n2 and applied, all cold; n3 silent."""
    node = make_leader(load_entries=shell.load, warm_log_bytes=0)
    shell.stored[1] = Entry(1, node.term, EntryKind.NOOP, b"")  # make_leader's drain persisted the NOOP
    for i in range(proposals):
        node.propose(f"p{i}".encode())
    shell.drain(node)
    accept(node, "n2", node.last_index)
    while node.has_ready():
        shell.drain(node)
    assert node.applied_index == proposals + 1
    return node


def test_a_leader_catches_a_follower_up_from_read_back_entries() -> None:
    shell = StoringShell()
    node = leader_with_cold_log(shell, 20)
    assert shell.reads == []  # n2 was sent each entry while it was new
    # n3 answers now, from the start: everything it needs is cold and is read back.
    node.step(msg(T.APP_RESP, "n3", term=node.term, index=0, reject=True, reject_hint=0, commit=0))
    appends = [m for m in shell.drain(node).messages if m.type is T.APP and m.to_id == "n3"]
    assert [e.index for m in appends for e in m.entries] == list(range(1, 22))
    assert [e.data for m in appends for e in m.entries] == [shell.stored[i].data for i in range(1, 22)]
    assert shell.reads


def test_a_failing_read_back_comes_out_of_ready() -> None:
    shell = StoringShell()
    node = leader_with_cold_log(shell, 5)
    shell.fail = OSError(5, "Input/output error", "wal-1.log")
    node.step(msg(T.APP_RESP, "n3", term=node.term, index=0, reject=True, reject_hint=0, commit=0))
    with pytest.raises(OSError):
        node.ready()


def test_cold_entry_has_no_data() -> None:
    cold = ColdEntry(entry(3, size=40))
    assert (cold.index, cold.term, cold.data_bytes) == (3, 1, 40)
    with pytest.raises(AttributeError):
        cold.data  # noqa: B018
