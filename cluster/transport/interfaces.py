"""How Raft messages leave a node: one `Message` type, fire and forget.

The transport never retries and never blocks the drive loop. Raft tolerates loss, duplication and
reordering (every message carries its term and log position), so a full peer queue drops and a
failed request is simply gone; the next heartbeat or append repairs the follower.
"""

from __future__ import annotations

from typing import Collection, Protocol, Sequence

from raftq.cluster.raft.messages import Message


class Transport(Protocol):
    def send(self, messages: Sequence[Message], may_wait: Collection[str] = ()) -> None:
        """Queue messages for their peers; returns at once. Unknown peers and full queues drop.
        Appends with entries to the peers in `may_wait` may be held back briefly and batched
        (the Raft core's `appends_may_wait`); a transport may also send them at once."""

    def set_peers(self, peers: dict[str, str]) -> None:
        """The membership changed: send to these peers (id -> base URL) from now on."""

    async def start(self) -> None:
        """Start background senders."""

    async def close(self) -> None:
        """Stop senders and release connections."""
