"""msgpack encoding of Raft peer messages.

A message is a msgpack array whose first element is its type tag (MessageType value):
`[type, from_id, to_id, term, log_term, index, entries, commit, reject, reject_hint, hint_term,
context]`, each entry `[index, term, kind, data]`. A batch (one HTTP request) is
`[BATCH_TAG, [message, ...]]`.

Decoding is strict: the bytes come from the network, so anything that is not exactly this shape
(wrong lengths, wrong types, negative numbers, unknown tags, trailing bytes) raises CodecError and
nothing else. Semantic checks (entries consecutive after `index`) are left to RaftNode.step().
"""

from __future__ import annotations

from typing import Any, Sequence

import msgpack

from raftq.cluster.raft.errors import CodecError
from raftq.cluster.raft.messages import Entry, EntryKind, Message, MessageType

#: First element of an encoded batch; lets a future format change be detected instead of misread.
BATCH_TAG = "raftq.msgs/1"
#: Messages in one decoded batch. Bounds the work one request can cause; the HTTP transport
#: sends at most 256 per request.
BATCH_MESSAGES_MAX = 4096

_MESSAGE_FIELDS_COUNT = 12
_ENTRY_FIELDS_COUNT = 4
_MESSAGE_TYPES = {int(t): t for t in MessageType}
_ENTRY_KINDS = {int(k): k for k in EntryKind}


def encode_message(message: Message) -> bytes:
    """Encode one message.

    Args:
        message: the message to encode.

    Returns:
        The msgpack bytes.
    """
    return msgpack.packb(_message_to_list(message), use_bin_type=True)


def decode_message(data: bytes) -> Message:
    """Decode one message produced by encode_message.

    Args:
        data: the whole encoding (no trailing bytes).

    Returns:
        The message.

    Raises:
        CodecError: the bytes are not exactly one valid message.
    """
    return _message_from_list(_unpack(data))


def encode_messages(messages: Sequence[Message]) -> bytes:
    """Encode a batch of messages (one transport request).

    Args:
        messages: the messages, in sending order.

    Returns:
        The msgpack bytes.
    """
    return msgpack.packb([BATCH_TAG, [_message_to_list(m) for m in messages]], use_bin_type=True)


def decode_messages(data: bytes) -> list[Message]:
    """Decode a batch produced by encode_messages.

    Args:
        data: the whole encoding (no trailing bytes).

    Returns:
        The messages in order.

    Raises:
        CodecError: the bytes are not exactly one valid batch.
    """
    raw = _unpack(data)
    if not isinstance(raw, list) or len(raw) != 2 or raw[0] != BATCH_TAG or not isinstance(raw[1], list):
        raise CodecError("not a raftq message batch")
    if len(raw[1]) > BATCH_MESSAGES_MAX:
        raise CodecError(f"batch of {len(raw[1])} messages exceeds {BATCH_MESSAGES_MAX}")
    return [_message_from_list(item) for item in raw[1]]


def _unpack(data: bytes) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types (ExtraData, ValueError, FormatError, ...)
        raise CodecError(f"undecodable msgpack: {exc.__class__.__name__}: {exc}") from None


def _message_to_list(m: Message) -> list[Any]:
    entries = [[e.index, e.term, int(e.kind), e.data] for e in m.entries]
    return [
        int(m.type), m.from_id, m.to_id, m.term, m.log_term, m.index, entries, m.commit,
        m.reject, m.reject_hint, m.hint_term, m.context,
    ]


def _message_from_list(raw: Any) -> Message:
    if not isinstance(raw, list) or len(raw) != _MESSAGE_FIELDS_COUNT:
        raise CodecError("a message must be an array of 12 fields")
    tag, from_id, to_id, term, log_term, index, entries, commit, reject, hint, hint_term, ctx = raw
    # The common case in one test (msgpack yields exact ints, and bool is not one); anything else
    # goes through the field-by-field checks below, which name what is wrong.
    if type(tag) is int and type(term) is int and type(log_term) is int and type(index) is int \
            and type(commit) is int and type(hint) is int and type(hint_term) is int and type(reject) is bool \
            and (ctx is None or type(ctx) is int) and type(from_id) is str and type(to_id) is str \
            and from_id and to_id and type(entries) is list \
            and min(term, log_term, index, commit, hint, hint_term) >= 0 and tag in _MESSAGE_TYPES:
        return Message(type=_MESSAGE_TYPES[tag], from_id=from_id, to_id=to_id, term=term, log_term=log_term,
                       index=index, entries=tuple(_entry_from_list(e) for e in entries) if entries else (),
                       commit=commit, reject=reject, reject_hint=hint, hint_term=hint_term, context=ctx)
    try:
        message_type = MessageType(_uint(tag, "type"))
    except ValueError:
        raise CodecError(f"unknown message type {tag!r}") from None
    if not isinstance(reject, bool):
        raise CodecError("reject must be a boolean")
    if ctx is not None:
        ctx = _int(ctx, "context")
    if not isinstance(entries, list):
        raise CodecError("entries must be an array")
    return Message(
        type=message_type, from_id=_str(from_id, "from_id"), to_id=_str(to_id, "to_id"),
        term=_uint(term, "term"), log_term=_uint(log_term, "log_term"), index=_uint(index, "index"),
        entries=tuple(_entry_from_list(e) for e in entries), commit=_uint(commit, "commit"),
        reject=reject, reject_hint=_uint(hint, "reject_hint"), hint_term=_uint(hint_term, "hint_term"),
        context=ctx,
    )


def _entry_from_list(raw: Any) -> Entry:
    if not isinstance(raw, list) or len(raw) != _ENTRY_FIELDS_COUNT:
        raise CodecError("an entry must be an array of 4 fields")
    index, term, kind, data = raw
    if type(index) is int and type(term) is int and type(kind) is int and type(data) is bytes \
            and index >= 1 and term >= 0 and kind in _ENTRY_KINDS:
        return Entry(index=index, term=term, kind=_ENTRY_KINDS[kind], data=data)
    try:
        entry_kind = EntryKind(_uint(kind, "kind"))
    except ValueError:
        raise CodecError(f"unknown entry kind {kind!r}") from None
    if not isinstance(data, bytes):
        raise CodecError("entry data must be binary")
    if _uint(index, "entry index") == 0:
        raise CodecError("entry index must be at least 1")
    return Entry(index=index, term=_uint(term, "entry term"), kind=entry_kind, data=data)


def _int(value: Any, name: str) -> int:
    # bool is an int subclass in Python; msgpack true/false must not pass as 1/0.
    if not isinstance(value, int) or isinstance(value, bool):
        raise CodecError(f"{name} must be an integer")
    return value


def _uint(value: Any, name: str) -> int:
    if _int(value, name) < 0:
        raise CodecError(f"{name} must not be negative")
    return value


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise CodecError(f"{name} must be a non-empty string")
    return value
