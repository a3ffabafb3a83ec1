"""SnapshotStore on real files: writes, verification, damage detection, retention, and transfers.

Damage is made by hand on closed files, so every case is deterministic; each one must raise
SnapshotCorruptionError naming the damaged file. Bodies are written in many small chunks; the
round trip's body is over 2 MiB, so the writer's buffer and the 1 MiB read loops wrap around.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct

import pytest

from raftq.cluster.storage.errors import SnapshotCorruptionError, StorageError
from raftq.cluster.storage.snapshots import (
    MAGIC, TRAILER_BYTES, IncomingSnapshot, OffsetMismatch, SnapshotMeta, SnapshotStore, file_digest,
    snapshot_file_name,
)

SNAPSHOT_LOGGER = "raftq.snapshots"


def body_bytes(index: int, size: int = 300_000) -> bytes:
    """A body that differs per index and is not all one byte (so a flipped byte always shows)."""
    seed = hashlib.sha256(f"snapshot {index}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def write_snapshot(store: SnapshotStore, index: int, term: int = 1, body: bytes | None = None,
                   chunk: int = 4099) -> SnapshotMeta:
    body = body_bytes(index) if body is None else body
    with store.writer(index, term) as writer:
        for start in range(0, len(body), chunk):
            writer.write(body[start:start + chunk])
        return writer.commit()


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def listed(store: SnapshotStore, meta: SnapshotMeta) -> SnapshotMeta:
    """meta as list() sees it now (after damage, the size may differ from the committed meta)."""
    return next(m for m in store.list() if m.path == meta.path)


# ---------------------------------------------------------------------- writing and reading


def test_round_trip(tmp_path):
    store = SnapshotStore.open(tmp_path / "snapshots")
    body = body_bytes(7, 2_500_000)
    meta = write_snapshot(store, 7, 3, body)

    assert meta == SnapshotMeta(7, 3, os.path.join(store.directory, snapshot_file_name(7, 3)),
                                len(body) + TRAILER_BYTES)
    assert os.path.basename(meta.path) == f"snap-{7:020d}-{3:020d}.snap"
    assert store.list() == [meta]
    assert store.newest() == meta
    assert os.listdir(store.directory) == [os.path.basename(meta.path)]  # no .tmp left behind
    store.verify(meta)

    data = read_file(meta.path)
    assert data[:len(body)] == body
    index, term, length, digest, magic = struct.unpack("<QQQ32s8s", data[len(body):])
    assert (index, term, length, digest, magic) == (7, 3, len(body), hashlib.sha256(body).digest(), MAGIC)

    with store.open_body(meta) as f:
        assert f.tell() == 0
        pieces = []
        while piece := f.read(65_537):
            pieces.append(piece)
        assert b"".join(pieces) == body
        assert f.read(10) == b""  # the trailer is never returned
    with store.open_body(meta) as f:
        assert f.read() == body

    pieces = [store.read_range(meta, offset, 300_000) for offset in range(0, meta.size_bytes, 300_000)]
    assert b"".join(pieces) == data
    assert store.read_range(meta, meta.size_bytes, 10) == b""
    assert file_digest(meta) == hashlib.sha256(data).hexdigest()


def test_empty_body_round_trips(tmp_path):
    store = SnapshotStore.open(tmp_path)
    meta = write_snapshot(store, 1, 1, b"")
    assert meta.size_bytes == TRAILER_BYTES
    store.verify(meta)
    with store.open_body(meta) as f:
        assert f.read() == b""


def test_list_orders_by_index_then_term_and_ignores_other_files(tmp_path):
    store = SnapshotStore.open(tmp_path)
    for index, term in [(20, 2), (3, 1), (20, 1), (100, 4)]:
        write_snapshot(store, index, term, body_bytes(index, 100))
    for name in ["notes.txt", "snap-1-1.snap", snapshot_file_name(5, 1) + ".damaged"]:
        (tmp_path / name).write_bytes(b"x")
    assert [(m.index, m.term) for m in store.list()] == [(3, 1), (20, 1), (20, 2), (100, 4)]
    assert (store.newest().index, store.newest().term) == (100, 4)


def test_empty_store(tmp_path):
    store = SnapshotStore.open(tmp_path / "a" / "b")
    assert os.path.isdir(tmp_path / "a" / "b")
    assert store.list() == [] and store.newest() is None


def test_crash_leftover_tmp_is_deleted_at_open_and_never_listed(tmp_path, caplog):
    store = SnapshotStore.open(tmp_path)
    meta = write_snapshot(store, 5)
    # A crash during the write of snapshot 9: only its temporary file is there.
    writer = store.writer(9, 2)
    writer.write(b"partial state")
    leftover = os.path.join(store.directory, snapshot_file_name(9, 2) + ".tmp")
    assert os.path.exists(leftover)
    assert store.list() == [meta]
    part = tmp_path / "incoming-12-2-0123456789abcdef.part"
    part.write_bytes(b"half a transfer")

    with caplog.at_level(logging.WARNING, logger=SNAPSHOT_LOGGER):
        reopened = SnapshotStore.open(tmp_path)
    assert not os.path.exists(leftover)
    assert any(leftover in record.getMessage() for record in caplog.records)
    assert part.exists(), "a .part is a resumable transfer, not a crash leftover"
    assert reopened.list() == [meta]
    writer.abort()  # the crashed writer's handle; its file is already gone


def test_writer_aborted_by_an_exception_leaves_no_file(tmp_path):
    store = SnapshotStore.open(tmp_path)
    with pytest.raises(RuntimeError, match="capture failed"):
        with store.writer(4, 1) as writer:
            writer.write(b"some state")
            raise RuntimeError("capture failed")
    assert os.listdir(tmp_path) == []
    assert store.list() == []


def test_writer_left_without_commit_or_aborted_leaves_no_file(tmp_path):
    store = SnapshotStore.open(tmp_path)
    with store.writer(4, 1) as writer:
        writer.write(b"some state")
    writer.abort()  # idempotent
    other = store.writer(5, 1)
    other.write(b"x")
    other.abort()
    assert os.listdir(tmp_path) == []


def test_retain_keeps_the_newest_and_deletes_oldest_first(tmp_path):
    store = SnapshotStore.open(tmp_path)
    metas = [write_snapshot(store, index, 1, body_bytes(index, 1000)) for index in (10, 20, 30, 40)]
    assert store.retain(2) == [metas[0].path, metas[1].path]
    assert store.list() == metas[2:]
    assert store.retain(2) == []
    assert store.retain(1) == [metas[2].path]
    assert store.list() == [metas[3]]


def test_remove(tmp_path):
    store = SnapshotStore.open(tmp_path)
    old, new = write_snapshot(store, 1, body=b"a"), write_snapshot(store, 2, body=b"b")
    store.remove(new)
    assert store.list() == [old]
    with pytest.raises(FileNotFoundError):
        store.remove(new)


def test_a_second_open_sees_the_committed_snapshots(tmp_path):
    store = SnapshotStore.open(tmp_path)
    metas = [write_snapshot(store, index, 2, body_bytes(index, 5000)) for index in (8, 16)]
    reopened = SnapshotStore.open(tmp_path)
    assert reopened.list() == metas
    assert reopened.newest() == metas[-1]
    for meta in metas:
        reopened.verify(meta)
        with reopened.open_body(meta) as f:
            assert f.read() == body_bytes(meta.index, 5000)


# ---------------------------------------------------------------------- damage


def cut(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def check_damaged(store: SnapshotStore, meta: SnapshotMeta, *reason_parts: str) -> SnapshotCorruptionError:
    with pytest.raises(SnapshotCorruptionError) as caught:
        store.verify(meta)
    error = caught.value
    assert isinstance(error, StorageError)
    assert error.path == meta.path
    assert str(error).startswith(meta.path + ": ")
    for part in reason_parts:
        assert part in error.reason, error.reason
    return error


@pytest.mark.parametrize("size", ["one byte short", "half", "empty", "trailer only, short"])
def test_a_file_cut_short_is_damage(tmp_path, size):
    store = SnapshotStore.open(tmp_path)
    meta = write_snapshot(store, 12, 2)
    new_size = {"one byte short": meta.size_bytes - 1, "half": meta.size_bytes // 2, "empty": 0,
                "trailer only, short": TRAILER_BYTES - 1}[size]
    cut(meta.path, new_size)
    # As the node sees it at start (a fresh listing), and with the meta of the commit.
    check_damaged(store, listed(store, meta))
    check_damaged(store, meta, "cut short")
    if new_size < TRAILER_BYTES:
        check_damaged(store, listed(store, meta), "cut short", f"{new_size} bytes")
    else:
        check_damaged(store, listed(store, meta), "bad magic")  # the magic is the first thing a cut loses


def test_a_flipped_body_byte_fails_the_checksum(tmp_path):
    store = SnapshotStore.open(tmp_path)
    meta = write_snapshot(store, 12, 2)
    flip(meta.path, 123_456)
    check_damaged(store, meta, "checksum mismatch")


def test_a_flipped_byte_in_the_trailer_index_is_damage(tmp_path):
    store = SnapshotStore.open(tmp_path)
    meta = write_snapshot(store, 12, 2)
    flip(meta.path, meta.size_bytes - TRAILER_BYTES)  # lowest byte of the trailer's index
    check_damaged(store, meta, f"name says index 12, trailer says {12 ^ 0x40}")


def test_a_flipped_byte_in_the_trailer_length_or_digest_is_damage(tmp_path):
    store = SnapshotStore.open(tmp_path)
    meta = write_snapshot(store, 12, 2)
    flip(meta.path, meta.size_bytes - TRAILER_BYTES + 16)  # body length
    check_damaged(store, meta, "trailer says", "body bytes")
    flip(meta.path, meta.size_bytes - TRAILER_BYTES + 16)
    store.verify(meta)
    flip(meta.path, meta.size_bytes - TRAILER_BYTES + 40)  # digest
    check_damaged(store, meta, "checksum mismatch")


def test_wrong_magic_is_damage(tmp_path):
    store = SnapshotStore.open(tmp_path)
    meta = write_snapshot(store, 12, 2)
    with open(meta.path, "r+b") as f:
        f.seek(meta.size_bytes - len(MAGIC))
        f.write(b"RAFTQSN9")
    check_damaged(store, meta, "bad magic", "RAFTQSN9")


def test_a_snapshot_renamed_to_another_index_is_damage(tmp_path):
    store = SnapshotStore.open(tmp_path)
    meta = write_snapshot(store, 12, 2)
    os.rename(meta.path, os.path.join(store.directory, snapshot_file_name(40, 2)))
    (renamed,) = store.list()
    assert renamed.index == 40
    check_damaged(store, renamed, "name says index 40, trailer says 12")
    os.rename(renamed.path, os.path.join(store.directory, snapshot_file_name(12, 5)))
    check_damaged(store, store.newest(), "name says term 5, trailer says 2")


def test_open_body_refuses_a_file_without_its_trailer(tmp_path):
    store = SnapshotStore.open(tmp_path)
    meta = write_snapshot(store, 12, 2)
    cut(meta.path, meta.size_bytes - 1)
    with pytest.raises(SnapshotCorruptionError, match="bad magic") as caught:
        store.open_body(listed(store, meta))
    assert caught.value.path == meta.path


# ---------------------------------------------------------------------- incoming transfers


@pytest.fixture
def source(tmp_path):
    """A leader's store holding snapshot 50 (term 3), and the follower's empty store."""
    leader = SnapshotStore.open(tmp_path / "leader")
    meta = write_snapshot(leader, 50, 3)
    return leader, meta, SnapshotStore.open(tmp_path / "follower")


def send(leader: SnapshotStore, meta: SnapshotMeta, incoming: IncomingSnapshot, upto: int,
         chunk: int = 65_536) -> None:
    while incoming.received < upto:
        size = min(chunk, upto - incoming.received)
        incoming.write_at(incoming.received, leader.read_range(meta, incoming.received, size))


def test_incoming_whole_file_in_chunks(source):
    leader, meta, follower = source
    incoming = follower.incoming(meta.index, meta.term, meta.size_bytes, file_digest(meta))
    assert incoming.received == 0 and not incoming.complete
    send(leader, meta, incoming, meta.size_bytes)
    assert incoming.complete
    received = incoming.finish()
    assert received == SnapshotMeta(50, 3, os.path.join(follower.directory, snapshot_file_name(50, 3)),
                                    meta.size_bytes)
    assert read_file(received.path) == read_file(meta.path)
    assert follower.list() == [received]
    follower.verify(received)
    assert sorted(os.listdir(follower.directory)) == [snapshot_file_name(50, 3)]  # no .part left


def test_incoming_resumes_from_the_part_on_disk(source):
    leader, meta, follower = source
    digest = file_digest(meta)
    half = meta.size_bytes // 2
    first = follower.incoming(meta.index, meta.term, meta.size_bytes, digest)
    send(leader, meta, first, half, chunk=10_000)
    assert first.received == half
    first.close()

    resumed = follower.incoming(meta.index, meta.term, meta.size_bytes, digest)
    assert resumed.received == half
    assert os.path.getsize(resumed.path) == half
    send(leader, meta, resumed, meta.size_bytes)
    received = resumed.finish()
    assert read_file(received.path) == read_file(meta.path)


def test_a_chunk_at_the_wrong_offset_raises_offset_mismatch(source):
    leader, meta, follower = source
    incoming = follower.incoming(meta.index, meta.term, meta.size_bytes, file_digest(meta))
    send(leader, meta, incoming, 1000)
    for offset in (0, 999, 1001):
        with pytest.raises(OffsetMismatch) as caught:
            incoming.write_at(offset, leader.read_range(meta, offset, 10))
        assert caught.value.received == 1000
        assert isinstance(caught.value, StorageError)
    assert incoming.received == 1000
    with pytest.raises(ValueError, match="runs past"):
        incoming.write_at(1000, b"x" * (meta.size_bytes - 999))
    assert incoming.received == 1000 and os.path.getsize(incoming.path) == 1000
    incoming.close()


def test_a_new_incoming_for_another_snapshot_deletes_the_old_part(source):
    leader, meta, follower = source
    old = follower.incoming(meta.index, meta.term, meta.size_bytes, file_digest(meta))
    send(leader, meta, old, 5000)
    old.close()
    assert os.path.exists(old.path)

    newer = write_snapshot(leader, 60, 3)
    incoming = follower.incoming(newer.index, newer.term, newer.size_bytes, file_digest(newer))
    assert not os.path.exists(old.path)
    assert incoming.received == 0
    assert [n for n in os.listdir(follower.directory) if n.endswith(".part")] == [os.path.basename(incoming.path)]
    incoming.close()


def test_finish_with_bytes_that_do_not_match_the_digest_deletes_the_part(source):
    leader, meta, follower = source
    incoming = follower.incoming(meta.index, meta.term, meta.size_bytes, file_digest(meta))
    send(leader, meta, incoming, 1000)
    incoming.write_at(1000, b"\x00")  # one wrong byte in transit
    send(leader, meta, incoming, meta.size_bytes)
    with pytest.raises(SnapshotCorruptionError, match="checksum mismatch") as caught:
        incoming.finish()
    assert caught.value.path == incoming.path
    assert os.listdir(follower.directory) == []
    assert follower.list() == []


def test_finish_refuses_a_file_that_matches_its_digest_but_is_not_a_valid_snapshot(source):
    leader, meta, follower = source
    flip(meta.path, 777)  # damaged on the leader's disk: its digest describes the damaged bytes
    incoming = follower.incoming(meta.index, meta.term, meta.size_bytes, file_digest(meta))
    send(leader, meta, incoming, meta.size_bytes)
    with pytest.raises(SnapshotCorruptionError, match="checksum mismatch: the body"):
        incoming.finish()
    assert os.listdir(follower.directory) == []


def test_incoming_refuses_impossible_announcements(source):
    _, meta, follower = source
    with pytest.raises(ValueError):
        follower.incoming(50, 3, TRAILER_BYTES - 1, "0" * 64)
    with pytest.raises(ValueError):
        follower.incoming(50, 3, meta.size_bytes, "not a digest")
    assert os.listdir(follower.directory) == []
