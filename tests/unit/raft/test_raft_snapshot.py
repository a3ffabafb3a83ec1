"""Log compaction and InstallSnapshot in the Raft core (Raft §7), one rule per test.

The shell's side (snapshot files, chunked transfer) is tested elsewhere; here a snapshot is only
its point (index, term), as the core sees it.
"""

from __future__ import annotations

import random

import pytest

from raftq.cluster.raft.log import Compacted, RaftLog
from raftq.cluster.raft.messages import Entry, EntryKind, HardState, Message, MessageType, SnapshotPoint
from raftq.cluster.raft.node import RaftConfig, RaftNode, Role
from raftq.cluster.raft.progress import ProgressState

from tests.unit.raft.test_raft_node import accept, drain, entries_of, make, make_leader, msg, sent

T = MessageType


def leader_with_entries(count: int) -> RaftNode:
    """n1 leading term 1 with `count` proposals after its NOOP, all committed by n2 (n3 silent)."""
    node = make_leader()
    for i in range(count):
        node.propose(f"p{i}".encode())
    drain(node)
    accept(node, "n2", node.last_index)
    while node.has_ready():
        drain(node)
    assert node.commit_index == node.last_index == count + 1
    return node


def test_log_with_offset_answers_terms_and_refuses_compacted_ones() -> None:
    entries = [Entry(i, 2, EntryKind.NORMAL, b"") for i in range(11, 16)]
    log = RaftLog(entries, SnapshotPoint(12, 2))
    assert (log.offset, log.last_index, log.last_term) == (10, 15, 2)
    assert log.commit_index == log.applied_index == 12  # the snapshot holds committed state
    assert log.term(12) == 2 and log.term(16) == 0
    assert not log.has_term(10) and log.has_term(11)
    with pytest.raises(Compacted):
        log.term(10)
    assert log.compact(14) == 2  # clamped to the snapshot point
    assert log.offset == 12 and log.term(12) == 2
    log.check_invariants()


def test_restart_from_a_snapshot_with_no_entries_after_it() -> None:
    node = make(entries=[], snapshot=SnapshotPoint(50, 3), hard_state=HardState(3, None))
    assert (node.commit_index, node.applied_index, node.last_index, node.first_index) == (50, 50, 50, 51)
    # Its log is as up to date as (50, 3): a candidate at (50, 3) gets the vote, (49, 3) does not.
    node.step(msg(T.VOTE, "n2", term=4, index=50, log_term=3))
    assert not drain(node).messages[0].reject
    other = make(entries=[], snapshot=SnapshotPoint(50, 3), hard_state=HardState(3, None))
    other.step(msg(T.VOTE, "n2", term=4, index=49, log_term=3))
    assert drain(other).messages[0].reject


def test_compact_drops_entries_in_memory_but_keeps_the_trailing_ones() -> None:
    node = leader_with_entries(20)
    assert node.compact(SnapshotPoint(18, 1), upto_index=15) == 15
    assert node.first_index == 16 and node.snapshot == SnapshotPoint(18, 1)
    with pytest.raises(AssertionError):
        node.compact(SnapshotPoint(30, 1), upto_index=30)  # past applied


def test_follower_behind_the_compaction_point_gets_a_snapshot_then_appends() -> None:
    node = leader_with_entries(20)  # n3 never answered: its next index is still 2
    node.compact(SnapshotPoint(21, 1), upto_index=21)
    node.step(msg(T.HEARTBEAT_RESP, "n3", term=1))
    out = [m for m in sent(node) if m.to_id == "n3" and m.type is not T.HEARTBEAT]
    assert [(m.type, m.index, m.log_term) for m in out] == [(T.SNAP, 21, 1)]
    assert node.progress_details["n3"].state is ProgressState.SNAPSHOT
    # Paused while the shell sends it: more proposals do not reach n3.
    node.propose(b"later")
    assert not [m for m in sent(node) if m.to_id == "n3" and m.type is T.APP]
    # n3 installed it and answers from the snapshot point: back to replicating after it.
    accept(node, "n3", 21)
    assert node.progress_details["n3"].state is ProgressState.REPLICATE
    out = [m for m in sent(node) if m.to_id == "n3" and m.type is T.APP]
    assert out and out[0].index == 21 and out[0].log_term == 1 and out[0].entries[0].index == 22


@pytest.mark.parametrize("delivered, next_index", [(True, 22), (False, 1)])
def test_a_reported_transfer_ends_the_snapshot_state(delivered: bool, next_index: int) -> None:
    node = leader_with_entries(20)
    node.compact(SnapshotPoint(21, 1), upto_index=21)
    node.step(msg(T.HEARTBEAT_RESP, "n3", term=1))
    drain(node)
    node.report_snapshot("n3", delivered=delivered)
    out = [m for m in sent(node) if m.to_id == "n3" and m.type is not T.HEARTBEAT]
    if delivered:  # probe right after the snapshot, in case the follower's answer was lost
        assert [(m.type, m.index) for m in out] == [(T.APP, 21)]
        assert node.progress_details["n3"].next_index == next_index
    else:  # still compacted: a new snapshot request
        assert [(m.type, m.index) for m in out] == [(T.SNAP, 21)]


