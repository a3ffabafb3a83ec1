"""Single Raft rules of RaftNode, one test each, plus a small randomized-network check.

The multi-node deterministic simulator lives in tests/sim/; the randomized test at the end is a
quick local guard for the core's safety rules (persist before send, one leader per term, agreed
applied entries, leader completeness) and for liveness once the network heals.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import pytest

from raftq.cluster.raft.errors import RaftConfigError, NotLeader, ProposalDropped, RaftError, StepRejected
from raftq.cluster.raft.messages import Entry, EntryKind, HardState, Message, MessageType, SnapshotPoint
from raftq.cluster.raft.node import RaftConfig, RaftNode, Ready, Role
from raftq.cluster.raft.progress import ProgressState

T = MessageType


def entries_of(*terms: int) -> list[Entry]:
    return [Entry(index=i, term=t, kind=EntryKind.NORMAL, data=f"e{i}".encode()) for i, t in enumerate(terms, 1)]


def make(node_id: str = "n1", peers: tuple[str, ...] = ("n2", "n3"), *, hard_state: HardState = HardState(),
         entries: list[Entry] | None = None, seed: int = 1, snapshot: SnapshotPoint = SnapshotPoint(),
         load_entries=None, **options) -> RaftNode:
    config = RaftConfig(node_id=node_id, peer_ids=peers, **options)
    return RaftNode(config, hard_state=hard_state, entries=entries or [], rng=random.Random(seed), snapshot=snapshot,
                    load_entries=load_entries)


def drain(node: RaftNode) -> Ready:
    """Play a perfect shell for one Ready."""
    ready = node.ready()
    node.advance(ready)
    return ready


def sent(node: RaftNode) -> list[Message]:
    return list(drain(node).messages) if node.has_ready() else []


def msg(type_: MessageType, from_id: str, to_id: str = "n1", **fields) -> Message:
    return Message(type_, from_id, to_id, **fields)


def make_leader(**options) -> RaftNode:
    """n1 of n1..n3, leader of term 1 with its NOOP at index 1 persisted (not yet committed)."""
    node = make(pre_vote=False, **options)
    while node.role is not Role.CANDIDATE:
        node.tick()
    node.step(msg(T.VOTE_RESP, "n2", term=node.term))
    assert node.role is Role.LEADER
    drain(node)
    return node


def accept(node: RaftNode, peer: str, index: int) -> None:
    node.step(msg(T.APP_RESP, peer, term=node.term, index=index, commit=0))


# ---------------------------------------------------------------------- configuration and timing

@pytest.mark.parametrize("options, complaint", [
    (dict(election_ticks=1, heartbeat_ticks=1), "election_ticks"),
    (dict(heartbeat_ticks=0), "heartbeat_ticks"),
    (dict(max_inflight_appends=0), "max_inflight_appends"),
    (dict(max_inflight_bytes=-1), "max_inflight_bytes"),
    (dict(max_entries_per_append=0), "max_entries_per_append"),
    (dict(max_uncommitted_bytes=-1), "max_uncommitted_bytes"),
    (dict(warm_log_bytes=-1), "warm_log_bytes"),
    (dict(peer_ids=("n2", "n2")), "repeat"),
    (dict(peer_ids=("n1", "n2")), "other than node_id"),
    (dict(node_id=""), "node_id"),
])
def test_config_validate(options: dict, complaint: str) -> None:
    config = replace(RaftConfig(node_id="n1", peer_ids=("n2", "n3")), **options)
    with pytest.raises(RaftConfigError, match=complaint):
        config.validate()
    with pytest.raises(RaftConfigError):
        RaftNode(config, hard_state=HardState(), entries=[], rng=random.Random(0))


def test_election_timeout_is_randomized_in_one_to_two_election_timeouts() -> None:
    seen = set()
    for seed in range(60):
        node = make(seed=seed, election_ticks=10)
        ticks = 0
        while node.role is Role.FOLLOWER:
            node.tick()
            ticks += 1
        assert node.role is Role.PRE_CANDIDATE and node.term == 0  # pre-vote: term unchanged
        assert 10 <= ticks < 20
        seen.add(ticks)
    assert len(seen) >= 5


def test_single_node_elects_itself_within_one_election_timeout_and_commits_after_persist() -> None:
    node = make(peers=(), election_ticks=10)
    for _ in range(10):
        node.tick()
    assert node.role is Role.LEADER and node.term == 1
    first = node.ready()
    assert first.hard_state == HardState(1, "n1") and [e.kind for e in first.entries] == [EntryKind.NOOP]
    assert first.committed_entries == ()  # not durable yet
    node.advance(first)
    assert node.commit_index == 1
    index, term = node.propose(b"x")
    carrying = node.ready()
    assert [e.index for e in carrying.entries] == [index] and carrying.committed_entries[-1].index == 1
    assert node.commit_index == 1
    node.advance(carrying)
    assert node.commit_index == index
    assert [e.data for e in drain(node).committed_entries] == [b"x"]
    assert node.applied_index == node.commit_index == node.last_index == 2
    assert not node.has_ready()


# ---------------------------------------------------------------------- votes

@pytest.mark.parametrize("last_index, last_term, granted", [
    (2, 2, True), (3, 2, True), (1, 3, True), (1, 2, False), (5, 1, False), (0, 0, False),
])
def test_vote_granted_only_to_an_up_to_date_log(last_index: int, last_term: int, granted: bool) -> None:
    """Raft §5.4.1: the voter's log is [1/1, 2/2]."""
    voter = make(hard_state=HardState(2, None), entries=entries_of(1, 2))
    voter.step(msg(T.VOTE, "n2", term=3, index=last_index, log_term=last_term))
    ready = drain(voter)
    assert [(m.type, m.reject) for m in ready.messages] == [(T.VOTE_RESP, not granted)]
    assert voter.term == 3
    assert ready.hard_state == HardState(3, "n2" if granted else None)


