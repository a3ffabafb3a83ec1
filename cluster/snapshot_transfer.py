"""InstallSnapshot over HTTP: a leader streams its newest snapshot file to a follower in chunks.

Theory of operation
-------------------
The Raft core only says *that* a follower needs a snapshot (a SNAP message in a Ready); the bytes
never pass through it. The leader's `SnapshotSender` runs one transfer task per follower:

    POST /raft/snapshot   X-Raftq-Snapshot: <index>-<term>-<size>-<sha256 of the file>
                          X-Raftq-Offset: <where this chunk starts>   body: the chunk

The follower's `SnapshotReceiver` appends each chunk to a `.part` file named after the snapshot
and answers how many bytes it now holds; the sender always continues from that number. So an
interrupted transfer resumes where the follower's disk left off (the first request of a transfer
carries no body and just asks), and a transfer of a different snapshot replaces the old part.
Once the whole file is there its sha256 is checked against the header, it is renamed into the
snapshot directory and verified like any snapshot, and only then is a SNAP message stepped into
the follower's core, which installs it (Ready.snapshot) or ignores it when stale. The follower's
answer to the core travels as an ordinary APP_RESP.

Every transfer ends with `report(peer, delivered)` to the leader's core: without it the core
would wait for that follower forever. A failed transfer is retried when the core asks again,
but not sooner than `RETRY_DELAY_S` after the failure, so a follower whose disk is full does not
turn the leader into a busy loop of 100 MB reads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import time
from dataclasses import dataclass
from typing import Callable

import aiohttp

from raftq.cluster.storage.errors import SnapshotCorruptionError
from raftq.cluster.storage.snapshots import IncomingSnapshot, OffsetMismatch, SnapshotMeta, SnapshotStore, file_digest
from raftq.cluster.transport.http import FROM_HEADER, SECRET_HEADER

log = logging.getLogger("raftq.snapshot")

#: Bytes per request: big enough that a 100 MB snapshot is a hundred round trips, small enough
#: that a request never holds the follower's loop or a slow link for long.
CHUNK_BYTES = 1 << 20
#: One chunk must arrive within this, or the transfer counts as failed (and resumes later).
CHUNK_TIMEOUT_S = 30.0
#: After a failed transfer, wait this long before starting another to the same follower.
RETRY_DELAY_S = 1.0

SNAPSHOT_HEADER = "X-Raftq-Snapshot"
OFFSET_HEADER = "X-Raftq-Offset"
TERM_HEADER = "X-Raftq-Term"
_SNAPSHOT_ID = re.compile(r"(\d{1,19})-(\d{1,19})-(\d{1,19})-([0-9a-f]{64})")


@dataclass(frozen=True)
class SnapshotOffer:
    """What the X-Raftq-Snapshot header names: which snapshot file is coming, and its digest."""

    index: int
    term: int
    size_bytes: int
    sha256_hex: str

    def header(self) -> str:
        return f"{self.index}-{self.term}-{self.size_bytes}-{self.sha256_hex}"

    @classmethod
    def parse(cls, value: str) -> "SnapshotOffer":
        """Raises ValueError for a malformed header."""
        match = _SNAPSHOT_ID.fullmatch(value)
        if match is None:
            raise ValueError(f"{SNAPSHOT_HEADER} must be <index>-<term>-<size>-<sha256 hex>, got {value[:100]!r}")
        index, term, size_bytes = (int(match.group(i)) for i in (1, 2, 3))
        return cls(index, term, size_bytes, match.group(4))


class SnapshotSender:
    """The leader's side: one transfer task per follower (see the module docstring).

    Args:
        node_id: this node's id (sent so the follower knows who the leader is).
        peers: follower id -> base URL.
        store: the snapshot directory; the newest snapshot in it is what gets sent.
        secret: the cluster secret, or None.
        current_term: returns the leader's term now (carried into the follower's SNAP message).
        report: called on the loop when a transfer ends: report(peer, delivered).
        ssl_context: for https:// peers (cluster/tls.py).
    """

    def __init__(self, node_id: str, peers: dict[str, str], store: SnapshotStore, *, secret: str | None,
                 current_term: Callable[[], int], report: Callable[[str, bool], None],
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._node_id = node_id
        self._ssl_context = ssl_context  # for https:// peers (cluster/tls.py); None: default checks
        self._peers = dict(peers)
        self._store = store
        self._secret = secret
        self._current_term = current_term
        self._report = report
        self._tasks: dict[str, asyncio.Task] = {}
        self._failed_at: dict[str, float] = {}
        self._digests: dict[str, str] = {}  # snapshot path -> file sha256 (files never change)
        self._session: aiohttp.ClientSession | None = None
        self.sent_total = 0
        self.failed_total = 0
        self.bytes_sent_total = 0

    def set_peers(self, peers: dict[str, str]) -> None:
        """The membership changed: these followers (id -> base URL) may be sent snapshots."""
        self._peers = dict(peers)

    def request(self, peer: str) -> None:
        """The core asked for a snapshot to go to peer; starts a transfer unless one is running."""
        if peer not in self._peers or peer in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._transfer(peer), name=f"snapshot-to-{peer}")
        self._tasks[peer] = task

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _transfer(self, peer: str) -> None:
        delivered = False
        try:
            wait_s = self._failed_at.get(peer, 0.0) + RETRY_DELAY_S - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            delivered = await self._send_newest(peer)
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, SnapshotCorruptionError, ValueError) as exc:
            log.warning("snapshot transfer to %s failed: %s", peer, exc)
        finally:
            self._tasks.pop(peer, None)
            if delivered:
                self.sent_total += 1
                self._failed_at.pop(peer, None)
            else:
                self.failed_total += 1
                self._failed_at[peer] = time.monotonic()
            self._report(peer, delivered)

    async def _send_newest(self, peer: str) -> bool:
        meta = self._store.newest()
        if meta is None:
            raise ValueError("the core asked for a snapshot but there is none on disk")
        # Open once: a newer snapshot may replace this one on disk meanwhile (retain() deletes
        # the old file), and the open handle keeps the bytes readable until the transfer ends.
        file = await asyncio.to_thread(open, meta.path, "rb")
        try:
            digest = self._digests.get(meta.path)
            if digest is None:
                digest = await asyncio.to_thread(file_digest, meta)
                self._digests = {meta.path: digest}
            offer = SnapshotOffer(meta.index, meta.term, meta.size_bytes, digest)
            started = time.monotonic()
            log.info("sending snapshot %d (term %d, %d bytes) to %s", meta.index, meta.term, meta.size_bytes, peer)
            offset, done = await self._post(peer, offer, 0, b"")
            while not done:
                chunk = await asyncio.to_thread(os.pread, file.fileno(), CHUNK_BYTES, offset)
                if not chunk:
                    raise ValueError(f"{meta.path} ended at byte {offset}, before its size {meta.size_bytes}")
                offset, done = await self._post(peer, offer, offset, chunk)
                self.bytes_sent_total += len(chunk)
            log.info("snapshot %d delivered to %s in %.2f s", meta.index, peer, time.monotonic() - started)
            return True
        finally:
            file.close()

    async def _post(self, peer: str, offer: SnapshotOffer, offset: int, chunk: bytes) -> tuple[int, bool]:
        """Sends one chunk; returns (bytes the follower holds, whether it has installed the file)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CHUNK_TIMEOUT_S),
                                                  connector=aiohttp.TCPConnector(ssl=self._ssl_context or True))
        headers = {
            "Content-Type": "application/octet-stream",
            FROM_HEADER: self._node_id,
            TERM_HEADER: str(self._current_term()),
            SNAPSHOT_HEADER: offer.header(),
            OFFSET_HEADER: str(offset),
        }
        if self._secret:
            headers[SECRET_HEADER] = self._secret
        url = self._peers[peer].rstrip("/") + "/raft/snapshot"
        async with self._session.post(url, data=chunk, headers=headers) as response:
            answer = await response.json(content_type=None)
            if response.status != 200:
                raise ValueError(f"{peer} refused the snapshot: {response.status} {answer}")
        received = answer.get("received")
        if not isinstance(received, int) or not 0 <= received <= offer.size_bytes:
            raise ValueError(f"{peer} answered an impossible offset {received!r}")
        return received, bool(answer.get("done"))


