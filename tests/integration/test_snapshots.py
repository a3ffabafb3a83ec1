"""Snapshots, log compaction and InstallSnapshot on real node processes.

* A follower stopped while 200,000 jobs go through comes back after the leader has compacted the
  entries it missed: it catches up through InstallSnapshot and ends with the leader's digest.
* A node restarts from its newest valid snapshot plus the log after it; a damaged newest snapshot
  (cut short, or one flipped byte) is detected by its checksum and the node falls back on the
  older one and the log it needs; with no valid snapshot reaching the log, it stops and names the
  file.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from raftq import Client
from raftq.cluster.localcluster import LocalCluster, wait_until

JOBS_TOTAL = 200_000
BATCH = 1000


def push_jobs_through(client: Client, count: int, queue: str = "bulk") -> None:
    """Submits count jobs in batches and drains them (lease + ack) as it goes."""
    submitted = acked = 0
    while acked < count:
        if submitted < count and submitted - acked < 20 * BATCH:
            client.submit_many(queue, [b"x" * 40] * min(BATCH, count - submitted))
            submitted += min(BATCH, count - submitted)
            continue
        jobs = client.fetch("bulk-worker", [queue], max_jobs=BATCH, wait_s=1)
        if jobs:
            client.ack_many("bulk-worker", [(job.id, job.lease_token, None) for job in jobs])
            acked += len(jobs)


def snapshot_dir(cluster: LocalCluster, node_id: str) -> str:
    return os.path.join(cluster.nodes[node_id].data_dir, "snapshots")


def snapshot_files(cluster: LocalCluster, node_id: str) -> list[str]:
    directory = snapshot_dir(cluster, node_id)
    return sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".snap"))


def test_stopped_follower_catches_up_through_install_snapshot(tmp_path):
    with LocalCluster(str(tmp_path / "cluster"), size=3, extra_args=["--worker-timeout", "5"]) as cluster:
        leader = cluster.wait_for_leader()
        follower = next(node_id for node_id in cluster.nodes if node_id != leader)
        cluster.kill(follower)
        stopped_at = max(s["last_index"] for s in cluster.statuses().values() if s)
        with Client(cluster.urls, deadline=120, timeout=60) as client:
            push_jobs_through(client, JOBS_TOTAL)
            assert client.queues()["bulk"]["done"] == JOBS_TOTAL

        leader = cluster.wait_for_leader()
        status = cluster.status(leader)
        assert status is not None and status["first_index"] > stopped_at + 1, (
            f"the leader should have compacted past the stopped follower's log (ended near {stopped_at}): {status}")
        cluster.start_node(follower)
        digests = cluster.wait_converged(timeout_s=180)
        assert len(set(digests.values())) == 1, digests
        log_text = cluster.log_text(follower)
        assert "installed snapshot" in log_text, log_text[-3000:]
        follower_status = cluster.status(follower)
        assert follower_status is not None and follower_status["snapshot_index"] > stopped_at

        # A whole-cluster restart comes back from snapshots plus the log after them.
        for node_id in cluster.nodes:
            cluster.kill(node_id)
        for node_id in cluster.nodes:
            cluster.start_node(node_id)
        cluster.wait_for_leader(timeout_s=60)
        assert len(set(cluster.wait_converged(timeout_s=120).values())) == 1
        with Client(cluster.urls, deadline=60) as client:
            assert client.queues()["bulk"]["done"] == JOBS_TOTAL


# ---------------------------------------------------------------------- damaged snapshots, one node

SMALL_SNAPSHOTS = ["--snapshot-every", "40", "--compact-keep", "5", "--wal-segment-bytes", "4096"]


def fill_with_snapshots(cluster: LocalCluster, batches: int = 160) -> list[str]:
    """Submits `batches` entries (so several snapshots and WAL compactions happen); returns the job ids."""
    ids: list[str] = []
    with Client(cluster.urls, deadline=60) as client:
        for n in range(batches):
            ids += client.submit_many("snap", [{"batch": n, "i": i} for i in range(5)])
    wait_until(lambda: len(snapshot_files(cluster, "n1")) == 2, timeout_s=30, what="two snapshots kept",
               seen=lambda: snapshot_files(cluster, "n1"))
    wal_dir = os.path.join(cluster.nodes["n1"].data_dir, "wal")
    first_segment = min(name for name in os.listdir(wal_dir) if name.startswith("wal-"))
    assert first_segment != f"wal-{1:020d}.log", "the WAL was never compacted: the test would prove nothing"
    return ids


def assert_every_job_is_back(cluster: LocalCluster, ids: list[str]) -> None:
    """Every submitted job readable and ready: nothing the snapshots or the log held was lost."""
    with Client(cluster.urls, deadline=60) as client:
        assert client.queues()["snap"]["ready"] == len(ids)
        states = {client.get(job_id)["state"] for job_id in ids[:: max(1, len(ids) // 50)] + ids[-5:]}
    assert states == {"ready"}, states


def cut_short(path: str, count: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - count)


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("damage", ["cut short by 1 byte", "cut to half", "flipped byte"])
def test_damaged_newest_snapshot_falls_back_on_the_older_one(tmp_path, damage):
    with LocalCluster(str(tmp_path / "cluster"), size=1, extra_args=SMALL_SNAPSHOTS) as cluster:
        ids = fill_with_snapshots(cluster)
        cluster.terminate("n1")
        newest = snapshot_files(cluster, "n1")[-1]
        size = os.path.getsize(newest)
        if damage == "cut short by 1 byte":
            cut_short(newest, 1)
        elif damage == "cut to half":
            cut_short(newest, size // 2)
        else:
            flip_byte(newest, size // 3)
        cluster.start_node("n1")
        cluster.wait_for_leader(timeout_s=30)
        assert_every_job_is_back(cluster, ids)
        log_text = cluster.log_text("n1")
        assert "snapshot damaged, trying an older one" in log_text and os.path.basename(newest) in log_text, \
            log_text[-3000:]


def test_no_valid_snapshot_reaching_the_log_stops_the_node_naming_the_file(tmp_path):
    with LocalCluster(str(tmp_path / "cluster"), size=1, extra_args=SMALL_SNAPSHOTS) as cluster:
        fill_with_snapshots(cluster)
        cluster.terminate("n1")
        files = snapshot_files(cluster, "n1")
        for path in files:
            flip_byte(path, os.path.getsize(path) // 2)
        node = cluster.nodes["n1"]
        result = subprocess.run(node.args, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert result.returncode != 0, "the node started without the entries its damaged snapshots covered"
        output = result.stdout + result.stderr
        assert "no valid snapshot covers the entries before it" in output, output[-3000:]
        for path in files:
            assert os.path.basename(path) in output, (path, output[-3000:])
