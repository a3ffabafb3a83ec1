"""Raft messages between peers: long-lived WebSocket streams, two per peer, one way each.

Theory of operation
-------------------
Each node opens, to each peer, two WebSocket connections on `GET /raft/stream` (an HTTP upgrade,
so the cluster secret, the TLS client certificate and the connection limits are checked by the
same middleware as any `/raft` request, before the connection is upgraded):

- the *control lane* carries heartbeats, votes, answers and empty appends: small messages that
  must not wait;
- the *data lane* carries appends with entries, which may be a MiB each.

A heartbeat therefore never queues behind a large append in a socket buffer (the two lanes are
two TCP connections). Each lane has one task that writes every queued message as binary frames
without waiting for any answer: the answers come back as Raft messages on the peer's own lanes
to us. When a lane is connected, idle and its socket not backed up, `send()` writes the frame
itself, with no task switch: this is on every commit's path, twice (the leader's append, the
follower's answer). A frame that finds the socket backed up is still written whole (aiohttp
writes before it waits for the buffer to drain), and the lane's task takes over from then on, so
what waits in a lane's socket buffer stays bounded by aiohttp's writer limit plus one frame. So the number of appends in flight to a follower is bounded by the Raft core's flow
control (`max_inflight_appends`, `max_inflight_bytes`, etcd's MaxInflightMsgs/Bytes), not by
round trips: under a 400 ms round trip the leader keeps sending while earlier appends travel.

Why WebSocket, not a chunked POST or a raw framed socket: aiohttp already speaks it (no new
dependency), the upgrade is an ordinary HTTP request (one auth path, one port, TLS as for the
rest), frames carry their own length and the server refuses one past `max_msg_size` before
buffering it, and ping/pong tells a dead connection (a black-holed link) from an idle one.

Loss. Nothing is retried: a frame lost with its connection is like a dropped request, which Raft
repairs with its next heartbeat or append (messages carry their term and log position, and the
core tolerates loss, duplication and reordering, including between the two lanes). A lane that
cannot connect drops what is queued for it; a full lane queue drops its oldest message.

Entry-less appends wait. An append without entries tells a caught-up follower the new commit
index (the leader sends one to every follower at each commit) or probes it. It is held up to
`EMPTY_APPEND_HOLD_S` and dropped when a later append to the same peer is sent meanwhile: that one
carries a commit index at least as new (and its own consistency check), so the follower learns
the same; otherwise it goes out when the hold ends. A one-job submit after another thus costs one
append and one answer per follower, not two of each: per commit, two fewer socket writes and two
fewer answers to read on the leader, one wake-up, decode and answer less on each follower. Only
the followers' apply waits (at most the hold; nothing is acknowledged on a follower's apply); a
dropped append is a lost message, which Raft tolerates.

Quorum first. A commit needs the leader's own write and quorum - 1 followers' answers. The Raft
core names the other followers (`RaftNode.appends_may_wait`): appends with entries to them wait up
to `DATA_APPEND_HOLD_S` and then go together, in as few frames as fit (`FRAME_ENTRY_BYTES_MAX`).
With three nodes one follower takes each append at once and the other about ten at a time, so a
one-job submit costs the leader one frame to write and one answer to read less, and that follower
wakes once for many entries (the "thrifty" choice of Paxos implementations such as EPaxos). An
append that does not wait sends a peer's waiting ones first, and an entry-less one joins them at
the end (the newest only): nothing overtakes. The core picks the quorum-first followers once a
tick, by match index: a follower that stops answering, or answers slowly, falls behind the
waiting one at its next batch and the two trade places. So a follower lost costs each commit at
most one hold, for at most one tick. What it trades: an acknowledged entry is on exactly a
majority's disks for up to one hold longer before the third node has it; losing two nodes in
that window loses it, as losing a majority does in any Raft cluster.

Membership. The peers change with the membership (`set_peers`): lanes start for each new member
and stop for each removed one; a lane reads its peer's URL at each connection (a member's URL may
change). The upgrade request names the sender (`FROM_HEADER`) and its own URL
(`FROM_URL_HEADER`), so a node that has just been added, and does not know the membership yet,
can answer the leader that is replicating to it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from typing import Collection, Sequence

import aiohttp

from raftq.cluster.raft.codec import encode_messages
from raftq.cluster.raft.messages import Message, MessageType
from raftq.cluster.raft.node import RaftConfig

log = logging.getLogger("raftq.transport")

#: Path of the peer stream (a WebSocket upgrade).
STREAM_PATH = "/raft/stream"
#: Header carrying the cluster secret.
SECRET_HEADER = "X-Raftq-Cluster-Secret"
#: Headers naming the sending node and the URL it is reached at.
FROM_HEADER = "X-Raftq-From"
FROM_URL_HEADER = "X-Raftq-From-Url"
#: Messages queued for one lane of one peer; a peer that is down or slow loses the oldest
#: traffic rather than growing memory (Raft resends what matters).
LANE_QUEUE_COUNT_MAX = 4096
#: Messages in one control-lane frame (the codec's batch bound is higher).
FRAME_MESSAGES_MAX = 256
#: A connection attempt (TCP, TLS, upgrade) that takes longer is abandoned.
CONNECT_TIMEOUT_S = 5.0
#: A frame that cannot be written within this (the peer stopped reading) ends the connection.
SEND_TIMEOUT_S = 5.0
#: Ping interval on both ends; no pong within half of it closes the connection. Above twice the
#: chaos suite's worst peer latency (350 ms each way), far below an election timeout's worth of
#: silence that check-quorum would notice anyway.
PING_INTERVAL_S = 2.0
#: How long an append without entries waits for a later append to the same peer, which replaces
#: it (module docstring). Above the gap between one producer's one-job submits (about 1 ms here),
#: far below anything a follower's apply is waited for.
EMPTY_APPEND_HOLD_S = 0.002
#: How long an append with entries to a follower that a commit does not need first (the Raft
#: core's `appends_may_wait`) waits for the next ones, which then go with it in one frame (module
#: docstring, "Quorum first"). About ten one-job submits' worth here; also the most a commit waits
#: extra when the follower it needed stops answering, until the waiting one overtakes it.
DATA_APPEND_HOLD_S = 0.010
#: Entry bytes in one frame of appends: as many as one append carries at most (the core's
#: `max_append_bytes`), so that a frame of several fits wherever one full append does.
FRAME_ENTRY_BYTES_MAX = RaftConfig.max_append_bytes
#: Wait before reconnecting after a failure, doubled per failure up to the max.
RECONNECT_DELAY_S = 0.05
RECONNECT_DELAY_S_MAX = 1.0


def is_data(message: Message) -> bool:
    """Whether a message travels on the data lane (an append carrying entries)."""
    return message.type is MessageType.APP and bool(message.entries)


class HttpTransport:
    """Sends Raft messages to peers over WebSocket lanes; see the module docstring."""

    def __init__(self, node_id: str, peers: dict[str, str], *, secret: str | None,
                 ssl_context: ssl.SSLContext | None = None, own_url: str = "") -> None:
        self._node_id = node_id
        self._ssl_context = ssl_context  # for https:// peers (cluster/tls.py); None: default checks
        self._peers = dict(peers)
        self._headers = {FROM_HEADER: node_id}
        if own_url:
            self._headers[FROM_URL_HEADER] = own_url
        if secret:
            self._headers[SECRET_HEADER] = secret
        self._lanes: dict[tuple[str, bool], _Lane] = {}
        self._session: aiohttp.ClientSession | None = None
        self.dropped_count = 0
        self._held: dict[str, Message] = {}  # peer -> its entry-less append, waiting (EMPTY_APPEND_HOLD_S)
        self._held_timer: asyncio.TimerHandle | None = None
        self._waiting: dict[str, list[Message]] = {}  # peer -> appends that wait (DATA_APPEND_HOLD_S)
        self._waiting_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(ssl=self._ssl_context or True)
        self._session = aiohttp.ClientSession(connector=connector)
        self._start_lanes()

    def set_peers(self, peers: dict[str, str]) -> None:
        """The peers are now these (id -> base URL): lanes start and stop to match."""
        self._peers = dict(peers)
        if self._session is None:
            return  # start() starts them
        for key in [key for key in self._lanes if key[0] not in self._peers]:
            self._lanes.pop(key).task.cancel()
        for peer_id in [peer_id for peer_id in self._held if peer_id not in self._peers]:
            del self._held[peer_id]
        for peer_id in [peer_id for peer_id in self._waiting if peer_id not in self._peers]:
            del self._waiting[peer_id]
        self._start_lanes()

    def _start_lanes(self) -> None:
        for peer_id in sorted(self._peers):
            for data in (False, True):
                if (peer_id, data) not in self._lanes:
                    self._lanes[peer_id, data] = _Lane(self, peer_id, "data" if data else "control")

    def peer_url(self, peer_id: str) -> str:
        return self._peers[peer_id].rstrip("/") + STREAM_PATH

    async def close(self) -> None:
        for timer in (self._held_timer, self._waiting_timer):
            if timer is not None:
                timer.cancel()
        self._held_timer = self._waiting_timer = None
        self._held.clear()
        self._waiting.clear()
        lanes = list(self._lanes.values())
        self._lanes.clear()
        for lane in lanes:
            lane.task.cancel()
        await asyncio.gather(*(lane.task for lane in lanes), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def queued_counts(self) -> dict[str, int]:
        """Messages waiting to be sent, per peer (what `raftq_peer_send_queue_messages` exports)."""
        counts: dict[str, int] = {}
        for (peer_id, _), lane in self._lanes.items():
            counts[peer_id] = counts.get(peer_id, 0) + lane.queued_count
        for peer_id, waiting in self._waiting.items():
            counts[peer_id] = counts.get(peer_id, 0) + len(waiting)
        return counts

    def send(self, messages: Sequence[Message], may_wait: Collection[str] = ()) -> None:
        """Sends messages, or holds some back a little (module docstring): entry-less appends,
        and appends with entries to the peers in `may_wait`."""
        by_lane: dict[_Lane, list[Message]] = {}
        held, waiting = self._held, self._waiting
        for message in messages:
            to_id = message.to_id
            if message.type is MessageType.APP:
                queue = waiting.get(to_id)
                if not message.entries:  # a newer one replaces an older one, a later append both
                    if queue is None:
                        held[to_id] = message
                    elif queue[-1].entries:
                        queue.append(message)  # behind the appends it follows, which it needs
                    else:
                        queue[-1] = message
                    continue
                held.pop(to_id, None)
                if queue is not None and not queue[-1].entries:
                    queue.pop()
                if to_id in may_wait:
                    if queue is None:
                        waiting[to_id] = [message]
                    else:
                        queue.append(message)
                    continue
                if queue is not None:  # an append never overtakes the ones before it
                    self._put_waiting(to_id, by_lane)
            lane = self._lanes.get((to_id, is_data(message)))
            if lane is not None:
                by_lane.setdefault(lane, []).append(message)
        for lane, batch in by_lane.items():
            lane.put(batch)
        loop = None
        if not held:
            if self._held_timer is not None:
                self._held_timer.cancel()
                self._held_timer = None
        elif self._held_timer is None:
            loop = asyncio.get_running_loop()
            self._held_timer = loop.call_later(EMPTY_APPEND_HOLD_S, self._send_held)
        if waiting and self._waiting_timer is None:
            loop = loop or asyncio.get_running_loop()
            self._waiting_timer = loop.call_later(DATA_APPEND_HOLD_S, self._send_waiting)

    def _put_waiting(self, peer_id: str, by_lane: dict[_Lane, list[Message]]) -> None:
        queue = self._waiting.pop(peer_id)
        lane = self._lanes.get((peer_id, True))
        if lane is not None:
            by_lane.setdefault(lane, []).extend(queue)

    def _send_waiting(self) -> None:
        """The hold is over: every waiting append goes, each peer's in as few frames as fit."""
        self._waiting_timer = None
        by_lane: dict[_Lane, list[Message]] = {}
        for peer_id in list(self._waiting):
            self._put_waiting(peer_id, by_lane)
        for lane, batch in by_lane.items():
            lane.put(batch)

    def _send_held(self) -> None:
        """The hold is over: the entry-less appends no later append replaced go out now."""
        self._held_timer = None
        held, self._held = self._held, {}
        for peer_id, message in held.items():
            lane = self._lanes.get((peer_id, is_data(message)))
            if lane is not None:
                lane.put([message])


