"""Proxies: a listener, the connections it accepted, and the toxic chain they all share.

Theory of operation
-------------------
A ``Proxy`` listens on ``listen``. Each accepted client gets one new TCP connection to
``upstream`` (dialled after the accept, as the real server does) and becomes a ``Connection``
with two ``Link``s: ``upstream`` carries client -> server bytes, ``downstream`` server ->
client. A link is ``reader task -> toxic stages -> writer task`` (see ``toxics.py``).

How a connection ends, copied from the real server's ``link.go``:

* a link whose source reaches EOF (or fails) carries ``End.EOF`` to its writer, which closes
  the *destination* socket outright (``dest.Close()``; there is no half-close). Closing that
  socket ends the reader of the other link, whose own end travels through its own toxics
  (a ``slow_close`` there delays it) and closes the other socket;
* ``End.CLOSE`` from a toxic (timeout, limit_data) is handled like EOF;
* ``End.RESET`` (reset_peer) sets SO_LINGER 0 on both sockets and closes them: both peers
  see "connection reset by peer";
* a write error on a destination aborts the whole connection;
* ``enabled = false`` stops the listener (new connects are refused) and aborts every
  connection, as ``stop()`` in proxy.go.

When both writers have finished the connection is forgotten. The toxic chain lives on the
proxy (one list per direction) and survives disable / enable; every live link of the right
direction gets toxics added, updated and removed as the API changes the chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from typing import Any

from .errors import internal
from .toxics import DIRECTIONS, DOWNSTREAM, UPSTREAM, Chunk, End, Pipe, Stage, Toxic

log = logging.getLogger("chaos.toxiproxy")

READ_BYTES = 32 * 1024  # io.Copy's buffer size in the real server


# --- addresses --------------------------------------------------------------------------------

def split_host_port(address: str) -> tuple[str, str]:
    """Go's net.SplitHostPort, with its error wording: "host:port" or "[v6]:port"."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise ValueError(f"address {address}: missing ']' in address")
        if not address[end + 1:].startswith(":"):
            raise ValueError(f"address {address}: missing port in address")
        return address[1:end], address[end + 2:]
    if ":" not in address:
        raise ValueError(f"address {address}: missing port in address")
    host, port = address.rsplit(":", 1)
    if ":" in host:
        raise ValueError(f"address {address}: too many colons in address")
    return host, port


