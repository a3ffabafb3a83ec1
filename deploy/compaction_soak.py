"""Pushes a million jobs through a local 3-node cluster and reports what compaction keeps bounded.

    .venv/bin/python deploy/compaction_soak.py --jobs 1000000 --retention 20

One producer thread submits batches of `--batch` jobs while `--workers` threads lease and ack in
batches, keeping at most `--in-flight` jobs submitted but not acked. It prints, per node, right after the last ack ("burst") and again at the end, once
the finished records and idempotency keys have expired and a snapshot was taken after that
("end"): WAL and snapshot bytes on disk, RSS (and the kernel's peak, VmHWM). Then it kills -9 the
leader, restarts it and times how long it takes to start (its own log line) and to serve its
state again (status answers with everything applied).

`--retention` and `--idempotency-window` are the node's (SPEC defaults: one hour each): a finished
job's record and a submit's key stay in memory that long, so the memory a run needs is about
window × rate × (record + key). They are short here so that a million jobs in a few minutes
measure the log's and the snapshots' bounds, not an hour of retained state.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.request

from raftq import Client
from raftq.cluster.localcluster import LocalCluster, wait_until


def rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB, from /proc (Linux)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def directory_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except FileNotFoundError:
                pass  # compacted while we walked
    return total


def gauge(url: str, name: str) -> float:
    """One unlabelled metric from a node's /metrics."""
    status, text = http_text(url + "/metrics")
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert status == 200 and match, f"{name} not in {url}/metrics"
    return float(match.group(1))


def http_text(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def measure(cluster: LocalCluster) -> dict:
    figures = {}
    for node_id, node in cluster.nodes.items():
        current, hwm = rss_kib(node.process.pid)
        status = cluster.status(node_id) or {}
        figures[node_id] = {
            "wal_mib": round(directory_bytes(os.path.join(node.data_dir, "wal")) / 2**20, 1),
            "snapshots_mib": round(directory_bytes(os.path.join(node.data_dir, "snapshots")) / 2**20, 1),
            "rss_mib": round(current / 1024, 1),
            "rss_peak_mib": round(hwm / 1024, 1),
            "last_index": status.get("last_index"),
            "snapshot_index": status.get("snapshot_index"),
        }
    return figures


def run(args: argparse.Namespace, base: str) -> dict:
    node_args = ["--retention", str(args.retention), "--idempotency-window", str(args.retention),
                 "--snapshot-interval", str(args.snapshot_interval), "--worker-timeout", "30"]
    report: dict = {"jobs": args.jobs, "batch": args.batch, "retention_s": args.retention,
                    "idempotency_window_s": args.retention, "snapshot_interval_s": args.snapshot_interval}
    with LocalCluster(base, size=3, extra_args=node_args) as cluster:
        cluster.wait_for_leader()
        acked = 0
        submitted = 0
        lock = threading.Lock()
        done = threading.Event()
        errors: list[BaseException] = []

        def produce() -> None:
            nonlocal submitted
            with Client(cluster.urls, deadline=120, timeout=60) as client:
                while submitted < args.jobs and not done.is_set():
                    if submitted - acked > args.in_flight:
                        time.sleep(0.005)  # back-pressure: the producer waits for the workers
                        continue
                    count = min(args.batch, args.jobs - submitted)
                    client.submit_many("soak", [b"x" * args.payload_bytes] * count)
                    with lock:
                        submitted += count

        def work(name: str) -> None:
            nonlocal acked
            with Client(cluster.urls, deadline=120, timeout=60) as client:
                while acked < args.jobs and not done.is_set():
                    jobs = client.fetch(name, ["soak"], max_jobs=args.batch, wait_s=1)
                    if jobs:
                        client.ack_many(name, [(job.id, job.lease, None) for job in jobs])
                        with lock:
                            acked += len(jobs)

        def guarded(target, *target_args) -> None:
            try:
                target(*target_args)
            except BaseException as exc:  # reported below, and stops the others
                errors.append(exc)
                done.set()

        threads = [threading.Thread(target=guarded, args=(produce,), daemon=True)]
        threads += [threading.Thread(target=guarded, args=(work, f"soak-{n}"), daemon=True)
                    for n in range(args.workers)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        next_print = started
        while any(thread.is_alive() for thread in threads):
            time.sleep(1)
            if time.monotonic() >= next_print:
                print(f"  {time.monotonic() - started:6.0f} s  submitted {submitted:>9,}  acked {acked:>9,}", flush=True)
                next_print += 10
        if errors:
            raise errors[0]
        elapsed = time.monotonic() - started
        report["seconds"] = round(elapsed, 1)
        report["jobs_per_s"] = round(args.jobs / elapsed)

        leader = cluster.wait_for_leader()
        report["leader"] = leader
        report["burst"] = measure(cluster)

        # Settle: the records and keys expire through Tick entries, then a snapshot after that.
        def state_held() -> dict[str, tuple[float, float]]:
            return {node_id: (gauge(node.url, "raftq_job_records"), gauge(node.url, "raftq_idempotency_keys"))
                    for node_id, node in cluster.nodes.items()}

        wait_until(lambda: all(v == (0, 0) for v in state_held().values()), timeout_s=args.retention * 3 + 120,
                   what="finished records and idempotency keys to expire", seen=state_held)
        applied = {node_id: (cluster.status(node_id) or {}).get("applied_index", 0) for node_id in cluster.nodes}
        wait_until(lambda: all((cluster.status(n) or {}).get("snapshot_index", 0) >= applied[n] for n in applied),
                   timeout_s=args.snapshot_interval * 3 + 120, what="a snapshot after the state emptied",
                   seen=lambda: {n: (cluster.status(n) or {}).get("snapshot_index") for n in applied})
        report["end"] = measure(cluster)

        # Restart the leader: kill -9, start, time to its "node started" line and to serving.
        before = cluster.status(leader) or {}
        target_index = before.get("commit_index", 0)
        log_size = os.path.getsize(cluster.nodes[leader].log_path)
        cluster.kill(leader)
        restart_began = time.monotonic()
        cluster.start_node(leader)

        def started_line() -> float | None:
            with open(cluster.nodes[leader].log_path, "rb") as f:
                f.seek(log_size)
                text = f.read().decode(errors="replace")
            match = re.search(r"node started in ([0-9.]+) s", text)
            return float(match.group(1)) if match else None

        wait_until(lambda: started_line() is not None, timeout_s=120, what="the restarted node's start line")
        report["restart_recovery_s"] = started_line()

        def caught_up() -> bool:
            status = cluster.status(leader)
            return bool(status) and status["applied_index"] >= target_index

        wait_until(caught_up, timeout_s=120, what="the restarted node to apply everything again")
        report["restart_to_serving_s"] = round(time.monotonic() - restart_began, 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000, help="jobs per submit, per lease and per ack (default 1000)")
    parser.add_argument("--workers", type=int, default=2, help="worker threads (default 2)")
    parser.add_argument("--in-flight", type=int, default=50_000, help="submitted but unacked jobs at most")
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--retention", type=float, default=20.0,
                        help="finished-job retention and idempotency window in seconds (default 20)")
    parser.add_argument("--snapshot-interval", type=float, default=30.0,
                        help="the nodes' time-based snapshot trigger in seconds (default 30)")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="raftq-soak-")
    try:
        report = run(args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
