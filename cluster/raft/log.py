"""RaftLog: the in-memory view of one node's log, its snapshot point and its four cursors.

The log holds the entries after `offset` (`entries[k].index == offset + 1 + k`); entries at or
before `offset` were compacted away after a snapshot. The snapshot point `snapshot` (index and
term of the last entry a durable snapshot covers) is at or after the offset: a leader keeps some
entries behind its snapshot so that a follower a little behind still gets appends, not a whole
snapshot. The term of `offset` itself is known only when it is the snapshot point (or 0).

```
  snapshot.index
        |
  offset ... applied ... applying ... commit ........ last
  offset ................. persisted ........... last     unstable = (handed_index, last]
```
- `commit_index`: highest index known committed; after a restart the snapshot's index (the
  snapshot holds only committed entries), not 0.
- `persisted_index`: highest index the shell reported durable through advance().
- `applying_index`: highest committed entry handed out in a Ready; `applied_index` once advanced.
- `handed_index`: highest index handed out in a Ready for persisting.

Invariants (asserted by check_invariants): offset <= snapshot.index <= applied <= applying <=
commit <= last, applying <= persisted <= handed <= last, cold <= applied. A committed entry is
never truncated (assert: that would be a safety violation, etcd panics there too). Committed
entries are handed out only up to `persisted_index`, so nothing is applied before it is durable
locally.

Cold entries. Given a `load` function (the shell's stored log), the log keeps the data of only
the newest `warm_bytes` of applied entries: older applied entries become `ColdEntry`s (index,
term, kind and size, no data), and `slice()` reads their data back through `load` when a follower
needs them. Until a snapshot lets them be compacted, applied entries are only ever needed again
for a follower that fell behind, while their data stayed in memory for up to a whole snapshot
interval (etcd keeps its unstable entries in memory and reads older ones back from its Storage
the same way). Only applied, hence persisted, entries go cold, so the stored log always has them
(it is compacted no further than this log). Without `load` everything stays in memory.
"""

from __future__ import annotations

import bisect
import operator
from typing import Callable, Sequence

from raftq.cluster.raft.messages import Entry, EntryKind, SnapshotPoint

_entry_term = operator.attrgetter("term")

#: Reads the stored entries lo..hi (both included) back, in order.
LoadEntries = Callable[[int, int], Sequence[Entry]]


class ColdEntry:
    """An applied entry whose data was dropped from memory: read it back with the log's `load`.
    It has no `data`, so code that would use the data of a cold entry fails at once."""

    __slots__ = ("index", "term", "kind", "data_bytes")

    def __init__(self, entry: Entry) -> None:
        self.index = entry.index
        self.term = entry.term
        self.kind: EntryKind = entry.kind
        self.data_bytes = len(entry.data)


class Compacted(Exception):
    """The entry asked for is at or before the log's offset and its term is not known."""


