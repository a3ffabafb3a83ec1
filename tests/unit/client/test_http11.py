"""The sync client's HTTP/1.1 connection (`client/_http11.py`) against a scripted socket server on
loopback: what it sends, the answer shapes RFC 9112 allows (Content-Length, chunked, until close,
1xx first, no body), and malformed answers, each refused with a clear error and the connection
dropped. The client's behaviour over it (redirects, pooling, a stale connection) is in test_client.py.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftq import AsyncHTTPTransport, HTTPTransport, Request, errors
from tests.unit.client.fakes import closed_port_url
from raftq.client._http11 import (HEADERS_MAX, LINE_BYTES_MAX, AsyncConnection, ClosedBeforeAnswer, Connection,
                                  MalformedAnswer, read_answer)


class ScriptedServer:
    """Accepts connections one at a time; for each request read, sends the next canned answer
    (bytes), then closes the connection when the answer is followed by None in the script."""

    def __init__(self, *answers: bytes | None) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.answers:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                while self.answers:
                    request = self._read_request(connection)
                    if request is None:
                        break
                    self.requests.append(request)
                    connection.sendall(self.answers.pop(0))
                    if self.answers and self.answers[0] is None:
                        self.answers.pop(0)
                        break

    @staticmethod
    def _read_request(connection: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += connection.recv(65536)
        return head + b"\r\n\r\n" + body

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def serve():
    servers: list[ScriptedServer] = []

    def start(*answers: bytes | None) -> ScriptedServer:
        servers.append(ScriptedServer(*answers))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


class Side:
    """One connection of either driver, used the same way: the sync `Connection` on a blocking
    socket or the `AsyncConnection` on an asyncio stream (each call in its own asyncio.run)."""

    def __init__(self, kind: str, port: int, netloc: str | None = None) -> None:
        make = Connection if kind == "sync" else AsyncConnection
        self.kind = kind
        self.connection = make("127.0.0.1", port, netloc or f"127.0.0.1:{port}", None)
        self.loop = asyncio.new_event_loop() if kind == "async" else None

    def exchange(self, method: str, target: str, headers: dict, body: bytes, timeout_s: float):
        if self.loop is None:
            return self.connection.exchange(method, target, headers, body, timeout_s)

        async def run():
            async with asyncio.timeout(timeout_s):
                return await self.connection.exchange(method, target, headers, body)
        return self.loop.run_until_complete(run())

    def close(self) -> None:
        self.connection.close()
        if self.loop is not None:
            self.loop.run_until_complete(asyncio.sleep(0))  # let the transport finish closing
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def side(request):
    return request.param


def connect(server: ScriptedServer, kind: str) -> Side:
    return Side(kind, server.port)


def test_a_request_is_one_write_of_head_and_body_and_answers_keep_the_connection(serve, side):
    server = serve(b"HTTP/1.1 201 Created\r\nContent-Type: application/msgpack\r\nContent-Length: 3\r\n\r\nabc",
                   b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    connection = connect(server, side)
    try:
        assert connection.exchange("POST", "/v1/queues/q/jobs", {"Authorization": "Bearer t"}, b"\x81\xa1a\x01", 5) \
            == (201, {"content-type": "application/msgpack", "content-length": "3"}, b"abc", False)
        assert connection.exchange("GET", "/v1/cluster", {}, b"", 5)[:3] == (200, {"content-length": "0"}, b"")
    finally:
        connection.close()
    assert server.requests == [
        b"POST /v1/queues/q/jobs HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept-Encoding: identity\r\n"
        b"Authorization: Bearer t\r\nContent-Length: 4\r\n\r\n\x81\xa1a\x01" % server.port,
        b"GET /v1/cluster HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept-Encoding: identity\r\n\r\n" % server.port,
    ], "both on one connection, a GET without a body has no Content-Length"


@pytest.mark.parametrize("answer, expected", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nX-Trailer: y\r\n\r\n",
     (200, b"Wikipedia", False)),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", (200, b"ok", False)),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", (200, b"ok", True)),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", (200, b"ok", True)),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", (200, b"ok", False)),
    (b"HTTP/1.1 204 No Content\r\n\r\n", (204, b"", False)),
    (b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n  b\r\nContent-Length: 0\r\n\r\n", (200, b"", False)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", (200, b"ok", False)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", (200, b"ok", False)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", (200, b"ok", True)),
    # A byte past the answer's end (a wrong Content-Length, a body on a 204): the connection is not kept.
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale", (200, b"ok", True)),
    (b"HTTP/1.1 204 No Content\r\n\r\nbody", (204, b"", True)),
], ids=["chunked with extension and trailer", "1xx first", "connection close", "HTTP/1.0", "HTTP/1.0 keep-alive",
        "204", "folded header", "repeated equal length", "chunked last", "length and chunked", "bytes past the end",
        "body on a 204"])
def test_answer_shapes(serve, side, answer, expected):
    server = serve(answer)
    connection = connect(server, side)
    try:
        status, headers, body, will_close = connection.exchange("GET", "/", {}, b"", 5)
    finally:
        connection.close()
    assert (status, body, will_close) == expected
    if "x-folded" in headers:
        assert headers["x-folded"] == "a b"


def test_a_body_without_length_ends_with_the_connection(serve, side):
    server = serve(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it", None)
    connection = connect(server, side)
    try:
        assert connection.exchange("GET", "/", {}, b"", 5) == (200, {"content-type": "text/plain"}, b"all of it", True)
    finally:
        connection.close()


@pytest.mark.parametrize("answer, message", [
    (b"HTTP/2 200\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP/1.x status line"),
    (b"SSH-2.0-OpenSSH\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "not a header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "is not one number of bytes"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", "is not one number of bytes"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n", "is not one number of bytes"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\nokHTTP/", "is not one number of bytes"),
    (b"HTTP/1.1 \xb200 OK\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n", "longer than 1073741824 bytes"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", "101 Switching Protocols"),
    (b"HTTP/1.1 100 Continue\r\n\r\n" * 11 + b"HTTP/1.1 200 OK\r\n\r\n", "more than 10 informational"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed after 5 of 10 body bytes"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", "bad chunk size line"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", "does not end with CRLF"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * (HEADERS_MAX + 1) + b"\r\n", f"more than {HEADERS_MAX} header lines"),
    (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * LINE_BYTES_MAX + b"\r\n\r\n", f"longer than {LINE_BYTES_MAX} bytes"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", "closed inside the answer's headers"),
])
def test_a_malformed_answer_is_refused_by_name(serve, side, answer, message):
    server = serve(answer, None)
    connection = connect(server, side)
    try:
        with pytest.raises(MalformedAnswer, match=message):
            connection.exchange("GET", "/", {}, b"", 5)
    finally:
        connection.close()


def test_through_the_transport_a_malformed_answer_is_a_transport_error_naming_it(serve):
    server = serve(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", None)
    transport = HTTPTransport()
    try:
        with pytest.raises(errors.TransportError, match="malformed HTTP answer: not a header line"):
            transport.handle_request(Request("GET", server.url + "/v1/queues"))
    finally:
        transport.close()


def test_a_connection_closed_before_any_answer_says_so(serve, side):
    server = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", None)
    connection = connect(server, side)
    try:
        connection.exchange("GET", "/", {}, b"", 5)
        # The server closed it after its one answer: the read meets the end of the stream
        # (ClosedBeforeAnswer) or, when the kernel answered the second request with a reset
        # first, the reset; both are a ConnectionResetError, which the transports retry.
        with pytest.raises(ConnectionResetError):
            connection.exchange("GET", "/", {}, b"", 5)
    finally:
        connection.close()


@pytest.mark.parametrize("target, headers", [
    ("/a b", {}), ("/a\r\nX-Injected: 1", {}), ("/", {"X-Evil": "v\r\nX-Injected: 1"}), ("/", {"X\nA": "v"}),
])
def test_a_request_that_would_smuggle_a_line_is_refused_before_sending(serve, side, target, headers):
    server = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    connection = connect(server, side)
    try:
        with pytest.raises(ValueError):
            connection.exchange("GET", target, headers, b"", 5)
    finally:
        connection.close()
    assert server.requests == []


def test_no_answer_in_time_is_a_timeout(side):
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    try:
        connection = Side(side, listener.getsockname()[1])
        with pytest.raises(TimeoutError):
            connection.exchange("GET", "/", {}, b"", 0.2)
        connection.close()
    finally:
        listener.close()


class SlowServer:
    """Answers each request after `delay_s`, one thread per connection, counting the connections
    open at once."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.open_now = self.open_max = self.connections = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with self.lock:
            self.connections += 1
            self.open_now += 1
            self.open_max = max(self.open_max, self.open_now)
        try:
            with connection:
                while ScriptedServer._read_request(connection) is not None:
                    time.sleep(self.delay_s)  # the slow node this server plays
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except OSError:
            pass
        finally:
            with self.lock:
                self.open_now -= 1


