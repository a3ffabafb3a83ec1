"""SimNetwork: a seeded, lossy, delaying, duplicating, reordering, partitionable message network.

Theory of operation
-------------------
Every directed path (src, dst) holds the messages in flight on it, each stamped with the tick at
which it arrives. `send()` decides a message's fate once, from the one `random.Random` the
simulator owns: lost (`loss_probability`), refused because the path is full
(`path_capacity_max`, like a bounded peer queue that drops), or queued with a delay of
`delay_ticks_mean` +/- `delay_ticks_jitter` ticks (at least one tick). A duplicate is a second copy
with its own delay; a reordered message gets an extra delay so that later messages overtake it.
`deliver(now)` hands out every message due by `now`, ordered by (arrival tick, send order), so a
seed gives the same sequence every run (TigerBeetle `PacketSimulator`, etcd `rafttest/network.go`).

A partition is a set of cut directed paths. A message is dropped if its path is cut when it is
sent or when it would arrive (a cut closes the connection: what was in flight is lost too). A
node that is down receives nothing; what it sent before it went down still arrives. Every drop
is reported to `on_drop`, if given: a snapshot transfer's sender learns that it failed.

Shapes (REPLICATION.md §2.1, §5.1): `isolate(node)`, `bridge(a, b)` (a and b cut from each other,
every other node sees both), `one_way(node)` (the node can send but not receive), `split(group)`
(the group against the rest: random halves), `heal()`.

No set of str is ever iterated (string hashing differs per process): paths live in dicts and
every listing is sorted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

__all__ = ["NetworkConfig", "SimNetwork", "CALM", "random_config"]


@dataclass(frozen=True)
class NetworkConfig:
    """Fault knobs of the simulated network. Probabilities are per message; delays in ticks."""

    loss_probability: float = 0.0  #: a message vanishes
    duplicate_probability: float = 0.0  #: a second copy is delivered too (with its own delay)
    reorder_probability: float = 0.0  #: the message is held back so that later ones overtake it
    delay_ticks_mean: int = 1  #: typical transit time; 1 = arrives on the next tick
    delay_ticks_jitter: int = 0  #: uniform +/- spread around the mean (reorders as a side effect)
    #: Messages in flight on one directed path; more are dropped, as a full peer queue drops in the
    #: real transport. 256 is far above what a healthy 3-node cluster keeps in flight per tick.
    path_capacity_max: int = 256

    def validate(self) -> None:
        for name in ("loss_probability", "duplicate_probability", "reorder_probability"):
            value = getattr(self, name)
            assert 0.0 <= value <= 1.0, f"{name} {value} is not a probability"
        assert self.delay_ticks_mean >= 1, "delay_ticks_mean must be at least one tick"
        assert self.delay_ticks_jitter >= 0 and self.path_capacity_max >= 1


#: The network after the faults stop: nothing lost, duplicated or reordered; one tick of transit.
CALM = NetworkConfig()

#: Reorder holdback is drawn up to this many ticks on top of the normal delay.
REORDER_HOLD_TICKS_MAX = 4


@dataclass(slots=True)
class _InFlight:
    arrive_tick: int
    seq: int  # global send order: breaks ties so that delivery order is total
    message: object
    duplicate: bool


class SimNetwork:
    """See the module docstring.

    Args:
        rng: the simulator's single source of randomness.
        node_ids: every node, in a fixed order.
        config: the fault knobs (can be swapped later with `configure`).
        trace: called with one line per event when tracing, else None.
        on_drop: called as on_drop(src, dst, message, duplicate) for every message dropped.
    """

    def __init__(
        self,
        rng: random.Random,
        node_ids: Sequence[str],
        config: NetworkConfig = CALM,
        trace: Callable[[str], None] | None = None,
        on_drop: Callable[[str, str, object, bool], None] | None = None,
    ) -> None:
        config.validate()
        self._rng = rng
        self._on_drop = on_drop
        self.node_ids = tuple(node_ids)
        self.config = config
        self._trace = trace
        self._paths: dict[tuple[str, str], list[_InFlight]] = {
            (src, dst): [] for src in self.node_ids for dst in self.node_ids if src != dst
        }
        self._cut: dict[tuple[str, str], None] = {}
        self._down: dict[str, None] = {}
        self._seq = 0
        self.partition_name = "none"
        self.stats = {"sent": 0, "delivered": 0, "lost": 0, "cut": 0, "full": 0, "duplicated": 0, "down": 0}

    # ------------------------------------------------------------------ knobs and faults

    def configure(self, config: NetworkConfig) -> None:
        config.validate()
        self.config = config

    def is_cut(self, src: str, dst: str) -> bool:
        return (src, dst) in self._cut

    def cut_paths(self) -> list[tuple[str, str]]:
        return sorted(self._cut)

    def heal(self) -> None:
        """Removes every cut."""
        if self._cut:
            self._cut.clear()
            self._set_partition("none")

    def cut(self, src: str, dst: str) -> None:
        """Cuts one direction: src's messages to dst are dropped."""
        assert src != dst and src in self.node_ids and dst in self.node_ids
        self._cut[(src, dst)] = None

    def isolate(self, node: str) -> None:
        """Cuts node off in both directions from every other node."""
        for other in self.node_ids:
            if other != node:
                self.cut(node, other)
                self.cut(other, node)
        self._set_partition(f"isolate {node}")

    def bridge(self, a: str, b: str) -> None:
        """Cuts a <-> b; every other node still sees both (Jepsen `bridge`)."""
        self.cut(a, b)
        self.cut(b, a)
        self._set_partition(f"bridge {a}-x-{b}")

    def one_way(self, node: str) -> None:
        """node can send but not receive (the asymmetric cut of TigerBeetle's liveness bug)."""
        for other in self.node_ids:
            if other != node:
                self.cut(other, node)
        self._set_partition(f"one-way {node} (sends, hears nothing)")

    def split(self, group: Iterable[str]) -> None:
        """Cuts every path between group and the other nodes, both ways."""
        side = {node: None for node in group}
        for src in self.node_ids:
            for dst in self.node_ids:
                if src != dst and (src in side) != (dst in side):
                    self.cut(src, dst)
        self._set_partition(f"split {','.join(sorted(side))} | "
                            f"{','.join(n for n in self.node_ids if n not in side)}")

    def set_down(self, node: str, down: bool) -> None:
        """A down node receives nothing (what arrives for it is dropped)."""
        if down:
            self._down[node] = None
        else:
            self._down.pop(node, None)

    def _set_partition(self, name: str) -> None:
        self.partition_name = name
        if self._trace is not None:
            self._trace(f"net partition: {name}; cut {self.cut_paths()}")

    # ------------------------------------------------------------------ traffic

    def in_flight_count(self) -> int:
        return sum(len(queue) for queue in self._paths.values())

    def send(self, message: object, src: str, dst: str, now: int, describe: Callable[[object], str] | None = None) -> None:
        """Queues one message sent at tick `now` (or drops it). See the module docstring."""
        self.stats["sent"] += 1
        fate = self._fate(src, dst)
        if fate is not None:
            self.stats[fate] += 1
            if self._trace is not None:
                self._trace(f"drop[{fate}] {src}->{dst} {describe(message) if describe else message}")
            if self._on_drop is not None:
                self._on_drop(src, dst, message, False)
            return
        self._enqueue(message, src, dst, now, duplicate=False)
        if self.config.duplicate_probability and self._rng.random() < self.config.duplicate_probability:
            self.stats["duplicated"] += 1
            self._enqueue(message, src, dst, now, duplicate=True)

    def _fate(self, src: str, dst: str) -> str | None:
        if (src, dst) in self._cut:
            return "cut"
        if self.config.loss_probability and self._rng.random() < self.config.loss_probability:
            return "lost"
        if len(self._paths[(src, dst)]) >= self.config.path_capacity_max:
            return "full"
        return None

    def _enqueue(self, message: object, src: str, dst: str, now: int, duplicate: bool) -> None:
        config = self.config
        delay = config.delay_ticks_mean
        if config.delay_ticks_jitter:
            delay += self._rng.randint(-config.delay_ticks_jitter, config.delay_ticks_jitter)
        if config.reorder_probability and self._rng.random() < config.reorder_probability:
            delay += self._rng.randint(1, REORDER_HOLD_TICKS_MAX)
        self._seq += 1
        self._paths[(src, dst)].append(_InFlight(now + max(1, delay), self._seq, message, duplicate))

    def deliver(self, now: int) -> list[tuple[str, str, object, bool]]:
        """Every message due by tick `now`, as (src, dst, message, duplicate), in a total order.

        Messages whose path is cut by now, or whose destination is down, are dropped here.
        """
        due: list[tuple[int, int, str, str, _InFlight]] = []
        for (src, dst), queue in self._paths.items():  # dict order = fixed construction order
            if not queue:
                continue
            keep = []
            for item in queue:
                (due.append((item.arrive_tick, item.seq, src, dst, item)) if item.arrive_tick <= now
                 else keep.append(item))
            if len(keep) != len(queue):
                self._paths[(src, dst)] = keep
        due.sort(key=_arrival_order)
        delivered = []
        for _, _, src, dst, item in due:
            if (src, dst) in self._cut:
                self.stats["cut"] += 1
            elif dst in self._down:
                self.stats["down"] += 1
            else:
                self.stats["delivered"] += 1
                delivered.append((src, dst, item.message, item.duplicate))
                continue
            if self._on_drop is not None:
                self._on_drop(src, dst, item.message, item.duplicate)
        return delivered


def _arrival_order(item: tuple) -> tuple[int, int]:
    return item[0], item[1]


def random_config(rng: random.Random, intensity: float = 1.0) -> NetworkConfig:
    """A fault profile drawn from rng; intensity 0 gives CALM-like settings, 1 the harshest."""
    def chance(max_value: float) -> float:
        return round(rng.random() * max_value * intensity, 3) if rng.random() < 0.7 else 0.0

    return NetworkConfig(
        loss_probability=chance(0.25),
        duplicate_probability=chance(0.15),
        reorder_probability=chance(0.2),
        delay_ticks_mean=rng.choice((1, 1, 1, 2, 2, 3)),
        delay_ticks_jitter=rng.choice((0, 0, 1, 2)),
        path_capacity_max=rng.choice((8, 32, 256, 256)),
    )
