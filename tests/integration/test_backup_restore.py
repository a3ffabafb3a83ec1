"""Backups and disaster recovery (issue 13, Build 3), with real processes and the real commands.

A three-node cluster with a client token runs a producer and a worker (submit, fetch, ack) while
`raftq admin backup FILE` streams a backup from the leader. Then every node is stopped and every
data directory deleted, `raftq node --restore FILE` starts a new cluster of one from the file, and
two empty nodes join it (`--join`, `POST /v1/cluster/members`) until it has three voters again.
Everything acknowledged before the backup was asked for must be there: each submitted job exists,
each acked job is done and is never handed out again, and the rest drains.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

from raftq import Client
from raftq.cluster.localcluster import LocalCluster, http_json, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUEUE = "backed-up"
TOKEN = "backup-test-token-0123456789"
LEASE_S = 2.0  # jobs leased at backup time come back soon after the restore


class _Load:
    """A producer and a worker on their own threads; records what the cluster acknowledged."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.lock = threading.Lock()
        self.submitted: list[str] = []
        self.acked: list[str] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._guard, args=(role,), daemon=True)
                        for role in (self._produce, self._work)]

    def __enter__(self) -> "_Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _guard(self, role) -> None:
        try:
            with Client(self.urls, token=TOKEN, timeout=5, deadline=30) as client:
                role(client)
        except BaseException as exc:  # seen by the test, not lost in a thread
            self.errors.append(exc)

    def _produce(self, client: Client) -> None:
        n = 0
        while not self.stopping.is_set():
            ids = client.submit_many(QUEUE, [{"n": n + i} for i in range(10)], lease_s=LEASE_S)
            n += 10
            with self.lock:
                self.submitted += ids
            self.stopping.wait(0.01)  # a steady stream the worker keeps up with, not a flood

    def _work(self, client: Client) -> None:
        while not self.stopping.is_set():
            for job in client.fetch("load-worker", [QUEUE], max_jobs=10, wait_s=0.2):
                client.ack("load-worker", job.id, job.lease_token)
                with self.lock:
                    self.acked.append(job.id)

    def acknowledged(self) -> tuple[set[str], set[str]]:
        with self.lock:
            return set(self.submitted), set(self.acked)