class SnapshotReceiver:
    """The follower's side: assembles incoming snapshot files (see the module docstring).

    Args:
        store: the snapshot directory.
        installed: called on the loop with (leader id, leader term, meta) once a complete,
            verified snapshot file is in place; it steps the SNAP message into the core.

    The caller has authenticated the peer (the node's auth middleware) before any of this runs.
    """

    def __init__(self, store: SnapshotStore, *, installed: Callable[[str, int, SnapshotMeta], None]) -> None:
        self._store = store
        self._installed = installed
        self._incoming: IncomingSnapshot | None = None
        self._incoming_offer: SnapshotOffer | None = None
        self._lock = asyncio.Lock()
        self.received_total = 0

    async def receive(self, leader: str, term: int, offer: SnapshotOffer, offset: int, chunk: bytes) -> dict:
        """Handles one request; returns the answer {"received": n, "done": bool}.

        Raises:
            SnapshotCorruptionError: the assembled file does not match its digest (the part is
                deleted; the leader starts over).
            ValueError: the chunk would run past the announced size.
        """
        async with self._lock:
            existing = self._store.find(offer.index, offer.term)
            if existing is not None and existing.size_bytes == offer.size_bytes:
                # Already complete here (the answer to the last chunk was lost): install again.
                await self._close_incoming()
                self._installed(leader, term, existing)
                return {"received": offer.size_bytes, "done": True}
            if self._incoming_offer != offer:
                await self._close_incoming()
                self._incoming = await asyncio.to_thread(
                    self._store.incoming, offer.index, offer.term, offer.size_bytes, offer.sha256_hex)
                self._incoming_offer = offer
            incoming = self._incoming
            assert incoming is not None
            if chunk and offset == incoming.received:
                try:
                    await asyncio.to_thread(incoming.write_at, offset, chunk)
                except OffsetMismatch:
                    pass  # answered with what we hold; the sender continues from there
            if not incoming.complete:
                return {"received": incoming.received, "done": False}
            self._incoming = self._incoming_offer = None
            meta = await asyncio.to_thread(incoming.finish)
            self.received_total += 1
            log.info("received snapshot %d (term %d, %d bytes) from %s", meta.index, meta.term, meta.size_bytes, leader)
            self._installed(leader, term, meta)
            return {"received": offer.size_bytes, "done": True}

    async def _close_incoming(self) -> None:
        if self._incoming is not None:
            await asyncio.to_thread(self._incoming.close)
        self._incoming = self._incoming_offer = None

    async def close(self) -> None:
        async with self._lock:
            await self._close_incoming()
