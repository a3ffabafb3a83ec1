"""What carries a request to a node: a tiny Request/Response pair and the transports.

A transport does one HTTP exchange and nothing else: no retries, no redirects, no decoding. It
turns a failure to get an answer into `errors.ConnectError` / `errors.Timeout` (or another
`errors.TransportError`), which the client's retry logic (`client._base`) understands. That split
is httpx's: `transport=` can be swapped for `MockTransport(handler)` in tests, and one
MockTransport serves both the sync `Client` and the `AsyncClient`.

`HTTPTransport` (a lean HTTP/1.1 client of its own, `_http11.py`) keeps idle keep-alive connections per node. A
sync `Client` is shared by a worker's threads (fetcher, reporter, heartbeat), so each request
takes an idle connection or opens one, and gives it back after reading the answer; a node
normally has one, and more only while requests to it overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator, Mapping
from urllib.parse import urlsplit

import msgpack

from raftq.client import errors
from raftq.client._http11 import AsyncConnection, Connection, MalformedAnswer
from raftq.protocol import CONTENT_TYPE_MSGPACK as MSGPACK

#: Connections an async transport has open at once, over all nodes (aiohttp's default too); more
#: requests at once wait for one.
CONNECTIONS_MAX = 100
#: Idle connections kept per node. A worker overlaps at most a long-poll fetch, a report and a
#: heartbeat, so four covers it; beyond that, connections close after use instead of piling up.
IDLE_CONNECTIONS_PER_NODE_MAX = 4


@dataclass(frozen=True)
class Request:
    """One HTTP request as the client sends it.

    Attributes:
        method: "GET", "POST" or "PUT".
        url: absolute URL, e.g. "http://127.0.0.1:7001/v1/lease".
        headers: header names as sent (e.g. "Content-Type", "Authorization").
        content: the encoded body (msgpack), b"" when none.
        timeout_s: how long the transport may wait for this answer.
    """

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    content: bytes = b""
    timeout_s: float = 10.0

    def decoded(self) -> Any:
        """The body decoded from msgpack (None when empty); handy in MockTransport handlers."""
        return msgpack.unpackb(self.content, raw=False, strict_map_key=False) if self.content else None

    @property
    def path(self) -> str:
        """Path and query of the URL ("/v1/jobs/x?limit=1")."""
        parts = urlsplit(self.url)
        return parts.path + (f"?{parts.query}" if parts.query else "")


@dataclass(frozen=True)
class Response:
    """One HTTP answer. Header names are stored lower-case.

    Attributes:
        status: the HTTP status code.
        headers: header names lower-cased.
        content: the raw body.
    """

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    content: bytes = b""

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", {k.lower(): v for k, v in self.headers.items()})

    @classmethod
    def msgpack(cls, value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> "Response":
        """An answer whose body is `value` in msgpack, as a raftq node sends it."""
        return cls(status, {"Content-Type": MSGPACK, **(headers or {})}, msgpack.packb(value, use_bin_type=True))

    @classmethod
    def error(cls, status: int, code: str, message: str = "", headers: Mapping[str, str] | None = None) -> "Response":
        """An error answer with the raftq error body `{"error": {"code", "message"}}`."""
        return cls.msgpack({"error": {"code": code, "message": message or code}}, status, headers)


class BaseTransport:
    """What a sync `Client` sends through."""

    def handle_request(self, request: Request) -> Response:
        """Does one exchange.

        Raises:
            errors.TransportError: no answer (ConnectError, Timeout, ...).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Releases connections; called by `Client.close()`."""


class AsyncBaseTransport:
    """What an `AsyncClient` sends through."""

    async def handle_async_request(self, request: Request) -> Response:
        """Does one exchange.

        Raises:
            errors.TransportError: no answer (ConnectError, Timeout, ...).
        """
        raise NotImplementedError

    async def aclose(self) -> None:
        """Releases connections; called by `AsyncClient.aclose()`."""


Handler = Callable[[Request], "Response | Awaitable[Response]"]


class MockTransport(BaseTransport, AsyncBaseTransport):
    """Answers every request by calling `handler(request) -> Response`; serves both twins.

    The handler may raise `errors.ConnectError` / `errors.Timeout` to play a dead node (a raised
    `TimeoutError` or `OSError` is turned into those). With an `AsyncClient` the handler may also
    be an `async def`.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def handle_request(self, request: Request) -> Response:
        with _mapped_os_errors(request):
            response = self.handler(request)
        if inspect.isawaitable(response):
            if inspect.iscoroutine(response):
                response.close()  # never awaited: close it so Python does not warn about it
            raise TypeError("an async MockTransport handler needs an AsyncClient")
        return response

    async def handle_async_request(self, request: Request) -> Response:
        with _mapped_os_errors(request):
            response = self.handler(request)
            if inspect.isawaitable(response):
                response = await response
        return response


