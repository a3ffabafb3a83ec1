"""The simulation: N RaftNode + QueueStateMachine pairs on SimStorage, a SimNetwork, a nemesis,
a client workload and the invariant checker, all driven by one `random.Random(seed)`.

Theory of operation
-------------------
Time is one global tick counter. One step of the simulation is:

1. the nemesis acts (partition, heal, crash, restart, new network profile), until the faults stop;
2. the network delivers every message due by this tick, to nodes that are up, in a total order;
3. every node that is up ticks, in an order shuffled by the rng;
4. the workload proposes on the node(s) that believe they lead;
5. every node that is up handles its Readys with the node's own Ready handler
   (`cluster/ready_handler.py`, which the asyncio shell in server.py drives too): install
   `ready.snapshot` if any, write hard_state + entries, sync if `must_sync`, send messages (a
   leader with no new term or vote sends before it writes), apply committed entries to its
   QueueStateMachine (and start a snapshot if due), serve read states, advance. A crash
   scheduled for this node stops it at a chosen point of that sequence; unsynced writes may be
   lost;
6. the invariants are checked (`invariants.py`).

Snapshots and compaction (Raft §7), as the server does them. After applying a batch, a node whose
applied index is `snapshot_every_entries` past its snapshot captures `QueueStateMachine.snapshot()`
at (applied, term of that entry); the file becomes durable `snapshot_write_ticks` later (0: before
the next Ready; a crash before then loses it), the disk keeps the newest two, and then the core
drops its entries up to `snapshot - compact_keep_entries` (`RaftNode.compact`) and the log on disk
up to that or the older kept snapshot, whichever is lower, so that a damaged newest snapshot
could fall back on the older one plus the log. Every step starts with the shell's snapshot events
(`_snapshot_events`): finished snapshot writes, and reports of failed transfers.

A SNAP message in a Ready becomes a `Transfer`: it carries the leader's newest snapshot file
(what `SnapshotSender` streams), travels the network like any message (lost, cut, delayed,
duplicated, reordered), and on arrival the follower's shell stores the file durably and then
steps a SNAP message naming the file's point into its core. The leader's core hears how the
transfer ended (`report_snapshot`): delivered at arrival; failed `1..transfer_failure_ticks_max`
ticks after the network dropped it or the follower crashed holding it (the HTTP error the real
sender sees), and only by the incarnation that started it. When the core installs a snapshot
(`Ready.snapshot`) the shell restores a fresh QueueStateMachine from the stored file and
resets its log to an empty one after the point, before anything else in that Ready. With
`snapshot_fault_probability`, a node crashes while receiving or installing: with the file stored
but not stepped, before the install, in the middle of the log reset (a prefix of the old log
survives), or after it but before the Ready's writes. A restart (`restart`) mirrors the server's
`_recover`: restore the newest snapshot, drop the log if it does not continue it, and give the
core the snapshot point and the log from `compact_keep_entries` before it.

After `steps` ticks the faults stop: every node is restarted, the network heals (or keeps one
minority fault, the liveness mode), and the workload only retries unacknowledged submits and
proposes one probe. Within `liveness_ticks_max` a leader must commit a new entry; within
`final_ticks_max` the probe must be acknowledged and every node connected to the leader must have
applied everything, with equal digests; then every acknowledged job id must be in the leader's
state machine. Both bounds grow by the time a follower needs to catch up the longest log at the
configured append size and pipelining (`_catch_up_ticks`).

The same seed gives the same run: only the seeded rng decides anything, nothing reads a clock,
and no set of str is iterated. `run_seed(seed, trace=True)` returns the trace of a run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import traceback
from dataclasses import dataclass, field
from typing import Any

from raftq.cluster.queue.state_machine import QueueStateMachine
from raftq.cluster.raft.codec import decode_message, encode_message
from raftq.cluster.raft.errors import RaftError, StepRejected
from raftq.cluster.raft.membership import Membership
from raftq.cluster.raft.messages import Entry, EntryKind, Message, MessageType, SnapshotPoint, snapshot_stored
from raftq.cluster.raft.node import RaftConfig, RaftNode, Ready, Role
from raftq.cluster import ready_handler, recovery
from raftq.cluster.ready_handler import Apply, InstallSnapshot, Persist, Send, ServeReads, UseMembership

from .faults import FINAL_FAULTS, Nemesis
from .invariants import Checker, Violation, describe_entry
from .network import CALM, NetworkConfig, SimNetwork, random_config
from .storage import SimStorage, StoredSnapshot, log_continues, log_first_index
from .workload import Workload

__all__ = ["SimConfig", "SimResult", "Simulation", "SimNode", "Transfer", "run_seed", "replay_command"]


#: Readys one node may produce in one step before the core counts as spinning: each Ready hands
#: out everything pending, so a healthy core needs two or three.
READY_COUNT_MAX = 64


@dataclass(frozen=True)
class SimConfig:
    """Options of one simulated run. None means "drawn from the seed"."""

    nodes: int = 3
    steps: int = 200  #: ticks with faults
    final_ticks_max: int = 300  #: ticks after the faults stop for liveness + convergence
    liveness_ticks_max: int | None = None  #: None = 10 election timeouts' base
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    pre_vote: bool | None = None
    check_quorum: bool | None = None
    max_entries_per_append: int | None = None
    max_inflight_appends: int | None = None
    network: NetworkConfig | None = None
    event_ticks_mean: int | None = None  #: mean ticks between nemesis actions
    election_fault_probability: float | None = None  #: strike new leaders / voters (faults.py)
    max_uncommitted_bytes: int | None = None  #: the leader's ProposalDropped bound (0 = none)
    restore_probability: float | None = None  #: per applied batch: rebuild the replica from its snapshot
    crashes: bool = True
    final_fault: str | None = "random"  #: "random" = drawn; None = heal all; else a FINAL_FAULTS name
    wire_codec: bool | None = None  #: round-trip every message through cluster.raft.codec
    digest_every_entry: bool = False  #: compare digests after every entry (slower)
    snapshot_every_entries: int | None = None  #: snapshot when applied is this far past the last one (0 = never)
    compact_keep_entries: int | None = None  #: entries kept behind a snapshot, in memory and on disk
    snapshot_write_ticks: int | None = None  #: ticks until a snapshot file is durable (0 = before the next Ready)
    transfer_failure_ticks_max: int | None = None  #: a failed snapshot transfer is reported within this
    snapshot_fault_probability: float | None = None  #: per snapshot received or installed: crash in the middle
    #: Nodes beyond `nodes` that start outside the membership, waiting to be added (0: a fixed
    #: membership, the runs of before membership changes existed, seed for seed).
    spare_nodes: int = 0
    #: With spare nodes: per tick, the leader tries a membership change or a transfer.
    membership_change_probability: float | None = None
    #: Applied entries' bytes each core keeps in memory; older ones are read back from the node's
    #: stored log when a follower needs them (raft/log.py, "Cold entries"). Not drawn, so seeds
    #: run as they did; 0 makes every applied entry cold, so every catch-up reads storage.
    warm_log_bytes: int = 0

    def defaults_changed(self) -> dict[str, Any]:
        base = SimConfig()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(base, f.name)}


@dataclass
class SimResult:
    seed: int
    ok: bool
    failure: str | None = None  # one line: the invariant and how it broke
    invariant: str | None = None
    tick: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    trace: list[str] | None = None
    details: str = ""  # traceback of an unexpected exception

    @property
    def trace_digest(self) -> str:
        return hashlib.sha256("\n".join(self.trace or ()).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Knobs:
    """The settings of one run: SimConfig's, with every None drawn from the seed."""

    pre_vote: bool
    check_quorum: bool
    max_entries_per_append: int
    max_inflight_appends: int
    network: NetworkConfig
    event_ticks_mean: int
    election_fault_probability: float
    max_uncommitted_bytes: int
    restore_probability: float
    final_fault: str | None
    wire_codec: bool
    snapshot_every_entries: int
    compact_keep_entries: int
    snapshot_write_ticks: int
    transfer_failure_ticks_max: int
    snapshot_fault_probability: float
    membership_change_probability: float = 0.0

    @classmethod
    def draw(cls, config: SimConfig, rng: random.Random) -> "Knobs":
        # Every knob is drawn, fixed or not and always in this order, so that fixing one knob
        # leaves the rest of a seed's run as it was.
        pre_vote = _pick(config.pre_vote, rng.random() < 0.85)
        check_quorum = _pick(config.check_quorum, rng.random() < 0.85)
        knobs = dict(
            max_entries_per_append=_pick(config.max_entries_per_append, rng.choice((1, 2, 8, 512))),
            max_inflight_appends=_pick(config.max_inflight_appends, rng.choice((1, 4, 64))),
            network=_pick(config.network, random_config(rng)),
            event_ticks_mean=_pick(config.event_ticks_mean, rng.choice((8, 15, 30))),
            election_fault_probability=_pick(config.election_fault_probability, rng.choice((0.0, 0.0, 0.3, 0.6))),
            max_uncommitted_bytes=_pick(config.max_uncommitted_bytes, rng.choice((64 << 20, 64 << 20, 0, 600))),
            restore_probability=_pick(config.restore_probability, rng.choice((0.0, 0.0, 0.05))),
        )
        final_fault_drawn = rng.choice(FINAL_FAULTS)
        final_fault = final_fault_drawn if config.final_fault == "random" else config.final_fault
        if not (pre_vote and check_quorum):
            final_fault = None  # without both, a minority fault may legitimately disrupt forever
        wire_codec = _pick(config.wire_codec, rng.random() < 0.25)
        # Snapshots every few entries, so that most seeds compact, and followers that fall behind
        # (crashed, cut off) need an InstallSnapshot rather than appends.
        knobs.update(
            snapshot_every_entries=_pick(config.snapshot_every_entries, rng.choice((5, 8, 12, 20, 40))),
            compact_keep_entries=_pick(config.compact_keep_entries, rng.choice((0, 0, 1, 3, 10))),
            snapshot_write_ticks=_pick(config.snapshot_write_ticks, rng.choice((0, 0, 1, 3))),
            transfer_failure_ticks_max=_pick(config.transfer_failure_ticks_max, rng.choice((1, 4, 12))),
            snapshot_fault_probability=_pick(config.snapshot_fault_probability, rng.choice((0.0, 0.1, 0.3))),
        )
        if config.spare_nodes:  # drawn only then: runs without spare nodes stay as they were
            drawn = _pick(config.membership_change_probability, rng.choice((0.05, 0.1, 0.25)))
            # Without pre-vote and check-quorum (which the node always runs), a removed node that
            # never heard of its removal may disrupt elections forever, and a removed leader may
            # lead on alone (thesis §4.2.3): membership changes need both.
            knobs["membership_change_probability"] = drawn if pre_vote and check_quorum else 0.0
        return cls(pre_vote=pre_vote, check_quorum=check_quorum, final_fault=final_fault, wire_codec=wire_codec,
                   **knobs)


