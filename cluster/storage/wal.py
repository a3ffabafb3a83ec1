"""The write-ahead log: segment files of checksummed records, and the hard state beside them.

Theory of operation
-------------------
A record is `u32 length | u32 crc32(payload) | payload`, little-endian, payload = msgpack
`[index, term, kind, data]`. Records go into segment files `wal-<first index:020d>.log`; a new
segment starts when the active one passes `segment_bytes_max`. Indexes are strictly consecutive
across all segments.

Writes are buffered by the active file; `sync()` flushes and fsyncs it (and the directory after a
segment was created, truncated or deleted). The caller fsyncs before it acknowledges anything
(persist-before-send). A Raft conflict overwrite truncates the file physically at the first
overwritten record and deletes later segments, so the log on disk is always one consecutive run.

Recovery (SPEC guarantee 7) reads every segment in order and checks length, checksum, decoding
and index continuity. A bad record is a *torn tail* only when it lies in the last segment and no
valid record follows it (a crash mid-write leaves garbage only at the very end): the file is cut
at the record's start, fsynced, and the cut is logged with the file, offset and bytes dropped.
Anything else — a bad record in an earlier segment, or a bad record followed by a valid one — is
damage to data that was once durable: `WalCorruptionError` stops the node and names the file and
byte offset. The scan for "a valid record follows" tries every later offset, so a cut length field
cannot hide a good record behind it.

The hard state (term, vote) lives in `hardstate`: msgpack with a checksum, replaced atomically by
write temp → fsync → rename → fsync directory, so it is never torn.

Not thread-safe: one thread at a time (the node calls it from one worker thread at a time).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Sequence

import msgpack

from cluster.raft.messages import Entry, EntryKind, HardState

_HEADER = struct.Struct("<II")
#: A record larger than this is garbage, not data: entries are bounded far below it (a batch of
#: 1,000 jobs of 1 MiB each would still be refused at the API edge long before).
RECORD_BYTES_MAX = 256 << 20
SEGMENT_BYTES_MAX = 64 << 20
_SEGMENT_NAME = re.compile(r"wal-(\d{20})\.log")
_HARD_STATE_FILE = "hardstate"

log = logging.getLogger("raftq.wal")


class WalError(Exception):
    """Base of the WAL's errors."""


class WalCorruptionError(WalError):
    """Raised at open when a record before the tail is damaged; the message names file and offset."""


@dataclass(slots=True)
class _Segment:
    path: str
    first_index: int
    offsets: list[int]  # byte offset of each record, in index order
    size_bytes: int


def encode_record(entry: Entry) -> bytes:
    payload = msgpack.packb([entry.index, entry.term, int(entry.kind), entry.data], use_bin_type=True)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode_record(buffer: bytes | memoryview, offset: int) -> tuple[Entry, int] | str:
    """Decodes the record at offset; returns (entry, next offset) or a reason it is not valid."""
    if offset + _HEADER.size > len(buffer):
        return "incomplete header"
    length, crc = _HEADER.unpack_from(buffer, offset)
    if length > RECORD_BYTES_MAX:
        return f"record length {length} is implausible"
    start = offset + _HEADER.size
    end = start + length
    if end > len(buffer):
        return f"record of {length} bytes runs past the end of the file"
    payload = bytes(buffer[start:end])
    if zlib.crc32(payload) != crc:
        return "checksum mismatch"
    try:
        index, term, kind, data = msgpack.unpackb(payload, raw=False)
        entry = Entry(index=index, term=term, kind=EntryKind(kind), data=data)
    except Exception as exc:  # msgpack and the tuple unpacking raise several types
        return f"undecodable record: {exc}"
    return entry, end


