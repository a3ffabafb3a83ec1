"""`raftq admin`: operator commands that need both the client and the broker's file formats.

    raftq [--nodes URL,...] [--token T] [--ca FILE] admin backup FILE
    raftq [--nodes URL,...] [--token T] [--ca FILE] admin restart-node ID --restart-command CMD
    raftq [--nodes URL,...] [--token T] [--ca FILE] admin rolling-restart --restart-command CMD
    raftq [--nodes URL] [--ca FILE] admin probe [--ready]

`backup` asks the cluster who leads, streams `GET /v1/admin/backup` from the leader into
FILE.part, checks it whole (the snapshot trailer's length and sha256, cluster/backup.py) and only
then renames it to FILE; it prints the backup's index and term. A new cluster starts from the file
with `raftq node --restore FILE --id n1 --data-dir DIR`. The token and CA come from the flags or
RAFTQ_TOKEN / RAFTQ_CA, the nodes from --nodes or RAFTQ_NODES, as for the client commands.

`probe` is a service manager's health check of one node (Kubernetes exec probes): it asks the
first of --nodes for `GET /v1/cluster` and exits 0 when it answers (alive), with --ready only
when it also knows a leader (and, if it leads, serves). The token comes from RAFTQ_TOKEN or the
file RAFTQ_TOKEN_FILE names, the one the node reads, so the probe needs no secret of its own.

`restart-node` restarts one node without losing availability (OPERATIONS anchors §4: Consul,
etcd, RabbitMQ): it refuses unless every other voter answers and follows the same leader (the
restart must not cost the quorum); if the node leads, it asks it to hand leadership on
(`POST /v1/cluster/transfer`; without that endpoint the stop costs one election); it runs the
restart command (`{id}` in it is replaced by the node id; e.g. `systemctl restart raftq@{id}`,
which stops the node with SIGTERM: requests in flight finish, long polls answer at once); then it
waits until the node follows the leader in the leader's term and has applied everything the
leader had committed when the node came back. `rolling-restart` does that for every node,
followers first and the leader last, so the cluster sees at most one leadership change.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
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
    probe = commands.add_parser("probe", help="exit 0 when the first node answers GET /v1/cluster")
    probe.add_argument("--ready", action="store_true", help="... and knows a leader")
    for name, text in (("restart-node", "restart one node: transfer leadership away, restart, wait until caught up"),
                       ("rolling-restart", "restart every node in turn, followers first, the leader last")):
        sub = commands.add_parser(name, help=text)
        if name == "restart-node":
            sub.add_argument("id")
        sub.add_argument("--restart-command", required=True,
                         help="shell command that restarts the node ({id} is replaced), e.g. "
                              "'systemctl restart raftq@{id}'")
        sub.add_argument("--catch-up-timeout", type=float, default=300.0,
                         help="seconds to wait for the restarted node to catch up (default 300)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("restart-node", "rolling-restart"):
        return _restart_command(args)
    if args.command == "probe":
        return probe(args)
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


# ---------------------------------------------------------------------------- restarts


class RestartRefused(RuntimeError):
    """Raised when restarting the node now would cost the cluster its quorum, or it did not come back."""


class ClusterView:
    """Asks the nodes for their `/v1/cluster` answers (the token goes only to the nodes given and
    to those the cluster names)."""

    def __init__(self, nodes: str | Sequence[str], *, token: str | None, ca_file: str | None) -> None:
        self.urls = [u.strip().rstrip("/") for u in (nodes.split(",") if isinstance(nodes, str) else nodes)
                     if u.strip()]
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        context = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self.opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))

    def request(self, url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, dict]:
        headers = dict(self.headers, **({"Content-Type": "application/json"} if method != "GET" else {}))
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with self.opener.open(request, timeout=5) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"{}")
            except ValueError:
                return exc.code, {}

    def status(self, url: str) -> dict | None:
        try:
            code, body = self.request(url + "/v1/cluster")
        except OSError:
            return None
        return body if code == 200 else None

    def members(self) -> dict[str, str]:
        """{node id: url} as the first node that answers lists them."""
        for url in self.urls:
            status = self.status(url)
            if status is not None:
                found = {entry["id"]: entry["url"].rstrip("/") for entry in status.get("nodes", [])}
                self.urls = list(dict.fromkeys([*self.urls, *found.values()]))
                return found
        raise RestartRefused(f"no node answered (tried {', '.join(self.urls)})")

    def leader(self, members: dict[str, str]) -> tuple[str, dict] | None:
        """(leader id, its status) when a serving leader answers."""
        for node_id, url in members.items():
            status = self.status(url)
            if status and status.get("role") == "leader" and status.get("serving"):
                return node_id, status
        return None


def _wait(what: str, check, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise RestartRefused(f"waited {timeout_s:g} s for {what}")
        time.sleep(0.1)


def restart_node(node_id: str, view: ClusterView, restart, *, catch_up_timeout_s: float = 300.0,
                 say=print) -> dict:
    """Restarts one node as the module docstring says; `restart()` stops and starts its process.

    Returns:
        What happened: {"was_leader", "transferred", "term_before", "term_after", "down_s"}.

    Raises:
        RestartRefused: a peer is unhealthy (nothing was done), or the node did not come back.
    """
    members = view.members()
    if node_id not in members:
        raise RestartRefused(f"{node_id} is not a member (members: {', '.join(sorted(members))})")
    found = _wait("a leader", lambda: view.leader(members), 30.0)
    leader, leader_status = found
    for other, url in members.items():
        if other == node_id:
            continue
        status = view.status(url)
        if status is None or status.get("leader") != leader:
            raise RestartRefused(f"not restarting {node_id}: {other} does not follow leader {leader} "
                                 f"({'no answer' if status is None else status.get('role')}); the quorum "
                                 "would rest on one node fewer than it has")
    term_before, transferred = leader_status["term"], False
    if leader == node_id:
        code, body = view.request(members[node_id] + "/v1/cluster/transfer", "POST", b"{}")
        if code == 200:
            transferred = True
            leader, _ = _wait(f"{node_id} to hand leadership on",
                              lambda: (found := view.leader(members)) and found[0] != node_id and found, 10.0)
            say(f"{node_id} handed leadership to {leader}")
        else:
            say(f"{node_id} leads and could not hand leadership on ({code}: {body.get('error', body)}); "
                "the cluster elects a new leader after the stop")
    started = time.monotonic()
    restart()

    def caught_up() -> dict | None:
        current = view.leader(members)
        status = view.status(members[node_id])  # asked after the leader: its applied index is the newer
        if current is None or status is None:
            return None
        leader_id, leader_view = current
        if status.get("leader") != leader_id or status["term"] != leader_view["term"]:
            return None
        return status if status["applied_index"] >= leader_view["commit_index"] else None

    _wait(f"{node_id} to follow the leader and catch up", caught_up, catch_up_timeout_s)
    down_s = time.monotonic() - started
    term_after = view.leader(members)
    report = {"was_leader": leader_status["node"] == node_id, "transferred": transferred,
              "term_before": term_before, "term_after": term_after[1]["term"] if term_after else None,
              "down_s": round(down_s, 2)}
    say(f"{node_id} restarted and caught up in {down_s:.1f} s (term {term_before} -> {report['term_after']})")
    return report


def rolling_restart(view: ClusterView, restart_one, *, catch_up_timeout_s: float = 300.0, say=print) -> list[dict]:
    """Restarts every member in turn, followers first and the leader last; `restart_one(id)`."""
    members = view.members()
    leader, _ = _wait("a leader", lambda: view.leader(members), 30.0)
    order = [node_id for node_id in sorted(members) if node_id != leader] + [leader]
    return [restart_node(node_id, view, lambda node_id=node_id: restart_one(node_id),
                         catch_up_timeout_s=catch_up_timeout_s, say=say) for node_id in order]


def _restart_command(args: argparse.Namespace) -> int:
    view = ClusterView(args.nodes, token=args.token, ca_file=args.ca)

    def run(node_id: str) -> None:
        command = args.restart_command.replace("{id}", node_id)
        print(f"$ {command}", flush=True)
        subprocess.run(command, shell=True, check=True)

    try:
        if args.command == "restart-node":
            restart_node(args.id, view, lambda: run(args.id), catch_up_timeout_s=args.catch_up_timeout)
        else:
            rolling_restart(view, run, catch_up_timeout_s=args.catch_up_timeout)
    except (RestartRefused, subprocess.CalledProcessError) as exc:
        print(f"raftq admin {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- health probe


def probe(args: argparse.Namespace) -> int:
    """`raftq admin probe [--ready]`: see the module docstring. Prints why when it fails."""
    token = args.token
    token_file = os.environ.get("RAFTQ_TOKEN_FILE")
    if not token and token_file:
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
    view = ClusterView(args.nodes.split(",")[:1], token=token, ca_file=args.ca)
    url = view.urls[0]
    try:
        code, status = view.request(url + "/v1/cluster")
    except OSError as exc:
        print(f"{url}: no answer: {exc}", file=sys.stderr)
        return 1
    if code != 200:
        print(f"{url}: {code} {status.get('error', status)}", file=sys.stderr)
        return 1
    if args.ready and (not status.get("leader") or status.get("role") == "leader" and not status.get("serving")):
        print(f"{url}: {status.get('role')} in term {status.get('term')}, no leader serving yet", file=sys.stderr)
        return 1
    return 0