def test_the_async_transport_opens_at_most_connections_max_and_reuses_them():
    server = SlowServer(delay_s=0.05)

    async def run():
        transport = AsyncHTTPTransport(connections_max=2)
        try:
            answers = await asyncio.gather(*(transport.handle_async_request(Request("GET", server.url + "/"))
                                             for _ in range(8)))
        finally:
            await transport.aclose()
        return [answer.content for answer in answers]

    try:
        assert asyncio.run(run()) == [b"ok"] * 8
    finally:
        server.listener.close()
    assert (server.open_max, server.connections) == (2, 2), \
        f"8 requests at once over at most 2 kept-alive connections: {server.open_max} at once, {server.connections} opened"


def test_an_async_request_cancelled_mid_answer_drops_its_connection():
    server = SlowServer(delay_s=0.5)

    async def run():
        transport = AsyncHTTPTransport()
        try:
            task = asyncio.create_task(transport.handle_async_request(Request("GET", server.url + "/")))
            deadline = time.monotonic() + 10
            while server.connections == 0:  # polling the server's count with a deadline
                assert time.monotonic() < deadline, "the request never reached the server"
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return dict(transport._idle)
        finally:
            await transport.aclose()

    try:
        idle = asyncio.run(run())
    finally:
        server.listener.close()
    assert all(not connections for connections in idle.values()), f"a half-read connection went back to the pool: {idle}"


