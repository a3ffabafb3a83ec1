"""`raftq node`: run one broker process.

Every flag has an environment variable (RAFTQ_<FLAG>), so a service manager can configure the
node without a command line. Peers are `id=url` pairs: `--peers n2=http://127.0.0.1:7002,n3=...`.

Secrets (the client token, the cluster secret) come from a file (`--token-file`,
`--cluster-secret-file`) or from the environment (RAFTQ_TOKEN, RAFTQ_CLUSTER_SECRET), never from
a flag's value: any user of the machine can read a command line with `ps`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
import time
from typing import Sequence

from raftq.cluster.lean_aiohttp import import_aiohttp

import_aiohttp()  # before anything imports aiohttp: see lean_aiohttp

from aiohttp import web  # noqa: E402

from raftq.cluster import constants as c
from raftq.cluster.config import SNAPSHOT_WRITERS, NodeConfig
from raftq.cluster.errors import ConfigError
from raftq.cluster.storage.errors import DiskWriteError, storage_failure_line


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"RAFTQ_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--token X` must not be read as `--token-file X`.
    p = argparse.ArgumentParser(prog="raftq node", description="Run one raftq broker node.", allow_abbrev=False)
    p.add_argument("--id", default=_env("NODE_ID", "n1"), help="this node's id (env RAFTQ_NODE_ID; default n1)")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(_env("PORT", "7001")), help="listen port (default 7001)")
    p.add_argument("--advertise-url", default=_env("ADVERTISE_URL", ""),
                   help="URL peers and clients use for this node (default http://HOST:PORT)")
    p.add_argument("--data-dir", default=_env("DATA_DIR"), help="where the log lives (default ./var/<id>)")
    p.add_argument("--peers", default=_env("PEERS", ""),
                   help="other voters as id=url,id=url (empty: a cluster of one)")
    p.add_argument("--join", default=_env("JOIN", ""), metavar="URL",
                   help="start empty and wait to be added to the cluster that URL belongs to "
                        "(raftq cluster add ID URL); the data directory then remembers the membership")
    p.add_argument("--members", default=_env("MEMBERS", ""),
                   help="every voter as id=url,..., this node included: the same list on every node (a "
                        "StatefulSet, one config file), instead of --peers and --advertise-url")
    p.add_argument("--public-urls", default=_env("PUBLIC_URLS", ""),
                   help="id=url,... where clients reach each peer, when peer links go elsewhere (proxies)")
    p.add_argument("--tls-cert", default=_env("TLS_CERT"),
                   help="PEM certificate (chain) of this node: serve clients and peers over TLS only")
    p.add_argument("--tls-key", default=_env("TLS_KEY"), help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", default=_env("TLS_CA"),
                   help="PEM CA file peers' certificates are checked against (default: the system CAs)")
    p.add_argument("--tls-peer-certs", action="store_true", default=_env("TLS_PEER_CERTS", "") not in ("", "0"),
                   help="require a client certificate signed by --tls-ca on /raft (mutual TLS between peers)")
    p.add_argument("--insecure-open-to-network", action="store_true",
                   default=_env("INSECURE_OPEN_TO_NETWORK", "") not in ("", "0"),
                   help="allow a non-loopback --host with neither token nor TLS (anyone on the network may "
                        "use the API)")
    p.add_argument("--allowed-hosts", default=_env("ALLOWED_HOSTS", ""),
                   help="comma-separated host names clients may use for this node besides loopback names "
                        "and the hosts of the node and peer URLs (others get 421)")
    p.add_argument("--token-file", default=_env("TOKEN_FILE"),
                   help="file holding the bearer token clients must present (or env RAFTQ_TOKEN)")
    p.add_argument("--cluster-secret-file", default=_env("CLUSTER_SECRET_FILE"),
                   help="file holding the secret peers present to each other on /raft (or env "
                        "RAFTQ_CLUSTER_SECRET); required when the node has peers")
    p.add_argument("--insecure-no-cluster-secret", action="store_true",
                   default=_env("INSECURE_NO_CLUSTER_SECRET", "") not in ("", "0"),
                   help="run with peers but no cluster secret: anyone who reaches the port can speak Raft")
    p.add_argument("--payload-bytes-max", type=int, default=int(_env("PAYLOAD_BYTES_MAX", str(c.PAYLOAD_BYTES_MAX))))
    p.add_argument("--worker-timeout", type=float, default=float(_env("WORKER_TIMEOUT", str(c.WORKER_TIMEOUT_MS / 1000))),
                   help="seconds without a heartbeat before a worker's jobs are requeued (default 10)")
    p.add_argument("--retention", type=float, default=float(_env("RETENTION", str(c.RETENTION_MS / 1000))),
                   help="seconds finished job records are kept (default 3600)")
    p.add_argument("--idempotency-window", type=float,
                   default=float(_env("IDEMPOTENCY_WINDOW", str(c.IDEMPOTENCY_WINDOW_MS / 1000))),
                   help="seconds a submit's idempotency key maps to its job (default 3600)")
    p.add_argument("--tick", type=float, default=float(_env("TICK", str(c.TICK_INTERVAL_S))),
                   help="Raft tick in seconds (default 0.1; election timeout is 10-20 ticks)")
    p.add_argument("--snapshot-every", type=int, default=int(_env("SNAPSHOT_EVERY", str(c.SNAPSHOT_EVERY_ENTRIES))),
                   help=f"snapshot after this many log entries (default {c.SNAPSHOT_EVERY_ENTRIES})")
    p.add_argument("--snapshot-bytes", type=int, default=int(_env("SNAPSHOT_BYTES", str(c.SNAPSHOT_EVERY_BYTES))),
                   help=f"... or after this many log bytes (default {c.SNAPSHOT_EVERY_BYTES})")
    p.add_argument("--snapshot-interval", type=float,
                   default=float(_env("SNAPSHOT_INTERVAL", str(c.SNAPSHOT_INTERVAL_S))),
                   help=f"... or this many seconds after the last one when anything changed "
                        f"(default {c.SNAPSHOT_INTERVAL_S:g})")
    p.add_argument("--snapshot-writer", choices=SNAPSHOT_WRITERS, default=_env("SNAPSHOT_WRITER", "fork"),
                   help="fork: a child process writes each snapshot, the node pauses only for the fork (Linux; "
                        "needs free memory up to the node's RSS while it runs); thread: the node captures its "
                        "state on its event loop (0.4-2.5 s at a million jobs) and a thread writes it "
                        "(default fork)")
    p.add_argument("--compact-keep", type=int, default=int(_env("COMPACT_KEEP", str(c.COMPACT_KEEP_ENTRIES))),
                   help=f"log entries kept behind a snapshot for slow followers (default {c.COMPACT_KEEP_ENTRIES})")
    p.add_argument("--wal-segment-bytes", type=int, default=int(_env("WAL_SEGMENT_BYTES", str(c.WAL_SEGMENT_BYTES))),
                   help=f"size of one log segment file; compaction frees whole segments (default {c.WAL_SEGMENT_BYTES})")
    p.add_argument("--connections-max", type=int, default=int(_env("CONNECTIONS_MAX", str(c.CONNECTIONS_MAX))),
                   help=f"open connections beyond this are aborted (default {c.CONNECTIONS_MAX})")
    p.add_argument("--header-timeout", type=float, default=float(_env("HEADER_TIMEOUT", str(c.HEADER_TIMEOUT_S))),
                   help=f"seconds a connection may take to send a request head (default {c.HEADER_TIMEOUT_S:g})")
    p.add_argument("--known-workers-max", type=int,
                   default=int(_env("KNOWN_WORKERS_MAX", str(c.KNOWN_WORKERS_MAX))),
                   help=f"workers the leader tracks; the longest silent go first (default {c.KNOWN_WORKERS_MAX})")
    p.add_argument("--queues-max", type=int, default=int(_env("QUEUES_MAX", str(c.QUEUES_MAX))),
                   help=f"queues the cluster may hold; writes to new ones past it get 409 (default {c.QUEUES_MAX})")
    p.add_argument("--restore", metavar="FILE", default=None,
                   help="start a new cluster of one from a backup (`raftq admin backup FILE`) in an empty "
                        "--data-dir; add the other nodes afterwards")
    p.add_argument("--log-format", choices=("text", "json"), default=_env("LOG_FORMAT", "text"))
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    return p


def parse_peers(text: str) -> dict[str, str]:
    peers: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        node_id, sep, url = item.partition("=")
        if not sep or not node_id or not url:
            raise ConfigError(f"peer {item!r} must look like id=http://host:port")
        peers[node_id] = url.rstrip("/")
    return peers


def read_secret(path: str | None, env_name: str, what: str) -> str | None:
    """A secret from its file (surrounding whitespace dropped), else from RAFTQ_<env_name>, else None.

    Raises:
        ConfigError: the file cannot be read or holds nothing.
    """
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the {what} from {path!r}: {exc}") from None
        if not value:
            raise ConfigError(f"the {what} file {path!r} is empty")
        if _readable_by_others(os.stat(path)):
            logging.getLogger("raftq.node").warning("the %s file %r is readable by other users (chmod 600)",
                                                    what, path)
        return value
    return _env(env_name) or None


def peers_and_url(args: argparse.Namespace) -> tuple[dict[str, str], str]:
    """(peers, advertised URL) from --peers and --advertise-url, or from --members.

    Raises:
        ConfigError: both --members and --peers, or --members without this node.
    """
    if not args.members:
        return parse_peers(args.peers), args.advertise_url
    if args.peers:
        raise ConfigError("give --members (every voter, this node included) or --peers (the others), not both")
    members = parse_peers(args.members)
    if args.id not in members:
        raise ConfigError(f"--members does not list this node ({args.id}): {', '.join(sorted(members))}")
    return {k: v for k, v in members.items() if k != args.id}, args.advertise_url or members[args.id]


def _readable_by_others(st: os.stat_result) -> bool:
    """Whether users other than this process's may read the file: any "other" bit, or group bits
    for a group that is not the process's own (a secret mounted 0440 with the service's own group,
    as Kubernetes mounts one for fsGroup, or root:raftq 0640 on a box, stays private)."""
    return bool(st.st_mode & 0o007 or (st.st_mode & 0o070 and st.st_gid != os.getegid()))


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    peers, advertise_url = peers_and_url(args)
    config = NodeConfig(
        node_id=args.id,
        data_dir=args.data_dir or os.path.join("var", args.id),
        host=args.host,
        port=args.port,
        advertise_url=advertise_url,
        peers=peers,
        join_url=args.join.rstrip("/"),
        public_urls=parse_peers(args.public_urls),
        allowed_hosts=tuple(filter(None, (name.strip() for name in args.allowed_hosts.split(",")))),
        client_token=read_secret(args.token_file, "TOKEN", "client token"),
        cluster_secret=read_secret(args.cluster_secret_file, "CLUSTER_SECRET", "cluster secret"),
        insecure_no_cluster_secret=args.insecure_no_cluster_secret,
        insecure_open_to_network=args.insecure_open_to_network,
        tls_cert=args.tls_cert or None,
        tls_key=args.tls_key or None,
        tls_ca=args.tls_ca or None,
        tls_peer_certs=args.tls_peer_certs,
        payload_bytes_max=args.payload_bytes_max,
        worker_timeout_ms=int(args.worker_timeout * 1000),
        retention_ms=int(args.retention * 1000),
        idempotency_window_ms=int(args.idempotency_window * 1000),
        tick_interval_s=args.tick,
        snapshot_every_entries=args.snapshot_every,
        snapshot_every_bytes=args.snapshot_bytes,
        snapshot_interval_s=args.snapshot_interval,
        snapshot_writer=args.snapshot_writer,
        compact_keep_entries=args.compact_keep,
        wal_segment_bytes=args.wal_segment_bytes,
        connections_max=args.connections_max,
        header_timeout_s=args.header_timeout,
        known_workers_max=args.known_workers_max,
        queues_max=args.queues_max,
        log_format=args.log_format,
        log_level=args.log_level.upper(),
    )
    config.validate()
    return config


class _NodeFields(logging.Filter):
    """Adds node id, term and role to every record (SPEC: one line per event with them)."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id
        self.node = None

    def filter(self, record: logging.LogRecord) -> bool:
        record.node_id = self.node_id
        raft = getattr(self.node, "raft", None)
        record.term = raft.term if raft is not None else 0
        record.role = raft.role.name.lower() if raft is not None else "starting"
        return True


