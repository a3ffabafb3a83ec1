"""Three nodes on three hosts, a client and a worker on a fourth (issue 13, Build 4).

The hosts are Linux network namespaces on one bridge (chaos/hosts.py), one address each, so
nothing works by loopback: each node listens on its own bridge address with TLS (certificates
for those addresses) and a client token, as SPEC's Security section asks of a node on a network,
and the test process itself cannot reach any node; everything it sees, it sees through the
probe (netns_probe.py) run on the client host. What must hold there:

- the advertised URLs (`/v1/cluster`, the dashboard's `/v1/overview`) are the hosts' addresses,
  derived from --host alone;
- a follower redirects to the leader's address, and a client given only that follower submits
  through it and learns the leader;
- the dashboard's Content-Security-Policy names the peers' addresses (its links and failover);
- a follower that was down while the log was compacted catches up by a snapshot sent across
  hosts, and a worker draining through it sees every job;
- every node ends with the same state digest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from raftq.chaos.hosts import HostNetwork, unavailable_reason

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netns_probe.py")
NODE_IDS = ("n1", "n2", "n3")
PORT = 7001  # the same port on every host: each has its own
JOBS = 800   # 80 entries of ten: past --snapshot-every and --compact-keep below


@pytest.fixture
def hosts():
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with HostNetwork([*NODE_IDS, "client"]) as network:
        yield network


def test_three_hosts_serve_a_client_on_a_fourth(hosts, tmp_path):
    url = {node_id: f"https://{hosts.addresses[node_id]}:{PORT}" for node_id in NODE_IDS}
    certs = str(tmp_path / "certs")
    subprocess.run([os.path.join(ROOT, "deploy", "make-certs.sh"), certs], check=True, capture_output=True,
                   env={**os.environ, "RAFTQ_CERT_HOSTS": ",".join(hosts.addresses[n] for n in NODE_IDS)})
    token = "netns-test-token-" + os.urandom(8).hex()
    secret_file, token_file = tmp_path / "cluster-secret", tmp_path / "token"
    for path, value in ((secret_file, os.urandom(24).hex()), (token_file, token)):
        path.write_text(value + "\n")
        path.chmod(0o600)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAFTQ_TOKEN", None)
    logs = {node_id: str(tmp_path / f"{node_id}.log") for node_id in NODE_IDS}
    argv = {}
    for node_id in NODE_IDS:
        peers = ",".join(f"{other}={url[other]}" for other in NODE_IDS if other != node_id)
        argv[node_id] = [sys.executable, "-m", "raftq.cluster", "--id", node_id, "--host", hosts.addresses[node_id],
                         "--port", str(PORT), "--data-dir", str(tmp_path / node_id), "--peers", peers,
                         "--token-file", str(token_file), "--cluster-secret-file", str(secret_file),
                         "--tls-cert", f"{certs}/{node_id}.pem", "--tls-key", f"{certs}/{node_id}.key",
                         "--tls-ca", f"{certs}/ca.pem", "--tls-peer-certs",
                         "--snapshot-every", "40", "--compact-keep", "5"]
    processes = {}

    def start(node_id: str) -> None:
        with open(logs[node_id], "ab") as log:
            processes[node_id] = hosts.popen(node_id, argv[node_id], stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env)

    def probe(*args: object) -> dict:
        result = hosts.run("client", [sys.executable, PROBE, *map(str, args)], capture_output=True, text=True,
                           timeout=90, env={**env, "RAFTQ_TOKEN": token, "RAFTQ_CA": f"{certs}/ca.pem"})
        assert result.returncode == 0, f"probe {args} failed: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return json.loads(result.stdout)

    try:
        for node_id in NODE_IDS:
            start(node_id)
        views = probe("status", *url.values())
        leader = next(v["node"] for v in views.values() if v["role"] == "leader")
        follower, lagging = [n for n in NODE_IDS if n != leader]
        for view in views.values():
            assert {n["id"]: n["url"] for n in view["nodes"]} == url, view
            assert view["leader_url"] == url[leader], view

        # A follower down for good while the log moves on past a compaction.
        processes[lagging].send_signal(signal.SIGKILL)
        processes[lagging].wait(timeout=10)

        submitted = probe("submit", url[follower], JOBS)
        assert len(submitted["ids"]) == JOBS
        assert submitted["leader_url"] == url[leader], submitted  # learned from the follower's redirect

        redirect = probe("get", f"{url[follower]}/v1/jobs/{submitted['ids'][0]}")
        assert redirect["status"] == 307, redirect
        assert redirect["headers"]["Location"] == f"{url[leader]}/v1/jobs/{submitted['ids'][0]}", redirect

        page = probe("get", url[follower] + "/")
        policy = page["headers"]["Content-Security-Policy"]
        connect_sources = next(part for part in policy.split(";") if part.strip().startswith("connect-src")).split()
        assert set(connect_sources) >= {url[n] for n in NODE_IDS if n != follower}, policy
        overview = probe("get", url[follower] + "/v1/overview")["json"]
        assert overview["node_urls"] == url, overview

        leader_view = probe("get", url[leader] + "/v1/cluster")["json"]
        assert leader_view["first_index"] > 1, f"the leader never compacted its log: {leader_view}"
        start(lagging)
        probe("wait-applied", url[lagging], leader_view["commit_index"])
        with open(logs[lagging], encoding="utf-8", errors="replace") as f:
            assert "installed snapshot" in f.read(), f"{lagging} caught up without a snapshot"

        drained = probe("work", url[lagging])
        assert drained["done"] == list(range(JOBS)), f"{len(drained['done'])} of {JOBS} jobs done"
        probe("converged", *url.values())
    except BaseException:
        for node_id in NODE_IDS:
            with open(logs[node_id], encoding="utf-8", errors="replace") as f:
                print(f"----- {node_id} log (tail) -----\n{f.read()[-4000:]}")
        raise
