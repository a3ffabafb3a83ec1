"""Peers of one process: a `MemoryNetwork` hands each node's messages to the addressee's inbox.

The in-memory twin of `http.py` (hashicorp/raft's `InmemTransport`): the same fire-and-forget
contract (`interfaces.Transport`), so a node runs unchanged on it, in tests that start several
nodes in one event loop. Delivery is scheduled on the loop, never made inside `send()`, so a
sender's drive loop is never re-entered; a node that is unknown, cut off or whose inbox is full
loses the messages, as a dropped HTTP request would.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Callable, Collection, Sequence

from raftq.cluster.raft.messages import Message

#: What a node exposes to receive: Node.deliver (False when its inbox is full).
Deliver = Callable[[Sequence[Message]], bool]


class MemoryNetwork:
    """The nodes of one process and which of them are cut off."""

    def __init__(self) -> None:
        self._inboxes: dict[str, Deliver] = {}
        self.cut: set[str] = set()  # nodes that neither send nor receive
        self.delivered_count = 0

    def attach(self, node_id: str, deliver: Deliver) -> None:
        self._inboxes[node_id] = deliver

    def transport(self, node_id: str) -> "MemoryTransport":
        return MemoryTransport(self, node_id)

    def _deliver(self, from_id: str, to_id: str, messages: list[Message]) -> None:
        deliver = self._inboxes.get(to_id)
        if deliver is None or from_id in self.cut or to_id in self.cut:
            return
        if deliver(messages):
            self.delivered_count += len(messages)


class MemoryTransport:
    """One node's end of a MemoryNetwork (see the module docstring)."""

    def __init__(self, network: MemoryNetwork, node_id: str) -> None:
        self._network = network
        self._node_id = node_id

    def send(self, messages: Sequence[Message], may_wait: Collection[str] = ()) -> None:
        by_peer: dict[str, list[Message]] = defaultdict(list)
        for message in messages:
            by_peer[message.to_id].append(message)
        loop = asyncio.get_running_loop()
        for to_id, batch in by_peer.items():
            loop.call_soon(self._network._deliver, self._node_id, to_id, batch)

    def set_peers(self, peers: dict[str, str]) -> None:
        return None  # the network reaches every attached node by id

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
