"""The node's configuration: one frozen dataclass, loaded in `main()`, validated once."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field

from raftq.cluster import constants
from raftq.cluster.errors import ConfigError

#: How a node writes its snapshots (NodeConfig.snapshot_writer).
SNAPSHOT_WRITERS: tuple[str, ...] = ("fork", "thread")

NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Listen addresses that mean "every interface": they name no address a client could use.
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


@dataclass(frozen=True)
class NodeConfig:
    """Everything one broker process needs to know. Times are seconds unless the name says `_ms`."""

    #: This node's id; one of the cluster's voters ("n1").
    node_id: str
    #: Directory for the WAL, hard state and snapshots. Created if missing.
    data_dir: str
    #: Address to listen on. SPEC.md Security: loopback unless told otherwise.
    host: str = "127.0.0.1"
    port: int = 7001
    #: The base URL clients and peers use to reach this node; derived from host and port when empty.
    advertise_url: str = ""
    #: The other voters: node id -> base URL. Empty = a cluster of one.
    peers: dict[str, str] = field(default_factory=dict)
    #: A node joining a running cluster: the URL of one of its nodes. The node starts as nobody's
    #: member (it never campaigns) and learns the membership from the leader once added
    #: (`POST /v1/cluster/members`). Only checked at the first start: afterwards the data
    #: directory holds the membership.
    join_url: str = ""
    #: URLs clients should be sent to for each peer (redirects, status), when they differ from the
    #: peer links above (e.g. peer traffic through a proxy). Missing ids fall back to `peers`.
    public_urls: dict[str, str] = field(default_factory=dict)
    #: TLS for the listener (clients and peers): PEM certificate chain and key; both or neither.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: PEM CA file that peers' certificates are checked against (system CAs when None).
    tls_ca: str | None = None
    #: Require peers to present a client certificate signed by tls_ca on /raft (mutual TLS).
    tls_peer_certs: bool = False
    #: Host names that also name this node in a request's Host header, besides loopback names and
    #: the hosts of its own and its peers' URLs (DNS rebinding protection; see cluster.api.app).
    allowed_hosts: tuple[str, ...] = ()
    #: Bearer token clients must present on /v1 (None = no auth).
    client_token: str | None = None
    #: Secret peers must present on /raft. A node with peers needs one (from a file or the
    #: environment) unless `insecure_no_cluster_secret` says, loudly, that anyone may speak Raft to it.
    cluster_secret: str | None = None
    insecure_no_cluster_secret: bool = False
    #: Serve a non-loopback address with neither a client token nor TLS (Redis's protected mode
    #: refuses that by default, and so does raftq unless this says otherwise).
    insecure_open_to_network: bool = False

    payload_bytes_max: int = constants.PAYLOAD_BYTES_MAX
    body_bytes_max: int = constants.BODY_BYTES_MAX
    retention_ms: int = constants.RETENTION_MS
    idempotency_window_ms: int = constants.IDEMPOTENCY_WINDOW_MS
    worker_timeout_ms: int = constants.WORKER_TIMEOUT_MS

    tick_interval_s: float = constants.TICK_INTERVAL_S
    election_ticks: int = constants.ELECTION_TICKS
    heartbeat_ticks: int = constants.HEARTBEAT_TICKS
    proposal_timeout_s: float = constants.PROPOSAL_TIMEOUT_S
    pending_proposals_max: int = constants.PENDING_PROPOSALS_MAX

    snapshot_every_entries: int = constants.SNAPSHOT_EVERY_ENTRIES
    snapshot_every_bytes: int = constants.SNAPSHOT_EVERY_BYTES
    snapshot_interval_s: float = constants.SNAPSHOT_INTERVAL_S
    #: "fork": a forked child writes each snapshot (the loop pauses only for the fork); "thread":
    #: the state is captured on the loop and written by a worker thread. Where fork is not
    #: available (not Linux), "fork" writes the way "thread" does.
    snapshot_writer: str = "fork"
    compact_keep_entries: int = constants.COMPACT_KEEP_ENTRIES
    compact_keep_bytes: int = constants.COMPACT_KEEP_BYTES
    wal_segment_bytes: int = constants.WAL_SEGMENT_BYTES
    connections_max: int = constants.CONNECTIONS_MAX
    header_timeout_s: float = constants.HEADER_TIMEOUT_S
    known_workers_max: int = constants.KNOWN_WORKERS_MAX
    queues_max: int = constants.QUEUES_MAX
    #: Largest snapshot file this node accepts from a leader.
    snapshot_file_bytes_max: int = constants.SNAPSHOT_FILE_BYTES_MAX

    #: "text" (default) or "json" (one JSON object per line).
    log_format: str = "text"
    log_level: str = "INFO"

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return self.advertise_url or f"{scheme}://{self.host}:{self.port}"

    @property
    def loopback_only(self) -> bool:
        """Whether the listen address can only be reached from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name, or a wildcard like "" : assume the network reaches it

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def security_gaps(self) -> list[str]:
        """What this node leaves unauthenticated or unencrypted, in words for its start-up WARNING."""
        where = f"{self.host}:{self.port}"
        gaps = []
        if self.client_token is None:
            gaps.append(f"client API without a token (anyone who reaches {where} may submit, lease, "
                        "purge and read jobs; set --token-file or RAFTQ_TOKEN)")
        if self.peers and self.cluster_secret is None:
            gaps.append("peer links without a cluster secret (--insecure-no-cluster-secret: anyone may speak Raft)")
        if not self.tls:
            gaps.append("client API and peer links unencrypted (no TLS: --tls-cert, --tls-key)")
        elif any(url.startswith("http://") for url in self.peers.values()):
            gaps.append("peer links to http:// URLs unencrypted")
        return gaps

    def replace(self, **changes) -> "NodeConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raises ConfigError naming the first bad field."""
        if not NODE_ID_PATTERN.fullmatch(self.node_id):
            raise ConfigError(f"node id {self.node_id!r} must match {NODE_ID_PATTERN.pattern}")
        if self.node_id in self.peers:
            raise ConfigError(f"node {self.node_id} lists itself among its peers")
        for peer_id, url in self.peers.items():
            if not NODE_ID_PATTERN.fullmatch(peer_id):
                raise ConfigError(f"peer id {peer_id!r} must match {NODE_ID_PATTERN.pattern}")
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"peer {peer_id} url {url!r} must start with http:// or https://")
        if len(self.peers) + 1 not in (1, 3, 5):
            raise ConfigError(f"a cluster has 1, 3 or 5 voters, got {len(self.peers) + 1}")
        if self.cluster_secret is not None and len(self.cluster_secret) < constants.CLUSTER_SECRET_CHARS_MIN:
            raise ConfigError(f"the cluster secret must be at least {constants.CLUSTER_SECRET_CHARS_MIN} characters")
        if self.join_url and self.peers:
            raise ConfigError("--join and --peers exclude each other: a joining node learns its peers from the cluster")
        if self.join_url and not self.join_url.startswith(("http://", "https://")):
            raise ConfigError(f"--join url {self.join_url!r} must start with http:// or https://")
        if (self.peers or self.join_url) and self.cluster_secret is None and not self.insecure_no_cluster_secret:
            raise ConfigError(
                "a node with peers needs a cluster secret (--cluster-secret-file PATH or RAFTQ_CLUSTER_SECRET), "
                "the same on every node; without one anyone who reaches this port can speak Raft to it. "
                "`deploy/run-3-nodes.sh` makes one. To run without, say --insecure-no-cluster-secret")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_peer_certs and not (self.tls and self.tls_ca):
            raise ConfigError("--tls-peer-certs needs --tls-cert, --tls-key and --tls-ca")
        if not self.loopback_only and self.client_token is None and not self.tls \
                and not self.insecure_open_to_network:
            raise ConfigError(
                f"refusing to serve {self.host!r}, which is not a loopback address, with neither a client token "
                "nor TLS: anyone on the network could submit, lease and purge jobs. Set a token "
                "(--token-file or RAFTQ_TOKEN) and TLS, listen on 127.0.0.1, or say --insecure-open-to-network")
        if self.host in _WILDCARD_HOSTS and not self.advertise_url:
            raise ConfigError(
                f"--host {self.host!r} listens on every address but names none: clients and peers would be "
                "sent to it. Say where they reach this node with --advertise-url (e.g. https://n1.example:7001)")
        if self.advertise_url and not self.advertise_url.startswith(("http://", "https://")):
            raise ConfigError(f"--advertise-url {self.advertise_url!r} must start with http:// or https://")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} out of range")
        if self.election_ticks <= self.heartbeat_ticks:
            raise ConfigError("election_ticks must be greater than heartbeat_ticks")
        if self.tick_interval_s <= 0:
            raise ConfigError("tick_interval_s must be positive")
        if not 1 <= self.payload_bytes_max <= self.body_bytes_max:
            raise ConfigError("payload_bytes_max must be between 1 and body_bytes_max")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log format must be text or json, got {self.log_format!r}")
        if self.snapshot_every_entries < 1 or self.snapshot_every_bytes < 1 or self.snapshot_interval_s <= 0:
            raise ConfigError("snapshot_every_entries, snapshot_every_bytes and snapshot_interval_s must be positive")
        if self.snapshot_writer not in SNAPSHOT_WRITERS:
            raise ConfigError(f"snapshot_writer must be one of {', '.join(SNAPSHOT_WRITERS)}, "
                              f"not {self.snapshot_writer!r}")
        if self.compact_keep_entries < 0 or self.compact_keep_bytes < 0:
            raise ConfigError("compact_keep_entries and compact_keep_bytes must not be negative")
        if self.wal_segment_bytes < 4096:
            raise ConfigError("wal_segment_bytes must be at least 4096")
        if self.connections_max < 8 or self.header_timeout_s <= 0 or self.known_workers_max < 1 \
                or self.queues_max < 1:
            raise ConfigError("connections_max must be at least 8, header_timeout_s and known_workers_max positive")
        if self.worker_timeout_ms < 1000:
            raise ConfigError("worker_timeout_ms must be at least 1000")
