"""Bounds on connections: how many may be open, and how long one may take to send a request head.

Theory of operation
-------------------
aiohttp has no header-read deadline: a connection that sends half a request line, or nothing,
holds a socket and a task until the keep-alive timeout (an hour by default), so a few hundred
idle connections from one host pin a node's resources (slowloris). It has no connection cap
either. `ConnectionGuard` adds both around aiohttp's own protocol objects, without touching them:

- `protocol_factory(server)` wraps each `RequestHandler` aiohttp makes. A connection beyond
  `connections_max` is aborted at once (`raftq_connections_refused_total{reason="limit"}`).
- A connection that is not inside a request must deliver a complete request head within
  `header_timeout_s` of its first byte (or of connecting), else it is aborted
  (`reason="header_timeout"`). "Inside a request" is known from `middleware`, which aiohttp runs
  once the head is parsed; it disarms the timer until the handler returns. The body of a request
  is then bounded by the handlers' own limits (size, and the client's upload timeout).
- With TLS the handshake comes first, bounded by the server's `ssl_handshake_timeout`, which
  `main.serve` sets to the same header timeout.

Idle keep-alive connections (no bytes after an answer) are left to aiohttp's keep-alive timeout.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from aiohttp import web


@dataclass
class _Connection:
    transport: asyncio.BaseTransport | None = None
    in_request: bool = False
    timer: asyncio.TimerHandle | None = None
    refused: bool = False


@dataclass
class ConnectionGuard:
    """See the module docstring. `on_refused(reason)` is called for each aborted connection."""

    connections_max: int
    header_timeout_s: float
    on_refused: Callable[[str], None] = lambda reason: None
    open_count: int = 0
    _by_transport: dict[asyncio.BaseTransport, _Connection] = field(default_factory=dict)

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """What `loop.create_server` calls per connection instead of `server` itself."""
        return lambda: _GuardedProtocol(self, server())

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        connection = self._by_transport.get(request.transport) if request.transport is not None else None
        if connection is None:  # a connection this guard did not make (tests serving the app directly)
            return await handler(request)
        connection.in_request = True
        self._disarm(connection)
        try:
            return await handler(request)
        finally:
            connection.in_request = False

    def opened(self, connection: _Connection, transport: asyncio.BaseTransport) -> bool:
        """Counts a new connection in; False (and aborts it) past the limit."""
        if self.open_count >= self.connections_max:
            connection.refused = True
            self.on_refused("limit")
            transport.abort()
            return False
        self.open_count += 1
        connection.transport = transport
        self._by_transport[transport] = connection
        self._arm(connection)
        return True

    def received(self, connection: _Connection) -> None:
        if not connection.in_request and connection.timer is None:
            self._arm(connection)

    def closed(self, connection: _Connection) -> None:
        self.open_count -= 1
        self._disarm(connection)
        self._by_transport.pop(connection.transport, None)

    def _arm(self, connection: _Connection) -> None:
        self._disarm(connection)
        connection.timer = asyncio.get_running_loop().call_later(self.header_timeout_s, self._expire, connection)

    @staticmethod
    def _disarm(connection: _Connection) -> None:
        if connection.timer is not None:
            connection.timer.cancel()
            connection.timer = None

    def _expire(self, connection: _Connection) -> None:
        connection.timer = None
        if connection.in_request or connection.transport is None or connection.transport.is_closing():
            return
        self.on_refused("header_timeout")
        connection.transport.abort()


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's RequestHandler behind the guard: every transport callback passes through."""

    def __init__(self, guard: ConnectionGuard, handler: asyncio.Protocol) -> None:
        self._guard = guard
        self._handler = handler
        self._connection = _Connection()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._guard.opened(self._connection, transport):
            self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._connection.refused:
            self._guard.received(self._connection)
            self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._connection.refused else self._handler.eof_received()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._connection.refused:
            self._guard.closed(self._connection)
            self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()
