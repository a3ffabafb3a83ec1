"""Real node processes on loopback, for tests, the chaos suite and the benchmark.

`LocalCluster` starts `python -m raftq.cluster` once per node with its own data directory and log file,
and offers the faults a test needs: SIGKILL, SIGSTOP/SIGCONT, restart. Every wait polls with a
deadline; a timeout says what it waited for and what it saw.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence


#: Where free_ports looks, when nothing narrows it: from here up to the kernel's ephemeral range.
PORT_BAND_START = 10_000
#: "LO-HI": the ports free_ports may hand out in this process tree. A parallel test runner gives
#: each of its workers a band of its own (tests/conftest.py), so no two can pick the same port.
PORT_RANGE_ENV = "RAFTQ_PORT_RANGE"


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def port_band() -> range:
    """The ports free_ports may hand out (PORT_RANGE_ENV, else below the ephemeral range)."""
    configured = os.environ.get(PORT_RANGE_ENV)
    if configured:
        low, _, high = configured.partition("-")
        return range(int(low), int(high) + 1)
    return range(PORT_BAND_START, max(_ephemeral_start(), PORT_BAND_START + 1_000))


_port_cursor: dict[range, int] = {}


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now, for nodes and proxies to listen on.

    They come from below the kernel's ephemeral range: a port handed out by bind(0) can be taken
    by the source port of any outgoing connection between this call and the node's bind (or
    while a killed node is down, before its restart), and on a busy test machine that happened.
    Each process walks its band from a random start and never hands out a port twice until it
    wraps; a port something listens on (or has connections on) fails the test bind and is skipped.
    """
    band = port_band()
    cursor = _port_cursor.get(band)
    if cursor is None:
        cursor = secrets.randbelow(len(band))
    ports: list[int] = []
    for _ in range(len(band)):
        port = band[cursor]
        cursor = (cursor + 1) % len(band)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            _port_cursor[band] = cursor
            return ports
    raise RuntimeError(f"fewer than {count} free ports in {band.start}-{band.stop - 1}")


def http_json(url: str, *, method: str = "GET", body: object = None, timeout: float = 2.0,
              headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    """One JSON request with the standard library; returns (status, body); raises OSError when down.

    `context` verifies https:// nodes (see `LocalCluster.ssl_context`).
    """
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", "Accept": "application/json", **(headers or {})})
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw) if raw else {}
        except ValueError:
            return exc.code, {"raw": raw.decode(errors="replace")}


def metric_value(url: str, name: str) -> float:
    """One unlabelled series from a node's /metrics (`name`, or `name_total` for a counter)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{name}(?:_total)? (\S+)$", text, re.MULTILINE)
    assert match, f"no {name} in {url}/metrics"
    return float(match.group(1))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # let the caller see the 307
        return None


def ensure_secret_file(path: str) -> str:
    """Creates a random cluster secret at path (mode 0600) unless one is there; returns path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path


