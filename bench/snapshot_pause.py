"""`raftq bench snapshot`: how long a snapshot of a big state pauses each node's event loop.

    raftq bench snapshot                              1,000,000 live jobs, 3 nodes
    raftq bench snapshot --jobs 200000 --restart      smaller, then restart a follower from its snapshot

Theory of operation
-------------------
A fresh 3-node cluster (or with `--size 1` one node) on loopback (`LocalCluster`, data in a
temporary folder) is started with one snapshot trigger: `--snapshot-interval` of `--snapshot-after`
seconds (the entry and byte triggers out of reach; ticks count as entries, so no entry count is
exact). `--producers` threads submit `--jobs` jobs (`--payload-bytes` each) in requests of
`--batch` jobs, each request one log entry; nobody works on them, so all stay live. Once every node
has applied them, the bench waits until every node's loop is quiet (the node's own
`raftq_event_loop_lag_max_seconds`, the largest lag of its last 30 s, below QUIET_LAG_S), then
until every node has taken its snapshot (the three reach the interval within a tick of each other).
Meanwhile it polls each node's /metrics and /proc every POLL_S: the loop-lag maximum, the node's
RSS and that of any child it forked.

Per node it prints: the time the snapshot spent on the event loop (`raftq_snapshot_capture_seconds`,
the node's own timing: the capture on the loop, or the fork), the largest loop lag the node's
metric saw while the snapshot ran (its 30 s window covers every poll), the whole snapshot's time
and size, and RSS before and at peak (node and child). With `--restart` it then stops a follower,
starts it again (it restores its snapshot at start) and prints how long the node took to serve
and the largest loop lag it saw in its first seconds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from typing import Sequence

from prometheus_client.parser import text_string_to_metric_families

from raftq import Client
from raftq.cluster.localcluster import LocalCluster

#: The loop counts as quiet (no pause of the fill left in the metric's window) below this lag.
QUIET_LAG_S = 0.05
#: How often the bench reads each node's metrics and /proc while the snapshot runs.
POLL_S = 0.25
#: Waits: the fill applied on every node, the loops quiet, a snapshot taken, a restart served.
WAIT_S = 300.0
QUEUE = "snapshot-bench"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raftq bench snapshot",
                                description="Fill a 3-node cluster with live jobs, take a snapshot, and measure "
                                            "how long it pauses each node's event loop.")
    p.add_argument("--jobs", type=int, default=1_000_000, help="live jobs before the snapshot (default 1,000,000)")
    p.add_argument("--batch", type=int, default=1000, help="jobs per submit request (default 1000)")
    p.add_argument("--producers", type=int, default=2, help="threads submitting (default 2)")
    p.add_argument("--payload-bytes", type=int, default=16, help="bytes of each job's payload (default 16)")
    p.add_argument("--size", type=int, choices=(1, 3), default=3,
                   help="nodes (default 3; 1: one node, the machine to itself, no peers to wait for)")
    p.add_argument("--snapshot-after", type=float, default=120.0,
                   help="seconds from the cluster's start to its snapshot: longer than the fill (default 120)")
    p.add_argument("--restart", action="store_true", help="then restart a follower from its snapshot and "
                                                          "measure its start")
    p.add_argument("--install", action="store_true", help="stop a follower before the fill; once the others "
                                                          "have snapshotted, start it: it installs the leader's "
                                                          "snapshot; measure that")
    p.add_argument("--node-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for every node (repeatable), e.g. --node-arg=--snapshot-in-thread")
    p.add_argument("--keep-data", action="store_true", help="keep the cluster's data and logs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.jobs < 1 or not 1 <= args.batch <= 1000 or args.producers < 1:
        parser.error("--jobs ≥ 1, --batch within [1, 1000], --producers ≥ 1")
    if args.size == 1 and (args.install or args.restart):
        parser.error("--install and --restart need followers: --size 3")
    directory = tempfile.mkdtemp(prefix="raftq-bench-snapshot-")
    node_args = ["--snapshot-every", str(1 << 40), "--snapshot-bytes", str(1 << 40),
                 "--snapshot-interval", str(args.snapshot_after), *args.node_arg]
    if args.install:  # the log is dropped up to the snapshot, so the stopped follower needs the snapshot
        node_args += ["--compact-keep", "0"]
    cluster = LocalCluster(directory, size=args.size, extra_args=node_args)
    try:
        cluster.start()
        return _run(cluster, args)
    finally:
        cluster.stop()
        if args.keep_data:
            print(f"raftq bench snapshot: data and logs kept in {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)


def _run(cluster: LocalCluster, args: argparse.Namespace) -> int:
    urls = {node_id: node.url for node_id, node in cluster.nodes.items()}
    stopped = None
    if args.install:
        leader = cluster.leader()
        stopped = next(node_id for node_id in sorted(urls) if node_id != leader)
        cluster.nodes[stopped].process.terminate()
        cluster.nodes[stopped].process.wait(60)
        del urls[stopped]
    print(f"raftq bench snapshot: {args.jobs:,} jobs of {args.payload_bytes} bytes in requests of {args.batch}, "
          f"{args.size} node(s); machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    started = time.monotonic()
    _fill(list(urls.values()), args)
    print(f"filled in {time.monotonic() - started:.0f} s", flush=True)
    _wait(lambda: all(_metrics(url).get("raftq_job_records", 0) >= args.jobs for url in urls.values()),
          "every node applied the fill")
    _wait(lambda: all(_metrics(url)["raftq_event_loop_lag_max_seconds"] < QUIET_LAG_S for url in urls.values()),
          f"every node's loop quiet (lag max < {QUIET_LAG_S * 1000:.0f} ms)")
    before = {node_id: (_metrics(url), _rss_kib(cluster.nodes[node_id].process.pid)) for node_id, url in urls.items()}
    if any(figures.get("raftq_snapshots_taken_total", 0) for figures, _ in before.values()):
        raise SystemExit(f"raftq bench snapshot: the nodes snapshotted before the fill was over and their loops "
                         f"quiet: give a longer --snapshot-after than {args.snapshot_after:g}")
    print(f"waiting for the snapshot, {args.snapshot_after - (time.monotonic() - started):.0f} s", flush=True)
    peaks = {node_id: {"lag": 0.0, "rss": 0, "child_rss": 0, "child_private": 0} for node_id in urls}
    deadline = time.monotonic() + args.snapshot_after + WAIT_S
    done: dict[str, dict] = {}
    while len(done) < len(urls):
        if time.monotonic() > deadline:
            raise SystemExit(f"raftq bench snapshot: no snapshot on {sorted(set(urls) - set(done))}")
        for node_id, url in urls.items():
            if node_id in done:
                continue
            figures = _metrics(url)
            peak = peaks[node_id]
            peak["lag"] = max(peak["lag"], figures["raftq_event_loop_lag_max_seconds"])
            pid = cluster.nodes[node_id].process.pid
            peak["rss"] = max(peak["rss"], _rss_kib(pid))
            for child in _children(pid):
                peak["child_rss"] = max(peak["child_rss"], _rss_kib(child))
                peak["child_private"] = max(peak["child_private"], _private_kib(child))
            if figures["raftq_snapshots_taken_total"] > before[node_id][0].get("raftq_snapshots_taken_total", 0):
                done[node_id] = figures
        time.sleep(POLL_S)
    print(f"\n{'node':<5} {'on loop ms':>10} {'lag max ms':>10} {'lag before':>10} {'snapshot s':>10} "
          f"{'MiB':>6} {'jobs':>9} {'RSS MiB':>8} {'peak':>6} {'child':>6} {'child own':>9}")
    for node_id, figures in sorted(done.items()):
        peak = peaks[node_id]
        print(f"{node_id:<5} {figures['raftq_snapshot_capture_seconds'] * 1000:>10.1f} {peak['lag'] * 1000:>10.1f} "
              f"{before[node_id][0]['raftq_event_loop_lag_max_seconds'] * 1000:>10.1f} "
              f"{figures['raftq_snapshot_seconds']:>10.2f} {figures['raftq_snapshot_bytes'] / (1 << 20):>6.0f} "
              f"{figures['raftq_job_records']:>9,.0f} {before[node_id][1] / 1024:>8.0f} {peak['rss'] / 1024:>6.0f} "
              f"{peak['child_rss'] / 1024:>6.0f} {peak['child_private'] / 1024:>9.0f}")
    print("on loop: raftq_snapshot_capture_seconds; lag max: the largest raftq_event_loop_lag_max_seconds seen "
          "while the snapshot ran; child own: the forked child's private memory at its peak")
    if stopped is not None:
        _install_on(cluster, stopped, urls)
    if args.restart:
        _restart_follower(cluster, urls)
    return 0


def _install_on(cluster: LocalCluster, follower: str, urls: dict[str, str]) -> None:
    """Starts the follower stopped before the fill: it gets the leader's snapshot and installs it."""
    leader = cluster.leader()
    term = _metrics(urls[leader])["raftq_raft_term"]
    url = cluster.nodes[follower].url
    started = time.monotonic()
    cluster.start_node(follower)
    lag = leader_lag = 0.0

    def installed() -> bool:
        nonlocal lag, leader_lag
        figures = _metrics(url, quiet=True)
        lag = max(lag, figures.get("raftq_event_loop_lag_max_seconds", 0.0))
        leader_lag = max(leader_lag, _metrics(urls[leader])["raftq_event_loop_lag_max_seconds"])
        return figures.get("raftq_snapshots_installed_total", 0) >= 1
    _wait(installed, f"{follower} installed the leader's snapshot")
    took = time.monotonic() - started
    figures = _metrics(url)
    print(f"\ninstall on follower {follower}: {figures['raftq_job_records']:,.0f} jobs installed {took:.1f} s after "
          f"its start; its largest loop lag meanwhile {lag * 1000:.1f} ms, the leader's {leader_lag * 1000:.1f} ms; "
          f"leader {cluster.leader()} (was {leader}), term {_metrics(urls[leader])['raftq_raft_term']:.0f} "
          f"(was {term:.0f})")
    urls[follower] = url


