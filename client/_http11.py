"""One HTTP/1.1 keep-alive connection of the sync client: a request in one write, the answer read
with the buffered reader's C `readline`.

`http.client` parses every answer's headers with the `email` package and builds a request from
one `putheader` call per header: about 0.2 ms of the producer's CPU per call on the test machine,
against 0.08 ms for the whole exchange here (a one-job submit waited for is a 1.7 ms round). What
a node, or a proxy in front of it, may answer is read as RFC 9112 says: Content-Length, chunked,
or until the connection closes; informational (1xx) answers skipped; no body for HEAD, 204, 304.

Limits against a peer that is not a raftq node: a status or header line of at most
`LINE_BYTES_MAX`, at most `HEADERS_MAX` header lines; anything else malformed is a
`MalformedAnswer`, which the transport reports as a TransportError and whose connection it drops.
"""

from __future__ import annotations

import re
import socket
import ssl

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


class MalformedAnswer(Exception):
    """The peer's answer is not HTTP/1.x as RFC 9112 has it (or exceeds the limits above)."""


class ClosedBeforeAnswer(ConnectionResetError):
    """The peer closed the connection before any byte of an answer: a kept-alive connection it
    dropped while idle, so the request may be sent again on a fresh one."""


class Connection:
    """One connection to one node; used by one thread at a time (the transport's pool sees to it).

    Every failure leaves it unusable: the caller closes it.
    """

    def __init__(self, host: str, port: int, netloc: str, ssl_context: ssl.SSLContext | None) -> None:
        self._address = (host, port)
        self._host_header = netloc
        self._ssl_context = ssl_context
        self._sock: socket.socket | None = None
        self._reader = None

    def exchange(self, method: str, target: str, headers: dict[str, str], body: bytes,
                 timeout_s: float) -> tuple[int, dict[str, str], bytes, bool]:
        """Sends one request and reads its answer: (status, headers lower-cased, body, will_close).

        Raises:
            OSError (ClosedBeforeAnswer among them), TimeoutError, ssl.SSLError: the network.
            MalformedAnswer: the answer is not HTTP/1.x.
            ValueError: the target or a header holds characters a request line or header cannot.
        """
        head = self._request_head(method, target, headers, body)
        if self._sock is None:
            self._connect(timeout_s)
        else:
            self._sock.settimeout(timeout_s)
        assert self._sock is not None
        if len(body) <= ONE_WRITE_BYTES_MAX:
            self._sock.sendall(head + body)
        else:  # not worth copying into one buffer
            self._sock.sendall(head)
            self._sock.sendall(body)
        return self._read_answer(method)

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = self._reader = None

    # ------------------------------------------------------------------ the request

    def _request_head(self, method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        if _UNSAFE_IN_TARGET.search(target):
            raise ValueError(f"the request target {target[:80]!r} holds a space or control character")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}", "Accept-Encoding: identity"]
        for name, value in headers.items():
            if _UNSAFE_IN_HEADER.search(name) or _UNSAFE_IN_HEADER.search(value):
                raise ValueError(f"header {name[:40]!r} holds a line break or NUL")
            lines.append(f"{name}: {value}")
        if body or method in _BODY_METHODS:
            lines.append(f"Content-Length: {len(body)}")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1")

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

    # ------------------------------------------------------------------ the answer

    def _read_answer(self, method: str) -> tuple[int, dict[str, str], bytes, bool]:
        first = True
        while True:
            line = self._line()
            if not line and first:
                raise ClosedBeforeAnswer("the node closed the connection before answering")
            first = False
            version, status = _status_line(line)
            headers = self._headers()
            if not 100 <= status < 200:
                break  # 1xx: informational, the answer follows
        connection = headers.get("connection", "").lower()
        will_close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
        if method == "HEAD" or status in (204, 304):
            return status, headers, b"", will_close
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return status, headers, self._chunked_body(), will_close
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise MalformedAnswer(f"Content-Length {length[:40]!r} is not a number")
            return status, headers, self._exactly(int(length)), will_close
        return status, headers, self._reader.read(), True  # the body ends with the connection

    def _line(self) -> bytes:
        line = self._reader.readline(LINE_BYTES_MAX + 1)
        if len(line) > LINE_BYTES_MAX:
            raise MalformedAnswer(f"a line of the answer is longer than {LINE_BYTES_MAX} bytes")
        return line

    def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        last = None
        for _ in range(HEADERS_MAX + 1):
            line = self._line()
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
            headers[last] = value.strip()  # a repeated header: the last one counts
        raise MalformedAnswer(f"more than {HEADERS_MAX} header lines")

    def _exactly(self, size: int) -> bytes:
        data = self._reader.read(size)
        if len(data) != size:
            raise MalformedAnswer(f"the connection closed after {len(data)} of {size} body bytes")
        return data

    def _chunked_body(self) -> bytes:
        parts = []
        while True:
            line = self._line()
            size_text = line.split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise MalformedAnswer(f"bad chunk size line {line[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                self._headers()  # trailers, if any, up to the empty line
                return b"".join(parts)
            parts.append(self._exactly(size))
            if self._line() not in (b"\r\n", b"\n"):
                raise MalformedAnswer("a chunk does not end with CRLF")


def _status_line(line: bytes) -> tuple[str, int]:
    """("HTTP/1.1", 201) from b"HTTP/1.1 201 Created\\r\\n"."""
    parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise MalformedAnswer(f"not an HTTP/1.x status line: {line[:80]!r}")
    return parts[0], int(parts[1])