def join_host_port(host: str, port: int | str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(address: str) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """(family, sockaddr) for a listen address; "" or ":p" means every interface (dual stack).

    Raises ValueError with Go's wording. Like Go, an IPv4 address is preferred for a name
    that has both ("localhost" -> 127.0.0.1).
    """
    host, port_text = ("", "0") if address == "" else split_host_port(address)
    if port_text == "":
        port = 0
    elif port_text.isdigit():
        port = int(port_text)
    else:
        try:
            port = socket.getservbyname(port_text, "tcp")
        except OSError:
            raise ValueError(f"lookup tcp/{port_text}: unknown port") from None
    if port > 65535:
        raise ValueError(f"address {port_text}: invalid port")
    if host == "":
        return (socket.AF_INET6, ("::", port)) if socket.has_ipv6 else (socket.AF_INET, ("0.0.0.0", port))
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"lookup {host}: {exc.strerror or 'no such host'}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return infos[0][0], infos[0][4]


def format_sockaddr(sockaddr: tuple[Any, ...]) -> str:
    return join_host_port(sockaddr[0], sockaddr[1])


async def canonical_address(address: str) -> str:
    """What Go's proxy.Differs compares: the resolved form of a listen address."""
    try:
        return format_sockaddr((await resolve(address))[1])
    except ValueError as exc:
        raise internal(str(exc)) from None


async def bind_listener(address: str) -> socket.socket:
    """A listening socket for ``address``; failures are 500s worded like Go's net.Listen."""
    try:
        family, sockaddr = await resolve(address)
    except ValueError as exc:
        raise internal(f"listen tcp: {exc}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Go sets SO_REUSEADDR on listeners: re-enabling a proxy right after a disable must
        # get its port back even with connections in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and sockaddr[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = (exc.strerror or str(exc)).lower()
        raise internal(f"listen tcp {address}: bind: {reason}") from None
    return sock


# --- one direction of one connection ----------------------------------------------------------

class Link:
    """reader -> stages -> writer for one direction; stages follow the proxy's chain live."""

    def __init__(self, conn: Connection, direction: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, chain: list[Toxic], rng: random.Random) -> None:
        self.conn = conn
        self.direction = direction
        self._reader = reader
        self._writer = writer
        self._rng = rng
        self.tail = Pipe()         # the writer reads here for the whole life of the link
        self.head = self.tail      # the reader writes here; moves as the first toxic changes
        self.stages: list[Stage] = []
        self.done = False          # the writer has finished
        self._tasks: list[asyncio.Task[None]] = []
        for toxic in chain:
            self.add(toxic)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._write())]

    def cancel(self) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for stage in self.stages:
            stage.cancel()

    def _feed(self, index: int, pipe: Pipe) -> None:
        """Point the producer in front of ``stages[index]`` (reader or stage) at ``pipe``."""
        if index == 0:
            self.head = pipe
        else:
            self.stages[index - 1].output = pipe

    def _stage_of(self, toxic: Toxic) -> Stage | None:
        return next((stage for stage in self.stages if stage.toxic is toxic), None)

    def add(self, toxic: Toxic) -> None:
        """Append a toxic in front of the writer. No await: atomic on the event loop."""
        if self.conn.closed:
            return
        pipe = Pipe(toxic.impl.buffer)
        stage = Stage(toxic, pipe, self.tail, self._rng)
        self._feed(len(self.stages), pipe)
        self.stages.append(stage)
        stage.start()

    async def update(self, toxic: Toxic) -> None:
        stage = self._stage_of(toxic)
        if stage is not None and await stage.interrupt() and not self.conn.closed:
            stage.start()  # new attributes, new toxicity draw, same state

    async def remove(self, toxic: Toxic) -> None:
        stage = self._stage_of(toxic)
        if stage is None:
            return
        if await stage.interrupt() and not self.conn.closed:
            if toxic.impl.closes_on_removal:
                stage.output.push(End.CLOSE)  # the real timeout toxic's Cleanup closes the link
            else:
                # Everything the stage had not taken yet goes on, in order, then re-point
                # the producer in front of it. Nothing between here and there awaits.
                stage.input.retire(stage.output)
                self._feed(self.stages.index(stage), stage.output)
        # A stage that could not be interrupted (already ended, or a reset on its way) is
        # only forgotten: its end marker is already travelling to the writer.
        self.stages.remove(stage)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await self._reader.read(READ_BYTES)
            except OSError:
                data = b""  # the real reader treats a read error as the end of the stream
            if not data:
                await self.head.put(End.EOF)
                return
            await self.head.put(Chunk(data, loop.time()))

    async def _write(self) -> None:
        try:
            while True:
                item = await self.tail.get()
                if isinstance(item, Chunk):
                    if item.data:
                        self._writer.write(item.data)
                        await self._writer.drain()
                    continue
                if item is End.RESET:
                    self.conn.reset()
                else:
                    self._writer.close()  # dest.Close(): the other link notices and ends next
                return
        except OSError:
            self.conn.abort()  # the destination is gone: nothing more can be delivered
        finally:
            self.done = True
            self.conn.link_done()


class Connection:
    """One accepted client and its upstream connection."""

    def __init__(self, proxy: Proxy, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter], rng: random.Random) -> None:
        self._proxy = proxy
        self._writers = (client[1], upstream[1])
        self.closed = False
        self.links = {
            UPSTREAM: Link(self, UPSTREAM, client[0], upstream[1], proxy.chain[UPSTREAM], rng),
            DOWNSTREAM: Link(self, DOWNSTREAM, upstream[0], client[1], proxy.chain[DOWNSTREAM], rng),
        }

    def start(self) -> None:
        for link in self.links.values():
            link.start()

    def link_done(self) -> None:
        if all(link.done for link in self.links.values()):
            self.close()

    def reset(self) -> None:
        """Close both sockets with an RST (SO_LINGER 0), as reset_peer does."""
        for writer in self._writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self.close()

    def abort(self) -> None:
        """Close both sockets now, dropping anything not yet written (proxy disabled, errors)."""
        for writer in self._writers:
            writer.transport.abort()
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for link in self.links.values():
            link.cancel()
        for writer in self._writers:
            writer.close()  # no-op for a transport that is already closing
        self._proxy.forget(self)


