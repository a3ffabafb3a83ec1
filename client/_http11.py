"""The clients' HTTP/1.1 keep-alive connections: a request in one write, the answer parsed by one
sans-IO reader (`read_answer`) that a blocking socket (`Connection`, the sync client) and an
asyncio stream (`AsyncConnection`, the AsyncClient) both feed with the bytes they receive.

`http.client` parses every answer's headers with the `email` package and builds a request from
one `putheader` call per header, and an aiohttp ClientSession request carries its own machinery:
about 0.1-0.2 ms of the producer's CPU per call either way on the test machine, against 0.08 ms
for a whole exchange here (a one-job submit waited for is a 1.5 ms round). What a node, or a proxy
in front of it, may answer is read as RFC 9112 section 6 says: chunked when it is the last transfer
coding, else until the connection closes; else Content-Length (several that differ, or one that is
not a number, are an error); else until the connection closes; 1xx answers before the final one
skipped; no body for HEAD, 204, 304.

A connection is kept for the next request only when the answer was framed by its length or its
chunks and nothing past its end has arrived: a byte too many (a wrong Content-Length, a body on a
204) would otherwise be read as the start of the next answer.

Limits against a peer that is not a raftq node: a status or header line of at most
`LINE_BYTES_MAX`, at most `HEADERS_MAX` header lines, at most `INFORMATIONAL_MAX` 1xx answers, a
body of at most `ANSWER_BYTES_MAX`; anything else malformed is a `MalformedAnswer`, which the
transports report as a TransportError and whose connection they drop.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from typing import Generator, Mapping, NamedTuple

#: Longest status, header or chunk-size line read (http.client's own limit).
LINE_BYTES_MAX = 65536
#: Most header lines (or trailer lines) in one answer (http.client's own limit).
HEADERS_MAX = 100
#: Most informational (1xx) answers before the final one.
INFORMATIONAL_MAX = 10
#: Largest answer body read (a raftq node's biggest, a fetch of many large payloads, is far below).
ANSWER_BYTES_MAX = 1 << 30
#: A request whose body is at most this is sent with its head in one write.
ONE_WRITE_BYTES_MAX = 64 << 10
#: Bytes asked of a blocking socket per read.
_SOCKET_READ_BYTES = 64 << 10
#: Bytes asked of an asyncio stream per read: more than it ever holds (twice its 64 KiB limit),
#: so that each read takes all it has and nothing past an answer's end stays hidden in it.
_STREAM_READ_BYTES = 1 << 20

_UNSAFE_IN_TARGET = re.compile(r"[\x00-\x20\x7f]")
_UNSAFE_IN_HEADER = re.compile(r"[\r\n\x00]")
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))
_DIGITS = re.compile(r"[0-9]{1,19}")
_STATUS_CODE = re.compile(r"[1-5][0-9][0-9]")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


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


#: Yields when it needs more bytes; is sent the next bytes received, b"" at the end of the stream.
AnswerReader = Generator[None, bytes, Answer]


def request_head(method: str, target: str, host: str, headers: Mapping[str, str], body: bytes) -> bytes:
    """The request line and headers, Host and Content-Length included.

    Raises:
        ValueError: the target or a header holds characters a request line or header cannot
            (a space or control character; a line break or NUL), which could smuggle a line.
    """
    if _UNSAFE_IN_TARGET.search(target):
        raise ValueError(f"the request target {target[:80]!r} holds a space or control character")
    if _UNSAFE_IN_HEADER.search("".join(headers) + "".join(headers.values())):
        name = next(name for name, value in headers.items() if _UNSAFE_IN_HEADER.search(name + value))
        raise ValueError(f"header {name[:40]!r} holds a line break or NUL")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Accept-Encoding: identity"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    if body or method in _BODY_METHODS:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


class _Received:
    """The bytes received and not yet parsed, and whether the stream has ended."""

    __slots__ = ("data", "ended")

    def __init__(self) -> None:
        self.data = bytearray()
        self.ended = False

    def more(self) -> Generator[None, bytes, None]:
        chunk = yield
        if chunk:
            self.data += chunk
        else:
            self.ended = True

    def line(self) -> Generator[None, bytes, bytes]:
        """The next line with its newline; what is left (maybe b"") at the end of the stream."""
        searched = 0
        while True:
            end = self.data.find(b"\n", searched)
            if end >= 0:
                if end >= LINE_BYTES_MAX:
                    break
                line = bytes(self.data[:end + 1])
                del self.data[:end + 1]
                return line
            if len(self.data) > LINE_BYTES_MAX:
                break
            if self.ended:
                line = bytes(self.data)
                self.data.clear()
                return line
            searched = len(self.data)
            yield from self.more()
        raise MalformedAnswer(f"a line of the answer is longer than {LINE_BYTES_MAX} bytes")

    def exactly(self, size: int) -> Generator[None, bytes, bytes]:
        while len(self.data) < size and not self.ended:
            yield from self.more()
        if len(self.data) < size:
            raise MalformedAnswer(f"the connection closed after {len(self.data)} of {size} body bytes")
        body = bytes(self.data[:size])
        del self.data[:size]
        return body

    def to_end(self) -> Generator[None, bytes, bytes]:
        while not self.ended:
            yield from self.more()
            if len(self.data) > ANSWER_BYTES_MAX:
                raise MalformedAnswer(f"an answer body longer than {ANSWER_BYTES_MAX} bytes")
        body = bytes(self.data)
        self.data.clear()
        return body


def read_answer(method: str) -> AnswerReader:
    """Parses one answer to a `method` request from the bytes its driver sends in.

    Raises:
        ClosedBeforeAnswer: the stream ended before the first byte.
        MalformedAnswer: the answer is not HTTP/1.x, or is cut short, or exceeds a limit.
    """
    received = _Received()
    yield from received.more()
    head = _whole_head(received)
    if head is not None:  # mostly: a node's answer head comes in the first read, whole
        version, status, headers, lengths = head
    else:
        version, status, headers, lengths = yield from _head_line_by_line(received)
    connection = headers.get("connection")
    tokens = {token.strip() for token in connection.lower().split(",")} if connection else set()
    will_close = "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)
    if method == "HEAD" or status in (204, 304):
        body = b""
    elif "transfer-encoding" in headers:
        codings = [token.strip() for token in headers["transfer-encoding"].lower().split(",")]
        if codings[-1] == "chunked":
            body = yield from _chunked_body(received)
            will_close = will_close or bool(lengths)  # both framings: RFC 9112 6.3 says close after
        else:
            body, will_close = (yield from received.to_end()), True
    elif lengths:
        if len(set(lengths)) > 1 or not _DIGITS.fullmatch(lengths[0]) or int(lengths[0]) > ANSWER_BYTES_MAX:
            raise MalformedAnswer(f"Content-Length {', '.join(lengths)[:60]!r} is not one number of bytes")
        body = yield from received.exactly(int(lengths[0]))
    else:
        body, will_close = (yield from received.to_end()), True  # the body ends with the connection
    return Answer(status, headers, body, will_close or bool(received.data))


_Head = tuple[str, int, dict[str, str], list[str]]  # version, status, headers, Content-Length values


def _head_line_by_line(received: _Received) -> Generator[None, bytes, _Head]:
    """The final answer's head, read a line at a time (1xx answers before it skipped)."""
    line = yield from received.line()
    if not line:
        raise ClosedBeforeAnswer("the node closed the connection before answering")
    for _ in range(INFORMATIONAL_MAX + 1):
        version, status = _status_line(line)
        headers, lengths = yield from _header_lines(received)
        if status >= 200:
            return version, status, headers, lengths
        if status == 101:
            raise MalformedAnswer("101 Switching Protocols to a request that asked for no upgrade")
        line = yield from received.line()  # 1xx: informational, the answer follows
    raise MalformedAnswer(f"more than {INFORMATIONAL_MAX} informational answers")


