"""The receiving side of a peer lane (`peer_stream.peer_stream_response`) over real aiohttp
WebSockets on loopback: binary frames reach `deliver` from the connection's data callback (outside any task, so
the drive loop is woken one turn sooner), in order; a refused frame and everything after it reach
the view's task instead; pings are still answered and a close still ends the view.

The first test also guards against an aiohttp release changing what `_PeerStream` mirrors (its
frames would then reach the view, not `deliver`); on an aiohttp release it does not mirror, the
response is aiohttp's own and every frame reaches the view (the last test makes that case here).
"""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from raftq.cluster.api import peer_stream
from raftq.cluster.api.peer_stream import peer_stream_response

mirrored_aiohttp = pytest.mark.skipif(
    not peer_stream.MIRRORS_INSTALLED_AIOHTTP,
    reason=f"aiohttp {aiohttp.__version__} is not one of the releases peer_stream mirrors "
           f"{peer_stream.MIRRORED_AIOHTTP_RELEASES}: the view's task reads every frame")


class Receiver:
    """A peer-stream view whose `deliver` records each frame and refuses b"bad"."""

    def __init__(self) -> None:
        self.delivered: list[tuple[bytes, bool]] = []  # (frame, delivered inside a task)
        self.left_to_view: list[tuple[WSMsgType, object]] = []
        self.view_done = asyncio.Event()

    def deliver(self, data: bytes) -> bool:
        self.delivered.append((data, asyncio.current_task() is not None))
        return data != b"bad"

    async def view(self, request: web.Request) -> web.StreamResponse:
        ws = peer_stream_response(self.deliver, max_msg_size=4 << 20, heartbeat=None)
        await ws.prepare(request)
        async for message in ws:
            self.left_to_view.append((message.type, message.data))
        self.view_done.set()
        return ws


async def until(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def open_stream(receiver: Receiver):
    app = web.Application()
    app.router.add_get("/stream", receiver.view)
    server = TestServer(app)
    await server.start_server()
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(server.make_url("/stream"), autoping=False)
    return server, session, ws


@mirrored_aiohttp
async def test_frames_are_delivered_from_the_data_callback_in_order():
    receiver = Receiver()
    server, session, ws = await open_stream(receiver)
    try:
        big = os.urandom(1 << 20)  # many socket reads for one frame
        frames = [b"one", big, b"two", b"three"]
        for frame in frames:
            await ws.send_bytes(frame)
        await until(lambda: len(receiver.delivered) == len(frames), "four frames delivered")
        assert [data for data, _ in receiver.delivered] == frames
        assert [in_task for _, in_task in receiver.delivered] == [False] * len(frames)
        assert receiver.left_to_view == []
    finally:
        await ws.close()
        await session.close()
        await server.close()
    await until(receiver.view_done.is_set, "the view to end after the close")


@mirrored_aiohttp
async def test_a_refused_frame_and_all_after_it_go_to_the_view():
    receiver = Receiver()
    server, session, ws = await open_stream(receiver)
    try:
        for frame in (b"one", b"bad", b"two"):
            await ws.send_bytes(frame)
        await until(lambda: len(receiver.left_to_view) == 2, "two frames left to the view")
        assert [data for data, _ in receiver.delivered] == [b"one", b"bad"]
        assert receiver.left_to_view == [(WSMsgType.BINARY, b"bad"), (WSMsgType.BINARY, b"two")]
    finally:
        await ws.close()
        await session.close()
        await server.close()


@mirrored_aiohttp
async def test_pings_are_answered_and_text_frames_go_to_the_view():
    receiver = Receiver()
    server, session, ws = await open_stream(receiver)
    try:
        await ws.ping(b"are you there")
        answer = await ws.receive(timeout=10)
        assert (answer.type, answer.data) == (WSMsgType.PONG, b"are you there")
        await ws.send_str("text")
        await until(lambda: receiver.left_to_view, "the text frame left to the view")
        assert receiver.left_to_view == [(WSMsgType.TEXT, "text")]
        assert receiver.delivered == []
    finally:
        await ws.close()
        await session.close()
        await server.close()


async def test_on_an_aiohttp_it_does_not_mirror_every_frame_goes_to_the_view(monkeypatch):
    monkeypatch.setattr(peer_stream, "MIRRORS_INSTALLED_AIOHTTP", False)
    receiver = Receiver()
    server, session, ws = await open_stream(receiver)
    try:
        for frame in (b"one", b"two"):
            await ws.send_bytes(frame)
        await ws.ping(b"are you there")
        answer = await ws.receive(timeout=10)
        assert (answer.type, answer.data) == (WSMsgType.PONG, b"are you there")
        await until(lambda: len(receiver.left_to_view) == 2, "two frames read by the view")
        assert receiver.left_to_view == [(WSMsgType.BINARY, b"one"), (WSMsgType.BINARY, b"two")]
        assert receiver.delivered == []
    finally:
        await ws.close()
        await session.close()
        await server.close()
