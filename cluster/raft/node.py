"""RaftNode: the sans-IO Raft core (etcd-io/raft's shape: tick / step / ready / advance).

Theory of operation
===================

Rule 1: the core does no I/O. It never reads a clock, a socket, a file or a global random
generator. Time arrives as tick() calls, peer messages as step() calls, client requests as
propose() / read_index() calls, and randomness from the injected `rng`. Everything the core
wants done comes back out of ready() as one frozen Ready value. Same inputs, same outputs: the
deterministic simulator and the data-driven tests rely on it.

Rule 2: the shell drives it in this loop, and the order matters (etcd README "Usage"); the one
implementation of the order is `cluster/ready_handler.py`, which the node and the simulator share:

    while node.has_ready():                    # a pure check: asking changes nothing
        ready = node.ready()
        persist ready.hard_state and ready.entries, fsync if ready.must_sync   # 1. durable first
        send ready.messages                                                     # 2. then talk
        apply ready.committed_entries; serve ready.read_states once applied      # 3. then apply
        node.advance(ready)                                                     # 4. then report

A vote or an append answer in ready.messages is only true once the hard state and entries of the
same Ready are on disk, which is why (1) precedes (2). The core never counts an entry as locally
durable until advance() reports it: the leader's own vote in the commit quorum is its persisted
index, and committed_entries only ever reach the persisted index. A single-node cluster therefore
commits an entry in the Ready after the one that carried it. That is also why a leader's Ready
that carries no new term or vote may send its appends while its own copy is being written
(`Ready.send_before_persist`, Raft thesis §10.2.1): the leader's copy counts only after advance().

Roles. A node is FOLLOWER, PRE_CANDIDATE, CANDIDATE or LEADER; the _become_* methods swap the
`_step` and `_tick` functions (etcd raft.go). Messages of a higher term are handled first in
step(): the node adopts the term (Raft §5.1) unless the message is a pre-vote, or a vote
request that arrives while the node heard from a leader within the election timeout (the
check-quorum "lease"; this is what stops a rejoining partitioned node from deposing a healthy
leader, etcd testdata/prevote_checkquorum.txt). Messages of a lower term are dropped, except that
a stale leader's appends and heartbeats are answered with the current term so it steps down, and
a stale pre-vote is rejected.

Elections. A follower that hears nothing for a randomized timeout drawn from
[election_ticks, 2 * election_ticks) first runs a pre-vote (thesis §9.6) at term + 1 without
changing its own term or vote; only if a majority would vote does it become a candidate, bump the
term, vote for itself and ask for votes. Votes are granted only to a candidate whose log is at
least as up to date (Raft §5.4.1). A new leader appends a NOOP entry of its term; it commits by
counting replicas only for an entry of its own term (Raft §5.4.2, Figure 8), which also commits
everything before it.

Replication. The leader keeps a Progress per follower (progress.py: PROBE / REPLICATE). A
rejected append carries the follower's hint (its last index, or the conflicting term and the
first index of that term), so a divergent tail is skipped a term at a time. Appends are batched
(max_entries_per_append, max_append_bytes) and pipelined (max_inflight_appends and
max_inflight_bytes per follower). appends_may_wait() names the followers beyond the quorum's need,
whose appends the shell may hold back briefly and send in batches (transport/http.py, "Quorum
first"); the choice is made once a tick, by match index. A follower answers appends that arrive
together once, for the last.
Proposals only mark followers as needing an append; the appends are built when the shell next
calls ready(), so every proposal made between two Readys travels in one append (has_ready() only
checks whether ready() would build one).
Heartbeats carry the commit index clamped to the follower's match index, so a follower never
commits an entry it has not been shown to share with the leader.

Check-quorum. A leader that has not heard from a majority within an election timeout steps down
(Raft thesis §6.2), so an isolated leader stops accepting proposals it cannot commit.

Membership (thesis §4, membership.py). The members are a value carried whole in CONFIG log
entries; each node uses the newest one in its log, committed or not, and falls back when a
conflicting append truncates it. One server at a time: add_learner(), then the leader promotes
the learner by itself once it has matched the log (REPLICATE) within learner_catch_up_entries of
the last index; remove_member() drops a voter or learner, which stops counting toward commit,
check-quorum and reads at once. A leader refuses a change while another is uncommitted and until
an entry of its own term has committed (the 2015 single-server-change bug). It never removes
itself: the shell transfers leadership first. Only voters campaign (a node being added, a
learner or one that knows it was removed never does); a vote request from a node whose removal
has committed is ignored, so it cannot raise anyone's term; and pre-vote and the check-quorum
lease keep any other node that was cut off, removed or not, from disrupting a healthy leader. Messages from outside the membership are otherwise handled
(a new learner hears its leader before it knows the membership that added it).

Leadership transfer (thesis §3.10). transfer_leadership() stops proposals, catches the target up
and sends it TIMEOUT_NOW; the target campaigns at once, skipping pre-vote, with a VOTE marked as
a transfer that voters grant despite the lease. Not done within an election timeout: abandoned.
A leader that check-quorum steps down sends TIMEOUT_NOW too, to its most caught-up voter among
those it has not heard: when only its inbound traffic is cut, the followers still hear it and
would otherwise wait out an election timeout after its last heartbeat; a lost TIMEOUT_NOW changes
nothing, and a voter it hears (its own minority side) is never asked to campaign.

Reads. read_index() (Raft §6.4) records the commit index, then confirms leadership with a
heartbeat round whose answers echo the request's context; when a majority answered, the read is
released in Ready.read_states as (context, read_index), to be served once applied >= read_index.
A leader that has not yet committed an entry of its own term holds reads back until it has (it
may not know the latest commit index before that).

Robustness. The transport may drop, duplicate and reorder. Answers are matched to what they
answer: a stale append answer never lowers match_index; a rejection of an older probe is ignored;
a duplicated append never truncates matching entries; duplicated votes are counted once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Protocol

from raftq.cluster.raft.errors import ChangeRefused, RaftConfigError, NotLeader, ProposalDropped, StepRejected
from raftq.cluster.raft.log import LoadEntries, RaftLog, entry_payload_bytes, entry_size_bytes
from raftq.cluster.raft.membership import Member, Membership, MembershipDecodeError, quorum_size
from raftq.cluster.raft.messages import (
    TRANSFER_CONTEXT, Entry, EntryKind, HardState, Message, MessageType, SnapshotPoint,
)
from raftq.cluster.raft.progress import Progress, ProgressState, ProgressView
from raftq.cluster.records import record

__all__ = ["Compaction", "RaftConfig", "RaftNode", "Ready", "Role", "RandomSource"]


class RandomSource(Protocol):
    """What the core needs from its injected random.Random (kept structural so that the core
    does not import `random`; pass `random.Random(seed)`)."""

    def randrange(self, start: int, stop: int) -> int: ...


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True)
class RaftConfig:
    """Configuration of one RaftNode. Times are in ticks (the shell decides how long a tick is)."""

    #: This node's id, e.g. "n1".
    node_id: str
    #: The other voters of a cluster bootstrapped from a peer list, used when RaftNode gets no
    #: `membership`. An empty tuple is a single-node cluster. Intended sizes: 1, 3 or 5 voters.
    peer_ids: tuple[str, ...]
    #: Election timeout base: a follower campaigns after a random [election_ticks, 2*election_ticks)
    #: ticks without a leader; a leader checks its quorum every election_ticks.
    election_ticks: int = 10
    #: The leader sends heartbeats every heartbeat_ticks (must be < election_ticks).
    heartbeat_ticks: int = 1
    #: Run a pre-vote before every election (thesis §9.6).
    pre_vote: bool = True
    #: Leader steps down without a majority heard within election_ticks; voters ignore vote
    #: requests while they heard from a leader within election_ticks.
    check_quorum: bool = True
    #: Entries per append message (at least one entry is always sent).
    max_entries_per_append: int = 512
    #: Approximate bytes of entries per append message (at least one entry is always sent).
    max_append_bytes: int = 1 << 20
    #: Unanswered appends per follower in REPLICATE state.
    max_inflight_appends: int = 64
    #: Unanswered entry bytes per follower in REPLICATE state (at least one append always goes);
    #: 0 = no bound. 8 MiB keeps a slow follower's share of the leader's send buffers and of its
    #: own inbox to a few full appends, while 20 MiB/s still fits a 400 ms round trip.
    max_inflight_bytes: int = 8 << 20
    #: Data bytes the leader accepts uncommitted before propose raises ProposalDropped; 0 = no bound.
    max_uncommitted_bytes: int = 64 << 20
    #: The leader promotes a learner to voter once the learner has matched its log (REPLICATE)
    #: and is at most this many entries behind the leader's last index (thesis §4.2.1's bound).
    learner_catch_up_entries: int = 64
    #: With `load_entries` (RaftNode): data bytes of applied entries kept in memory; the data of
    #: older ones is read back from the stored log when a follower needs them (log.py, "Cold
    #: entries"). Far more than a follower that keeps up ever lags behind the applied index.
    warm_log_bytes: int = 256 << 10

    def validate(self) -> None:
        """Check the configuration.

        Raises:
            RaftConfigError: naming the first field that is wrong.
        """
        if not isinstance(self.node_id, str) or not self.node_id:
            raise RaftConfigError("node_id must be a non-empty string")
        if len(set(self.peer_ids)) != len(self.peer_ids):
            raise RaftConfigError("peer_ids must not repeat")
        if self.node_id in self.peer_ids or not all(isinstance(p, str) and p for p in self.peer_ids):
            raise RaftConfigError("peer_ids must be non-empty strings other than node_id")
        if self.heartbeat_ticks < 1:
            raise RaftConfigError("heartbeat_ticks must be at least 1")
        if self.election_ticks <= self.heartbeat_ticks:
            raise RaftConfigError("election_ticks must be greater than heartbeat_ticks")
        for name in ("max_entries_per_append", "max_append_bytes", "max_inflight_appends"):
            if getattr(self, name) < 1:
                raise RaftConfigError(f"{name} must be at least 1")
        if self.learner_catch_up_entries < 0:
            raise RaftConfigError("learner_catch_up_entries must not be negative")
        if self.max_inflight_bytes < 0:
            raise RaftConfigError("max_inflight_bytes must not be negative (0 = no bound)")
        if self.max_uncommitted_bytes < 0:
            raise RaftConfigError("max_uncommitted_bytes must not be negative (0 = no bound)")
        if self.warm_log_bytes < 0:
            raise RaftConfigError("warm_log_bytes must not be negative")


@dataclass(frozen=True)
class Ready:
    """Everything the core wants done since the last Ready, in the order it must happen:

    0. if `snapshot` is not None, install the snapshot the shell received at that point:
       restore the state machine from it and replace the stored log by an empty one after it;
    1. persist `hard_state` (if not None) and append `entries` (they may overwrite a suffix of
       the stored log), fsync when `must_sync`;
    2. only then send `messages` -- except when `send_before_persist`: a leader's Ready that
       carries no new term or vote may send its appends while it writes the same entries to its
       own disk (Raft thesis §10.2.1), because the core counts the leader's own copy toward
       commit only after advance(). Anything that carries a new term or vote, and every
       follower's reply, waits for the disk;
    3. apply `committed_entries` in order; serve each read in `read_states` once applied >= its
       read index;
    4. call advance(ready).
    """

    hard_state: HardState | None
    entries: tuple[Entry, ...]
    committed_entries: tuple[Entry, ...]
    messages: tuple[Message, ...]
    read_states: tuple[tuple[int, int], ...]  # (context, read_index)
    must_sync: bool
    snapshot: SnapshotPoint | None = None
    send_before_persist: bool = False
    #: The membership now in effect, when it changed since the last Ready (a CONFIG entry was
    #: appended or truncated, or a snapshot's membership restored): the shell connects to the
    #: members' URLs before it sends this Ready's messages.
    membership: Membership | None = None


@record
class Compaction:
    """What compact_after_snapshot() dropped: entries up to `upto_index` are gone from memory
    (`dropped_count` of them), and the stored log may drop them too."""

    upto_index: int
    dropped_count: int


@dataclass(slots=True)
class _ReadRequest:
    context: int
    index: int  # commit index when the request arrived
    acks: set[str] = field(default_factory=set)


_VOTE_REQUESTS = (MessageType.VOTE, MessageType.PRE_VOTE)
_FROM_LEADER = (MessageType.APP, MessageType.HEARTBEAT, MessageType.SNAP, MessageType.TIMEOUT_NOW)


class RaftNode:
    """One Raft voter. See the module docstring."""

    def __init__(self, config: RaftConfig, *, hard_state: HardState, entries: list[Entry],
                 rng: RandomSource, snapshot: SnapshotPoint = SnapshotPoint(),
                 membership: Membership | None = None, load_entries: LoadEntries | None = None) -> None:
        """Restart as a follower from persisted state.

        Args:
            config: the node's configuration (validated here).
            hard_state: the persisted term and vote.
            entries: the persisted log after some offset, consecutive, starting at most one past
                the snapshot (indexes 1..n when there is none).
            rng: the random source for election timeouts, e.g. random.Random(seed).
            snapshot: the point of the newest durable snapshot, which the shell has already
                restored into its state machine; commit_index and applied_index start there.
            membership: the membership in effect at the snapshot (the one its state machine
                recorded); None: the bootstrap one, this node and `config.peer_ids`, all voters.
                A node that joins an existing cluster passes Membership() (it is nobody's
                voter, so it never campaigns) and learns the real one from the leader.
                CONFIG entries in `entries` take effect on top of it.
            load_entries: reads persisted entries lo..hi back from storage; with it, applied
                entries past config.warm_log_bytes keep only their index and term in memory.
                It raises what storage raises, out of ready() (the shell's fail-stop).

        Raises:
            RaftConfigError: the configuration is invalid.
        """
        config.validate()
        self._config = config
        self._rng = rng
        self._log = RaftLog(entries, snapshot, load=load_entries, warm_bytes=config.warm_log_bytes)
        self._bootstrap_membership = Membership(
            tuple(Member(node_id, "", True) for node_id in sorted((config.node_id, *config.peer_ids))))
        # (index, term, membership) of the snapshot's membership, then of each CONFIG entry held;
        # the last one is in effect (thesis §4.1: on append, not on commit).
        self._configs: list[tuple[int, int, Membership]] = [
            (snapshot.index, snapshot.term, membership if membership is not None else self._bootstrap_membership)]
        self._take_configs(entries)
        self._handed_membership = self.membership
        self._transfer_target: str | None = None
        self._transfer_elapsed = 0
        #: Leader: the followers its appends go to at once (appends_may_wait), chosen each tick.
        self._quorum_first: tuple[str, ...] = ()
        self._snapshot_to_install: SnapshotPoint | None = None
        self._term = hard_state.term
        self._voted_for = hard_state.voted_for
        self._handed_hard_state = hard_state
        self._role = Role.FOLLOWER
        self._leader_id: str | None = None
        self._votes: dict[str, bool] = {}
        self._progress: dict[str, Progress] = {}
        self._replicate_pending: dict[str, bool] = {}  # peer -> send even an empty append
        self._term_start_index = 0  # a leader's: the index of its own term's NOOP
        self._outbox: list[Message] = []
        self._read_states: list[tuple[int, int]] = []
        self._read_requests: list[_ReadRequest] = []
        self._reads_before_commit: list[int] = []
        self._uncommitted_bytes = 0
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._election_timeout_ticks = config.election_ticks
        self._step: Callable[[Message], None] = self._step_follower
        self._tick: Callable[[], None] = self._tick_election
        self._become_follower(self._term, None)

    # ------------------------------------------------------------------ read-only state

    @property
    def node_id(self) -> str:
        return self._config.node_id

    @property
    def term(self) -> int:
        return self._term

    @property
    def voted_for(self) -> str | None:
        return self._voted_for

    @property
    def role(self) -> Role:
        return self._role

    @property
    def leader_id(self) -> str | None:
        return self._leader_id

    @property
    def commit_index(self) -> int:
        return self._log.commit_index

    @property
    def applied_index(self) -> int:
        return self._log.applied_index

    @property
    def last_index(self) -> int:
        return self._log.last_index

    @property
    def first_index(self) -> int:
        """Index of the first entry still held in memory (compacted ones are gone)."""
        return self._log.offset + 1

    @property
    def snapshot(self) -> SnapshotPoint:
        """The newest snapshot point the shell reported (taken here or installed from a leader)."""
        return self._log.snapshot

    @property
    def membership(self) -> Membership:
        """The membership in effect: the newest CONFIG entry in the log (committed or not)."""
        return self._configs[-1][2]

    @property
    def membership_pending(self) -> bool:
        """Whether the newest CONFIG entry is not yet known committed (a change is under way)."""
        return self._configs[-1][0] > self._log.commit_index

    @property
    def transfer_target(self) -> str | None:
        """Leader: the voter leadership is being handed to, if a transfer is under way."""
        return self._transfer_target

    @property
    def progress(self) -> dict[str, int]:
        """Leader: {peer: match_index}; empty on other roles."""
        return {peer: pr.match_index for peer, pr in self._progress.items()}

    @property
    def progress_details(self) -> dict[str, ProgressView]:
        """Leader: a read-only view of each follower's replication state; empty on other roles."""
        return {peer: pr.view() for peer, pr in self._progress.items()}

    def appends_may_wait(self) -> frozenset[str]:
        """Leader: the voters whose appends with entries may wait a little before they go (the
        shell's hold, transport/http.py "Quorum first"): those beyond the quorum's need.

        A commit needs the leader's own write and quorum - 1 followers: the *quorum-first*
        followers, which replicate at once, while the others may be sent to a few appends at a
        time. Never waiting: a follower probing or taking a snapshot (its next append depends on
        an answer), a learner (its catch-up decides its promotion) and a transfer target.
        """
        if self._role is not Role.LEADER:
            return frozenset()
        progress, first = self._progress, self._quorum_first
        return frozenset(peer for peer in self._configs[-1][2].voters
                         if peer in progress and peer not in first and peer != self._transfer_target
                         and progress[peer].state is ProgressState.REPLICATE)

    def _rank_followers(self, voters: tuple[str, ...]) -> list[str]:
        """The voting followers, the quorum-first ones first: those taking appends pipelined
        (REPLICATE), by match index, and on a tie the ones already first (so the choice changes
        only when one falls behind), then by id."""
        progress, first = self._progress, self._quorum_first
        return sorted((voter for voter in voters if voter in progress),
                      key=lambda peer: (progress[peer].state is not ProgressState.REPLICATE,
                                        -progress[peer].match_index, peer not in first, peer))

    def _choose_quorum_first(self) -> None:
        """Once a tick (not at every answer, so that the choice does not swing to and fro while
        appends travel): a follower that stopped answering, or answers slowly, has fallen behind
        one that gets its appends a few at a time, and the two trade places."""
        voters = self._configs[-1][2].voters
        needed = quorum_size(len(voters)) - (1 if self.node_id in voters else 0)
        self._quorum_first = tuple(self._rank_followers(voters)[:needed])

    @property
    def election_ticks_remaining(self) -> int:
        """Ticks until the election timer fires: a campaign, or on a leader a check-quorum."""
        timeout = self._config.election_ticks if self._role is Role.LEADER else self._election_timeout_ticks
        return max(1, timeout - self._election_elapsed)

    # ------------------------------------------------------------------ inputs

    def tick(self) -> None:
        """Advance logical time by one tick."""
        self._tick()
        self._log.check_invariants()

    def step(self, message: Message) -> None:
        """Handle one message from a peer.

        Args:
            message: a message addressed to this node.

        Raises:
            StepRejected: the message is misaddressed, from an unknown peer or malformed.
        """
        self._step_check(message)
        if message.term > self._term:
            if not self._step_higher_term(message):
                return
        elif message.term < self._term:
            self._step_lower_term(message)
            return
        if message.type in _VOTE_REQUESTS:
            self._handle_vote_request(message)
        else:
            self._step(message)
        self._log.check_invariants()

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append a command to the leader's log.

        Args:
            data: the encoded command.

        Returns:
            (index, term) of the new entry: it is this command only if the entry committed at
            that index has that term.

        Raises:
            NotLeader: this node is not the leader (carries the known leader, if any).
            ProposalDropped: more than max_uncommitted_bytes are waiting to commit.
        """
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader_id)
        if self._transfer_target is not None:
            # etcd and hashicorp/raft refuse too: the target must catch up to a log that stops growing.
            raise ProposalDropped(f"leadership is being transferred to {self._transfer_target}")
        size_max = self._config.max_uncommitted_bytes
        if size_max and self._uncommitted_bytes > 0 and self._uncommitted_bytes + len(data) > size_max:
            raise ProposalDropped(f"{self._uncommitted_bytes} bytes uncommitted (bound {size_max})")
        entry = Entry(index=self._log.last_index + 1, term=self._term, kind=EntryKind.NORMAL, data=bytes(data))
        self._log.append([entry])
        self._uncommitted_bytes += len(data)
        self._want_replicate_all(send_if_empty=False)
        return entry.index, entry.term

    def read_index(self, context: int) -> None:
        """Ask for a linearizable read point (Raft §6.4), answered in a later Ready.read_states.

        Args:
            context: the caller's id for this read, echoed back as (context, read_index).

        Raises:
            NotLeader: this node is not the leader (carries the known leader, if any).
        """
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader_id)
        if self._log.term(self._log.commit_index) != self._term:
            self._reads_before_commit.append(context)
            return
        self._register_read(context)

    # ------------------------------------------------------------------ membership (thesis §4)

    def add_learner(self, node_id: str, url: str) -> tuple[int, int]:
        """Append a CONFIG entry that adds node_id as a non-voting learner; the leader promotes
        it to voter on its own once it has caught up (RaftConfig.learner_catch_up_entries).

        Returns:
            (index, term) of the CONFIG entry: the change is done when that entry commits.

        Raises:
            NotLeader: this node is not the leader.
            ChangeRefused: see _check_change_allowed; or the id is, or was, a member.
        """
        self._check_change_allowed()
        membership = self.membership
        if membership.get(node_id) is not None:
            raise ChangeRefused(f"{node_id} is already a member", retryable=False)
        if node_id in membership.removed:
            raise ChangeRefused(f"{node_id} was removed and ids are never reused: start the node "
                                f"with a new id and an empty data directory", retryable=False)
        return self._append_config(membership.with_learner(node_id, url))

    def remove_member(self, node_id: str) -> tuple[int, int]:
        """Append a CONFIG entry that removes node_id (voter or learner) for good. It stops
        counting toward any majority as soon as the entry is appended.

        Returns:
            (index, term) of the CONFIG entry.

        Raises:
            NotLeader: this node is not the leader.
            ChangeRefused: see _check_change_allowed; or node_id is not a member, or it is this
                leader (transfer leadership first, thesis §4.2.2).
        """
        self._check_change_allowed()
        if self.membership.get(node_id) is None:
            raise ChangeRefused(f"{node_id} is not a member", retryable=False)
        if node_id == self.node_id:
            raise ChangeRefused("the leader does not remove itself: transfer leadership first", retryable=False)
        return self._append_config(self.membership.without(node_id))

    def transfer_leadership(self, to: str | None = None) -> str:
        """Hand leadership to voter `to`, or to the most caught-up other voter (thesis §3.10).

        Proposals are refused (ProposalDropped) until the transfer ends; once the target's log
        matches the leader's, it gets TIMEOUT_NOW and campaigns at once. A transfer that has not
        ended within an election timeout is abandoned and this node leads on.

        Returns:
            The target's id.

        Raises:
            NotLeader: this node is not the leader.
            ChangeRefused: a transfer is under way, or the target is not another voter.
        """
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader_id)
        if self._transfer_target is not None:
            raise ChangeRefused(f"leadership is already being transferred to {self._transfer_target}",
                                retryable=True)
        others = [v for v in self.membership.voters if v != self.node_id]
        if to is None:
            if not others:
                raise ChangeRefused("there is no other voter to take over", retryable=False)
            to = max(others, key=lambda voter: self._progress[voter].match_index)  # first of equals
        elif to == self.node_id:
            raise ChangeRefused(f"{to} leads already", retryable=False)
        elif to not in others:
            raise ChangeRefused(f"{to} is not a voter", retryable=False)
        self._transfer_target = to
        self._transfer_elapsed = 0
        self._maybe_send_timeout_now()
        return to

    def restore_membership(self, membership: Membership | None) -> None:
        """After installing a snapshot received from the leader: the membership its state
        machine recorded. None (it recorded none: the cluster's membership never changed before
        it) keeps the membership this node had, never a bootstrap one: a node that joined with
        none must not become a cluster of its own."""
        if membership is not None:
            index, term, _ = self._configs[0]
            self._configs[0] = (index, term, membership)

    def _check_change_allowed(self) -> None:
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader_id)
        if self._transfer_target is not None:
            raise ChangeRefused(f"leadership is being transferred to {self._transfer_target}", retryable=True)
        if self._log.commit_index < self._term_start_index:
            # The 2015 single-server-change bug (OPERATIONS.md §1): a leader may change the
            # membership only once an entry of its own term has committed.
            raise ChangeRefused("this leader has not committed an entry of its term yet", retryable=True)
        if self.membership_pending:
            raise ChangeRefused("another membership change is not committed yet", retryable=True)

    def _append_config(self, membership: Membership) -> tuple[int, int]:
        entry = Entry(index=self._log.last_index + 1, term=self._term, kind=EntryKind.CONFIG,
                      data=membership.encode())
        self._log.append([entry])
        self._note_configs([entry])
        self._want_replicate_all(send_if_empty=False)
        return entry.index, entry.term

    def _note_configs(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        """Put CONFIG entries the log now holds into effect, after dropping those a conflicting
        append truncated (a node falls back to the membership before them, thesis §4.1)."""
        before = self.membership
        log = self._log
        while len(self._configs) > 1:
            index, term, _ = self._configs[-1]
            if index <= log.last_index and (index <= log.offset or log.term(index) == term):
                break
            self._configs.pop()
        self._take_configs(entries)
        if self.membership != before:
            self._membership_changed()

    def _take_configs(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        for entry in entries:
            if entry.kind is EntryKind.CONFIG and entry.index > self._configs[-1][0]:
                self._configs.append((entry.index, entry.term, Membership.decode(entry.data)))

    def _membership_changed(self) -> None:
        """A new membership is in effect: a leader replicates to new members and forgets removed ones."""
        membership = self.membership
        if self._role is not Role.LEADER:
            return
        for node_id in membership.ids:
            if node_id != self.node_id and node_id not in self._progress:
                self._progress[node_id] = Progress(self._log.last_index + 1, self._config.max_inflight_appends,
                                                   self._config.max_inflight_bytes)
                self._want_replicate(node_id, send_if_empty=True)
        for node_id in [p for p in self._progress if membership.get(p) is None]:
            del self._progress[node_id]
            self._replicate_pending.pop(node_id, None)
        if self._transfer_target is not None and not membership.is_voter(self._transfer_target):
            self._transfer_target = None
        self._choose_quorum_first()
        if self._maybe_commit():  # a removed voter no longer holds back the majority
            self._want_replicate_all(send_if_empty=True)

    def _maybe_promote_learner(self) -> None:
        """Leader: promote the first learner that has caught up, when a change may start."""
        learners = self.membership.learners
        if not learners or self._transfer_target is not None or self.membership_pending \
                or self._log.commit_index < self._term_start_index:
            return
        for node_id in learners:
            pr = self._progress[node_id]
            if pr.state is ProgressState.REPLICATE and \
                    pr.match_index >= self._log.last_index - self._config.learner_catch_up_entries:
                self._append_config(self.membership.with_voter(node_id))
                return

    def _maybe_send_timeout_now(self) -> None:
        target = self._transfer_target
        if target is None:
            return
        if self._progress[target].match_index == self._log.last_index:
            self._send(MessageType.TIMEOUT_NOW, target)
        else:
            self._want_replicate(target, send_if_empty=True)

    def _may_vote_for(self, candidate: str) -> bool:
        """Whether a vote request from candidate is considered at all: not when a committed
        membership removed it (ids are never reused, so it can never be a voter again).

        Any other sender is answered as Raft says, whatever this node's own membership (thesis
        §4.1): a node whose log is behind may not know yet that the candidate was added or
        promoted, and refusing it could leave the voters short of a majority for good (the
        simulator found both: a new node that knew no membership, and a voter whose log was
        empty). A removed node that does not know it was removed lacks the CONFIG entry that
        removed it, so its log is behind the majority that committed it: it cannot win.
        """
        index = self._log.commit_index
        committed = next(m for i, _, m in reversed(self._configs) if i <= index or i == self._configs[0][0])
        return candidate not in committed.removed

    def _promotable(self) -> bool:
        """Whether this node may campaign: only a voter of the membership in effect may."""
        return self.membership.is_voter(self.node_id)

    def _quorum(self) -> int:
        return quorum_size(len(self.membership.voters))

    def compact(self, snapshot: SnapshotPoint, upto_index: int) -> int:
        """Record a durable snapshot of the applied state and drop log entries it covers.

        Args:
            snapshot: index and term of the last entry the snapshot covers (at most applied).
            upto_index: drop entries at or before this index (clamped to the snapshot's index);
                a leader keeps some entries behind the snapshot so a follower a little behind
                gets appends rather than a whole snapshot.

        Returns:
            How many entries were dropped from memory.
        """
        self._log.snapshot_taken(snapshot)
        dropped = self._log.compact(upto_index)
        self._forget_compacted_configs()
        self._log.check_invariants()
        return dropped

    def compact_after_snapshot(self, snapshot: SnapshotPoint, *, keep_entries: int,
                               keep_bytes: int | None = None) -> Compaction:
        """Record a durable snapshot and drop the log entries behind it, all but the newest
        keep_entries (and of those, no more than about keep_bytes of data; None: no byte bound),
        so that a follower a little behind gets appends rather than a whole snapshot.

        Returns:
            How far the log was compacted, for the stored log to follow.
        """
        self._log.snapshot_taken(snapshot)
        upto = self._log.snapshot.index - keep_entries
        if keep_bytes is not None:
            upto = max(upto, self.compaction_point(keep_entries, keep_bytes))
        dropped = self._log.compact(upto)
        self._forget_compacted_configs()
        self._log.check_invariants()
        return Compaction(upto, dropped)

    def _forget_compacted_configs(self) -> None:
        """Keep one membership at or before the compacted part (the one in effect there)."""
        while len(self._configs) > 1 and self._configs[1][0] <= self._log.offset:
            del self._configs[0]

    def compaction_point(self, keep_entries: int, keep_bytes: int) -> int:
        """Where to compact after the newest snapshot so that at most keep_entries entries and
        about keep_bytes of data stay behind it (for followers a little behind)."""
        index = self._log.snapshot.index
        return max(index - keep_entries, self._log.trailing_start(index, keep_bytes))

    def report_snapshot(self, peer: str, *, delivered: bool) -> None:
        """The shell's snapshot transfer to peer ended (delivered: the peer has it on disk).

        Either way the follower is probed again: after the snapshot when it was delivered (in case
        its answer was lost), or from its match index otherwise, which sends a snapshot again if
        the entries it needs are still compacted.
        """
        pr = self._progress.get(peer)
        if self._role is not Role.LEADER or pr is None or pr.state is not ProgressState.SNAPSHOT:
            return
        pr.snapshot_finished(delivered)
        self._want_replicate(peer, send_if_empty=True)

    # ------------------------------------------------------------------ outputs

    def has_ready(self) -> bool:
        """Whether ready() would return something to do; a pure check (it changes nothing).

        Returns:
            True when there is state to persist, messages to send (or appends ready() would
            build), entries to apply or reads to serve.
        """
        handed = self._handed_hard_state
        membership = self._configs[-1][2]
        return bool(
            self._outbox or self._read_states or self._term != handed.term or self._voted_for != handed.voted_for
            or self._log.has_unstable_entries() or self._log.has_committed_entries()
            or self._snapshot_to_install is not None or self._replication_due()
            or (membership is not self._handed_membership and membership != self._handed_membership)
        )

    def ready_to_serve(self, applied_index: int) -> bool:
        """Whether this node leads and has applied everything committed before its term.

        A new leader's state machine may lag its log; until it has applied its own term's NOOP
        (and so every entry before it), answers from that state (a lease token check, a job's
        state) could be stale.
        """
        return self._role is Role.LEADER and applied_index >= self._term_start_index

    def ready(self) -> Ready:
        """Collect what the shell must do now (see Ready for the order).

        Returns:
            The Ready; its entries and messages count as handed out. Pass it to advance() once done.
        """
        self._flush_replication()
        handed = self._handed_hard_state
        changed = None
        if self._term != handed.term or self._voted_for != handed.voted_for:
            changed = self._handed_hard_state = self._hard_state()
        entries = self._log.take_unstable_entries()
        snapshot, self._snapshot_to_install = self._snapshot_to_install, None
        membership = self._configs[-1][2]
        membership_changed = membership is not self._handed_membership and membership != self._handed_membership
        self._handed_membership = membership
        ready = Ready(
            hard_state=changed,
            entries=entries,
            committed_entries=self._log.take_committed_entries(),
            messages=tuple(self._outbox),
            read_states=tuple(self._read_states),
            must_sync=changed is not None or bool(entries) or snapshot is not None,
            snapshot=snapshot,
            send_before_persist=changed is None and snapshot is None and self._role is Role.LEADER,
            membership=membership if membership_changed else None,
        )
        self._outbox.clear()
        self._read_states.clear()
        return ready

    def advance(self, ready: Ready) -> None:
        """Report that a Ready was fully handled: its entries persisted, its committed entries applied.

        Args:
            ready: the value ready() returned (advance each Ready once, in order).
        """
        if ready.entries:
            last = ready.entries[-1]
            self._log.stable_to(last.index, last.term)
        if ready.committed_entries:
            self._log.applied_to(ready.committed_entries[-1].index)
        if self._role is Role.LEADER and self._maybe_commit():
            self._want_replicate_all(send_if_empty=True)
        self._log.check_invariants()

    # ------------------------------------------------------------------ role changes

    def _reset(self, term: int) -> None:
        if term != self._term:
            self._term = term
            self._voted_for = None
        self._leader_id = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        # A single voter cannot split a vote, so it needs no randomization (and the contract
        # promises it elects itself within one election timeout).
        et = self._config.election_ticks
        self._election_timeout_ticks = self._rng.randrange(et, 2 * et) if len(self.membership.voters) > 1 else et
        self._votes = {}
        self._progress = {}
        self._replicate_pending = {}
        self._read_requests = []
        self._reads_before_commit = []
        self._uncommitted_bytes = 0
        self._transfer_target = None
        self._quorum_first = ()

    def _become_follower(self, term: int, leader_id: str | None) -> None:
        self._reset(term)
        self._role = Role.FOLLOWER
        self._leader_id = leader_id
        self._step = self._step_follower
        self._tick = self._tick_election

    def _become_pre_candidate(self) -> None:
        assert self._role is not Role.LEADER, "a leader does not pre-campaign"
        self._reset(self._term)  # thesis §9.6: neither the term nor the vote changes
        self._role = Role.PRE_CANDIDATE
        self._step = self._step_candidate
        self._tick = self._tick_election

    def _become_candidate(self) -> None:
        assert self._role is not Role.LEADER, "a leader does not campaign"
        self._reset(self._term + 1)
        self._voted_for = self.node_id
        self._role = Role.CANDIDATE
        self._step = self._step_candidate
        self._tick = self._tick_election

    def _become_leader(self) -> None:
        assert self._role is Role.CANDIDATE, f"{self._role} cannot become leader"
        voters_heard = set(self._votes)
        self._reset(self._term)
        self._role = Role.LEADER
        self._leader_id = self.node_id
        self._step = self._step_leader
        self._tick = self._tick_leader
        next_index = self._log.last_index + 1
        for peer in self.membership.ids:
            if peer == self.node_id:
                continue
            self._progress[peer] = Progress(next_index, self._config.max_inflight_appends,
                                            self._config.max_inflight_bytes)
            # An answer to our vote request was heard in this term: it counts for check-quorum.
            self._progress[peer].recent_active = peer in voters_heard
        # Raft §5.4.2 / §8: an entry of the new term lets the leader commit (and learn the
        # commit index) without counting replicas of older terms.
        self._log.append([Entry(index=next_index, term=self._term, kind=EntryKind.NOOP, data=b"")])
        self._term_start_index = next_index
        self._choose_quorum_first()
        self._want_replicate_all(send_if_empty=False)

    def _campaign(self) -> None:
        if self._config.pre_vote:
            self._campaign_pre_vote()
        else:
            self._campaign_election()

    def _campaign_pre_vote(self) -> None:
        self._become_pre_candidate()
        self._votes[self.node_id] = True
        if self._tally_votes():
            return
        for peer in self._other_voters():
            self._send(MessageType.PRE_VOTE, peer, term=self._term + 1, log_term=self._log.last_term,
                       index=self._log.last_index)

    def _other_voters(self) -> list[str]:
        return [voter for voter in self.membership.voters if voter != self.node_id]

    def _tally_votes(self) -> bool:
        """Act on the votes so far (only voters' count); returns True when the campaign is decided."""
        membership = self.membership
        votes = [vote for voter, vote in self._votes.items() if membership.is_voter(voter)]
        granted = sum(1 for vote in votes if vote)
        quorum = self._quorum()
        if granted >= quorum:
            if self._role is Role.PRE_CANDIDATE:
                self._campaign_election()
            else:
                self._become_leader()
            return True
        if len(votes) - granted >= quorum:
            self._become_follower(self._term, None)
            return True
        return False

    def _campaign_election(self, *, transfer: bool = False) -> None:
        self._become_candidate()
        self._votes[self.node_id] = True
        if self._tally_votes():
            return
        for peer in self._other_voters():
            self._send(MessageType.VOTE, peer, log_term=self._log.last_term, index=self._log.last_index,
                       context=TRANSFER_CONTEXT if transfer else None)

    # ------------------------------------------------------------------ ticks

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        # A learner, a removed node or one not yet added never campaigns; its count keeps
        # growing, so that its check-quorum lease runs out and it can vote for a candidate.
        if self._election_elapsed >= self._election_timeout_ticks and self._promotable():
            self._election_elapsed = 0
            self._campaign()

    def _tick_leader(self) -> None:
        self._choose_quorum_first()
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._transfer_target is not None:
            self._transfer_elapsed += 1
            if self._transfer_elapsed >= self._config.election_ticks:
                self._transfer_target = None  # the target did not take over in time: lead on
        self._maybe_promote_learner()
        if self._election_elapsed >= self._config.election_ticks:
            self._election_elapsed = 0
            if self._config.check_quorum and not self._quorum_active():
                self._hand_on_when_stepping_down()
                self._become_follower(self._term, None)  # Raft thesis §6.2: step down
                return
            for pr in self._progress.values():
                pr.recent_active = False
        if self._heartbeat_elapsed >= self._config.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat()

    def _hand_on_when_stepping_down(self) -> None:
        """Check-quorum is stepping this leader down: no majority answered it for an election
        timeout. What it sends may still arrive (its inbound traffic alone is cut), and then the
        followers, still hearing its heartbeats until now, would wait out an election timeout of
        their own before electing anyone. TIMEOUT_NOW to the most caught-up voter it has not heard
        from lets that one campaign at once; its votes are still judged on the logs, and when the
        message is lost (the cut goes both ways) nothing changes. A voter it did hear is on its own
        side of a partition, a minority: it could not win, and its campaign (no pre-vote) would
        only raise its term and disrupt the majority's leader once the partition heals."""
        unheard = [v for v in self.membership.voters
                   if v != self.node_id and v in self._progress and not self._progress[v].recent_active]
        if unheard:
            self._send(MessageType.TIMEOUT_NOW, max(unheard, key=lambda v: self._progress[v].match_index))

    def _quorum_active(self) -> bool:
        membership = self.membership
        active = sum(1 for voter in membership.voters
                     if voter == self.node_id or (voter in self._progress and self._progress[voter].recent_active))
        return active >= self._quorum()

    # ------------------------------------------------------------------ step: any role

    def _step_check(self, m: Message) -> None:
        if m.to_id != self.node_id:
            raise StepRejected(f"message for {m.to_id!r} reached {self.node_id!r}")
        if m.from_id == self.node_id:
            raise StepRejected(f"message from {m.from_id!r} to itself")
        # A sender outside the membership is not refused here: a learner hears the leader before
        # it knows the membership that added it. Votes are what such a sender must not get.
        if not isinstance(m.type, MessageType):
            raise StepRejected(f"unknown message type {m.type!r}")
        if m.entries and m.type is not MessageType.APP:
            raise StepRejected(f"{m.type.name} must not carry entries")
        previous_term = m.log_term
        for offset, entry in enumerate(m.entries):
            if entry.index != m.index + 1 + offset or not previous_term <= entry.term <= m.term:
                raise StepRejected(f"append from {m.from_id} has inconsistent entry {entry.index}/{entry.term}")
            if entry.kind is EntryKind.CONFIG:
                try:
                    Membership.decode(entry.data)
                except MembershipDecodeError as exc:
                    raise StepRejected(f"append from {m.from_id}: entry {entry.index}: {exc}") from None
            previous_term = entry.term

    def _step_higher_term(self, m: Message) -> bool:
        """A message from a newer term; returns whether to go on handling it."""
        if m.type in _VOTE_REQUESTS:
            if not self._may_vote_for(m.from_id):
                return False  # a removed node, or one never added, must not raise our term
            transfer = m.type is MessageType.VOTE and m.context == TRANSFER_CONTEXT
            in_lease = (self._config.check_quorum and self._leader_id is not None
                        and self._election_elapsed < self._config.election_ticks)
            if in_lease and not transfer:
                return False  # a leader was heard recently: do not let the requester disrupt it
            if m.type is MessageType.PRE_VOTE:
                return True  # a pre-vote never changes our term
        if m.type is MessageType.PRE_VOTE_RESP and not m.reject:
            return True  # a grant carries the term we would campaign at, not a newer leader's
        self._become_follower(m.term, m.from_id if m.type in _FROM_LEADER else None)
        return True

    def _step_lower_term(self, m: Message) -> None:
        if m.type in _FROM_LEADER and (self._config.check_quorum or self._config.pre_vote):
            # A stale leader: our term in the answer makes it step down. Without this, a node
            # whose term grew while partitioned could never rejoin a leader that ignores it.
            self._send(MessageType.APP_RESP, m.from_id)
        elif m.type is MessageType.PRE_VOTE:
            self._send(MessageType.PRE_VOTE_RESP, m.from_id, reject=True)
        # Anything else from an older term is stale: drop it (Raft §5.1).

    def _handle_vote_request(self, m: Message) -> None:
        response_type = MessageType.VOTE_RESP if m.type is MessageType.VOTE else MessageType.PRE_VOTE_RESP
        can_vote = self._may_vote_for(m.from_id) and (
            self._voted_for == m.from_id
            or (self._voted_for is None and self._leader_id is None)
            or (m.type is MessageType.PRE_VOTE and m.term > self._term)
        )
        if can_vote and self._log.is_up_to_date(m.index, m.log_term):  # Raft §5.4.1
            self._send(response_type, m.from_id, term=m.term)
            if m.type is MessageType.VOTE:
                self._election_elapsed = 0
                self._voted_for = m.from_id
        else:
            self._send(response_type, m.from_id, reject=True)

    # ------------------------------------------------------------------ step: per role

    def _step_follower(self, m: Message) -> None:
        if m.type is MessageType.APP:
            self._election_elapsed = 0
            self._leader_id = m.from_id
            self._handle_append(m)
        elif m.type is MessageType.HEARTBEAT:
            self._election_elapsed = 0
            self._leader_id = m.from_id
            self._handle_heartbeat(m)
        elif m.type is MessageType.SNAP:
            self._election_elapsed = 0
            self._leader_id = m.from_id
            self._handle_snapshot(m)
        elif m.type is MessageType.TIMEOUT_NOW:
            self._leader_id = m.from_id
            if self._promotable():
                self._campaign_election(transfer=True)  # thesis §3.10: no pre-vote, no waiting
        # Answers to requests this node made in an earlier role of this term are stale.

    def _step_candidate(self, m: Message) -> None:
        """Both PRE_CANDIDATE and CANDIDATE."""
        if m.type in _FROM_LEADER:
            self._become_follower(self._term, m.from_id)  # a leader of our term exists
            self._step_follower(m)
            return
        pre = self._role is Role.PRE_CANDIDATE
        if m.type is not (MessageType.PRE_VOTE_RESP if pre else MessageType.VOTE_RESP):
            return
        if pre and not m.reject and m.term != self._term + 1:
            return  # a grant for an earlier pre-campaign
        self._votes.setdefault(m.from_id, not m.reject)  # a duplicate answer counts once
        self._tally_votes()

    def _step_leader(self, m: Message) -> None:
        pr = self._progress.get(m.from_id)
        if pr is None:
            return  # an answer from a node removed since
        if m.type is MessageType.APP_RESP:
            if m.index > self._log.last_index:
                raise StepRejected(f"{m.from_id} answered for index {m.index} past our last index")
            pr.recent_active = True
            self._handle_append_response(m, pr)
        elif m.type is MessageType.HEARTBEAT_RESP:
            pr.heartbeat_answered()
            if pr.match_index < self._log.last_index or pr.state is ProgressState.PROBE:
                self._want_replicate(m.from_id, send_if_empty=True)
            if m.context is not None:
                self._handle_read_ack(m.from_id, m.context)

    # ------------------------------------------------------------------ replication: follower

    def _handle_append(self, m: Message) -> None:
        if m.index < self._log.commit_index:
            # Everything up to our commit index is the leader's already (Leader Completeness).
            self._send(MessageType.APP_RESP, m.from_id, index=self._log.commit_index, commit=self._log.commit_index)
            return
        last_new_index = self._log.maybe_append(m.index, m.log_term, m.entries)
        if last_new_index is not None:
            self._note_configs(m.entries)
        if last_new_index is None:
            if m.index > self._log.last_index:
                hint_index, hint_term = self._log.last_index, 0
            else:
                hint_index, hint_term = self._log.first_index_of_term_at(m.index), self._log.term(m.index)
            self._send(MessageType.APP_RESP, m.from_id, index=m.index, reject=True,
                       reject_hint=hint_index, hint_term=hint_term)
            return
        self._log.commit_to(min(m.commit, last_new_index))
        outbox = self._outbox
        if outbox:
            # Appends that arrived together are answered once, for the last: its answer covers the
            # others (the leader's match index and in-flight count go by the highest index answered).
            last = outbox[-1]
            if last.type is MessageType.APP_RESP and last.to_id == m.from_id and last.term == self._term \
                    and not last.reject and last.index <= last_new_index:
                outbox.pop()
        self._send(MessageType.APP_RESP, m.from_id, index=last_new_index, commit=self._log.commit_index)

    def _handle_snapshot(self, m: Message) -> None:
        """InstallSnapshot (Raft §7): the shell already holds the snapshot ending at
        (m.index, m.log_term) on its disk, verified; this decides whether to install it."""
        point = SnapshotPoint(m.index, m.log_term)
        if point.index <= self._log.commit_index:
            pass  # stale: we have committed past it already (answer so the leader moves on)
        elif self._log.matches(point.index, point.term):
            # Our log holds the snapshot's last entry: keep the log, the entries apply as usual.
            self._log.commit_to(point.index)
        else:
            self._log.restore(point)
            # Until the shell restores the snapshot's own membership (restore_membership, right
            # after the install), the newest one known stands in.
            self._configs = [(point.index, point.term, self.membership)]
            self._snapshot_to_install = point
        self._send(MessageType.APP_RESP, m.from_id, index=self._log.commit_index, commit=self._log.commit_index)

    def _handle_heartbeat(self, m: Message) -> None:
        # The leader clamps commit to our match index; the clamp to last_index is belt and braces.
        self._log.commit_to(min(m.commit, self._log.last_index))
        self._send(MessageType.HEARTBEAT_RESP, m.from_id, context=m.context)

    # ------------------------------------------------------------------ replication: leader

    def _handle_append_response(self, m: Message, pr: Progress) -> None:
        if m.reject:
            if pr.maybe_decrease(m.index, self._next_index_from_hint(m)):
                self._want_replicate(m.from_id, send_if_empty=True)
            return
        if pr.maybe_update(m.index):
            if pr.state is ProgressState.PROBE or (
                    pr.state is ProgressState.SNAPSHOT and pr.match_index >= pr.pending_snapshot):
                pr.become_replicate()
            if self._maybe_commit():
                self._want_replicate_all(send_if_empty=True)
            if m.from_id == self._transfer_target:
                self._maybe_send_timeout_now()
            self._maybe_promote_learner()
        # The answer carries the follower's commit index: if it lags behind what the follower
        # could know, an (empty) append tells it now rather than at the next heartbeat.
        lagging = m.commit < min(pr.match_index, self._log.commit_index)
        self._want_replicate(m.from_id, send_if_empty=lagging)

    def _next_index_from_hint(self, m: Message) -> int:
        """Where to probe next after a rejection (the fast backoff of Raft §5.3's last note)."""
        if m.hint_term == 0:
            return m.reject_hint + 1  # the follower's log ends at reject_hint
        # Entries of hint_term that we also hold match up to our last one; if we hold none, the
        # follower's whole run of that term (from reject_hint) is divergent.
        last_of_term = self._log.last_index_of_term(m.hint_term, m.index)
        return last_of_term + 1 if last_of_term else m.reject_hint

    def _maybe_commit(self) -> bool:
        """Commit the highest index held by a majority, if it is of this term (Raft §5.4.2)."""
        voters = self._configs[-1][2].voters
        if not voters:
            return False
        node_id, progress, persisted = self._config.node_id, self._progress, self._log.persisted_index
        matches = sorted([persisted if voter == node_id else progress[voter].match_index for voter in voters],
                         reverse=True)
        index = matches[quorum_size(len(voters)) - 1]
        if index <= self._log.commit_index or self._log.term(index) != self._term:
            return False
        old_commit = self._log.commit_index
        self._log.commit_to(index)
        committed_now = [self._log.entry(i) for i in range(old_commit + 1, index + 1)]
        self._uncommitted_bytes = max(
            0, self._uncommitted_bytes - entry_payload_bytes([e for e in committed_now if e.term == self._term]))
        if self._reads_before_commit:
            contexts, self._reads_before_commit = self._reads_before_commit, []
            for context in contexts:
                self._register_read(context)
        return True

    def _want_replicate(self, peer: str, *, send_if_empty: bool) -> None:
        self._replicate_pending[peer] = self._replicate_pending.get(peer, False) or send_if_empty

    def _want_replicate_all(self, *, send_if_empty: bool) -> None:
        for peer in self._progress:
            self._want_replicate(peer, send_if_empty=send_if_empty)

    def _flush_replication(self) -> None:
        """Turn 'peer needs an append' marks into append messages (see the module docstring)."""
        if not self._replicate_pending:
            return
        pending, self._replicate_pending = self._replicate_pending, {}
        if self._role is not Role.LEADER:
            return
        for peer in list(self._progress):
            if peer in pending:
                self._send_appends(peer, send_if_empty=pending[peer])

    def _replication_due(self) -> bool:
        """Whether _flush_replication() would send anything (its first step, without sending)."""
        if self._role is not Role.LEADER:
            return False
        for peer, send_if_empty in self._replicate_pending.items():
            pr = self._progress.get(peer)
            if pr is None or pr.is_paused():
                continue
            if send_if_empty or pr.next_index <= self._log.last_index:
                return True
            if not self._log.can_send_after(pr.next_index - 1):
                return True
        return False

    def _send_appends(self, peer: str, *, send_if_empty: bool) -> None:
        """Send as many appends as the follower's state allows (one while probing)."""
        pr = self._progress[peer]
        config = self._config
        while not pr.is_paused():
            if not self._log.can_send_after(pr.next_index - 1):
                self._send_snapshot(peer, pr)
                return
            entries = self._log.slice(pr.next_index, config.max_entries_per_append, config.max_append_bytes)
            if not entries and not send_if_empty:
                return
            previous_index = pr.next_index - 1
            self._send(MessageType.APP, peer, index=previous_index, log_term=self._log.term(previous_index),
                       entries=entries, commit=self._log.commit_index)
            pr.sent_append(previous_index + len(entries), len(entries), sum(map(entry_size_bytes, entries)))
            if not entries:
                return
            send_if_empty = False

    def _send_snapshot(self, peer: str, pr: Progress) -> None:
        """The entries the follower needs next are compacted: ask the shell to send the snapshot."""
        snapshot = self._log.snapshot
        self._send(MessageType.SNAP, peer, index=snapshot.index, log_term=snapshot.term)
        pr.become_snapshot(snapshot.index)

    def _bcast_heartbeat(self) -> None:
        context = self._read_requests[-1].context if self._read_requests else None
        # An unsent heartbeat is superseded by this one (newer commit, newer read context).
        self._outbox = [m for m in self._outbox if m.type is not MessageType.HEARTBEAT]
        for peer, pr in self._progress.items():
            commit = min(pr.match_index, self._log.commit_index)
            self._send(MessageType.HEARTBEAT, peer, commit=commit, context=context)

    # ------------------------------------------------------------------ reads (Raft §6.4)

    def _register_read(self, context: int) -> None:
        if self.membership.voters == (self.node_id,):
            self._read_states.append((context, self._log.commit_index))
            return
        self._read_requests.append(_ReadRequest(context, self._log.commit_index, {self.node_id}))
        self._bcast_heartbeat()

    def _handle_read_ack(self, peer: str, context: int) -> None:
        for position, request in enumerate(self._read_requests):
            if request.context != context:
                continue
            # The first request with this context: an ack can only confirm requests that were
            # registered before the heartbeat it answers was sent.
            if not self.membership.is_voter(peer):
                return  # a learner's answer confirms nothing
            request.acks.add(peer)
            if sum(1 for voter in request.acks if self.membership.is_voter(voter)) >= self._quorum():
                # Leadership confirmed after every earlier request arrived too: release them all.
                for done in self._read_requests[: position + 1]:
                    self._read_states.append((done.context, done.index))
                del self._read_requests[: position + 1]
            return

    # ------------------------------------------------------------------ helpers

    def _hard_state(self) -> HardState:
        return HardState(term=self._term, voted_for=self._voted_for)

    def _send(self, message_type: MessageType, to_id: str, *, term: int | None = None, log_term: int = 0,
              index: int = 0, entries: tuple[Entry, ...] = (), commit: int = 0, reject: bool = False,
              reject_hint: int = 0, hint_term: int = 0, context: int | None = None) -> None:
        self._outbox.append(Message(
            type=message_type, from_id=self._config.node_id, to_id=to_id, term=self._term if term is None else term,
            log_term=log_term, index=index, entries=entries, commit=commit, reject=reject,
            reject_hint=reject_hint, hint_term=hint_term, context=context,
        ))
