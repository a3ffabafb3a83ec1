"""The nemesis: every fault kind the suite injects, each with its goal, start and heal.

A fault is a small class: `start()` does the damage and returns what it touched (kept in the
history's nemesis event and handed back to `stop()`), `stop()` heals exactly that. `hold_s`
says how long the fault stays on. Network faults go through `FaultProxy` (toxiproxy-python);
process faults through `LocalCluster` (SIGKILL, SIGSTOP/SIGCONT, restart) and the `WorkerPool`.

Proxy names (see `chaos.topology`): `peer_a_b` carries node a's requests to b and b's replies
(upstream = a -> b, downstream = b -> a); `client_a` carries client traffic to a.

`Nemesis.heal_all()` is the final heal: reset every proxy (re-enable, drop every toxic), SIGCONT
every paused node and worker, start every node that is down.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import ClassVar

from raftq.chaos import data_disks, disk_damage, faketime, fsync_marker
from raftq.chaos.faketime import SkewedClock
from raftq.chaos.history import HistoryWriter
from raftq.chaos.topology import Topology, client_proxy, peer_proxy
from raftq.chaos.workload import WorkerPool
from raftq.cluster.storage.wal import PREALLOCATE_BYTES

log = logging.getLogger("chaos.nemesis")


@dataclass(frozen=True)
class Timing:
    #: how long a fault stays on by default
    hold_s: float = 6.0
    #: the Raft election timeout's upper bound (20 ticks)
    election_timeout_s: float = 2.0
    #: the nodes' --worker-timeout
    worker_timeout_s: float = 3.0
    #: pause between the steps of a multi-step fault (nats-7567)
    step_s: float = 1.0


class Fault:
    """One fault kind. Subclasses set name/goal and implement start/stop."""

    name: ClassVar[str]
    goal: ClassVar[str]
    #: the fault is expected to force a new leader while it holds (time-to-leader, failover)
    #: (a fault that does so only sometimes says it in its detail: "deposes_leader", "leader")
    deposes_leader: ClassVar[bool] = False
    #: the old leader stays up and should step down (step-down time)
    expects_step_down: ClassVar[bool] = False
    #: needs the nodes to run with the fsync marker hook
    needs_fsync_marker: ClassVar[bool] = False
    #: needs each node's data directory on a small filesystem of its own (chaos.data_disks)
    needs_data_disks: ClassVar[bool] = False

    def hold_s(self, timing: Timing) -> float:
        return timing.hold_s

    def start(self, nemesis: "Nemesis") -> dict:
        raise NotImplementedError

    def stop(self, nemesis: "Nemesis", detail: dict) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------- network: cuts


class _Cut(Fault):
    """Disables a set of peer proxies (connections refused and closed); heal re-enables them."""

    def links(self, nemesis: "Nemesis") -> tuple[list[str], dict]:
        raise NotImplementedError

    def start(self, nemesis: "Nemesis") -> dict:
        links, detail = self.links(nemesis)
        for proxy in links:
            nemesis.faults.disable(proxy)
        return {**detail, "proxies": links}

    def stop(self, nemesis: "Nemesis", detail: dict) -> None:
        for proxy in detail["proxies"]:
            nemesis.faults.enable(proxy)


class IsolateLeader(_Cut):
    name = "isolate-leader"
    goal = ("the leader loses every peer link (its client proxy stays up): it must stop answering 2xx within "
            "about one election timeout, a new leader takes over, nothing acknowledged is lost")
    deposes_leader = True
    expects_step_down = True

    def links(self, nemesis):
        leader = nemesis.leader()
        return nemesis.topo.links_of(leader), {"nodes": [leader]}


class IsolateFollower(_Cut):
    name = "isolate-follower"
    goal = "a follower loses every peer link: no election (pre-vote), it catches up after the heal"

    def links(self, nemesis):
        follower = nemesis.follower()
        return nemesis.topo.links_of(follower), {"nodes": [follower]}


class RandomHalves(_Cut):
    name = "halves"
    goal = "random minority/majority split (Jepsen's partition-random-halves): the majority side serves"
    deposes_leader = False

    def links(self, nemesis):
        leader = nemesis.leader()
        ids = list(nemesis.topo.node_ids)
        nemesis.rng.shuffle(ids)
        minority, majority = ids[: len(ids) // 2], ids[len(ids) // 2:]
        deposed = leader in minority  # then the majority must elect, and the old leader step down
        return nemesis.topo.links_between(minority, majority), {
            "minority": minority, "majority": majority, "leader": leader, "deposes_leader": deposed,
            "expects_step_down": deposed}


class Bridge(_Cut):
    name = "bridge"
    goal = ("two halves cut from each other, one bridge node sees both (leader on one side): leader churn stays "
            "bounded (pre-vote, check-quorum)")

    def links(self, nemesis):
        leader = nemesis.leader()
        others = [n for n in nemesis.topo.node_ids if n != leader]
        nemesis.rng.shuffle(others)
        bridge = others[0]
        rest = others[1:]
        side_a = [leader] + rest[: (len(rest) - 1) // 2] if len(rest) > 1 else [leader]
        side_b = [n for n in rest if n not in side_a]
        return nemesis.topo.links_between(side_a, side_b), {"bridge": bridge, "side_a": side_a, "side_b": side_b}


# ---------------------------------------------------------------------------- network: toxics


class _Toxics(Fault):
    """Adds toxics; heal removes them. plan() -> [(proxy, stream, type, attributes, toxicity)]."""

    def plan(self, nemesis: "Nemesis") -> tuple[list[tuple[str, str, str, dict, float]], dict]:
        raise NotImplementedError

    def start(self, nemesis: "Nemesis") -> dict:
        plan, detail = self.plan(nemesis)
        toxics = []
        for proxy, stream, kind, attributes, toxicity in plan:
            toxic = f"chaos_{kind}_{stream}"
            nemesis.faults.add_toxic(proxy, toxic, kind, stream, attributes, toxicity)
            toxics.append([proxy, toxic])
        return {**detail, "toxics": toxics, "attributes": plan[0][3] if plan else {}}

    def stop(self, nemesis: "Nemesis", detail: dict) -> None:
        for proxy, toxic in detail["toxics"]:
            nemesis.faults.remove_toxic(proxy, toxic)


def _both(proxies: list[str], kind: str, attributes: dict, toxicity: float = 1.0) -> list:
    return [(p, stream, kind, attributes, toxicity) for p in proxies for stream in ("upstream", "downstream")]


class OneWay(_Toxics):
    name = "one-way"
    goal = ("the leader can send but not receive (timeout-0 toxic on the replies to it and the requests to it): "
            "no livelock, a new leader holds, the old one cannot win back")
    deposes_leader = True
    expects_step_down = True

    def plan(self, nemesis):
        leader = nemesis.leader()
        plan = []
        for other in nemesis.topo.node_ids:
            if other != leader:
                plan.append((peer_proxy(leader, other), "downstream", "timeout", {"timeout": 0}, 1.0))
                plan.append((peer_proxy(other, leader), "upstream", "timeout", {"timeout": 0}, 1.0))
        return plan, {"nodes": [leader]}


class BlackHole(_Toxics):
    name = "black-hole"
    goal = ("the leader's peer links swallow every byte (timeout 0 both ways, connections hang): RPC timeouts "
            "fire, a new leader is elected, nothing hangs")
    deposes_leader = True
    expects_step_down = True

    def plan(self, nemesis):
        leader = nemesis.leader()
        return _both(nemesis.topo.links_of(leader), "timeout", {"timeout": 0}), {"nodes": [leader]}


class Latency(_Toxics):
    name = "latency"
    goal = "200 ms +- 150 ms on every peer link, both ways: no spurious elections, commits continue"

    def plan(self, nemesis):
        return _both(nemesis.topo.peer_proxies, "latency", {"latency": 200, "jitter": 150}), {}


class Bandwidth(_Toxics):
    name = "bandwidth"
    goal = "the leader->follower link starved to 16 KB/s under load: the follower lags, then catches up"

    def plan(self, nemesis):
        leader, follower = nemesis.leader(), nemesis.follower()
        return _both([peer_proxy(leader, follower)], "bandwidth", {"rate": 16}), {"nodes": [leader, follower]}


class Slicer(_Toxics):
    name = "slicer"
    goal = "every peer stream cut into 64 +- 32 byte slices 100 us apart: fragmented bodies still decode"

    def plan(self, nemesis):
        attributes = {"average_size": 64, "size_variation": 32, "delay": 100}
        return _both(nemesis.topo.peer_proxies, "slicer", attributes), {}


class LimitData(_Toxics):
    name = "limit-data"
    goal = ("every peer connection is closed after 3000 bytes each way: torn msgpack bodies are refused, never "
            "applied; replication goes on over new connections")

    def plan(self, nemesis):
        return _both(nemesis.topo.peer_proxies, "limit_data", {"bytes": 3000}), {}


class ResetPeer(_Toxics):
    name = "reset-peer"
    goal = ("half the client connections get a TCP RST instead of the answer (the request was delivered): the "
            "client retries with the same idempotency key, no job is created twice")

    def plan(self, nemesis):
        plan = [(client_proxy(n), "downstream", "reset_peer", {"timeout": 0}, 0.5) for n in nemesis.topo.node_ids]
        return plan, {}


# ---------------------------------------------------------------------------- processes: nodes


class _KillRestart(Fault):
    def targets(self, nemesis: "Nemesis") -> list[str]:
        raise NotImplementedError

    def start(self, nemesis):
        nodes = self.targets(nemesis)
        for node_id in nodes:
            nemesis.cluster.kill(node_id)
        return {"nodes": nodes}

    def stop(self, nemesis, detail):
        for node_id in detail["nodes"]:
            nemesis.ensure_running(node_id)


class KillLeader(_KillRestart):
    name = "kill-leader"
    goal = ("kill -9 the leader, restart it later: a new leader within an election timeout; the restarted node "
            "catches up")
    deposes_leader = True

    def targets(self, nemesis):
        return [nemesis.leader()]


class KillFollower(_KillRestart):
    name = "kill-follower"
    goal = "kill -9 a follower, restart it later: no client-visible effect; it catches up"

    def targets(self, nemesis):
        return [nemesis.follower()]


class KillAll(_KillRestart):
    name = "kill-all"
    goal = "kill -9 every node at once, restart all: term, vote and log were durable; nothing acknowledged is lost"
    deposes_leader = True

    def hold_s(self, timing):
        return min(timing.hold_s, 3.0)

    def targets(self, nemesis):
        return list(nemesis.topo.node_ids)


class LoseUnsynced(_KillRestart):
    name = "lose-unsynced"
    goal = ("kill -9 the leader and cut its WAL back to what it had fsynced (lazyfs-style, the NATS 2.12.1 loss): "
            "nothing it acknowledged may be lost")
    deposes_leader = True
    needs_fsync_marker = True

    def targets(self, nemesis):
        return [nemesis.leader()]

    def start(self, nemesis):
        detail = super().start(nemesis)
        detail["cut"] = {n: fsync_marker.cut_to_marker(nemesis.topo.wal_dir(n)) for n in detail["nodes"]}
        return detail


class LoseUnsyncedAll(LoseUnsynced):
    name = "lose-unsynced-all"
    goal = ("kill -9 every node and cut every WAL back to what was fsynced (a power cut of the whole cluster): "
            "nothing acknowledged may be lost")

    def hold_s(self, timing):
        return min(timing.hold_s, 3.0)

    def targets(self, nemesis):
        return list(nemesis.topo.node_ids)


class PauseLeader(Fault):
    name = "pause-leader"
    goal = ("SIGSTOP the leader for 3x the election timeout, then SIGCONT: the resumed old leader serves nothing "
            "stale and hands out no job (no ack-final or lease violation)")
    deposes_leader = True

    def hold_s(self, timing):
        return max(timing.hold_s, 3 * timing.election_timeout_s)

    def start(self, nemesis):
        leader = nemesis.leader()
        nemesis.cluster.pause(leader)
        return {"nodes": [leader]}

    def stop(self, nemesis, detail):
        for node_id in detail["nodes"]:
            nemesis.cluster.resume(node_id)


class PauseFollower(PauseLeader):
    name = "pause-follower"
    goal = "SIGSTOP a follower, then SIGCONT: no client-visible effect; it catches up"
    deposes_leader = False

    def hold_s(self, timing):
        return timing.hold_s

    def start(self, nemesis):
        follower = nemesis.follower()
        nemesis.cluster.pause(follower)
        return {"nodes": [follower]}


class Nats7567(Fault):
    name = "nats-7567"
    goal = ("the nats-server #7567 split-brain recipe: SIGSTOP a and b; kill -9 c; restart c; SIGCONT a and b; "
            "SIGSTOP c; later SIGCONT c: no split brain, every replica converges")

    def start(self, nemesis):
        leader = nemesis.leader()
        ids = list(nemesis.topo.node_ids)
        nemesis.rng.shuffle(ids)
        c, paused = ids[0], ids[1:3]
        for node_id in paused:
            nemesis.cluster.pause(node_id)
        nemesis.step(self.name, f"SIGSTOP {', '.join(paused)}")
        nemesis.cluster.kill(c)
        nemesis.step(self.name, f"kill -9 {c}")
        nemesis.cluster.start_node(c)
        nemesis.step(self.name, f"restarted {c}")
        for node_id in paused:
            nemesis.cluster.resume(node_id)
        leader_possible_t = time.monotonic()  # a majority runs again (history times are monotonic)
        nemesis.step(self.name, f"SIGCONT {', '.join(paused)}")
        nemesis.cluster.pause(c)
        nemesis.history.event("nemesis", proc="nemesis", phase="step", fault=self.name, message=f"SIGSTOP {c}")
        # Only when c led must a new leader come (a paused leader resumes its office).
        return {"nodes": ids[:3], "stopped": c, "paused_first": paused, "leader": leader, "deposes_leader": c == leader,
                "leader_possible_t": leader_possible_t}

    def stop(self, nemesis, detail):
        nemesis.cluster.resume(detail["stopped"])


# ---------------------------------------------------------------------------- processes: workers


class WorkerKill(Fault):
    name = "worker-kill"
    goal = ("kill -9 a worker holding leases: its jobs come back after the heartbeat timeout (or lease expiry) "
            "to other workers, counted as an attempt; a replacement worker starts at the heal")

    def start(self, nemesis):
        victim, holding = nemesis.worker_victim()
        if victim is None:
            return {"workers": []}
        nemesis.workers.kill(victim)
        return {"workers": [victim], "holding": holding}

    def stop(self, nemesis, detail):
        if detail["workers"]:
            replacement = nemesis.workers.spawn()
            detail["replacement"] = replacement


class WorkerPause(Fault):
    name = "worker-pause"
    goal = ("SIGSTOP a worker past the heartbeat timeout, then SIGCONT: its jobs were requeued to others, and "
            "its late acks must be refused (409), never accepted on a lease it lost")

    def hold_s(self, timing):
        return max(timing.hold_s, timing.worker_timeout_s + 2.0)

    def start(self, nemesis):
        victim, holding = nemesis.worker_victim()
        if victim is None:
            return {"workers": []}
        nemesis.workers.pause(victim)
        return {"workers": [victim], "holding": holding}

    def stop(self, nemesis, detail):
        for worker_id in detail["workers"]:
            nemesis.workers.resume(worker_id)


# ---------------------------------------------------------------------------- clocks


#: How far a skewed node's wall clock is off (seconds), drawn per fault: seconds to a day, both
#: ways; None = a true clock at start, stepped by CLOCK_STEP_S once the node leads (an NTP step).
CLOCK_OFFSETS_S = (-86_400.0, -3_600.0, -90.0, 90.0, 3_600.0, 86_400.0, None)
CLOCK_STEP_S = 3_600.0


class ClockSkew(Fault):
    name = "clock-skew"
    goal = ("a node whose wall clock is off by seconds to a day (libfaketime; monotonic time true), or steps by "
            "an hour while it leads, is made leader, then restarted with a true clock so leadership moves on: "
            "no delay or lease ends early, none much late (the timing check)")

    def start(self, nemesis):
        node_id = nemesis.follower()
        offset_s = nemesis.rng.choice(CLOCK_OFFSETS_S)
        clock = SkewedClock(faketime.library_path(install=True),
                            os.path.join(nemesis.cluster.base_dir, f"{node_id}.faketime"), offset_s or 0.0)
        nemesis.cluster.terminate(node_id)
        nemesis.cluster.nodes[node_id].env = clock.env
        nemesis.cluster.start_node(node_id)
        nemesis.step(self.name, f"{node_id} restarted with its wall clock off by {offset_s or 0:+g} s")
        led = True
        try:
            nemesis.cluster.move_leader_to(node_id, timeout_s=nemesis.timing.election_timeout_s * 15)
        except TimeoutError as exc:  # the fault still ran: the node served as a follower
            led = False
            log.warning("nemesis %s: %s", self.name, exc)
        if offset_s is None:
            clock.set_offset(CLOCK_STEP_S)
        return {"nodes": [node_id], "offset_s": offset_s or 0.0, "stepped_s": CLOCK_STEP_S if offset_s is None else 0.0,
                "led": led}

    def stop(self, nemesis, detail):
        for node_id in detail["nodes"]:
            nemesis.cluster.terminate(node_id)  # if it leads, the others elect: leadership moves on
            nemesis.cluster.nodes[node_id].env = {}
            nemesis.cluster.start_node(node_id)


# ---------------------------------------------------------------------------- disks


class DiskDamage(Fault):
    name = "disk-damage"
    goal = ("kill -9 a follower and damage one of its files at rest (cut the WAL tail; flip a bit mid-WAL, in the "
            "newest snapshot or in the hard state), restart it: it recovers (tail cut, older snapshot plus the "
            "log) or refuses to start naming the file; the other two keep serving; nothing acknowledged is lost")

    def start(self, nemesis):
        node_id = nemesis.follower()
        node = nemesis.cluster.nodes[node_id]
        nemesis.cluster.kill(node_id)
        damaged = disk_damage.damage(node.data_dir, nemesis.rng.choice(disk_damage.KINDS), nemesis.rng)
        log_offset = os.path.getsize(node.log_path) if os.path.exists(node.log_path) else 0
        nemesis.cluster.start_node(node_id)
        return {"nodes": [node_id], **damaged, "log_offset": log_offset}

    def stop(self, nemesis, detail):
        node_id = detail["nodes"][0]
        node = nemesis.cluster.nodes[node_id]
        refused = not node.alive
        named = False
        if refused:
            text = nemesis.cluster.log_text(node_id)[detail["log_offset"]:]
            named = bool(detail["file"]) and detail["file"] in text
        # Judged by the checker: a node must refuse to start on damaged durable data, and say which file.
        nemesis.history.event("damage", proc="nemesis", node=node_id, kind=detail["kind"], file=detail["file"],
                              refused=refused, named=named, must_refuse=detail["kind"] in disk_damage.MUST_REFUSE)
        if refused:
            # What an operator does: wipe the node; it rejoins empty and gets the leader's snapshot.
            log.info("nemesis %s: %s refused to start (%s); wiping its data", self.name, node_id, detail["file"])
            shutil.rmtree(node.data_dir, ignore_errors=True)
            nemesis.cluster.start_node(node_id)
        else:
            nemesis.ensure_running(node_id)


#: Queue of the jobs the disk-full fault submits to make the leader's log grow (no worker takes them).
DISK_FULL_QUEUE = "chaos-disk-full"


class DiskFull(Fault):
    name = "disk-full"
    goal = ("fill the leader's data filesystem (each node has a small one of its own), then submit more than the "
            "room its log reserved ahead (wal.PREALLOCATE_BYTES): it must stop once its log needs room it cannot "
            "get (one ERROR line naming the file and ENOSPC, exit non-zero), another node leads, nothing "
            "acknowledged is lost; then free the space and restart it: it catches up")
    deposes_leader = True
    needs_data_disks = True

    def start(self, nemesis):
        node_id = nemesis.leader()
        node = nemesis.cluster.nodes[node_id]
        log_offset = os.path.getsize(node.log_path) if os.path.exists(node.log_path) else 0
        filler = data_disks.fill(node.data_dir)
        _outgrow_reserved_log_room(nemesis, node)
        return {"nodes": [node_id], "leader": node_id, "filler": filler, "log_offset": log_offset}

    def stop(self, nemesis, detail):
        node_id = detail["nodes"][0]
        node = nemesis.cluster.nodes[node_id]
        # Judged by the checker: a node that cannot write must stop (fail-stop), saying which file.
        stopped = node.process is not None and node.process.poll() is not None
        text = nemesis.cluster.log_text(node_id)[detail["log_offset"]:]
        named = "cannot write to disk: [Errno 28]" in text
        nemesis.history.event("disk_full", proc="nemesis", node=node_id, stopped=stopped,
                              exit_code=node.process.returncode if stopped else None, named=named)
        data_disks.free(detail["filler"])
        if not stopped:
            nemesis.cluster.kill(node_id)  # still running on a full disk: the checker reports it
        nemesis.ensure_running(node_id)


def _outgrow_reserved_log_room(nemesis, node) -> None:
    """Submits, to DISK_FULL_QUEUE, more bytes than the WAL grows its file ahead of its records, so
    the leader on the full disk must ask it for room; stops once that node has exited."""
    from raftq import Client, errors

    pad = "x" * (16 << 10)
    batch = [{"pad": pad}] * 8
    batches = (PREALLOCATE_BYTES + (256 << 10)) // (len(batch) * len(pad)) + 1
    with Client(nemesis.cluster.urls, timeout=5.0, deadline=10.0) as client:
        for _ in range(batches):
            if node.process is None or node.process.poll() is not None:
                return
            try:
                client.submit_many(DISK_FULL_QUEUE, batch)
            except errors.RaftqError:
                return  # no leader answered in time: the fault's judgement says what happened


FAULTS: dict[str, type[Fault]] = {cls.name: cls for cls in (
    IsolateLeader, IsolateFollower, RandomHalves, Bridge, OneWay, BlackHole, Latency, Bandwidth, Slicer, LimitData,
    ResetPeer, KillLeader, KillFollower, KillAll, PauseLeader, PauseFollower, Nats7567, LoseUnsynced,
    LoseUnsyncedAll, WorkerKill, WorkerPause, ClockSkew, DiskDamage, DiskFull)}


# ---------------------------------------------------------------------------- the nemesis


class Nemesis:
    """Starts and heals faults, recording each step in the history."""

    def __init__(self, topo: Topology, workers: WorkerPool, history: HistoryWriter, rng: random.Random,
                 timing: Timing, monitor=None) -> None:
        self.topo = topo
        self.cluster = topo.cluster
        self.faults = topo.faults
        self.workers = workers
        self.history = history
        self.rng = rng
        self.timing = timing
        self.monitor = monitor
        self._instances = 0
        self._pinned_leader: str | None = None

    # ------------------------------------------------------------------ who is who

    def leader(self, timeout_s: float = 30.0) -> str:
        """The serving leader; waits for one (polling) up to timeout_s, else a random live node."""
        if self._pinned_leader is not None:
            return self._pinned_leader
        try:
            return self.cluster.wait_for_leader(timeout_s)
        except TimeoutError:
            live = [n for n, p in self.cluster.nodes.items() if p.alive and not p.paused] or list(self.cluster.nodes)
            return self.rng.choice(sorted(live))

    def follower(self) -> str:
        leader = self.leader()
        return self.rng.choice([n for n in self.topo.node_ids if n != leader])

    def worker_victim(self, timeout_s: float = 5.0) -> tuple[str | None, list[str]]:
        """A live worker that holds leases right now (the leader's /v1/workers table), polled for up
        to timeout_s; else any live worker. Returns (worker id, the jobs it held)."""
        live = self.workers.live()
        if not live:
            return None, []
        from raftq import Client, errors

        deadline = time.monotonic() + timeout_s
        with Client(self.cluster.urls, timeout=2.0, deadline=2.0) as client:
            while time.monotonic() < deadline:
                try:
                    table = client.workers()
                except errors.RaftqError:
                    table = []
                holding = sorted((row["worker"], row["jobs"]) for row in table
                                 if row.get("jobs") and row["worker"] in live)
                if holding:
                    worker, jobs = self.rng.choice(holding)
                    return worker, list(jobs)
                time.sleep(0.02)  # polling interval
        return self.rng.choice(live), []

    def step(self, fault: str, message: str) -> None:
        """Records one step of a multi-step fault, then lets it take effect for step_s."""
        self.history.event("nemesis", proc="nemesis", phase="step", fault=fault, message=message)
        log.info("nemesis %s: %s", fault, message)
        time.sleep(self.timing.step_s)  # a deliberate gap between fault steps, not a wait for a condition

    def ensure_running(self, node_id: str) -> None:
        node = self.cluster.nodes[node_id]
        if node.alive and node.paused:
            self.cluster.resume(node_id)
        elif not node.alive:
            self.cluster.start_node(node_id)

    # ------------------------------------------------------------------ start / stop

    def start(self, name: str) -> dict:
        """Starts one fault; its window opens with the `start` event, written before the damage."""
        fault = FAULTS[name]()
        self._instances += 1
        term = self.monitor.term() if self.monitor is not None else None
        leader = self.leader() if fault.deposes_leader or fault.expects_step_down else None
        self.history.event("nemesis", proc="nemesis", phase="start", fault=name, instance=self._instances,
                           goal=fault.goal, deposes_leader=fault.deposes_leader,
                           expects_step_down=fault.expects_step_down, leader=leader, term=term)
        log.info("nemesis start %s #%d: %s", name, self._instances, fault.goal)
        self._pinned_leader = leader  # the fault acts on the leader named in its start event
        try:
            detail = fault.start(self)
        finally:
            self._pinned_leader = None
        self.history.event("nemesis", proc="nemesis", phase="detail", fault=name, instance=self._instances,
                           detail=detail)
        log.info("nemesis %s #%d: %s", name, self._instances, detail)
        return {"instance": self._instances, "fault": name, "detail": detail, "hold_s": fault.hold_s(self.timing)}

    def stop(self, instance: dict) -> None:
        fault = FAULTS[instance["fault"]]()
        fault.stop(self, instance["detail"])
        self.history.event("nemesis", proc="nemesis", phase="stop", fault=instance["fault"],
                           instance=instance["instance"], detail=instance["detail"])
        log.info("nemesis stop %s #%d", instance["fault"], instance["instance"])

    def heal_all(self) -> None:
        """Every proxy reset, every node and worker resumed, every dead node started."""
        self.faults.reset()
        for node_id in self.topo.node_ids:
            self.ensure_running(node_id)
        self.workers.resume_all()
        self.history.event("nemesis", proc="nemesis", phase="heal-all")
