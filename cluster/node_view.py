"""A read-only view of one node: what the status endpoint and the metrics read.

The view only reads (figures of the core, the applied state, the log and the snapshots); it has no
method that changes anything, so the HTTP status answer and a Prometheus scrape cannot disturb the
drive loop, and neither needs to know how the node is put together.

The state digest is the one costly figure: it encodes the whole state (tens of MB at a few hundred
thousand jobs). Computed on the loop for every status poll, it starved the drive loop of a node
being polled while it caught up, until heartbeats stopped and no election could finish. So the
view takes the cheap capture on the loop, hashes it in a worker thread, and keeps the answer for
its applied index: pollers of an idle node pay nothing, pollers of a busy one share one hash.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from raftq.cluster.config import NodeConfig
from raftq.cluster.queue.state_machine import QueueStateMachine, capture_digest
from raftq.cluster.raft.node import RaftNode, Role


class _NodeParts(Protocol):
    """What the view reads of the node."""

    config: NodeConfig
    raft: RaftNode | None
    queue: QueueStateMachine
    wal: Any
    snapshotting: Any
    snapshot_sender: Any
    housekeeping: Any
    fetch_gate: Any
    leader_changes_count: int
    pending_proposals_count: int

    def peer_send_queue_counts(self) -> dict[str, int]: ...

    @property
    def role(self) -> Role | None: ...

    @property
    def leader_id(self) -> str | None: ...

    @property
    def is_leader(self) -> bool: ...

    @property
    def is_serving(self) -> bool: ...

    def leader_url(self) -> str | None: ...

    def member_url(self, node_id: str) -> str | None: ...

    def now_ms(self) -> int: ...


class NodeView:
    """See the module docstring."""

    def __init__(self, node: _NodeParts) -> None:
        self._node = node
        #: (applied index, digest) of the newest digest computed, and the hash in progress if any.
        self._digest: tuple[int, str] | None = None
        self._digest_pending: tuple[int, asyncio.Future[str]] | None = None

    @property
    def config(self) -> NodeConfig:
        return self._node.config

    @property
    def raft(self) -> RaftNode | None:
        """The core, for its figures (term, indexes, role, progress); None before start."""
        return self._node.raft

    @property
    def queue(self) -> QueueStateMachine:
        """The applied state, for its figures (counters, depths, sizes)."""
        return self._node.queue

    @property
    def is_leader(self) -> bool:
        return self._node.is_leader

    @property
    def leader_changes_count(self) -> int:
        return self._node.leader_changes_count

    @property
    def wal_bytes(self) -> int | None:
        wal = self._node.wal
        return None if wal is None else wal.size_bytes

    @property
    def snapshots(self) -> Any:
        """The snapshot figures: taken and installed counts, the last one's size and times."""
        return self._node.snapshotting

    @property
    def snapshot_transfers(self) -> tuple[int, int] | None:
        """(delivered, failed) transfers this node sent; None on a cluster of one."""
        sender = self._node.snapshot_sender
        return None if sender is None else (sender.sent_total, sender.failed_total)

    @property
    def pending_proposals_count(self) -> int:
        return self._node.pending_proposals_count

    def peer_send_queue_counts(self) -> dict[str, int]:
        return self._node.peer_send_queue_counts()

    def workers_alive_count(self) -> int:
        return self._node.housekeeping.workers_alive_count()

    def fetches_waiting(self) -> int:
        """Fetch long polls waiting for a job now."""
        return self._node.fetch_gate.waiting

    def now_ms(self) -> int:
        """The cluster's clock now (cluster/leader_clock.py); off the leader, the applied clock."""
        return self._node.now_ms()

    def status(self) -> dict:
        """The `/v1/cluster` answer: this node's view of the cluster."""
        node, config = self._node, self._node.config
        raft = node.raft
        # The membership in effect here (its newest CONFIG entry); match_index as the leader
        # knows it (this node's own: its last index), null where this node cannot know.
        if raft is not None:
            members = [(m.node_id, m.voter) for m in raft.membership.members]
        else:
            members = [(node_id, True) for node_id in sorted((config.node_id, *config.peers))]
        progress = raft.progress if raft is not None and node.is_leader else {}
        nodes = []
        for node_id, voter in members:
            match_index = progress.get(node_id)
            if node_id == config.node_id and raft is not None:
                match_index = raft.last_index
            nodes.append({"id": node_id, "url": node.member_url(node_id), "voter": voter,
                          "leader": node_id == node.leader_id, "match_index": match_index})
        return {
            "node": config.node_id,
            "role": raft.role.name.lower() if raft is not None else "starting",
            "serving": node.is_serving,
            "term": raft.term if raft is not None else 0,
            "leader": node.leader_id,
            "leader_url": node.leader_url(),
            "commit_index": raft.commit_index if raft is not None else 0,
            "applied_index": node.queue.last_applied,
            "last_index": raft.last_index if raft is not None else 0,
            "snapshot_index": raft.snapshot.index if raft is not None else 0,
            "first_index": raft.first_index if raft is not None else 1,
            "nodes": nodes,
            "member": any(entry["id"] == config.node_id for entry in nodes),
            "membership_pending": raft.membership_pending if raft is not None else False,
        }

    async def status_with_digest(self) -> dict:
        """`status()` plus the state digest at the applied index it reports (see the module doc)."""
        status = self.status()
        status["digest"] = await self._state_digest()
        return status

    async def _state_digest(self) -> str:
        """The digest at the current applied index; starts (or joins) its hash in a worker thread."""
        queue = self._node.queue
        index = queue.last_applied
        if self._digest is not None and self._digest[0] == index:
            return self._digest[1]
        if self._digest_pending is None or self._digest_pending[0] != index:
            future = asyncio.ensure_future(asyncio.to_thread(capture_digest, queue.capture()))
            self._digest_pending = (index, future)
        pending_index, future = self._digest_pending
        digest = await asyncio.shield(future)
        if self._digest is None or self._digest[0] < pending_index:
            self._digest = (pending_index, digest)
        if self._digest_pending is not None and self._digest_pending[1] is future:
            self._digest_pending = None
        return digest
