"""Real node processes behind one Toxiproxy proxy per directed link.

Theory of operation
-------------------
Every network fault of the chaos suite is a change to a proxy, so the topology gives every
directed path its own one (REPLICATION.md §5.1):

    peer_<a>_<b>   node a reaches node b only through it (a's request and b's reply share its
                   connection: "upstream" is a -> b, "downstream" is b -> a)
    client_<a>     clients (producers, workers) reach node a only through it; the nodes also
                   redirect clients to these addresses (their public URLs), so no client traffic
                   bypasses the proxies after a redirect.

That makes cuts symmetric (disable both peer_a_b and peer_b_a), one-way (a timeout toxic on the
stream of one direction), clean (disabled: connections refused) or black holes (timeout 0: bytes
vanish, connections hang).

The nemesis talks to the proxies through `FaultProxy`, a five-call interface. `ToxiproxyFaults`
implements it with toxiproxy-python against any Toxiproxy-API server: the real `toxiproxy-server`
when one is on PATH or named by `RAFTQ_TOXIPROXY_SERVER`, else the project's asyncio server
(`chaos.toxiproxy`). An in-process proxy could implement the same five calls.

Nodes optionally run under `chaos.fsync_marker` (the node's own entry point plus a test-only
hook that records how much of each WAL segment has been fsynced), so the nemesis can cut the
WAL back to what was durable before a restart ("lose unsynced writes").
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import urllib.request
from typing import Protocol

from raftq.chaos import data_disks
from raftq.cluster.localcluster import LocalCluster, free_ports, wait_until

log = logging.getLogger("chaos.topology")

#: Environment variable naming a real toxiproxy-server binary to use instead of the project's.
TOXIPROXY_SERVER_ENV = "RAFTQ_TOXIPROXY_SERVER"


class FaultProxy(Protocol):
    """What the nemesis needs from a proxy layer (the five calls it makes)."""

    def disable(self, proxy: str) -> None: ...

    def enable(self, proxy: str) -> None: ...

    def add_toxic(self, proxy: str, toxic: str, kind: str, stream: str, attributes: dict,
                  toxicity: float = 1.0) -> None: ...

    def remove_toxic(self, proxy: str, toxic: str) -> None: ...

    def reset(self) -> None: ...


# ---------------------------------------------------------------------------- the server


class ToxiproxyServerHandle:
    """A running Toxiproxy-API server: a real `toxiproxy-server` or `python -m raftq.chaos.toxiproxy`."""

    def __init__(self, host: str, port: int, stop, kind: str) -> None:
        self.host = host
        self.port = port
        self._stop = stop
        self.kind = kind  #: "toxiproxy-server <path>" or "chaos.toxiproxy"

    @classmethod
    def start(cls, log_path: str, host: str = "127.0.0.1", timeout_s: float = 30.0) -> "ToxiproxyServerHandle":
        binary = os.environ.get(TOXIPROXY_SERVER_ENV) or shutil.which("toxiproxy-server")
        if binary:
            (port,) = free_ports(1)
            out = open(log_path, "ab")
            proc = subprocess.Popen([binary, "-host", host, "-port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            out.close()

            def up() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"{binary} exited with {proc.returncode}; see {log_path}")
                try:
                    with urllib.request.urlopen(f"http://{host}:{port}/version", timeout=1.0):
                        return True
                except OSError:
                    return False

            def stop() -> None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

            try:
                wait_until(up, timeout_s=timeout_s, what=f"{binary} to answer on {host}:{port}")
            except BaseException:
                stop()
                raise
            return cls(host, port, stop, f"toxiproxy-server {binary}")
        from raftq.chaos.toxiproxy import ToxiproxyProcess

        # The project's server logs to the stderr it inherits; point fd 2 at the run's log file
        # while it is spawned, so its warnings (refused upstreams during kills) land there.
        saved_stderr = os.dup(2)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.dup2(log_fd, 2)
            process = ToxiproxyProcess.start(host, 0, timeout_s=timeout_s)
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
            os.close(log_fd)
        return cls(process.host, process.port, process.stop, "chaos.toxiproxy")

    def stop(self) -> None:
        self._stop()


class ToxiproxyFaults:
    """`FaultProxy` over toxiproxy-python (the only way the suite talks to the server)."""

    def __init__(self, host: str, port: int) -> None:
        from toxiproxy import Toxiproxy

        self.api = Toxiproxy()
        self.api.update_api_consumer(host, port)
        self._proxies: dict = {}

    def create(self, name: str, listen: str, upstream: str) -> None:
        self._proxies[name] = self.api.create(upstream=upstream, name=name, listen=listen, enabled=True)

    def _proxy(self, name: str):
        proxy = self._proxies.get(name)
        if proxy is None:
            proxy = self._proxies[name] = self.api.get_proxy(name)
        return proxy

    def disable(self, proxy: str) -> None:
        self._proxy(proxy).disable()

    def enable(self, proxy: str) -> None:
        self._proxy(proxy).enable()

    def add_toxic(self, proxy: str, toxic: str, kind: str, stream: str, attributes: dict,
                  toxicity: float = 1.0) -> None:
        self._proxy(proxy).add_toxic(name=toxic, type=kind, stream=stream, attributes=attributes, toxicity=toxicity)

    def remove_toxic(self, proxy: str, toxic: str) -> None:
        self._proxy(proxy).destroy_toxic(toxic)

    def reset(self) -> None:
        self.api.reset()

    def version(self) -> str:
        raw = self.api.version()
        return raw.decode(errors="replace").strip() if raw else "?"


# ---------------------------------------------------------------------------- the topology


def peer_proxy(source: str, target: str) -> str:
    return f"peer_{source}_{target}"


def client_proxy(node_id: str) -> str:
    return f"client_{node_id}"


class Topology:
    """A LocalCluster whose every peer link and client path runs through its own proxy.

    Build it, then `start()`; `stop()` stops the nodes (the Toxiproxy server is the caller's).
    """

    def __init__(self, base_dir: str, faults: ToxiproxyFaults, *, size: int = 3, node_args: tuple[str, ...] = (),
                 fsync_marker: bool = False, data_disks: bool = False) -> None:
        self.faults = faults
        self.base_dir = base_dir
        #: each node's data directory on a small filesystem of its own (chaos.data_disks)
        self.data_disks = data_disks
        self._mounted: list[str] = []
        self.size = size
        ids = [f"n{i + 1}" for i in range(size)]
        pairs = [(a, b) for a in ids for b in ids if a != b]
        ports = iter(free_ports(len(pairs) + size))
        self.peer_ports = {pair: next(ports) for pair in pairs}
        self.client_ports = {node_id: next(ports) for node_id in ids}
        self.cluster = LocalCluster(
            base_dir, size=size, extra_args=list(node_args),
            peer_url=lambda source, target, _port: f"http://127.0.0.1:{self.peer_ports[(source, target)]}")
        self.node_ids = ids
        for node_id, node in self.cluster.nodes.items():
            args = node.args
            # Redirects and /v1/cluster send clients to the client proxies, not the direct ports.
            public = ",".join(f"{other}={self.client_url(other)}" for other in ids if other != node_id)
            args[args.index("--public-urls") + 1] = public
            if fsync_marker:  # same flags, run through the test-only WAL hook
                args[args.index("-m") + 1] = "raftq.chaos.fsync_marker"
        self.fsync_marker = fsync_marker

    def client_url(self, node_id: str) -> str:
        return f"http://127.0.0.1:{self.client_ports[node_id]}"

    @property
    def client_urls(self) -> list[str]:
        return [self.client_url(node_id) for node_id in self.node_ids]

    @property
    def peer_proxies(self) -> list[str]:
        return [peer_proxy(a, b) for a, b in self.peer_ports]

    @property
    def client_proxies(self) -> list[str]:
        return [client_proxy(node_id) for node_id in self.node_ids]

    def links_of(self, node_id: str) -> list[str]:
        """Every peer proxy touching node_id, both directions."""
        return [peer_proxy(a, b) for a, b in self.peer_ports if node_id in (a, b)]

    def links_between(self, group_a: list[str], group_b: list[str]) -> list[str]:
        """Every peer proxy from a node of one group to a node of the other, both directions."""
        return [peer_proxy(a, b) for a, b in self.peer_ports
                if (a in group_a and b in group_b) or (a in group_b and b in group_a)]

    def start(self, timeout_s: float = 60.0) -> str:
        """Creates the proxies, starts the nodes and returns the first leader's id."""
        ports = self.cluster.ports
        for (source, target), listen in self.peer_ports.items():
            self.faults.create(peer_proxy(source, target), f"127.0.0.1:{listen}", f"127.0.0.1:{ports[target]}")
        for node_id, listen in self.client_ports.items():
            self.faults.create(client_proxy(node_id), f"127.0.0.1:{listen}", f"127.0.0.1:{ports[node_id]}")
        if self.data_disks:
            for node_id, node in self.cluster.nodes.items():
                data_disks.mount(node.data_dir, os.path.join(self.base_dir, f"{node_id}-disk.img"))
                self._mounted.append(node.data_dir)
        self.cluster.start(wait=False)
        self.cluster.wait_answering(timeout_s)
        return self.cluster.wait_for_leader(timeout_s)

    def stop(self) -> None:
        self.cluster.stop()
        while self._mounted:
            data_disks.unmount(self._mounted.pop())

    def wal_dir(self, node_id: str) -> str:
        return os.path.join(self.cluster.nodes[node_id].data_dir, "wal")


def python_env() -> dict[str, str]:
    """Environment for child processes of the suite (workers): the repository on PYTHONPATH."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}

