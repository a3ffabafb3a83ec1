"""The nemesis: schedules partitions, crashes, restarts and network-profile changes from the seed.

Every few ticks (a Poisson-like draw from the simulation's rng) it picks one action:

- a partition of one of the shapes that break Raft implementations (REPLICATION.md §0.5, §2.1):
  isolate the leader, isolate a follower, bridge (two nodes cut from each other, a third sees
  both), one-way (a node, often the leader, can send but not receive), random halves;
- heal;
- crash a node (often the leader) at a random point of its Ready handling, losing its unsynced
  writes, and restart it some ticks later; sometimes crash every node at once (PySyncObj PR #202);
- redraw the loss / delay / duplication / reordering profile.

Besides, in some seeds, it strikes at elections (`_election_faults`): a leader that just took
office is crashed or cut off a few ticks later, and a voter crashes (and restarts at once) while a
candidate campaigns. Random faults almost never hit those few ticks, yet they are where the
subtle rules live (Figure 8, durable votes). Likewise at snapshots (`snapshot_fault`): a follower
receiving or installing one crashes in the middle with `snapshot_fault_probability`, where the
order of "snapshot stored, state machine restored, log reset, hard state written" matters.

The final fault, kept through the liveness phase in some seeds, leaves a minority permanently
faulty (one-way, isolated or bridged) so that the healthy majority must make progress anyway
(TigerBeetle VOPR liveness mode).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable

from .network import random_config

if TYPE_CHECKING:
    from .cluster import Simulation

__all__ = ["Nemesis", "CRASH_POINTS", "FINAL_FAULTS"]

#: Where in its Ready handling a crashing node stops (the shell's order: write, sync, send,
#: apply, advance). "idle" crashes between Readys.
CRASH_POINTS = ("idle", "before_write", "after_write", "after_sync", "after_send", "after_apply")

#: Faults that may stay on through the liveness phase (None: heal everything).
FINAL_FAULTS = (None, None, None, None, None, "one_way", "isolate_follower", "bridge", "one_way_leader")


class Nemesis:
    """See the module docstring.

    Args:
        rng: the simulation's random source.
        sim: the simulation it breaks.
        event_ticks_mean: mean ticks between two actions.
        crashes: whether to crash nodes at all.
        trace: one line per action when tracing.
    """

    def __init__(self, rng: random.Random, sim: "Simulation", *, event_ticks_mean: int, crashes: bool,
                 election_fault_probability: float, snapshot_fault_probability: float = 0.0,
                 trace: Callable[[str], None] | None) -> None:
        self.rng = rng
        self.sim = sim
        self.event_probability = 1.0 / max(1, event_ticks_mean)
        self.crashes = crashes
        self.election_fault_probability = election_fault_probability
        self.snapshot_fault_probability = snapshot_fault_probability
        self.active = True  # until stop(): faults after it would never be restarted
        self._trace = trace
        self.restart_at: dict[str, int] = {}  # node -> tick of its scheduled restart
        self._seen_terms: dict[str, int] = {}  # node -> highest term seen it lead or campaign in
        self._strike: tuple[int, str, int] | None = None  # (tick, node, term): fault a young leader
        self.stats = {"partitions": 0, "heals": 0, "crashes": 0, "crash_all": 0, "restarts": 0, "profiles": 0,
                      "election_faults": 0, "snapshot_faults": 0}

    def _log(self, line: str) -> None:
        if self._trace is not None:
            self._trace(f"nemesis: {line}")

    def act(self, tick: int) -> None:
        for node_id in sorted(self.restart_at):
            if self.restart_at[node_id] <= tick:
                del self.restart_at[node_id]
                self.sim.restart(node_id)
                self.stats["restarts"] += 1
        if self.election_fault_probability:
            self._election_faults(tick)
        if self.rng.random() >= self.event_probability:
            return
        roll = self.rng.random()
        partitioned = bool(self.sim.network.cut_paths())
        if partitioned and roll < 0.35:
            self.sim.network.heal()
            self.stats["heals"] += 1
        elif roll < 0.65:
            self.sim.network.heal()
            self.partition()
        elif roll < 0.9 and self.crashes:
            self.crash_some()
        else:
            config = random_config(self.rng)
            self.sim.network.configure(config)
            self.stats["profiles"] += 1
            self._log(f"network profile {config}")

    # ------------------------------------------------------------------ elections

    def _election_faults(self, tick: int) -> None:
        """Faults aimed at the moments just after a term starts, where Raft's subtle rules live.

        A leader that dies young leaves entries of earlier terms half-replicated behind its NOOP
        (Raft §5.4.2, Figure 8); a voter that crashes right after voting and restarts at once tests
        that its vote was durable (Raft §5.2). Each new leader or candidate is struck with
        `election_fault_probability`.
        """
        sim = self.sim
        if self._strike is not None and self._strike[0] <= tick:
            _, node_id, term = self._strike
            self._strike = None
            node = sim.nodes[node_id]
            if node.is_leader and node.raft.term == term:
                self.stats["election_faults"] += 1
                if self.crashes and self.rng.random() < 0.5:
                    self._log(f"young leader {node_id} of term {term} crashes")
                    self._crash_one(node_id, self.rng.randint(1, 30))
                else:
                    self._log(f"young leader {node_id} of term {term} is cut off")
                    sim.network.heal()
                    sim.network.isolate(node_id)
        for node_id in sim.node_ids:
            node = sim.nodes[node_id]
            if node.raft is None or node.raft.term <= self._seen_terms.get(node_id, 0):
                continue
            if node.is_leader:
                self._seen_terms[node_id] = node.raft.term
                if self._strike is None and self.rng.random() < self.election_fault_probability:
                    self._strike = (tick + self.rng.randint(0, 4), node_id, node.raft.term)
            elif node.raft.role.name == "CANDIDATE":
                self._seen_terms[node_id] = node.raft.term
                if self.crashes and self.rng.random() < self.election_fault_probability:
                    voters = [n for n in sim.node_ids if n != node_id and sim.nodes[n].is_up]
                    if voters:
                        self.stats["election_faults"] += 1
                        victim = self.rng.choice(voters)
                        self._log(f"voter {victim} crashes during {node_id}'s campaign for term {node.raft.term}")
                        self._crash_one(victim, self.rng.randint(1, 4))

    def _crash_one(self, node_id: str, restart_after_ticks: int) -> None:
        self.sim.schedule_crash(node_id, self.rng.choice(CRASH_POINTS))
        self.restart_at[node_id] = self.sim.tick + restart_after_ticks
        self.stats["crashes"] += 1

    def snapshot_fault(self, node_id: str) -> bool:
        """Whether node_id crashes now, in the middle of receiving or installing a snapshot (the
        simulation crashes it); if so its restart is scheduled."""
        if not (self.active and self.crashes and self.snapshot_fault_probability):
            return False
        if self.rng.random() >= self.snapshot_fault_probability:
            return False
        self.restart_at[node_id] = self.sim.tick + self.rng.randint(1, 20)
        self.stats["snapshot_faults"] += 1
        self.stats["crashes"] += 1
        self._log(f"{node_id} crashes in the middle of a snapshot")
        return True

    # ------------------------------------------------------------------ partitions

    def partition(self, shape: str | None = None) -> str:
        rng = self.rng
        net = self.sim.network
        ids = list(self.sim.node_ids)
        leader = self.sim.current_leader_id()
        followers = [n for n in ids if n != leader]
        shape = shape or rng.choice(("isolate_leader", "isolate_follower", "bridge", "one_way",
                                     "one_way_leader", "halves"))
        if shape == "isolate_leader":
            net.isolate(leader or rng.choice(ids))
        elif shape == "isolate_follower":
            net.isolate(rng.choice(followers))
        elif shape == "bridge":
            # Cut two nodes from each other; with a leader, make it one of them half the time.
            a = leader if leader is not None and rng.random() < 0.5 else rng.choice(ids)
            b = rng.choice([n for n in ids if n != a])
            net.bridge(a, b)
        elif shape == "one_way":
            net.one_way(rng.choice(ids))
        elif shape == "one_way_leader":
            net.one_way(leader or rng.choice(ids))
        else:
            size = rng.randint(1, (len(ids) - 1) // 2 + (len(ids) % 2 == 0))
            net.split(rng.sample(ids, size))
        self.stats["partitions"] += 1
        return shape

    # ------------------------------------------------------------------ crashes

    def crash_some(self) -> None:
        rng = self.rng
        up = [n for n in self.sim.node_ids if self.sim.nodes[n].is_up]
        if not up:
            return
        if rng.random() < 0.08:
            victims = up
            self.stats["crash_all"] += 1
        else:
            leader = self.sim.current_leader_id()
            victims = [leader if leader is not None and rng.random() < 0.5 else rng.choice(up)]
        for node_id in victims:
            self._crash_one(node_id, rng.randint(1, 40))

    # ------------------------------------------------------------------ the end of the faults

    def stop(self, final_fault: str | None) -> None:
        """Heal, restart every node, calm the network; then apply `final_fault`, if any."""
        self.active = False
        self.restart_at.clear()
        self._strike = None
        self.sim.cancel_crashes()
        self.sim.network.heal()
        for node_id in self.sim.node_ids:
            if not self.sim.nodes[node_id].is_up:
                self.sim.restart(node_id)
        if final_fault is not None:
            shape = {"one_way": "one_way", "isolate_follower": "isolate_follower", "bridge": "bridge",
                     "one_way_leader": "one_way_leader"}[final_fault]
            self.partition(shape)
            self._log(f"final fault kept through the liveness phase: {self.sim.network.partition_name}")
