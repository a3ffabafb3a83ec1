"""RaftLog: the in-memory view of one node's log and its four cursors.

The whole log is kept in memory (the WAL keeps it all too; snapshots are out of scope), with
`entries[k].index == k + 1`. Four cursors describe how far each entry has travelled:

```
   1 ........ applied ... applying ... commit ........ last
   1 ................. persisted ........... last     unstable = (handed_index, last]
```
- `commit_index`: highest index known committed (volatile: 0 after a restart, Raft Figure 2).
- `persisted_index`: highest index the shell reported durable through advance().
- `applying_index`: highest committed entry handed out in a Ready; `applied_index` once advanced.
- `handed_index`: highest index handed out in a Ready for persisting.

Invariants (asserted by check_invariants): applied <= applying <= commit <= last,
applying <= persisted <= handed <= last. A committed entry is never truncated (assert: that
would be a safety violation, etcd panics there too). Committed entries are handed out only up to
`persisted_index`, so nothing is applied before it is durable locally.
"""

from __future__ import annotations

import bisect
import operator
from typing import Sequence

from cluster.raft.messages import Entry

_entry_term = operator.attrgetter("term")


class RaftLog:
    """See the module docstring."""

    def __init__(self, entries: Sequence[Entry]) -> None:
        """Start from the entries recovered from storage (all of them durable).

        Args:
            entries: the persisted log, indexes 1..n in order.
        """
        for position, entry in enumerate(entries):
            assert entry.index == position + 1, f"log entry {entry.index} at position {position + 1}"
        self._entries: list[Entry] = list(entries)
        self.commit_index = 0
        self.applied_index = 0
        self.applying_index = 0
        self.persisted_index = len(self._entries)
        self.handed_index = len(self._entries)

    # ------------------------------------------------------------------ reading

    @property
    def last_index(self) -> int:
        return len(self._entries)

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else 0

    def term(self, index: int) -> int:
        """Term of the entry at index; 0 for index 0 (the empty log) and for indexes past the end."""
        if index <= 0 or index > len(self._entries):
            return 0
        return self._entries[index - 1].term

    def entry(self, index: int) -> Entry:
        return self._entries[index - 1]

    def matches(self, index: int, term: int) -> bool:
        """Whether this log holds an entry at index with term (index 0 always matches)."""
        return index <= self.last_index and self.term(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft §5.4.1 election restriction: is (last_term, last_index) at least as new as ours?"""
        return last_term > self.last_term or (last_term == self.last_term and last_index >= self.last_index)

    def slice(self, lo: int, count_max: int, size_bytes_max: int) -> tuple[Entry, ...]:
        """Entries from lo on, at most count_max of them and about size_bytes_max (at least one)."""
        result: list[Entry] = []
        size_bytes = 0
        for entry in self._entries[lo - 1 : lo - 1 + count_max]:
            size_bytes += entry_size_bytes(entry)
            if result and size_bytes > size_bytes_max:
                break
            result.append(entry)
        return tuple(result)

    def first_index_of_term_at(self, index: int) -> int:
        """First index of the run of entries that has the same term as the entry at index."""
        term = self.term(index)
        return bisect.bisect_left(self._entries, term, hi=index, key=_entry_term) + 1

    def last_index_of_term(self, term: int, index_max: int) -> int:
        """Highest index <= index_max whose entry has exactly term, or 0 when there is none."""
        index = min(bisect.bisect_right(self._entries, term, key=_entry_term), index_max)
        return index if index > 0 and self.term(index) == term else 0

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
        del self._entries[index:]
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
        entries = tuple(self._entries[self.handed_index :])
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
        entries = tuple(self._entries[self.applying_index : hi])
        self.applying_index = hi
        return entries

    def stable_to(self, index: int, term: int) -> None:
        """The shell persisted entries up to (index, term). Ignored if that entry was since
        replaced by a conflicting append (log matching: same index and term = same prefix)."""
        if self.matches(index, term) and index > self.persisted_index:
            self.persisted_index = index

    def applied_to(self, index: int) -> None:
        assert index <= self.applying_index, f"applied {index} but only {self.applying_index} handed out"
        self.applied_index = max(self.applied_index, index)

    def check_invariants(self) -> None:
        assert 0 <= self.applied_index <= self.applying_index <= self.commit_index <= self.last_index, (
            self.applied_index, self.applying_index, self.commit_index, self.last_index)
        assert self.applying_index <= self.persisted_index <= self.handed_index <= self.last_index, (
            self.applying_index, self.persisted_index, self.handed_index, self.last_index)


def entry_size_bytes(entry: Entry) -> int:
    """Approximate encoded size of an entry: its data plus a fixed allowance for the framing."""
    return len(entry.data) + 16


def entry_payload_bytes(entries: Sequence[Entry]) -> int:
    """Sum of the data bytes (what the uncommitted bound counts, like etcd's PayloadSize)."""
    return sum(len(entry.data) for entry in entries)
