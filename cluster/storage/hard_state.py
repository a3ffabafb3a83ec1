"""The hard state file: the term and vote a node must remember across restarts (Raft §5.1, Figure 2).

Format: `u32 length | u32 crc32(payload) | payload`, little-endian, payload = msgpack map
`{"term": int, "voted_for": str | None}` (the WAL's record framing, so one checksum rule serves both).

The file is replaced atomically: write `hardstate.tmp`, fsync it, rename it over `hardstate`, fsync
the directory. A crash leaves either the old file or the new one, never a mix, so a file that fails
its checksum was damaged after it was durable: `HardStateCorruptionError` names it. A leftover
`hardstate.tmp` is a save that never reached its rename; it is deleted at load.
"""

from __future__ import annotations

import os
import struct
import zlib

import msgpack

from raftq.cluster.raft.messages import HardState
from raftq.cluster.storage.errors import HardStateCorruptionError

#: Name of the hard state file inside the WAL directory.
HARD_STATE_FILE_NAME = "hardstate"
_TEMPORARY_SUFFIX = ".tmp"
_HEADER = struct.Struct("<II")
#: A term and a node id fit in far less; anything bigger is garbage, not a hard state.
_HARD_STATE_BYTES_MAX = 4096


def load_hard_state(directory: str) -> HardState:
    """Reads the hard state saved in directory.

    Args:
        directory: the WAL directory.

    Returns:
        The last saved HardState, or HardState() (term 0, no vote) when none was ever saved.

    Raises:
        HardStateCorruptionError: the file exists but is damaged (the message names it).
    """
    path = os.path.join(directory, HARD_STATE_FILE_NAME)
    try:
        os.unlink(path + _TEMPORARY_SUFFIX)  # a save that crashed before its rename: never took effect
    except FileNotFoundError:
        pass
    try:
        with open(path, "rb") as f:
            data = f.read(_HARD_STATE_BYTES_MAX + 1)
    except FileNotFoundError:
        return HardState()
    decoded = decode_hard_state(data)
    if isinstance(decoded, str):
        raise HardStateCorruptionError(
            path, f"{decoded} (the file is replaced atomically, so this is damage, not a torn write)")
    return decoded


def save_hard_state(directory: str, hard_state: HardState) -> None:
    """Replaces the hard state file atomically and durably (tmp, fsync, rename, fsync directory).

    Raises:
        OSError: the disk refused; the old file is still in place.
    """
    path = os.path.join(directory, HARD_STATE_FILE_NAME)
    temporary = path + _TEMPORARY_SUFFIX
    data = encode_hard_state(hard_state)
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    fsync_directory(directory)  # makes the rename itself durable


def encode_hard_state(hard_state: HardState) -> bytes:
    payload = msgpack.packb({"term": hard_state.term, "voted_for": hard_state.voted_for}, use_bin_type=True)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode_hard_state(data: bytes) -> HardState | str:
    """The HardState encoded in data, or the reason it is not one."""
    if len(data) < _HEADER.size:
        return f"{len(data)} bytes is shorter than the {_HEADER.size}-byte header"
    length, crc = _HEADER.unpack_from(data, 0)
    payload = data[_HEADER.size:]
    if len(payload) != length:
        return f"header says {length} payload bytes, the file holds {len(payload)}"
    if zlib.crc32(payload) != crc:
        return "crc mismatch"
    try:
        fields = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        return f"undecodable payload ({type(exc).__name__})"
    if isinstance(fields, list) and len(fields) == 2:
        fields = {"term": fields[0], "voted_for": fields[1]}  # the first format, a list: still readable
    if not isinstance(fields, dict) or set(fields) != {"term", "voted_for"}:
        return "payload is not a {term, voted_for} map"
    term, voted_for = fields["term"], fields["voted_for"]
    if type(term) is not int or term < 0 or not (voted_for is None or isinstance(voted_for, str)):
        return f"bad field values (term={term!r}, voted_for={voted_for!r})"
    return HardState(term=term, voted_for=voted_for)


def fsync_directory(directory: str) -> None:
    """Makes the creation, deletion or renaming of entries in directory durable (POSIX needs this)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
