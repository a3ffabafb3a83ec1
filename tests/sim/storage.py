"""SimStorage: one node's simulated disk, which remembers what was synced and what was not.

Theory of operation
-------------------
The shell writes each Ready's hard state and entries with `write()` (like `WriteAheadLog.append` and
`save_hard_state` without the fsync) and calls `sync()` when `Ready.must_sync` says so. A write
changes the *view* (what a read would return while the process lives); a sync makes everything
written so far *durable*. `crash()` throws the view away and rebuilds it from the durable state
plus, optionally, a prefix of the unsynced writes (a page cache that was partly flushed before
the power went: lazyfs in Jepsen, `fsync_marker` in the WAL tests). Nothing unsynced is ever
guaranteed to survive, so a core that sends a vote or an append answer before its Ready was
synced loses data here, as it would on a real disk.

Snapshots (Raft §7) live beside the log, in `snapshots`, ascending by index: each is a point
(index, term), the state machine's bytes, and the chain hash of the log at its index (below).
They are durable the moment they are stored, as the real store writes a temporary file, fsyncs
it and renames it into place: `store_snapshot()` serves both a snapshot the node took (then all
but the newest two are deleted, `SnapshotStore.retain(2)`) and one received from a leader (kept
as it is, like the real receiver). The log can then lose a prefix: `compact_log()` drops entries
up to an index (the WAL deleting whole segments, durable at once), and `reset_log()` replaces the
whole log by an empty one after an installed snapshot (`WriteAheadLog.reset_after`). A crash in
the middle of a reset keeps a prefix of the old log (`reset_log_interrupted`: segments are
deleted newest first); the restart then finds a log that does not continue the snapshot and
drops it (`log_continues`, the node's own rule from cluster/recovery.py).

Each log (view and durable) keeps a chain of 8-byte hashes, `chain(i) = H(chain(i-1), entry i)`,
so that two logs agree on their entries up to i exactly when their chains agree at i. A log that
starts later (after a compaction or an installed snapshot) keeps the chain value at its start,
`base_hash`: compaction keeps the value it had, a reset takes the one the snapshot carries (the
taker's log's at that index). So the chains stay comparable wherever two logs overlap, and the
invariant checker tests log matching and the durability of committed entries in O(log n) per log
instead of comparing entries; a snapshot whose chain is not the committed log's is caught too.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Sequence

from raftq.cluster import recovery
from raftq.cluster.raft.messages import Entry, HardState, SnapshotPoint

__all__ = ["ChainedLog", "SimStorage", "StoredSnapshot", "CrashReport", "entry_hash", "agreement", "log_continues"]

_ROOT = b"\x00" * 8


def entry_hash(previous: bytes, entry: Entry) -> bytes:
    """The chain hash of `entry` after a chain ending in `previous`."""
    header = entry.index.to_bytes(8, "little") + entry.term.to_bytes(8, "little") + bytes((int(entry.kind),))
    return hashlib.blake2b(previous + header + entry.data, digest_size=8).digest()


class ChainedLog:
    """A log of entries base+1..last_index with its hash chain. Appends may overwrite a suffix
    (Raft §5.3); `compact` drops a prefix, `reset` starts over empty after a snapshot's point.

    `base` is the index before the first entry held (0: nothing compacted); `base_term` and
    `base_hash` are the term and chain value at `base` (0 and the root for base 0).
    """

    __slots__ = ("base", "base_term", "base_hash", "entries", "chain")

    def __init__(self, base: int = 0, base_term: int = 0, base_hash: bytes = _ROOT) -> None:
        self.base = base
        self.base_term = base_term
        self.base_hash = base_hash
        self.entries: list[Entry] = []  # entries[k].index == base + 1 + k
        self.chain: list[bytes] = []  # chain[k] covers everything up to entries[k]

    @property
    def last_index(self) -> int:
        return self.base + len(self.entries)

    def copy(self) -> "ChainedLog":
        other = ChainedLog(self.base, self.base_term, self.base_hash)
        other.entries = list(self.entries)
        other.chain = list(self.chain)
        return other

    def append(self, entries: Sequence[Entry], *, skip_compacted: bool = False) -> None:
        """Appends consecutive entries; entries[0].index <= last + 1, a suffix is replaced if needed.

        skip_compacted: entries at or before `base` are dropped first (a write that was unsynced
        when the log was compacted under it, replayed by a crash).
        """
        if skip_compacted:
            entries = [e for e in entries if e.index > self.base]
        if not entries:
            return
        first = entries[0].index
        assert self.base < first <= self.last_index + 1, (
            f"append at {first} to a log holding {self.base + 1}..{self.last_index} (the shell must write in order, "
            f"never below the compaction point)"
        )
        for offset, entry in enumerate(entries):
            assert entry.index == first + offset, f"entries not consecutive: {entry.index} after {first + offset - 1}"
        position = first - self.base - 1
        del self.entries[position:]
        del self.chain[position:]
        previous = self.chain[-1] if self.chain else self.base_hash
        for entry in entries:
            previous = entry_hash(previous, entry)
            self.entries.append(entry)
            self.chain.append(previous)

    def hash_at(self, index: int) -> bytes | None:
        """The chain hash covering entries 1..index; None when index is before the base (unknown)."""
        if index == self.base:
            return self.base_hash
        if index < self.base:
            return None
        return self.chain[index - self.base - 1]

    def term(self, index: int) -> int:
        """The term at index: the base's, an entry's, or 0 past the end (and before the base)."""
        if index == self.base:
            return self.base_term
        return self.entries[index - self.base - 1].term if self.base < index <= self.last_index else 0

    def entry(self, index: int) -> Entry:
        assert self.base < index <= self.last_index, (
            f"entry {index} of a log holding {self.base + 1}..{self.last_index}")
        return self.entries[index - self.base - 1]

    def compact(self, upto_index: int) -> int:
        """Drops the entries at or before upto_index (at most the last), keeping their chain value."""
        upto_index = min(upto_index, self.last_index)
        if upto_index <= self.base:
            return 0
        dropped = upto_index - self.base
        self.base_hash = self.chain[dropped - 1]
        self.base_term = self.entries[dropped - 1].term
        self.base = upto_index
        del self.entries[:dropped]
        del self.chain[:dropped]
        return dropped

    def reset(self, base: int, base_term: int, base_hash: bytes) -> None:
        """Empty after (base, base_term), whose chain value is base_hash (an installed snapshot's)."""
        self.base, self.base_term, self.base_hash = base, base_term, base_hash
        self.entries = []
        self.chain = []

    def keep_prefix(self, last_index: int) -> None:
        """Drops the entries after last_index (base <= last_index)."""
        assert self.base <= last_index
        del self.entries[last_index - self.base :]
        del self.chain[last_index - self.base :]


def agreement(a: ChainedLog, b: ChainedLog) -> int | None:
    """Where two logs stop agreeing, within the indexes both know the chain of.

    Returns:
        The highest index k in [lo, hi] (lo = the later base, hi = the earlier end) such that a and
        b hold identical entries 1..k; lo - 1 when they already differ at lo (somewhere at or
        before it: the entries there are compacted); None when the logs do not overlap.
    """
    lo, hi = max(a.base, b.base), min(a.last_index, b.last_index)
    if lo > hi:
        return None
    if a.hash_at(hi) == b.hash_at(hi):
        return hi
    if a.hash_at(lo) != b.hash_at(lo):
        return lo - 1
    while hi - lo > 1:  # invariant: the chains agree at lo and differ at hi
        mid = (lo + hi) // 2
        if a.hash_at(mid) == b.hash_at(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    """One snapshot file: its point, the state machine's bytes, and the log's chain hash at index."""

    index: int
    term: int
    data: bytes
    chain: bytes

    def describe(self) -> str:
        return f"{self.index}/{self.term} ({len(self.data)} bytes)"


def log_first_index(log: ChainedLog) -> int:
    """The log's first held index as the WAL reports it: 0 for an empty, never compacted log."""
    return log.base + 1 if log.entries or log.base else 0


def log_continues(log: ChainedLog, snapshot: StoredSnapshot) -> bool:
    """Whether a restart keeps `log` after `snapshot`: the node's own rule (cluster/recovery.py)."""
    if log.base > snapshot.index:  # the log does not know the snapshot's term (the node refuses to start)
        return False
    return recovery.log_continues(SnapshotPoint(snapshot.index, snapshot.term), log_first_index(log),
                                  log.last_index, log.term)


@dataclass(frozen=True)
class CrashReport:
    unsynced_writes: int  # writes not synced at the crash
    kept_writes: int  # how many of them survived anyway (a prefix)
    entries_before: int  # view's last index before the crash
    entries_after: int  # view's last index after recovery


class SimStorage:
    """See the module docstring."""

    #: Snapshots a node keeps when it takes one (the real node's `retain(2)`).
    SNAPSHOTS_KEPT = 2

    def __init__(self) -> None:
        self.view = ChainedLog()
        self.durable = ChainedLog()
        self.hard_state = HardState()
        self.durable_hard_state = HardState()
        self.snapshots: list[StoredSnapshot] = []  # ascending (index, term); durable when stored
        self._unsynced: list[tuple[HardState | None, tuple[Entry, ...]]] = []
        self.writes_count = 0
        self.syncs_count = 0

    def write(self, hard_state: HardState | None, entries: Sequence[Entry]) -> None:
        """Writes without syncing: visible in `view`, durable only after `sync()`."""
        if hard_state is None and not entries:
            return
        if hard_state is not None:
            self.hard_state = hard_state
        self.view.append(entries)
        self._unsynced.append((hard_state, tuple(entries)))
        self.writes_count += 1

    def sync(self) -> None:
        """Makes every write so far durable (fsync)."""
        if not self._unsynced:
            return
        for hard_state, entries in self._unsynced:
            self._apply_durable(hard_state, entries)
        self._unsynced.clear()
        self.syncs_count += 1

    @property
    def unsynced_count(self) -> int:
        return len(self._unsynced)

    def _apply_durable(self, hard_state: HardState | None, entries: tuple[Entry, ...]) -> None:
        if hard_state is not None:
            self.durable_hard_state = hard_state
        self.durable.append(entries, skip_compacted=True)

    def crash(self, rng: random.Random, keep_unsynced_prefix: bool) -> CrashReport:
        """Loses unsynced writes (all, or all but a random prefix when keep_unsynced_prefix)."""
        unsynced = len(self._unsynced)
        kept = rng.randint(0, unsynced) if keep_unsynced_prefix and unsynced else 0
        before = self.view.last_index
        for hard_state, entries in self._unsynced[:kept]:
            self._apply_durable(hard_state, entries)
        self._unsynced.clear()
        self.view = self.durable.copy()
        self.hard_state = self.durable_hard_state
        return CrashReport(unsynced, kept, before, self.view.last_index)

    def recovered_state(self) -> tuple[HardState, StoredSnapshot | None, ChainedLog]:
        """What a restarted node reads from disk: hard state, newest snapshot, durable log."""
        assert not self._unsynced, "recover after a crash only"
        return self.durable_hard_state, self.newest_snapshot, self.durable

    # ------------------------------------------------------------------ snapshots and compaction

    @property
    def newest_snapshot(self) -> StoredSnapshot | None:
        return self.snapshots[-1] if self.snapshots else None

    def snapshot_at(self, index: int, term: int) -> StoredSnapshot | None:
        for snapshot in self.snapshots:
            if (snapshot.index, snapshot.term) == (index, term):
                return snapshot
        return None

    def store_snapshot(self, snapshot: StoredSnapshot, *, retain: bool) -> int:
        """Stores a snapshot durably (replacing one at the same point); with retain, deletes all
        but the newest SNAPSHOTS_KEPT. Returns the index of the older of the two newest kept (0
        when only one is), which is as far as the log may be compacted."""
        kept = [s for s in self.snapshots if (s.index, s.term) != (snapshot.index, snapshot.term)]
        kept.append(snapshot)
        kept.sort(key=lambda s: (s.index, s.term))
        if retain:
            kept = kept[-self.SNAPSHOTS_KEPT :]
        self.snapshots = kept
        return kept[-2].index if len(kept) >= 2 else 0

    def compact_log(self, upto_index: int) -> int:
        """Drops the log up to upto_index (at most its durable end), durably and from the view.
        Returns how many durable entries went."""
        upto_index = min(upto_index, self.durable.last_index)
        self.view.compact(upto_index)
        return self.durable.compact(upto_index)

    def reset_log(self, snapshot: StoredSnapshot) -> None:
        """Replaces the log by an empty one after the snapshot's point, durably (an install, or a
        restart whose log does not continue its snapshot). Unsynced entries go with the files;
        unsynced hard states stay unsynced."""
        self.durable.reset(snapshot.index, snapshot.term, snapshot.chain)
        self.view.reset(snapshot.index, snapshot.term, snapshot.chain)
        self._unsynced = [(hard_state, ()) for hard_state, _ in self._unsynced if hard_state is not None]

    def reset_log_interrupted(self, rng: random.Random) -> int:
        """A crash in the middle of `reset_log`: the WAL deletes its segments newest first, so a
        prefix of the durable log survives. The caller crashes the node next. Returns its end."""
        last = rng.randint(self.durable.base, self.durable.last_index)
        self.durable.keep_prefix(last)
        self._unsynced = [(hard_state, ()) for hard_state, _ in self._unsynced if hard_state is not None]
        return last
