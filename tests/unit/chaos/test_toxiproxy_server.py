"""The Toxiproxy-compatible server, driven the way the chaos suite drives it.

API calls go through toxiproxy-python (``from toxiproxy import Toxiproxy``) where it has a
call, and through ``requests`` for what it lacks (toxic update, populate, raw status codes and
bodies). Bytes go through raw sockets to a real threaded echo server. The server runs in a
background thread (``ToxiproxyThread``); one test starts the CLI as a subprocess.

Timing checks are lower bounds only (a toxic adds *at least* its delay); a slow machine can
only make them pass more easily. Conditions are polled with deadlines, never slept for.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time

import pytest
import requests
from toxiproxy import Toxiproxy
from toxiproxy.exceptions import InvalidToxic, NotFound, ProxyExists

from raftq.chaos.toxiproxy import VERSION, ToxiproxyProcess, ToxiproxyServer, ToxiproxyThread

DEADLINE_S = 15.0      # generous: a 2-core shared machine
SOCK_TIMEOUT_S = 10.0


# --- fixtures and helpers ---------------------------------------------------------------------

class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


class _EchoServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


@pytest.fixture(scope="module")
def echo() -> str:
    server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
    threading.Thread(target=server.serve_forever, name="echo", daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def toxi_server() -> ToxiproxyThread:
    with ToxiproxyThread("127.0.0.1", 0, seed=1) as server:
        yield server


@pytest.fixture
def toxi(toxi_server: ToxiproxyThread) -> Toxiproxy:
    client = Toxiproxy()
    client.update_api_consumer(toxi_server.host, toxi_server.port)  # class-level settings
    client.destroy_all()
    yield client
    client.update_api_consumer(toxi_server.host, toxi_server.port)
    client.destroy_all()


@pytest.fixture
def api(toxi_server: ToxiproxyThread):
    def call(method: str, path: str, **kwargs) -> requests.Response:
        return requests.request(method, toxi_server.api_url + path, timeout=SOCK_TIMEOUT_S, **kwargs)
    return call


def address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host, int(port)


def connect(proxy) -> socket.socket:
    return socket.create_connection(address(proxy.listen), timeout=SOCK_TIMEOUT_S)


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)


def round_trip(sock: socket.socket, payload: bytes = b"ping") -> float:
    started = time.monotonic()
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload
    return time.monotonic() - started


def read_until_closed(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the peer closes; returns (data, "eof" | "reset")."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data), "reset"
        if not chunk:
            return bytes(data), "eof"
        data += chunk


def wait_until(predicate, what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)  # poll interval


def refuses(listen: str) -> bool:
    try:
        socket.create_connection(address(listen), timeout=SOCK_TIMEOUT_S).close()
    except ConnectionRefusedError:
        return True
    return False


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(SOCK_TIMEOUT_S)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# --- API: proxies -----------------------------------------------------------------------------

def test_version_and_running(toxi: Toxiproxy, api) -> None:
    assert toxi.running() is True
    assert toxi.version() == b'{"version": "%s"}\n' % VERSION.encode()
    response = api("GET", "/version")
    assert response.headers["Content-Type"] == "application/json;charset=utf-8"


def test_create_list_get_delete(toxi: Toxiproxy, api, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="crud")
    host, port = address(proxy.listen)
    assert host == "127.0.0.1" and port != 0  # "127.0.0.1:0" was sent; the real port comes back
    assert proxy.enabled is True and proxy.upstream == echo
    assert set(toxi.proxies()) == {"crud"}
    assert toxi.get_proxy("crud").listen == proxy.listen

    response = api("GET", "/proxies/crud")
    assert response.status_code == 200
    assert list(response.json()) == ["name", "listen", "upstream", "enabled", "toxics"]
    assert response.json() == {"name": "crud", "listen": proxy.listen, "upstream": echo, "enabled": True, "toxics": []}

    with connect(proxy) as sock:
        round_trip(sock, b"hello through the proxy")
        assert toxi.destroy(proxy) is True
        assert closed_by_peer(sock)  # deleting a proxy drops its connections
    assert toxi.get_proxy("crud") is None
    assert refuses(proxy.listen)
    response = api("GET", "/proxies/crud")
    assert response.status_code == 404
    assert response.text == '{"error":"proxy not found","status":404}\n'
    with pytest.raises(NotFound):
        proxy.destroy()


def test_create_disabled_then_enable_picks_port(toxi: Toxiproxy, api, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="later", listen="127.0.0.1:0", enabled=False)
    assert proxy.enabled is False and proxy.listen == "127.0.0.1:0"
    response = api("POST", "/proxies/later", json={"enabled": True})
    assert response.status_code == 200 and response.json()["enabled"] is True
    listen = response.json()["listen"]
    assert address(listen)[1] != 0
    with socket.create_connection(address(listen), timeout=SOCK_TIMEOUT_S) as sock:
        round_trip(sock)


def test_error_statuses_and_bodies(toxi: Toxiproxy, api, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="dup")
    with pytest.raises(ProxyExists):
        toxi.create(upstream=echo, name="dup")  # the client checks GET /proxies first
    response = api("POST", "/proxies", json={"name": "dup", "upstream": echo, "listen": "127.0.0.1:0"})
    assert (response.status_code, response.text) == (409, '{"error":"proxy already exists","status":409}\n')
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"

    expectations = [
        ({"upstream": echo}, 400, "missing required field: name"),
        ({"name": "x"}, 400, "missing required field: upstream"),
    ]
    for body, status, message in expectations:
        response = api("POST", "/proxies", json=body)
        assert (response.status_code, response.json()) == (status, {"error": message, "status": status})
    for raw in (b"", b"{not json", b'{"name": 5, "upstream": "x:1"}', b"[1, 2]"):
        response = api("POST", "/proxies", data=raw)
        assert response.status_code == 400
        assert response.json()["error"].startswith("bad request body: ")

    response = api("POST", "/proxies", json={"name": "clash", "upstream": echo, "listen": proxy.listen})
    assert response.status_code == 500
    assert response.json()["error"] == f"listen tcp {proxy.listen}: bind: address already in use"
    assert "clash" not in toxi.proxies()

    for method, path in [("GET", "/proxies/nope"), ("POST", "/proxies/nope"), ("DELETE", "/proxies/nope"),
                         ("GET", "/proxies/nope/toxics"), ("POST", "/proxies/nope/toxics"),
                         ("GET", "/proxies/nope/toxics/t"), ("DELETE", "/proxies/nope/toxics/t")]:
        response = api(method, path, json={})
        assert (response.status_code, response.json()["error"]) == (404, "proxy not found"), (method, path)

    response = api("GET", "/version", headers={"User-Agent": "Mozilla/5.0"})
    assert (response.status_code, response.text) == (403, "User agent not allowed\n")
    assert (api("GET", "/nowhere").status_code, api("PUT", "/proxies").status_code) == (404, 405)


def test_populate(toxi: Toxiproxy, api, echo: str) -> None:
    specs = [{"name": "pa", "listen": "127.0.0.1:0", "upstream": echo},
             {"name": "pb", "listen": "127.0.0.1:0", "upstream": echo, "enabled": False}]
    response = api("POST", "/populate", json=specs)
    assert response.status_code == 201
    first = {p["name"]: p for p in response.json()["proxies"]}
    assert first["pa"]["enabled"] is True and first["pb"]["enabled"] is False
    api("POST", "/proxies/pa/toxics", json={"type": "latency", "attributes": {"latency": 1}})

    # Same listen + upstream: left alone (toxics kept). Another upstream: replaced.
    again = [{"name": "pa", "listen": first["pa"]["listen"], "upstream": echo},
             {"name": "pb", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1"}]
    response = api("POST", "/populate", json=again)
    assert response.status_code == 201
    second = {p["name"]: p for p in response.json()["proxies"]}
    assert second["pa"]["listen"] == first["pa"]["listen"] and len(second["pa"]["toxics"]) == 1
    assert second["pb"]["upstream"] == "127.0.0.1:1" and second["pb"]["enabled"] is True

    response = api("POST", "/populate", json=[{"name": "pc", "upstream": echo}, {"name": "pd"}])
    assert response.status_code == 400
    assert response.json() == {"error": "missing required field: upstream at proxy 2", "status": 400,
                               "proxies": None}
    assert "pc" not in toxi.proxies()

    created = toxi.populate([{"name": "pe", "upstream": echo, "listen": "127.0.0.1:0"}])  # client-side loop
    assert [p.name for p in created] == ["pe"]


def test_disable_closes_connections_refuses_then_enable(toxi: Toxiproxy, api, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="flaky")
    with connect(proxy) as sock:
        round_trip(sock)
        proxy.disable()
        assert closed_by_peer(sock)
    assert refuses(proxy.listen)
    assert api("GET", "/proxies/flaky").json()["enabled"] is False

    proxy.enable()  # listens again on the same address
    assert api("GET", "/proxies/flaky").json()["listen"] == proxy.listen
    with connect(proxy) as sock:
        round_trip(sock)

    with proxy.down():
        assert refuses(proxy.listen)
    with connect(proxy) as sock:
        round_trip(sock)


def test_update_upstream_restarts_and_patch(toxi: Toxiproxy, api, echo: str) -> None:
    proxy = toxi.create(upstream="127.0.0.1:1", name="moved")
    with connect(proxy) as sock:
        assert closed_by_peer(sock)  # nothing listens upstream: the client is closed at once
    response = api("PATCH", "/proxies/moved", json={"upstream": echo})
    assert response.status_code == 200 and response.json()["upstream"] == echo
    listen = response.json()["listen"]
    with socket.create_connection(address(listen), timeout=SOCK_TIMEOUT_S) as sock:
        round_trip(sock)
        response = api("POST", "/proxies/moved", json={"listen": "127.0.0.1:0"})
        assert response.json()["listen"] != listen
        assert closed_by_peer(sock)  # a new listen address restarts the proxy


def test_reset_enables_all_and_removes_toxics(toxi: Toxiproxy, api, echo: str) -> None:
    first = toxi.create(upstream=echo, name="r1")
    second = toxi.create(upstream=echo, name="r2")
    first.add_toxic(type="latency", attributes={"latency": 10_000})
    second.add_toxic(type="slicer", stream="upstream", attributes={"average_size": 1})
    second.disable()
    assert toxi.reset() is True
    state = api("GET", "/proxies").json()
    assert [name for name in state] == ["r1", "r2"]
    assert all(p["enabled"] and p["toxics"] == [] for p in state.values())
    with connect(first) as sock:
        sock.settimeout(5.0)  # far below the latency that was removed
        round_trip(sock)


# --- API: toxics ------------------------------------------------------------------------------

def test_toxic_create_list_show_update_delete(toxi: Toxiproxy, api, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="tox")
    proxy.add_toxic(type="latency", toxicity=0.5, attributes={"latency": 100, "jitter": 10})
    proxy.add_toxic(type="bandwidth", stream="upstream", name="slow_up", attributes={"rate": 1000})
    # Upstream toxics are listed first, then downstream, each in the order added.
    listed = api("GET", "/proxies/tox/toxics").json()
    assert listed == [
        {"attributes": {"rate": 1000}, "name": "slow_up", "type": "bandwidth", "stream": "upstream", "toxicity": 1},
        {"attributes": {"latency": 100, "jitter": 10}, "name": "latency_downstream", "type": "latency",
         "stream": "downstream", "toxicity": 0.5},
    ]
    assert set(proxy.toxics()) == {"slow_up", "latency_downstream"}
    assert proxy.get_toxic("latency_downstream").attributes == {"latency": 100, "jitter": 10}
    assert api("GET", "/proxies/tox").json()["toxics"] == listed

    response = api("POST", "/proxies/tox/toxics/latency_downstream", json={"attributes": {"latency": 200}})
    assert response.status_code == 200
    assert response.json()["attributes"] == {"latency": 200, "jitter": 10}  # jitter kept
    response = api("PATCH", "/proxies/tox/toxics/latency_downstream", json={"toxicity": 1})
    assert response.json()["toxicity"] == 1 and response.json()["attributes"]["latency"] == 200
    assert api("GET", "/proxies/tox/toxics/latency_downstream").json() == response.json()

    response = api("POST", "/proxies/tox/toxics", json={"type": "timeout"})
    assert response.status_code == 200  # the real server answers 200 here, not 201
    assert response.json() == {"attributes": {"timeout": 0}, "name": "timeout_downstream", "type": "timeout",
                               "stream": "downstream", "toxicity": 1}

    assert proxy.destroy_toxic("latency_downstream") is True
    assert set(proxy.toxics()) == {"slow_up", "timeout_downstream"}


def test_toxic_errors(toxi: Toxiproxy, api, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="bad")
    proxy.add_toxic(type="latency")
    with pytest.raises(ProxyExists):  # 409: the client reuses its proxy exception
        proxy.add_toxic(type="latency")
    response = api("POST", "/proxies/bad/toxics", json={"type": "latency"})
    assert response.json() == {"error": "toxic already exists", "status": 409}
    with pytest.raises(InvalidToxic):
        proxy.add_toxic(type="no_such_toxic")
    cases = [
        ({"type": "nope"}, "invalid toxic type"),
        ({"type": "latency", "stream": "sideways"}, "stream was invalid, can be either upstream or downstream"),
        ({"type": "latency", "name": "l2", "attributes": {"latency": "1s"}}, None),
        ({"type": "latency", "name": "l3", "attributes": {"latency": 1.5}}, None),
        ({"type": "latency", "name": "l4", "toxicity": "all"}, None),
    ]
    for body, message in cases:
        response = api("POST", "/proxies/bad/toxics", json=body)
        assert response.status_code == 400, body
        if message is None:
            assert response.json()["error"].startswith("bad request body: "), body
        else:
            assert response.json()["error"] == message
    for method in ("GET", "POST", "DELETE"):
        response = api(method, "/proxies/bad/toxics/missing", json={})
        assert (response.status_code, response.json()["error"]) == (404, "toxic not found")
    with pytest.raises(NotFound):
        proxy.destroy_toxic("missing")
    # Names are unique per proxy across both directions.
    response = api("POST", "/proxies/bad/toxics", json={"type": "slicer", "name": "latency_downstream",
                                                         "stream": "upstream"})
    assert response.status_code == 409


# --- toxic effects ----------------------------------------------------------------------------

def test_latency_adds_at_least_the_delay(toxi: Toxiproxy, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="lat")
    proxy.add_toxic(type="latency", attributes={"latency": 300})
    proxy.add_toxic(type="latency", stream="upstream", attributes={"latency": 200, "jitter": 50})
    with connect(proxy) as sock:
        assert round_trip(sock) >= 0.3 + 0.15 - 0.01


def test_bandwidth_limits_throughput(toxi: Toxiproxy, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="bw")
    proxy.add_toxic(type="bandwidth", attributes={"rate": 100})  # 100 KB/s downstream
    payload = os.urandom(60_000)
    with connect(proxy) as sock:
        elapsed = round_trip(sock, payload)
    assert elapsed >= 0.6 * 0.9  # 60 KB at 100 KB/s takes 0.6 s


def test_timeout_zero_black_holes_until_removed(toxi: Toxiproxy, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="hole")
    proxy.add_toxic(type="timeout", attributes={"timeout": 0})
    with connect(proxy) as sock:
        sock.sendall(b"into the void")
        sock.settimeout(0.5)  # proving an absence needs some wait; nothing may arrive in it
        with pytest.raises(socket.timeout):
            sock.recv(100)
        # Removing a timeout toxic closes the connection (its Cleanup in the real server).
        proxy.destroy_toxic("timeout_downstream")
        assert closed_by_peer(sock)
    with connect(proxy) as sock:
        round_trip(sock)


def test_timeout_closes_after_the_delay_dropping_data(toxi: Toxiproxy, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="tmo")
    proxy.add_toxic(type="timeout", attributes={"timeout": 300})
    with connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"dropped")
        data, how = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert (data, how) == (b"", "eof")
    assert elapsed >= 0.3 - 0.01


def test_reset_peer_resets(toxi: Toxiproxy, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="rst")
    proxy.add_toxic(type="reset_peer", attributes={"timeout": 0})
    with connect(proxy) as sock:
        sock.sendall(b"hello")
        assert read_until_closed(sock) == (b"", "reset")

    api_toxic = {"type": "reset_peer", "stream": "upstream", "name": "rst_up", "attributes": {"timeout": 300}}
    proxy.destroy_toxic("reset_peer_downstream")
    proxy.add_toxic(**api_toxic)
    with connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"hello")
        assert read_until_closed(sock) == (b"", "reset")
        assert time.monotonic() - started >= 0.3 - 0.01


def test_limit_data_cuts_after_n_bytes(toxi: Toxiproxy, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="lim")
    proxy.add_toxic(type="limit_data", attributes={"bytes": 1000})
    payload = os.urandom(3000)
    with connect(proxy) as sock:
        sock.sendall(payload)
        data, how = read_until_closed(sock)
    assert (data, how) == (payload[:1000], "eof")


def test_slicer_delivers_everything_in_order(toxi: Toxiproxy, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="slice")
    proxy.add_toxic(type="slicer", attributes={"average_size": 64, "size_variation": 32, "delay": 100})
    proxy.add_toxic(type="slicer", stream="upstream", attributes={"average_size": 500, "size_variation": 0})
    payload = os.urandom(50_000)
    with connect(proxy) as sock:
        round_trip(sock, payload)


def test_slow_close_delays_the_close(toxi: Toxiproxy, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="slowc")
    proxy.add_toxic(type="slow_close", attributes={"delay": 400})
    with connect(proxy) as sock:
        round_trip(sock)
        started = time.monotonic()
        sock.shutdown(socket.SHUT_WR)  # the proxy closes upstream; downstream's end is delayed
        assert read_until_closed(sock) == (b"", "eof")
        assert time.monotonic() - started >= 0.4 - 0.01


def test_toxicity_zero_never_applies(toxi: Toxiproxy, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="lucky")
    proxy.add_toxic(type="timeout", toxicity=0.0, attributes={"timeout": 0})
    with connect(proxy) as sock:
        round_trip(sock)  # a black hole would time the socket out


# --- live connections -------------------------------------------------------------------------

def held_downstream(server: ToxiproxyThread, name: str) -> bytes:
    """The bytes the downstream toxics of proxy `name` are holding back right now."""
    async def look() -> bytes:
        proxy = server.server.api.proxies[name]
        return b"".join(stage.held.data for conn in proxy.connections()
                        for stage in conn.links["downstream"].stages
                        if stage.held is not None and hasattr(stage.held, "data"))
    return server.call(look)


def test_toxic_added_and_removed_on_open_connection(toxi: Toxiproxy, toxi_server, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="live")
    with connect(proxy) as sock:
        round_trip(sock)
        proxy.add_toxic(type="latency", attributes={"latency": 300})
        assert round_trip(sock) >= 0.3 - 0.01
        proxy.destroy_toxic("latency_downstream")
        round_trip(sock)
        # Removing a toxic releases what it holds at once (the real interrupt path).
        proxy.add_toxic(type="latency", attributes={"latency": 60_000})
        sock.sendall(b"held")
        wait_until(lambda: held_downstream(toxi_server, "live") == b"held", "the latency toxic to hold the data")
        proxy.destroy_toxic("latency_downstream")
        assert recv_exactly(sock, 4) == b"held"  # the socket timeout is far below the 60 s asked for


def test_changing_toxics_under_traffic_loses_and_reorders_nothing(toxi: Toxiproxy, api, echo: str) -> None:
    proxy = toxi.create(upstream=echo, name="churn")
    sent = bytearray()
    received = bytearray()
    stop = threading.Event()
    with connect(proxy) as sock:
        def sender() -> None:
            counter = 0
            while not stop.is_set():
                if len(sent) - len(received) > 64 * 1024:  # a window keeps the volume small
                    time.sleep(0.001)
                    continue
                block = b"".join(i.to_bytes(4, "big") for i in range(counter, counter + 256))
                counter += 256
                sock.sendall(block)
                sent.extend(block)

        def receiver() -> None:
            while chunk := sock.recv(65536):
                received.extend(chunk)

        threads = [threading.Thread(target=sender), threading.Thread(target=receiver)]
        for thread in threads:
            thread.start()
        steps = [
            ("add", {"type": "latency", "attributes": {"latency": 20, "jitter": 10}}),
            ("add", {"type": "slicer", "stream": "upstream", "attributes": {"average_size": 300, "size_variation": 100}}),
            ("add", {"type": "bandwidth", "attributes": {"rate": 2000}}),
            ("update", ("latency_downstream", {"attributes": {"latency": 5}})),
            ("remove", "latency_downstream"),
            ("add", {"type": "slicer", "attributes": {"average_size": 100, "size_variation": 50, "delay": 10}}),
            ("remove", "bandwidth_downstream"),
            ("add", {"type": "latency", "stream": "upstream", "attributes": {"latency": 15}}),
            ("remove", "slicer_upstream"),
            ("update", ("slicer_downstream", {"attributes": {"average_size": 1000}})),
            ("remove", "slicer_downstream"),
            ("remove", "latency_upstream"),
        ]
        for action, arg in steps:
            before = len(received)
            if action == "add":
                assert api("POST", "/proxies/churn/toxics", json=arg).status_code == 200
            elif action == "update":
                assert api("POST", f"/proxies/churn/toxics/{arg[0]}", json=arg[1]).status_code == 200
            else:
                assert api("DELETE", f"/proxies/churn/toxics/{arg}").status_code == 204
            wait_until(lambda: len(received) > before, f"data to keep flowing after {action}")
        stop.set()
        threads[0].join(DEADLINE_S)
        wait_until(lambda: len(received) >= len(sent), "every byte back", timeout_s=30)
        sock.shutdown(socket.SHUT_WR)  # the proxy then closes the connection: the receiver ends
        threads[1].join(DEADLINE_S)
        assert not threads[1].is_alive()
    assert len(sent) > 0 and bytes(received) == bytes(sent)


# --- other ways to run it ---------------------------------------------------------------------

async def test_in_process_async_server(echo: str) -> None:
    import asyncio

    import aiohttp

    async with ToxiproxyServer("127.0.0.1", port=0) as srv:
        assert srv.port != 0 and srv.api_url == f"http://127.0.0.1:{srv.port}"
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{srv.api_url}/proxies",
                                    json={"name": "a", "listen": "127.0.0.1:0", "upstream": echo}) as response:
                assert response.status == 201
                listen = (await response.json())["listen"]
        reader, writer = await asyncio.open_connection(*address(listen))
        writer.write(b"async")
        assert await asyncio.wait_for(reader.readexactly(5), SOCK_TIMEOUT_S) == b"async"
        writer.close()


def test_cli_subprocess_answers_version_and_stops_cleanly(echo: str) -> None:
    with ToxiproxyProcess.start("127.0.0.1", 0, timeout_s=30) as proc:
        assert requests.get(f"{proc.api_url}/version", timeout=SOCK_TIMEOUT_S).json() == {"version": VERSION}
        response = requests.post(f"{proc.api_url}/proxies", timeout=SOCK_TIMEOUT_S,
                                 json={"name": "sub", "listen": "127.0.0.1:0", "upstream": echo})
        assert response.status_code == 201
        with socket.create_connection(address(response.json()["listen"]), timeout=SOCK_TIMEOUT_S) as sock:
            round_trip(sock)
        assert proc.stop() == 0  # SIGTERM: clean exit

    out = subprocess.run([sys.executable, "-m", "raftq.chaos.toxiproxy", "--version"], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == f"toxiproxy-server version {VERSION}"


def test_cli_config_file_populates(tmp_path, echo: str) -> None:
    config = tmp_path / "proxies.json"
    config.write_text(json.dumps([{"name": "from_file", "listen": "127.0.0.1:0", "upstream": echo}]))
    with ToxiproxyProcess.start("127.0.0.1", 0, extra_args=("--config", str(config))) as proc:
        proxies = requests.get(f"{proc.api_url}/proxies", timeout=SOCK_TIMEOUT_S).json()
    assert list(proxies) == ["from_file"] and proxies["from_file"]["enabled"] is True