def test_one_vote_per_term_survives_a_restart() -> None:
    voter = make(hard_state=HardState(2, None))
    voter.step(msg(T.VOTE, "n2", term=3))
    ready = drain(voter)
    assert ready.hard_state == HardState(3, "n2") and not ready.messages[0].reject
    voter.step(msg(T.VOTE, "n2", term=3))  # a duplicate request is answered the same way
    voter.step(msg(T.VOTE, "n3", term=3))
    assert [m.reject for m in sent(voter)] == [False, True]
    restarted = make(hard_state=ready.hard_state)
    restarted.step(msg(T.VOTE, "n3", term=3))
    restarted.step(msg(T.VOTE, "n2", term=3))
    assert [m.reject for m in sent(restarted)] == [True, False]


def test_term_and_vote_come_in_the_same_ready_as_the_messages_that_depend_on_them() -> None:
    candidate = make(pre_vote=False)
    while candidate.role is not Role.CANDIDATE:
        candidate.tick()
    ready = candidate.ready()
    assert ready.hard_state == HardState(1, "n1") and ready.must_sync
    assert {(m.type, m.term) for m in ready.messages} == {(T.VOTE, 1)}
    candidate.advance(ready)

    follower = make("n2", ("n1", "n3"), hard_state=HardState(4, "n3"))
    follower.step(msg(T.APP, "n1", "n2", term=6, index=0, log_term=0))
    ready = follower.ready()
    assert ready.hard_state == HardState(6, None)
    assert [(m.type, m.term) for m in ready.messages] == [(T.APP_RESP, 6)]


def test_pre_vote_changes_neither_term_nor_vote() -> None:
    voter = make(hard_state=HardState(2, None), entries=entries_of(1, 2))
    voter.step(msg(T.PRE_VOTE, "n2", term=3, index=2, log_term=2))
    ready = drain(voter)
    assert ready.hard_state is None and voter.term == 2 and voter.voted_for is None
    assert [(m.type, m.term, m.reject) for m in ready.messages] == [(T.PRE_VOTE_RESP, 3, False)]