class SimNode:
    """One node's shell: its storage (survives crashes), and while up, its core and state machine."""

    def __init__(self, node_id: str, raft_config: RaftConfig) -> None:
        self.node_id = node_id
        self.raft_config = raft_config
        self.storage = SimStorage()
        self.raft: RaftNode | None = None
        self.sm: QueueStateMachine | None = None
        self.incarnation = 0
        self.crash_point: str | None = None  # crash during the next Ready handling
        self.last_commit = 0
        self.applied_term = 0  # term of the entry at sm.last_applied (a snapshot's point needs it)
        self.snapshot_write: tuple[int, StoredSnapshot] | None = None  # (tick it is durable, snapshot)
        self.log_compacted_to = 0  # how far the log on disk was compacted by this incarnation

    @property
    def is_up(self) -> bool:
        return self.raft is not None

    @property
    def is_leader(self) -> bool:
        return self.raft is not None and self.raft.role is Role.LEADER


@dataclass(frozen=True, slots=True)
class Transfer:
    """A snapshot transfer in flight: the SNAP message the leader's core asked for, the newest
    snapshot file its shell held when it started, and the incarnation that started it (only that
    process hears how the transfer ended)."""

    message: Message
    snapshot: StoredSnapshot
    incarnation: int


def _describe(item: Message | Transfer) -> str:
    if isinstance(item, Transfer):
        m = item.message
        return f"SNAP-TRANSFER {m.from_id}->{m.to_id} t={m.term} snapshot {item.snapshot.describe()}"
    return _describe_message(item)


