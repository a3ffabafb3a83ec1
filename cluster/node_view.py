"""A read-only view of one node: what the status endpoint and the metrics read.

The view only reads (figures of the core, the applied state, the log and the snapshots); it has no
method that changes anything, so the HTTP status answer and a Prometheus scrape cannot disturb the
drive loop, and neither needs to know how the node is put together.
"""

from __future__ import annotations

from typing import Any, Protocol

from cluster.config import NodeConfig
from cluster.queue.state_machine import QueueStateMachine
from cluster.raft.node import RaftNode, Role


class _NodeParts(Protocol):
    """What the view reads of the node."""

    config: NodeConfig
    raft: RaftNode | None
    queue: QueueStateMachine
    wal: Any
    snapshotting: Any
    snapshot_sender: Any
    housekeeping: Any
    leader_changes_count: int

    @property
    def role(self) -> Role | None: ...

    @property
    def leader_id(self) -> str | None: ...

    @property
    def is_leader(self) -> bool: ...

    @property
    def is_serving(self) -> bool: ...

    def leader_url(self) -> str | None: ...


class NodeView:
    """See the module docstring."""

    def __init__(self, node: _NodeParts) -> None:
        self._node = node

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

    def workers_alive_count(self) -> int:
        return self._node.housekeeping.workers_alive_count()

    def status(self, *, with_digest: bool = False) -> dict:
        """The `/v1/cluster` answer: this node's view of the cluster."""
        node, config = self._node, self._node.config
        raft = node.raft
        nodes = [{"id": config.node_id, "url": config.url}]
        nodes += [{"id": peer_id, "url": config.public_urls.get(peer_id, url)}
                  for peer_id, url in sorted(config.peers.items())]
        progress = raft.progress if raft is not None and node.is_leader else {}
        for entry in nodes:
            entry["leader"] = entry["id"] == node.leader_id
            if entry["id"] in progress:
                entry["match_index"] = progress[entry["id"]]
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
        } | ({"digest": node.queue.digest()} if with_digest else {})
