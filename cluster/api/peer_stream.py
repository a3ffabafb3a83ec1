"""The WebSocket response of a peer lane's receiving side (`raft_views.raft_stream`).

On the aiohttp releases it was checked against, `peer_stream_response` gives a response whose
binary frames go to a `deliver` callback from the connection's data callback, in the loop turn
their bytes are read, not through the view's task a turn later (`_PeerStream`); every commit
waits for one such frame on the leader (the follower's answer) and one on the follower (the
append). aiohttp has no hook for this, so `_PeerStream` mirrors its private
`WebSocketResponse._post_start`, and only on `MIRRORED_AIOHTTP_RELEASES`: any other release gets
aiohttp's own response, and the view's task delivers every frame (about 15 µs more a frame on
the test machine; `tests/unit/api/test_peer_stream.py` covers both).
"""

from __future__ import annotations

from typing import Callable

import aiohttp
from aiohttp import WSMsgType, web

#: The aiohttp releases (exact versions) whose `WebSocketResponse._post_start` `_PeerStream`
#: mirrors. Add a release only once test_peer_stream passes on it: a patch release may change
#: the private parts mirrored, and then every peer stream would fail to open.
MIRRORED_AIOHTTP_RELEASES = ("3.14.5",)

MIRRORS_INSTALLED_AIOHTTP = aiohttp.__version__ in MIRRORED_AIOHTTP_RELEASES


def peer_stream_response(deliver: Callable[[bytes], bool], **kwargs) -> web.WebSocketResponse:
    """A WebSocketResponse (`kwargs` are its own) that hands each binary frame to `deliver` while
    `deliver` takes them (True), where the installed aiohttp allows it; the rest, or every frame
    on another aiohttp, is read by the view as from any WebSocketResponse."""
    if MIRRORS_INSTALLED_AIOHTTP:
        return _PeerStream(deliver, **kwargs)
    return web.WebSocketResponse(**kwargs)


if MIRRORS_INSTALLED_AIOHTTP:
    from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
    from aiohttp.web_ws import DEFAULT_CHUNK_SIZE

    class _FrameQueue(WebSocketDataQueue):
        """aiohttp's queue of received WebSocket messages, which hands each binary one to
        `deliver` as the parser completes it; what `deliver` refuses, and everything after it, is
        queued for the view's task as aiohttp would queue it (so nothing after a bad frame is
        delivered)."""

        def __init__(self, protocol, limit: int, *, loop, deliver: Callable[[bytes], bool]) -> None:
            super().__init__(protocol, limit, loop=loop)
            self._deliver: Callable[[bytes], bool] | None = deliver

        def feed_data(self, data, size: int) -> None:
            deliver = self._deliver
            if deliver is not None and data.type is WSMsgType.BINARY:
                if deliver(data.data):
                    return
                self._deliver = None
            super().feed_data(data, size)

    class _PeerStream(web.WebSocketResponse):
        """A WebSocketResponse whose binary frames go to `deliver` from the parser
        (`_FrameQueue`). Only the queue differs from aiohttp's own `_post_start`, which this
        mirrors."""

        def __init__(self, deliver: Callable[[bytes], bool], **kwargs) -> None:
            super().__init__(**kwargs)
            self._deliver = deliver

        def _post_start(self, request, protocol, writer) -> None:
            self._ws_protocol = protocol
            self._writer = writer
            self._reset_heartbeat()
            self._reader = _FrameQueue(request._protocol, DEFAULT_CHUNK_SIZE, loop=self._loop,
                                       deliver=self._deliver)
            self._parser = WebSocketReader(self._reader, self._max_msg_size, compress=bool(self._compress),
                                           decode_text=self._decode_text)
            request.protocol.set_parser(self._parser,
                                        data_received_cb=None if self._heartbeat is None else self._on_data_received)
            request.protocol.keep_alive(False)