def test_voter_in_a_leader_lease_ignores_higher_term_vote_requests() -> None:
    follower = make("n2", ("n1", "n3"), hard_state=HardState(1, "n1"))
    follower.step(msg(T.HEARTBEAT, "n1", "n2", term=1))
    sent(follower)
    for type_ in (T.PRE_VOTE, T.VOTE):
        follower.step(msg(type_, "n3", "n2", term=2))
    assert sent(follower) == [] and follower.term == 1 and follower.leader_id == "n1"
    for _ in range(10):  # the lease runs out after an election timeout without the leader
        follower.tick()
    follower.step(msg(T.VOTE, "n3", "n2", term=2))
    assert [(m.type, m.reject) for m in sent(follower)] == [(T.VOTE_RESP, False)]


def test_duplicate_vote_responses_count_once() -> None:
    candidate = make(peers=("n2", "n3", "n4", "n5"), pre_vote=False)
    while candidate.role is not Role.CANDIDATE:
        candidate.tick()
    for _ in range(3):
        candidate.step(msg(T.VOTE_RESP, "n2", term=1))
    assert candidate.role is Role.CANDIDATE
    candidate.step(msg(T.VOTE_RESP, "n3", term=1))
    assert candidate.role is Role.LEADER


def test_stale_pre_vote_grant_from_an_earlier_campaign_does_not_count() -> None:
    node = make(hard_state=HardState(1, None))
    while node.role is not Role.PRE_CANDIDATE:
        node.tick()
    node.step(msg(T.PRE_VOTE_RESP, "n2", term=1))  # a grant for a pre-campaign at term 1
    assert node.role is Role.PRE_CANDIDATE
    node.step(msg(T.PRE_VOTE_RESP, "n2", term=2))
    assert node.role is Role.CANDIDATE and node.term == 2


# ---------------------------------------------------------------------- terms

def test_stale_term_messages_are_answered_or_dropped() -> None:
    node = make(hard_state=HardState(5, None))
    node.step(msg(T.APP, "n2", term=3))
    node.step(msg(T.HEARTBEAT, "n2", term=3))
    node.step(msg(T.PRE_VOTE, "n2", term=4))
    node.step(msg(T.VOTE, "n2", term=4))
    node.step(msg(T.VOTE_RESP, "n2", term=4))
    node.step(msg(T.APP_RESP, "n2", term=4, index=9))
    answers = [(m.type, m.term, m.reject) for m in sent(node)]
    assert answers == [(T.APP_RESP, 5, False), (T.APP_RESP, 5, False), (T.PRE_VOTE_RESP, 5, True)]
    assert node.term == 5 and node.role is Role.FOLLOWER

    quiet = make(hard_state=HardState(5, None), pre_vote=False, check_quorum=False)
    quiet.step(msg(T.APP, "n2", term=3))
    assert sent(quiet) == []


def test_stale_leader_steps_down_on_a_higher_term_answer() -> None:
    leader = make_leader()
    leader.step(msg(T.APP_RESP, "n2", term=7))
    assert leader.role is Role.FOLLOWER and leader.term == 7 and leader.leader_id is None
    with pytest.raises(NotLeader):
        leader.propose(b"x")


def test_candidate_follows_a_leader_of_its_own_term() -> None:
    node = make(pre_vote=False)
    while node.role is not Role.CANDIDATE:
        node.tick()
    node.step(msg(T.HEARTBEAT, "n3", term=node.term))
    assert node.role is Role.FOLLOWER and node.leader_id == "n3" and node.voted_for == "n1"


def test_check_quorum_leader_steps_down_without_a_majority() -> None:
    leader = make_leader(election_ticks=10)
    for _ in range(10):
        leader.tick()
    leader.step(msg(T.HEARTBEAT_RESP, "n2", term=1))  # heard from n2 in this window
    for _ in range(10):
        leader.tick()
    assert leader.role is Role.LEADER
    for _ in range(10):
        leader.tick()
    assert leader.role is Role.FOLLOWER and leader.term == 1 and leader.leader_id is None