def test_the_async_transport_replaces_a_stale_pooled_connection_and_maps_errors():
    # One answer per connection, then closed without a word: the pooled connection goes stale.
    server = ScriptedServer(*[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", None] * 3
                            + [b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", None])

    async def run():
        transport = AsyncHTTPTransport()
        try:
            contents = [(await transport.handle_async_request(Request("GET", server.url + "/"))).content
                        for _ in range(3)]
            with pytest.raises(errors.TransportError, match="malformed HTTP answer: not a header line"):
                await transport.handle_async_request(Request("GET", server.url + "/"))
            with pytest.raises(errors.ConnectError):
                await transport.handle_async_request(Request("GET", closed_port_url() + "/"))
            return contents
        finally:
            await transport.aclose()

    try:
        assert asyncio.run(run()) == [b"ok"] * 3
    finally:
        server.close()
    assert len(server.requests) == 4, "each call reached the server once: a stale connection is retried, not failed"


def test_the_answer_reader_says_the_stream_ended_before_any_answer():
    reader = read_answer("GET")
    next(reader)
    with pytest.raises(ClosedBeforeAnswer, match="closed the connection before answering"):
        reader.send(b"")


def test_an_answer_with_bytes_past_its_end_is_not_taken_for_the_next_one(serve):
    """A wrong Content-Length sends a second answer along with the first: the transport does not
    keep that connection, so the next request gets its own answer, not the stale one."""
    server = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale", None,
                   b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
    transport = HTTPTransport()
    try:
        contents = [transport.handle_request(Request("GET", server.url + "/")).content for _ in range(2)]
    finally:
        transport.close()
    assert contents == [b"ok", b"fresh"]


def test_a_slow_drip_answer_is_held_to_the_whole_timeout(side):
    """A server that sends one byte every 0.1 s: each read returns in time, the exchange does not."""
    listener = socket.create_server(("127.0.0.1", 0))

    def drip() -> None:
        connection, _ = listener.accept()
        with connection:
            ScriptedServer._read_request(connection)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n" + b"x" * 40:
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.1)  # the slow peer this server plays

    threading.Thread(target=drip, daemon=True).start()
    connection = Side(side, listener.getsockname()[1])
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            connection.exchange("GET", "/", {}, b"", 0.5)
    finally:
        connection.close()
        listener.close()
    assert time.monotonic() - started < 3, "the timeout bounds the whole exchange, not each read"


def test_an_async_request_waiting_for_a_connection_counts_the_wait_in_its_timeout():
    server = SlowServer(delay_s=1.0)

    async def run():
        transport = AsyncHTTPTransport(connections_max=1)
        try:
            slow = asyncio.create_task(transport.handle_async_request(Request("GET", server.url + "/", timeout_s=10)))
            await asyncio.sleep(0.05)  # let it take the one connection
            started = time.monotonic()
            with pytest.raises(errors.Timeout):
                await transport.handle_async_request(Request("GET", server.url + "/", timeout_s=0.3))
            waited = time.monotonic() - started
            assert (await slow).content == b"ok"
            return waited
        finally:
            await transport.aclose()

    try:
        waited = asyncio.run(run())
    finally:
        server.listener.close()
    assert waited < 0.9, f"timed out after {waited:.2f} s, not 0.3 s"


@pytest.mark.parametrize("node, host_header", [
    ("http://127.0.0.1:7001", "127.0.0.1:7001"), ("http://user:secret@node-a:7001", "node-a:7001"),
    ("http://[::1]:7001", "[::1]:7001"), ("https://node-a", "node-a"),
])
def test_the_host_header_names_host_and_port_only(node, host_header):
    assert HTTPTransport()._endpoint(node)[2] == host_header


def _outcome(reader_feed: list[bytes], method: str = "GET"):
    """What `read_answer` makes of these reads, in order (b"" ends the stream): the Answer, or
    the error's class and message."""
    reader = read_answer(method)
    next(reader)
    try:
        for chunk in reader_feed:
            reader.send(chunk)
    except StopIteration as done:
        return done.value
    except (MalformedAnswer, ClosedBeforeAnswer) as exc:
        return type(exc).__name__, str(exc)
    return "wants more"


_HEAD_PARTS = st.sampled_from([
    "HTTP/1.1 200 OK", "HTTP/1.1 201 Created", "HTTP/1.0 200 OK", "HTTP/1.1 103 Early Hints", "HTTP/1.1 204 No Content",
    "HTTP/2 200", "HTTP/1.1 2000 X", "Content-Length: 2", "Content-Length: 3", "Content-Length: 2, 2", "Content-Length: x",
    "Connection: close", "Connection: keep-alive", "Transfer-Encoding: chunked", "X-A: 1", " folded", "\tfolded",
    "no colon", "no colon\r", "X-E: 1\r", " X-B: 1", "", " ", "\xa0", "\r", "X-C: a\rb", "X-D: a\nb",
    "Date: Mon, 07 Dec 2026 20:59:19 GMT",
])


@settings(max_examples=400, deadline=None)
@given(status=st.sampled_from(["HTTP/1.1 200 OK", "HTTP/1.1 100 Continue", "HTTP/1.0 304 Not Modified", "HTTP/1.1 20 X"]),
       lines=st.lists(_HEAD_PARTS, max_size=8), body=st.sampled_from([b"", b"ok", b"okHTTP/1.1", b"2\r\nok\r\n0\r\n\r\n"]),
       method=st.sampled_from(["GET", "HEAD"]))
def test_a_head_read_whole_and_a_head_read_line_by_line_are_read_alike(status, lines, body, method):
    """The reader takes a head that came whole in the first read in one pass (`_whole_head`), and
    any other line by line: both give the same answer, or the same error, for any head. (The
    second way gets one byte first, then the rest: so both end with the same bytes received.)"""
    answer = "\r\n".join([status, *lines, "", ""]).encode("latin-1") + body
    whole = _outcome([answer, b""], method)
    line_by_line = _outcome([answer[:1], answer[1:], b""], method)
    assert whole == line_by_line, f"{answer!r}: read whole {whole!r}, line by line {line_by_line!r}"
