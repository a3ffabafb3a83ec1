"""Raft messages between peers over HTTP: POST /raft/messages with a msgpack list of messages.

One sender task per peer drains that peer's queue and posts everything queued as one request, so a
burst of appends and heartbeats costs one round trip, and requests to one peer never overlap (they
arrive in order on a healthy link). Requests are never retried: Raft's own heartbeats and append
retries are the retry policy, and a transport retry could deliver a stale append after a newer one.

The peers change with the membership (`set_peers`): a sender starts for each new member and stops
for each removed one. Every request names its sender (`FROM_HEADER`) and the sender's own URL
(`FROM_URL_HEADER`), so a node that has just been added, and does not know the membership yet,
can answer the leader that is replicating to it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Sequence

import aiohttp

from raftq.cluster.raft.codec import encode_messages
from raftq.cluster.raft.messages import Message
from raftq.protocol import CONTENT_TYPE_MSGPACK

log = logging.getLogger("raftq.transport")

#: Messages queued for one peer; a peer that is down or slow loses the oldest traffic rather than
#: growing memory (Raft resends what matters).
PEER_QUEUE_COUNT_MAX = 4096
#: Messages in one HTTP request; keeps a request body near a few MiB at most with 512-entry appends.
REQUEST_MESSAGES_MAX = 256
#: A peer that does not answer within this is treated as gone for this request.
REQUEST_TIMEOUT_S = 5.0
#: Header carrying the cluster secret.
SECRET_HEADER = "X-Raftq-Cluster-Secret"
#: Headers naming the sending node and the URL it is reached at.
FROM_HEADER = "X-Raftq-From"
FROM_URL_HEADER = "X-Raftq-From-Url"


class HttpTransport:
    """Sends Raft messages to peers; see the module docstring."""

    def __init__(self, node_id: str, peers: dict[str, str], *, secret: str | None,
                 ssl_context: ssl.SSLContext | None = None, own_url: str = "") -> None:
        self._node_id = node_id
        self._own_url = own_url
        self._ssl_context = ssl_context  # for https:// peers (cluster/tls.py); None: default checks
        self._peers = dict(peers)
        self._secret = secret
        self._queues: dict[str, asyncio.Queue[Message]] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._session: aiohttp.ClientSession | None = None
        self.dropped_count = 0
        self.failed_requests_count = 0

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit_per_host=2, force_close=False, ssl=self._ssl_context or True)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        )
        self._start_senders()

    def set_peers(self, peers: dict[str, str]) -> None:
        """The peers are now these (id -> base URL): senders start and stop to match."""
        self._peers = dict(peers)
        if self._session is None:
            return  # start() starts them
        for peer_id in [p for p in self._queues if p not in self._peers]:
            self._tasks.pop(peer_id).cancel()
            del self._queues[peer_id]
        self._start_senders()

    def _start_senders(self) -> None:
        for peer_id in sorted(self._peers):
            if peer_id not in self._queues:
                self._queues[peer_id] = asyncio.Queue(maxsize=PEER_QUEUE_COUNT_MAX)
                self._tasks[peer_id] = asyncio.create_task(self._sender(peer_id), name=f"raft-send-{peer_id}")

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._queues.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def queued_counts(self) -> dict[str, int]:
        """Messages waiting to be sent, per peer (what `raftq_peer_send_queue_messages` exports)."""
        return {peer_id: queue.qsize() for peer_id, queue in self._queues.items()}

    def send(self, messages: Sequence[Message]) -> None:
        for message in messages:
            queue = self._queues.get(message.to_id)
            if queue is None:
                continue
            if queue.full():
                # Drop the oldest: newer messages carry newer terms and commit indexes.
                queue.get_nowait()
                self.dropped_count += 1
            queue.put_nowait(message)

    async def _sender(self, peer_id: str) -> None:
        queue = self._queues[peer_id]
        headers = {"Content-Type": CONTENT_TYPE_MSGPACK, FROM_HEADER: self._node_id}
        if self._own_url:
            headers[FROM_URL_HEADER] = self._own_url
        if self._secret:
            headers[SECRET_HEADER] = self._secret
        while True:
            batch = [await queue.get()]
            while not queue.empty() and len(batch) < REQUEST_MESSAGES_MAX:
                batch.append(queue.get_nowait())
            url = self._peers[peer_id].rstrip("/") + "/raft/messages"  # a member's URL may change
            await self._post(peer_id, url, headers, encode_messages(batch))

    async def _post(self, peer_id: str, url: str, headers: dict, body: bytes) -> None:
        assert self._session is not None
        try:
            async with self._session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 204:
                    self.failed_requests_count += 1
                    log.debug("peer %s answered %s", peer_id, response.status)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.failed_requests_count += 1
            log.debug("peer %s unreachable: %s", peer_id, exc)