def test_a_leader_stepping_down_for_check_quorum_sends_timeout_now_to_the_most_caught_up_voter() -> None:
    # Its inbound traffic cut (the chaos suite's one-way fault), the leader still reaches the
    # followers, which hear its heartbeats and would wait out an election timeout of their own
    # after it stepped down: TIMEOUT_NOW lets the most caught-up one campaign at once.
    leader = make_leader(election_ticks=10)
    accept(leader, "n3", 1)
    drain(leader)
    messages = []
    for _ in range(20):
        leader.tick()
        messages += sent(leader)
    assert leader.role is Role.FOLLOWER
    assert [m.to_id for m in messages if m.type is T.TIMEOUT_NOW] == ["n3"]


def test_a_leader_stepping_down_never_asks_a_voter_on_its_own_minority_side_to_campaign() -> None:
    # Five voters; the leader still hears n4 (the two of them are the minority side of a
    # partition). n4 is the most caught-up, but could not win: the TIMEOUT_NOW goes elsewhere.
    leader = make(peers=("n2", "n3", "n4", "n5"), pre_vote=False, election_ticks=10)
    while leader.role is not Role.CANDIDATE:
        leader.tick()
    leader.step(msg(T.VOTE_RESP, "n2", term=leader.term))
    leader.step(msg(T.VOTE_RESP, "n3", term=leader.term))
    assert leader.role is Role.LEADER
    drain(leader)
    messages = []
    for _ in range(30):
        accept(leader, "n4", 1)
        leader.tick()
        messages += sent(leader)
        if leader.role is not Role.LEADER:
            break
    assert leader.role is Role.FOLLOWER
    targets = [m.to_id for m in messages if m.type is T.TIMEOUT_NOW]
    assert len(targets) == 1 and targets[0] != "n4", targets


# ---------------------------------------------------------------------- replication

def test_committed_entries_are_handed_out_only_once_persisted() -> None:
    follower = make("n2", ("n1", "n3"))
    entries = tuple(entries_of(1, 1))
    follower.step(msg(T.APP, "n1", "n2", term=1, index=0, log_term=0, entries=entries, commit=2))
    assert follower.commit_index == 2
    first = follower.ready()
    assert first.entries == entries and first.committed_entries == ()
    assert [(m.type, m.index) for m in first.messages] == [(T.APP_RESP, 2)]
    follower.advance(first)
    assert drain(follower).committed_entries == entries
    assert follower.applied_index == 2


def test_leader_counts_itself_only_for_persisted_entries() -> None:
    leader = make_leader()
    leader.step(msg(T.HEARTBEAT_RESP, "n2", term=1))
    accept(leader, "n2", 1)
    assert leader.commit_index == 1
    index, _ = leader.propose(b"x")
    accept(leader, "n2", index)
    accept(leader, "n3", index)  # two followers suffice even though n1 has not persisted
    assert leader.commit_index == index
    leader2 = make_leader()
    index, _ = leader2.propose(b"x")
    accept(leader2, "n2", index)  # n2 + n1, but n1's copy of index 2 is not durable yet
    assert leader2.commit_index == 1
    drain(leader2)
    assert leader2.commit_index == index


def test_previous_term_entry_is_not_committed_by_counting_replicas() -> None:
    """Raft §5.4.2: a leader of term 2 with [1/1, 2/1] on a majority does not commit index 2."""
    node = make(hard_state=HardState(1, None), entries=entries_of(1, 1), pre_vote=False)
    while node.role is not Role.CANDIDATE:
        node.tick()
    node.step(msg(T.VOTE_RESP, "n2", term=2))
    drain(node)
    accept(node, "n2", 2)
    assert node.commit_index == 0
    accept(node, "n2", 3)  # the NOOP of term 2
    assert node.commit_index == 3


