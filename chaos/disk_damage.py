"""Damage to a stopped node's files at rest, for the disk nemesis: what a bad disk leaves behind.

Each kind acts on one file of a node's data directory (layout: `wal/wal-<index>.log` segments,
`wal/hardstate`, `snapshots/*.snap`) and says which file and what it did:

    wal-tail     cut the last bytes off the newest WAL segment (a torn write): the node must cut
                 the torn record and start; the leader sends the entry again
    wal-middle   flip one bit in the middle of a WAL segment, with records after it: durable data
                 is damaged, so the node must refuse to start naming the file and offset
    snapshot     flip one bit in the newest snapshot: the node must fall back on the older one
                 and the log, or refuse to start naming the file(s)
    hard-state   flip one bit in the hard state (term, vote): the node must refuse naming the file

A kind whose file does not exist yet (no snapshot early in a run) falls back to `wal-tail`.
"""

from __future__ import annotations

import os
import random

KINDS = ("wal-tail", "wal-middle", "snapshot", "hard-state")
#: the kinds after which a node must not start: it would serve from damaged durable data
MUST_REFUSE = ("wal-middle", "hard-state")
#: bytes cut off the WAL's tail: less than one small record, so it is a torn write, not a lost one
TAIL_CUT_BYTES = 7


def _segments(data_dir: str) -> list[str]:
    wal_dir = os.path.join(data_dir, "wal")
    if not os.path.isdir(wal_dir):
        return []
    return sorted(os.path.join(wal_dir, n) for n in os.listdir(wal_dir) if n.startswith("wal-") and n.endswith(".log"))


def _records_end(path: str) -> int:
    """Where a segment's records end: the newest segment is preallocated, zeros after its records
    (cluster/storage/wal.py), and damage there would hit nothing. A record's own trailing zero
    bytes count as zeros too, which only moves the end a few bytes into the last record."""
    with open(path, "rb") as f:
        return len(f.read().rstrip(b"\0"))


def _snapshots(data_dir: str) -> list[str]:
    directory = os.path.join(data_dir, "snapshots")
    if not os.path.isdir(directory):
        return []
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".snap"))


def _flip_bit(path: str, offset: int, rng: random.Random) -> str:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << rng.randrange(8))]))
        f.flush()
        os.fsync(f.fileno())
    return f"flipped a bit at byte {offset}"


def damage(data_dir: str, kind: str, rng: random.Random) -> dict:
    """Damages one file of a stopped node; returns {"kind", "file", "what"} (kind may fall back)."""
    segments = [p for p in _segments(data_dir) if _records_end(p) > 0]
    if kind == "snapshot":
        snapshots = _snapshots(data_dir)
        if snapshots:
            path = snapshots[-1]
            return {"kind": kind, "file": path, "what": _flip_bit(path, os.path.getsize(path) // 2, rng)}
        kind = "wal-tail"
    if kind == "hard-state":
        path = os.path.join(data_dir, "wal", "hardstate")
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return {"kind": kind, "file": path, "what": _flip_bit(path, os.path.getsize(path) // 2, rng)}
        kind = "wal-tail"
    if kind == "wal-middle":
        # A segment big enough that records follow its middle (the last record's damage would
        # look like a torn write, which a single checksum cannot tell apart).
        big = [p for p in segments if _records_end(p) >= 4096]
        if big:
            path = big[len(big) // 2]
            return {"kind": kind, "file": path, "what": _flip_bit(path, _records_end(path) // 2, rng)}
        kind = "wal-tail"
    if not segments:
        return {"kind": "none", "file": None, "what": "no WAL segment to damage yet"}
    path = segments[-1]
    size = _records_end(path)
    cut = min(TAIL_CUT_BYTES, size)
    with open(path, "r+b") as f:
        f.truncate(size - cut)
        os.fsync(f.fileno())
    return {"kind": "wal-tail", "file": path,
            "what": f"cut {cut} bytes off the last record ({size} -> {size - cut}, the zeros after it too)"}
