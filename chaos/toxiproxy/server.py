"""Toxiproxy's HTTP API (Shopify/toxiproxy api.go) on aiohttp, and ways to run it.

Theory of operation
-------------------
``Api`` holds the proxies by name and serves the real server's routes with its JSON shapes,
status codes and error bodies (``errors.py``). Every call that changes state holds one
``asyncio.Lock``: the real server guards the same operations with its collection and toxic
locks, and one lock keeps a toxic removal (which awaits stages on every live link) from
interleaving with another change. Reads take no lock: on one event loop they see a
consistent state anyway.

``ToxiproxyServer`` binds the API socket itself (so that ``port=0`` works and the real port
is known), runs the aiohttp app on it and stops every proxy on close. ``ToxiproxyThread``
runs one in a background thread for synchronous code (toxiproxy-python is built on
``requests``); ``ToxiproxyProcess`` runs ``python -m raftq.chaos.toxiproxy`` and waits until
``GET /version`` answers, which is how a chaos suite starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import queue
import random
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any, Awaitable, Callable

from aiohttp import web

from .errors import (BAD_REQUEST_BODY, MISSING_FIELD, PROXY_ALREADY_EXISTS, PROXY_NOT_FOUND,
                     TOXIC_NOT_FOUND, ApiError, decode_field, internal, require_object)
from .proxy import Proxy, bind_listener, canonical_address, join_host_port
from .toxics import Toxic, apply_update, toxic_from_json

log = logging.getLogger("chaos.toxiproxy")

# The real server's release this one copies; "+raftq" (semver build metadata) says whose it is.
VERSION = "2.12.0+raftq"
DEFAULT_PORT = 8474

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    # Compact, like Go's json.Marshal.
    return web.Response(body=json.dumps(data, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")


def error_response(error: ApiError) -> web.Response:
    # Go's http.Error: text/plain, nosniff, the JSON error and a newline.
    return web.Response(text=json.dumps(error.body(), separators=(",", ":")) + "\n", status=error.status,
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid character '{name[0]}' looking for beginning of value")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


async def read_json(request: web.Request) -> Any:
    """The first JSON value of the body; like Go's json.Decoder, trailing bytes are ignored."""
    text = (await request.read()).decode("utf-8", errors="replace").lstrip()
    if not text:
        raise BAD_REQUEST_BODY("EOF")
    try:
        value, _ = _DECODER.raw_decode(text)
    except ValueError as exc:
        raise BAD_REQUEST_BODY(getattr(exc, "msg", str(exc))) from None
    return value


@web.middleware
async def _api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # The real server refuses browsers (a page could otherwise drive it through CSRF).
    if request.headers.get("User-Agent", "").startswith("Mozilla/"):
        return web.Response(status=403, text="User agent not allowed\n")
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except web.HTTPNotFound:  # no such route: Go's default body
        return web.Response(status=404, text="404 page not found\n")
    except web.HTTPMethodNotAllowed:  # gorilla/mux answers 405 with an empty body
        return web.Response(status=405)
    except web.HTTPException:
        raise
    except Exception as exc:  # anything else is a 500 with the raw message, as apiError() does
        log.exception("API %s %s failed", request.method, request.path)
        return error_response(internal(str(exc)))


def _proxy_fields(body: dict[str, Any]) -> dict[str, Any]:
    return {key: decode_field(body, key, go_type, "Proxy")
            for key, go_type in (("name", "string"), ("listen", "string"),
                                 ("upstream", "string"), ("enabled", "bool"))}