def test_duplicate_and_reordered_appends_never_truncate_matching_entries() -> None:
    follower = make("n2", ("n1", "n3"))
    old = msg(T.APP, "n1", "n2", term=1, index=0, log_term=0, entries=tuple(entries_of(1)))
    newer = msg(T.APP, "n1", "n2", term=1, index=1, log_term=1, entries=tuple(entries_of(1, 1, 1)[1:]))
    follower.step(newer)  # arrives first: rejected, the follower is too short
    follower.step(old)
    follower.step(newer)
    follower.step(old)  # a late duplicate
    answers = [(m.index, m.reject, m.reject_hint, m.hint_term) for m in sent(follower)]
    # The answer to `old` (index 1) is folded into the one to `newer` (index 3) that follows it.
    assert answers == [(1, True, 0, 0), (3, False, 0, 0), (1, False, 0, 0)]
    assert follower.last_index == 3


def test_conflicting_suffix_is_replaced() -> None:
    follower = make("n2", ("n1", "n3"), hard_state=HardState(1, None), entries=entries_of(1, 1, 1))
    conflicting = Entry(index=2, term=2, kind=EntryKind.NOOP, data=b"")
    follower.step(msg(T.APP, "n1", "n2", term=2, index=1, log_term=1, entries=(conflicting,)))
    ready = drain(follower)
    assert ready.entries == (conflicting,) and follower.last_index == 2
    assert [(m.index, m.reject) for m in ready.messages] == [(2, False)]


def test_rejection_hint_names_the_conflicting_term_and_its_first_index() -> None:
    follower = make("n2", ("n1", "n3"), hard_state=HardState(3, None), entries=entries_of(1, 2, 2, 2, 2))
    follower.step(msg(T.APP, "n1", "n2", term=3, index=4, log_term=3))
    follower.step(msg(T.APP, "n1", "n2", term=3, index=9, log_term=3))
    answers = [(m.index, m.reject, m.reject_hint, m.hint_term) for m in sent(follower)]
    assert answers == [(4, True, 2, 2), (9, True, 5, 0)]


def test_stale_append_answers_never_move_progress_backwards() -> None:
    leader = make_leader()
    for data in (b"a", b"b", b"c"):
        leader.propose(data)
    sent(leader)
    accept(leader, "n2", 4)
    details = leader.progress_details["n2"]
    assert (details.match_index, details.state) == (4, ProgressState.REPLICATE)
    accept(leader, "n2", 2)  # a reordered older answer
    leader.step(msg(T.APP_RESP, "n2", term=1, index=1, reject=True, reject_hint=0))  # a stale rejection
    details = leader.progress_details["n2"]
    assert (details.match_index, details.next_index, details.state) == (4, 5, ProgressState.REPLICATE)
    assert leader.progress == {"n2": 4, "n3": 0}


def test_inflight_appends_are_bounded() -> None:
    leader = make_leader(max_entries_per_append=1, max_inflight_appends=2)
    accept(leader, "n2", 1)
    sent(leader)
    for data in (b"a", b"b", b"c", b"d"):
        leader.propose(data)
    to_n2 = [m for m in sent(leader) if m.to_id == "n2" and m.type is T.APP]
    assert [[e.index for e in m.entries] for m in to_n2] == [[2], [3]]
    accept(leader, "n2", 2)
    to_n2 = [m for m in sent(leader) if m.to_id == "n2" and m.type is T.APP]
    assert [[e.index for e in m.entries] for m in to_n2] == [[4]]


def test_inflight_bytes_are_bounded_but_one_append_always_goes() -> None:
    # Each entry counts its data + 16 bytes of framing: 116 bytes, so a 200-byte bound lets a
    # second append out (116 < 200) and holds the third (232 >= 200) until an answer comes.
    leader = make_leader(max_entries_per_append=1, max_inflight_appends=64, max_inflight_bytes=200)
    accept(leader, "n2", 1)
    sent(leader)
    for data in (b"a" * 100, b"b" * 100, b"c" * 100, b"d" * 1000):
        leader.propose(data)
    to_n2 = [m for m in sent(leader) if m.to_id == "n2" and m.type is T.APP]
    assert [[e.index for e in m.entries] for m in to_n2] == [[2], [3]]
    assert leader.progress_details["n2"].inflight_bytes == 232
    accept(leader, "n2", 3)
    to_n2 = [m for m in sent(leader) if m.to_id == "n2" and m.type is T.APP]
    assert [[e.index for e in m.entries] for m in to_n2] == [[4], [5]]  # 1016 bytes: over, but alone
    assert leader.progress_details["n2"].inflight_bytes == 116 + 1016


