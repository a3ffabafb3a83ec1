"""The write-ahead log: segment files of checksummed records, and the hard state beside them.

Theory of operation
-------------------
**Records.** A record is `u32 length | u32 crc32(payload) | payload`, little-endian (struct
`<II`, zlib.crc32), payload = msgpack `[index, term, kind, data]`. The checksum is computed
before the write and verified on every read (TigerStyle's paired assertions). Records go into
segment files `wal-<first index:020d>.log`; a new segment starts once the active one has reached
`segment_bytes_max`. Indexes are strictly consecutive across all segments, and terms never go
down (Raft §5.3), both on disk and in memory.

**Memory.** Only each entry's term is kept (the Raft core holds the entries, and of the applied
ones only the newest: `entries()` reads the others back when a follower needs them, raft/log.py
"Cold entries"), and each segment keeps the byte offset of each of its records, so a conflict
can cut a file at the right byte, `compact()` can drop a whole-segment prefix without reading
anything back, and `entries()` reads exactly the records asked for.

**Writes and durability.** `append()` encodes a whole batch into one bytes join and writes it
with one `write()` per segment touched; it does not fsync. `sync()` flushes and fdatasyncs the
active segment, and fsyncs the directory when a segment file was created. Three orderings keep
every crash state a valid log (a prefix of what was written, nothing else):
- Rotation cuts the full segment's preallocated tail off and fsyncs it before the next one is
  created, so only the *last* segment can ever end in a torn record or in zeros: damage in any
  earlier one is real damage.
- A Raft conflict overwrite (entries[0].index <= last_index) deletes later segments newest
  first, fsyncing the directory after each, then truncates the segment holding the conflict at
  that record's start and fsyncs it, all before any new record lands: a crash in between leaves
  a shorter consecutive log, never a gap (truncating conflicting entries is safe, Raft §5.3).
- `compact()` deletes segments oldest first, one directory fsync each, for the same reason.

**Preallocation.** The active segment's file is grown ahead of its records in steps of
`preallocate_bytes` (`posix_fallocate`; the step is cut to what the next write needs when the
disk has no room for a whole step), and records are written over that zeroed space. An fdatasync
of a file whose size does not change needs no journal commit for the size (ext4 commits one for
every growing fdatasync, behind every other process's metadata on the same file system): on the
shared 2-core test machine (ext4), three processes each appending and syncing one 150-byte entry
at a time took p50 0.29-0.31 / p90 0.41-0.48 ms per append + sync growing the file, and 0.22 /
0.31-0.33 ms with 1 MiB steps (two rounds each). Disk full
therefore surfaces when a step is allocated, before a record is written into it, with the same
fail-stop as a refused write. The last segment ends in zeros after its records: recovery stops
there without calling it damage (next paragraph).

**Recovery (SPEC guarantee 7).** `open()` reads the segments in index order and checks each
record's length (1..RECORD_BYTES_MAX), checksum, decoding, index continuity (the first record
of a segment has the index in its name; each next one is previous + 1) and term order. At the
first bad or incomplete record, at byte X of a file:
- In the last segment, if every byte from X to the end is zero, it is the preallocated space
  (or a write that left nothing): the log ends at X, nothing is cut and nothing is logged.
- In the last segment, if no *plausible* record starts anywhere after X, it is a torn tail: the
  write a crash interrupted. The file is cut at X, fsynced, and a warning names the file, the
  offset and how many bytes were dropped. A record is plausible when its length, checksum and
  decoding are good and its index and term could follow the log (index >= the one expected at
  X, term >= the last good term).
- Otherwise (an earlier segment, or a plausible record after X) it is damage to data that was
  durable: `WalCorruptionError` stops the node, naming the file and X.
- A well-formed record with the wrong index or a lower term is corruption wherever it is: no
  interrupted write produces a valid checksum.

Why scan every offset after X rather than trust X's length field: a crash cuts the byte stream,
so a truncated record runs past the end of the file, but so does a record whose length field had
a bit flipped, and believing it would silently drop every durable record behind it. Scanning
costs a few microseconds per byte of tail (runs of zero bytes, which a power loss may leave,
are skipped at once). The price of this bias is fail-stop, never loss, in two rare cases:
a power loss that persisted a later page of unsynced data but not an earlier one, and a torn
final record whose own payload embeds bytes that form a plausible record. Conversely, a bit flip
inside the very last record of the log looks exactly like a torn write and is cut: a single
checksum cannot tell them apart (etcd's WAL has the same limit); the other replicas hold it.

The first segment may start past index 1 (after `compact()` or `reset_after()`); the node checks
at start that its snapshot reaches `first_index - 1` and stops, naming the files, when none does.

**Failure.** A write, truncate, fsync, rename or delete the OS refuses raises `DiskWriteError`,
naming the file it touched (a failed `write()` on an open file names none by itself). After it
the state on disk is unknown (a failed fsync may have dropped the dirty pages), so every later
call raises `WalFailedError`; restart.

**Threads.** Blocking I/O, no asyncio. Not thread-safe: the server calls it from a worker thread,
one call at a time; two calls at once trip an assert. The stats properties are plain attribute
reads and may be read from any thread (the metrics layer does).
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Final, Sequence

import msgpack

from raftq.cluster.raft.messages import Entry, EntryKind, HardState
from raftq.cluster.records import record
from raftq.cluster.storage import hard_state as hard_state_file
from raftq.cluster.storage.errors import CompactedError, DiskWriteError, WalCorruptionError, WalFailedError

_HEADER: Final = struct.Struct("<II")
#: Bytes of `length | crc32` before each payload.
HEADER_BYTES: Final = _HEADER.size
#: A record payload longer than this is garbage, not data. The API edge refuses request bodies
#: over 8 MiB (constants.BODY_BYTES_MAX) and one request is one entry, so 64 MiB leaves room while
#: letting a flipped high bit in a length field be recognised at once. append() asserts it.
RECORD_BYTES_MAX: Final = 64 << 20
#: Default size at which a new segment starts. Big enough that rotation (one extra fsync) is rare,
#: small enough that compaction can free space in useful steps (etcd uses 64 MB too).
SEGMENT_BYTES_MAX: Final = 64 << 20
#: Recovery reads segments in chunks of this size rather than whole, bounding its extra memory.
READ_CHUNK_BYTES: Final = 1 << 20
#: The active segment's file grows ahead of its records in steps of this size (module docstring,
#: Preallocation): one growing fdatasync per MiB of log instead of one per sync.
PREALLOCATE_BYTES: Final = 1 << 20

_SEGMENT_NAME = re.compile(r"wal-(\d{20})\.log")
_NON_ZERO = re.compile(rb"[^\x00]")
# macOS has no fdatasync; fsync there does not flush the drive cache either (F_FULLFSYNC would).
_fdatasync = getattr(os, "fdatasync", os.fsync)

_log = logging.getLogger("raftq.wal")


# ---------------------------------------------------------------------- record codec


def encode_record(entry: Entry) -> bytes:
    """The framed record for entry: `u32 length | u32 crc32 | msgpack [index, term, kind, data]`."""
    payload = msgpack.packb([entry.index, entry.term, int(entry.kind), entry.data], use_bin_type=True)
    assert len(payload) <= RECORD_BYTES_MAX, f"entry {entry.index}: {len(payload)} bytes is over RECORD_BYTES_MAX"
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode_record(buffer: bytes | bytearray, offset: int = 0) -> tuple[Entry, int] | str | None:
    """Decodes the record starting at buffer[offset].

    Returns:
        (entry, end offset) for a good record; None when the buffer ends inside the record (feed
        more, or at end of file it is incomplete); otherwise the reason the record is bad.
    """
    if len(buffer) - offset < HEADER_BYTES:
        return None
    length, crc = _HEADER.unpack_from(buffer, offset)
    if length == 0:
        return "empty record (length 0)"  # also what zero-filled garbage looks like: crc32(b"") == 0
    if length > RECORD_BYTES_MAX:
        return f"implausible record length {length}"
    start = offset + HEADER_BYTES
    end = start + length
    if end > len(buffer):
        return None
    payload = buffer[start:end]
    if zlib.crc32(payload) != crc:
        return "crc mismatch"
    entry = _entry_from_payload(payload)
    return (entry, end) if isinstance(entry, Entry) else entry


def _entry_from_payload(payload: bytes | bytearray) -> Entry | str:
    try:
        fields = msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # ExtraData, FormatError, bad UTF-8, ...
        return f"undecodable payload ({type(exc).__name__})"
    if type(fields) is not list or len(fields) != 4:
        return "payload is not [index, term, kind, data]"
    index, term, kind, data = fields
    if type(index) is not int or index < 1 or type(term) is not int or term < 0 or type(data) is not bytes:
        return "payload fields have the wrong types"
    try:
        return Entry(index=index, term=term, kind=EntryKind(kind), data=data)
    except ValueError:
        return f"unknown entry kind {kind!r}"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: RecordDecoder.next_record() has no whole record buffered: feed more bytes (h11's NEED_DATA).
NEED_DATA: Final = _NeedData()


@record
class BadRecord:
    """A record that can never become valid, however many bytes follow."""

    offset: int  #: byte offset of the record's start in the stream
    reason: str


class RecordDecoder:
    """Incremental record decoder: feed() bytes as they come, take records with next_record().

    Byte boundaries do not matter: feeding a stream whole or one byte at a time yields the same
    records. After a BadRecord the decoder stays on it (it cannot resynchronise on its own).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0  # position of the next undecoded record in _buffer
        self._offset = 0  # the same position in the whole stream
        self._error: BadRecord | None = None

    @property
    def offset(self) -> int:
        """Stream offset where the next record starts (the end of the last one returned)."""
        return self._offset

    @property
    def buffered_bytes(self) -> int:
        """Bytes fed but not yet part of a returned record: non-zero at end of stream = incomplete."""
        return len(self._buffer) - self._start

    def feed(self, data: bytes) -> None:
        if self._start:
            del self._buffer[: self._start]  # amortised: at most once per feed, not per record
            self._start = 0
        self._buffer += data

    def next_record(self) -> Entry | BadRecord | _NeedData:
        """The next whole record, NEED_DATA, or the BadRecord the stream is stuck on."""
        if self._error is not None:
            return self._error
        decoded = decode_record(self._buffer, self._start)
        if decoded is None:
            return NEED_DATA
        if isinstance(decoded, str):
            self._error = BadRecord(self._offset, decoded)
            return self._error
        entry, end = decoded
        self._offset += end - self._start
        self._start = end
        return entry

    def incomplete_reason(self) -> str:
        """At end of stream with buffered_bytes > 0: says what is missing."""
        buffered = self.buffered_bytes
        if buffered < HEADER_BYTES:
            return f"incomplete header ({buffered} of {HEADER_BYTES} bytes)"
        length, _ = _HEADER.unpack_from(self._buffer, self._start)
        return f"record of {length} bytes runs past the end of the file ({buffered - HEADER_BYTES} present)"