def _raftq(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTQ_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    if token:
        env["RAFTQ_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "raftq", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_backup_under_load_then_restore_into_a_new_cluster(tmp_path):
    started = time.monotonic()
    backup_file = str(tmp_path / "cluster.backup")
    old = LocalCluster(str(tmp_path / "old"), size=3, token=TOKEN, extra_args=["--worker-timeout", "2"])
    with old:
        nodes = ",".join(old.urls)
        with _Load(old.urls) as load:
            deadline = time.monotonic() + 30
            while len(load.acknowledged()[1]) < 200 and not load.errors and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = _raftq("--nodes", nodes, "admin", "backup", backup_file, token=None)
            assert refused.returncode == 1 and "bearer token" in refused.stderr, refused
            submitted_before, acked_before = load.acknowledged()
            backup = _raftq("--nodes", nodes, "admin", "backup", backup_file)
            submitted_after, _ = load.acknowledged()
        _, acked_ever = load.acknowledged()
        assert not load.errors, load.errors
        assert backup.returncode == 0, backup.stderr
        assert len(submitted_after) > len(submitted_before), "the load stopped while the backup was taken"
        backup_index = int(backup.stdout.split("backup of index ")[1].split()[0])
        leader = old.wait_for_leader()
        assert backup_index <= old.status(leader)["commit_index"]
    assert len(acked_before) >= 200 and len(submitted_before) > len(acked_before), (len(submitted_before),
                                                                                     len(acked_before))

    # The disaster: every data directory is gone for good.
    for node in old.nodes.values():
        shutil.rmtree(node.data_dir)

    print(f"backup at index {backup_index}: {len(submitted_before)} jobs submitted, {len(acked_before)} acked "
          f"before it was asked for; {time.monotonic() - started:.1f} s")
    with LocalCluster(str(tmp_path / "new"), size=1, token=TOKEN,
                      extra_args=["--worker-timeout", "2", "--restore", backup_file]) as new:
        assert "restored" in new.log_text("n1"), new.log_text("n1")
        new.extra_args = ["--worker-timeout", "2"]  # restored once; the nodes that join start empty
        with Client(new.urls, token=TOKEN, timeout=5, deadline=30) as client:
            assert new.status("n1")["applied_index"] > backup_index  # the new leader's entries follow it
            # Back to three voters: two empty nodes join and catch up from the restored one.
            for node_id in ("n2", "n3"):
                joining = new.add_joining_node(node_id)
                new.start_node(node_id)
                client.add_member(node_id, joining.url)
            wait_until(lambda: sum(1 for m in (new.status("n1") or {}).get("nodes", []) if m.get("voter")) == 3,
                       timeout_s=60, what="three voters", seen=lambda: new.status("n1"))
            for job_id in sorted(acked_before):
                assert client.get(job_id)["state"] == "done", client.get(job_id)
            drained: set[str] = set()
            idle_since = time.monotonic()
            while time.monotonic() - idle_since < 2 * LEASE_S + 3:  # leases held at backup time run out
                jobs = client.fetch("drainer", [QUEUE], max_jobs=100, wait_s=0.5)
                for job in jobs:
                    assert job.id not in acked_before, f"acked job {job.id} handed out again after the restore"
                    drained.add(job.id)
                if jobs:
                    outcomes = client.ack_many("drainer", [(job.id, job.lease_token, None) for job in jobs])
                    assert outcomes == [None] * len(jobs), outcomes
                if jobs:
                    idle_since = time.monotonic()
            # Acked while the backup was being asked for: done in it, or handed out again (the ack
            # came after its point); anything else was lost.
            undrained = submitted_before - acked_before - drained
            states = {job_id: client.get(job_id)["state"] if job_id in acked_ever else "never acked"
                      for job_id in sorted(undrained)}
            lost = {job_id: state for job_id, state in states.items() if state != "done"}
            assert not lost, f"{len(lost)} jobs acknowledged before the backup are not there: {list(lost.items())[:5]}"
            depths = client.queues()
        assert all(count == 0 for state, count in depths[QUEUE].items() if state != "done"), depths
        new.wait_converged()
        print(f"restored and drained {len(drained)} jobs; {time.monotonic() - started:.1f} s in all")


def test_a_restore_refuses_a_data_directory_with_state_and_a_damaged_file(tmp_path, single_node):
    backup_file = str(tmp_path / "one.backup")
    assert _raftq("--nodes", single_node.urls[0], "admin", "backup", backup_file, token=None).returncode == 0
    data_dir = single_node.nodes["n1"].data_dir

    def restore(path: str, into: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "raftq.cluster", "--restore", path, "--id", "n1", "--data-dir", into,
                               "--port", "0"], capture_output=True, text=True, timeout=60, cwd=ROOT)

    held = restore(backup_file, data_dir)
    assert held.returncode == 2 and "holds a node's state already" in held.stderr, held.stderr
    with open(backup_file, "r+b") as f:
        f.seek(3)
        byte = f.read(1)
        f.seek(3)
        f.write(bytes([byte[0] ^ 0xFF]))
    damaged = restore(backup_file, str(tmp_path / "empty"))
    assert damaged.returncode == 2 and "sha256" in damaged.stderr, damaged.stderr
    assert not os.path.exists(tmp_path / "empty")  # checked before anything is written
    truncated = tmp_path / "short.backup"
    truncated.write_bytes(b"not a backup")
    cut = restore(str(truncated), str(tmp_path / "empty2"))
    assert cut.returncode == 2 and "not restoring" in cut.stderr, cut.stderr
    assert http_json(single_node.urls[0] + "/v1/cluster")[0] == 200  # the running node was not disturbed
