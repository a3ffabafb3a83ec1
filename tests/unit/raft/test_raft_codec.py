"""cluster/raft/codec.py: round trips, and garbage of every kind raises CodecError only.

Every decoder is fed the encoding whole, then each proper prefix (a byte at a time), then with
trailing bytes (h11 test_io.py).
"""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftq.cluster.raft.codec import BATCH_TAG, decode_message, decode_messages, encode_message, encode_messages
from raftq.cluster.raft.errors import CodecError
from raftq.cluster.raft.messages import Entry, EntryKind, Message, MessageType

E1 = Entry(index=4, term=2, kind=EntryKind.NORMAL, data=b"\x00\xffcmd")
E2 = Entry(index=5, term=3, kind=EntryKind.NOOP, data=b"")

MESSAGES = [
    Message(MessageType.VOTE, "n1", "n2", term=3, log_term=2, index=7),
    Message(MessageType.VOTE_RESP, "n2", "n1", term=3, reject=True),
    Message(MessageType.PRE_VOTE, "n1", "n3", term=4, log_term=2, index=7),
    Message(MessageType.PRE_VOTE_RESP, "n3", "n1", term=4),
    Message(MessageType.APP, "n1", "n2", term=3, log_term=2, index=3, entries=(E1, E2), commit=3),
    Message(MessageType.APP, "n1", "n2", term=3, log_term=3, index=5, commit=5),
    Message(MessageType.APP_RESP, "n2", "n1", term=3, index=5, commit=4),
    Message(MessageType.APP_RESP, "n2", "n1", term=3, index=9, reject=True, reject_hint=4, hint_term=2),
    Message(MessageType.HEARTBEAT, "n1", "n2", term=3, commit=5, context=17),
    Message(MessageType.HEARTBEAT_RESP, "n2", "n1", term=3, context=17),
    Message(MessageType.HEARTBEAT_RESP, "nœud-é", "n1", term=2**62, context=-1),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.type.name)
def test_message_round_trip(message: Message) -> None:
    data = encode_message(message)
    assert decode_message(data) == message
    assert decode_message(bytearray(data)) == message


def test_batch_round_trip() -> None:
    assert decode_messages(encode_messages(MESSAGES)) == MESSAGES
    assert decode_messages(encode_messages([])) == []


@pytest.mark.parametrize("message", MESSAGES[:5], ids=lambda m: m.type.name)
def test_prefixes_and_trailing_bytes_are_rejected(message: Message) -> None:
    data = encode_message(message)
    for end in range(len(data)):
        with pytest.raises(CodecError):
            decode_message(data[:end])
    with pytest.raises(CodecError):
        decode_message(data + b"\x00")
    batch = encode_messages(MESSAGES)
    for end in range(len(batch)):
        with pytest.raises(CodecError):
            decode_messages(batch[:end])
    with pytest.raises(CodecError):
        decode_messages(batch + b"\xc0")


def _fields(m: Message) -> list:
    entries = [[e.index, e.term, int(e.kind), e.data] for e in m.entries]
    return [int(m.type), m.from_id, m.to_id, m.term, m.log_term, m.index, entries, m.commit, m.reject,
            m.reject_hint, m.hint_term, m.context]


def _with(position: int, value: object) -> bytes:
    raw = _fields(MESSAGES[4])
    raw[position] = value
    return msgpack.packb(raw, use_bin_type=True)


def _entry_with(position: int, value: object) -> bytes:
    raw = _fields(MESSAGES[4])
    raw[6][0][position] = value
    return msgpack.packb(raw, use_bin_type=True)


@pytest.mark.parametrize("data", [
    b"", b"\xc1", b"\x00", msgpack.packb({"type": 1}), msgpack.packb([]), msgpack.packb([1] * 12),
    msgpack.packb(_fields(MESSAGES[0])[:11]), msgpack.packb(_fields(MESSAGES[0]) + [0]),
    _with(0, 99), _with(0, -1), _with(0, "VOTE"), _with(1, ""), _with(1, b"n1"), _with(2, None),
    _with(3, -1), _with(3, True), _with(3, 1.5), _with(4, None), _with(6, None), _with(6, [[1, 2]]),
    _with(7, -3), _with(8, 0), _with(8, None), _with(9, "4"), _with(10, -2), _with(11, "ctx"), _with(11, 1.0),
    _entry_with(0, 0), _entry_with(1, -1), _entry_with(2, 9), _entry_with(3, "text"), _entry_with(3, None),
    msgpack.packb(2**64 - 1), b"\xdd\xff\xff\xff\xff",  # an array header claiming 4 billion items
], ids=lambda d: d[:12].hex() or "empty")
def test_malformed_message_raises_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_message(data)


@pytest.mark.parametrize("data", [
    msgpack.packb([]), msgpack.packb(["raftq.msgs/0", []]), msgpack.packb([BATCH_TAG]),
    msgpack.packb([BATCH_TAG, {}]), msgpack.packb([BATCH_TAG, [[1, 2, 3]]]), msgpack.packb(_fields(MESSAGES[0])),
    msgpack.packb([BATCH_TAG, [_fields(MESSAGES[0])] * 5000], use_bin_type=True),
])
def test_malformed_batch_raises_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_messages(data)


def test_non_bytes_input_raises_codec_error() -> None:
    with pytest.raises(CodecError):
        decode_message("not bytes")  # type: ignore[arg-type]


def test_every_single_byte_corruption_decodes_or_raises_codec_error() -> None:
    data = encode_messages(MESSAGES)
    rng = random.Random(7)
    for position in range(len(data)):
        corrupted = bytearray(data)
        corrupted[position] = rng.randrange(256)
        try:
            decoded = decode_messages(bytes(corrupted))
        except CodecError:
            continue
        assert all(isinstance(m, Message) for m in decoded)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_codec_error(data: bytes) -> None:
    for decode in (decode_message, decode_messages):
        try:
            decode(data)
        except CodecError:
            pass
