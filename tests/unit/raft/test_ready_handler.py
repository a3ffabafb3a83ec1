"""The one Ready handler's order, and the core rules it reads (cluster/ready_handler.py).

The simulator drives the same handler under crashes (tests/sim, with a planted out-of-order
variant in test_planted_bugs.py); these are the cases one by one.
"""

from __future__ import annotations

import pytest

from raftq.cluster.raft.messages import Entry, EntryKind, HardState, Message, MessageType, SnapshotPoint
from raftq.cluster.raft.node import Ready, Role
from raftq.cluster.ready_handler import Advance, Apply, InstallSnapshot, Persist, Send, ServeReads, handle_ready

from tests.unit.raft.test_raft_node import accept, drain, make, make_leader, msg

T = MessageType
ENTRY = Entry(index=5, term=2, kind=EntryKind.NORMAL, data=b"x")
MESSAGE = Message(MessageType.APP, "n1", "n2", term=2)


def ready(**fields) -> Ready:
    base = dict(hard_state=None, entries=(), committed_entries=(), messages=(), read_states=(), must_sync=False)
    return Ready(**(base | fields))


def kinds(r: Ready) -> list[str]:
    return [type(action).__name__ for action in handle_ready(r)]


@pytest.mark.parametrize("r, expected", [
    (ready(), ["Advance"]),
    (ready(hard_state=HardState(2, "n1"), messages=(MESSAGE,), must_sync=True), ["Persist", "Send", "Advance"]),
    (ready(entries=(ENTRY,), messages=(MESSAGE,), must_sync=True), ["Persist", "Send", "Advance"]),
    (ready(entries=(ENTRY,), messages=(MESSAGE,), must_sync=True, send_before_persist=True),
     ["Send", "Persist", "Advance"]),
    # A leader's commit: nothing to persist, so it applies (answers clients) before it sends.
    (ready(committed_entries=(ENTRY,), messages=(MESSAGE,), send_before_persist=True),
     ["Apply", "Send", "Advance"]),
    (ready(entries=(ENTRY,), committed_entries=(ENTRY,), messages=(MESSAGE,), must_sync=True,
           send_before_persist=True),
     ["Send", "Persist", "Apply", "Advance"]),
    # A follower's answers wait for the disk but never for its apply.
    (ready(entries=(ENTRY,), committed_entries=(ENTRY,), messages=(MESSAGE,), must_sync=True),
     ["Persist", "Send", "Apply", "Advance"]),
    (ready(committed_entries=(ENTRY,), messages=(MESSAGE,)), ["Send", "Apply", "Advance"]),
    (ready(snapshot=SnapshotPoint(4, 1), entries=(ENTRY,), committed_entries=(ENTRY,), read_states=((1, 5),),
           messages=(MESSAGE,), must_sync=True),
     ["InstallSnapshot", "Persist", "Send", "Apply", "ServeReads", "Advance"]),
])
def test_actions_come_in_the_order_the_raft_rules_require(r: Ready, expected: list[str]) -> None:
    assert kinds(r) == expected


def test_actions_carry_the_ready_whole() -> None:
    r = ready(hard_state=HardState(3, None), entries=(ENTRY,), committed_entries=(ENTRY,), messages=(MESSAGE,),
              read_states=((7, 5),), must_sync=True, snapshot=SnapshotPoint(4, 1))
    assert list(handle_ready(r)) == [InstallSnapshot(SnapshotPoint(4, 1)), Persist(HardState(3, None), (ENTRY,), True),
                                     Send((MESSAGE,)), Apply((ENTRY,)), ServeReads(((7, 5),)), Advance(r)]


# ---------------------------------------------------------------------- the core's side


def replicating_leader(**options):
    """make_leader() whose followers both answered its first append: appends now flow."""
    leader = make_leader(**options)
    for peer in ("n2", "n3"):
        accept(leader, peer, leader.last_index)
    while leader.has_ready():
        drain(leader)
    return leader


def test_only_a_leader_without_a_new_term_or_vote_may_send_before_persisting() -> None:
    follower = make()
    follower.step(msg(T.VOTE, "n2", term=2, index=0, log_term=0))  # a new term and a vote: persist first
    r = follower.ready()
    assert r.hard_state == HardState(2, "n2") and r.messages and not r.send_before_persist
    follower.advance(r)

    leader = replicating_leader()
    leader.propose(b"job")
    r = leader.ready()
    assert r.hard_state is None and r.entries and r.messages and r.send_before_persist


def test_has_ready_is_a_pure_check() -> None:
    leader = replicating_leader()
    leader.propose(b"job")  # marks the followers as needing an append; ready() builds it
    assert leader.has_ready() and leader.has_ready()
    first = leader.ready()
    assert [m.type for m in first.messages] == [T.APP, T.APP]
    leader.advance(first)
    assert not leader.has_ready()


def test_has_ready_says_no_when_every_follower_is_paused() -> None:
    leader = replicating_leader(max_inflight_appends=1)
    leader.propose(b"a")
    drain(leader)  # one append in flight to each follower: both paused until they answer
    leader.propose(b"b")
    assert leader.has_ready()  # the new entry itself must still be persisted
    drain(leader)
    assert not leader.has_ready(), "paused followers: ready() would build nothing"


def test_compaction_is_one_call() -> None:
    leader = make_leader()
    for i in range(10):
        leader.propose(f"p{i}".encode())
    drain(leader)
    accept(leader, "n2", leader.last_index)
    while leader.has_ready():
        drain(leader)
    compaction = leader.compact_after_snapshot(SnapshotPoint(9, 1), keep_entries=3)
    assert (compaction.upto_index, compaction.dropped_count) == (6, 6)
    assert leader.first_index == 7 and leader.snapshot == SnapshotPoint(9, 1)
    # A byte bound keeps fewer: entries of 2 bytes, at most 2 bytes kept behind the snapshot.
    compaction = leader.compact_after_snapshot(SnapshotPoint(9, 1), keep_entries=3, keep_bytes=2)
    assert compaction.upto_index == 8 and leader.first_index == 9


def test_a_new_leader_serves_once_it_applied_its_own_noop() -> None:
    node = make(pre_vote=False, entries=[Entry(1, 1, EntryKind.NORMAL, b"old")], hard_state=HardState(1, None))
    while node.role is not Role.CANDIDATE:
        node.tick()
    node.step(msg(T.VOTE_RESP, "n2", term=node.term))
    assert node.role is Role.LEADER and node.last_index == 2  # its NOOP at 2
    assert not node.ready_to_serve(applied_index=1)
    assert node.ready_to_serve(applied_index=2)
    assert not make().ready_to_serve(applied_index=10), "a follower never serves"