def test_appends_respect_the_byte_bound_but_carry_at_least_one_entry() -> None:
    leader = make_leader(max_append_bytes=120)  # an entry counts its data + 16 bytes of framing
    accept(leader, "n2", 1)
    sent(leader)
    for size in (40, 40, 40, 300):
        leader.propose(b"x" * size)
    sizes = [[len(e.data) for e in m.entries] for m in sent(leader) if m.to_id == "n2" and m.type is T.APP]
    assert sizes == [[40, 40], [40], [300]]


def test_appends_may_wait_only_for_followers_beyond_the_quorums_need() -> None:
    leader = make_leader()
    assert leader.appends_may_wait() == frozenset()  # both probing: each append waits for an answer
    accept(leader, "n2", 1)
    accept(leader, "n3", 1)
    assert leader.appends_may_wait() == {"n3"}  # a tie: the one chosen first (by id) stays first
    for data in (b"a", b"b", b"c"):
        leader.propose(data)
    sent(leader)
    accept(leader, "n3", 4)  # n2 stops answering: n3 is ahead, but the choice waits for a tick
    assert leader.appends_may_wait() == {"n3"}
    leader.tick()
    assert leader.appends_may_wait() == {"n2"}
    accept(leader, "n2", 4)  # a tie again: no swing back
    leader.tick()
    assert leader.appends_may_wait() == {"n2"}
    assert make(pre_vote=False).appends_may_wait() == frozenset()  # only a leader holds anything


def test_appends_may_wait_for_two_of_five_never_for_a_transfer_target() -> None:
    leader = make(peers=("n2", "n3", "n4", "n5"), pre_vote=False)
    while leader.role is not Role.CANDIDATE:
        leader.tick()
    leader.step(msg(T.VOTE_RESP, "n2", term=leader.term))
    leader.step(msg(T.VOTE_RESP, "n3", term=leader.term))
    drain(leader)
    for peer in ("n2", "n3", "n4", "n5"):
        accept(leader, peer, 1)
    assert leader.appends_may_wait() == {"n4", "n5"}  # the leader and two followers are a quorum
    leader.transfer_leadership("n5")
    assert leader.appends_may_wait() == {"n4"}


def test_appends_that_arrive_together_are_answered_once_for_the_last() -> None:
    follower = make("n2", ("n1", "n3"))
    for index in (0, 1, 2):  # three appends of one frame, stepped before the follower's next Ready
        follower.step(msg(T.APP, "n1", "n2", term=1, index=index, log_term=1 if index else 0,
                          entries=tuple(entries_of(1, 1, 1)[index:index + 1]), commit=index))
    answers = [(m.index, m.reject) for m in sent(follower)]
    assert answers == [(3, False)]
    follower.step(msg(T.APP, "n1", "n2", term=1, index=7, log_term=1, entries=(), commit=3))  # a gap
    follower.step(msg(T.APP, "n1", "n2", term=1, index=3, log_term=1, entries=(), commit=3))
    answers = [(m.index, m.reject) for m in sent(follower)]
    assert answers == [(7, True), (3, False)]  # a rejection is never folded into an answer


def test_heartbeat_commit_is_clamped_to_the_followers_match() -> None:
    leader = make_leader()
    accept(leader, "n2", 1)
    assert leader.commit_index == 1
    sent(leader)
    leader.tick()
    beats = {m.to_id: m.commit for m in sent(leader) if m.type is T.HEARTBEAT}
    assert beats == {"n2": 1, "n3": 0}


def test_uncommitted_bytes_are_bounded() -> None:
    leader = make_leader(max_uncommitted_bytes=100)
    leader.propose(b"x" * 60)
    with pytest.raises(ProposalDropped):
        leader.propose(b"x" * 50)
    index, _ = leader.propose(b"x" * 40)  # exactly at the bound
    drain(leader)
    accept(leader, "n2", index)
    assert leader.commit_index == index
    leader.propose(b"x" * 100)  # committed bytes no longer count
    big = make_leader(max_uncommitted_bytes=100)
    big.propose(b"x" * 500)  # with nothing uncommitted, one entry of any size goes through