def _whole_head(received: _Received) -> _Head | None:
    """The head in one pass when all of it is already received and it holds nothing that
    `_head_line_by_line` treats apart (an informational answer, a stray CR or LF, a blank line,
    a line or a count at a limit); else None, with nothing taken. Each line is read as
    `_head_line_by_line` reads it, so the two give the same head or the same error."""
    data = received.data
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 1 >= LINE_BYTES_MAX:  # so is every line in it
        return None
    text = data[:end].decode("latin-1")
    lines = text.split("\r\n")
    breaks = len(lines) - 1
    if breaks > HEADERS_MAX or text.count("\r") != breaks or text.count("\n") != breaks:
        return None
    version, status = _status_line(lines[0].encode("latin-1") + b"\r\n")
    if status < 200:
        return None
    headers: dict[str, str] = {}
    lengths: list[str] = []
    last = None
    for line in lines[1:]:
        if not line.strip():  # the line-by-line reader ends the head here
            return None
        last = _header_line(line, headers, lengths, last)
    del data[:end + 4]
    return version, status, headers, lengths


def _status_line(line: bytes) -> tuple[str, int]:
    """("HTTP/1.1", 201) from b"HTTP/1.1 201 Created\\r\\n"."""
    parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or not _STATUS_CODE.fullmatch(parts[1]):
        raise MalformedAnswer(f"not an HTTP/1.x status line: {line[:80]!r}")
    return parts[0], int(parts[1])