def wait_until(predicate: Callable[[], object], *, timeout_s: float, what: str,
               seen: Callable[[], object] | None = None, interval_s: float = 0.05) -> object:
    """Polls predicate until it returns something truthy; raises TimeoutError naming what and seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"; last seen: {seen()!r}" if seen is not None else ""
            raise TimeoutError(f"waited {timeout_s:g} s for {what}{detail}")
        time.sleep(interval_s)


@dataclass
class NodeProcess:
    node_id: str
    port: int
    data_dir: str
    log_path: str
    args: list[str]
    process: subprocess.Popen | None = None
    paused: bool = False
    scheme: str = "http"
    #: Extra environment for this node only (e.g. libfaketime's for a node with a wrong clock).
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class LocalCluster:
    """Nodes n1..nN as real processes. Use as a context manager; stop() kills what is left."""

    base_dir: str
    size: int = 3
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, NodeProcess] = field(default_factory=dict)
    #: A client bearer token: the nodes start with it (RAFTQ_TOKEN in their environment, never on
    #: the command line), and `status()` and the waits built on it present it.
    token: str | None = None
    #: A directory made by deploy/make-certs.sh: the nodes serve TLS only, with n1.pem ... as their
    #: certificates, and require each other's (mutual TLS on /raft). None: plain HTTP.
    tls_dir: str | None = None

    #: (source id, target id, target port) -> the URL the source uses to reach the target; the
    #: chaos suite routes each directed peer link through its own proxy with it.
    peer_url: Callable[[str, str, int], str] | None = None

    def __post_init__(self) -> None:
        if self.token:
            self.env = {**self.env, "RAFTQ_TOKEN": self.token}
        # Peers always authenticate (SPEC Security): every node of this cluster reads one secret file.
        self.secret_path = os.path.join(self.base_dir, "cluster-secret")
        ports = free_ports(self.size)
        ids = [f"n{i + 1}" for i in range(self.size)]
        self.ports = dict(zip(ids, ports))
        scheme = "https" if self.tls_dir else "http"
        route = self.peer_url or (lambda source, target, port: f"{scheme}://127.0.0.1:{port}")
        for node_id, port in zip(ids, ports):
            peers = ",".join(f"{other}={route(node_id, other, p)}" for other, p in zip(ids, ports) if other != node_id)
            data_dir = os.path.join(self.base_dir, node_id)
            public = ",".join(f"{other}={scheme}://127.0.0.1:{p}" for other, p in zip(ids, ports) if other != node_id)
            args = [sys.executable, "-m", "raftq.cluster", "--id", node_id, "--port", str(port),
                    "--data-dir", data_dir, "--peers", peers, "--public-urls", public,
                    "--cluster-secret-file", self.secret_path, *self.extra_args]
            if self.tls_dir:
                args += ["--tls-cert", os.path.join(self.tls_dir, f"{node_id}.pem"),
                         "--tls-key", os.path.join(self.tls_dir, f"{node_id}.key"),
                         "--tls-ca", os.path.join(self.tls_dir, "ca.pem"), "--tls-peer-certs"]
            self.nodes[node_id] = NodeProcess(node_id, port, data_dir, os.path.join(self.base_dir, f"{node_id}.log"),
                                              args, scheme=scheme)

    def __enter__(self) -> "LocalCluster":
        try:
            self.start()
        except BaseException:
            self.stop()  # __exit__ does not run when __enter__ raises
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes.values()]

    @property
    def secret(self) -> str:
        with open(self.secret_path, encoding="utf-8") as f:
            return f.read().strip()

    def start(self, *, wait: bool = True) -> None:
        os.makedirs(self.base_dir, exist_ok=True)
        ensure_secret_file(self.secret_path)
        for node_id in self.nodes:
            self.start_node(node_id)
        if wait:
            self.wait_answering()
            self.wait_for_leader()

    def wait_answering(self, timeout_s: float = 30.0) -> None:
        """Waits until every started node answers; a node that exited meanwhile (a port taken, a
        bad flag) fails the wait at once with the end of its log, rather than leaving a cluster
        one node short for whatever runs next."""
        def answering() -> bool:
            for node_id, node in self.nodes.items():
                if node.process is not None and node.process.poll() is not None:
                    tail = "".join(self.log_text(node_id).splitlines(keepends=True)[-15:])
                    raise RuntimeError(f"{node_id} exited with {node.process.returncode} while starting; "
                                       f"the end of its log:\n{tail}")
            return all(self.status(node_id) is not None for node_id, node in self.nodes.items()
                       if node.process is not None)

        wait_until(answering, timeout_s=timeout_s, what="every started node to answer", seen=self._roles)

    def start_node(self, node_id: str) -> None:
        node = self.nodes[node_id]
        assert not node.alive, f"{node_id} is already running"
        log = open(node.log_path, "ab")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), **self.env, **node.env}
        node.process = subprocess.Popen(node.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        node.paused = False
        log.close()

    def add_joining_node(self, node_id: str) -> NodeProcess:
        """A new node, started empty with `--join` (nobody's member until `POST
        /v1/cluster/members` adds it); not started yet: `start_node(node_id)` starts it."""
        assert node_id not in self.nodes, f"{node_id} exists"
        template = next(iter(self.nodes.values()))
        (port,) = free_ports(1)
        data_dir = os.path.join(self.base_dir, node_id)
        args = [sys.executable, "-m", "raftq.cluster", "--id", node_id, "--port", str(port), "--data-dir", data_dir,
                "--join", template.url, "--cluster-secret-file", self.secret_path, *self.extra_args]
        if self.tls_dir:
            args += ["--tls-cert", os.path.join(self.tls_dir, f"{node_id}.pem"),
                     "--tls-key", os.path.join(self.tls_dir, f"{node_id}.key"),
                     "--tls-ca", os.path.join(self.tls_dir, "ca.pem"), "--tls-peer-certs"]
        self.ports[node_id] = port
        node = NodeProcess(node_id, port, data_dir, os.path.join(self.base_dir, f"{node_id}.log"), args,
                           scheme=template.scheme)
        self.nodes[node_id] = node
        return node

    def kill(self, node_id: str) -> None:
        """SIGKILL: no shutdown code runs; unsynced page cache survives (this is not a power cut)."""
        node = self.nodes[node_id]
        if node.process is not None and node.alive:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(timeout=10)
        node.paused = False

    def terminate(self, node_id: str, timeout_s: float = 15.0) -> None:
        node = self.nodes[node_id]
        if node.process is not None and node.alive:
            if node.paused:
                node.process.send_signal(signal.SIGCONT)
            node.process.terminate()
            try:
                node.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=10)

    def pause(self, node_id: str) -> None:
        node = self.nodes[node_id]
        assert node.process is not None
        node.process.send_signal(signal.SIGSTOP)
        node.paused = True

    def resume(self, node_id: str) -> None:
        node = self.nodes[node_id]
        assert node.process is not None
        node.process.send_signal(signal.SIGCONT)
        node.paused = False

    def restart(self, node_id: str) -> None:
        self.kill(node_id)
        self.start_node(node_id)

    def stop(self) -> None:
        for node_id in self.nodes:
            self.terminate(node_id)

    @property
    def ca_file(self) -> str | None:
        return os.path.join(self.tls_dir, "ca.pem") if self.tls_dir else None

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """Verifies the nodes' certificates against the cluster's CA (None without TLS)."""
        return ssl.create_default_context(cafile=self.ca_file) if self.tls_dir else None

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token is not None else {}

    def status(self, node_id: str, *, with_digest: bool = False) -> dict | None:
        node = self.nodes[node_id]
        if not node.alive or node.paused:
            return None
        try:
            # A digest hashes the whole state: seconds at a few hundred thousand jobs.
            status, body = http_json(node.url + "/v1/cluster" + ("?digest=1" if with_digest else ""),
                                     timeout=30.0 if with_digest else 2.0,
                                     headers=self.auth_headers, context=self.ssl_context)
        except OSError:
            return None
        return body if status == 200 else None

    def statuses(self, *, with_digest: bool = False) -> dict[str, dict | None]:
        """Every node's status, asked of all nodes at once: the leader commits a clock tick every
        election timeout, so digests asked one after the other (each hashing the whole state)
        would rarely see the nodes at one applied index."""
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            answers = {node_id: pool.submit(self.status, node_id, with_digest=with_digest) for node_id in self.nodes}
            return {node_id: answer.result() for node_id, answer in answers.items()}

    def leader(self) -> str | None:
        """The node that says it leads (and serves), when exactly one live node does."""
        leaders = [s["node"] for s in self.statuses().values() if s and s.get("role") == "leader" and s.get("serving")]
        return leaders[0] if len(leaders) == 1 else None

    def wait_for_leader(self, timeout_s: float = 30.0, *, exclude: str | None = None) -> str:
        def found() -> str | None:
            leader = self.leader()
            return leader if leader and leader != exclude else None

        return wait_until(found, timeout_s=timeout_s, what="one leader", seen=self._roles)  # type: ignore[return-value]

    def move_leader_to(self, node_id: str, timeout_s: float = 90.0) -> None:
        """Makes `node_id` the leader: pauses whoever else leads until another node wins, and again.

        Each round the paused leader's followers hold an election that `node_id` may win; the
        paused node resumes, hears the higher term and steps down. Returns once `node_id` leads.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            leader = self.wait_for_leader(max(1.0, deadline - time.monotonic()))
            if leader == node_id:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"waited {timeout_s:g} s for {node_id} to lead; {leader} leads")
            self.pause(leader)
            try:
                self.wait_for_leader(max(1.0, deadline - time.monotonic()), exclude=leader)
            finally:
                self.resume(leader)

    def _roles(self) -> dict:
        return {k: (s["role"], s["term"]) if s else None for k, s in self.statuses().items()}

    def wait_converged(self, timeout_s: float = 60.0) -> dict[str, str]:
        """Waits until every live node applied the same index with the same state digest."""
        def converged() -> dict[str, str] | None:
            live_count = sum(1 for n in self.nodes.values() if n.alive and not n.paused)
            # Digests only once the applied indexes agree: each one hashes the whole state.
            views = {k: s for k, s in self.statuses().items() if s is not None}
            if len(views) != live_count or len({s["applied_index"] for s in views.values()}) != 1:
                return None
            views = {k: s for k, s in self.statuses(with_digest=True).items() if s is not None}
            if len(views) != live_count:
                return None
            applied = {s["applied_index"] for s in views.values()}
            digests = {s["digest"] for s in views.values()}
            if len(applied) == 1 and len(digests) == 1:
                return {k: s["digest"] for k, s in views.items()}
            return None

        def seen() -> dict:
            return {k: (s["applied_index"], s["digest"][:12]) if s else None
                    for k, s in self.statuses(with_digest=True).items()}

        return wait_until(converged, timeout_s=timeout_s, what="equal applied index and digest", seen=seen)  # type: ignore[return-value]

    def log_text(self, node_id: str) -> str:
        with open(self.nodes[node_id].log_path, "rb") as f:
            return f.read().decode(errors="replace")
