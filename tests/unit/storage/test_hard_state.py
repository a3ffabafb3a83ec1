"""The hard state file: atomic replacement, a checksum, and an error naming the file when damaged."""

from __future__ import annotations

import os
import struct
import zlib

import msgpack
import pytest

from raftq.cluster.raft.messages import HardState
from raftq.cluster.storage import HardStateCorruptionError, WalCorruptionError, WriteAheadLog
from raftq.cluster.storage.hard_state import (
    HARD_STATE_FILE_NAME, decode_hard_state, encode_hard_state, load_hard_state, save_hard_state,
)


@pytest.mark.parametrize("hard_state", [HardState(), HardState(1, "n1"), HardState(2**40, None)])
def test_round_trip(tmp_path, hard_state):
    save_hard_state(str(tmp_path), hard_state)
    assert load_hard_state(str(tmp_path)) == hard_state
    assert decode_hard_state(encode_hard_state(hard_state)) == hard_state


def test_missing_file_is_the_initial_state(tmp_path):
    assert load_hard_state(str(tmp_path)) == HardState()


def test_replacement_leaves_no_temporary_file_and_a_stale_one_is_ignored(tmp_path):
    save_hard_state(str(tmp_path), HardState(1, "n1"))
    save_hard_state(str(tmp_path), HardState(2, "n3"))
    assert os.listdir(tmp_path) == [HARD_STATE_FILE_NAME]
    # A crash between writing the temporary file and the rename: the old file still rules.
    (tmp_path / (HARD_STATE_FILE_NAME + ".tmp")).write_bytes(encode_hard_state(HardState(9, "n9"))[:-2])
    assert load_hard_state(str(tmp_path)) == HardState(2, "n3")
    assert os.listdir(tmp_path) == [HARD_STATE_FILE_NAME]


def damaged(data: bytes, kind: str) -> bytes:
    if kind == "flipped byte":
        return data[:-1] + bytes([data[-1] ^ 0x01])
    if kind == "cut":
        return data[:-1]
    if kind == "extra byte":
        return data + b"\x00"
    return b""  # empty


@pytest.mark.parametrize("kind", ["flipped byte", "cut", "extra byte", "empty"])
def test_a_damaged_file_names_itself(tmp_path, kind):
    path = tmp_path / HARD_STATE_FILE_NAME
    path.write_bytes(damaged(encode_hard_state(HardState(5, "n2")), kind))
    with pytest.raises(HardStateCorruptionError) as info:
        WriteAheadLog.open(tmp_path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert isinstance(info.value, WalCorruptionError)  # one except clause catches all damage


@pytest.mark.parametrize("payload", [{"term": -1, "voted_for": None}, {"term": 1, "voted_for": 3},
                                     {"term": 1}, [1, 2, 3], "x"])
def test_well_framed_but_invalid_payloads_are_refused(payload):
    packed = msgpack.packb(payload)
    assert isinstance(decode_hard_state(struct.pack("<II", len(packed), zlib.crc32(packed)) + packed), str)


def test_the_first_list_format_is_still_readable():
    packed = msgpack.packb([4, "n1"])
    assert decode_hard_state(struct.pack("<II", len(packed), zlib.crc32(packed)) + packed) == HardState(4, "n1")
