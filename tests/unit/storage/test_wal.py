"""WriteAheadLog on real files: round trips, rotation, conflict truncation, and SPEC guarantee 7.

Guarantee 7: a torn record at the tail is cut off on restart (and logged with file and offset);
damage before the tail raises WalCorruptionError naming the file and byte offset. The damage is
made by hand on closed files, so every case is deterministic.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib

import msgpack
import pytest

from raftq.cluster.raft.messages import Entry, EntryKind, HardState
from raftq.cluster.storage import CompactedError, DurableLog, WalCorruptionError, WalFailedError, WriteAheadLog
from raftq.cluster.storage import wal as wal_module
from raftq.cluster.storage.wal import (
    HEADER_BYTES, NEED_DATA, RECORD_BYTES_MAX, BadRecord, RecordDecoder, decode_record, encode_record,
)

WAL_LOGGER = "raftq.wal"


def entry(index: int, term: int = 1, data: bytes | None = None) -> Entry:
    kind = EntryKind.NOOP if data == b"" else EntryKind.NORMAL
    return Entry(index=index, term=term, kind=kind, data=f"cmd-{index:05d}".encode() * 4 if data is None else data)


def entries(lo: int, hi: int, term: int = 1) -> list[Entry]:
    """Entries lo..hi inclusive."""
    return [entry(index, term) for index in range(lo, hi + 1)]


def open_wal(directory, **options) -> WriteAheadLog:
    """The WAL without preallocation: its files hold records only, so the byte-level cases below
    can damage known offsets. The preallocated layout (the default) has its own tests at the end."""
    return WriteAheadLog.open(directory, **{"preallocate_bytes": 0, **options})


def write_log(directory, items: list[Entry], *, segment_bytes_max: int = 1 << 20, batch: int = 3) -> None:
    with open_wal(directory, segment_bytes_max=segment_bytes_max) as wal:
        for start in range(0, len(items), batch):
            wal.append(items[start:start + batch])
            wal.sync()


def segment_paths(directory) -> list[str]:
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.startswith("wal-"))


def record_offsets(path: str) -> list[int]:
    """Start offset of every record in a segment file, found by decoding it independently of the WAL."""
    with open(path, "rb") as f:
        data = f.read()
    offsets, offset = [], 0
    while offset < len(data):
        decoded = decode_record(data, offset)
        assert isinstance(decoded, tuple), (path, offset, decoded)
        offsets.append(offset)
        offset = decoded[1]
    return offsets


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def cut_file(path: str, byte_count: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - byte_count)


def raw_record(index: int, term: int = 1, data: bytes = b"x") -> bytes:
    return encode_record(Entry(index, term, EntryKind.NORMAL, data))


def open_expecting_corruption(directory, path: str, offset: int) -> WalCorruptionError:
    with pytest.raises(WalCorruptionError) as info:
        open_wal(directory)
    error = info.value
    assert (error.path, error.offset) == (path, offset), str(error)
    assert f"{os.path.basename(path)} at byte {offset}:" in str(error)
    return error


# ---------------------------------------------------------------------- round trips


def test_round_trip_and_reopen(tmp_path):
    items = entries(1, 10) + [entry(11, 2, b"")]
    with open_wal(tmp_path) as wal:
        assert (wal.first_index, wal.last_index, wal.entries(), wal.hard_state) == (0, 0, [], HardState())
        wal.append(items[:4])
        wal.append(items[4:])
        wal.sync()
        assert wal.entries() == items
        assert (wal.first_index, wal.last_index) == (1, 11)
        assert [wal.term(i) for i in (0, 1, 10, 11, 12)] == [0, 1, 1, 2, 0]
        assert wal.entries(3, 6) == items[2:5]
        assert wal.entries(5) == items[4:]
    reopened = open_wal(tmp_path)
    assert reopened.entries() == items
    assert reopened.size_bytes == sum(os.path.getsize(p) for p in segment_paths(tmp_path))
    reopened.append(entries(12, 13, term=2))  # continues the same segment
    reopened.close()
    assert open_wal(tmp_path).entries() == items + entries(12, 13, term=2)
    assert [os.path.basename(p) for p in segment_paths(tmp_path)] == ["wal-00000000000000000001.log"]


def test_close_makes_appended_entries_durable_without_sync(tmp_path):
    wal = open_wal(tmp_path)
    wal.append(entries(1, 3))
    wal.close()
    wal.close()  # idempotent
    assert open_wal(tmp_path).entries() == entries(1, 3)


def test_open_creates_missing_directories(tmp_path):
    directory = tmp_path / "a" / "wal"
    with open_wal(directory) as wal:
        wal.append(entries(1, 1))
    assert open_wal(str(directory)).last_index == 1


def test_rotation_across_segments(tmp_path):
    items = entries(1, 40)
    write_log(tmp_path, items, segment_bytes_max=300, batch=7)
    paths = segment_paths(tmp_path)
    assert len(paths) > 3
    wal = open_wal(tmp_path, segment_bytes_max=300)
    assert wal.entries() == items
    assert wal.stats().segment_count == len(paths)
    first_indexes = [int(os.path.basename(p)[4:24]) for p in paths]
    assert first_indexes[0] == 1 and first_indexes == sorted(first_indexes)
    for path, first in zip(paths, first_indexes):
        with open(path, "rb") as f:
            head = decode_record(f.read(), 0)
        assert isinstance(head, tuple) and head[0].index == first, path  # the name says the first index
    # Every segment but the last is filled to the limit, none by more than one record past it.
    record_bytes = len(encode_record(items[0]))
    for path in paths[:-1]:
        assert 300 <= os.path.getsize(path) < 300 + record_bytes
    assert wal.size_bytes == sum(os.path.getsize(p) for p in paths)


def test_a_hundred_thousand_small_entries_synced_every_hundred(tmp_path):
    data = b"job-0123456789abcdef"
    with open_wal(tmp_path, segment_bytes_max=1 << 20) as wal:
        for start in range(1, 100_001, 100):
            wal.append([Entry(i, 1, EntryKind.NORMAL, data) for i in range(start, start + 100)])
            wal.sync()
        assert (wal.syncs_total, wal.entries_per_sync, wal.last_index) == (1000, 100, 100_000)
    reopened = open_wal(tmp_path, segment_bytes_max=1 << 20)
    assert reopened.last_index == 100_000 and len(segment_paths(tmp_path)) > 1
    assert reopened.entries()[-1] == Entry(100_000, 1, EntryKind.NORMAL, data)


# ---------------------------------------------------------------------- conflict truncation


def test_conflict_overwrite_inside_one_segment(tmp_path):
    write_log(tmp_path, entries(1, 10))
    with open_wal(tmp_path) as wal:
        wal.append(entries(6, 8, term=2))
        assert wal.entries() == entries(1, 5) + entries(6, 8, term=2)
        wal.sync()
        assert wal.size_bytes == os.path.getsize(segment_paths(tmp_path)[0])
    assert open_wal(tmp_path).entries() == entries(1, 5) + entries(6, 8, term=2)


@pytest.mark.parametrize("conflict_at", [1, 2, 5, 11, 17, 23, 29, 30])
def test_conflict_overwrite_across_segments(tmp_path, conflict_at):
    write_log(tmp_path, entries(1, 30), segment_bytes_max=200, batch=5)
    before = segment_paths(tmp_path)
    with open_wal(tmp_path, segment_bytes_max=200) as wal:
        wal.append(entries(conflict_at, conflict_at + 2, term=3))
        wal.sync()
        expected = entries(1, conflict_at - 1) + entries(conflict_at, conflict_at + 2, term=3)
        assert wal.entries() == expected
        assert wal.size_bytes == sum(os.path.getsize(p) for p in segment_paths(tmp_path))
    after = segment_paths(tmp_path)
    assert len(after) <= len(before)
    reopened = open_wal(tmp_path, segment_bytes_max=200)
    assert reopened.entries() == expected
    reopened.append(entries(conflict_at + 3, conflict_at + 4, term=3))  # appending goes on after a cut
    reopened.close()
    assert open_wal(tmp_path).entries() == expected + entries(conflict_at + 3, conflict_at + 4, term=3)


def test_append_with_a_gap_or_a_lower_term_is_a_programmer_error(tmp_path):
    with open_wal(tmp_path) as wal:
        wal.append(entries(1, 3, term=2))
        with pytest.raises(AssertionError):
            wal.append([entry(5)])
        with pytest.raises(AssertionError):
            wal.append([entry(4, term=2), entry(6, term=2)])
        with pytest.raises(AssertionError):
            wal.append([entry(4, term=1)])


# ---------------------------------------------------------------------- torn tails


@pytest.mark.parametrize("cut", [1, 5, 17])
def test_torn_tail_is_cut_logged_and_repaired(tmp_path, caplog, cut):
    items = entries(1, 12)
    write_log(tmp_path, items)
    [path] = segment_paths(tmp_path)
    last_record_at = record_offsets(path)[-1]
    size = os.path.getsize(path)
    cut_file(path, cut)
    caplog.set_level(logging.WARNING, logger=WAL_LOGGER)

    wal = open_wal(tmp_path)
    assert wal.entries() == items[:-1]
    [message] = [r.getMessage() for r in caplog.records if r.name == WAL_LOGGER]
    assert "torn" in message and path in message
    assert f"at byte {last_record_at}" in message
    assert f"{size - cut - last_record_at} bytes dropped" in message
    assert os.path.getsize(path) == last_record_at
    wal.close()

    caplog.clear()
    assert open_wal(tmp_path).entries() == items[:-1]
    assert not [r for r in caplog.records if r.name == WAL_LOGGER]  # repaired: the second open is clean


def test_every_cut_inside_the_last_records_keeps_exactly_the_whole_records(tmp_path):
    items = entries(1, 8)
    write_log(tmp_path, items, batch=8)
    [path] = segment_paths(tmp_path)
    with open(path, "rb") as f:
        original = f.read()
    offsets = record_offsets(path)
    bounds = offsets + [len(original)]  # record k spans bounds[k]..bounds[k + 1]
    for end in range(offsets[-3], len(original)):  # a crash cuts the byte stream anywhere
        with open(path, "wb") as f:
            f.write(original[:end])
        whole = sum(1 for k in range(len(offsets)) if bounds[k + 1] <= end)
        assert open_wal(tmp_path).entries() == items[:whole], end
        assert os.path.getsize(path) == bounds[whole]


def test_a_torn_first_record_leaves_an_empty_log_that_accepts_appends(tmp_path):
    write_log(tmp_path, entries(1, 1))
    [path] = segment_paths(tmp_path)
    cut_file(path, 3)
    with open_wal(tmp_path) as wal:
        assert wal.entries() == [] and wal.last_index == 0
        wal.append(entries(1, 2, term=2))
    assert open_wal(tmp_path).entries() == entries(1, 2, term=2)
    assert segment_paths(tmp_path) == [path]


def test_torn_tail_goes_to_the_given_logger(tmp_path, caplog):
    write_log(tmp_path, entries(1, 3))
    cut_file(segment_paths(tmp_path)[0], 2)
    caplog.set_level(logging.WARNING)
    open_wal(tmp_path, logger=logging.getLogger("raftq.node"))
    assert [r.name for r in caplog.records] == ["raftq.node"]


def test_zero_filled_tail_ends_the_log_and_is_kept(tmp_path, caplog):
    # The preallocated space looks like this; so does a power loss that left the file longer than
    # what was written, the rest zeros (XFS, ext4 writeback). Neither is damage, and the zeros are
    # simply overwritten by the next appends.
    items = entries(1, 5)
    write_log(tmp_path, items)
    [path] = segment_paths(tmp_path)
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(bytes(4096))
    caplog.set_level(logging.WARNING, logger=WAL_LOGGER)
    with open_wal(tmp_path) as wal:
        assert wal.entries() == items and wal.size_bytes == size
        assert os.path.getsize(path) == size + 4096
        wal.append(entries(6, 7))
    assert open_wal(tmp_path).entries() == entries(1, 7)
    assert os.path.getsize(path) == size + 4096
    assert caplog.text == ""


def test_an_empty_last_segment_is_a_crash_right_after_rotation(tmp_path):
    write_log(tmp_path, entries(1, 10), segment_bytes_max=200)
    empty = os.path.join(tmp_path, "wal-00000000000000000011.log")
    open(empty, "wb").close()
    with open_wal(tmp_path, segment_bytes_max=200) as wal:
        assert wal.last_index == 10
        wal.append(entries(11, 12))
    assert os.path.getsize(empty) > 0
    assert open_wal(tmp_path).entries() == entries(1, 12)


def test_a_bit_flip_in_the_very_last_record_looks_torn_and_is_cut(tmp_path, caplog):
    # The documented limit of one checksum per record: nothing follows to tell damage from a torn write.
    write_log(tmp_path, entries(1, 6))
    [path] = segment_paths(tmp_path)
    flip_byte(path, record_offsets(path)[-1] + HEADER_BYTES + 3)
    caplog.set_level(logging.WARNING, logger=WAL_LOGGER)
    assert open_wal(tmp_path).entries() == entries(1, 5)
    assert "crc mismatch" in caplog.text


@pytest.mark.parametrize("embedded_index,torn", [(2, True), (9, False)])
def test_a_record_embedded_in_a_torn_payload_counts_only_if_it_could_continue_the_log(
        tmp_path, embedded_index, torn):
    # User payloads are opaque bytes and may contain something shaped like a record. Inside a torn
    # final record, one that could not follow the log (index 2 after 8) is ignored; one that could
    # (index 9) makes recovery refuse rather than guess: fail-stop, never silent loss.
    embedded = raw_record(embedded_index, term=1, data=b"payload")
    write_log(tmp_path, entries(1, 8) + [entry(9, data=b"<" + embedded + b">" * 40)])
    [path] = segment_paths(tmp_path)
    last_record_at = record_offsets(path)[-1]
    cut_file(path, 20)  # the embedded record survives whole, the record holding it does not
    if torn:
        assert open_wal(tmp_path).entries() == entries(1, 8)
    else:
        assert "valid record follows" in open_expecting_corruption(tmp_path, path, last_record_at).reason


# ---------------------------------------------------------------------- damage before the tail


# (name, position inside record 3 of 8): the length field, the checksum, the payload.
FLIPS = [("length low byte", 0), ("length high byte", 3), ("crc", 5), ("payload", HEADER_BYTES + 2),
         ("payload end", -1)]


@pytest.mark.parametrize("name,position", FLIPS, ids=[name for name, _ in FLIPS])
def test_a_flipped_byte_before_the_tail_names_file_and_offset(tmp_path, name, position):
    write_log(tmp_path, entries(1, 8))
    [path] = segment_paths(tmp_path)
    offsets = record_offsets(path)
    target = offsets[2] + position if position >= 0 else offsets[3] + position
    flip_byte(path, target)
    size = os.path.getsize(path)
    open_expecting_corruption(tmp_path, path, offsets[2])
    assert os.path.getsize(path) == size  # nothing was cut


@pytest.mark.parametrize("where", ["middle", "last record", "truncated"])
def test_damage_in_an_earlier_segment_is_corruption(tmp_path, where):
    write_log(tmp_path, entries(1, 20), segment_bytes_max=200)
    first = segment_paths(tmp_path)[0]
    offsets = record_offsets(first)
    if where == "middle":
        flip_byte(first, offsets[1] + HEADER_BYTES)
        bad_at = offsets[1]
    elif where == "last record":  # would pass for a torn tail, were it in the last segment
        flip_byte(first, offsets[-1] + HEADER_BYTES)
        bad_at = offsets[-1]
    else:
        cut_file(first, 4)
        bad_at = offsets[-1]
    error = open_expecting_corruption(tmp_path, first, bad_at)
    assert "not the last segment" in str(error)


def test_zeroed_bytes_followed_by_valid_records_are_corruption(tmp_path):
    write_log(tmp_path, entries(1, 8))
    [path] = segment_paths(tmp_path)
    offsets = record_offsets(path)
    with open(path, "r+b") as f:  # a zeroed block in the middle, as a failing disk might return
        f.seek(offsets[4])
        f.write(bytes(offsets[5] - offsets[4]))
    error = open_expecting_corruption(tmp_path, path, offsets[4])
    assert "empty record" in error.reason and "valid record follows" in error.reason


def test_a_length_flipped_to_run_past_the_end_does_not_hide_the_records_behind_it(tmp_path):
    # Believing the length field would call this a torn tail and silently drop records 4..8.
    write_log(tmp_path, entries(1, 8))
    [path] = segment_paths(tmp_path)
    offsets = record_offsets(path)
    with open(path, "r+b") as f:
        f.seek(offsets[3])
        f.write(struct.pack("<I", os.path.getsize(path)))  # plausible, but runs past the end of file
    error = open_expecting_corruption(tmp_path, path, offsets[3])
    assert f"valid record follows at byte {offsets[4]}" in error.reason


def record_with_payload_length(index: int, payload_bytes: int) -> bytes:
    data_bytes = payload_bytes
    while len(record := raw_record(index, data=b"y" * data_bytes)) - HEADER_BYTES > payload_bytes:
        data_bytes -= 1
    assert len(record) - HEADER_BYTES == payload_bytes
    return record


# Little-endian lengths whose first 0, 1, 2 and 3 bytes are zero: the header starts that many
# bytes before its first non-zero byte.
RECORDS_BY_LEADING_ZEROS = [record_with_payload_length(5, n) for n in (0x2C, 1 << 8, 1 << 16, 1 << 24)]


@pytest.mark.parametrize("leading_zeros", range(4))
@pytest.mark.parametrize("zeros", [0, 1, 3, 4, 5, 11])
def test_the_tail_scan_skips_zero_runs_without_missing_a_record(zeros, leading_zeros):
    tail = b"\xff" + bytes(zeros) + RECORDS_BY_LEADING_ZEROS[leading_zeros]
    assert wal_module._plausible_record_after(tail, 1, 5, 1) == 1 + zeros
    assert wal_module._plausible_record_after(b"\xff" + bytes(64), 1, 5, 1) is None


def write_segment(directory, first_index: int, records: list[bytes]) -> str:
    path = os.path.join(directory, f"wal-{first_index:020d}.log")
    with open(path, "wb") as f:
        f.write(b"".join(records))
    return path


def test_index_continuity_and_term_order_are_checked(tmp_path):
    path = write_segment(tmp_path, 1, [raw_record(1), raw_record(2), raw_record(4), raw_record(5)])
    error = open_expecting_corruption(tmp_path, path, 2 * len(raw_record(1)))
    assert "entry index 4, expected 3" in error.reason
    path = write_segment(tmp_path, 1, [raw_record(1, term=2), raw_record(2, term=1)])
    assert "lower than" in open_expecting_corruption(tmp_path, path, len(raw_record(1, term=2))).reason


def test_a_well_formed_record_with_the_wrong_index_at_the_tail_is_not_torn(tmp_path):
    path = write_segment(tmp_path, 1, [raw_record(1), raw_record(2), raw_record(2)])
    open_expecting_corruption(tmp_path, path, 2 * len(raw_record(1)))


def test_segment_name_must_match_its_first_record_and_follow_the_previous_segment(tmp_path):
    path = write_segment(tmp_path, 1, [raw_record(2)])
    assert "expected 1" in open_expecting_corruption(tmp_path, path, 0).reason
    os.unlink(path)
    write_segment(tmp_path, 1, [raw_record(1), raw_record(2)])
    gap = write_segment(tmp_path, 5, [raw_record(5)])  # segment 3..4 is missing
    assert "should start at index 3" in open_expecting_corruption(tmp_path, gap, 0).reason


def test_an_empty_segment_before_the_last_is_a_gap(tmp_path):
    write_segment(tmp_path, 1, [raw_record(1)])
    write_segment(tmp_path, 2, [])
    later = write_segment(tmp_path, 3, [raw_record(3)])
    open_expecting_corruption(tmp_path, later, 0)


def test_files_that_are_not_segments_are_ignored(tmp_path):
    write_log(tmp_path, entries(1, 2))
    (tmp_path / "wal-1.log").write_bytes(b"junk")
    (tmp_path / "notes.txt").write_bytes(b"junk")
    assert open_wal(tmp_path).entries() == entries(1, 2)


# ---------------------------------------------------------------------- hard state, stats, failure


def test_hard_state_is_saved_and_reloaded(tmp_path):
    with open_wal(tmp_path) as wal:
        wal.save_hard_state(HardState(term=3, voted_for="n2"))
        assert wal.hard_state == HardState(3, "n2")
        wal.save_hard_state(HardState(term=4, voted_for=None))
    assert open_wal(tmp_path).hard_state == HardState(4, None)
    assert sorted(os.listdir(tmp_path)) == ["hardstate"]


def test_stats_count_syncs_that_did_something(tmp_path):
    with open_wal(tmp_path, segment_bytes_max=200) as wal:
        wal.sync()  # nothing to make durable
        assert wal.syncs_total == 0
        wal.append(entries(1, 7))
        wal.sync()
        wal.sync()
        stats = wal.stats()
        assert (stats.syncs_total, stats.entries_per_sync, stats.last_index) == (1, 7, 7)
        assert stats.last_sync_seconds >= 0.0
        assert stats.size_bytes == wal.size_bytes == sum(os.path.getsize(p) for p in segment_paths(tmp_path))


def test_a_failed_fsync_fails_the_log_for_good(tmp_path, monkeypatch):
    wal = open_wal(tmp_path)
    wal.append(entries(1, 2))

    def failing_fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(wal_module, "_fdatasync", failing_fdatasync)
    with pytest.raises(OSError):
        wal.sync()
    monkeypatch.undo()
    with pytest.raises(WalFailedError):
        wal.sync()  # a retry could "succeed" on pages the kernel already dropped
    with pytest.raises(WalFailedError):
        wal.append(entries(3, 3))
    wal.close()
    assert open_wal(tmp_path).entries() == entries(1, 2)


def test_two_threads_at_once_is_a_programmer_error(tmp_path):
    with open_wal(tmp_path) as wal:
        with wal._exclusive:  # as if another thread were inside append()
            with pytest.raises(AssertionError, match="two threads"):
                wal.append(entries(1, 1))


def test_reading_entries_back_while_another_thread_writes_is_a_programmer_error(tmp_path):
    with open_wal(tmp_path) as wal:
        wal.append(entries(1, 2))
        with wal._exclusive:  # as if a persist were running in a worker thread
            with pytest.raises(AssertionError, match="two threads"):
                wal.entries(1, 3)
        assert wal.entries(1, 3) == entries(1, 2)


def test_implements_the_storage_protocol(tmp_path):
    with open_wal(tmp_path) as wal:
        assert isinstance(wal, DurableLog)


# ---------------------------------------------------------------------- compaction


def test_compact_drops_whole_segments_before_an_index(tmp_path):
    items = entries(1, 30)
    write_log(tmp_path, items, segment_bytes_max=200)
    wal = open_wal(tmp_path, segment_bytes_max=200)
    segments_before = len(segment_paths(tmp_path))
    dropped = wal.compact(15)
    assert 0 < dropped <= 15 and wal.first_index == dropped + 1
    assert len(segment_paths(tmp_path)) < segments_before
    assert wal.entries() == items[dropped:] and wal.term(dropped) == 1
    with pytest.raises(CompactedError):
        wal.term(dropped - 1)
    with pytest.raises(CompactedError):
        wal.entries(1, 3)
    wal.append(entries(31, 32))
    wal.close()

    reopened = open_wal(tmp_path, segment_bytes_max=200)
    assert (reopened.first_index, reopened.last_index) == (dropped + 1, 32)
    assert reopened.entries() == items[dropped:] + entries(31, 32)
    with pytest.raises(CompactedError):
        reopened.term(dropped)  # the term just before the log is not on disk
    assert reopened.compact(32) > 0 and reopened.last_index == 32  # the last segment always stays


def test_reset_after_empties_the_log_and_continues_after_a_snapshot_point(tmp_path):
    write_log(tmp_path, entries(1, 30), segment_bytes_max=200)
    wal = open_wal(tmp_path, segment_bytes_max=200)
    wal.reset_after(100, 4)
    assert segment_paths(tmp_path) == [] and (wal.first_index, wal.last_index, wal.term(100)) == (0, 100, 4)
    wal.append(entries(101, 103, term=5))
    wal.sync()
    wal.close()
    reopened = open_wal(tmp_path, segment_bytes_max=200)
    assert (reopened.first_index, reopened.last_index) == (101, 103)
    assert reopened.entries() == entries(101, 103, term=5)


# ---------------------------------------------------------------------- the record codec


def test_decoder_on_the_whole_encoding_then_every_split(tmp_path):
    items = entries(1, 4) + [entry(5, 2, b""), entry(6, 2, bytes(range(256)))]
    stream = b"".join(encode_record(item) for item in items)

    def decode_all(chunks: list[bytes]) -> list[Entry]:
        decoder, found = RecordDecoder(), []
        for chunk in chunks:
            decoder.feed(chunk)
            while (record := decoder.next_record()) is not NEED_DATA:
                assert isinstance(record, Entry), record
                found.append(record)
        assert decoder.buffered_bytes == 0 and decoder.offset == len(stream)
        return found

    assert decode_all([stream]) == items
    assert decode_all([stream[i:i + 1] for i in range(len(stream))]) == items
    for split in range(len(stream) + 1):
        assert decode_all([stream[:split], stream[split:]]) == items, split


def test_decoder_with_trailing_incomplete_bytes():
    stream = encode_record(entry(1)) + encode_record(entry(2))
    decoder = RecordDecoder()
    decoder.feed(stream[:-3])
    assert decoder.next_record() == entry(1)
    assert decoder.next_record() is NEED_DATA
    assert decoder.offset == len(encode_record(entry(1)))
    assert decoder.buffered_bytes == len(encode_record(entry(2))) - 3
    assert "runs past the end" in decoder.incomplete_reason()
    decoder = RecordDecoder()
    decoder.feed(stream[:5])
    assert decoder.next_record() is NEED_DATA and "incomplete header" in decoder.incomplete_reason()


def test_decoder_stays_on_a_bad_record():
    good = encode_record(entry(1))
    bad = bytearray(encode_record(entry(2)))
    bad[-1] ^= 1
    decoder = RecordDecoder()
    decoder.feed(good + bytes(bad) + encode_record(entry(3)))
    assert decoder.next_record() == entry(1)
    assert decoder.next_record() == BadRecord(len(good), "crc mismatch")
    assert decoder.next_record() == BadRecord(len(good), "crc mismatch")


def frame(payload: bytes) -> bytes:
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


BAD_RECORDS = [
    (bytes(8) + b"abc", "empty record"),
    (struct.pack("<II", RECORD_BYTES_MAX + 1, 0), "implausible record length"),
    (frame(b"\xc1"), "undecodable payload"),  # 0xc1 is never used in msgpack
    (frame(msgpack.packb([1, 1, 0, b"x"]) + b"\x00"), "undecodable payload"),  # trailing bytes
    (frame(msgpack.packb([1, 1, 0])), "not [index, term, kind, data]"),
    (frame(msgpack.packb({"index": 1})), "not [index, term, kind, data]"),
    (frame(msgpack.packb([0, 1, 0, b"x"])), "wrong types"),
    (frame(msgpack.packb([1, 1, 0, "text"])), "wrong types"),
    (frame(msgpack.packb([True, 1, 0, b"x"])), "wrong types"),
    (frame(msgpack.packb([1, 1, 7, b"x"])), "unknown entry kind 7"),
]


@pytest.mark.parametrize("data,reason", BAD_RECORDS, ids=[reason for _, reason in BAD_RECORDS])
def test_decode_record_explains_bad_records(data, reason):
    decoded = decode_record(data, 0)
    assert isinstance(decoded, str) and reason in decoded


def test_decode_record_needs_data_for_a_partial_record():
    record = encode_record(entry(9))
    assert all(decode_record(record[:end], 0) is None for end in range(len(record)))
    assert decode_record(b"pad" + record, 3) == (entry(9), 3 + len(record))


# ---------------------------------------------------------------------- the preallocated layout (the default)

STEP = 4096  # preallocation step for these tests: several steps per segment


def test_a_preallocated_segment_reopens_to_its_records_without_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=WAL_LOGGER)
    with WriteAheadLog.open(tmp_path, preallocate_bytes=STEP) as wal:
        wal.append(entries(1, 5))
        wal.sync()
        records_end = wal.size_bytes
    [path] = segment_paths(tmp_path)
    assert os.path.getsize(path) == STEP > records_end  # records, then zeros up to the step
    with WriteAheadLog.open(tmp_path, preallocate_bytes=STEP) as wal:
        assert wal.entries() == entries(1, 5) and wal.size_bytes == records_end
        wal.append(entries(6, 8))  # written over the zeros, right after the last record
        wal.sync()
    assert os.path.getsize(path) == STEP
    assert record_offsets_until_zeros(path)[-1] < STEP
    assert WriteAheadLog.open(tmp_path).entries() == entries(1, 8)
    assert caplog.text == ""


def test_the_file_grows_a_step_ahead_and_by_steps(tmp_path):
    record_bytes = len(encode_record(entry(1)))
    per_step = STEP // record_bytes
    with WriteAheadLog.open(tmp_path, preallocate_bytes=STEP) as wal:
        wal.append(entries(1, per_step))
        [path] = segment_paths(tmp_path)
        assert os.path.getsize(path) == STEP
        wal.append([entry(per_step + 1)])  # past the first step: one more step, not one record
        assert os.path.getsize(path) == 2 * STEP
        assert wal.size_bytes == (per_step + 1) * record_bytes


def test_a_torn_record_in_preallocated_space_is_cut_and_logged(tmp_path, caplog):
    with WriteAheadLog.open(tmp_path, preallocate_bytes=STEP) as wal:
        wal.append(entries(1, 5))
        wal.sync()
        records_end = wal.size_bytes
    [path] = segment_paths(tmp_path)
    torn = encode_record(entry(6))[:-5]  # a crash persisted the record's start, zeros after it
    with open(path, "r+b") as f:
        f.seek(records_end)
        f.write(torn)
    caplog.set_level(logging.WARNING, logger=WAL_LOGGER)
    with WriteAheadLog.open(tmp_path, preallocate_bytes=STEP) as wal:
        assert wal.entries() == entries(1, 5)
        assert os.path.getsize(path) == records_end  # cut at the torn record, zeros and all
        wal.append(entries(6, 7))
    assert f"at byte {records_end}" in caplog.text and os.path.basename(path) in caplog.text
    assert WriteAheadLog.open(tmp_path).entries() == entries(1, 7)


def test_zeros_in_the_middle_of_a_preallocated_segment_are_corruption(tmp_path):
    with WriteAheadLog.open(tmp_path, preallocate_bytes=STEP) as wal:
        wal.append(entries(1, 8))
        wal.sync()
    [path] = segment_paths(tmp_path)
    offsets = record_offsets_until_zeros(path)
    with open(path, "r+b") as f:  # a lost page: a record in the middle reads back as zeros
        f.seek(offsets[3])
        f.write(bytes(offsets[4] - offsets[3]))
    with pytest.raises(WalCorruptionError) as caught:
        WriteAheadLog.open(tmp_path, preallocate_bytes=STEP)
    assert caught.value.path == path and caught.value.offset == offsets[3]


def test_rotation_cuts_the_zeros_off_the_sealed_segment(tmp_path):
    items = entries(1, 40)
    with WriteAheadLog.open(tmp_path, segment_bytes_max=1000, preallocate_bytes=STEP) as wal:
        for start in range(0, len(items), 3):
            wal.append(items[start:start + 3])
            wal.sync()
    *sealed, last = segment_paths(tmp_path)
    assert sealed, "the test wants several segments"
    for path in sealed:  # records only: a sealed segment ending in zeros would be damage
        assert record_offsets(path) and os.path.getsize(path) >= 1000
    # The last one is preallocated up to the segment limit, never a whole step past it.
    assert os.path.getsize(last) <= 1000 + len(encode_record(items[-1])) < STEP
    assert WriteAheadLog.open(tmp_path, segment_bytes_max=1000).entries() == items


def test_a_sealed_segment_ending_in_zeros_is_corruption(tmp_path):
    write_log(tmp_path, entries(1, 20), segment_bytes_max=300)
    first = segment_paths(tmp_path)[0]
    size = os.path.getsize(first)
    with open(first, "ab") as f:
        f.write(bytes(100))
    with pytest.raises(WalCorruptionError) as caught:
        WriteAheadLog.open(tmp_path)
    assert caught.value.path == first and caught.value.offset == size


def test_a_conflict_overwrite_in_a_preallocated_segment_leaves_no_old_record_behind(tmp_path):
    with WriteAheadLog.open(tmp_path, preallocate_bytes=STEP) as wal:
        wal.append(entries(1, 10, term=1))
        wal.sync()
        wal.append([entry(6, term=2, data=b"new")])  # replaces 6..10 with one shorter entry
        wal.sync()
        assert wal.entries() == entries(1, 5) + [entry(6, term=2, data=b"new")]
    reopened = WriteAheadLog.open(tmp_path, preallocate_bytes=STEP)
    assert reopened.entries() == entries(1, 5) + [entry(6, term=2, data=b"new")]
    assert reopened.last_index == 6


def record_offsets_until_zeros(path: str) -> list[int]:
    """record_offsets() of a preallocated segment: the records up to its zeroed space."""
    with open(path, "rb") as f:
        data = f.read()
    offsets, offset = [], 0
    while offset < len(data) and any(data[offset:offset + HEADER_BYTES]):
        decoded = decode_record(data, offset)
        assert isinstance(decoded, tuple), (path, offset, decoded)
        offsets.append(offset)
        offset = decoded[1]
    assert not any(data[offset:]), f"{path}: bytes after the records at {offset} are not all zeros"
    return offsets
