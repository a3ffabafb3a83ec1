"""The clients' HTTP/1.1 keep-alive connections: a request in one write, the answer read by one
sans-IO reader that a blocking socket (`Connection`, the sync client) and an asyncio stream
(`AsyncConnection`, the AsyncClient) both drive.

`http.client` parses every answer's headers with the `email` package and builds a request from
one `putheader` call per header, and an aiohttp ClientSession request carries its own machinery:
about 0.2 ms of the producer's CPU per call either way on the test machine, against 0.08 ms for a
whole exchange here (a one-job submit waited for is a 1.7 ms round). What a node, or a proxy in
front of it, may answer is read as RFC 9112 says: Content-Length, chunked, or until the
connection closes; informational (1xx) answers skipped; no body for HEAD, 204, 304.

Limits against a peer that is not a raftq node: a status or header line of at most
`LINE_BYTES_MAX`, at most `HEADERS_MAX` header lines; anything else malformed is a
`MalformedAnswer`, which the transports report as a TransportError and whose connection they drop.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from typing import Generator, Mapping, NamedTuple

#: Longest status, header or chunk-size line read (http.client's own limit).
LINE_BYTES_MAX = 65536
#: Most header lines (or trailer lines) in one answer (http.client's own limit).
HEADERS_MAX = 100
#: A request whose body is at most this is sent with its head in one write.
ONE_WRITE_BYTES_MAX = 64 << 10

_UNSAFE_IN_TARGET = re.compile(r"[\x00-\x20\x7f]")
_UNSAFE_IN_HEADER = re.compile(r"[\r\n\x00]")
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")

# What the answer reader asks its driver for: a line (up to LINE_BYTES_MAX + 1 bytes, with its
# newline; b"" at the end of the stream), exactly n bytes (fewer only at the end of the stream),
# or everything up to the end of the stream.
_LINE = ("line", 0)
_TO_END = ("end", 0)


class MalformedAnswer(Exception):
    """The peer's answer is not HTTP/1.x as RFC 9112 has it (or exceeds the limits above)."""


class ClosedBeforeAnswer(ConnectionResetError):
    """The peer closed the connection before any byte of an answer: a kept-alive connection it
    dropped while idle, so the request may be sent again on a fresh one."""


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]  #: names lower-cased; a repeated header: the last one counts
    body: bytes
    will_close: bool  #: the connection cannot carry another request


AnswerReader = Generator[tuple[str, int], bytes, Answer]


def request_head(method: str, target: str, host: str, headers: Mapping[str, str], body: bytes) -> bytes:
    """The request line and headers, Host and Content-Length included.

    Raises:
        ValueError: the target or a header holds characters a request line or header cannot
            (a space or control character; a line break or NUL), which could smuggle a line.
    """
    if _UNSAFE_IN_TARGET.search(target):
        raise ValueError(f"the request target {target[:80]!r} holds a space or control character")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Accept-Encoding: identity"]
    for name, value in headers.items():
        if _UNSAFE_IN_HEADER.search(name) or _UNSAFE_IN_HEADER.search(value):
            raise ValueError(f"header {name[:40]!r} holds a line break or NUL")
        lines.append(f"{name}: {value}")
    if body or method in _BODY_METHODS:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def read_answer(method: str) -> AnswerReader:
    """Reads one answer to a `method` request from what its driver sends in.

    Raises:
        ClosedBeforeAnswer: the stream ended before the first byte.
        MalformedAnswer: the answer is not HTTP/1.x, or is cut short.
    """
    line = yield _LINE
    if not line:
        raise ClosedBeforeAnswer("the node closed the connection before answering")
    while True:
        version, status = _status_line(_checked(line))
        headers = yield from _header_lines()
        if not 100 <= status < 200:
            break
        line = yield _LINE  # 1xx: informational, the answer follows
    connection = headers.get("connection", "").lower()
    will_close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
    if method == "HEAD" or status in (204, 304):
        return Answer(status, headers, b"", will_close)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return Answer(status, headers, (yield from _chunked_body()), will_close)
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise MalformedAnswer(f"Content-Length {length[:40]!r} is not a number")
        return Answer(status, headers, (yield from _exactly(int(length))), will_close)
    return Answer(status, headers, (yield _TO_END), True)  # the body ends with the connection


def _checked(line: bytes) -> bytes:
    if len(line) > LINE_BYTES_MAX:
        raise MalformedAnswer(f"a line of the answer is longer than {LINE_BYTES_MAX} bytes")
    return line


def _status_line(line: bytes) -> tuple[str, int]:
    """("HTTP/1.1", 201) from b"HTTP/1.1 201 Created\\r\\n"."""
    parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise MalformedAnswer(f"not an HTTP/1.x status line: {line[:80]!r}")
    return parts[0], int(parts[1])