# ---------------------------------------------------------------------- reads and misuse

def test_read_index_needs_leadership_and_a_heartbeat_quorum() -> None:
    follower = make("n2", ("n1", "n3"))
    follower.step(msg(T.HEARTBEAT, "n1", "n2", term=1))
    with pytest.raises(NotLeader) as caught:
        follower.read_index(1)
    assert caught.value.leader_id == "n1"
    leader = make_leader()
    leader.read_index(5)  # the NOOP of term 1 is not committed: held back
    assert all(m.type is not T.HEARTBEAT for m in sent(leader))
    accept(leader, "n2", 1)
    beats = [m for m in sent(leader) if m.type is T.HEARTBEAT]
    assert {m.context for m in beats} == {5}
    leader.step(msg(T.HEARTBEAT_RESP, "n3", term=1, context=4))  # unknown context: ignored
    assert drain(leader).read_states == ()
    leader.step(msg(T.HEARTBEAT_RESP, "n3", term=1, context=5))
    assert drain(leader).read_states == ((5, 1),)


@pytest.mark.parametrize("message", [
    msg(T.APP, "n1", term=1),  # from itself (a sender outside the membership is allowed: a new learner)
    msg(T.APP, "n2", "n3", term=1),
    msg(T.APP, "n2", term=1, index=0, entries=(Entry(1, 1, EntryKind.CONFIG, b"not a membership"),)),
    msg(T.VOTE, "n2", term=1, entries=tuple(entries_of(1))),
    msg(T.APP, "n2", term=1, index=0, entries=(Entry(2, 1, EntryKind.NORMAL, b""),)),
    msg(T.APP, "n2", term=1, index=0, entries=(Entry(1, 2, EntryKind.NORMAL, b""),)),
    msg(T.APP, "n2", term=2, index=0, entries=(Entry(1, 2, EntryKind.NORMAL, b""), Entry(2, 1, EntryKind.NORMAL, b""))),
])
def test_step_rejects_malformed_or_misaddressed_messages(message: Message) -> None:
    node = make()
    with pytest.raises(StepRejected):
        node.step(message)
    assert node.term == 0 and not node.has_ready()


def test_leader_rejects_an_answer_for_an_index_it_never_sent() -> None:
    leader = make_leader()
    with pytest.raises(StepRejected):
        accept(leader, "n2", 99)


# ---------------------------------------------------------------------- randomized network

@dataclass
class _Disk:
    hard_state: HardState = field(default_factory=HardState)
    entries: list[Entry] = field(default_factory=list)