# ---------------------------------------------------------------------- the log


@record
class WalStats:
    """A snapshot of the WAL's counters for the metrics layer."""

    size_bytes: int  #: bytes of records across all segments (not the preallocated zeros)
    segment_count: int
    first_index: int
    last_index: int
    syncs_total: int  #: sync() calls that had something to make durable
    last_sync_seconds: float  #: duration of the last such sync (flush + fdatasync + dir fsync)
    entries_per_sync: int  #: entries the last sync made durable


@dataclass(slots=True)
class _Segment:
    path: str
    first_index: int  # index of its first record (also in its name), even while empty
    offsets: array.array = field(default_factory=lambda: array.array("Q"))  # start of each record
    size_bytes: int = 0

    @property
    def next_index(self) -> int:
        return self.first_index + len(self.offsets)


class WriteAheadLog:
    """The durable Raft log and hard state of one node (see the module docstring).

    Open with `WriteAheadLog.open(directory)`. Not thread-safe: one call at a time.
    """

    def __init__(self, directory: str, *, segment_bytes_max: int, preallocate_bytes: int,
                 logger: logging.Logger) -> None:
        """Use open(); this only builds an empty object."""
        assert segment_bytes_max > 0 and preallocate_bytes >= 0
        self.directory = directory
        self.segment_bytes_max = segment_bytes_max
        self.preallocate_bytes = preallocate_bytes
        self._logger = logger
        self._hard_state = HardState()
        # Invariant: _terms[k] is the term of entry _base_index + 1 + k, and the segments hold
        # exactly those entries. Terms only: the entries themselves live in the Raft core's memory
        # (and on disk); a copy here would outlive the core's compaction by a whole snapshot.
        self._terms = array.array("Q")
        self._base_index = 0  # index just before the first entry held (compacted away, or 0)
        self._base_term: int | None = 0  # its term, when known (None after reopening a compacted log)
        self._segments: list[_Segment] = []
        self._file: BinaryIO | None = None  # handle on the last segment at its records' end, opened lazily
        self._file_bytes = 0  # size of _file's file: its records plus the preallocated zeros after them
        self._file_dirty = False  # bytes written to _file since its last fdatasync
        self._directory_dirty = False  # a segment file was created since the last directory fsync
        self._unsynced_entries = 0
        self._size_bytes = 0
        self._syncs_total = 0
        self._last_sync_seconds = 0.0
        self._entries_per_sync = 0
        self._packer = msgpack.Packer(use_bin_type=True)
        self._busy = threading.Lock()  # only to detect concurrent use, never to wait
        #: Entered by every public call: asserts single-threaded use, and fails the log for good
        #: when an OS call fails inside.
        self._exclusive = _Exclusive(self)
        self._failure: BaseException | None = None
        self._closed = False
        self._io_path = directory  # the file the current call touches: what a DiskWriteError names

    # ------------------------------------------------------------------ open / recovery

    @classmethod
    def open(cls, directory: str | os.PathLike, *, segment_bytes_max: int = SEGMENT_BYTES_MAX,
             preallocate_bytes: int = PREALLOCATE_BYTES, logger: logging.Logger | None = None) -> "WriteAheadLog":
        """Opens the log in directory (created when missing) and recovers it.

        Args:
            directory: holds the segment files and the hard state file.
            segment_bytes_max: a new segment starts once the active one reaches this size.
            preallocate_bytes: the active segment's file grows in steps of this size; 0 grows it
                with each write instead.
            logger: where the torn-tail warning goes (default: the "raftq.wal" logger).

        Returns:
            The recovered log: hard_state and entries() as they were last made durable, minus a
            torn tail record.

        Raises:
            WalCorruptionError: a record before the tail, or the hard state file, is damaged; the
                message names the file and byte offset.
            OSError: the directory or a file cannot be read or repaired.
        """
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            os.makedirs(directory)
            hard_state_file.fsync_directory(os.path.dirname(os.path.abspath(directory)))
        wal = cls(directory, segment_bytes_max=segment_bytes_max, preallocate_bytes=preallocate_bytes,
                  logger=logger or _log)
        wal._hard_state = hard_state_file.load_hard_state(directory)
        segments = _segment_files(directory)
        if segments:  # the log may start past 1 after compact(); see the module docstring
            wal._base_index = segments[0][0] - 1
            wal._base_term = 0 if wal._base_index == 0 else None
        for position, (first_index, path) in enumerate(segments):
            wal._recover_segment(path, first_index, last=position == len(segments) - 1)
        return wal

    def _recover_segment(self, path: str, first_index: int, *, last: bool) -> None:
        if self._segments and first_index != self._segments[-1].next_index:
            raise WalCorruptionError(path, 0, f"segment should start at index {self._segments[-1].next_index}, "
                                              f"its name says {first_index}")
        segment = _Segment(path, first_index)
        bad = self._recover_records(segment)
        if bad is not None:
            offset, reason = bad
            if not last:
                raise WalCorruptionError(path, offset, f"{reason} (not the last segment, so not a torn tail)")
            self._cut_torn_tail(segment, offset, reason)
        self._segments.append(segment)
        self._size_bytes += segment.size_bytes

    def _recover_records(self, segment: _Segment) -> tuple[int, str] | None:
        """Loads segment's good records; returns (offset, reason) of the first bad one, if any."""
        decoder = RecordDecoder()
        with open(segment.path, "rb") as f:
            while chunk := f.read(READ_CHUNK_BYTES):
                decoder.feed(chunk)
                while True:
                    offset = decoder.offset
                    record = decoder.next_record()
                    if record is NEED_DATA:
                        break
                    if isinstance(record, BadRecord):
                        segment.size_bytes = offset
                        return offset, record.reason
                    assert isinstance(record, Entry)
                    self._check_recovered(segment, offset, record)
                    self._terms.append(record.term)
                    segment.offsets.append(offset)
        segment.size_bytes = decoder.offset
        if decoder.buffered_bytes:
            return decoder.offset, decoder.incomplete_reason()
        return None

    def _check_recovered(self, segment: _Segment, offset: int, entry: Entry) -> None:
        # A well-formed record out of order cannot come from an interrupted write: always corruption.
        if entry.index != segment.next_index:
            raise WalCorruptionError(segment.path, offset, f"entry index {entry.index}, expected {segment.next_index}")
        if self._terms and entry.term < self._terms[-1]:
            raise WalCorruptionError(segment.path, offset, f"entry {entry.index} has term {entry.term}, lower than "
                                                          f"the previous entry's {self._terms[-1]}")

    def _cut_torn_tail(self, segment: _Segment, offset: int, reason: str) -> None:
        """Cuts the last segment at offset, unless a plausible record follows (then: corruption)
        or nothing but zeros does (the preallocated space: the log simply ends at offset)."""
        term_min = self._terms[-1] if self._terms else 0
        with open(segment.path, "r+b") as f:
            f.seek(offset)
            tail = f.read()
            if _NON_ZERO.search(tail) is None:
                return  # the records end here; the zeros stay for the next appends to overwrite
            found = _plausible_record_after(tail, 1, segment.next_index, term_min)
            if found is not None:
                raise WalCorruptionError(segment.path, offset, f"{reason}, yet a valid record follows at byte "
                                                              f"{offset + found}: damage before the tail")
            f.truncate(offset)
            os.fsync(f.fileno())  # the cut itself must be durable before new records follow it
        self._logger.warning("wal: cut a torn tail off %s at byte %d: %s; %d bytes dropped",
                             segment.path, offset, reason, len(tail))

    # ------------------------------------------------------------------ reading

    @property
    def hard_state(self) -> HardState:
        """The hard state as loaded at open or last saved."""
        return self._hard_state

    @property
    def first_index(self) -> int:
        """Index of the first entry held; 0 when the log holds none."""
        return self._base_index + 1 if self._terms else 0

    @property
    def last_index(self) -> int:
        """Index of the last entry; 0 for an empty log (the compaction point if all were compacted)."""
        return self._base_index + len(self._terms)

    def term(self, index: int) -> int:
        """Term of the entry at index; 0 for index 0 and for indexes past last_index.

        Raises:
            CompactedError: index was dropped by compact() and its term is not known.
        """
        if index > self.last_index:
            return 0
        if index <= self._base_index:
            if index == self._base_index and self._base_term is not None:
                return self._base_term
            raise CompactedError(f"index {index} is compacted (the log starts at {self._base_index + 1})")
        return self._terms[index - self._base_index - 1]

    def entries(self, lo: int | None = None, hi: int | None = None) -> list[Entry]:
        """The entries with lo <= index < hi, in order (default: all of them), read from the segments.

        Raises:
            CompactedError: lo is below first_index after compact().
            WalCorruptionError: a record written earlier no longer reads back.
        """
        lo = self._base_index + 1 if lo is None else lo
        hi = self.last_index + 1 if hi is None else min(hi, self.last_index + 1)
        if lo <= self._base_index and lo < hi:
            raise CompactedError(f"index {lo} is compacted (the log starts at {self._base_index + 1})")
        result: list[Entry] = []
        # Guarded like a write: it flushes the buffered writer, and a node reads entries back
        # (cold ones, for a follower behind) while it runs, where a write in a thread would race it.
        with self._exclusive:
            if self._file is not None:
                self._file.flush()  # written but buffered bytes must be readable (not a sync)
            for segment in self._segments:
                first, end_index = max(lo, segment.first_index), min(hi, segment.next_index)
                if first >= end_index:
                    continue
                start = segment.offsets[first - segment.first_index]
                stop = segment.offsets[end_index - segment.first_index] if end_index < segment.next_index \
                    else segment.size_bytes
                self._io_path = segment.path
                with open(segment.path, "rb") as f:
                    f.seek(start)
                    data = f.read(stop - start)
                offset = 0
                while offset < len(data):
                    decoded = decode_record(data, offset)
                    if not isinstance(decoded, tuple):
                        raise WalCorruptionError(segment.path, start + offset,
                                                 f"written record reads back as {decoded}")
                    entry, offset = decoded
                    result.append(entry)
        return result

    @property
    def size_bytes(self) -> int:
        """Bytes of records across all segments (written, whether synced or not); the last
        segment's preallocated zeros (at most PREALLOCATE_BYTES) are not counted."""
        return self._size_bytes

    @property
    def syncs_total(self) -> int:
        return self._syncs_total

    @property
    def last_sync_seconds(self) -> float:
        return self._last_sync_seconds

    @property
    def entries_per_sync(self) -> int:
        return self._entries_per_sync

    def stats(self) -> WalStats:
        return WalStats(size_bytes=self._size_bytes, segment_count=len(self._segments),
                        first_index=self.first_index, last_index=self.last_index,
                        syncs_total=self._syncs_total, last_sync_seconds=self._last_sync_seconds,
                        entries_per_sync=self._entries_per_sync)

    # ------------------------------------------------------------------ writing

    def append(self, entries: Sequence[Entry]) -> None:
        """Writes consecutive entries after the log, overwriting its suffix first if they conflict.

        If entries[0].index <= last_index the log is first truncated to end at entries[0].index - 1
        (Raft conflict overwrite): later segments are deleted and the segment holding that index is
        cut at its record's byte offset, durably. The new records are written but not fsynced
        (call sync()); a rotation to a new segment fsyncs the full one.

        Args:
            entries: consecutive indexes; entries[0].index <= last_index + 1 (asserted).

        Raises:
            WalFailedError: an earlier write or fsync failed.
            DiskWriteError: the disk refused; names the file (the log is then failed, see WalFailedError).
        """
        if not entries:
            return
        first = entries[0].index
        assert self._base_index < first <= self.last_index + 1, \
            f"appending index {first} to a log holding {self._base_index + 1}..{self.last_index}"
        with self._exclusive:
            if first <= self.last_index:
                self._truncate_from(first)
            self._write(entries)
            self._terms.extend(entry.term for entry in entries)
            self._unsynced_entries += len(entries)

    def _write(self, entries: Sequence[Entry]) -> None:
        """Encodes entries into one bytes join per segment and writes each with one write()."""
        segment = self._active_segment(entries[0].index)
        term = self._terms[-1] if self._terms else 0
        parts: list[bytes] = []
        size_bytes = segment.size_bytes
        pack, header, crc32 = self._packer.pack, _HEADER.pack, zlib.crc32  # hot loop: 100k entries/s
        for expected, entry in enumerate(entries, start=entries[0].index):
            assert entry.index == expected and entry.term >= term, \
                f"entry {entry.index} (term {entry.term}) after {expected - 1} (term {term})"
            term = entry.term
            if size_bytes >= self.segment_bytes_max and len(segment.offsets):
                self._write_parts(segment, parts, size_bytes)
                parts, segment = [], self._rotate(entry.index)
                size_bytes = 0
            payload = pack([entry.index, entry.term, int(entry.kind), entry.data])
            assert len(payload) <= RECORD_BYTES_MAX, f"entry {entry.index}: {len(payload)} payload bytes"
            segment.offsets.append(size_bytes)
            parts.append(header(len(payload), crc32(payload)))
            parts.append(payload)
            size_bytes += HEADER_BYTES + len(payload)
        self._write_parts(segment, parts, size_bytes)

    def _write_parts(self, segment: _Segment, parts: list[bytes], size_bytes: int) -> None:
        assert self._file is not None
        if parts:
            self._io_path = segment.path
            if size_bytes > self._file_bytes:
                self._preallocate(size_bytes)
            self._file.write(b"".join(parts))
            self._file_dirty = True
        self._size_bytes += size_bytes - segment.size_bytes
        segment.size_bytes = size_bytes

    def _preallocate(self, end: int) -> None:
        """Grows the active file to hold `end` bytes of records, a whole step ahead when the disk
        has room for one (never past the segment's size limit), else exactly to `end`."""
        assert self._file is not None
        if self.preallocate_bytes == 0:
            self._file_bytes = end
            return
        step = self.preallocate_bytes
        target = max(end, min(-(-end // step) * step, self.segment_bytes_max))
        try:
            os.posix_fallocate(self._file.fileno(), self._file_bytes, target - self._file_bytes)
        except OSError as exc:
            if exc.errno != errno.ENOSPC or target == end:
                raise
            # Not a whole step's room: take what this write needs, so that a full disk stops the
            # node only when a record does not fit (what is left is then smaller than a record).
            target = end
            os.posix_fallocate(self._file.fileno(), self._file_bytes, target - self._file_bytes)
        self._file_bytes = target

    def _active_segment(self, index: int) -> _Segment:
        """The last segment, with its file open for appending; creates the first one if needed."""
        if not self._segments:
            return self._create_segment(index)
        segment = self._segments[-1]
        assert segment.next_index == index, f"segment {segment.path} continues at {segment.next_index}, not {index}"
        if self._file is None:
            self._io_path = segment.path
            self._file = open(segment.path, "r+b")  # not "ab": records overwrite the preallocated zeros
            self._file.seek(segment.size_bytes)
            self._file_bytes = os.fstat(self._file.fileno()).st_size
        return segment

    def _rotate(self, index: int) -> _Segment:
        """Seals the full segment (its preallocated zeros cut off, then fsync: only the last segment
        may ever be torn or end in zeros) and starts the next."""
        assert self._file is not None
        segment = self._segments[-1]
        self._io_path = segment.path
        self._file.flush()
        if self._file_bytes > segment.size_bytes:
            self._file.truncate(segment.size_bytes)
        _fdatasync(self._file.fileno())
        self._file.close()
        self._file = None
        self._file_dirty = False
        return self._create_segment(index)

    def _create_segment(self, index: int) -> _Segment:
        assert self._file is None
        segment = _Segment(os.path.join(self.directory, f"wal-{index:020d}.log"), index)
        self._io_path = segment.path
        self._file = open(segment.path, "xb")  # "x": never clobber a file recovery did not account for
        self._file_bytes = 0
        self._segments.append(segment)
        self._directory_dirty = True
        return segment

    def _truncate_from(self, index: int) -> None:
        """Drops every entry at and after index, durably, in an order that never leaves a gap."""
        self._close_file()
        while self._segments and self._segments[-1].first_index >= index:
            self._unlink_segment(self._segments.pop())  # newest first: a crash keeps a consecutive prefix
        if self._segments:
            segment = self._segments[-1]
            keep = index - segment.first_index
            cut = segment.offsets[keep] if keep < len(segment.offsets) else segment.size_bytes
            self._io_path = segment.path
            with open(segment.path, "r+b") as f:
                f.truncate(cut)
                _fdatasync(f.fileno())  # durable before new records land after the cut
            del segment.offsets[keep:]
            self._size_bytes -= segment.size_bytes - cut
            segment.size_bytes = cut
        del self._terms[index - self._base_index - 1:]

    def _unlink_segment(self, segment: _Segment) -> None:
        self._io_path = segment.path
        os.unlink(segment.path)
        hard_state_file.fsync_directory(self.directory)  # one at a time, so deletions persist in order
        self._size_bytes -= segment.size_bytes

    def _close_file(self) -> None:
        """Flushes and closes the active file (data written but unsynced stays in the page cache)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._file_dirty = False  # what remains unsynced is either deleted or fsynced by the caller

    def sync(self) -> None:
        """Makes everything appended so far durable: flush + fdatasync, plus a directory fsync after
        a segment was created. A sync with nothing new to make durable does nothing and is not
        counted in the stats.

        Raises:
            WalFailedError: an earlier write or fsync failed.
            DiskWriteError: the fsync failed; names the file (the log is then failed, see WalFailedError).
        """
        with self._exclusive:
            if not self._file_dirty and not self._directory_dirty:
                return
            started = time.perf_counter()
            if self._file_dirty:
                assert self._file is not None
                self._io_path = self._segments[-1].path
                self._file.flush()
                _fdatasync(self._file.fileno())
                self._file_dirty = False
            if self._directory_dirty:
                self._io_path = self.directory
                hard_state_file.fsync_directory(self.directory)
                self._directory_dirty = False
            self._last_sync_seconds = time.perf_counter() - started
            self._syncs_total += 1
            self._entries_per_sync = self._unsynced_entries
            self._unsynced_entries = 0

    def save_hard_state(self, hard_state: HardState) -> None:
        """Replaces the hard state file atomically and durably (tmp, fsync, rename, fsync dir).

        Raises:
            WalFailedError: an earlier write or fsync failed.
            DiskWriteError: the disk refused; names the file (the old hard state is still in place on disk).
        """
        with self._exclusive:
            self._io_path = os.path.join(self.directory, hard_state_file.HARD_STATE_FILE_NAME)
            hard_state_file.save_hard_state(self.directory, hard_state)
            self._hard_state = hard_state

    def compact(self, upto_index: int) -> int:
        """Deletes whole segments whose entries all have index <= upto_index (never the last one).

        Meant for after a snapshot covering upto_index; entries past it are all kept, and so may a
        few at or below it (those in the segment that also holds upto_index + 1).

        Returns:
            How many entries were dropped; first_index moves past them.
        """
        assert 0 <= upto_index <= self.last_index
        with self._exclusive:
            dropped = 0
            while len(self._segments) > 1 and self._segments[1].first_index <= upto_index + 1:
                segment = self._segments.pop(0)
                self._unlink_segment(segment)  # oldest first: a crash keeps a consecutive suffix
                count = len(segment.offsets)
                assert count > 0, f"{segment.path}: only the last segment may be empty"
                self._base_term = self._terms[count - 1]
                del self._terms[:count]
                self._base_index += count
                dropped += count
            return dropped

    def reset_after(self, index: int, term: int) -> None:
        """Drops every entry and restarts the log empty after (index, term), durably.

        For a node that installs a snapshot ending at index: what it held is either covered by
        the snapshot or not shared with the leader. Segments are deleted newest first (a crash
        keeps a consecutive prefix, which recovery then finds behind the snapshot and drops), and
        the next append starts a new segment at index + 1.
        """
        assert index >= 0 and term >= 0
        with self._exclusive:
            self._close_file()
            while self._segments:
                self._unlink_segment(self._segments.pop())
            self._terms = array.array("Q")
            self._base_index = index
            self._base_term = term
            self._unsynced_entries = 0

    def close(self) -> None:
        """Flushes and fsyncs what was appended, and closes the file. Idempotent."""
        if self._closed:
            return
        try:
            if self._failure is None:
                self.sync()
        finally:
            self._closed = True
            with contextlib.suppress(OSError):  # after a failure, closing must not raise a second error
                self._close_file()

    def __enter__(self) -> "WriteAheadLog":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Exclusive:
    """`WriteAheadLog._exclusive`: one per log, entered by every public call (twice per persist),
    so a class rather than a generator-based context manager, which costs a few µs a call."""

    __slots__ = ("_log",)

    def __init__(self, log: WriteAheadLog) -> None:
        self._log = log

    def __enter__(self) -> None:
        log = self._log
        acquired = log._busy.acquire(blocking=False)
        assert acquired, "WriteAheadLog used by two threads at once"
        try:
            assert not log._closed, "WriteAheadLog used after close()"
            if log._failure is not None:
                raise WalFailedError(f"{log.directory}: an earlier write or fsync failed ({log._failure}); "
                                     "restart to recover from what is on disk") from log._failure
        except BaseException:
            log._busy.release()
            raise
        log._io_path = log.directory

    def __exit__(self, exc_type: type | None, exc: BaseException | None, traceback: object) -> None:
        log = self._log
        log._busy.release()
        if isinstance(exc, OSError):
            log._failure = exc
            raise DiskWriteError(exc.filename or log._io_path, exc) from exc


def _segment_files(directory: str) -> list[tuple[int, str]]:
    """(first index, path) of every segment file, in index order (names are zero-padded)."""
    found = []
    for name in os.listdir(directory):
        match = _SEGMENT_NAME.fullmatch(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


def _plausible_record_after(data: bytes, start: int, index_min: int, term_min: int) -> int | None:
    """Offset of the first record at or after start that could continue the log, or None.

    Plausible: good length, checksum and decoding, index >= index_min and term >= term_min.
    """
    offset = start
    limit = len(data) - HEADER_BYTES
    while offset <= limit:
        if not any(data[offset:offset + 4]):
            # A zero length is never valid, so skip a zero run: a header can start at most 3
            # bytes before the next non-zero byte (its length field must hold it).
            match = _NON_ZERO.search(data, offset + 4)
            if match is None:
                return None
            offset = max(offset + 1, match.start() - 3)
            continue
        decoded = decode_record(data, offset)
        if isinstance(decoded, tuple) and decoded[0].index >= index_min and decoded[0].term >= term_min:
            return offset
        offset += 1
    return None