def _header_lines() -> Generator[tuple[str, int], bytes, dict[str, str]]:
    headers: dict[str, str] = {}
    last = None
    for _ in range(HEADERS_MAX + 1):
        line = _checked((yield _LINE))
        if line in (b"\r\n", b"\n"):
            return headers
        if not line:
            raise MalformedAnswer("the connection closed inside the answer's headers")
        text = line.decode("latin-1").rstrip("\r\n")
        if text[0] in " \t" and last is not None:  # obsolete line folding: continues the last value
            headers[last] += " " + text.strip()
            continue
        name, colon, value = text.partition(":")
        if not colon or not name or name != name.strip():
            raise MalformedAnswer(f"not a header line: {text[:80]!r}")
        last = name.lower()
        headers[last] = value.strip()
    raise MalformedAnswer(f"more than {HEADERS_MAX} header lines")


def _exactly(size: int) -> Generator[tuple[str, int], bytes, bytes]:
    if size == 0:
        return b""
    data = yield ("exactly", size)
    if len(data) != size:
        raise MalformedAnswer(f"the connection closed after {len(data)} of {size} body bytes")
    return data


def _chunked_body() -> Generator[tuple[str, int], bytes, bytes]:
    parts = []
    while True:
        line = _checked((yield _LINE))
        size_text = line.split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise MalformedAnswer(f"bad chunk size line {line[:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            yield from _header_lines()  # trailers, if any, up to the empty line
            return b"".join(parts)
        parts.append((yield from _exactly(size)))
        if _checked((yield _LINE)) not in (b"\r\n", b"\n"):
            raise MalformedAnswer("a chunk does not end with CRLF")


class Connection:
    """One blocking connection to one node; used by one thread at a time (the transport's pool
    sees to it). Every failure leaves it unusable: the caller closes it."""

    def __init__(self, host: str, port: int, netloc: str, ssl_context: ssl.SSLContext | None) -> None:
        self._address = (host, port)
        self._host_header = netloc
        self._ssl_context = ssl_context
        self._sock: socket.socket | None = None
        self._reader = None

    def exchange(self, method: str, target: str, headers: Mapping[str, str], body: bytes, timeout_s: float) -> Answer:
        """Sends one request and reads its answer.

        Raises:
            OSError (ClosedBeforeAnswer among them), TimeoutError, ssl.SSLError: the network.
            MalformedAnswer: the answer is not HTTP/1.x.
            ValueError: the target or a header could smuggle a line (`request_head`).
        """
        head = request_head(method, target, self._host_header, headers, body)
        if self._sock is None:
            self._connect(timeout_s)
        else:
            self._sock.settimeout(timeout_s)
        assert self._sock is not None and self._reader is not None
        if len(body) <= ONE_WRITE_BYTES_MAX:
            self._sock.sendall(head + body)
        else:  # not worth copying into one buffer
            self._sock.sendall(head)
            self._sock.sendall(body)
        reader, answer = self._reader, read_answer(method)
        need = next(answer)
        while True:
            kind, size = need
            if kind == "line":
                data = reader.readline(LINE_BYTES_MAX + 1)
            elif kind == "exactly":
                data = reader.read(size)
            else:
                data = reader.read()
            try:
                need = answer.send(data)
            except StopIteration as done:
                return done.value

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = self._reader = None

    def _connect(self, timeout_s: float) -> None:
        sock = socket.create_connection(self._address, timeout=timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl_context is not None:
                sock = self._ssl_context.wrap_socket(sock, server_hostname=self._address[0])
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._reader = sock.makefile("rb")


class AsyncConnection:
    """One asyncio connection to one node; one request at a time (the transport's pool sees to
    it). Every failure, cancellation included, leaves it unusable: the caller closes it."""

    def __init__(self, host: str, port: int, netloc: str, ssl_context: ssl.SSLContext | None) -> None:
        self._address = (host, port)
        self._host_header = netloc
        self._ssl_context = ssl_context
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def exchange(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Answer:
        """As `Connection.exchange`; the caller bounds the time (asyncio.timeout)."""
        head = request_head(method, target, self._host_header, headers, body)
        if self._writer is None:
            host, port = self._address
            # asyncio's TCP transports set TCP_NODELAY themselves.
            self._reader, self._writer = await asyncio.open_connection(
                host, port, ssl=self._ssl_context, server_hostname=host if self._ssl_context else None,
                limit=LINE_BYTES_MAX + 1)
        assert self._reader is not None
        if len(body) <= ONE_WRITE_BYTES_MAX:
            self._writer.write(head + body)
        else:
            self._writer.write(head)
            self._writer.write(body)
            await self._writer.drain()
        reader, answer = self._reader, read_answer(method)
        need = next(answer)
        while True:
            kind, size = need
            if kind == "line":
                try:
                    data = await reader.readline()
                except ValueError:  # the stream's limit, LINE_BYTES_MAX + 1, was reached without a newline
                    raise MalformedAnswer(f"a line of the answer is longer than {LINE_BYTES_MAX} bytes") from None
            elif kind == "exactly":
                try:
                    data = await reader.readexactly(size)
                except asyncio.IncompleteReadError as short:
                    data = short.partial
            else:
                data = await reader.read()
            try:
                need = answer.send(data)
            except StopIteration as done:
                return done.value

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer, self._reader = self._writer, None, None
            writer.close()