def _fill(urls: list[str], args: argparse.Namespace) -> None:
    payload = "p" * max(1, args.payload_bytes - 2)  # msgpack adds a header byte or two
    requests = [min(args.batch, args.jobs - start) for start in range(0, args.jobs, args.batch)]
    shares = [requests[index::args.producers] for index in range(args.producers)]
    reported = [0]

    def produce(counts: list[int]) -> None:
        with Client(urls) as client:
            for count in counts:
                client.submit_many(QUEUE, [payload] * count)
                reported[0] += count
                if reported[0] * 10 // args.jobs != (reported[0] - count) * 10 // args.jobs:
                    print(f"  {reported[0]:,} submitted", flush=True)

    with concurrent.futures.ThreadPoolExecutor(args.producers) as pool:
        for future in [pool.submit(produce, share) for share in shares]:
            future.result()


def _restart_follower(cluster: LocalCluster, urls: dict[str, str]) -> None:
    leader = cluster.leader()
    follower = next(node_id for node_id in urls if node_id != leader)
    cluster.nodes[follower].process.terminate()
    cluster.nodes[follower].process.wait(60)
    started = time.monotonic()
    cluster.start_node(follower)
    lag = 0.0

    def serving() -> bool:
        nonlocal lag
        figures = _metrics(urls[follower], quiet=True)
        lag = max(lag, figures.get("raftq_event_loop_lag_max_seconds", 0.0))
        return figures.get("raftq_job_records", 0) > 0
    _wait(serving, f"{follower} restored and serving")
    serving_after = time.monotonic() - started
    settle_until = time.monotonic() + 5
    while time.monotonic() < settle_until:
        serving()
        time.sleep(POLL_S)
    print(f"\nrestart of follower {follower}: serving metrics with its state after {serving_after:.1f} s; "
          f"largest loop lag in its first seconds {lag * 1000:.1f} ms; leader still {cluster.leader()} "
          f"(was {leader})")


def _metrics(url: str, *, quiet: bool = False) -> dict[str, float]:
    """Every unlabelled sample of the node's /metrics, by sample name; {} when it does not answer and `quiet`."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as answer:
            text = answer.read().decode("utf-8", errors="replace")
    except OSError:
        if quiet:
            return {}
        raise
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.labels}


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"raftq bench snapshot: gave up waiting {WAIT_S:g} s for {what}")
        time.sleep(POLL_S)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def _rss_kib(pid: int) -> int:
    return _proc_field(f"/proc/{pid}/status", "VmRSS:")


def _private_kib(pid: int) -> int:
    """Memory only this process holds (its copies of pages it wrote since the fork)."""
    return (_proc_field(f"/proc/{pid}/smaps_rollup", "Private_Dirty:")
            + _proc_field(f"/proc/{pid}/smaps_rollup", "Private_Clean:"))


def _proc_field(path: str, name: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0
