"""Deliberately broken variants of the Raft core, planted without editing its files.

Each planted bug is a context manager that monkeypatches one rule of `cluster.raft` (or of the
queue state machine, or of the simulated shell in cluster.py) for the duration of a `with`
block, so that the simulator can prove it notices: `test_planted_bugs.py` asserts each is caught
within a bounded number of seeds, and `python -m tests.sim --plant NAME --seed N -v` replays a
catch.

The patches reach into private methods of the core (`_maybe_commit`, `_handle_vote_request`...) on
purpose: they model one specific mistake each. If the core is refactored, update the patch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator
from unittest import mock

from raftq.cluster.queue.jobs import LEASED
from raftq.cluster.queue.results import LEASE_MISMATCH, NOT_FOUND, ItemError
from raftq.cluster.queue.state_machine import QueueStateMachine
from raftq.cluster.raft.log import RaftLog
from raftq.cluster.raft.messages import HardState, Message, MessageType, SnapshotPoint
from raftq.cluster import ready_handler
from raftq.cluster.raft.errors import NotLeader
from raftq.cluster.raft.node import RaftNode, Ready, Role
from raftq.cluster.ready_handler import Action, Send

from .cluster import SimNode, Simulation
from .storage import StoredSnapshot

__all__ = ["PLANTED_BUGS", "planted"]


@contextlib.contextmanager
def vote_without_log_check() -> Iterator[None]:
    """Grant votes (and pre-votes) without the Raft §5.4.1 up-to-date check."""
    with mock.patch.object(RaftLog, "is_up_to_date", lambda self, last_index, last_term: True):
        yield


@contextlib.contextmanager
def commit_previous_term() -> Iterator[None]:
    """Commit whatever index a majority holds, even of an earlier term (the Figure 8 mistake)."""
    original = RaftNode._maybe_commit

    def maybe_commit(self: RaftNode) -> bool:
        if original(self):
            return True
        log = self._log
        matches = sorted([log.persisted_index, *(pr.match_index for pr in self._progress.values())], reverse=True)
        index = matches[self._quorum() - 1]
        return log.commit_to(index) if index > log.commit_index else False

    with mock.patch.object(RaftNode, "_maybe_commit", maybe_commit):
        yield


@contextlib.contextmanager
def no_sync() -> Iterator[None]:
    """Every Ready says must_sync=False: answers go out before the disk has the data."""
    original = RaftNode.ready

    def ready(self: RaftNode):  # type: ignore[no-untyped-def]
        return dataclasses.replace(original(self), must_sync=False)

    with mock.patch.object(RaftNode, "ready", ready):
        yield


@contextlib.contextmanager
def forget_vote_on_restart() -> Iterator[None]:
    """A restarted node forgets whom it voted for (PySyncObj issue #84)."""
    original = RaftNode.__init__

    def init(self: RaftNode, config, *, hard_state: HardState, **rest) -> None:  # type: ignore[no-untyped-def]
        original(self, config, hard_state=HardState(hard_state.term, None), **rest)

    with mock.patch.object(RaftNode, "__init__", init):
        yield


@contextlib.contextmanager
def accept_any_lease() -> Iterator[None]:
    """The state machine accepts acks, fails and extends on any lease token of a leased job, from
    any worker, even after expiry (no fencing)."""

    def lease_error(job, job_id: str, lease: int, worker: str, now: int) -> ItemError | None:  # type: ignore[no-untyped-def]
        if job is None:
            return ItemError(NOT_FOUND, f"no job {job_id}")
        if job.state != LEASED:
            return ItemError(LEASE_MISMATCH, f"job {job_id} is not leased")
        return None

    with mock.patch.object(QueueStateMachine, "_lease_error", staticmethod(lease_error)):
        yield


@contextlib.contextmanager
def snapshot_replaces_matching_log() -> Iterator[None]:
    """A follower installs every snapshot past its commit index, even when its log holds the
    snapshot's last entry: it throws away entries after it that it has already acknowledged."""

    def handle_snapshot(self: RaftNode, m: Message) -> None:
        point = SnapshotPoint(m.index, m.log_term)
        if point.index > self._log.commit_index:
            self._log.restore(point)
            self._snapshot_to_install = point
        self._send(MessageType.APP_RESP, m.from_id, index=self._log.commit_index, commit=self._log.commit_index)

    with mock.patch.object(RaftNode, "_handle_snapshot", handle_snapshot):
        yield


@contextlib.contextmanager
def snapshot_commit_ignores_term() -> Iterator[None]:
    """A follower whose log reaches a snapshot's index takes that entry as the snapshot's without
    comparing terms, and commits up to it (the log matching check skipped)."""

    def handle_snapshot(self: RaftNode, m: Message) -> None:
        point = SnapshotPoint(m.index, m.log_term)
        if point.index <= self._log.commit_index:
            pass
        elif point.index <= self._log.last_index:
            self._log.commit_to(point.index)
        else:
            self._log.restore(point)
            self._snapshot_to_install = point
        self._send(MessageType.APP_RESP, m.from_id, index=self._log.commit_index, commit=self._log.commit_index)

    with mock.patch.object(RaftNode, "_handle_snapshot", handle_snapshot):
        yield


@contextlib.contextmanager
def install_without_restore() -> Iterator[None]:
    """The follower's shell installs a snapshot (log reset, core moved on) but keeps its old state
    machine instead of restoring the snapshot's."""

    def restore_installed(self: Simulation, node: SimNode, stored: StoredSnapshot) -> None:
        pass

    with mock.patch.object(Simulation, "_restore_installed", restore_installed):
        yield


def _handle_ready_sending_early(send_first: Callable[[Ready], bool]):  # type: ignore[no-untyped-def]
    """The shared Ready handler, but sending a Ready's messages before its Persist whenever
    send_first(ready) says so (the right rule is `ready.send_before_persist`)."""
    original = ready_handler.handle_ready

    def handle_ready(ready: Ready) -> Iterator[Action]:
        early = send_first(ready) and bool(ready.messages)
        if early:
            yield Send(ready.messages)
        for action in original(ready):
            if early and isinstance(action, Send):
                continue
            yield action

    return mock.patch.object(ready_handler, "handle_ready", handle_ready)


@contextlib.contextmanager
def send_before_persist() -> Iterator[None]:
    """The node's own Ready handler sends every message before the disk has the Ready's state:
    votes, vote requests and append answers promise what a crash can take back."""
    with _handle_ready_sending_early(lambda ready: True):
        yield


@contextlib.contextmanager
def send_before_persisting_term() -> Iterator[None]:
    """The node's own Ready handler sends a Ready's messages before persisting the new term or
    vote it carries (a leader's appends may go early only when there is none)."""
    with _handle_ready_sending_early(lambda ready: ready.send_before_persist or ready.hard_state is not None):
        yield


@contextlib.contextmanager
def membership_changes_at_once() -> Iterator[None]:
    """A leader changes the membership without waiting for the change before it to commit, nor for
    its own term's first entry (the 2015 single-server-change bug and worse)."""
    def check_change_allowed(self: RaftNode) -> None:
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader_id)

    with mock.patch.object(RaftNode, "_check_change_allowed", check_change_allowed):
        yield


#: name -> context manager that plants it.
PLANTED_BUGS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "vote_without_log_check": vote_without_log_check,
    "commit_previous_term": commit_previous_term,
    "no_sync": no_sync,
    "forget_vote_on_restart": forget_vote_on_restart,
    "accept_any_lease": accept_any_lease,
    "snapshot_replaces_matching_log": snapshot_replaces_matching_log,
    "snapshot_commit_ignores_term": snapshot_commit_ignores_term,
    "install_without_restore": install_without_restore,
    "send_before_persist": send_before_persist,
    "send_before_persisting_term": send_before_persisting_term,
    "membership_changes_at_once": membership_changes_at_once,
}


def planted(name: str | None) -> contextlib.AbstractContextManager[None]:
    """The context manager planting bug `name` (a no-op for None)."""
    if name is None:
        return contextlib.nullcontext()
    return PLANTED_BUGS[name]()
