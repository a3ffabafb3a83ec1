"""Membership changes and leadership transfer in the Raft core, one rule per test, plus a
randomized cluster whose members come and go (cheap: the simulator runs the long sweep)."""

from __future__ import annotations

import random

import pytest

from raftq.cluster.raft.errors import ChangeRefused, NotLeader, ProposalDropped, RaftError
from raftq.cluster.raft.membership import Member, Membership, MembershipDecodeError, quorum_size
from raftq.cluster.raft.messages import TRANSFER_CONTEXT, Entry, EntryKind, HardState, Message, MessageType
from raftq.cluster.raft.node import RaftConfig, RaftNode, Role
from raftq.cluster.raft.progress import ProgressState
from tests.unit.raft.test_raft_node import accept, drain, make, make_leader, msg, sent

T = MessageType


def committed_leader(**options) -> RaftNode:
    """n1 of n1..n3, leader of term 1 with its NOOP (index 1) committed."""
    leader = make_leader(**options)
    accept(leader, "n2", 1)
    drain(leader)
    assert leader.commit_index == 1
    return leader


def config_entries(node: RaftNode) -> list[Entry]:
    return [e for e in drain(node).entries if e.kind is EntryKind.CONFIG]


# ---------------------------------------------------------------------- the value

def test_membership_round_trips_and_refuses_garbage() -> None:
    membership = Membership.of_voters({"n1": "http://a", "n2": "http://b"}).with_learner("n4", "http://d")
    membership = membership.without("n2")
    assert Membership.decode(membership.encode()) == membership
    assert membership.voters == ("n1",) and membership.learners == ("n4",) and membership.removed == ("n2",)
    for garbage in (b"", b"\x93\x01\x02\x03", Membership().encode()[:-1]):
        with pytest.raises(MembershipDecodeError):
            Membership.decode(garbage)
    assert [quorum_size(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]


# ---------------------------------------------------------------------- adding a learner

def test_a_learner_is_in_effect_on_append_counts_for_nothing_and_is_promoted_once_caught_up() -> None:
    leader = committed_leader()
    index, term = leader.add_learner("n4", "http://127.0.0.1:7004")
    assert leader.membership.learners == ("n4",) and leader.membership_pending  # on append, not commit
    ready = drain(leader)
    assert ready.membership is not None and ready.membership.get("n4") == Member("n4", "http://127.0.0.1:7004", False)
    assert any(m.to_id == "n4" for m in ready.messages), "the new learner gets appends at once"
    # The learner's copy does not make a majority: n1 + n4 of the voters n1..n3 is one voter.
    accept(leader, "n4", index)
    drain(leader)
    assert leader.commit_index < index
    assert leader.membership.learners == ("n4",), "no promotion before the change commits"
    accept(leader, "n2", index)
    assert leader.commit_index == index
    # Caught up (REPLICATE, within the bound): the leader appends the promotion by itself.
    assert leader.membership.voters == ("n1", "n2", "n3", "n4")
    assert leader.membership.is_voter("n4") and leader.membership_pending
    promote = config_entries(leader)
    assert len(promote) == 1 and Membership.decode(promote[0].data).is_voter("n4")
    # Four voters: a majority is three.
    accept(leader, "n2", promote[0].index)
    drain(leader)
    assert leader.commit_index < promote[0].index
    accept(leader, "n4", promote[0].index)
    drain(leader)
    assert leader.commit_index == promote[0].index


def test_a_learner_far_behind_is_not_promoted() -> None:
    leader = committed_leader(learner_catch_up_entries=2)
    index, _ = leader.add_learner("n4", "u4")
    drain(leader)
    accept(leader, "n2", index)
    for i in range(5):
        leader.propose(b"x%d" % i)
    drain(leader)
    leader.step(msg(T.APP_RESP, "n4", term=1, index=1, commit=1))  # 6 behind (its last index is 1)
    leader.tick()
    assert leader.membership.learners == ("n4",)
    accept(leader, "n4", leader.last_index)
    assert leader.membership.is_voter("n4")


@pytest.mark.parametrize("why", ["noop not committed", "change pending", "member", "removed", "self"])
def test_changes_that_may_not_happen_are_refused_and_change_nothing(why: str) -> None:
    leader = make_leader() if why == "noop not committed" else committed_leader()
    if why == "change pending":
        leader.add_learner("n4", "u4")
    if why == "removed":
        index, _ = leader.remove_member("n3")
        drain(leader)
        accept(leader, "n2", index)
    before, last = leader.membership, leader.last_index
    with pytest.raises(ChangeRefused) as refused:
        if why in ("noop not committed", "change pending"):
            leader.add_learner("n5", "u5")
        elif why == "member":
            leader.add_learner("n2", "u2")
        elif why == "removed":
            leader.add_learner("n3", "u3")
        else:
            leader.remove_member("n1")
    assert refused.value.retryable == (why in ("noop not committed", "change pending"))
    assert leader.membership == before and leader.last_index == last


def test_a_follower_refuses_changes_with_the_leader_hint() -> None:
    follower = make()
    follower.step(msg(T.HEARTBEAT, "n2", term=1))
    with pytest.raises(NotLeader) as not_leader:
        follower.add_learner("n4", "u4")
    assert not_leader.value.leader_id == "n2"


# ---------------------------------------------------------------------- removing

def test_a_removed_voter_stops_counting_at_once() -> None:
    leader = committed_leader()
    leader.propose(b"a")
    drain(leader)
    accept(leader, "n3", 2)  # n3 holds entry 2; n2 is gone for good
    drain(leader)
    assert leader.commit_index == 2
    index, _ = leader.remove_member("n2")
    assert leader.membership.voters == ("n1", "n3") and "n2" not in leader.progress
    leader.propose(b"b")
    drain(leader)
    accept(leader, "n3", leader.last_index)
    drain(leader)
    assert leader.commit_index == leader.last_index, "n1 + n3 are the majority of two"
    assert not [m for m in drain(leader).messages if m.to_id == "n2"]


def test_removing_down_to_one_voter_commits_alone() -> None:
    leader = committed_leader()
    index, _ = leader.remove_member("n3")
    drain(leader)
    accept(leader, "n2", index)
    index, _ = leader.remove_member("n2")
    drain(leader)
    drain(leader)
    assert leader.commit_index == index and leader.membership.voters == ("n1",)


def test_a_truncated_config_entry_takes_its_membership_with_it() -> None:
    follower = make()
    add = Membership.of_voters({"n1": "", "n2": "", "n3": ""}).with_learner("n4", "u4")
    follower.step(msg(T.APP, "n2", term=1, index=0, entries=(Entry(1, 1, EntryKind.CONFIG, add.encode()),)))
    assert follower.membership.learners == ("n4",)
    assert drain(follower).membership == add
    # A leader of term 2 never had it: its entry 1 replaces ours, and the membership falls back.
    follower.step(msg(T.APP, "n3", term=2, index=0, entries=(Entry(1, 2, EntryKind.NORMAL, b"x"),)))
    assert follower.membership.ids == ("n1", "n2", "n3") and not follower.membership.learners
    assert drain(follower).membership is not None


# ---------------------------------------------------------------------- disruption guards

def test_a_node_whose_removal_committed_cannot_raise_the_term_or_win_votes() -> None:
    voter = make(pre_vote=False)
    removal = Membership.of_voters({"n1": "", "n2": "", "n3": ""}).without("n3")
    voter.step(msg(T.APP, "n2", term=3, index=0, commit=1,
                   entries=(Entry(1, 3, EntryKind.CONFIG, removal.encode()),)))
    drain(voter)
    assert voter.commit_index == 1
    for _ in range(30):  # long past the lease: only the committed removal keeps n3 out
        voter.tick()
    voter.step(msg(T.VOTE, "n3", term=7, index=99, log_term=6))
    voter.step(msg(T.PRE_VOTE, "n3", term=8, index=99, log_term=6))
    assert voter.term < 7
    assert not [m for m in (drain(voter).messages if voter.has_ready() else ()) if m.to_id == "n3"]


def test_a_node_that_knows_no_membership_yet_still_votes() -> None:
    """A node being added whose log is behind may be needed for a majority (the simulator found
    a cluster stuck when it refused every candidate it did not know)."""
    joiner = RaftNode(RaftConfig(node_id="n5", peer_ids=()), hard_state=HardState(), entries=[],
                      rng=random.Random(1), membership=Membership())
    joiner.step(msg(T.VOTE, "n1", "n5", term=4, index=9, log_term=3))
    assert [(m.type, m.reject) for m in drain(joiner).messages] == [(T.VOTE_RESP, False)]


def test_a_node_waiting_to_join_never_campaigns() -> None:
    joiner = RaftNode(RaftConfig(node_id="n4", peer_ids=()), hard_state=HardState(), entries=[],
                      rng=random.Random(1), membership=Membership())
    for _ in range(100):
        joiner.tick()
    assert joiner.role is Role.FOLLOWER and joiner.term == 0 and not joiner.has_ready()
    # It follows a leader it has never heard of: the leader's appends make it a learner.
    add = Membership.of_voters({"n1": "u1", "n2": "u2", "n3": "u3"}).with_learner("n4", "u4")
    joiner.step(msg(T.APP, "n1", "n4", term=2, index=0, entries=(Entry(1, 2, EntryKind.CONFIG, add.encode()),)))
    ready = drain(joiner)
    assert ready.membership == add and [m.type for m in ready.messages] == [T.APP_RESP]
    for _ in range(100):
        joiner.tick()
    assert joiner.role is Role.FOLLOWER, "a learner does not campaign"


def test_a_removed_candidate_is_ignored_even_when_it_claims_a_transfer() -> None:
    follower = make()
    removal = Membership.of_voters({"n1": "", "n2": "", "n3": ""}).without("n3")
    follower.step(msg(T.APP, "n2", term=2, index=0, commit=1,
                      entries=(Entry(1, 2, EntryKind.CONFIG, removal.encode()),)))
    drain(follower)
    follower.step(msg(T.PRE_VOTE, "n3", term=3, index=5, log_term=2))
    follower.step(msg(T.VOTE, "n3", term=3, index=5, log_term=2, context=TRANSFER_CONTEXT))
    assert follower.term == 2 and follower.leader_id == "n2"


# ---------------------------------------------------------------------- leadership transfer

def test_transfer_catches_the_target_up_then_sends_timeout_now_and_the_target_wins() -> None:
    leader = committed_leader()
    leader.propose(b"a")
    drain(leader)
    assert leader.transfer_leadership() == "n2"  # both at 1; first of equals
    with pytest.raises(ProposalDropped):
        leader.propose(b"b")
    assert not [m for m in sent(leader) if m.type is T.TIMEOUT_NOW], "n2 is behind: catch it up first"
    accept(leader, "n2", leader.last_index)
    messages = sent(leader)
    timeout_now = [m for m in messages if m.type is T.TIMEOUT_NOW]
    assert len(timeout_now) == 1 and timeout_now[0].to_id == "n2"
    # The target campaigns at once; a voter that still hears the old leader grants the vote.
    target = make("n2", ("n1", "n3"))
    target.step(msg(T.APP, "n1", "n2", term=1, index=0, entries=tuple(leader_entries(leader))))
    drain(target)
    target.step(timeout_now[0])
    assert target.role is Role.CANDIDATE and target.term == 2
    vote = [m for m in drain(target).messages if m.type is T.VOTE and m.to_id == "n3"][0]
    assert vote.context == TRANSFER_CONTEXT
    voter = make("n3", ("n1", "n2"))
    voter.step(msg(T.APP, "n1", "n3", term=1, index=0, entries=tuple(leader_entries(leader))))
    drain(voter)
    voter.step(vote)
    assert [m.reject for m in drain(voter).messages if m.type is T.VOTE_RESP] == [False]


def leader_entries(leader: RaftNode) -> list[Entry]:
    return [Entry(i, 1, EntryKind.NOOP if i == 1 else EntryKind.NORMAL, b"" if i == 1 else b"a")
            for i in range(1, leader.last_index + 1)]


def test_a_transfer_that_does_not_finish_is_abandoned_after_an_election_timeout() -> None:
    leader = committed_leader(election_ticks=10)
    leader.transfer_leadership("n3")
    for _ in range(9):
        leader.step(msg(T.HEARTBEAT_RESP, "n2", term=1))
        leader.step(msg(T.HEARTBEAT_RESP, "n3", term=1))
        leader.tick()
    with pytest.raises(ProposalDropped):
        leader.propose(b"x")
    leader.tick()
    assert leader.role is Role.LEADER and leader.transfer_target is None
    leader.propose(b"x")


@pytest.mark.parametrize("target", ["n1", "n9"])
def test_transfer_to_itself_or_a_stranger_is_refused(target: str) -> None:
    leader = committed_leader()
    with pytest.raises(ChangeRefused):
        leader.transfer_leadership(target)
    assert leader.transfer_target is None


def test_transfer_never_picks_a_learner() -> None:
    leader = committed_leader()
    index, _ = leader.add_learner("n4", "u4")
    accept(leader, "n4", index)
    assert leader.transfer_leadership() in ("n2", "n3")


# ---------------------------------------------------------------------- randomized

class _MembershipCluster:
    """Seven nodes: n1..n3 voters at start, n4..n7 waiting to join; random adds, removes,
    transfers, crashes and cuts on a lossy, reordering network with perfect disks. Removed nodes
    keep running with their old data (the disruption case)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.ids = [f"n{i}" for i in range(1, 8)]
        self.disks: dict[str, tuple[HardState, list[Entry]]] = {i: (HardState(), []) for i in self.ids}
        self.nodes: dict[str, RaftNode] = {}
        self.network: list[Message] = []
        self.cut: set[str] = set()
        self.applied: dict[int, Entry] = {}
        self.leaders: dict[int, str] = {}
        for node_id in self.ids:
            self.start(node_id)

    def start(self, node_id: str) -> None:
        founding = node_id in ("n1", "n2", "n3")
        config = RaftConfig(node_id=node_id, peer_ids=tuple(p for p in ("n1", "n2", "n3") if p != node_id)
                            if founding else (), election_ticks=5, max_entries_per_append=3,
                            max_inflight_appends=2, learner_catch_up_entries=3)
        hard_state, entries = self.disks[node_id]
        self.nodes[node_id] = RaftNode(config, hard_state=hard_state, entries=list(entries),
                                       rng=random.Random(self.rng.random()),
                                       membership=None if founding else Membership())

    def handle_ready(self, node_id: str) -> None:
        node = self.nodes[node_id]
        while node.has_ready():
            ready = node.ready()
            hard_state, entries = self.disks[node_id]
            if ready.entries:
                entries = entries[:ready.entries[0].index - 1] + list(ready.entries)
            self.disks[node_id] = (ready.hard_state or hard_state, entries)
            self.network.extend(ready.messages)
            for entry in ready.committed_entries:
                assert self.applied.setdefault(entry.index, entry) == entry, "two entries applied at one index"
            node.advance(ready)

    def check(self) -> None:
        leaders = [node for node in self.nodes.values() if node.role is Role.LEADER]
        for node in leaders:
            assert self.leaders.setdefault(node.term, node.node_id) == node.node_id, "two leaders in one term"
            entries = self.disks[node.node_id][1]
            for index, entry in self.applied.items():  # committed entries are never lost
                if index <= node.commit_index or entry.term < node.term:
                    assert index <= len(entries) and entries[index - 1] == entry, (node.node_id, index)
            previous = Membership.of_voters({"n1": "", "n2": "", "n3": ""})
            for entry in entries:  # one server at a time
                if entry.kind is EntryKind.CONFIG:
                    current = Membership.decode(entry.data)
                    assert len(set(previous.voters) ^ set(current.voters)) <= 1, (previous, current)
                    previous = current
        for a in leaders:  # leaders of different terms at once: their majorities must overlap
            for b in leaders:
                assert not disjoint_majorities_possible(a.membership.voters, b.membership.voters), (a, b)

    def deliver_one(self, drop: float) -> None:
        m = self.network.pop(self.rng.randrange(len(self.network)))
        if m.from_id in self.cut or m.to_id in self.cut or self.rng.random() < drop:
            return
        if self.rng.random() < 0.05:
            self.network.append(m)
        try:
            self.nodes[m.to_id].step(m)
        except RaftError:
            pass
        self.handle_ready(m.to_id)

    def random_step(self) -> None:
        roll, node_id = self.rng.random(), self.rng.choice(self.ids)
        node = self.nodes[node_id]
        try:
            if roll < 0.45 and self.network:
                self.deliver_one(drop=0.1)
            elif roll < 0.75:
                node.tick()
            elif roll < 0.85:
                node.propose(f"{node_id}-{self.rng.randrange(10**6)}".encode())
            elif roll < 0.88:
                node.add_learner(self.rng.choice(self.ids), "u")
            elif roll < 0.90:
                node.remove_member(self.rng.choice(self.ids))
            elif roll < 0.92:
                node.transfer_leadership(self.rng.choice([None, *self.ids]))
            elif roll < 0.96:
                self.cut = {node_id} if self.rng.random() < 0.5 else set()
            elif roll < 0.98:
                self.start(node_id)
        except RaftError:
            pass
        self.handle_ready(node_id)
        self.check()

    def run_healed_until_committed(self, rounds_max: int) -> None:
        self.cut = set()
        proposed_term = -1
        for _ in range(rounds_max):
            for node_id in self.ids:
                self.nodes[node_id].tick()
                self.handle_ready(node_id)
            while self.network:
                self.deliver_one(drop=0.0)
            self.check()
            leaders = [n for n in self.nodes.values() if n.role is Role.LEADER]
            leader = max(leaders, key=lambda n: n.term, default=None)
            if leader is not None and leader.term != proposed_term and leader.transfer_target is None:
                leader.propose(b"final")  # once per leader, as a client would retry
                proposed_term = leader.term
            members = [self.nodes[i] for i in (leader.membership.ids if leader else ())]
            if leader is not None and not leader.membership_pending and not leader.membership.learners and any(
                    e.data == b"final" for e in self.applied.values()) and all(
                    n.applied_index == n.commit_index == leader.last_index for n in members):
                return
        raise AssertionError("no progress after the network healed")


def disjoint_majorities_possible(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether a majority of voters a and a majority of voters b can have no member in common."""
    only_a, only_b, shared = set(a) - set(b), set(b) - set(a), set(a) & set(b)
    return max(0, quorum_size(len(a)) - len(only_a)) + max(0, quorum_size(len(b)) - len(only_b)) <= len(shared)


def test_the_disjoint_majority_check_sees_a_two_step_jump() -> None:
    assert disjoint_majorities_possible(("n1", "n2", "n3"), ("n1", "n2", "n4", "n5"))
    assert not disjoint_majorities_possible(("n1", "n2", "n3"), ("n1", "n2", "n3", "n4"))
    assert not disjoint_majorities_possible(("n1", "n2", "n3"), ("n1", "n2"))


@pytest.mark.parametrize("seed", range(10))
def test_random_membership_changes_keep_raft_safe_and_recover(seed: int) -> None:
    cluster = _MembershipCluster(seed)
    for _ in range(2000):
        cluster.random_step()
    cluster.run_healed_until_committed(rounds_max=300)
