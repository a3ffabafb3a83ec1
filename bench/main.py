"""`raftq bench`: the command line, the scenarios and their runs (theory of operation: bench/__init__.py)."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import queue as queue_module
import secrets
import shutil
import sys
import tempfile
import time
from array import array
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

from raftq.bench.measure import (FSYNC_POLICY, WalSample, combine_percentiles, filesystem_of, find_leader,
                           machine_info, median, memory_filesystem, percentiles, reset_peak_rss, scrape_wal,
                           wal_figures)
from raftq.bench.report import format_header, format_tables, plot_results, plot_unavailable_reason
from raftq.bench.roles import (KINDS, BENCH_POOLS, Channels, Flag, RoleConfig, calibrate_cpu_loops, padding, peak_rss_kib, rss_kib,
                         producer_main, worker_main)
from raftq import Client
from raftq.client._progress import ProgressBar
from raftq.cluster.queue.jobs import ACTIVE_STATES, DEAD

SCENARIOS = ("submit", "drain", "e2e")
#: The server takes at most 1000 jobs per submit and per ack request.
BATCH_MAX = 1000
#: More processes than this on one machine measure the scheduler, not raftq.
PROCESSES_MAX = 64
#: A run with no job submitted or acked for this long is abandoned (a stuck cluster, a lost job).
STALL_S = 60.0
#: How long roles may take to start and warm up (spawning a process pool on a busy machine).
READY_S_MAX = 120.0
#: How long roles may take to send their results once stopped (the Worker's graceful shutdown).
RESULTS_S_MAX = 60.0
#: How long finished roles may take to exit (the Worker's process pool shuts down too).
REAP_S_MAX = 15.0
#: Threads that queue the jobs of a drain run before the clock starts, and the fewest jobs per
#: request they send (a drain of one-job fetches need not be queued one job at a time).
PREFILL_THREADS = 4
PREFILL_BATCH_MIN = 100
#: The states of a job not yet finished, as GET /v1/queues names them (DEAD counts: not done).
_UNFINISHED = (*ACTIVE_STATES, DEAD)
#: With --retention: how long past the retention a drain run waits for its records to be dropped
#: (the leader's Tick that drops them comes at most a few ticks late).
RECORDS_DROPPED_WAIT_S = 30.0
#: ... and how long it then samples the leader's RSS, taking the lowest.
SETTLE_S = 10.0
#: How often the parent reads the shared counters (progress bar, stop decision).
POLL_S = 0.02
CLUSTER_SIZE = 3
MIB = 1 << 20


class RunError(Exception):
    """Raised when a run cannot finish: a role failed, the cluster stalled or did not start."""


@dataclass(frozen=True)
class Scenario:
    """One benchmark shape; the default set is a list of these (see DEFAULT_SET)."""

    scenario: str  #: submit | drain | e2e
    jobs: int
    batch: int = 100  #: jobs per submit request; with pool "single" also per fetch and per ack
    producers: int = 1
    workers: int = 1
    concurrency: int = 4
    pool: str = "single"
    kind: str = "noop"
    rate_per_s: float | None = None  #: e2e/submit: total submit rate; None: as fast as they can
    rate_of: str | None = None  #: default set: take rate_fraction of this scenario's median jobs/s
    rate_fraction: float = 0.5
    prefetch: int | None = None  #: Worker runtime: its `prefetch`; None: the Worker's default

    @property
    def label(self) -> str:
        parts = [self.scenario, _short_count(self.jobs), f"b{self.batch}"]
        if self.scenario != "drain":
            parts.append(f"p{self.producers}")
        if self.scenario != "submit":
            parts += [f"w{self.workers}", f"c{self.concurrency}", self.pool, self.kind]
        if self.prefetch is not None:
            parts.append(f"pf{self.prefetch}")
        if self.rate_per_s:
            parts.append(f"@{self.rate_per_s:,.0f}/s")
        elif self.rate_of:
            parts.append(f"@{self.rate_fraction:g}x peak")
        return " ".join(parts)


def _short_count(count: int) -> str:
    return f"{count // 1000}k" if count >= 1000 and count % 1000 == 0 else str(count)


#: The set `raftq bench` runs with no --scenario, in under 10 minutes on 2 cores. N is 50,000 where
#: batches of 100 make a run take seconds, and smaller where a request per job (or handlers of
#: about 1 ms, at most 16 at a time) would make it take minutes.
#: The pool comparison gives every Worker pool 16 slots, so the handlers, not the round trips,
#: set the pace; the lean loop keeps its 4 lanes of 100.
HEADLINE = Scenario("e2e", 50_000, batch=100, producers=1, workers=1, concurrency=4, pool="single")
POOL_JOBS = 2_000
DEFAULT_SET: tuple[Scenario, ...] = (
    Scenario("submit", 1_000, batch=1, producers=1),
    Scenario("submit", 2_000, batch=1, producers=4),
    Scenario("submit", 10_000, batch=10, producers=1),
    Scenario("submit", 50_000, batch=100, producers=1),
    Scenario("drain", 2_000, batch=1),
    Scenario("drain", 10_000, batch=10),
    Scenario("drain", 50_000, batch=100),
    Scenario("e2e", 10_000, batch=100),
    HEADLINE,
    Scenario("e2e", 10_000, batch=100, rate_of=HEADLINE.label, rate_fraction=0.5),
    Scenario("e2e", 50_000, batch=100, producers=2, workers=2),
    Scenario("e2e", POOL_JOBS, batch=100, pool="single", kind="io"),
    Scenario("e2e", POOL_JOBS, batch=100, pool="single", kind="cpu"),
    Scenario("e2e", POOL_JOBS, batch=100, concurrency=16, pool="threads", kind="noop"),
    Scenario("e2e", POOL_JOBS, batch=100, concurrency=16, pool="threads", kind="io"),
    Scenario("e2e", POOL_JOBS, batch=100, concurrency=16, pool="threads", kind="cpu"),
    Scenario("e2e", POOL_JOBS, batch=100, concurrency=16, pool="processes", kind="cpu"),
    Scenario("e2e", POOL_JOBS, batch=100, concurrency=16, pool="asyncio", kind="noop"),
    Scenario("e2e", POOL_JOBS, batch=100, concurrency=16, pool="asyncio", kind="io"),
)


@dataclass
class Settings:
    """What holds for every scenario of one `raftq bench` invocation."""

    nodes: list[str] | None
    token: str | None
    runs: int
    payload_bytes: int
    cpu_loops: int
    data_dir: str
    keep_data: bool
    progress: bool | None  #: None: draw when stderr is a terminal
    retention_s: float | None = None  #: the nodes' --retention (None: their default)
    machine: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raftq bench",
        description="Measure jobs/s, latency and memory of a raftq cluster. With no --scenario, runs the "
                    "default set (see --list). Starts its own 3-node cluster unless --nodes is given.",
        epilog="Other measurements, each with its own --help: 'raftq bench nats' (the same figures on NATS "
               "JetStream), 'raftq bench snapshot' (how long a snapshot of a million live jobs pauses each "
               "node), 'raftq bench floor' (the fixed stack without raftq: one-job submits and memory).",
    )
    p.add_argument("--nodes", help="benchmark this cluster (URLs, comma-separated) instead of starting one; "
                                   "its jobs stay in queues named bench-*")
    p.add_argument("--token", default=os.environ.get("RAFTQ_TOKEN"), help="bearer token (env RAFTQ_TOKEN)")
    p.add_argument("--scenario", choices=SCENARIOS, help="run one scenario (default: the whole default set)")
    p.add_argument("--jobs", type=int, default=10_000, help="jobs per run (default 10000)")
    p.add_argument("--batch", type=int, default=100,
                   help="jobs per submit request; with --pool single also per fetch and per ack (default 100)")
    p.add_argument("--producers", type=int, default=1, help="producer processes (default 1)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="per worker: Worker slots, or lanes of the single pool (default 4)")
    p.add_argument("--pool", choices=BENCH_POOLS, default="single",
                   help="single: lean batched fetch/ack loop; threads|processes|asyncio: the Worker runtime; "
                        "cli: `raftq worker` as a process of its own, default flags but --concurrency and --prefetch")
    p.add_argument("--prefetch", type=_prefetch_list,
                   help="with a Worker pool: jobs it buffers ahead of free slots (default: the Worker's default, "
                        "auto; 0: fetch only for free slots); a comma list such as default,0 runs the scenario "
                        "once per value, back to back")
    p.add_argument("--kind", choices=KINDS, default="noop",
                   help="job: noop, io (sleep 1 ms), cpu (about 1 ms of pure Python) or echo (one request and reply "
                        "over loopback TCP, as a Redis INCR) (default noop)")
    p.add_argument("--payload-bytes", type=int, default=100, help="encoded payload size (default 100)")
    p.add_argument("--rate", type=float, help="submit at this many jobs/s in total (submit, e2e)")
    p.add_argument("--runs", type=int, default=3, help="runs per scenario; the report gives the median (default 3)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON (each scenario's rate in jobs_per_s)")
    p.add_argument("--plot", metavar="FILE.png", help="draw jobs/s and latency by scenario (needs matplotlib)")
    p.add_argument("--data-dir", help="where the bench's clusters keep their logs (default: a temporary folder)")
    p.add_argument("--keep-data", action="store_true", help="keep the clusters' data and logs afterwards")
    p.add_argument("--retention", type=float, metavar="SECONDS",
                   help="the nodes keep finished job records and idempotency keys this long (their --retention "
                        "and --idempotency-window); with drain, the report adds the leader's RSS once the drained "
                        "jobs' records are gone")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="print the default scenario set and exit")
    return p


def _scenarios_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Scenario]:
    if args.scenario is None:
        given = [flag for flag, dest in (("--jobs", "jobs"), ("--batch", "batch"), ("--producers", "producers"),
                                         ("--workers", "workers"), ("--concurrency", "concurrency"),
                                         ("--pool", "pool"), ("--prefetch", "prefetch"), ("--kind", "kind"),
                                         ("--rate", "rate"))
                 if getattr(args, dest) != parser.get_default(dest)]
        if given:
            parser.error(f"{', '.join(given)} go with --scenario (the default set has its own shapes)")
        return list(DEFAULT_SET)
    if args.rate is not None and args.scenario == "drain":
        parser.error("--rate paces the producers: use it with --scenario submit or e2e")
    return [Scenario(args.scenario, args.jobs, batch=args.batch, producers=args.producers, workers=args.workers,
                     concurrency=args.concurrency, pool=args.pool, kind=args.kind, rate_per_s=args.rate,
                     prefetch=prefetch)
            for prefetch in (args.prefetch or [None])]


def _prefetch_list(text: str) -> list[int | None]:
    """--prefetch: comma-separated job counts; "default" (None) leaves the Worker's own default."""
    values: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        try:
            values.append(None if part == "default" else int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers of jobs or default, got {part!r}") from None
    return values


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    checks = [
        (args.jobs >= 1, "--jobs must be at least 1"),
        (1 <= args.batch <= BATCH_MAX, f"--batch must be within [1, {BATCH_MAX}] (the server's batch bound)"),
        (1 <= args.producers <= PROCESSES_MAX, f"--producers must be within [1, {PROCESSES_MAX}]"),
        (1 <= args.workers <= PROCESSES_MAX, f"--workers must be within [1, {PROCESSES_MAX}]"),
        (1 <= args.concurrency <= 1000, "--concurrency must be within [1, 1000]"),
        (16 <= args.payload_bytes <= 1 << 20, "--payload-bytes must be within [16, 1048576]"),
        (args.rate is None or args.rate > 0, "--rate must be positive"),
        (all(value is None or 0 <= value <= 1000 - args.concurrency for value in args.prefetch or []),
         "--prefetch must be within [0, 1000 - concurrency]"),
        (args.prefetch is None or args.pool != "single",
         "--prefetch goes with a Worker pool (threads, processes, asyncio, cli)"),
        (args.kind != "echo" or args.pool != "asyncio", "--kind echo goes with a pool that runs plain functions"),
        (args.runs >= 1, "--runs must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `raftq bench`.

    Args:
        argv: the arguments after `bench` (default: sys.argv[1:]).

    Returns:
        The exit code: 0 when every scenario ran, 1 when one failed, 2 bad usage, 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["nats"]:  # the same figures on NATS JetStream, for a side-by-side table
        from raftq.bench import nats_peer
        try:
            return nats_peer.main(argv[1:], raftq_run_once=run_nats_figure_once)
        except RunError as exc:  # a raftq run of --pairs
            print(f"raftq bench nats: a raftq run failed: {exc}", file=sys.stderr)
            return 1
    if argv[:1] == ["snapshot"]:  # a snapshot of a million live jobs: how long it pauses the nodes' loops
        from raftq.bench import snapshot_pause
        return snapshot_pause.main(argv[1:])
    if argv[:1] == ["floor"]:  # the fixed stack without raftq: one-job submits and memory it cannot go below
        from raftq.bench import stack_floor
        return stack_floor.main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and bad usage; hand back its code
        return int(exc.code or 0)
    try:
        _validate(args, parser)
        scenarios = _scenarios_from_args(args, parser)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.list:
        print("\n".join(scenario.label for scenario in scenarios))
        return 0
    if args.plot and plot_unavailable_reason():
        print(f"raftq bench: --plot: {plot_unavailable_reason()}; the benchmark runs without the chart",
              file=sys.stderr)
    with _data_dir(args) as data_dir:
        settings = Settings(
            nodes=[url.strip().rstrip("/") for url in args.nodes.split(",") if url.strip()] if args.nodes else None,
            token=args.token or None, runs=args.runs, payload_bytes=args.payload_bytes,
            cpu_loops=calibrate_cpu_loops(), data_dir=data_dir, keep_data=args.keep_data,
            progress=False if args.no_progress else None, retention_s=args.retention,
        )
        settings.machine = machine_info()
        facts = _header_facts(settings)
        print(format_header(facts), flush=True)
        results: list[dict] = []
        interrupted = False
        try:
            for number, scenario in enumerate(scenarios, start=1):
                results.append(run_scenario(scenario, settings, f"[{number}/{len(scenarios)}]", results))
                _write_outputs(args, facts, results, final=False)
        except KeyboardInterrupt:
            interrupted = True
            print("\nraftq bench: interrupted; the figures so far:", file=sys.stderr)
    print()
    print(format_tables(results))
    _write_outputs(args, facts, results, final=True)
    if interrupted:
        return 130
    return 1 if any(result.get("error") for result in results) else 0


#: `raftq bench nats --pairs`: this benchmark's scenario for each NATS figure (its fields besides
#: the job count), as bench/nats_peer.py's docstring pairs them.
NATS_FIGURE_SCENARIOS = {
    "submit1": {"scenario": "submit", "batch": 1, "producers": 1},
    "batched": {"scenario": "submit", "batch": 100, "producers": 1},
    "through": {"scenario": "e2e", "batch": 100, "producers": 1, "workers": 1, "concurrency": 4},
}


def run_nats_figure_once(figure: str, jobs: int, payload_bytes: int) -> dict:
    """One run of the scenario matching a `raftq bench nats` figure, on a fresh local cluster with
    default settings (`--pairs`).

    Raises:
        RunError: the run failed, or not every job was accounted for.
    """
    scenario = Scenario(jobs=jobs, **NATS_FIGURE_SCENARIOS[figure])
    with tempfile.TemporaryDirectory(prefix="raftq-bench-pairs-") as data_dir:
        settings = Settings(nodes=None, token=None, runs=1, payload_bytes=payload_bytes, cpu_loops=0,
                            data_dir=data_dir, keep_data=False, progress=False)
        result = run_once(scenario, settings, scenario.label)
    if not result["accounted"]:
        raise RunError(f"{scenario.label}: not every job was accounted for: {result['queue_depth']}")
    return result


@contextlib.contextmanager
def _data_dir(args: argparse.Namespace) -> Iterator[str]:
    if args.data_dir:
        os.makedirs(args.data_dir, exist_ok=True)
        yield args.data_dir
        return
    directory = tempfile.mkdtemp(prefix="raftq-bench-")
    try:
        yield directory
    finally:
        if args.keep_data:
            print(f"raftq bench: cluster data and logs kept in {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)


def _header_facts(settings: Settings) -> dict[str, Any]:
    filesystem = None if settings.nodes else filesystem_of(settings.data_dir)
    return {
        "machine": settings.machine,
        "cluster": (f"{len(settings.nodes)} nodes given with --nodes" if settings.nodes else
                    f"{CLUSTER_SIZE} nodes started by the bench on 127.0.0.1, a fresh cluster for every run"),
        "own_cluster": not settings.nodes,
        "filesystem": filesystem,
        "filesystem_in_memory": memory_filesystem(filesystem),
        "fsync_policy": FSYNC_POLICY,
        "payload_bytes": settings.payload_bytes,
        "cpu_loops": settings.cpu_loops,
        "runs": settings.runs,
        "retention_s": settings.retention_s,
    }


def _write_outputs(args: argparse.Namespace, facts: dict[str, Any], results: list[dict], *, final: bool) -> None:
    """Writes the JSON report (after every scenario, so an interrupted run keeps its figures) and the chart."""
    if args.json:
        document = {"header": facts, "scenarios": results}
        temporary = f"{args.json}.tmp"
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2, sort_keys=True)
            out.write("\n")
        os.replace(temporary, args.json)
        if final:
            print(f"raftq bench: results written to {args.json}", file=sys.stderr)
    if final and args.plot and not plot_unavailable_reason():
        plot_results(results, args.plot, title=format_header(facts).splitlines()[0])
        print(f"raftq bench: chart written to {args.plot}", file=sys.stderr)


# ---------------------------------------------------------------------------- scenarios


def run_scenario(scenario: Scenario, settings: Settings, position: str, earlier: list[dict]) -> dict:
    """Runs one scenario `settings.runs` times; returns its summary (with "error" when it failed)."""
    if scenario.rate_of:
        peak = next((r for r in earlier if r["name"] == scenario.rate_of and r.get("jobs_per_s")), None)
        if peak is None:
            return _summary(scenario, [], error=f"no figure for {scenario.rate_of!r} to take a rate from")
        scenario = replace(scenario, rate_per_s=round(peak["jobs_per_s"] * scenario.rate_fraction), rate_of=None)
    runs: list[dict] = []
    for run in range(1, settings.runs + 1):
        label = f"{position} {scenario.label} run {run}/{settings.runs}"
        try:
            outcome = run_once(scenario, settings, label)
        except RunError as exc:
            print(f"{label}: failed: {exc}", file=sys.stderr)
            return _summary(scenario, runs, error=str(exc))
        runs.append(outcome)
        note = ""
        if outcome["role_warnings"]:
            note = (f" ({outcome['role_warnings']} warning(s) logged by producers/workers, the first: "
                    f"{outcome['role_warning_samples'][0]})")
        print(f"{label}: {outcome['jobs_per_s']:,.0f} jobs/s{note}", file=sys.stderr, flush=True)
    return _summary(scenario, runs)


def _summary(scenario: Scenario, runs: list[dict], *, error: str | None = None) -> dict:
    rates = [run["jobs_per_s"] for run in runs]
    rate = median(rates)
    summary = {
        "name": scenario.label,
        **{key: value for key, value in asdict(scenario).items() if key not in ("rate_of", "rate_fraction")},
        "runs": runs,
        "jobs_per_s": rate,
        "jobs_per_s_min": min(rates) if rates else None,
        "jobs_per_s_max": max(rates) if rates else None,
        "spread_pct": (max(rates) - min(rates)) / rate * 100 if rates and rate else None,
        "submit_latency_ms": combine_percentiles([run["submit_latency_ms"] for run in runs]),
        "e2e_latency_ms": combine_percentiles([run["e2e_latency_ms"] for run in runs]),
        "node_rss_peak_mib": _median_by_key([run["node_rss_peak_mib"] for run in runs]),
        "leader_memory_mib": _median_by_key([run["leader_memory_mib"] for run in runs]),
        "worker_rss_peak_mib": _max_or_none(run["worker_rss_peak_mib"] for run in runs),
        "wal_bytes_per_job": median([run["wal_bytes_per_job"] for run in runs]),
        "entries_per_fsync": median([run["entries_per_fsync"] for run in runs]),
        "accounted": bool(runs) and all(run["accounted"] for run in runs),
        "error": error,
    }
    return summary


def _max_or_none(values: Any) -> float | None:
    present = [value for value in values if value is not None]
    return max(present) if present else None


def _median_by_key(maps: list[dict | None]) -> dict | None:
    present = [m for m in maps if m]
    if not present:
        return None
    return {key: median([m.get(key) for m in present]) for key in present[0]}


# ---------------------------------------------------------------------------- one run


@dataclass
class _Target:
    """The cluster one run talks to."""

    urls: list[str]
    token: str | None
    pids: dict[str, int] | None  #: node id -> pid when the bench started the nodes
    describe_failure: Any = None  #: callable giving the nodes' log tails, own clusters only


@contextlib.contextmanager
def _target_for_run(settings: Settings, name: str) -> Iterator[_Target]:
    if settings.nodes:
        yield _Target(settings.nodes, settings.token, None)
        return
    from raftq.cluster.localcluster import LocalCluster

    directory = os.path.join(settings.data_dir, name)
    extra_args = () if settings.retention_s is None else (
        "--retention", str(settings.retention_s), "--idempotency-window", str(settings.retention_s))
    cluster = LocalCluster(directory, size=CLUSTER_SIZE, extra_args=extra_args)
    try:
        try:
            cluster.start()
        except TimeoutError as exc:
            raise RunError(f"the cluster did not elect a leader: {exc}\n{_log_tails(cluster)}") from None
        pids = {node_id: node.process.pid for node_id, node in cluster.nodes.items() if node.process is not None}
        yield _Target(cluster.urls, None, pids, describe_failure=lambda: _log_tails(cluster))
    finally:
        for node in cluster.nodes.values():  # all at once; stop() then waits for each
            if node.alive:
                node.process.terminate()
        cluster.stop()
        if not settings.keep_data:
            shutil.rmtree(directory, ignore_errors=True)


def _log_tails(cluster: Any, chars: int = 1500) -> str:
    return "\n".join(f"--- {node_id} log (tail) ---\n{cluster.log_text(node_id)[-chars:]}" for node_id in cluster.nodes)


def run_once(scenario: Scenario, settings: Settings, label: str) -> dict:
    """One run of `scenario` on a cluster of its own (or the --nodes cluster); returns its figures.

    Raises:
        RunError: the cluster or a role failed, or nothing moved for STALL_S.
    """
    name = f"{scenario.scenario}-{secrets.token_hex(4)}"
    with _target_for_run(settings, name) as target:
        try:
            return _measure_run(scenario, settings, target, f"bench-{name}", label)
        except RunError as exc:
            if target.describe_failure is not None:
                raise RunError(f"{exc}\n{target.describe_failure()}") from None
            raise


def _measure_run(scenario: Scenario, settings: Settings, target: _Target, queue: str, label: str) -> dict:
    found = find_leader(target.urls, target.token)
    if found is None:
        raise RunError("no node knows a leader")
    leader_id, leader_url = found
    urls = [leader_url] + [url for url in target.urls if url != leader_url]  # clients start at the leader
    leader_pid = (target.pids or {}).get(leader_id)
    leader_memory = None
    if scenario.scenario == "drain":
        idle = _mib(rss_kib(leader_pid)) if leader_pid else None
        _prefill(urls, target.token, queue, scenario.jobs, settings.payload_bytes, scenario.batch)
        if leader_pid:
            leader_memory = {"idle": idle, "queued": _mib(rss_kib(leader_pid)), "queued_peak": _mib(peak_rss_kib(leader_pid))}
    wal_before = _scrape(leader_url, target.token)
    for pid in (target.pids or {}).values():
        reset_peak_rss(pid)
    started_at, reports = _run_roles(scenario, settings, urls, target.token, queue, label)
    wal_after = _scrape(leader_url, target.token)
    node_rss = None
    if target.pids is not None:
        node_rss = {node_id: _mib(peak_rss_kib(pid)) for node_id, pid in target.pids.items()}
    if leader_memory is not None:
        leader_memory["drained"] = _mib(rss_kib(leader_pid))
        if settings.retention_s is not None:
            leader_memory["records_dropped"] = _settled_rss_mib(urls, target.token, queue, leader_pid,
                                                                settings.retention_s)
    still_leader = find_leader(target.urls, target.token)
    wal_per_job, entries_per_fsync = wal_figures(wal_before, wal_after, scenario.jobs)
    leader_changed = still_leader is None or still_leader[0] != leader_id
    if leader_changed:
        wal_per_job = entries_per_fsync = None  # another node's log: the deltas would mean nothing
    figures = _run_figures(scenario, reports, started_at, urls, target.token, queue, leader_id, node_rss,
                           wal_per_job, entries_per_fsync, records_dropped=settings.retention_s is not None)
    figures["leader_changed"] = leader_changed
    figures["leader_memory_mib"] = leader_memory
    return figures


def _settled_rss_mib(urls: list[str], token: str | None, queue: str, pid: int, retention_s: float) -> float | None:
    """The leader's lowest RSS in the SETTLE_S after the run's records were dropped (None if they
    stay): how much of the burst's memory the node gives back."""
    deadline = time.monotonic() + retention_s + RECORDS_DROPPED_WAIT_S
    with Client(urls, token=token, timeout=10.0, deadline=30.0) as client:
        while client.queues().get(queue, {}).get("done", 0) > 0:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)  # polling the cluster's view with a deadline
    lowest = None
    settle_until = time.monotonic() + SETTLE_S
    while time.monotonic() < settle_until:
        rss = _mib(rss_kib(pid))
        if rss is not None and (lowest is None or rss < lowest):
            lowest = rss
        time.sleep(0.25)  # sampling the process's RSS while it settles
    return lowest


def _scrape(url: str, token: str | None) -> WalSample | None:
    try:
        return scrape_wal(url, token)
    except (OSError, ValueError):
        return None


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def _prefill(urls: list[str], token: str | None, queue: str, jobs: int, payload_bytes: int, batch: int) -> None:
    """Queues `jobs` jobs from a few threads in requests of `batch`, PREFILL_BATCH_MIN to
    BATCH_MAX (drain: before the clock starts). The request size shows in the leader's memory:
    50,000 jobs queued 1,000 per request left it about 6 MiB larger than 100 per request."""
    pad = padding(payload_bytes)
    per_request = min(max(batch, PREFILL_BATCH_MIN), BATCH_MAX)
    sizes = [min(per_request, jobs - start) for start in range(0, jobs, per_request)]
    with Client(urls, token=token, timeout=30.0, deadline=120.0) as client:
        def submit(count: int) -> None:
            client.submit_many(queue, [{"t": time.time(), "pad": pad}] * count)

        with concurrent.futures.ThreadPoolExecutor(PREFILL_THREADS) as pool:
            for future in [pool.submit(submit, size) for size in sizes]:
                future.result()


def _run_roles(scenario: Scenario, settings: Settings, urls: list[str], token: str | None, queue: str,
               label: str) -> tuple[float, dict[tuple[str, int], dict]]:
    """Starts the producers and workers, the clock once all are ready, and collects their reports."""
    context = multiprocessing.get_context("spawn")
    channels = Channels(Flag(context), Flag(context), context.Value("q", 0), context.Value("q", 0),
                        context.Queue())
    producers = 0 if scenario.scenario == "drain" else scenario.producers
    workers = 0 if scenario.scenario == "submit" else scenario.workers
    roles: dict[tuple[str, int], Any] = {}
    for index in range(workers):
        config = _role_config(scenario, settings, urls, token, queue, jobs=0, rate=None)
        # Not daemonic: a daemonic process may not start children, and the processes pool does.
        roles[("worker", index)] = context.Process(target=worker_main, args=(index, config, channels),
                                                   name=f"bench-worker-{index}")
    for index in range(producers):
        share = scenario.jobs // producers + (1 if index < scenario.jobs % producers else 0)
        rate = scenario.rate_per_s / producers if scenario.rate_per_s else None
        config = _role_config(scenario, settings, urls, token, queue, jobs=share, rate=rate)
        roles[("producer", index)] = context.Process(target=producer_main, args=(index, config, channels),
                                                     name=f"bench-producer-{index}", daemon=True)
    for process in roles.values():
        process.start()
    reports: dict[tuple[str, int], dict] = {}
    try:
        _await_ready(channels, roles)
        started_at = time.time()
        channels.start.set()
        _watch(scenario, channels, roles, reports, label, settings.progress)
        channels.stop.set()
        _collect(channels, roles, reports)
    except BaseException:
        channels.stop.set()
        channels.start.set()  # a role still waiting to start sees stop at once
        _reap(roles, timeout_s=2.0)  # a failed or interrupted run: its roles may be stuck retrying
        raise
    _reap(roles)
    return started_at, reports


def _role_config(scenario: Scenario, settings: Settings, urls: list[str], token: str | None, queue: str, *,
                 jobs: int, rate: float | None) -> RoleConfig:
    return RoleConfig(nodes=tuple(urls), token=token, queue=queue, jobs=jobs, batch=scenario.batch,
                      concurrency=scenario.concurrency, pool=scenario.pool, kind=scenario.kind,
                      cpu_loops=settings.cpu_loops, payload_bytes=settings.payload_bytes, rate_per_s=rate,
                      prefetch=scenario.prefetch)


def _next_message(channels: Channels, timeout_s: float) -> tuple | None:
    try:
        return channels.results.get(timeout=timeout_s)
    except queue_module.Empty:
        return None


def _role_failed(message: tuple) -> RunError:
    _, role, index, text = message
    return RunError(f"{role} {index} failed:\n{text.rstrip()}")


def _check_alive(roles: dict[tuple[str, int], Any], reports: dict) -> None:
    for key, process in roles.items():
        if key not in reports and process.exitcode is not None:
            raise RunError(f"{key[0]} {key[1]} exited (code {process.exitcode}) without a report")


def _await_ready(channels: Channels, roles: dict[tuple[str, int], Any]) -> None:
    waiting = set(roles)
    deadline = time.monotonic() + READY_S_MAX
    while waiting:
        message = _next_message(channels, 0.1)
        if message is not None:
            if message[0] == "error":
                raise _role_failed(message)
            if message[0] == "ready":
                waiting.discard((message[1], message[2]))
            continue
        _check_alive(roles, {})
        if time.monotonic() > deadline:
            raise RunError(f"{', '.join(f'{r} {i}' for r, i in sorted(waiting))} not ready after {READY_S_MAX:g} s")


def _watch(scenario: Scenario, channels: Channels, roles: dict[tuple[str, int], Any], reports: dict,
           label: str, progress_enabled: bool | None) -> None:
    """Draws progress until the run is over: every job acked (drain, e2e) or every producer done (submit)."""
    counter = channels.submitted if scenario.scenario == "submit" else channels.acked
    shown, moved_at = 0, time.monotonic()
    with ProgressBar(scenario.jobs, label=label, enabled=progress_enabled) as progress:
        while True:
            message = _next_message(channels, POLL_S)
            if message is not None:
                if message[0] == "error":
                    raise _role_failed(message)
                if message[0] == "done":
                    reports[(message[1], message[2])] = message[3]
            count = counter.value
            if count != shown:
                progress.update(count - shown)
                shown, moved_at = count, time.monotonic()
            if scenario.scenario == "submit":
                if all(key in reports for key in roles if key[0] == "producer"):
                    return
            elif count >= scenario.jobs:
                return
            _check_alive(roles, reports)
            if time.monotonic() - moved_at > STALL_S:
                raise RunError(f"nothing moved for {STALL_S:g} s ({count} of {scenario.jobs} jobs)")


def _collect(channels: Channels, roles: dict[tuple[str, int], Any], reports: dict) -> None:
    deadline = time.monotonic() + RESULTS_S_MAX
    while any(key not in reports for key in roles):
        message = _next_message(channels, 0.1)
        if message is not None:
            if message[0] == "error":
                raise _role_failed(message)
            if message[0] == "done":
                reports[(message[1], message[2])] = message[3]
            continue
        _check_alive(roles, reports)
        if time.monotonic() > deadline:
            missing = [f"{r} {i}" for r, i in roles if (r, i) not in reports]
            raise RunError(f"no report from {', '.join(missing)} within {RESULTS_S_MAX:g} s of the end")


def _reap(roles: dict[tuple[str, int], Any], timeout_s: float = REAP_S_MAX) -> None:
    """Waits up to `timeout_s` in all for the roles to exit, then ends the rest (SIGTERM, then SIGKILL)."""
    deadline = time.monotonic() + timeout_s
    for process in roles.values():
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for signal_name in ("terminate", "kill"):
        alive = [process for process in roles.values() if process.is_alive()]
        for process in alive:
            getattr(process, signal_name)()
        for process in alive:
            process.join(timeout=5.0)


def _run_figures(scenario: Scenario, reports: dict[tuple[str, int], dict], started_at: float, urls: list[str],
                 token: str | None, queue: str, leader_id: str, node_rss: dict | None,
                 wal_per_job: float | None, entries_per_fsync: float | None, *, records_dropped: bool) -> dict:
    """records_dropped: the nodes run with a --retention that may have dropped the finished
    records (and, emptied, the queue) by now: the jobs are then accounted for when every ack was
    answered 2xx (final, SPEC guarantee 3) and the queue holds no job that is not finished."""
    producers = [report for (role, _), report in reports.items() if role == "producer"]
    workers = [report for (role, _), report in reports.items() if role == "worker"]
    if scenario.scenario == "submit":
        ended_at = max(report["ended_at"] for report in producers)
    else:
        ended_at = max(report["last_ack_at"] for report in workers)
    elapsed_s = max(ended_at - started_at, 1e-9)
    submitted = sum(report["submitted"] for report in producers) if producers else scenario.jobs
    acked = sum(report["acked"] for report in workers)
    expected_acks = 0 if scenario.scenario == "submit" else scenario.jobs
    if expected_acks and records_dropped:
        def settled(depth: dict) -> bool:
            return not any(depth.get(state) for state in _UNFINISHED)
    else:
        counted = "done" if expected_acks else "ready"

        def settled(depth: dict) -> bool:
            return depth.get(counted) == scenario.jobs
    depth = _queue_depth(urls, token, queue, settled)
    all_done = settled(depth)
    submit_latencies = _unpack([report["submit_latencies_ms"] for report in producers])
    e2e_latencies = _unpack([report["e2e_latencies_ms"] for report in workers]) if scenario.scenario == "e2e" else []
    worker_rss = [(r["rss_peak_kib"] or 0) + (r["children_rss_peak_kib"] or 0) for r in workers]
    return {
        "jobs_per_s": scenario.jobs / elapsed_s,
        "elapsed_s": elapsed_s,
        "submitted": submitted,
        "acked": acked,
        "refused_acks": sum(report["refused"] for report in workers),
        "role_warnings": sum(report["warnings"] for report in reports.values()),
        "role_warning_samples": [line for report in reports.values() for line in report["warning_samples"]][:5],
        "queue_depth": depth,
        "accounted": submitted == scenario.jobs and acked == expected_acks and all_done,
        "submit_latency_ms": percentiles(submit_latencies),
        "e2e_latency_ms": percentiles(e2e_latencies),
        "leader": leader_id,
        "node_rss_peak_mib": _by_role(node_rss, leader_id),
        "node_rss_by_node_mib": node_rss,
        "worker_rss_peak_mib": _mib(max(worker_rss)) if worker_rss else None,
        "wal_bytes_per_job": wal_per_job,
        "entries_per_fsync": entries_per_fsync,
    }


def _by_role(node_rss: dict[str, float | None] | None, leader_id: str) -> dict | None:
    if node_rss is None:
        return None
    followers = [value for node_id, value in node_rss.items() if node_id != leader_id and value is not None]
    every = [value for value in node_rss.values() if value is not None]
    return {"leader": node_rss.get(leader_id), "follower_max": max(followers) if followers else None,
            "all_nodes": round(sum(every), 1) if len(every) == len(node_rss) else None}


def _unpack(chunks: list[bytes]) -> array:
    values = array("d")
    for chunk in chunks:
        values.frombytes(chunk)
    return values


def _queue_depth(urls: list[str], token: str | None, queue: str, settled: Callable[[dict], bool]) -> dict:
    """The queue's depth by state, once `settled(depth)` holds (a node may apply a moment later),
    else as it is after a few seconds."""
    deadline = time.monotonic() + 5.0
    with Client(urls, token=token, timeout=10.0, deadline=30.0) as client:
        while True:
            depth = client.queues().get(queue, {})
            if settled(depth) or time.monotonic() > deadline:
                return depth
            time.sleep(0.1)  # polling the cluster's view with a deadline, not waiting for a condition in a test


if __name__ == "__main__":
    sys.exit(main())
