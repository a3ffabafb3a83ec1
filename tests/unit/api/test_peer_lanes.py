"""The sending side of the peer lanes (`transport/http.py`) against the receiving side
(`peer_stream.peer_stream_response`), over real aiohttp WebSockets on loopback: what a follower receives
when the leader sends entry-less appends (held up to `EMPTY_APPEND_HOLD_S`, replaced by a later
append), heartbeats and appends with entries.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from raftq.cluster.api.peer_stream import peer_stream_response
from raftq.cluster.raft.codec import decode_messages
from raftq.cluster.raft.messages import Entry, EntryKind, Message, MessageType
from raftq.cluster.transport.http import EMPTY_APPEND_HOLD_S, STREAM_PATH, HttpTransport


class Follower:
    """A peer stream endpoint that records every message it receives, with its arrival time."""

    def __init__(self) -> None:
        self.received: list[tuple[Message, float]] = []

    def deliver(self, data: bytes) -> bool:
        now = time.monotonic()
        self.received.extend((message, now) for message in decode_messages(data))
        return True

    async def view(self, request: web.Request) -> web.StreamResponse:
        ws = peer_stream_response(self.deliver, max_msg_size=4 << 20, heartbeat=None)
        await ws.prepare(request)
        async for frame in ws:  # what the data callback left to the view (nothing on a mirrored aiohttp)
            if frame.type is WSMsgType.BINARY:
                self.deliver(frame.data)
        return ws


async def until(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


def append(commit: int, *, index: int, entries: int = 0, to_id: str = "n2") -> Message:
    return Message(MessageType.APP, "n1", to_id, 3, log_term=3, index=index, commit=commit,
                   entries=tuple(Entry(index + k + 1, 3, EntryKind.NORMAL, b"job") for k in range(entries)))


async def connected_leader(follower: Follower) -> tuple[HttpTransport, TestServer]:
    app = web.Application()
    app.router.add_get(STREAM_PATH, follower.view)
    server = TestServer(app)
    await server.start_server()
    transport = HttpTransport("n1", {"n2": str(server.make_url("/"))}, secret=None)
    await transport.start()
    # Both lanes connect on first use: a heartbeat and an append with an entry open them.
    transport.send([Message(MessageType.HEARTBEAT, "n1", "n2", 3), append(0, index=0, entries=1)])
    await until(lambda: len(follower.received) == 2, "the two lanes to connect")
    follower.received.clear()
    return transport, server


async def test_an_entry_less_append_is_replaced_by_the_next_append_to_the_same_peer():
    follower = Follower()
    transport, server = await connected_leader(follower)
    try:
        transport.send([append(1, index=1)])  # tells the commit index only
        transport.send([append(1, index=1, entries=1)])  # carries it too, with an entry
        transport.send([Message(MessageType.HEARTBEAT, "n1", "n2", 3, commit=1)])
        await until(lambda: len(follower.received) == 2, "the append and the heartbeat")
        await asyncio.sleep(EMPTY_APPEND_HOLD_S * 5)
        assert [(m.type, len(m.entries)) for m, _ in follower.received] == [
            (MessageType.APP, 1), (MessageType.HEARTBEAT, 0)], follower.received
    finally:
        await transport.close()
        await server.close()


async def test_an_entry_less_append_nothing_replaces_goes_out_after_the_hold_newest_only():
    follower = Follower()
    transport, server = await connected_leader(follower)
    try:
        sent_at = time.monotonic()
        transport.send([append(1, index=2)])
        transport.send([append(2, index=2)])  # a newer commit index replaces the older message
        await until(lambda: follower.received, "the held append")
        await asyncio.sleep(EMPTY_APPEND_HOLD_S * 5)
        assert [(m.type, m.commit) for m, _ in follower.received] == [(MessageType.APP, 2)]
        assert follower.received[0][1] - sent_at >= EMPTY_APPEND_HOLD_S
    finally:
        await transport.close()
        await server.close()


async def test_heartbeats_and_answers_are_not_held():
    follower = Follower()
    transport, server = await connected_leader(follower)
    try:
        transport.send([append(1, index=2)])  # held
        transport.send([Message(MessageType.HEARTBEAT, "n1", "n2", 3, commit=1),
                        Message(MessageType.APP_RESP, "n1", "n2", 3, index=2)])
        await until(lambda: len(follower.received) == 3, "heartbeat, answer, then the held append")
        assert [m.type for m, _ in follower.received] == [
            MessageType.HEARTBEAT, MessageType.APP_RESP, MessageType.APP]
    finally:
        await transport.close()
        await server.close()
