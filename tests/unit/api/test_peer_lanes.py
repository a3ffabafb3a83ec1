"""The sending side of the peer lanes (`transport/http.py`) against the receiving side
(`peer_stream.peer_stream_response`), over real aiohttp WebSockets on loopback: what a follower receives
when the leader sends entry-less appends (held up to `EMPTY_APPEND_HOLD_S`, replaced by a later
append), heartbeats, appends with entries, and appends to a follower a commit does not need first
(waiting up to `DATA_APPEND_HOLD_S`, then one frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator

from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from raftq.cluster.api.peer_stream import peer_stream_response
from raftq.cluster.raft.codec import decode_messages
from raftq.cluster.raft.messages import Entry, EntryKind, Message, MessageType
from raftq.cluster.transport.http import DATA_APPEND_HOLD_S, EMPTY_APPEND_HOLD_S, STREAM_PATH, HttpTransport


class Follower:
    """A peer stream endpoint that records every message it receives, with its arrival time."""

    def __init__(self) -> None:
        self.received: list[tuple[Message, float]] = []
        self.frames: list[list[Message]] = []

    def deliver(self, data: bytes) -> bool:
        now = time.monotonic()
        messages = decode_messages(data)
        self.frames.append(messages)
        self.received.extend((message, now) for message in messages)
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


@contextlib.asynccontextmanager
async def connected_leader(follower: Follower) -> AsyncIterator[HttpTransport]:
    """A leader's transport whose two lanes to the follower are open; closed with its server after."""
    app = web.Application()
    app.router.add_get(STREAM_PATH, follower.view)
    server = TestServer(app)
    await server.start_server()
    transport = HttpTransport("n1", {"n2": str(server.make_url("/"))}, secret=None)
    try:
        await transport.start()
        # Both lanes connect on first use: a heartbeat and an append with an entry open them.
        transport.send([Message(MessageType.HEARTBEAT, "n1", "n2", 3), append(0, index=0, entries=1)])
        await until(lambda: len(follower.received) == 2, "the two lanes to connect")
        follower.received.clear()
        follower.frames.clear()
        yield transport
    finally:
        await transport.close()
        await server.close()


async def test_an_entry_less_append_is_replaced_by_the_next_append_to_the_same_peer():
    follower = Follower()
    async with connected_leader(follower) as transport:
        transport.send([append(1, index=1)])  # tells the commit index only
        transport.send([append(1, index=1, entries=1)])  # carries it too, with an entry
        transport.send([Message(MessageType.HEARTBEAT, "n1", "n2", 3, commit=1)])
        await until(lambda: len(follower.received) == 2, "the append and the heartbeat")
        await asyncio.sleep(EMPTY_APPEND_HOLD_S * 5)
        assert [(m.type, len(m.entries)) for m, _ in follower.received] == [
            (MessageType.APP, 1), (MessageType.HEARTBEAT, 0)], follower.received


async def test_an_entry_less_append_nothing_replaces_goes_out_after_the_hold_newest_only():
    follower = Follower()
    async with connected_leader(follower) as transport:
        sent_at = time.monotonic()
        transport.send([append(1, index=2)])
        transport.send([append(2, index=2)])  # a newer commit index replaces the older message
        await until(lambda: follower.received, "the held append")
        await asyncio.sleep(EMPTY_APPEND_HOLD_S * 5)
        assert [(m.type, m.commit) for m, _ in follower.received] == [(MessageType.APP, 2)]
        assert follower.received[0][1] - sent_at >= EMPTY_APPEND_HOLD_S


async def test_heartbeats_and_answers_are_not_held():
    follower = Follower()
    async with connected_leader(follower) as transport:
        transport.send([append(1, index=2)])  # held
        transport.send([Message(MessageType.HEARTBEAT, "n1", "n2", 3, commit=1),
                        Message(MessageType.APP_RESP, "n1", "n2", 3, index=2)])
        await until(lambda: len(follower.received) == 3, "heartbeat, answer, then the held append")
        assert [m.type for m, _ in follower.received] == [
            MessageType.HEARTBEAT, MessageType.APP_RESP, MessageType.APP]


def shape(frames: list[list[Message]]) -> list[list[tuple[int, int]]]:
    """Each frame's messages as (index, entries)."""
    return [[(m.index, len(m.entries)) for m in frame] for frame in frames]


async def test_appends_to_a_follower_that_may_wait_go_together_after_the_hold():
    follower = Follower()
    async with connected_leader(follower) as transport:
        sent_at = time.monotonic()
        for index in (1, 2, 3):
            transport.send([append(index - 1, index=index, entries=1)], may_wait={"n2"})
        assert transport.queued_counts() == {"n2": 3}
        await until(lambda: len(follower.received) == 3, "the three appends")
        assert shape(follower.frames) == [[(1, 1), (2, 1), (3, 1)]]  # one frame, in order
        assert follower.received[0][1] - sent_at >= DATA_APPEND_HOLD_S
        assert transport.queued_counts() == {"n2": 0}


async def test_an_append_that_does_not_wait_never_overtakes_the_waiting_ones():
    follower = Follower()
    async with connected_leader(follower) as transport:
        transport.send([append(0, index=1, entries=1)], may_wait={"n2"})
        transport.send([append(1, index=2)], may_wait={"n2"})  # entry-less: behind the waiting append
        transport.send([append(1, index=2, entries=1)], may_wait=())  # n2 is needed first now
        await until(lambda: len(follower.received) == 2, "both appends")
        await asyncio.sleep(DATA_APPEND_HOLD_S * 3)
        # The entry-less append is replaced by the later one; the waiting append goes first.
        assert [(m.index, len(m.entries)) for m, _ in follower.received] == [(1, 1), (2, 1)]


async def test_an_entry_less_append_behind_waiting_ones_goes_after_them_newest_only():
    follower = Follower()
    async with connected_leader(follower) as transport:
        transport.send([append(0, index=1, entries=1)], may_wait={"n2"})
        transport.send([append(1, index=2)], may_wait={"n2"})
        transport.send([append(2, index=2)], may_wait={"n2"})  # replaces the one before
        await until(lambda: len(follower.received) == 2, "the append and the newest commit")
        await asyncio.sleep(DATA_APPEND_HOLD_S * 3)
        assert [(m.index, len(m.entries), m.commit) for m, _ in follower.received] == [(1, 1, 0), (2, 0, 2)]