def test_follower_installs_a_snapshot_it_does_not_share() -> None:
    node = make("n2", ("n1", "n3"), entries=entries_of(1, 1, 2), hard_state=HardState(2, None))
    node.step(msg(T.SNAP, "n1", to_id="n2", term=3, index=40, log_term=3))
    ready = drain(node)
    assert ready.snapshot == SnapshotPoint(40, 3) and ready.must_sync
    assert [(m.type, m.index) for m in ready.messages] == [(T.APP_RESP, 40)]
    assert (node.commit_index, node.applied_index, node.last_index) == (40, 40, 40)
    assert not ready.committed_entries  # the state machine restores from the snapshot instead
    # Appends continue after it.
    node.step(msg(T.APP, "n1", to_id="n2", term=3, index=40, log_term=3, commit=41,
                  entries=(Entry(41, 3, EntryKind.NORMAL, b"x"),)))
    ready = drain(node)
    assert [e.index for e in ready.entries] == [41]
    drain(node)
    assert node.applied_index == 41


def test_follower_whose_log_holds_the_snapshot_point_keeps_its_log() -> None:
    node = make("n2", ("n1", "n3"), entries=entries_of(1, 1, 1, 1), hard_state=HardState(1, None))
    node.step(msg(T.SNAP, "n1", to_id="n2", term=1, index=3, log_term=1))
    ready = drain(node)
    assert ready.snapshot is None and node.commit_index == 3 and node.last_index == 4
    assert [m.index for m in ready.messages] == [3]


def test_stale_snapshot_is_answered_with_the_commit_index_and_ignored() -> None:
    node = make("n2", ("n1", "n3"), entries=[], snapshot=SnapshotPoint(50, 2), hard_state=HardState(2, None))
    node.step(msg(T.SNAP, "n1", to_id="n2", term=2, index=30, log_term=2))
    ready = drain(node)
    assert ready.snapshot is None and node.applied_index == 50
    assert [(m.type, m.index) for m in ready.messages] == [(T.APP_RESP, 50)]


def test_a_candidate_steps_down_for_a_snapshot_of_its_term() -> None:
    node = make("n2", ("n1", "n3"), pre_vote=False)
    while node.role is not Role.CANDIDATE:
        node.tick()
    node.step(msg(T.SNAP, "n1", to_id="n2", term=node.term, index=9, log_term=1))
    assert node.role is Role.FOLLOWER and node.leader_id == "n1"
    assert drain(node).snapshot == SnapshotPoint(9, 1)


def test_random_compaction_keeps_three_nodes_consistent() -> None:
    """Compaction at random points with one follower often cut off: every node applies the same
    entries or installs a snapshot covering them, and all end equal."""
    rng = random.Random(5)
    config = {p: RaftConfig(node_id=p, peer_ids=tuple(q for q in ("n1", "n2", "n3") if q != p), pre_vote=False)
              for p in ("n1", "n2", "n3")}
    nodes = {p: RaftNode(c, hard_state=HardState(), entries=[], rng=random.Random(rng.random())) for p, c in config.items()}
    applied: dict[str, list[int]] = {p: [] for p in nodes}
    snapshots: dict[str, int] = {p: 0 for p in nodes}
    inflight: list[Message] = []
    for step in range(3000):
        cut_off = "n3" if (step // 300) % 2 else None
        for node in nodes.values():
            node.tick()
        leader = next((n for n in nodes.values() if n.role is Role.LEADER), None)
        if leader is not None and rng.random() < 0.5:
            leader.propose(f"s{step}".encode())
        for p, node in nodes.items():
            while node.has_ready():
                ready = node.ready()
                if ready.snapshot is not None:
                    # "Restore": the snapshot's content is every index up to its point.
                    applied[p] = list(range(1, ready.snapshot.index + 1))
                    snapshots[p] += 1
                applied[p] += [e.index for e in ready.committed_entries]
                inflight += [m for m in ready.messages if cut_off not in (m.from_id, m.to_id)]
                node.advance(ready)
            if node.applied_index > node.snapshot.index + 20 and rng.random() < 0.2:
                # The shell's "snapshot": the point at applied, keep 5 entries behind it.
                point = SnapshotPoint(node.applied_index, _term_at(node, node.applied_index))
                node.compact(point, node.applied_index - 5)
        rng.shuffle(inflight)
        batch, inflight = inflight, []
        for m in batch:
            if m.type is T.SNAP:
                # The shell's transfer: the follower gets the file, then the message.
                nodes[m.from_id].report_snapshot(m.to_id, delivered=True)
            nodes[m.to_id].step(m)
    for p in nodes:
        assert applied[p] == list(range(1, nodes[p].applied_index + 1)), p
    assert snapshots["n3"] >= 1, "n3 never needed a snapshot: the test did not test anything"
    assert len({n.applied_index for n in nodes.values()}) <= 2


def _term_at(node: RaftNode, index: int) -> int:
    return node._log.term(index)  # noqa: SLF001 - the test plays the shell, which knows its entries' terms


def test_compaction_point_keeps_at_most_the_entries_and_bytes_asked_for() -> None:
    node = make_leader()
    for _ in range(30):
        node.propose(b"x" * 100)
    drain(node)
    accept(node, "n2", node.last_index)
    while node.has_ready():
        drain(node)
    node.compact(SnapshotPoint(31, 1), 0)
    assert node.compaction_point(keep_entries=10, keep_bytes=1 << 20) == 21  # the entry bound
    assert node.compaction_point(keep_entries=10, keep_bytes=250) == 29  # 2 entries = 200 bytes fit
    assert node.compaction_point(keep_entries=0, keep_bytes=1 << 20) == 31
