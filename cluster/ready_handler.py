"""The one Ready handler: what a shell does with each Ready, in the order the Raft rules require.

Theory of operation
-------------------
The core (`cluster/raft/`) says *what* must happen after each batch of inputs (a `Ready`); this
module says *in which order*, once, as a sans-IO plan in the shape of the client's `_plan`: a
generator that yields actions and that the caller carries out, one by one:

    for action in handle_ready(ready):
        carry out action       # the asyncio node: awaits disk threads; the simulator: in memory

Both shells drive the same generator: the asyncio node (`cluster/server.py`: real WAL, snapshot
files and HTTP peers) and the deterministic simulator (`tests/sim/cluster.py`: in-memory storage
that loses unsynced writes on a crash, a simulated network). So a mistake in the order is made
in both, and the simulator, which crashes nodes between any two actions, finds it.

The order (Raft §5.1, etcd `Ready`; each step only once the one before is done):

    InstallSnapshot   a follower makes the snapshot it received its state, before anything else
    UseMembership     connect to the members of a new membership (before sending to them)
    Send              if `ready.send_before_persist` (a leader with no new term or vote) and
                      there is something to persist: the appends travel while the leader writes
    Persist           hard state and entries, synced when `must_sync`: before any vote or reply
    Send              if not `send_before_persist`: after the disk has what the messages promise
    Apply             committed entries, in order
    ServeReads        read states, each once applied >= its read index
    Send              a leader's Ready with nothing to persist: last (see below)
    Advance           tell the core (the caller calls `raft.advance(ready)`)

A leader's Ready with nothing to persist is typically the one that commits: its messages tell the
followers the new commit index, which only moves their apply forward, while the entries it applies
answer clients. So it applies (and serves reads) first and sends after; the node lets the answered
requests write their responses before it sends (`Node._handle_ready`). Nothing waits for a
follower's apply, so this moves a one-job submit's answer ahead of two socket writes.

A caller that stops in the middle (a crash) simply never advances; the core then never counts the
Ready's entries as persisted or applied.
"""

from __future__ import annotations

from typing import Iterator, Union

from raftq.cluster.raft.membership import Membership
from raftq.cluster.raft.messages import Entry, HardState, Message, SnapshotPoint
from raftq.cluster.raft.node import Ready
from raftq.cluster.records import record

__all__ = ["Action", "Advance", "Apply", "InstallSnapshot", "Persist", "Send", "ServeReads", "UseMembership",
           "handle_ready"]


@record
class InstallSnapshot:
    """Restore the state machine from the stored snapshot at `point`; reset the log to empty after it."""

    point: SnapshotPoint


@record
class UseMembership:
    """The membership in effect changed: reach its members at their URLs from now on."""

    membership: Membership


@record
class Persist:
    """Write the hard state (if any) and append the entries; fsync before returning when `sync`."""

    hard_state: HardState | None
    entries: tuple[Entry, ...]
    sync: bool


@record
class Send:
    """Hand the messages to the transport (never waits for a peer)."""

    messages: tuple[Message, ...]


@record
class Apply:
    """Apply the committed entries to the state machine, in order."""

    entries: tuple[Entry, ...]


@record
class ServeReads:
    """Release each read `(context, read_index)` once the state machine has applied read_index."""

    read_states: tuple[tuple[int, int], ...]


@record
class Advance:
    """Everything above is done: call `raft.advance(ready)`."""

    ready: Ready


Action = Union[InstallSnapshot, UseMembership, Persist, Send, Apply, ServeReads, Advance]


def handle_ready(ready: Ready) -> Iterator[Action]:
    """The actions one Ready asks for, in the order they must be carried out (module docstring).

    Args:
        ready: what `RaftNode.ready()` returned.

    Yields:
        The actions, each to be finished before the next is asked for; the last is `Advance`.
    """
    if ready.snapshot is not None:
        yield InstallSnapshot(ready.snapshot)
    if ready.membership is not None:
        yield UseMembership(ready.membership)
    persists = ready.hard_state is not None or bool(ready.entries)
    if ready.send_before_persist and persists and ready.messages:
        yield Send(ready.messages)
    if persists:
        yield Persist(ready.hard_state, ready.entries, ready.must_sync)
    if not ready.send_before_persist and ready.messages:
        yield Send(ready.messages)
    if ready.committed_entries:
        yield Apply(ready.committed_entries)
    if ready.read_states:
        yield ServeReads(ready.read_states)
    if ready.send_before_persist and not persists and ready.messages:
        yield Send(ready.messages)
    yield Advance(ready)
