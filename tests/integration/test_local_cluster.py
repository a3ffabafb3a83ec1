"""The harness every real-process test stands on: the ports it picks, and a node that cannot start."""

from __future__ import annotations

import socket

import pytest

from raftq.cluster import localcluster
from raftq.cluster.localcluster import PORT_RANGE_ENV, LocalCluster, free_ports


def test_free_ports_come_from_below_the_kernels_ephemeral_range_and_do_not_repeat():
    ephemeral_start = localcluster._ephemeral_start()
    first, second = free_ports(5), free_ports(5)
    assert all(port < ephemeral_start for port in first + second), (first, second, ephemeral_start)
    assert len(set(first + second)) == 10, (first, second)


def test_free_ports_skips_a_port_something_listens_on(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv(PORT_RANGE_ENV, f"{port}-{port + 1}")
        with socket.socket() as neighbour:
            try:
                neighbour.bind(("127.0.0.1", port + 1))
            except OSError:
                pytest.skip(f"port {port + 1} is in use here")
        assert free_ports(1) == [port + 1]
        with pytest.raises(RuntimeError, match="fewer than 2 free ports"):
            free_ports(2)


def test_a_node_that_cannot_bind_its_port_fails_the_start_with_its_log(tmp_path):
    cluster = LocalCluster(str(tmp_path / "cluster"), size=3)
    try:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", cluster.ports["n2"]))
            squatter.listen()
            with pytest.raises(RuntimeError) as failure:
                cluster.start()
    finally:
        cluster.stop()
    message = str(failure.value)
    assert "n2 exited" in message and "while starting" in message, message
