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

Each log (view and durable) keeps a chain of 8-byte hashes, `chain[i] = H(chain[i-1], entry i+1)`,
so that two logs agree on their first k entries exactly when their chains agree at k. The
invariant checker uses the chains to test log matching and the durability of committed entries
in O(log n) per log instead of comparing entries.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Sequence

from cluster.raft.messages import Entry, HardState

__all__ = ["ChainedLog", "SimStorage", "CrashReport", "entry_hash", "common_prefix_length"]

_ROOT = b"\x00" * 8


def entry_hash(previous: bytes, entry: Entry) -> bytes:
    """The chain hash of `entry` after a chain ending in `previous`."""
    header = entry.index.to_bytes(8, "little") + entry.term.to_bytes(8, "little") + bytes((int(entry.kind),))
    return hashlib.blake2b(previous + header + entry.data, digest_size=8).digest()


class ChainedLog:
    """A log of entries 1..n with its hash chain. Appends may overwrite a suffix (Raft §5.3)."""

    __slots__ = ("entries", "chain")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.chain: list[bytes] = []  # chain[k] covers entries[0..k]

    def __len__(self) -> int:
        return len(self.entries)

    def copy(self) -> "ChainedLog":
        other = ChainedLog()
        other.entries = list(self.entries)
        other.chain = list(self.chain)
        return other

    def append(self, entries: Sequence[Entry]) -> None:
        """Appends consecutive entries; entries[0].index <= len + 1, a suffix is replaced if needed."""
        if not entries:
            return
        first = entries[0].index
        assert 1 <= first <= len(self.entries) + 1, (
            f"append at {first} leaves a hole after {len(self.entries)} (the shell must write in order)"
        )
        for offset, entry in enumerate(entries):
            assert entry.index == first + offset, f"entries not consecutive: {entry.index} after {first + offset - 1}"
        del self.entries[first - 1 :]
        del self.chain[first - 1 :]
        previous = self.chain[-1] if self.chain else _ROOT
        for entry in entries:
            previous = entry_hash(previous, entry)
            self.entries.append(entry)
            self.chain.append(previous)

    def hash_at(self, length: int) -> bytes:
        """The chain hash covering the first `length` entries (root for 0)."""
        return self.chain[length - 1] if length > 0 else _ROOT

    def term(self, index: int) -> int:
        return self.entries[index - 1].term if 0 < index <= len(self.entries) else 0


def common_prefix_length(a: ChainedLog, b: ChainedLog) -> int:
    """Largest k such that a and b hold identical entries 1..k (binary search on the chains)."""
    lo, hi = 0, min(len(a), len(b))
    if hi and a.chain[hi - 1] == b.chain[hi - 1]:
        return hi
    while lo < hi:  # invariant: prefix lo agrees; prefix hi+1 (if any) does not
        mid = (lo + hi + 1) // 2
        if a.chain[mid - 1] == b.chain[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class CrashReport:
    unsynced_writes: int  # writes not synced at the crash
    kept_writes: int  # how many of them survived anyway (a prefix)
    entries_before: int  # view length before the crash
    entries_after: int  # view length after recovery


class SimStorage:
    """See the module docstring."""

    def __init__(self) -> None:
        self.view = ChainedLog()
        self.durable = ChainedLog()
        self.hard_state = HardState()
        self.durable_hard_state = HardState()
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
        self.durable.append(entries)

    def crash(self, rng: random.Random, keep_unsynced_prefix: bool) -> CrashReport:
        """Loses unsynced writes (all, or all but a random prefix when keep_unsynced_prefix)."""
        unsynced = len(self._unsynced)
        kept = rng.randint(0, unsynced) if keep_unsynced_prefix and unsynced else 0
        before = len(self.view)
        for hard_state, entries in self._unsynced[:kept]:
            self._apply_durable(hard_state, entries)
        self._unsynced.clear()
        self.view = self.durable.copy()
        self.hard_state = self.durable_hard_state
        return CrashReport(unsynced, kept, before, len(self.view))

    def recovered_state(self) -> tuple[HardState, list[Entry]]:
        """What a restarted node reads from disk."""
        assert not self._unsynced, "recover after a crash only"
        return self.durable_hard_state, list(self.durable.entries)