@contextlib.contextmanager
def _mapped_os_errors(request: Request) -> Iterator[None]:
    """Turns socket-level exceptions raised by a handler into the client's TransportError classes."""
    try:
        yield
    except errors.RaftqError:
        raise
    except BaseException as exc:
        mapped = transport_error(exc, request)
        if mapped is None:
            raise
        raise mapped from exc


def transport_error(exc: BaseException, request: Request) -> errors.TransportError | None:
    """The TransportError for a socket or HTTP-parsing exception, or None when it is not one."""
    node = base_url(request.url)
    if isinstance(exc, TimeoutError):  # socket.timeout and asyncio.TimeoutError are TimeoutError (3.11)
        return errors.Timeout(f"no answer within {request.timeout_s:.3g} s", node=node)
    if isinstance(exc, ConnectionRefusedError):
        return errors.ConnectError("connection refused", node=node)
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return errors.ConnectError("connection reset", node=node)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return errors.ConnectError(f"TLS: the node's certificate is not trusted: {exc.verify_message or exc}",
                                   node=node)
    if isinstance(exc, ssl.SSLError):
        return errors.ConnectError(f"TLS: {exc.reason or exc}", node=node)
    if isinstance(exc, socket.gaierror):
        return errors.ConnectError(f"cannot resolve host: {exc}", node=node)
    if isinstance(exc, OSError):
        return errors.ConnectError(exc.strerror or str(exc) or type(exc).__name__, node=node)
    if isinstance(exc, MalformedAnswer):
        return errors.TransportError(f"malformed HTTP answer: {exc}", node=node)
    return None