class Api:
    """The proxy collection and the HTTP handlers over it."""

    def __init__(self, rng: random.Random) -> None:
        self.proxies: dict[str, Proxy] = {}
        self.rng = rng
        self.lock = asyncio.Lock()

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/reset", self.reset)
        r.add_get("/proxies", self.proxy_index, allow_head=False)
        r.add_post("/proxies", self.proxy_create)
        r.add_post("/populate", self.populate)
        r.add_get("/proxies/{proxy}", self.proxy_show, allow_head=False)
        r.add_route("POST", "/proxies/{proxy}", self.proxy_update)  # POST is deprecated upstream
        r.add_route("PATCH", "/proxies/{proxy}", self.proxy_update)
        r.add_delete("/proxies/{proxy}", self.proxy_delete)
        r.add_get("/proxies/{proxy}/toxics", self.toxic_index, allow_head=False)
        r.add_post("/proxies/{proxy}/toxics", self.toxic_create)
        r.add_get("/proxies/{proxy}/toxics/{toxic}", self.toxic_show, allow_head=False)
        r.add_route("POST", "/proxies/{proxy}/toxics/{toxic}", self.toxic_update)
        r.add_route("PATCH", "/proxies/{proxy}/toxics/{toxic}", self.toxic_update)
        r.add_delete("/proxies/{proxy}/toxics/{toxic}", self.toxic_delete)
        r.add_get("/version", self.version, allow_head=False)

    def _proxy(self, request: web.Request) -> Proxy:
        proxy = self.proxies.get(request.match_info["proxy"])
        if proxy is None:
            raise PROXY_NOT_FOUND()
        return proxy

    def _toxic(self, proxy: Proxy, request: web.Request) -> Toxic:
        toxic = proxy.find_toxic(request.match_info["toxic"])
        if toxic is None:
            raise TOXIC_NOT_FOUND()
        return toxic

    async def stop_all(self) -> None:
        async with self.lock:
            for proxy in self.proxies.values():
                proxy.stop()

    # --- proxies ---

    async def proxy_index(self, request: web.Request) -> web.Response:
        # Go marshals a map with its keys sorted.
        return json_response({name: self.proxies[name].to_json() for name in sorted(self.proxies)})

    async def proxy_create(self, request: web.Request) -> web.Response:
        fields = _proxy_fields(require_object(await read_json(request), "toxiproxy.Proxy"))
        if not fields["name"]:
            raise MISSING_FIELD("name")
        if not fields["upstream"]:
            raise MISSING_FIELD("upstream")
        async with self.lock:
            if fields["name"] in self.proxies:
                raise PROXY_ALREADY_EXISTS()
            proxy = Proxy(fields["name"], fields["listen"] or "", fields["upstream"], self.rng)
            if fields["enabled"] is not False:  # enabled defaults to true on creation
                await proxy.start()  # a bind failure is a 500 and the proxy is not kept
            self.proxies[proxy.name] = proxy
        return json_response(proxy.to_json(), status=201)

    async def proxy_show(self, request: web.Request) -> web.Response:
        return json_response(self._proxy(request).to_json())

    async def proxy_update(self, request: web.Request) -> web.Response:
        self._proxy(request)  # 404 before any body error, as the real one
        fields = _proxy_fields(require_object(await read_json(request), "toxiproxy.Proxy"))
        async with self.lock:
            proxy = self._proxy(request)  # again: it may have been deleted while the body came in
            # Fields left out keep their current values (Go pre-fills the struct with them).
            await proxy.update(
                fields["listen"] if fields["listen"] is not None else proxy.listen,
                fields["upstream"] if fields["upstream"] is not None else proxy.upstream,
                fields["enabled"] if fields["enabled"] is not None else proxy.enabled)
        return json_response(proxy.to_json())

    async def proxy_delete(self, request: web.Request) -> web.Response:
        async with self.lock:
            proxy = self._proxy(request)
            proxy.stop()
            del self.proxies[proxy.name]
        return web.Response(status=204)

    async def populate(self, request: web.Request) -> web.Response:
        # Errors here keep the populate shape: {"error", "status", "proxies"} (null when none).
        done: list[Proxy] = []
        try:
            specs = self._populate_specs(await read_json(request))
            async with self.lock:
                for spec in specs:
                    done.append(await self._add_or_replace(**spec))
        except ApiError as exc:
            return json_response({**exc.body(), "proxies": [p.to_json() for p in done] or None},
                                 status=exc.status)
        return json_response({"proxies": [p.to_json() for p in done] or None}, status=201)

    @staticmethod
    def _populate_specs(value: Any) -> list[dict[str, Any]]:
        """Check the whole list before creating anything, as PopulateJson does."""
        if not isinstance(value, list):
            raise BAD_REQUEST_BODY("json: cannot unmarshal object into Go value of type []toxiproxy.Proxy")
        specs = []
        for number, item in enumerate(value, start=1):
            fields = _proxy_fields(require_object(item, "toxiproxy.Proxy"))
            if not fields["name"]:
                raise MISSING_FIELD(f"name at proxy {number}")
            if not fields["upstream"]:
                raise MISSING_FIELD(f"upstream at proxy {number}")
            specs.append({"name": fields["name"], "listen": fields["listen"] or "",
                          "upstream": fields["upstream"], "enabled": fields["enabled"] is not False})
        return specs

    async def _add_or_replace(self, name: str, listen: str, upstream: str, enabled: bool) -> Proxy:
        existing = self.proxies.get(name)
        if existing is not None:
            if await canonical_address(listen) == existing.listen and upstream == existing.upstream:
                return existing  # identical: left alone, connections and toxics included
            existing.stop()
        proxy = Proxy(name, listen, upstream, self.rng)
        if enabled:
            await proxy.start()
        self.proxies[name] = proxy
        return proxy

    async def reset(self, request: web.Request) -> web.Response:
        async with self.lock:
            for proxy in self.proxies.values():
                await proxy.start()  # re-enable (no-op if enabled); a bind failure is a 500
                await proxy.reset_toxics()
        return web.Response(status=204)

    # --- toxics ---

    async def toxic_index(self, request: web.Request) -> web.Response:
        return json_response([toxic.to_json() for toxic in self._proxy(request).toxics()])

    async def toxic_create(self, request: web.Request) -> web.Response:
        self._proxy(request)
        body = await read_json(request)
        async with self.lock:
            proxy = self._proxy(request)
            toxic = toxic_from_json(body, exists=lambda name: proxy.find_toxic(name) is not None)
            proxy.add_toxic(toxic)
        return json_response(toxic.to_json())  # 200, not 201: that is what the real one sends

    async def toxic_show(self, request: web.Request) -> web.Response:
        proxy = self._proxy(request)
        return json_response(self._toxic(proxy, request).to_json())

    async def toxic_update(self, request: web.Request) -> web.Response:
        async with self.lock:
            proxy = self._proxy(request)
            toxic = self._toxic(proxy, request)
            apply_update(toxic, await read_json(request))
            await proxy.update_toxic(toxic)
        return json_response(toxic.to_json())

    async def toxic_delete(self, request: web.Request) -> web.Response:
        async with self.lock:
            proxy = self._proxy(request)
            await proxy.remove_toxic(self._toxic(proxy, request))
        return web.Response(status=204)

    async def version(self, request: web.Request) -> web.Response:
        body = json.dumps({"version": VERSION}) + "\n"  # `{"version": "x"}` + newline, as Go writes it
        return web.Response(body=body.encode(), headers={"Content-Type": "application/json;charset=utf-8"})


