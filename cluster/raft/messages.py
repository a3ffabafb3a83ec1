"""Raft log entries, persistent state and peer messages.

EntryKind, Entry and HardState are shared by the Raft core, the WAL and the queue (fixed in the
module contracts). MessageType and Message are what RaftNode.step() takes and Ready.messages
carries; cluster/raft/codec.py turns them into bytes. Everything here is a frozen, slotted value.
"""

from __future__ import annotations

import enum

from raftq.cluster.records import record


class EntryKind(enum.IntEnum):
    """What a log entry carries."""

    NORMAL = 0  #: An encoded queue command.
    NOOP = 1  #: The empty entry a new leader appends to commit its term (Raft §5.4.2).
    #: A whole new membership (membership.py), in effect on each node as soon as it is appended.
    CONFIG = 2


@record
class Entry:
    """One log entry. Indexes start at 1; index 0 / term 0 is the empty log."""

    index: int
    term: int
    kind: EntryKind
    data: bytes  # encoded queue command; b"" for NOOP


@record
class HardState:
    """What a node must persist before it answers a vote or an append (Raft §5.1, Figure 2)."""

    term: int = 0
    voted_for: str | None = None


class MessageType(enum.IntEnum):
    """The kinds of peer message (etcd names). The integer values are the wire type tags."""

    VOTE = 1  #: RequestVote (Raft §5.2): term, log_term/index of the candidate's last entry.
    VOTE_RESP = 2  #: Vote answer: reject=False grants the vote.
    PRE_VOTE = 3  #: "Would you vote for me at term?" (thesis §9.6); changes no state.
    PRE_VOTE_RESP = 4  #: Pre-vote answer; a grant carries the proposed term.
    APP = 5  #: AppendEntries: index/log_term of the previous entry, entries, commit.
    APP_RESP = 6  #: Append answer: index = last matching index, or the rejected previous index.
    HEARTBEAT = 7  #: Leader liveness + commit (clamped to the follower's match) + read context.
    HEARTBEAT_RESP = 8  #: Heartbeat answer echoing the read context (ReadIndex, Raft §6.4).
    #: InstallSnapshot (Raft §7): index/log_term = the snapshot's last included index and term.
    #: The snapshot's bytes never travel inside the message: the leader's shell streams the file
    #: in chunks and the follower's shell steps this message into its core once the whole file
    #: is on its disk and verified. The follower answers with an APP_RESP.
    SNAP = 9
    #: Leadership transfer (thesis §3.10): the leader tells an up-to-date voter to campaign now,
    #: without waiting for its election timeout and without a pre-vote.
    TIMEOUT_NOW = 10


@record
class SnapshotPoint:
    """Where a snapshot of the applied state ends: the index and term of its last entry.

    SnapshotPoint(0, 0) is "no snapshot" (the log starts at index 1).
    """

    index: int = 0
    term: int = 0


@record
class Message:
    """One peer message. Unused fields keep their zero defaults.

    For APP_RESP with reject=True: `index` is the previous index the follower rejected,
    `hint_term` the conflicting term at that index in the follower's log and `reject_hint` the
    first index of that term there; `hint_term` 0 means the follower's log is shorter and
    `reject_hint` is its last index. The leader uses both to skip a whole term per round trip.
    A successful APP_RESP carries the follower's commit index in `commit`.
    A VOTE whose `context` is TRANSFER_CONTEXT belongs to a campaign a leader asked for
    (TIMEOUT_NOW): voters grant it even while they still hear that leader.
    """

    type: MessageType
    from_id: str
    to_id: str
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    hint_term: int = 0
    context: int | None = None  # ReadIndex request id carried by heartbeats and their answers


#: The `context` of a VOTE sent by a candidate that campaigns because its leader asked it to.
TRANSFER_CONTEXT = 1


def snapshot_stored(leader_id: str, node_id: str, term: int, point: SnapshotPoint) -> Message:
    """The SNAP message a follower's shell steps into its own core once the leader's snapshot file
    ending at `point` is stored durably (InstallSnapshot, Raft §7): the core then decides whether
    to install it (Ready.snapshot) or only to answer with its commit index."""
    return Message(MessageType.SNAP, from_id=leader_id, to_id=node_id, term=term, index=point.index,
                   log_term=point.term)