def tls_context(ca_file: str | None = None, *, verify: bool = True) -> ssl.SSLContext:
    """The client side of TLS: verify the node's certificate and host name, TLS 1.2 or newer.

    Args:
        ca_file: PEM file of the CA that signed the nodes' certificates (a private CA); None uses
            RAFTQ_CA from the environment when set, else the system's CAs.
        verify: False turns certificate and host name checks off (encryption without knowing
            who answers; for a test bench only).
    """
    context = ssl.create_default_context(cafile=ca_file or os.environ.get("RAFTQ_CA") or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def base_url(url: str) -> str:
    """"http://host:port" of an absolute URL."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# ---------------------------------------------------------------------------- HTTP/1.1 (_http11.py)


class _Endpoints:
    """Where the connections of a transport go: a node's address, Host header and TLS context."""

    _ssl_context: ssl.SSLContext | None

    def _endpoint(self, node: str) -> tuple[str, int, str, ssl.SSLContext | None]:
        """(host, port, Host header without any user:password@, TLS context or None) of a node's
        base URL; the context is `tls_context()` unless one was given, made on the first https node."""
        parts = urlsplit(node)
        https = parts.scheme == "https"
        if https and self._ssl_context is None:
            self._ssl_context = tls_context()
        host = parts.hostname or "127.0.0.1"
        host_header = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
        return host, parts.port or (443 if https else 80), host_header, self._ssl_context if https else None


class HTTPTransport(BaseTransport, _Endpoints):
    """HTTP/1.1 keep-alive connections per node (`_http11.Connection`), thread-safe."""

    def __init__(self, *, idle_per_node_max: int = IDLE_CONNECTIONS_PER_NODE_MAX,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """ssl_context: for https:// nodes (default `tls_context()`, made on the first https node)."""
        self._ssl_context = ssl_context
        self._idle: dict[str, list[Connection]] = {}
        self._idle_per_node_max = idle_per_node_max
        self._lock = threading.Lock()
        self._closed = False

    def handle_request(self, request: Request) -> Response:
        node = base_url(request.url)
        connection = self._checkout(node)
        if connection is not None:
            try:
                return self._exchange(node, connection, request)
            except errors.ConnectError:
                # The node may have closed this idle keep-alive connection while it sat in the pool
                # (aiohttp does after its keepalive_timeout); the request never reached it. Once
                # more on a fresh connection, as urllib3 does; every raftq call is safe to repeat.
                pass
        return self._exchange(node, self._open(node), request)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def _exchange(self, node: str, connection: Connection, request: Request) -> Response:
        try:
            answer = connection.exchange(request.method, request.path or "/", request.headers, request.content,
                                         request.timeout_s)
        except BaseException as exc:
            connection.close()
            mapped = transport_error(exc, request)
            if mapped is None:
                raise
            raise mapped from exc
        if answer.will_close:
            connection.close()
        else:
            self._checkin(node, connection)
        return Response(answer.status, answer.headers, answer.body)

    def _open(self, node: str) -> Connection:
        return Connection(*self._endpoint(node))

    def _checkout(self, node: str) -> Connection | None:
        with self._lock:
            if self._closed:
                raise errors.ClientClosed("the transport is closed")
            idle = self._idle.get(node)
            return idle.pop() if idle else None

    def _checkin(self, node: str, connection: Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(node, [])
            if not self._closed and len(idle) < self._idle_per_node_max:
                idle.append(connection)
                return
        connection.close()


class AsyncHTTPTransport(AsyncBaseTransport, _Endpoints):
    """The asyncio twin of `HTTPTransport`: keep-alive connections per node
    (`_http11.AsyncConnection`), at most `connections_max` open at once."""

    def __init__(self, *, connections_max: int = CONNECTIONS_MAX, idle_per_node_max: int = IDLE_CONNECTIONS_PER_NODE_MAX,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """ssl_context: for https:// nodes (default `tls_context()`, made on the first https node)."""
        self._ssl_context = ssl_context
        self._slots = asyncio.Semaphore(connections_max)
        self._idle: dict[str, list[AsyncConnection]] = {}
        self._idle_per_node_max = idle_per_node_max
        self._closed = False

    async def handle_async_request(self, request: Request) -> Response:
        node = base_url(request.url)
        try:
            # The wait for a connection and a retry on a fresh one count against the request's time.
            async with asyncio.timeout(request.timeout_s), self._slots:
                if self._closed:
                    raise errors.ClientClosed("the transport is closed")
                idle = self._idle.get(node)
                if idle:
                    try:
                        return await self._exchange(node, idle.pop(), request)
                    except errors.ConnectError:
                        pass  # a stale keep-alive connection, as in HTTPTransport.handle_request
                return await self._exchange(node, self._open(node), request)
        except TimeoutError as exc:  # out of time waiting for a connection
            raise transport_error(exc, request) from exc

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    async def _exchange(self, node: str, connection: AsyncConnection, request: Request) -> Response:
        try:
            answer = await connection.exchange(request.method, request.path or "/", request.headers, request.content)
        except BaseException as exc:  # cancelled and timed out too: the answer may be half read
            connection.close()
            mapped = transport_error(exc, request)
            if mapped is None:
                raise
            raise mapped from exc
        idle = self._idle.setdefault(node, [])
        if answer.will_close or self._closed or len(idle) >= self._idle_per_node_max:
            connection.close()
        else:
            idle.append(connection)
        return Response(answer.status, answer.headers, answer.body)

    def _open(self, node: str) -> AsyncConnection:
        return AsyncConnection(*self._endpoint(node))