# --- the proxy --------------------------------------------------------------------------------

class Proxy:
    """A named listener forwarding to ``upstream`` through its toxic chain."""

    def __init__(self, name: str, listen: str, upstream: str, rng: random.Random) -> None:
        self.name = name
        self.listen = listen
        self.upstream = upstream
        self.enabled = False
        self.chain: dict[str, list[Toxic]] = {direction: [] for direction in DIRECTIONS}
        self._rng = rng
        self._server: asyncio.Server | None = None
        self._connections: set[Connection] = set()
        self._dialing: set[asyncio.Task[Any]] = set()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "listen": self.listen, "upstream": self.upstream,
                "enabled": self.enabled, "toxics": [toxic.to_json() for toxic in self.toxics()]}

    def toxics(self) -> list[Toxic]:
        return [toxic for direction in DIRECTIONS for toxic in self.chain[direction]]

    def find_toxic(self, name: str) -> Toxic | None:
        return next((toxic for toxic in self.toxics() if toxic.name == name), None)

    def connections(self) -> list[Connection]:
        """The open connections (for inspection; the proxy owns them)."""
        return list(self._connections)

    async def start(self) -> None:
        """Listen (again) on ``listen``; the actual address (port 0 -> real port) is kept."""
        if self.enabled:
            return
        sock = await bind_listener(self.listen)
        self._server = await asyncio.start_server(self._accept, sock=sock)
        self.listen = format_sockaddr(sock.getsockname())
        self.enabled = True
        log.info("proxy %s listening on %s -> %s", self.name, self.listen, self.upstream)

    def stop(self) -> None:
        """Stop listening and drop every connection (the proxy's toxics stay)."""
        if not self.enabled:
            return
        self.enabled = False
        if self._server is not None:
            self._server.close()  # closes the listening socket now: new connects are refused
            self._server = None
        for task in list(self._dialing):
            task.cancel()
        for conn in list(self._connections):
            conn.abort()
        log.info("proxy %s stopped", self.name)

    async def update(self, listen: str, upstream: str, enabled: bool) -> None:
        """Go's Proxy.Update: a new address restarts the proxy, then apply ``enabled``."""
        if await canonical_address(listen) != self.listen or upstream != self.upstream:
            self.stop()
            self.listen, self.upstream = listen, upstream
        if enabled and not self.enabled:
            await self.start()
        elif not enabled:
            self.stop()

    def forget(self, conn: Connection) -> None:
        self._connections.discard(conn)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = self._server
        task = asyncio.current_task()
        assert task is not None
        self._dialing.add(task)
        try:
            host, port = split_host_port(self.upstream)
            upstream = await asyncio.open_connection(host, port)
        except asyncio.CancelledError:
            writer.transport.abort()  # the proxy was disabled while dialling
            return
        except (OSError, ValueError) as exc:
            log.warning("proxy %s: unable to open connection to upstream %s: %s", self.name, self.upstream, exc)
            writer.close()
            return
        finally:
            self._dialing.discard(task)
        if self._server is not server or not self.enabled:
            writer.transport.abort()   # disabled (or restarted) while the dial was in flight
            upstream[1].transport.abort()
            return
        log.debug("proxy %s: accepted client %s", self.name, writer.get_extra_info("peername"))
        conn = Connection(self, (reader, writer), upstream, self._rng)
        self._connections.add(conn)
        conn.start()

    # Toxic changes. The API serialises them; each link is changed in turn.

    def _links(self, direction: str) -> list[Link]:
        return [conn.links[direction] for conn in self.connections() if not conn.closed]

    def add_toxic(self, toxic: Toxic) -> None:
        self.chain[toxic.direction].append(toxic)
        for link in self._links(toxic.direction):
            link.add(toxic)

    async def update_toxic(self, toxic: Toxic) -> None:
        for link in self._links(toxic.direction):
            await link.update(toxic)

    async def remove_toxic(self, toxic: Toxic) -> None:
        # Out of the chain first, so that a connection accepted meanwhile never gets it.
        self.chain[toxic.direction].remove(toxic)
        for link in self._links(toxic.direction):
            await link.remove(toxic)

    async def reset_toxics(self) -> None:
        for direction in DIRECTIONS:
            while self.chain[direction]:
                await self.remove_toxic(self.chain[direction][0])