#: Characters that could end or fake a log line, or hide in one: C0 controls (newline, carriage
#: return, NUL, escape ...), DEL, C1 NEL and the Unicode line and paragraph separators.
_LOG_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F, 0x85]}
_LOG_ESCAPES |= {0x2028: "\\u2028", 0x2029: "\\u2029", ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"}


class _TextFormatter(logging.Formatter):
    """One record is one line: control characters in the message are escaped, whatever the caller
    put in it (request paths, names and error texts come from clients). Call sites quote untrusted
    text with %r as well; this is the guarantee behind them."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_LOG_ESCAPES)
        return super().formatMessage(record)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line; json.dumps escapes every control character in the message."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "node": getattr(record, "node_id", None),
            "term": getattr(record, "term", None),
            "role": getattr(record, "role", None),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def setup_logging(config: NodeConfig) -> _NodeFields:
    fields = _NodeFields(config.node_id)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(fields)
    if config.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter(
            "%(asctime)s %(levelname)s node=%(node_id)s term=%(term)s role=%(role)s %(name)s: %(message)s"
        ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return fields


async def serve(config: NodeConfig, fields: _NodeFields | None = None) -> int:
    """Runs the node until SIGTERM/SIGINT (returns 0) or until it stops on a storage failure (1)."""
    from raftq.cluster import backup, tls
    from raftq.cluster.api.app import init_app
    from raftq.cluster.api.keys import CONNECTION_GUARD, NODE
    from raftq.cluster.snapshotting import return_free_memory_to_os

    backup.remove_leftovers(config.data_dir)
    app = init_app(config)
    node = app[NODE]
    if fields is not None:
        fields.node = node
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=c.KEEPALIVE_TIMEOUT_S,
                           shutdown_timeout=c.SHUTDOWN_GRACE_S)
    await runner.setup()
    assert runner.server is not None
    # Our own listener rather than web.TCPSite: every connection goes through the guard's limit
    # and header deadline (cluster/api/connections.py), the TLS handshake through the same deadline.
    ssl_context = tls.server_context(config)
    listener = await asyncio.get_running_loop().create_server(
        app[CONNECTION_GUARD].protocol_factory(runner.server), config.host, config.port, reuse_address=True,
        ssl=ssl_context, ssl_handshake_timeout=config.header_timeout_s if ssl_context else None)
    # Recovered state is long-lived: freeze it out of the collector's generations, and collect
    # young objects less often, since the job records make full passes costly (about 2x per job).
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    # Importing and recovering freed much (each module's .pyc bytes, the recovery's buffers)
    # that glibc keeps in its heap: about 2 MiB of an idle node's 45 go back to the OS here.
    return_free_memory_to_os()
    logging.getLogger("raftq.node").info("listening on %s", config.url)
    gaps = config.security_gaps()
    if gaps:  # one line, so that it is seen and can be grepped for
        logging.getLogger("raftq.node").warning("security: %s", "; ".join(gaps))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    assert node.failure is not None, "the node starts with the app"
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([stopped, node.failure], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    failed = node.failure.done()
    logging.getLogger("raftq.node").info("shutting down%s", " after the storage failure above" if failed else
                                         ": no new connections; requests in flight finish, long polls answer now")
    # Graceful stop (SIGTERM): long polls answer at once; a leader hands leadership on (etcd's
    # Stop does too), so that stopping it costs no election timeout; the node keeps replicating
    # while the requests in flight finish (up to SHUTDOWN_GRACE_S: a submit's commit, a lease's
    # grant), idle keep-alive connections close; the node itself stops last, in the app's cleanup.
    node.drain()
    if not failed:
        await hand_leadership_on(node)
    listener.close()
    await runner.cleanup()
    logging.getLogger("raftq.node").info("stopped")
    return 1 if failed else 0


async def hand_leadership_on(node) -> None:
    """At a graceful stop, a leader with other voters transfers leadership (to the most caught-up
    voter) and waits until another node leads, for two election timeouts at most; whatever the
    outcome, the stop goes on."""
    log = logging.getLogger("raftq.node")
    voters = [member for member in node.status()["nodes"] if member.get("voter", True)]
    if not node.is_leader or len(voters) < 2:
        return
    config = node.config
    try:
        async with asyncio.timeout(2 * config.election_ticks * config.tick_interval_s):
            target = await node.transfer_leadership(None)
            while node.leader_id in (None, config.node_id):
                await asyncio.sleep(config.tick_interval_s / 2)
        log.info("handed leadership to %s before stopping", node.leader_id or target)
    except Exception as exc:  # refused, timed out, lost: the others elect a leader after the stop
        log.warning("could not hand leadership on before stopping (%s); the others will elect one",
                    exc or type(exc).__name__)


def restore(backup_path: str, config: NodeConfig) -> None:
    """`--restore FILE`: the data directory starts from the backup (cluster/backup.py).

    Raises:
        ConfigError: the node has peers, its data directory holds state, or the file is damaged.
    """
    from raftq.cluster.backup import restore_data_dir

    if config.peers or config.join_url:
        raise ConfigError("--restore starts a new cluster of one: leave out --peers and --join, and add the "
                          "other nodes (started empty with --join) once it runs")
    meta = restore_data_dir(backup_path, config.data_dir, node_id=config.node_id, url=config.url,
                            wal_segment_bytes=config.wal_segment_bytes)
    print(f"raftq node: restored {backup_path} (index {meta.index}, term {meta.term}, {meta.size_bytes} bytes) "
          f"into {config.data_dir}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        from raftq.cluster import tls

        tls.server_context(config), tls.peer_client_context(config)  # unreadable files stop us here
        if args.restore:
            restore(args.restore, config)
    except ConfigError as exc:
        print(f"raftq node: {exc}", file=sys.stderr)
        return 2
    fields = setup_logging(config)
    run = asyncio.run
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        pass
    try:
        return run(serve(config, fields))
    except DiskWriteError as exc:  # at start: the disk is still full, read-only or failing
        logging.getLogger("raftq.node").error("%s", storage_failure_line(exc))
        return 1
    except OSError as exc:
        logging.getLogger("raftq.node").error("cannot serve: %s", exc)
        return 1
    except Exception as exc:  # recovery errors (a damaged WAL) stop the node with their own message
        logging.getLogger("raftq.node").error("node stopped: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
