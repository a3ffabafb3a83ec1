"""One chaos run, Jepsen-shaped: quiet, fault/heal cycles, final heal, converge, drain, check.

    1. start a Toxiproxy-API server and the topology (nodes behind one proxy per directed link)
    2. start the monitor, the worker processes and the producers; a quiet period
    3. the schedule: seeded; every selected fault kind once in a seeded order, then further
       seeded rounds until the fault phase has lasted `duration_s`. Each fault: start, hold,
       heal, wait (polling) until every node is up and a leader serves, then a healthy dwell.
       A cluster that finds no leader after a heal is recorded as a liveness violation.
    4. the final heal (every proxy reset, every process resumed or restarted)
    5. stop producers and workers, wait (polling) until every node has the same applied index
       and state digest, drain the queue (lease + ack until nothing is ready, scheduled,
       leased or waiting), wait for convergence again and record the digests
    6. merge the per-process histories into history.jsonl, check, write report.json and
       summary.txt; the summary's last line is `lost=N unexpected=N duplicates=N`

Everything lands in the run directory (`--out`, or a fresh temporary directory that is kept):
node logs n*.log, worker logs, per-process histories, history.jsonl, report.json, summary.txt.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field

from raftq.chaos import checker, data_disks
from raftq.chaos.history import HistoryWriter, merge, read_history_dir
from raftq.chaos.load_metrics import LoadSampler
from raftq.chaos.nemesis import FAULTS, Nemesis, Timing
from raftq.chaos.schedule_probe import EVERY_S as SCHEDULE_EVERY_S, ScheduleProbe
from raftq.chaos.topology import ToxiproxyFaults, ToxiproxyServerHandle, Topology
from raftq.chaos.workload import Monitor, Producers, WorkerPool, WorkloadConfig, drain, record_final_states
from raftq.cluster.localcluster import wait_until

log = logging.getLogger("chaos.runner")

GOAL = ("Goal: no acknowledged job is lost, no job is delivered after a 2xx ack, no ack is accepted on an "
        "expired or foreign lease, a schedule makes one job per fire time, and every replica converges, "
        "whatever the nemesis does.")


@dataclass
class RunConfig:
    #: seconds of fault/heal cycles (at least one full round of the selected kinds is run)
    duration_s: float = 60.0
    seed: int = 0
    faults: list[str] = field(default_factory=lambda: list(FAULTS))
    nodes: int = 3
    out_dir: str | None = None
    #: Raft tick (election timeout 10-20 ticks) and the nodes' worker heartbeat timeout
    tick_s: float = 0.1
    worker_timeout_s: float = 3.0
    hold_s: float = 6.0
    #: healthy time after each heal (once a leader serves again)
    heal_s: float = 3.0
    quiet_s: float = 3.0
    #: polling deadlines
    recover_timeout_s: float = 60.0
    converge_timeout_s: float = 120.0
    drain_timeout_s: float = 180.0
    #: The nodes snapshot every this many entries and keep few behind, so that compaction runs
    #: all the time and a follower cut off for one fault catches up through InstallSnapshot.
    snapshot_every: int = 100
    compact_keep: int = 10
    #: The nodes keep finished jobs and idempotency keys this long (not the SPEC's hour), so that
    #: the state, and every snapshot of it, stays the size of a minute of load. Longer than any
    #: client retry (the workload's deadline, 10 s), so a retried submit still finds its key.
    retention_s: float = 60.0
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)

    def validate(self) -> None:
        unknown = [f for f in self.faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault kind(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
        if not self.faults:
            raise ValueError("no fault kind selected")
        if self.nodes not in (3, 5):
            raise ValueError(f"--nodes must be 3 or 5, got {self.nodes}")
        if self.duration_s < 0 or self.hold_s <= 0 or self.heal_s < 0:
            raise ValueError("durations must be positive")
        w = self.workload
        if w.rate <= 0 or w.producers < 1 or w.inflight_max < 1:
            raise ValueError(f"--rate must be positive, --producers and --inflight at least 1 "
                             f"(got {w.rate:g}, {w.producers}, {w.inflight_max})")
        needing_disks = [f for f in self.faults if FAULTS[f].needs_data_disks]
        reason = data_disks.unavailable_reason() if needing_disks else None
        if reason:
            raise ValueError(f"{', '.join(needing_disks)} cannot run here ({reason}); leave it out with --faults")

    def replay_command(self) -> str:
        w = self.workload
        return (f"python -m raftq.chaos --duration {self.duration_s:g} --seed {self.seed} --faults {','.join(self.faults)} "
                f"--nodes {self.nodes} --hold {self.hold_s:g} --heal {self.heal_s:g} --rate {w.rate:g} "
                f"--batch {w.submit_batch} --prefetch {w.prefetch} --producers {w.producers} --inflight {w.inflight_max} "
                f"--workers {w.workers} "
                f"--snapshot-every {self.snapshot_every} --compact-keep {self.compact_keep}")


@dataclass
class RunOutcome:
    result: checker.CheckResult
    summary: str
    report_path: str
    history_path: str
    out_dir: str
    #: the fault kinds in the order they ran
    schedule: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.result.valid else 1


def run(config: RunConfig) -> RunOutcome:
    """Runs one chaos scenario end to end; see the module docstring."""
    config.validate()
    out_dir = config.out_dir or tempfile.mkdtemp(prefix=f"raftq-chaos-{config.seed}-")
    os.makedirs(out_dir, exist_ok=True)
    history_dir = os.path.join(out_dir, "history")
    os.makedirs(history_dir, exist_ok=True)
    log.info("%s", GOAL)
    log.info("seed=%d nodes=%d faults=%s out=%s", config.seed, config.nodes, ",".join(config.faults), out_dir)
    log.info("replay: %s", config.replay_command())
    rng = random.Random(config.seed)
    history = HistoryWriter(os.path.join(history_dir, "runner.jsonl"), "runner")
    workload = config.workload
    history.event("meta", seed=config.seed, nodes=config.nodes, faults=config.faults, lease_s=workload.lease_s,
                  duration_s=config.duration_s, tick_s=config.tick_s, worker_timeout_s=config.worker_timeout_s,
                  rate=workload.rate, submit_batch=workload.submit_batch, prefetch=workload.prefetch,
                  producers=workload.producers, inflight_max=workload.inflight_max)
    started = time.monotonic()
    server = ToxiproxyServerHandle.start(os.path.join(out_dir, "toxiproxy.log"))
    log.info("toxiproxy: %s on %s:%d", server.kind, server.host, server.port)
    faults = ToxiproxyFaults(server.host, server.port)
    needs_marker = any(FAULTS[name].needs_fsync_marker for name in config.faults)
    needs_disks = any(FAULTS[name].needs_data_disks for name in config.faults)
    node_args = ("--tick", str(config.tick_s), "--worker-timeout", str(config.worker_timeout_s),
                 "--snapshot-every", str(config.snapshot_every), "--compact-keep", str(config.compact_keep),
                 "--retention", str(config.retention_s), "--idempotency-window", str(config.retention_s))
    topo = Topology(out_dir, faults, size=config.nodes, node_args=node_args, fsync_marker=needs_marker,
                    data_disks=needs_disks)
    monitor = workers = producers = sampler = None
    timing = Timing(hold_s=config.hold_s, election_timeout_s=20 * config.tick_s,
                    worker_timeout_s=config.worker_timeout_s)
    schedule: list[str] = []
    digests: dict = {}
    probe = None
    probe_violations: list[checker.Violation] = []
    probe_stats: dict = {}
    try:
        leader = topo.start(timeout_s=config.recover_timeout_s)
        log.info("cluster up, leader %s; client proxies %s", leader, ", ".join(topo.client_urls))
        monitor = Monitor(topo.cluster, history)
        monitor.start()
        sampler = LoadSampler(topo.cluster, history)
        sampler.start()
        probe = ScheduleProbe(topo.client_urls, wall_clocks_true="clock-skew" not in config.faults)
        probe.start()
        workers = WorkerPool(topo.client_urls, history_dir, out_dir, workload, config.seed)
        workers.start()
        producers = Producers(topo.client_urls, workload, history, run_tag=f"s{config.seed}")
        producers.start()
        nemesis = Nemesis(topo, workers, history, rng, timing, monitor)
        time.sleep(config.quiet_s)  # the quiet period of the schedule (Jepsen's), not a wait for a condition

        phase_end = time.monotonic() + config.duration_s
        order: list[str] = []
        while len(schedule) < len(config.faults) or time.monotonic() < phase_end:
            if not order:
                order = list(config.faults)
                rng.shuffle(order)
            name = order.pop(0)
            schedule.append(name)
            instance = nemesis.start(name)
            time.sleep(instance["hold_s"])  # the fault's duration
            nemesis.stop(instance)
            _wait_recovered(topo, history, f"after healing {name}", config.recover_timeout_s)
            time.sleep(config.heal_s)  # healthy time between faults

        log.info("final heal")
        nemesis.heal_all()
        _wait_recovered(topo, history, "after the final heal", config.recover_timeout_s)
        producers.stop()
        workers.stop()
        digests = _converge(topo, history, "before the drain", config.converge_timeout_s)
        log.info("drain")
        drained = drain(topo.client_urls, workload, history, config.drain_timeout_s)
        log.info("drain: %s", drained)
        unanswered = checker.unanswered_acks(read_history_dir(history_dir))
        record_final_states(topo.client_urls, workload, history, sorted(unanswered))
        digests = _converge(topo, history, "after the drain", config.converge_timeout_s)
        probe_violations, probe_stats = probe.check()
        log.info("schedule: %s", probe_stats)
    finally:
        if producers is not None:
            producers.stop()
        if workers is not None:
            workers.stop()
        if monitor is not None:
            monitor.stop()
        if sampler is not None:
            sampler.stop()
        topo.stop()
        server.stop()
        history.close()

    history_path = os.path.join(out_dir, "history.jsonl")
    records = merge(history_dir, history_path)
    result = checker.check(records, lease_s=workload.lease_s)
    result.violations.extend(probe_violations)
    result.valid = result.valid and not probe_violations
    result.stats["schedule"] = probe_stats
    elapsed = time.monotonic() - started
    header = [
        "raftq chaos run",
        GOAL,
        f"seed={config.seed} nodes={config.nodes} duration={elapsed:.0f}s faults run={len(schedule)} "
        f"({', '.join(sorted(set(schedule)))})",
        f"toxiproxy: {server.kind}; out: {out_dir}",
        f"replay: {config.replay_command()}",
        f"schedule every {SCHEDULE_EVERY_S:g} s, one job per fire time: {probe_stats}",
    ]
    summary = checker.summarize(result, header=header)
    report = {"config": {**asdict(config), "out_dir": out_dir}, "toxiproxy": server.kind, "schedule": schedule,
              "elapsed_s": round(elapsed, 1), "digests": digests, **result.to_json()}
    report_path = os.path.join(out_dir, "report.json")
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    return RunOutcome(result, summary, report_path, history_path, out_dir, schedule)


def _wait_recovered(topo: Topology, history: HistoryWriter, when: str, timeout_s: float) -> bool:
    """Polls until every node is up and answers, and one leader serves; records a liveness
    violation (and goes on) when that does not happen within timeout_s."""
    cluster = topo.cluster

    def recovered() -> bool:
        statuses = cluster.statuses()
        return all(s is not None for s in statuses.values()) and cluster.leader() is not None

    try:
        wait_until(recovered, timeout_s=timeout_s, what=f"a serving leader and every node up {when}",
                   seen=cluster._roles, interval_s=0.1)
        return True
    except TimeoutError as exc:
        log.error("liveness: %s", exc)
        history.event("liveness", message=str(exc))
        return False


def _converge(topo: Topology, history: HistoryWriter, when: str, timeout_s: float) -> dict:
    try:
        digests = topo.cluster.wait_converged(timeout_s)
        history.event("converged", when=when, digests=digests, equal=len(set(digests.values())) == 1)
        return digests
    except TimeoutError as exc:
        log.error("no convergence %s: %s", when, exc)
        views = {k: (s["applied_index"], s["digest"]) if s else None
                 for k, s in topo.cluster.statuses(with_digest=True).items()}
        history.event("converged", when=when, digests=views, equal=False)
        return views
