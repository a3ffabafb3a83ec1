"""`raftq admin`: operator commands that need both the client and the broker's file formats.

    raftq [--nodes URL,...] [--token T] [--ca FILE] admin backup FILE

`backup` asks the cluster who leads, streams `GET /v1/admin/backup` from the leader into
FILE.part, checks it whole (the snapshot trailer's length and sha256, cluster/backup.py) and only
then renames it to FILE; it prints the backup's index and term. A new cluster starts from the file
with `raftq node --restore FILE --id n1 --data-dir DIR`. The token and CA come from the flags or
RAFTQ_TOKEN / RAFTQ_CA, the nodes from --nodes or RAFTQ_NODES, as for the client commands.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from typing import Sequence

from raftq.client import Client
from raftq.client.cli import DEFAULT_NODES
from raftq.client.errors import RaftqError
from raftq.cluster.backup import BACKUP_PATH, INDEX_HEADER, verify_backup
from raftq.cluster.storage.errors import SnapshotCorruptionError

#: Seconds `backup` keeps trying to find a leader that answers (an election may be under way).
LEADER_WAIT_S = 30.0
_CHUNK_BYTES = 1 << 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raftq admin", description="Operator commands.", allow_abbrev=False)
    parser.add_argument("--nodes", default=os.environ.get("RAFTQ_NODES") or DEFAULT_NODES,
                        help=f"node URLs, comma-separated (env RAFTQ_NODES; default {DEFAULT_NODES})")
    parser.add_argument("--token", default=os.environ.get("RAFTQ_TOKEN"), help="bearer token (env RAFTQ_TOKEN)")
    parser.add_argument("--ca", default=os.environ.get("RAFTQ_CA"),
                        help="PEM CA file for https:// nodes (env RAFTQ_CA)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds the download may stall before it is abandoned (default 600)")
    commands = parser.add_subparsers(dest="command", required=True)
    backup = commands.add_parser("backup", help="stream a consistent snapshot from the leader into FILE")
    backup.add_argument("file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        index, term, size = backup(args.file, nodes=args.nodes, token=args.token, ca_file=args.ca,
                                   timeout_s=args.timeout)
    except (OSError, RaftqError, SnapshotCorruptionError, RuntimeError) as exc:
        print(f"raftq admin backup: {exc}", file=sys.stderr)
        return 1
    print(f"backup of index {index} (term {term}): {size} bytes in {args.file}")
    return 0


def backup(path: str, *, nodes: str | Sequence[str], token: str | None, ca_file: str | None,
           timeout_s: float = 600.0) -> tuple[int, int, int]:
    """Downloads a backup from the leader into path; returns (index, term, bytes).

    Raises:
        RuntimeError: no leader answered within LEADER_WAIT_S.
        SnapshotCorruptionError: what arrived is not a whole backup (path is not written).
        OSError: the file cannot be written; RaftqError: the cluster cannot be asked.
    """
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + LEADER_WAIT_S
    last = "no answer yet"
    with Client(nodes, token=token, ca_file=ca_file, timeout=5, deadline=LEADER_WAIT_S) as client:
        while time.monotonic() < deadline:
            # The token goes only to the URL the cluster itself names as its leader.
            leader_url = client.cluster().get("leader_url")
            if not leader_url:
                last = "no leader known"
                time.sleep(0.2)
                continue
            request = urllib.request.Request(leader_url.rstrip("/") + BACKUP_PATH, headers=headers)
            try:
                response = opener.open(request, timeout=timeout_s)
            except urllib.error.HTTPError as exc:
                if exc.code in (307, 503):  # leadership moved, or a new leader is still applying
                    last = f"{leader_url} answered {exc.code}"
                    time.sleep(0.2)
                    continue
                raise RuntimeError(f"{leader_url} answered {exc.code}: {exc.read()[:500].decode(errors='replace')}")
            with response:
                _save(response, path + ".part")
                announced = response.headers.get(INDEX_HEADER)
            index, term = verify_backup(path + ".part")
            if announced is not None and int(announced) != index:
                raise SnapshotCorruptionError(path + ".part", f"announced index {announced}, holds {index}")
            size = os.path.getsize(path + ".part")
            os.replace(path + ".part", path)
            return index, term, size
    raise RuntimeError(f"no leader answered within {LEADER_WAIT_S:g} s ({last})")


def _save(response, part_path: str) -> None:
    with open(part_path, "wb") as f:
        while chunk := response.read(_CHUNK_BYTES):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered by asking the cluster again: the token never follows a Location."""

    def redirect_request(self, *args, **kwargs):
        return None
