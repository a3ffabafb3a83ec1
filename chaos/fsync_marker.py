"""Test-only node mode for "loss of unsynced writes": the WAL records what it has fsynced.

`python -m raftq.chaos.fsync_marker <node flags>` runs the ordinary node (`cluster.main.main`) with one
hook installed: after every `WriteAheadLog.sync()` (and after a durable conflict truncation, a
reset after an installed snapshot, and after recovery at open) the WAL writes `fsynced.json` beside its segments, mapping each segment
file name to the number of its bytes known to be on disk. The marker is replaced atomically
(write + rename) but never fsynced itself: it only has to survive SIGKILL, which keeps the page
cache, not a power cut.

Before restarting a SIGKILLed node, the nemesis calls `cut_to_marker(wal_dir)`: every segment is
truncated to its marker size and segments the marker does not know are deleted. What is left is
what a power failure at the instant of the kill could have left (lazyfs-style, the NATS 2.12.1
failure): a node that acknowledged anything not yet fsynced would lose it here, and the checker
would see a lost job once a majority has been cut back.

Why a hook and not a node flag: the WAL belongs to another module; this keeps the test mode out
of the product. The hook depends on `WriteAheadLog` internals (`_segments[i].path/.size_bytes`,
`_truncate_from`) and fails loudly at install time if they change. The proper home is a
`fsync_marker=True` option of `WriteAheadLog.open` (SPEC.md's WAL notes foresee it).

Conservative by construction: the marker can only lag the disk (it is written after the fsync
returns), so cutting to it may drop durable bytes too, never keep undurable ones. Everything the
node told a peer or a client about was synced before the message left (`Node._persist` returns
first), so a lag never drops something acknowledged.
"""

from __future__ import annotations

import json
import os
import sys

MARKER_NAME = "fsynced.json"


def _segments_of(wal) -> dict[str, int]:
    return {os.path.basename(segment.path): int(segment.size_bytes) for segment in wal._segments}


def _write_marker(wal, sizes: dict[str, int]) -> None:
    wal._chaos_fsynced = dict(sizes)
    path = os.path.join(wal.directory, MARKER_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(sizes, f)
    os.replace(tmp, path)


def install() -> None:
    """Wraps WriteAheadLog.open / sync / _truncate_from / reset_after in this process (idempotent)."""
    from raftq.cluster.storage.wal import WriteAheadLog, _Segment

    if getattr(WriteAheadLog, "_chaos_marker_installed", False):
        return
    for name in ("sync", "_truncate_from", "open", "reset_after"):
        assert hasattr(WriteAheadLog, name), f"WriteAheadLog.{name} is gone; update chaos/fsync_marker.py"
    assert {"path", "size_bytes"} <= set(_Segment.__slots__), "WAL segments changed; update chaos/fsync_marker.py"

    original_open = WriteAheadLog.open.__func__
    original_sync = WriteAheadLog.sync
    original_truncate = WriteAheadLog._truncate_from
    original_reset_after = WriteAheadLog.reset_after

    def open_(cls, directory, **kwargs):
        wal = original_open(cls, directory, **kwargs)
        _write_marker(wal, _segments_of(wal))  # after recovery, what is on disk is all there is
        return wal

    def sync(self) -> None:
        original_sync(self)
        _write_marker(self, _segments_of(self))

    def truncate_from(self, index: int) -> None:
        original_truncate(self, index)  # the cut is fdatasynced before it returns
        before = getattr(self, "_chaos_fsynced", {})
        _write_marker(self, {name: min(before.get(name, 0), size) for name, size in _segments_of(self).items()})

    def reset_after(self, index: int, term: int) -> None:
        original_reset_after(self, index, term)  # every segment deleted, each deletion durable
        # A later segment may reuse a deleted one's name: the old size must not vouch for it.
        _write_marker(self, {})

    WriteAheadLog.open = classmethod(open_)
    WriteAheadLog.reset_after = reset_after
    WriteAheadLog.sync = sync
    WriteAheadLog._truncate_from = truncate_from
    WriteAheadLog._chaos_marker_installed = True


def cut_to_marker(wal_dir: str) -> dict:
    """Cuts every segment in wal_dir back to its fsynced size; call only while the node is down.

    Returns:
        {"marker": bool, "cut": {file: [size before, size after]}, "deleted": [files], "dropped_bytes": n}
    """
    path = os.path.join(wal_dir, MARKER_NAME)
    report: dict = {"marker": False, "cut": {}, "deleted": [], "dropped_bytes": 0}
    if not os.path.exists(path):
        return report  # never synced anything: nothing was acknowledged, and nothing is cut
    with open(path) as f:
        sizes = json.load(f)
    report["marker"] = True
    for name in sorted(os.listdir(wal_dir)):
        if not (name.startswith("wal-") and name.endswith(".log")):
            continue
        file_path = os.path.join(wal_dir, name)
        size = os.path.getsize(file_path)
        if name not in sizes:
            os.unlink(file_path)
            report["deleted"].append(name)
            report["dropped_bytes"] += size
        elif size > sizes[name]:
            os.truncate(file_path, sizes[name])
            report["cut"][name] = [size, sizes[name]]
            report["dropped_bytes"] += size - sizes[name]
    return report


def main() -> int:
    install()
    from raftq.cluster.main import main as node_main

    return node_main()


if __name__ == "__main__":
    sys.exit(main())