class RaftLog:
    """See the module docstring."""

    def __init__(self, entries: Sequence[Entry], snapshot: SnapshotPoint = SnapshotPoint(), *,
                 load: LoadEntries | None = None, warm_bytes: int = 0) -> None:
        """Start from a durable snapshot point and the entries recovered from storage.

        Args:
            entries: the persisted log after some offset, consecutive; the first one is at most
                snapshot.index + 1 (entries at or before the snapshot may be kept).
            snapshot: the newest durable snapshot's point; SnapshotPoint() when there is none.
            load: reads stored entries back (see "Cold entries"); None keeps every entry's data.
            warm_bytes: applied entries' bytes (entry_size_bytes) kept in memory with `load`.
        """
        offset = entries[0].index - 1 if entries else snapshot.index
        assert offset <= snapshot.index, f"log starts at {offset + 1}, after the snapshot at {snapshot.index}"
        for position, entry in enumerate(entries):
            assert entry.index == offset + 1 + position, f"log entry {entry.index} at {offset + 1 + position}"
        if offset < snapshot.index < offset + len(entries) + 1 and snapshot.index > 0:
            assert entries[snapshot.index - offset - 1].term == snapshot.term, "snapshot term differs from the log's"
        self._entries: list[Entry] = list(entries)
        self._offset = offset
        self.snapshot = snapshot
        self.commit_index = snapshot.index
        self.applied_index = snapshot.index
        self.applying_index = snapshot.index
        self.persisted_index = self.last_index
        self.handed_index = self.last_index
        self._load = load
        self._warm_bytes_max = warm_bytes
        self.cold_index = offset  # entries up to here are ColdEntry (or compacted)
        self._warm_applied_bytes = 0  # entry_size_bytes of the entries in (cold_index, applied_index]
        self._count_warm_applied()

    # ------------------------------------------------------------------ reading

    @property
    def offset(self) -> int:
        """Index just before the first entry held (0 when nothing was compacted)."""
        return self._offset

    @property
    def last_index(self) -> int:
        return self._offset + len(self._entries)

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self.snapshot.term

    def term(self, index: int) -> int:
        """Term of the entry at index; 0 for index 0 (the empty log) and for indexes past the end.

        Raises:
            Compacted: the entry was compacted away and is not the snapshot point.
        """
        position = index - self._offset - 1
        if position >= 0:
            return self._entries[position].term if position < len(self._entries) else 0
        if index == self.snapshot.index:
            return self.snapshot.term
        if index <= 0:
            return 0
        raise Compacted(f"entry {index} is compacted (the log holds {self._offset + 1}..{self.last_index})")

    def has_term(self, index: int) -> bool:
        """Whether term(index) is known (the entry is held, is the snapshot point, or index is 0)."""
        return index > self._offset or index == self.snapshot.index or index <= 0

    def can_send_after(self, index: int) -> bool:
        """Whether an append with previous index `index` can be built: the entries after it are
        held and its term is known. Otherwise the follower needs the snapshot."""
        return index > self._offset or (index == self._offset and self.has_term(index))

    def entry(self, index: int) -> Entry:
        """A held entry past the applied index (an applied one may be cold: use slice())."""
        assert index > self.cold_index, f"entry {index} is compacted or cold (cold up to {self.cold_index})"
        return self._entries[index - self._offset - 1]

    def matches(self, index: int, term: int) -> bool:
        """Whether this log holds an entry at index with term (index 0 always matches).

        A compacted index matches when it is the snapshot point with that term; any other
        compacted index is committed, and committed entries match every later leader's
        (Leader Completeness), so callers ask only about indexes at or after the commit index.
        """
        return index <= self.last_index and self.has_term(index) and self.term(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft §5.4.1 election restriction: is (last_term, last_index) at least as new as ours?"""
        return last_term > self.last_term or (last_term == self.last_term and last_index >= self.last_index)

    def slice(self, lo: int, count_max: int, size_bytes_max: int) -> tuple[Entry, ...]:
        """Entries from lo on, at most count_max of them and about size_bytes_max (at least one)."""
        assert lo > self._offset, f"slice from compacted index {lo}"
        result: list[Entry | ColdEntry] = []
        size_bytes = 0
        start = lo - self._offset - 1
        for entry in self._entries[start : start + count_max]:
            size_bytes += entry_size_bytes(entry)
            if result and size_bytes > size_bytes_max:
                break
            result.append(entry)
        if result and type(result[0]) is ColdEntry:
            cold_count = min(len(result), self.cold_index - lo + 1)
            result[:cold_count] = self._loaded(lo, lo + cold_count - 1)
        return tuple(result)

    def _loaded(self, lo: int, hi: int) -> list[Entry]:
        """The cold entries lo..hi with their data, read back through `load` (and checked)."""
        assert self._load is not None and self._offset < lo <= hi <= self.cold_index, (lo, hi, self.cold_index)
        entries = list(self._load(lo, hi))
        held = self._entries[lo - self._offset - 1 : hi - self._offset]
        assert [(e.index, e.term, e.kind) for e in entries] == [(e.index, e.term, e.kind) for e in held], (
            f"stored entries {lo}..{hi} differ from the log's")
        return entries

    def first_index_of_term_at(self, index: int) -> int:
        """First index of the run of held entries that has the same term as the entry at index
        (the first held entry when the run reaches back into the compacted part)."""
        term = self.term(index)
        position = bisect.bisect_left(self._entries, term, hi=index - self._offset, key=_entry_term)
        return self._offset + position + 1

    def last_index_of_term(self, term: int, index_max: int) -> int:
        """Highest held index <= index_max whose entry has exactly term, or 0 when there is none."""
        index = min(self._offset + bisect.bisect_right(self._entries, term, key=_entry_term), index_max)
        return index if index > self._offset and self.term(index) == term else 0

    # ------------------------------------------------------------------ writing

    def append(self, entries: Sequence[Entry]) -> None:
        """Append entries that directly follow the last one (the leader's own proposals)."""
        for entry in entries:
            assert entry.index == self.last_index + 1, f"append {entry.index} after {self.last_index}"
            assert entry.term >= self.last_term, f"term {entry.term} after {self.last_term}"
            self._entries.append(entry)

    def maybe_append(self, prev_index: int, prev_term: int, entries: Sequence[Entry]) -> int | None:
        """Follower side of AppendEntries (Raft §5.3).

        Args:
            prev_index: index of the entry just before `entries` in the leader's log.
            prev_term: its term in the leader's log.
            entries: consecutive entries starting at prev_index + 1.

        Returns:
            The last index now known to match the leader (prev_index + len(entries)), or None when
            the consistency check fails. Matching entries are kept: a duplicated or reordered
            append never truncates anything that agrees with the leader.
        """
        if not self.matches(prev_index, prev_term):
            return None
        for entry in entries:
            if entry.index > self.last_index:
                self.append(entries[entry.index - prev_index - 1 :])
                break
            if self.term(entry.index) != entry.term:
                self._truncate_after(entry.index - 1)
                self.append(entries[entry.index - prev_index - 1 :])
                break
        return prev_index + len(entries)

    def _truncate_after(self, index: int) -> None:
        assert index >= self.commit_index, f"truncating committed entries: {index} < {self.commit_index}"
        del self._entries[index - self._offset:]
        self.persisted_index = min(self.persisted_index, index)
        self.handed_index = min(self.handed_index, index)

    def commit_to(self, index: int) -> bool:
        """Raise commit_index (never lowers it). Returns whether it moved."""
        if index <= self.commit_index:
            return False
        assert index <= self.last_index, f"commit {index} past last index {self.last_index}"
        self.commit_index = index
        return True

    # ------------------------------------------------------------------ the shell's progress

    def has_unstable_entries(self) -> bool:
        return self.handed_index < self.last_index

    def take_unstable_entries(self) -> tuple[Entry, ...]:
        """Entries not yet handed to the shell for persisting; they count as handed out now."""
        entries = tuple(self._entries[self.handed_index - self._offset:])
        self.handed_index = self.last_index
        return entries

    def has_committed_entries(self) -> bool:
        return min(self.commit_index, self.persisted_index) > self.applying_index

    def take_committed_entries(self) -> tuple[Entry, ...]:
        """Committed, locally persisted entries not yet handed out for applying; they count as
        handed out (applying) now."""
        hi = min(self.commit_index, self.persisted_index)
        if hi <= self.applying_index:
            return ()
        entries = tuple(self._entries[self.applying_index - self._offset : hi - self._offset])
        self.applying_index = hi
        return entries

    def stable_to(self, index: int, term: int) -> None:
        """The shell persisted entries up to (index, term). Ignored if that entry was since
        replaced by a conflicting append (log matching: same index and term = same prefix)."""
        if self.matches(index, term) and index > self.persisted_index:
            self.persisted_index = index

    def applied_to(self, index: int) -> None:
        assert index <= self.applying_index, f"applied {index} but only {self.applying_index} handed out"
        if index <= self.applied_index:
            return
        if self._load is not None:
            for entry in self._entries[self.applied_index - self._offset : index - self._offset]:
                self._warm_applied_bytes += entry_size_bytes(entry)
        self.applied_index = index
        self._cool()

    def _cool(self) -> None:
        """Drops the data of the oldest warm applied entries past warm_bytes (see "Cold entries")."""
        if self._load is None:
            return
        entries, offset = self._entries, self._offset
        while self._warm_applied_bytes > self._warm_bytes_max and self.cold_index < self.applied_index:
            position = self.cold_index - offset  # the entry at cold_index + 1
            entry = entries[position]
            self._warm_applied_bytes -= entry_size_bytes(entry)
            entries[position] = ColdEntry(entry)
            self.cold_index += 1

    def _count_warm_applied(self) -> None:
        """After the log's start moved (a start from storage, a compaction): counts the warm
        applied bytes again from the first held entry, and cools what is past the bound."""
        self.cold_index = max(self.cold_index, self._offset)
        self._warm_applied_bytes = 0
        if self._load is not None:
            for entry in self._entries[self.cold_index - self._offset : self.applied_index - self._offset]:
                self._warm_applied_bytes += entry_size_bytes(entry)
            self._cool()

    # ------------------------------------------------------------------ snapshots and compaction

    def snapshot_taken(self, snapshot: SnapshotPoint) -> None:
        """The shell made a snapshot of the applied state durable at `snapshot` (one older than
        the snapshot point already held, e.g. finished after a newer one was installed, changes
        nothing)."""
        if snapshot.index <= self.snapshot.index:
            return
        assert snapshot.index <= self.applied_index, f"snapshot at {snapshot.index} past applied {self.applied_index}"
        assert self.term(snapshot.index) == snapshot.term, f"snapshot term {snapshot.term} is not the log's"
        self.snapshot = snapshot

    def compact(self, upto_index: int) -> int:
        """Drops the entries at or before upto_index (at most the snapshot point). Returns how many."""
        upto_index = min(upto_index, self.snapshot.index)
        if upto_index <= self._offset:
            return 0
        dropped = upto_index - self._offset
        del self._entries[:dropped]
        self._offset = upto_index
        self._count_warm_applied()
        return dropped

    def trailing_start(self, index: int, size_bytes_max: int) -> int:
        """The index after which the held entries up to `index` carry at most size_bytes_max data
        bytes (so dropping entries up to the answer keeps that much behind `index`)."""
        size_bytes = 0
        position = min(index, self.last_index) - self._offset - 1
        while position >= 0:
            size_bytes += data_bytes(self._entries[position])
            if size_bytes > size_bytes_max:
                return self._offset + position + 1
            position -= 1
        return self._offset

    def restore(self, snapshot: SnapshotPoint) -> None:
        """Replaces the whole log by a snapshot received from the leader (InstallSnapshot).

        Everything held is dropped (what follows a snapshot point this log does not share is
        not committed), and every cursor moves to the snapshot's index.
        """
        assert snapshot.index > self.commit_index, f"restoring {snapshot.index} at or before commit {self.commit_index}"
        assert self.applied_index == self.applying_index, "a Ready is being applied"
        self._entries = []
        self._offset = snapshot.index
        self.snapshot = snapshot
        self.commit_index = self.applied_index = self.applying_index = snapshot.index
        self.persisted_index = self.handed_index = snapshot.index
        self.cold_index = snapshot.index
        self._warm_applied_bytes = 0

    def check_invariants(self) -> None:
        assert self._offset <= self.snapshot.index <= self.applied_index, (
            self._offset, self.snapshot.index, self.applied_index)
        assert self._offset <= self.cold_index <= self.applied_index, (self._offset, self.cold_index, self.applied_index)
        assert 0 <= self.applied_index <= self.applying_index <= self.commit_index <= self.last_index, (
            self.applied_index, self.applying_index, self.commit_index, self.last_index)
        assert self.applying_index <= self.persisted_index <= self.handed_index <= self.last_index, (
            self.applying_index, self.persisted_index, self.handed_index, self.last_index)


def data_bytes(entry: Entry | ColdEntry) -> int:
    """Bytes of the entry's data, whether it is held or cold."""
    return entry.data_bytes if type(entry) is ColdEntry else len(entry.data)


def entry_size_bytes(entry: Entry | ColdEntry) -> int:
    """Approximate encoded size of an entry: its data plus a fixed allowance for the framing."""
    return data_bytes(entry) + 16


def entry_payload_bytes(entries: Sequence[Entry]) -> int:
    """Sum of the data bytes (what the uncommitted bound counts, like etcd's PayloadSize)."""
    return sum(len(entry.data) for entry in entries)
