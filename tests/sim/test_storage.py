"""The simulated disk's chained logs: the invariant checker is only as strong as `agreement`,
so it is pinned here on logs that start past 1 (compacted, or reset by an installed snapshot)."""

from __future__ import annotations

import random

from raftq.cluster.raft.messages import Entry, EntryKind, HardState

from tests.sim.storage import ChainedLog, SimStorage, StoredSnapshot, agreement, log_continues


def entries(first: int, terms: list[int], tag: bytes = b"") -> list[Entry]:
    return [Entry(first + k, term, EntryKind.NORMAL, tag + bytes((k,))) for k, term in enumerate(terms)]


def log_of(terms: list[int], tag: bytes = b"") -> ChainedLog:
    log = ChainedLog()
    log.append(entries(1, terms, tag))
    return log


def test_agreement_of_full_logs_is_the_common_prefix() -> None:
    a = log_of([1, 1, 2, 2, 3])
    b = log_of([1, 1, 2, 2, 3])
    assert agreement(a, b) == 5
    b.append(entries(4, [4, 4], b"x"))
    assert agreement(a, b) == 3
    assert agreement(a, ChainedLog()) == 0


def test_compaction_keeps_the_chain_comparable() -> None:
    a = log_of([1] * 10)
    b = a.copy()
    assert b.compact(6) == 6 and (b.base, b.base_term, b.last_index) == (6, 1, 10)
    assert b.hash_at(6) == a.hash_at(6) and b.hash_at(5) is None
    assert agreement(a, b) == 10
    b.append(entries(9, [2, 2], b"y"))  # overwrites 9..10 after the compaction point
    assert agreement(a, b) == 8
    c = log_of([1] * 4)  # ends before b starts: nothing to compare
    assert agreement(b, c) is None


def test_a_log_differing_before_its_start_is_seen_at_the_start() -> None:
    committed = log_of([1] * 10)
    other = log_of([1, 1, 2, 2, 2, 2, 2, 2], b"z")  # diverged at 3
    other.compact(6)
    assert agreement(committed, other) == 5  # lo - 1: they differ at or before 6


def test_reset_after_a_snapshot_and_log_continues() -> None:
    committed = log_of([1] * 12)
    snapshot = StoredSnapshot(8, 1, b"state", committed.hash_at(8))
    storage = SimStorage()
    storage.write(HardState(1, None), committed.entries[:5])
    storage.sync()
    assert not log_continues(storage.durable, snapshot)  # ends before the snapshot
    storage.reset_log(snapshot)
    assert log_continues(storage.durable, snapshot)  # starts right after it
    storage.write(None, committed.entries[8:])
    storage.sync()
    assert agreement(storage.durable, committed) == 12
    assert not log_continues(log_of([1] * 7 + [2, 2], b"w"), snapshot)  # other term at 8


def test_interrupted_reset_keeps_a_prefix_and_crash_replays_unsynced_writes_past_compaction() -> None:
    storage = SimStorage()
    storage.write(HardState(1, None), entries(1, [1] * 6))
    storage.sync()
    storage.write(None, entries(7, [1, 1]))  # unsynced
    storage.compact_log(4)
    storage.crash(random.Random(1), keep_unsynced_prefix=True)
    assert storage.durable.base == 4 and storage.durable.last_index in (6, 8)
    end = storage.reset_log_interrupted(random.Random(2))
    assert storage.durable.base == 4 and storage.durable.last_index == end