def _describe_message(m: Message) -> str:
    text = f"{m.type.name} {m.from_id}->{m.to_id} t={m.term}"
    if m.index or m.log_term:
        text += f" i={m.index} lt={m.log_term}"
    if m.entries:
        text += f" e=[{m.entries[0].index}..{m.entries[-1].index}]"
    if m.commit:
        text += f" c={m.commit}"
    if m.reject:
        text += f" REJECT hint={m.reject_hint}/{m.hint_term}"
    if m.context is not None:
        text += f" ctx={m.context}"
    return text


class Simulation:
    """See the module docstring."""

    def __init__(self, seed: int, config: SimConfig = SimConfig(), *, trace: bool = False) -> None:
        self.seed = seed
        self.rng = rng = random.Random(seed)
        self.trace_lines: list[str] | None = [] if trace else None
        log = self._log if trace else None
        self.tick = 0
        self.node_ids = tuple(f"n{i}" for i in range(1, config.nodes + config.spare_nodes + 1))
        #: the voters a fixed membership has; spare nodes start outside it, waiting to be added
        self.founders = self.node_ids[:config.nodes]
        self.knobs = knobs = Knobs.draw(config, rng)
        self.config = config
        self.liveness_ticks_max = config.liveness_ticks_max or 10 * config.election_ticks
        self.nodes: dict[str, SimNode] = {}
        for node_id in self.node_ids:
            raft_config = RaftConfig(
                node_id=node_id, peer_ids=tuple(p for p in self.founders if p != node_id) if node_id in self.founders else (),
                election_ticks=config.election_ticks, heartbeat_ticks=config.heartbeat_ticks,
                pre_vote=knobs.pre_vote, check_quorum=knobs.check_quorum,
                max_entries_per_append=knobs.max_entries_per_append,
                max_inflight_appends=knobs.max_inflight_appends, max_uncommitted_bytes=knobs.max_uncommitted_bytes,
                warm_log_bytes=config.warm_log_bytes,
            )
            self.nodes[node_id] = SimNode(node_id, raft_config)
        self.network = SimNetwork(rng, self.node_ids, knobs.network, trace=log, on_drop=self._on_drop)
        self.checker = Checker(self.node_ids)
        self.workload = Workload(rng, self.nodes, trace=log)
        self.nemesis = Nemesis(rng, self, event_ticks_mean=knobs.event_ticks_mean, crashes=config.crashes,
                               election_fault_probability=knobs.election_fault_probability,
                               snapshot_fault_probability=knobs.snapshot_fault_probability, trace=log)
        self.roles: dict[str, tuple[Role, int] | None] = {n: None for n in self.node_ids}
        # Failed transfers the leaders' shells will notice: (tick, order, transfer).
        self._transfer_failures: list[tuple[int, int, Transfer]] = []
        self._transfer_seq = 0
        self._written_configs: dict[tuple[int, int], Membership] = {}  # (index, term) -> membership
        self.stats: dict[str, Any] = {
            "step_rejected": 0, "codec_messages": 0, "snapshots_taken": 0, "snapshots_lost": 0,
            "snapshots_installed": 0, "snapshots_received": 0, "snapshot_restarts": 0, "log_resets": 0,
            "transfers": 0, "transfers_failed": 0, "entries_compacted": 0,
        }
        if config.spare_nodes:
            self.stats.update({"members_added": 0, "members_removed": 0, "leader_transfers": 0,
                               "changes_refused": 0})
        self._log(f"seed={seed} nodes={config.nodes} {knobs}")
        for node_id in self.node_ids:
            self.restart(node_id)

    # ------------------------------------------------------------------ trace

    def _log(self, line: str) -> None:
        if self.trace_lines is not None:
            self.trace_lines.append(f"t={self.tick:04d} {line}")

    # ------------------------------------------------------------------ node life

    def restart(self, node_id: str) -> None:
        """Starts a node from its disk by the node's own rules (cluster/recovery.py): the newest
        snapshot restored into the state machine, the log dropped if it does not continue that
        snapshot, the core given the snapshot point and the log from `compact_keep_entries`
        before it, and the membership the snapshot recorded."""
        node = self.nodes[node_id]
        assert not node.is_up
        hard_state, snapshot, log = node.storage.recovered_state()
        node.incarnation += 1
        sm = QueueStateMachine()
        point = SnapshotPoint()
        try:  # the server refuses to start (StartupError): committed entries are gone
            recovery.check_log_reaches(None if snapshot is None else snapshot.index, log_first_index(log))
        except recovery.RecoveryRefused as exc:
            raise Violation("the log on disk reaches back to the newest snapshot", f"{node_id}: {exc}") from None
        if snapshot is None:
            entries = list(log.entries)
        else:
            sm.restore(snapshot.data)
            self.checker.check_restored(node_id, snapshot.index, sm.digest(), "restarted from its snapshot")
            snapshot_point = SnapshotPoint(snapshot.index, snapshot.term)
            if not log_continues(log, snapshot):
                self._log(f"{node_id} log {log.base + 1}..{log.last_index} does not continue snapshot "
                          f"{snapshot.describe()}: dropped")
                node.storage.reset_log(snapshot)
                self.stats["log_resets"] += 1
                log = node.storage.durable
            first = recovery.first_entry_to_load(snapshot.index, log.base + 1, self.knobs.compact_keep_entries)
            entries = log.entries[first - log.base - 1 :]
            point = snapshot_point
            self.stats["snapshot_restarts"] += 1
        # Founders bootstrap from the core's peer ids (the simulator has no URLs).
        membership = recovery.membership_at_start(sm.membership, joining=node_id not in self.founders, founders=None)
        storage = node.storage
        node.raft = RaftNode(node.raft_config, hard_state=hard_state, entries=entries,
                             rng=random.Random(self.rng.getrandbits(64)), snapshot=point, membership=membership,
                             load_entries=lambda lo, hi: [storage.view.entry(i) for i in range(lo, hi + 1)])
        node.sm = sm
        node.applied_term = point.term
        node.last_commit = 0
        node.crash_point = None
        node.snapshot_write = None
        node.log_compacted_to = 0
        self.network.set_down(node_id, False)
        last = f" (last {entries[-1].index}/{entries[-1].term})" if entries else ""
        self._log(f"{node_id} start #{node.incarnation}: term={hard_state.term} vote={hard_state.voted_for} "
                  f"snapshot={point.index}/{point.term} log={len(entries)}{last}")

    def schedule_crash(self, node_id: str, point: str) -> None:
        node = self.nodes[node_id]
        if not node.is_up:
            return
        if point == "idle":
            self._crash(node, point)
        else:
            node.crash_point = point

    def cancel_crashes(self) -> None:
        for node in self.nodes.values():
            node.crash_point = None

    def _crash(self, node: SimNode, point: str) -> None:
        report = node.storage.crash(self.rng, keep_unsynced_prefix=self.rng.random() < 0.5)
        self._log(f"{node.node_id} CRASH at {point}: {report.unsynced_writes} unsynced writes, "
                  f"{report.kept_writes} kept; log {report.entries_before} -> {report.entries_after}")
        self.workload.on_crash(node.node_id, node.incarnation)
        if node.snapshot_write is not None:
            self.stats["snapshots_lost"] += 1  # its temporary file is deleted at the next start
        node.raft = None
        node.sm = None
        node.crash_point = None
        node.snapshot_write = None
        self.roles[node.node_id] = None
        self.network.set_down(node.node_id, True)

    def current_leader_id(self) -> str | None:
        """The up node that believes it leads with the highest term (None if none)."""
        best: tuple[int, str] | None = None
        for node_id in self.node_ids:
            node = self.nodes[node_id]
            if node.is_leader and (best is None or node.raft.term > best[0]):
                best = (node.raft.term, node_id)
        return best[1] if best else None

    # ------------------------------------------------------------------ one step

    def step(self, faults: bool) -> None:
        self.tick += 1
        self.workload.tick = self.tick
        if faults:
            self.nemesis.act(self.tick)
        self._snapshot_events()
        for src, dst, message, duplicate in self.network.deliver(self.tick):
            node = self.nodes[dst]
            if node.raft is None:  # crashed earlier in this loop
                self._on_drop(src, dst, message, duplicate)
                continue
            if self.trace_lines is not None:
                self._log(f"deliver{' (dup)' if duplicate else ''} {_describe(message)}")
            if isinstance(message, Transfer):
                message = self._receive_transfer(node, message, duplicate)
                if message is None:
                    continue
            try:
                node.raft.step(message)
            except StepRejected as exc:
                self.stats["step_rejected"] += 1
                self._log(f"{dst} StepRejected: {exc}")
        order = [n for n in self.node_ids if self.nodes[n].is_up]
        self.rng.shuffle(order)
        for node_id in order:
            self.nodes[node_id].raft.tick()
        self._observe_roles()
        self.workload.act(self.tick)
        self.workload.drop_expired_holds()
        if self.knobs.membership_change_probability and faults:
            self._change_membership()
        for node_id in order:
            node = self.nodes[node_id]
            if node.is_up:
                self._handle_readies(node)
            if node.is_up and node.crash_point is not None:
                self._crash(node, f"{node.crash_point} (no Ready this step)")
        self._observe_roles()
        self._check()

    def _could_commit(self, leader: SimNode) -> bool:
        """Whether a majority of the leader's voters are still at its term or below (a node that
        is down by the term on its disk: it comes back with it)."""
        voters = leader.raft.membership.voters
        term = leader.raft.term

        def node_term(node: SimNode) -> int:
            return node.raft.term if node.raft is not None else node.storage.durable_hard_state.term

        willing = sum(1 for v in voters if node_term(self.nodes[v]) <= term)
        return willing >= len(voters) // 2 + 1

    def _note_config_entries(self, entries: tuple[Entry, ...]) -> None:
        """Remembers every membership some node wrote: a leader counts a membership from the
        moment it appends it, so an entry may be committed under one that never commits."""
        for entry in entries:
            if entry.kind is EntryKind.CONFIG:
                self._written_configs[(entry.index, entry.term)] = Membership.decode(entry.data)

    def _change_membership(self) -> None:
        """Now and then the leader adds a spare node, removes a member or hands leadership on, as
        an operator would, while the nemesis keeps crashing and cutting nodes. At most five
        members, and a voter is removed only from four, so that three voters are left to survive
        the final fault."""
        if self.rng.random() >= self.knobs.membership_change_probability:
            return
        leader_id = self.current_leader_id()
        if leader_id is None:
            return
        raft = self.nodes[leader_id].raft
        membership = raft.membership
        action = self.rng.choice(("add", "remove", "transfer"))
        try:
            if action == "add":
                candidates = [n for n in self.node_ids if membership.get(n) is None and n not in membership.removed]
                if not candidates or len(membership.members) >= 5:
                    return
                node_id = self.rng.choice(candidates)
                raft.add_learner(node_id, f"sim://{node_id}")
                self.stats["members_added"] += 1
            elif action == "remove":
                candidates = [n for n in membership.ids if n != leader_id
                              and (not membership.is_voter(n) or len(membership.voters) >= 4)]
                if not candidates:
                    return
                node_id = self.rng.choice(candidates)
                raft.remove_member(node_id)
                self.stats["members_removed"] += 1
            else:
                node_id = self.rng.choice([None, *[v for v in membership.voters if v != leader_id]])
                node_id = raft.transfer_leadership(node_id)
                self.stats["leader_transfers"] += 1
        except RaftError as exc:
            self.stats["changes_refused"] += 1
            self._log(f"{leader_id} {action} refused: {exc}")
            return
        self._log(f"{leader_id} {action} {node_id}: membership now voters={raft.membership.voters} "
                  f"learners={raft.membership.learners}")

    def _observe_roles(self) -> None:
        for node_id in self.node_ids:
            node = self.nodes[node_id]
            if node.raft is None:
                continue
            now = (node.raft.role, node.raft.term)
            if now != self.roles[node_id]:
                self.roles[node_id] = now
                self._log(f"{node_id} is {now[0].name} term={now[1]} leader={node.raft.leader_id} "
                          f"commit={node.raft.commit_index} last={node.raft.last_index}")
            if now[0] is Role.LEADER:
                self.checker.observe_leader(node_id, now[1])

    def _handle_readies(self, node: SimNode) -> None:
        raft = node.raft
        for _ in range(READY_COUNT_MAX):
            if not raft.has_ready():
                return
            if not self._handle_ready(node, raft.ready()):
                return  # crashed inside
        raise Violation("the core quiesces", f"{node.node_id} still has a Ready after {READY_COUNT_MAX} in one step")

    def _handle_ready(self, node: SimNode, ready: Ready) -> bool:
        """Carries out one Ready in the order of the node's own handler (cluster/ready_handler.py),
        on in-memory storage and the simulated network. A crash scheduled for this node stops it
        at its point: before the write, after the write, after the sync, after the send, or
        before advance (any point the Ready's actions did not reach). Returns False if it crashed."""
        point = node.crash_point
        for action in ready_handler.handle_ready(ready):  # looked up per call: planted.py may swap it
            if isinstance(action, InstallSnapshot):
                if not self._install_snapshot(node, action.point):
                    return False
            elif isinstance(action, UseMembership):
                pass  # the simulated network routes by node id: there are no URLs to connect to
            elif isinstance(action, Persist):
                if point == "before_write":
                    self._crash(node, point)
                    return False
                node.storage.write(action.hard_state, action.entries)
                if self.config.spare_nodes:
                    self._note_config_entries(action.entries)
                if self.trace_lines is not None:
                    hs = action.hard_state
                    self._log(f"{node.node_id} write hs={None if hs is None else (hs.term, hs.voted_for)} "
                              f"entries={[f'{e.index}/{e.term}' for e in action.entries]} sync={action.sync}")
                if point == "after_write":
                    self._crash(node, point)
                    return False
                if action.sync:
                    node.storage.sync()
                if point == "after_sync":
                    self._crash(node, point)
                    return False
            elif isinstance(action, Send):
                for message in action.messages:
                    self._send(node, message)
                if point == "after_send":
                    self._crash(node, point)
                    return False
            elif isinstance(action, Apply):
                self._apply(node, action.entries)
            elif isinstance(action, ServeReads):
                for context, read_index in action.read_states:
                    self.workload.on_read_state(node, context, read_index)
            else:
                if point is not None:
                    self._crash(node, point if point == "after_apply" else f"{point} (reached before advance)")
                    return False
                node.raft.advance(action.ready)
        if node.snapshot_write is not None and node.snapshot_write[0] <= self.tick:
            self._finish_snapshot(node)  # written at once: compact before the next Ready
        return True

    def _send(self, node: SimNode, message: Message) -> None:
        if message.from_id != node.node_id or message.to_id not in self.nodes or message.to_id == node.node_id:
            raise Violation("messages are well addressed", f"{node.node_id} sent {message}")
        if message.type is MessageType.SNAP:
            self._start_transfer(node, message)
            return
        if message.type is MessageType.VOTE_RESP and not message.reject:
            self.checker.observe_vote(message.from_id, message.term, message.to_id)
        if self.knobs.wire_codec:
            decoded = decode_message(encode_message(message))
            self.stats["codec_messages"] += 1
            if decoded != message:
                raise Violation("codec round trip", f"{message} decoded as {decoded}")
            message = decoded
        self.network.send(message, message.from_id, message.to_id, self.tick,
                          _describe_message if self.trace_lines is not None else None)

    def _apply(self, node: SimNode, entries: tuple[Entry, ...]) -> None:
        if not entries:
            return
        node.applied_term = entries[-1].term
        sm = node.sm
        checker = self.checker
        term_bound = max(n.raft.term for n in self.nodes.values() if n.raft is not None)
        for entry in entries:
            result = sm.apply(entry)
            if self.trace_lines is not None:
                self._log(f"{node.node_id} apply {describe_entry(entry)}")
            checker.on_apply(node.node_id, entry, result, sm.clock_ms, term_bound)
            self.workload.on_apply(node, entry, result)
            if self.config.digest_every_entry:
                checker.on_applied_batch(node.node_id, sm.last_applied, sm.digest())
        samples = getattr(sm, "metric_samples", None)
        if samples:
            samples.clear()  # the server drains these latency samples after every applied batch
        digest = sm.digest()
        checker.on_applied_batch(node.node_id, sm.last_applied, digest)
        checker.check_replica_leases(node.node_id, sm.leased_by_worker())
        if self.knobs.restore_probability and self.rng.random() < self.knobs.restore_probability:
            self._restore_replica(node, digest)
        self._maybe_snapshot(node)

    def _restore_replica(self, node: SimNode, digest: str) -> None:
        """Replaces the replica by one restored from its snapshot (as an installed snapshot would):
        restore() must rebuild every queue, heap and counter exactly, or later results diverge."""
        restored = QueueStateMachine()
        restored.restore(node.sm.snapshot())
        if restored.digest() != digest:
            raise Violation("snapshot restore is exact", f"{node.node_id} at {node.sm.last_applied}: digest "
                            f"{restored.digest()[:12]} after restore, {digest[:12]} before")
        restored.check_invariants()
        node.sm = restored
        self.stats["restores"] = self.stats.get("restores", 0) + 1
        self._log(f"{node.node_id} state machine restored from its snapshot at {restored.last_applied}")

    # ------------------------------------------------------------------ snapshots

    def _maybe_snapshot(self, node: SimNode) -> None:
        """After a batch is applied: capture the state machine if the log grew enough since the
        last snapshot and no snapshot is being written (the server's `_maybe_snapshot`)."""
        every = self.knobs.snapshot_every_entries
        if not every or node.snapshot_write is not None:
            return
        index = node.sm.last_applied
        if index - node.raft.snapshot.index < every:
            return
        snapshot = StoredSnapshot(index, node.applied_term, node.sm.snapshot(), node.storage.view.hash_at(index))
        self.checker.on_snapshot_taken(node.node_id, snapshot)
        node.snapshot_write = (self.tick + self.knobs.snapshot_write_ticks, snapshot)

    def _finish_snapshot(self, node: SimNode) -> None:
        """The snapshot file is durable: keep the newest two, then compact the core's log and the
        log on disk (the server's `_drive_snapshot_events`)."""
        assert node.snapshot_write is not None
        _, snapshot = node.snapshot_write
        node.snapshot_write = None
        older_index = node.storage.store_snapshot(snapshot, retain=True)
        compaction = node.raft.compact_after_snapshot(SnapshotPoint(snapshot.index, snapshot.term),
                                                      keep_entries=self.knobs.compact_keep_entries)
        dropped = compaction.dropped_count
        # The log on disk keeps what the older snapshot needs, so a damaged newest one can fall back.
        log_upto = min(compaction.upto_index, older_index)
        dropped_on_disk = 0
        if log_upto > node.log_compacted_to:
            dropped_on_disk = node.storage.compact_log(log_upto)
            node.log_compacted_to = log_upto
        self.stats["snapshots_taken"] += 1
        self.stats["entries_compacted"] += dropped_on_disk
        durable = node.storage.durable
        self._log(f"{node.node_id} snapshot {snapshot.describe()} durable; core dropped {dropped} entries, "
                  f"disk {dropped_on_disk} (log now {durable.base + 1}..{durable.last_index})")

    def _snapshot_events(self) -> None:
        """What the shells learn between Readys: snapshot writes that finished, transfers that failed."""
        while self._transfer_failures and self._transfer_failures[0][0] <= self.tick:
            _, _, transfer = self._transfer_failures.pop(0)
            self._report_transfer(transfer, delivered=False)
        for node_id in self.node_ids:
            node = self.nodes[node_id]
            if node.is_up and node.snapshot_write is not None and node.snapshot_write[0] <= self.tick:
                self._finish_snapshot(node)

    def _start_transfer(self, node: SimNode, message: Message) -> None:
        """A SNAP message: the leader's shell sends its newest snapshot file (SnapshotSender)."""
        snapshot = node.storage.newest_snapshot
        if snapshot is None or snapshot.index < message.index:
            raise Violation("a snapshot request names a stored snapshot",
                            f"{node.node_id}'s core asks to send snapshot {message.index}/{message.log_term}; the "
                            f"newest stored is {snapshot.describe() if snapshot else None}")
        self.stats["transfers"] += 1
        self.network.send(Transfer(message, snapshot, node.incarnation), message.from_id, message.to_id, self.tick,
                          _describe if self.trace_lines is not None else None)

    def _receive_transfer(self, node: SimNode, transfer: Transfer, duplicate: bool) -> Message | None:
        """The follower's shell stores the file durably, then hands the core a SNAP message naming
        the file's point (the SnapshotReceiver); None if it crashed in between."""
        snapshot = transfer.snapshot
        node.storage.store_snapshot(snapshot, retain=False)
        self.stats["snapshots_received"] += 1
        if self._snapshot_fault(node, f"after storing snapshot {snapshot.describe()} from {transfer.message.from_id}"):
            if not duplicate:
                self._transfer_failed(transfer)
            return None
        if not duplicate:
            self._report_transfer(transfer, delivered=True)
        m = transfer.message
        return snapshot_stored(m.from_id, m.to_id, m.term, SnapshotPoint(snapshot.index, snapshot.term))

    def _on_drop(self, src: str, dst: str, item: object, duplicate: bool) -> None:
        """The network dropped a message; a transfer's sender notices (its copy, not a duplicate)."""
        if isinstance(item, Transfer) and not duplicate:
            self._transfer_failed(item)

    def _transfer_failed(self, transfer: Transfer) -> None:
        self._transfer_seq += 1
        tick = self.tick + self.rng.randint(1, self.knobs.transfer_failure_ticks_max)
        self._transfer_failures.append((tick, self._transfer_seq, transfer))
        self._transfer_failures.sort(key=_first_two)
        self.stats["transfers_failed"] += 1

    def _report_transfer(self, transfer: Transfer, *, delivered: bool) -> None:
        m = transfer.message
        leader = self.nodes[m.from_id]
        if leader.raft is None or leader.incarnation != transfer.incarnation:
            return  # the process that started it is gone, and its sender with it
        leader.raft.report_snapshot(m.to_id, delivered=delivered)
        self._log(f"{m.from_id} report_snapshot({m.to_id}, delivered={delivered}) for {transfer.snapshot.describe()}")

    def _install_snapshot(self, node: SimNode, point: SnapshotPoint) -> bool:
        """Ready.snapshot: restore the state machine from the stored file and reset the log to an
        empty one after the point, before the rest of the Ready. Returns False if it crashed."""
        stored = node.storage.snapshot_at(point.index, point.term)
        if stored is None:
            raise Violation("the core installs a snapshot the shell stored",
                            f"{node.node_id} installs {point.index}/{point.term}; stored: "
                            f"{[s.describe() for s in node.storage.snapshots]}")
        if self._snapshot_fault(node, f"before installing snapshot {stored.describe()}"):
            return False
        self._restore_installed(node, stored)
        node.raft.restore_membership(
            Membership.decode(node.sm.membership) if node.sm.membership is not None else None)
        if self.nemesis.snapshot_fault(node.node_id):
            end = node.storage.reset_log_interrupted(self.rng)
            self._crash(node, f"snapshot: resetting the log for {stored.describe()}, old log left up to {end}")
            return False
        node.storage.reset_log(stored)
        node.applied_term = stored.term
        node.log_compacted_to = 0
        self.checker.check_restored(node.node_id, point.index, node.sm.digest(), "installed a snapshot")
        node.sm.check_invariants()
        self.workload.on_snapshot_installed(node, point.index)
        self.stats["snapshots_installed"] += 1
        self._log(f"{node.node_id} installed snapshot {stored.describe()}")
        return not self._snapshot_fault(node, f"after installing {stored.describe()}, before the Ready's writes")

    def _restore_installed(self, node: SimNode, stored: StoredSnapshot) -> None:
        """A fresh state machine from the snapshot's bytes replaces the node's."""
        restored = QueueStateMachine()
        restored.restore(stored.data)
        node.sm = restored

    def _snapshot_fault(self, node: SimNode, where: str) -> bool:
        """Whether the nemesis crashes `node` here, in the middle of a snapshot's arrival (then it did)."""
        if not self.nemesis.snapshot_fault(node.node_id):
            return False
        self._crash(node, f"snapshot: {where}")
        return True

    # ------------------------------------------------------------------ invariants

    def _check(self) -> None:
        views = {}
        commits = {}
        for node_id in self.node_ids:
            node = self.nodes[node_id]
            if node.raft is None:
                continue
            commit = node.raft.commit_index
            if commit < node.last_commit:
                raise Violation("commit index never decreases",
                                f"{node_id} commit went {node.last_commit} -> {commit} without a restart")
            node.last_commit = commit
            views[node_id] = node.storage.view
            commits[node_id] = commit
            if node.raft.role is Role.LEADER:
                self.checker.check_leader(node_id, node.incarnation, node.raft.term, commit, node.storage.view)
            else:
                self.checker.forget_leader(node_id)
        storages = {node_id: self.nodes[node_id].storage for node_id in self.node_ids}
        voter_sets = None
        if self.config.spare_nodes:
            # A committed entry is durable on a majority of the voters it was committed under: the
            # committed membership, or one a leader appended since (in effect on append).
            # A stale leader whose voters have mostly moved to a later term cannot commit any
            # more (its appends are refused): only leaders that still could are compared.
            leaders = [self.nodes[n] for n in self.node_ids
                       if self.nodes[n].is_leader and self._could_commit(self.nodes[n])]
            self.checker.check_leader_memberships({n.node_id: n.raft.membership for n in leaders})
            committed_index = self.checker.memberships[-1][0] if self.checker.memberships else 0
            voter_sets = [self.checker.committed_membership(self.founders).voters]
            voter_sets += [m.voters for (index, _), m in sorted(self._written_configs.items()) if index > committed_index]
        self.checker.check_logs(views, commits, storages, voter_sets=voter_sets)

    # ------------------------------------------------------------------ a whole run

    def run(self) -> None:
        config = self.config
        for _ in range(config.steps):
            self.step(faults=True)
        self._log(f"faults stop; final fault: {self.knobs.final_fault}")
        self.network.configure(CALM)
        self.nemesis.stop(self.knobs.final_fault)
        self.workload.final = True
        self.workload.probe_from_tick = self.tick
        stop_tick = self.tick
        committed_at_stop = self.checker.ledger.last_index
        catch_up_ticks = self._catch_up_ticks()
        final_ticks_max = config.final_ticks_max + catch_up_ticks
        liveness_ticks_max = self.liveness_ticks_max + catch_up_ticks
        progress_tick = None
        while self.tick < stop_tick + final_ticks_max:
            self.step(faults=False)
            if progress_tick is None:
                if self.checker.ledger.last_index > committed_at_stop and self.current_leader_id() is not None:
                    progress_tick = self.tick
                elif self.tick - stop_tick > liveness_ticks_max:
                    raise Violation("liveness", f"no leader committed a new entry within {liveness_ticks_max} "
                                    f"ticks after the faults stopped (tick {stop_tick}); roles {self._roles_text()}")
            if progress_tick is not None and self.workload.liveness_tick is not None and self._converged():
                break
        else:
            raise Violation("convergence", f"nodes did not converge within {final_ticks_max} ticks after "
                            f"the faults stopped; {self._progress_text()}")
        self.stats["liveness_ticks"] = progress_tick - stop_tick
        self.stats["probe_ticks"] = self.workload.liveness_tick - stop_tick
        self.stats["converge_ticks"] = self.tick - stop_tick
        self._check_final()

    def _catch_up_ticks(self) -> int:
        """Extra ticks to let a follower catch up a long log at the configured append sizes: one
        round trip (2 ticks, plus slack) per batch of max_entries_per_append * max_inflight_appends."""
        longest = max((n.raft.last_index for n in self.nodes.values() if n.raft is not None), default=0)
        batch = self.knobs.max_entries_per_append * self.knobs.max_inflight_appends
        return 3 * (longest // batch + 1)

    def _core(self) -> tuple[SimNode | None, list[SimNode]]:
        """The leader and the nodes it can talk to both ways."""
        leader_id = self.current_leader_id()
        if leader_id is None:
            return None, []
        net = self.network
        members = self.nodes[leader_id].raft.membership.ids
        core = [self.nodes[n] for n in members
                if n == leader_id or (self.nodes[n].is_up and not net.is_cut(leader_id, n) and not net.is_cut(n, leader_id))]
        return self.nodes[leader_id], core

    def _converged(self) -> bool:
        leader, core = self._core()
        if leader is None or self.workload.unsettled_count():
            return False
        voters = leader.raft.membership.voters
        if sum(1 for node in core if node.node_id in voters) < len(voters) // 2 + 1:
            return False
        commit = leader.raft.commit_index
        if commit != leader.raft.last_index:
            return False
        digest = None
        for node in core:
            if node.sm.last_applied != commit:
                return False
            node_digest = node.sm.digest()
            if digest is not None and node_digest != digest:
                raise Violation("replicas apply the same sequence",
                                f"converged nodes differ in digest at {commit}: {self._progress_text()}")
            digest = node_digest
        return True

    def _check_final(self) -> None:
        leader, core = self._core()
        sm = leader.sm
        check = getattr(sm, "check_invariants", None)
        for node in core:
            if check is not None:
                node.sm.check_invariants()
        lost = [job_id for job_id in sorted(self.workload.acknowledged) if sm.get_job(job_id) is None]
        if lost:
            raise Violation("no acknowledged submit is lost",
                            f"{len(lost)} acknowledged job(s) missing from leader {leader.node_id}'s state "
                            f"machine: {lost[:10]}")
        for key in sorted(self.workload.keys):
            present = [job_id for job_id in self.workload.keys[key].ids if sm.get_job(job_id) is not None]
            if len(present) > 1:
                raise Violation("idempotent submit", f"key {key} created jobs {present}")
        self.stats["acknowledged_jobs"] = len(self.workload.acknowledged)

    def _roles_text(self) -> str:
        parts = []
        for node_id in self.node_ids:
            node = self.nodes[node_id]
            if node.raft is None:
                parts.append(f"{node_id}=down")
            else:
                parts.append(f"{node_id}={node.raft.role.name}/t{node.raft.term}/c{node.raft.commit_index}"
                             f"/l{node.raft.last_index}")
        return " ".join(parts) + f"; network: {self.network.partition_name}"

    def _progress_text(self) -> str:
        applied = {n: (self.nodes[n].sm.last_applied if self.nodes[n].sm else None) for n in self.node_ids}
        return (f"roles {self._roles_text()}; applied {applied}; "
                f"unsettled client requests {self.workload.unsettled_count()}")

    def collect_stats(self) -> dict[str, Any]:
        stats = dict(self.stats)
        stats["ticks"] = self.tick
        stats["terms_with_leader"] = len(self.checker.leaders_by_term)
        stats["committed"] = self.checker.ledger.last_index
        stats["lease_grants"] = self.checker.leases.grants_count
        if self.config.spare_nodes:
            memberships = [m for _, m in self.checker.memberships]
            stats["members_promoted"] = sum(1 for before, after in zip(memberships, memberships[1:])
                                            if len(after.voters) > len(before.voters))
        stats.update({f"flow_{k}": v for k, v in self.checker.flow.checked.items()})
        stats.update({f"net_{k}": v for k, v in self.network.stats.items()})
        stats.update({f"nemesis_{k}": v for k, v in self.nemesis.stats.items()})
        stats.update({f"client_{k}": v for k, v in self.workload.stats.items()})
        return stats


def _first_two(item: tuple) -> tuple:
    return item[0], item[1]


def _pick(fixed: Any, drawn: Any) -> Any:
    """The configured value, else the one drawn from the seed (drawn either way: stable streams)."""
    return drawn if fixed is None else fixed


def replay_command(seed: int, config: SimConfig = SimConfig()) -> str:
    """The one-line command that replays a seed with its trace."""
    parts = [f"python -m tests.sim --seed {seed} -v"]
    changed = config.defaults_changed()
    if "nodes" in changed:
        parts.append(f"--nodes {config.nodes}")
    if "steps" in changed:
        parts.append(f"--steps {config.steps}")
    for name in sorted(changed):
        if name not in ("nodes", "steps"):
            value = changed[name]
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            parts.append(f'--set "{name}={value!r}"')
    return " ".join(parts)


def run_seed(seed: int, config: SimConfig = SimConfig(), *, trace: bool = False) -> SimResult:
    """Runs one seed to the end (or the first violation) and reports."""
    sim: Simulation | None = None
    try:
        sim = Simulation(seed, config, trace=trace)
        sim.run()
        return SimResult(seed, True, tick=sim.tick, stats=sim.collect_stats(), trace=sim.trace_lines)
    except Violation as exc:
        assert sim is not None
        sim._log(f"VIOLATION {exc}")
        return SimResult(seed, False, str(exc), exc.invariant, sim.tick, sim.collect_stats(), sim.trace_lines)
    except Exception as exc:  # an assert inside the core or the state machine, or a harness bug
        tick = sim.tick if sim is not None else 0
        if sim is not None:
            sim._log(f"EXCEPTION {type(exc).__name__}: {exc}")
        kind = "core assertion" if isinstance(exc, AssertionError) else "exception"
        return SimResult(seed, False, f"{kind}: {type(exc).__name__}: {exc}", kind, tick,
                         sim.collect_stats() if sim is not None else {},
                         sim.trace_lines if sim is not None else None, traceback.format_exc())