def _header_lines(received: _Received) -> Generator[None, bytes, tuple[dict[str, str], list[str]]]:
    """The header (or trailer) lines up to the empty one: (headers, every Content-Length value)."""
    headers: dict[str, str] = {}
    lengths: list[str] = []
    last = None
    for _ in range(HEADERS_MAX + 1):
        line = yield from received.line()
        if not line:
            raise MalformedAnswer("the connection closed inside the answer's headers")
        text = line.decode("latin-1").rstrip("\r\n")
        if not text.strip():
            return headers, lengths
        last = _header_line(text, headers, lengths, last)
    raise MalformedAnswer(f"more than {HEADERS_MAX} header lines")


def _header_line(text: str, headers: dict[str, str], lengths: list[str], last: str | None) -> str | None:
    """Adds one header line (without its line end) to `headers` and `lengths`; returns the name
    an obsolete folded line after it continues."""
    if text[:1] in (" ", "\t") and last is not None:  # obsolete line folding: continues the last value
        headers[last] += " " + text.strip()
        return last
    name, colon, value = text.partition(":")
    if not colon or not name or name != name.strip():
        raise MalformedAnswer(f"not a header line: {text[:80]!r}")
    name = name.lower()
    headers[name] = value.strip()
    if name == "content-length":
        lengths.extend(part.strip() for part in value.split(","))
    return name


def _chunked_body(received: _Received) -> Generator[None, bytes, bytes]:
    parts = []
    total = 0
    while True:
        line = yield from received.line()
        size_text = line.split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise MalformedAnswer(f"bad chunk size line {line[:40]!r}")
        size = int(size_text, 16)
        total += size
        if total > ANSWER_BYTES_MAX:
            raise MalformedAnswer(f"an answer body longer than {ANSWER_BYTES_MAX} bytes")
        if size == 0:
            yield from _header_lines(received)  # trailers, if any, up to the empty line
            return b"".join(parts)
        parts.append((yield from received.exactly(size)))
        if (yield from received.line()) not in (b"\r\n", b"\n"):
            raise MalformedAnswer("a chunk does not end with CRLF")


class Connection:
    """One blocking connection to one node; used by one thread at a time (the transport's pool
    sees to it). Every failure leaves it unusable: the caller closes it."""

    def __init__(self, host: str, port: int, host_header: str, ssl_context: ssl.SSLContext | None) -> None:
        self._address = (host, port)
        self._host_header = host_header
        self._ssl_context = ssl_context
        self._sock: socket.socket | None = None

    def exchange(self, method: str, target: str, headers: Mapping[str, str], body: bytes, timeout_s: float) -> Answer:
        """Sends one request and reads its answer, all within `timeout_s`.

        Raises:
            OSError (ClosedBeforeAnswer among them), TimeoutError, ssl.SSLError: the network.
            MalformedAnswer: the answer is not HTTP/1.x.
            ValueError: the target or a header could smuggle a line (`request_head`).
        """
        deadline = time.monotonic() + timeout_s
        head = request_head(method, target, self._host_header, headers, body)
        if self._sock is None:
            self._connect(timeout_s)
        sock = self._sock
        assert sock is not None
        # Each settimeout is a system call: one for the request and the answer's first read,
        # which mostly holds the whole answer; the time left before each further read.
        sock.settimeout(_left(deadline))
        if len(body) <= ONE_WRITE_BYTES_MAX:
            sock.sendall(head + body)
        else:  # not worth copying into one buffer
            sock.sendall(head)
            sock.settimeout(_left(deadline))
            sock.sendall(body)
        answer = read_answer(method)
        next(answer)
        while True:
            try:
                answer.send(sock.recv(_SOCKET_READ_BYTES))
            except StopIteration as done:
                return done.value
            sock.settimeout(_left(deadline))

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()

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


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


class AsyncConnection:
    """One asyncio connection to one node; one request at a time (the transport's pool sees to
    it). Every failure, cancellation included, leaves it unusable: the caller closes it."""

    def __init__(self, host: str, port: int, host_header: str, ssl_context: ssl.SSLContext | None) -> None:
        self._address = (host, port)
        self._host_header = host_header
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
                host, port, ssl=self._ssl_context, server_hostname=host if self._ssl_context else None)
        reader, writer = self._reader, self._writer
        assert reader is not None
        if len(body) <= ONE_WRITE_BYTES_MAX:
            writer.write(head + body)
        else:
            writer.write(head)
            writer.write(body)
            await writer.drain()
        answer = read_answer(method)
        next(answer)
        while True:
            data = await reader.read(_STREAM_READ_BYTES)
            try:
                answer.send(data)
            except StopIteration as done:
                return done.value

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer, self._reader = self._writer, None, None
            writer.close()