class ToxiproxyServer:
    """The API plus its proxies on the running event loop.

    ``async with ToxiproxyServer("127.0.0.1", port=0) as srv: srv.api_url``
    """

    def __init__(self, host: str = "localhost", port: int = DEFAULT_PORT, *, seed: int | None = None) -> None:
        self._requested = (host, port)
        self.api = Api(random.Random(seed))
        self._runner: web.AppRunner | None = None
        self.host = host
        self.port = port

    @property
    def api_url(self) -> str:
        return f"http://{join_host_port(self.host, self.port)}"

    async def start(self) -> None:
        app = web.Application(middlewares=[_api_middleware])
        self.api.routes(app)
        sock = await bind_listener(join_host_port(*self._requested))
        # Short shutdown: the only long-lived HTTP connections are clients' idle keep-alives.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self.host, self.port = sock.getsockname()[:2]
        log.info("toxiproxy API listening on %s", self.api_url)

    async def close(self) -> None:
        await self.api.stop_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def populate_file(self, path: str | os.PathLike[str]) -> int:
        """The real ``-config`` option: create the proxies listed in a JSON file."""
        specs = Api._populate_specs(json.loads(pathlib.Path(path).read_text()))
        async with self.api.lock:
            for spec in specs:
                await self.api._add_or_replace(**spec)
        return len(specs)

    async def __aenter__(self) -> ToxiproxyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class ToxiproxyThread:
    """A ToxiproxyServer on its own event loop in a daemon thread, for synchronous callers.

    ``with ToxiproxyThread("127.0.0.1", 0) as srv: srv.port``
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, seed: int | None = None,
                 start_timeout_s: float = 30.0) -> None:
        self.server = ToxiproxyServer(host, port, seed=seed)
        self._start_timeout_s = start_timeout_s
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="toxiproxy", daemon=True)

    host = property(lambda self: self.server.host)
    port = property(lambda self: self.server.port)
    api_url = property(lambda self: self.server.api_url)

    def start(self) -> ToxiproxyThread:
        self._thread.start()
        if not self._ready.wait(self._start_timeout_s):
            raise TimeoutError("toxiproxy thread did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as exc:  # handed to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.server.close()

    def call(self, coro_fn: Callable[[], Awaitable[Any]], timeout_s: float = 30.0) -> Any:
        """Run a coroutine on the server's loop (e.g. to look at its state) and wait for it."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)

    def __enter__(self) -> ToxiproxyThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ToxiproxyProcess:
    """``python -m raftq.chaos.toxiproxy`` as a child process, started and polled until it answers."""

    def __init__(self, proc: subprocess.Popen[str], host: str, port: int, stdout_reader: threading.Thread) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self._stdout_reader = stdout_reader

    @property
    def api_url(self) -> str:
        return f"http://{join_host_port(self.host, self.port)}"

    @classmethod
    def start(cls, host: str = "127.0.0.1", port: int = 0, *, timeout_s: float = 30.0,
              extra_args: tuple[str, ...] = ()) -> ToxiproxyProcess:
        root = pathlib.Path(__file__).resolve().parents[2]  # the directory holding `chaos/`
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        proc = subprocess.Popen([sys.executable, "-m", "raftq.chaos.toxiproxy", "--host", host, "--port", str(port),
                                 *extra_args], stdout=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + timeout_s
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=_drain, args=(proc, lines), name="toxiproxy-stdout", daemon=True)
        reader.start()
        try:
            host, port = _startup_address(proc, lines, deadline)
            handle = cls(proc, host, port, reader)
            _wait_for_version(handle.api_url, proc, deadline)
        except BaseException:
            proc.kill()
            proc.wait()
            reader.join(timeout_s)
            raise
        return handle

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait()
        self._stdout_reader.join(timeout_s)  # it closes the pipe when the child's stdout ends
        return code

    def __enter__(self) -> ToxiproxyProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _drain(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    """Read the child's stdout to its end: an unread pipe would block the child when full."""
    assert proc.stdout is not None
    with proc.stdout:
        for line in proc.stdout:
            lines.put(line)
    lines.put(None)


def _startup_address(proc: subprocess.Popen[str], lines: queue.Queue[str | None],
                     deadline: float) -> tuple[str, int]:
    """The address from the child's "Starting Toxiproxy HTTP server" line."""
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("toxiproxy subprocess printed no address in time") from None
        if line is None:
            raise RuntimeError(f"toxiproxy subprocess exited with {proc.wait()}")
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "address" in record:
                host, _, port = record["address"].rpartition(":")
                return host.strip("[]"), int(port)


def _wait_for_version(api_url: str, proc: subprocess.Popen[str], deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(f"{api_url}/version", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"toxiproxy subprocess exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{api_url}/version did not answer in time")
        time.sleep(0.05)  # poll interval, not a wait for a condition
