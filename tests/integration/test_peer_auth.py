"""Peers authenticate (SPEC "Security"): /raft refuses anyone without the cluster secret.

Each attack is the one issue 11 found working against a cluster started the documented way: a
forged heartbeat "from n2" at term+100, the same as a browser would send it (text/plain, an
Origin), and a chunk of a "10^18-byte snapshot". Afterwards the term has not moved, the three
state digests are equal and no part file was written.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import subprocess
import sys
import time
import urllib.request

import aiohttp

from raftq.cluster.localcluster import free_ports, http_json
from raftq.cluster.raft.codec import encode_messages
from raftq.cluster.raft.messages import Message, MessageType
from raftq.cluster.snapshot_transfer import FROM_HEADER, OFFSET_HEADER, SNAPSHOT_HEADER, TERM_HEADER
from raftq.cluster.transport.http import SECRET_HEADER, STREAM_PATH
from raftq.protocol import BODY_BYTES_MAX


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def open_stream(url: str, headers: dict[str, str], frames: list[bytes] = ()) -> tuple[int, int | None]:
    """Opens a peer stream and sends frames; returns (HTTP status, close code the node sent)."""
    async def run() -> tuple[int, int | None]:
        async with aiohttp.ClientSession() as session:
            try:
                ws = await session.ws_connect(url + STREAM_PATH, headers=headers, timeout=aiohttp.ClientWSTimeout(ws_close=10))
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status, None
            for frame in frames:
                await ws.send_bytes(frame)
            closed = await ws.receive(timeout=10) if frames else None
            await ws.close()
            return 101, (ws.close_code if closed is not None and closed.type is aiohttp.WSMsgType.CLOSE else None)
    return asyncio.run(run())


def forged_heartbeat(leader: str, term: int) -> bytes:
    sender = "n2" if leader != "n2" else "n1"
    return encode_messages([Message(MessageType.HEARTBEAT, sender, leader, term + 100, commit=10**6)])


def test_raft_paths_refuse_requests_without_the_secret_and_nothing_moves(three_nodes):
    cluster = three_nodes
    leader = cluster.wait_for_leader()
    url = cluster.nodes[leader].url
    status, body = http_json(url + "/v1/queues/q/jobs", method="POST", body={"jobs": [{"payload": 1}]})
    assert status == 201, body
    before = cluster.wait_converged()
    term = cluster.status(leader)["term"]
    heartbeat = forged_heartbeat(leader, term)
    msgpack_type = {"Content-Type": "application/msgpack"}
    snapshot = {"Content-Type": "application/octet-stream", FROM_HEADER: leader,
                TERM_HEADER: str(term + 100), OFFSET_HEADER: "0", SNAPSHOT_HEADER: f"5-1-{10**18}-{'a' * 64}"}
    attacks = [
        ("forged heartbeat, no secret", "/raft/messages", heartbeat, msgpack_type, 401),
        ("forged heartbeat, wrong secret", "/raft/messages", heartbeat, {**msgpack_type, SECRET_HEADER: "x" * 43}, 403),
        ("forged heartbeat as a web page sends it", "/raft/messages", heartbeat,
         {"Content-Type": "text/plain", "Origin": "http://evil.example"}, 401),
        ("snapshot chunk, no secret", "/raft/snapshot", b"\0" * (1 << 20), snapshot, 401),
        ("snapshot chunk, wrong secret", "/raft/snapshot", b"\0" * (1 << 20), {**snapshot, SECRET_HEADER: "nope"}, 403),
    ]
    seen = {name: post(cluster.nodes[node_id].url + path, body, headers)
            for name, path, body, headers, _ in attacks for node_id in cluster.nodes}
    assert seen == {name: expected for name, *_, expected in attacks}
    # With the secret, the content type is still checked and the declared size is bounded.
    secret = {SECRET_HEADER: cluster.secret}
    assert post(url + "/raft/messages", heartbeat, {"Content-Type": "text/plain", **secret}) == 415
    follower = next(n for n in cluster.nodes if n != leader)
    assert post(cluster.nodes[follower].url + "/raft/snapshot", b"\0" * 1024, {**snapshot, **secret}) == 413

    # The peer stream (a WebSocket upgrade) is refused the same way before the upgrade; a web page
    # (which always sends Origin) is refused even with the secret; a peer's bad frame closes it.
    stream = {name: open_stream(url, headers, [heartbeat]) for name, headers in [
        ("no secret", {}), ("wrong secret", {SECRET_HEADER: "x" * 43}),
        ("web page with the secret", {**secret, "Origin": "http://evil.example"})]}
    assert stream == {"no secret": (401, None), "wrong secret": (403, None),
                      "web page with the secret": (403, None)}, stream
    assert open_stream(url, secret, [b"\xc1 not msgpack"]) == (101, aiohttp.WSCloseCode.INVALID_TEXT)
    # A frame over the body limit: the node's reader fails; it closes the stream and says why.
    with contextlib.suppress(ConnectionError):  # closed while the frame is still being sent
        open_stream(url, secret, [b"\0" * (BODY_BYTES_MAX + 1)])
    deadline = time.monotonic() + 10
    while "closing the raft stream from '?': Message size" not in cluster.log_text(leader):
        assert time.monotonic() < deadline, "the node did not log why it closed the stream"
        time.sleep(0.05)  # polling the log with a deadline

    after = cluster.wait_converged()
    assert after == before, f"digests moved: {before} -> {after}"
    assert cluster.status(leader)["term"] == term, "a refused message moved the term"
    parts = glob.glob(os.path.join(cluster.base_dir, "*", "**", "incoming-*"), recursive=True)
    assert parts == [], f"a refused snapshot chunk left files: {parts}"


def test_a_node_with_peers_does_not_start_without_a_secret(tmp_path):
    port, peer = free_ports(2)
    args = [sys.executable, "-m", "raftq.cluster", "--id", "n1", "--port", str(port), "--data-dir", str(tmp_path / "n1"),
            "--peers", f"n2=http://127.0.0.1:{peer},n3=http://127.0.0.1:{peer + 1}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTQ_")}
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "needs a cluster secret" in done.stderr and "--insecure-no-cluster-secret" in done.stderr, done.stderr
    assert not os.path.exists(tmp_path / "n1"), "a refused node must not touch its data directory"


def test_each_node_logs_one_security_warning_naming_what_is_open(three_nodes):
    for node_id in three_nodes.nodes:
        three_nodes.status(node_id)  # started and serving
        warnings = [line for line in three_nodes.log_text(node_id).splitlines()
                    if " WARNING " in line and "security:" in line]
        assert len(warnings) == 1, warnings
        assert "security: client API without a token" in warnings[0] and "unencrypted" in warnings[0], warnings
        assert "peer links without a cluster secret" not in warnings[0], warnings


def test_a_network_address_without_token_or_tls_is_refused(tmp_path):
    port = free_ports(1)[0]
    args = [sys.executable, "-m", "raftq.cluster", "--id", "n1", "--host", "0.0.0.0", "--port", str(port),
            "--data-dir", str(tmp_path / "n1")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTQ_")}
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "not a loopback address" in done.stderr, (done.returncode, done.stderr)