class WriteAheadLog:
    """See the module docstring. Open with `WriteAheadLog.open(directory)`."""

    def __init__(self, directory: str, segment_bytes_max: int) -> None:
        self.directory = directory
        self.segment_bytes_max = segment_bytes_max
        self.hard_state = HardState()
        self._entries: list[Entry] = []
        self._segments: list[_Segment] = []
        self._file = None
        self._dir_dirty = False
        self.last_sync_seconds = 0.0
        self.syncs_total = 0
        self.entries_per_sync = 0
        self._unsynced_entries = 0

    # ------------------------------------------------------------------ open / recovery

    @classmethod
    def open(cls, directory: str | os.PathLike, *, segment_bytes_max: int = SEGMENT_BYTES_MAX,
             logger: logging.Logger | None = None) -> "WriteAheadLog":
        """Recovers the log in `directory` (created when missing).

        Raises:
            WalCorruptionError: a record before the tail, or the hard state file, is damaged.
        """
        global log
        if logger is not None:
            log = logger
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        wal = cls(directory, segment_bytes_max)
        wal.hard_state = _load_hard_state(os.path.join(directory, _HARD_STATE_FILE))
        names = sorted(n for n in os.listdir(directory) if _SEGMENT_NAME.fullmatch(n))
        for position, name in enumerate(names):
            wal._recover_segment(os.path.join(directory, name), last=position == len(names) - 1)
        if wal._segments:
            wal._file = open(wal._segments[-1].path, "ab")
        return wal

    def _recover_segment(self, path: str, *, last: bool) -> None:
        with open(path, "rb") as f:
            data = f.read()
        first_index = int(_SEGMENT_NAME.fullmatch(os.path.basename(path)).group(1))
        segment = _Segment(path, first_index, [], 0)
        expected = self.last_index + 1 if self._entries else first_index
        offset = 0
        while offset < len(data):
            decoded = decode_record(data, offset)
            if isinstance(decoded, str):
                if last and not _valid_record_after(data, offset + 1):
                    self._cut_torn_tail(path, offset, len(data) - offset, decoded)
                    break
                raise WalCorruptionError(f"{path} at byte {offset}: {decoded}; the log is damaged before its tail")
            entry, next_offset = decoded
            if entry.index != expected:
                raise WalCorruptionError(
                    f"{path} at byte {offset}: entry index {entry.index}, expected {expected}")
            self._entries.append(entry)
            segment.offsets.append(offset)
            expected += 1
            offset = next_offset
        segment.size_bytes = offset
        self._segments.append(segment)

    def _cut_torn_tail(self, path: str, offset: int, dropped: int, reason: str) -> None:
        with open(path, "r+b") as f:
            f.truncate(offset)
            f.flush()
            os.fsync(f.fileno())
        log.warning("wal: cut torn tail of %s at byte %d (%d bytes dropped: %s)",
                    os.path.basename(path), offset, dropped, reason)

    # ------------------------------------------------------------------ reading

    def entries(self) -> list[Entry]:
        return list(self._entries)

    @property
    def first_index(self) -> int:
        return self._entries[0].index if self._entries else 0

    @property
    def last_index(self) -> int:
        return self._entries[-1].index if self._entries else 0

    def term(self, index: int) -> int:
        if index == 0 or not self._entries:
            return 0
        return self._entries[index - self.first_index].term

    @property
    def size_bytes(self) -> int:
        return sum(segment.size_bytes for segment in self._segments)

    # ------------------------------------------------------------------ writing

    def append(self, entries: Sequence[Entry]) -> None:
        """Writes consecutive entries (no fsync); overwrites the suffix from entries[0].index."""
        if not entries:
            return
        first = entries[0].index
        assert first <= self.last_index + 1, f"gap: appending {first} after {self.last_index}"
        if self._entries and first <= self.last_index:
            self._truncate_from(first)
        if not self._entries:
            assert not self._segments
        for entry in entries:
            record = encode_record(entry)
            segment = self._active_segment(entry.index)
            segment.offsets.append(segment.size_bytes)
            self._file.write(record)
            segment.size_bytes += len(record)
            self._entries.append(entry)
        self._unsynced_entries += len(entries)

    def _active_segment(self, index: int) -> _Segment:
        if self._segments and self._segments[-1].size_bytes < self.segment_bytes_max:
            return self._segments[-1]
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        path = os.path.join(self.directory, f"wal-{index:020d}.log")
        self._file = open(path, "ab")
        segment = _Segment(path, index, [], 0)
        self._segments.append(segment)
        self._dir_dirty = True
        return segment

    def _truncate_from(self, index: int) -> None:
        """Drops every entry at and after index, on disk and in memory."""
        if self._file is not None:
            self._file.flush()
        while self._segments and self._segments[-1].first_index >= index:
            segment = self._segments.pop()
            os.unlink(segment.path)
            self._dir_dirty = True
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._segments:
            segment = self._segments[-1]
            keep = index - segment.first_index
            cut_at = segment.offsets[keep]
            del segment.offsets[keep:]
            segment.size_bytes = cut_at
            with open(segment.path, "r+b") as f:
                f.truncate(cut_at)
            self._file = open(segment.path, "ab")
        if self._entries:
            del self._entries[index - self.first_index:]

    def sync(self) -> None:
        """Makes everything appended so far durable."""
        started = time.perf_counter()
        if self._file is not None:
            self._file.flush()
            os.fdatasync(self._file.fileno())
        if self._dir_dirty:
            _fsync_dir(self.directory)
            self._dir_dirty = False
        self.last_sync_seconds = time.perf_counter() - started
        self.syncs_total += 1
        self.entries_per_sync = self._unsynced_entries
        self._unsynced_entries = 0

    def save_hard_state(self, hard_state: HardState) -> None:
        """Replaces the hard state file atomically and durably."""
        payload = msgpack.packb([hard_state.term, hard_state.voted_for], use_bin_type=True)
        path = os.path.join(self.directory, _HARD_STATE_FILE)
        temporary = path + ".tmp"
        with open(temporary, "wb") as f:
            f.write(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        _fsync_dir(self.directory)
        self.hard_state = hard_state

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def _valid_record_after(data: bytes, start: int) -> bool:
    """True when some offset at or after start holds a well-formed record (checksum and decode)."""
    view = memoryview(data)
    for offset in range(start, len(data) - _HEADER.size + 1):
        if not isinstance(decode_record(view, offset), str):
            return True
    return False


def _load_hard_state(path: str) -> HardState:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return HardState()
    decoded = _decode_hard_state(data)
    if decoded is None:
        raise WalCorruptionError(f"{path}: hard state file is damaged (it is replaced atomically, so this is "
                                 "not a torn write)")
    return decoded


def _decode_hard_state(data: bytes) -> HardState | None:
    if len(data) < _HEADER.size:
        return None
    length, crc = _HEADER.unpack_from(data, 0)
    payload = data[_HEADER.size:]
    if len(payload) != length or zlib.crc32(payload) != crc:
        return None
    try:
        term, voted_for = msgpack.unpackb(payload, raw=False)
    except Exception:
        return None
    return HardState(term=term, voted_for=voted_for)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