class _Cluster:
    """Nodes on perfect disks, a lossy / duplicating / reordering network, and crash-restarts."""

    def __init__(self, size: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.ids = [f"n{i}" for i in range(1, size + 1)]
        self.disks = {node_id: _Disk() for node_id in self.ids}
        self.nodes: dict[str, RaftNode] = {}
        self.network: list[Message] = []
        self.cut: set[str] = set()
        self.applied: dict[int, Entry] = {}
        self.leaders: dict[int, str] = {}
        self.commit_terms: list[int] = []
        for node_id in self.ids:
            self.start(node_id)

    def start(self, node_id: str) -> None:
        config = RaftConfig(node_id=node_id, peer_ids=tuple(p for p in self.ids if p != node_id),
                            election_ticks=5, max_entries_per_append=3, max_inflight_appends=2)
        disk = self.disks[node_id]
        self.nodes[node_id] = RaftNode(config, hard_state=disk.hard_state, entries=list(disk.entries),
                                       rng=random.Random(self.rng.random()))

    def handle_ready(self, node_id: str) -> None:
        node, disk = self.nodes[node_id], self.disks[node_id]
        while node.has_ready():
            ready = node.ready()
            if ready.hard_state is not None:
                disk.hard_state = ready.hard_state
            if ready.entries:
                del disk.entries[ready.entries[0].index - 1:]
                disk.entries.extend(ready.entries)
            for m in ready.messages:  # everything a message claims must be durable by now
                if m.type not in (T.PRE_VOTE, T.PRE_VOTE_RESP):
                    assert m.term == disk.hard_state.term, (m, disk.hard_state)
                if m.type is T.VOTE_RESP and not m.reject:
                    assert disk.hard_state.voted_for == m.to_id
                if m.type is T.APP_RESP and not m.reject:
                    assert m.index <= len(disk.entries)
            self.network.extend(ready.messages)
            for entry in ready.committed_entries:
                assert disk.entries[entry.index - 1] == entry, "applied an entry that is not durable"
                assert self.applied.setdefault(entry.index, entry) == entry, "two entries applied at one index"
            node.advance(ready)

    def check(self) -> None:
        leaders = [(node_id, node) for node_id, node in self.nodes.items() if node.role is Role.LEADER]
        for node_id, node in leaders:
            assert self.leaders.setdefault(node.term, node_id) == node_id, "two leaders in one term"
            for index in range(len(self.commit_terms) + 1, node.commit_index + 1):
                self.commit_terms.append(node.term)  # the term in which index was first committed
        for node_id, node in leaders:
            # Leader Completeness (Raft §5.4): entries committed in earlier terms are in the log.
            entries = self.disks[node_id].entries
            for index, entry in self.applied.items():
                if self.commit_terms[index - 1] < node.term:
                    assert index <= len(entries) and entries[index - 1] == entry, (node_id, index)

    def deliver_one(self, drop: float, duplicate: float) -> None:
        m = self.network.pop(self.rng.randrange(len(self.network)))  # any order: reordering
        if m.from_id in self.cut or m.to_id in self.cut or self.rng.random() < drop:
            return
        if self.rng.random() < duplicate:
            self.network.append(m)
        self.nodes[m.to_id].step(m)
        self.handle_ready(m.to_id)

    def random_step(self) -> None:
        roll, node_id = self.rng.random(), self.rng.choice(self.ids)
        node = self.nodes[node_id]
        if roll < 0.45 and self.network:
            self.deliver_one(drop=0.1, duplicate=0.1)
        elif roll < 0.75:
            node.tick()
        elif roll < 0.85:
            try:
                node.propose(f"{node_id}-{self.rng.randrange(10**6)}".encode())
            except RaftError:
                pass
        elif roll < 0.88:
            try:
                node.read_index(self.rng.randrange(100))
            except NotLeader:
                pass
        elif roll < 0.93:
            self.cut = {node_id} if self.rng.random() < 0.5 else set()
        elif roll < 0.95:
            self.start(node_id)  # crash: volatile state is lost, the disk survives
        self.handle_ready(node_id)
        self.check()

    def run_healed_until_committed(self, rounds_max: int) -> None:
        self.cut = set()
        marker = b"final"
        proposed_term = -1
        for _ in range(rounds_max):
            for node_id in self.ids:
                self.nodes[node_id].tick()
                self.handle_ready(node_id)
            while self.network:
                self.deliver_one(drop=0.0, duplicate=0.0)
            self.check()
            # A stale leader of an older term may linger (without check-quorum): use the newest,
            # and propose again whenever leadership moved, as a client would retry.
            leaders = [n for n in self.nodes.values() if n.role is Role.LEADER]
            leader = max(leaders, key=lambda n: n.term, default=None)
            if leader is not None and leader.term != proposed_term:
                leader.propose(marker)
                proposed_term = leader.term
            if any(e.data == marker for e in self.applied.values()) and all(
                    n.applied_index == n.commit_index == n.last_index for n in self.nodes.values()):
                return
        raise AssertionError("no progress after the network healed")


@pytest.mark.parametrize("size, seed", [(3, s) for s in range(12)] + [(5, s) for s in range(4)])
def test_random_network_keeps_raft_safe_and_recovers(size: int, seed: int) -> None:
    cluster = _Cluster(size, seed)
    for _ in range(1500):
        cluster.random_step()
    cluster.run_healed_until_committed(rounds_max=200)
