"""Hosts on one machine: Linux network namespaces joined by a bridge, one address each.

Theory of operation
-------------------
Each "host" is a network namespace with its own loopback and one veth interface whose other end
is enslaved to a bridge in the root namespace; the bridge carries no address, so the root
namespace (and whatever else runs on this machine) cannot reach the hosts, and the hosts reach
nothing but each other. A process started with `HostNetwork.popen(host, argv)` runs under
`ip netns exec`, so its sockets live in that host: its 127.0.0.1 is its own, and the only way to
another host is the other host's bridge address. Software that quietly assumes loopback (a URL
built from 127.0.0.1, a redirect to it) fails there instead of working by accident.

Names are the caller's prefix plus a short random tag, so that two runs at once never share a
namespace or a bridge; interface names stay within the kernel's 15 characters. `close()` kills
every process started here, then deletes the namespaces (which deletes their veth ends, and so
the peers) and the bridge; it runs even when setup failed half-way and never raises.

Needs root and the `ip` command (Debian's iproute2); `unavailable_reason()` says why not, and
installs iproute2 with apt-get when it is only missing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Sequence
from raftq.chaos import debian_packages

#: Environment variable whose value starts every namespace and bridge name (default "rq").
PREFIX_ENV = "RAFTQ_NETNS_PREFIX"
_IFNAME_CHARS_MAX = 15
#: The hosts' subnet; it exists only on the bridge, which the root namespace has no address on.
_SUBNET = "10.213.0"


def unavailable_reason() -> str | None:
    """None when network namespaces can be made here; otherwise why not (the skip reason)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    failure = debian_packages.install("iproute2", present=lambda: shutil.which("ip") is not None)
    if failure:
        return failure
    probe = f"{_prefix()}{secrets.token_hex(3)}p"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"this kernel or container does not allow network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _prefix() -> str:
    return os.environ.get(PREFIX_ENV, "rq")[:6]


def _ip(*args: str, namespace: str | None = None) -> None:
    argv = ["ip", *(["-n", namespace] if namespace else []), *args]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


@dataclass
class HostNetwork:
    """Named hosts on one bridge. Use as a context manager; `close()` removes everything."""

    host_names: Sequence[str]
    tag: str = field(default_factory=lambda: _prefix() + secrets.token_hex(3))
    addresses: dict[str, str] = field(default_factory=dict)
    namespaces: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert len(self.tag) + 4 <= _IFNAME_CHARS_MAX, self.tag
        assert len(self.host_names) < 250

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    def __enter__(self) -> "HostNetwork":
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for number, host in enumerate(self.host_names, start=1):
            namespace = f"{self.tag}{host}"[:_IFNAME_CHARS_MAX]
            _ip("netns", "add", namespace)
            self.namespaces[host] = namespace
            outside, inside = f"{self.tag}v{number}", f"{self.tag}h{number}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", namespace)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            address = f"{_SUBNET}.{number}"
            _ip("addr", "add", f"{address}/24", "dev", inside, namespace=namespace)
            _ip("link", "set", inside, "up", namespace=namespace)
            _ip("link", "set", "lo", "up", namespace=namespace)
            self.addresses[host] = address

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """argv run inside `host`."""
        return ["ip", "netns", "exec", self.namespaces[host], *argv]

    def popen(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Starts argv inside `host` (`ip netns exec` execs it: the Popen's pid is argv's own)."""
        process = subprocess.Popen(self.command(host, argv), **kwargs)
        self.processes.append(process)
        return process

    def run(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv), **kwargs)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)
        for namespace in self.namespaces.values():
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        # Deleting a namespace deletes the veth end inside it and so its peer; an end not moved
        # yet (setup failed half-way) goes by name, and the bridge is ours.
        for number in range(1, len(self.host_names) + 1):
            if os.path.exists(f"/sys/class/net/{self.tag}v{number}"):
                subprocess.run(["ip", "link", "delete", f"{self.tag}v{number}"], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        self.namespaces.clear()