class _Lane:
    """One WebSocket connection to one peer and the queue that feeds it."""

    def __init__(self, transport: HttpTransport, peer_id: str, name: str) -> None:
        self._transport = transport
        self._peer_id = peer_id
        self._name = name
        self._queue: collections.deque[Message] = collections.deque()
        self._queued = asyncio.Event()
        self._ws: aiohttp.ClientWebSocketResponse | None = None  # while the pump runs on it
        self._pump_writing = False  # the pump is inside a send (it may be waiting for the socket)
        self._backed_up = False  # a direct write found the socket backed up: leave it to the pump
        self.task = asyncio.create_task(self._run(), name=f"raft-{name}-{peer_id}")

    @property
    def queued_count(self) -> int:
        return len(self._queue)

    def put(self, messages: list[Message]) -> None:
        """Sends messages now when the lane is connected and its pump not busy (no task switch),
        else leaves them queued for the pump."""
        for message in messages:
            if len(self._queue) >= LANE_QUEUE_COUNT_MAX:
                # Drop the oldest: newer messages carry newer terms and commit indexes.
                self._queue.popleft()
                self._transport.dropped_count += 1
            self._queue.append(message)
        ws = self._ws
        if ws is not None and not self._pump_writing and not self._backed_up:
            # From the head of the queue: frames leave in the order they were put.
            while self._queue and self._write_now(ws, self._next_frame()):
                pass
            if not self._queue:
                return
        self._queued.set()

    def _write_now(self, ws: aiohttp.ClientWebSocketResponse, frame: list[Message]) -> bool:
        """Writes frame from the caller's step by running send_bytes by hand; False when the socket
        is backed up (the frame is written; the pump then waits for the drain before the next).

        aiohttp's send_bytes writes the frame to the transport synchronously and only then, when
        its writer is over its limit and the transport paused, awaits the drain: that await is the
        only place it can suspend, so a suspension means "written, now wait", and closing the
        coroutine there drops only the wait.
        """
        send = ws.send_bytes(encode_messages(frame))
        try:
            send.send(None)
        except StopIteration:
            return True
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            # The connection is ending: the frame is lost with it (as a frame the pump was sending);
            # the pump sees the end through its reader and reconnects.
            log.debug("peer %s %s lane: send failed: %s", self._peer_id, self._name, exc)
            return True
        except Exception:  # this runs in the node's drive loop, which must not stop for a peer's link
            log.warning("peer %s %s lane: send failed", self._peer_id, self._name, exc_info=True)
            return True
        send.close()
        self._backed_up = True
        return False

    def _drop_queued(self) -> None:
        self._transport.dropped_count += len(self._queue)
        self._queue.clear()

    async def _run(self) -> None:
        delay_s = RECONNECT_DELAY_S
        while True:
            await self._queued.wait()  # connect on first use: an idle peer costs no connection
            try:
                ws = await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT_S)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                log.debug("peer %s %s lane: cannot connect: %s", self._peer_id, self._name, exc)
                self._drop_queued()  # stale by the time a connection exists; Raft resends
                self._queued.clear()
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RECONNECT_DELAY_S_MAX)
                continue
            delay_s = RECONNECT_DELAY_S
            try:
                await self._pump(ws)
            finally:
                await ws.close()
            await asyncio.sleep(RECONNECT_DELAY_S)  # a peer that closes at once is not hammered

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        transport = self._transport
        assert transport._session is not None
        return await transport._session.ws_connect(
            transport.peer_url(self._peer_id), headers=transport._headers, heartbeat=PING_INTERVAL_S,
            autoclose=True, autoping=True, max_msg_size=1 << 16)

    async def _pump(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Writes queued messages until the connection fails; reads only pongs and the close."""
        reader = asyncio.create_task(_drain_incoming(ws))
        # The pump waits on one event only (a put, or the connection's end), so a message queued
        # while it waits is written after a single task switch (when put() could not write it).
        reader.add_done_callback(lambda _: self._queued.set())
        self._ws = ws  # put() may write directly from now on
        try:
            while not reader.done():
                if not self._queue:
                    self._queued.clear()
                    await self._queued.wait()
                    continue
                frame = self._next_frame()
                self._pump_writing = True
                try:
                    # A context timeout, not wait_for: no task per frame, so the bytes reach the
                    # socket in this step (send_bytes only awaits when the buffer is over its limit).
                    async with asyncio.timeout(SEND_TIMEOUT_S):
                        await ws.send_bytes(encode_messages(frame))
                except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, RuntimeError) as exc:
                    log.debug("peer %s %s lane: send failed: %s", self._peer_id, self._name, exc)
                    return
                finally:
                    self._pump_writing = False
                self._backed_up = False  # this send waited for the drain, if the socket needed one
        finally:
            self._ws = None
            self._backed_up = False
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    def _next_frame(self) -> list[Message]:
        """The oldest queued message, plus more: up to FRAME_MESSAGES_MAX, and on the data lane
        up to FRAME_ENTRY_BYTES_MAX of entries (which keeps a frame within the receiver's size
        limit, as one full append)."""
        queue = self._queue
        frame = [queue.popleft()]
        if self._name == "control":
            while queue and len(frame) < FRAME_MESSAGES_MAX:
                frame.append(queue.popleft())
            return frame
        size = _entry_bytes(frame[0])
        while queue and len(frame) < FRAME_MESSAGES_MAX:
            size += _entry_bytes(queue[0])
            if size > FRAME_ENTRY_BYTES_MAX:
                break
            frame.append(queue.popleft())
        return frame


def _entry_bytes(message: Message) -> int:
    return sum(len(entry.data) for entry in message.entries)


async def _drain_incoming(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Runs the client's side of ping/pong and notices the close; peers send nothing else here."""
    async for _ in ws:
        pass
