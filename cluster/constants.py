"""Defaults and hard bounds, one place, each with the reason for its number.

Call sites pass options explicitly; only `cluster.config` and the API edge read this module.
"""

# The limits both sides of the wire share live in raftq.protocol, once; re-exported here so that
# the API edge reads every bound from one module.
from raftq.protocol import (  # noqa: F401
    BATCH_COUNT_MAX,
    BODY_BYTES_MAX,
    DELAY_MS_MAX,
    ERROR_TEXT_BYTES_MAX,
    FETCH_COUNT_MAX,
    FETCH_WAIT_S_MAX,
    HEARTBEAT_JOB_COUNT_MAX,
    IDEMPOTENCY_KEY_BYTES_MAX,
    JOB_ID_PATTERN,
    JOB_WAIT_S_MAX,
    LEASE_MS_DEFAULT,
    LEASE_MS_MAX,
    LEASE_MS_MIN,
    MAX_ATTEMPTS_DEFAULT,
    MAX_ATTEMPTS_MAX,
    MAX_ATTEMPTS_MIN,
    NESTING_DEPTH_MAX,
    PAYLOAD_BYTES_MAX,
    PRIORITY_MAX,
    PRIORITY_MIN,
    QUEUE_NAME_PATTERN,
    QUEUES_PER_FETCH_MAX,
    RESULT_BYTES_MAX,
    WIRE_INT_MAX,
    WIRE_INT_MIN,
    WORKER_ID_PATTERN,
)

#: SPEC backoff: base 1 s, ×2 per attempt, cap 300 s, full jitter.
BACKOFF_BASE_MS = 1_000
BACKOFF_CAP_MS = 300_000

#: Flow-control keys and FIFO group names (tenant ids, order ids): SQS allows 128 characters for a
#: MessageGroupId; bytes here, so that one key cannot inflate the state machine's lane index.
FLOW_KEY_BYTES_MAX = 128
#: A queue's rate limit, leases per second: from one lease every 1000 s (the bucket's unit is a
#: thousandth of a lease per second) up to far more than one leader grants.
RATE_PER_S_MIN = 0.001
RATE_PER_S_MAX = 1_000_000.0
#: Token bucket size and per-key concurrency limit: bounded only to keep the arithmetic small.
BURST_MAX = 1_000_000
MAX_RUNNING_PER_KEY_MAX = 1_000_000
#: Schedules a cluster keeps: each is a few hundred bytes of state and a look every housekeeping
#: beat; a thousand covers every cron table we know of, and bounds what one client can add.
SCHEDULES_MAX = 1000
#: A schedule's payload is kept in the state for as long as the schedule: smaller than a job's.
SCHEDULE_PAYLOAD_BYTES_MAX = 64 << 10

#: SPEC: idempotency window 1 h, finished-job retention 1 h.
IDEMPOTENCY_WINDOW_MS = 3_600_000
RETENTION_MS = 3_600_000

#: SPEC: worker heartbeat interval / timeout 2 s / 10 s.
HEARTBEAT_INTERVAL_S = 2.0
WORKER_TIMEOUT_MS = 10_000

#: Raft timing (REPLICATION.md §5.3; etcd: 100 ms tick, 10-tick election, 1-tick heartbeat).
TICK_INTERVAL_S = 0.1
ELECTION_TICKS = 10
HEARTBEAT_TICKS = 1

#: Proposals waiting for commit; past it the API answers 503 rather than queueing without bound.
PENDING_PROPOSALS_MAX = 10_000
#: How long a client request waits for its entry to commit before answering 503.
PROPOSAL_TIMEOUT_S = 10.0

#: A node snapshots its state after this many log entries or this many log bytes since its last
#: snapshot, whichever first. hashicorp/raft snapshots every 8,192 entries; the byte trigger
#: bounds the disk and memory the log takes when entries are large (a batch of 100 jobs is ~15 KB).
SNAPSHOT_EVERY_ENTRIES = 8192
SNAPSHOT_EVERY_BYTES = 16 << 20
#: ... or this long after the last one if anything was applied since: after a burst, expired
#: records and keys leave the state through a few Tick entries, and without a new snapshot the
#: burst's large snapshot would stay on disk until the next 8,192 entries.
SNAPSHOT_INTERVAL_S = 300.0
#: Entries kept behind the newest snapshot (their data read back from the WAL when needed:
#: raft/log.py, cold entries), so a follower that is only a little behind gets appends rather
#: than a whole snapshot (etcd keeps 5,000, hashicorp/raft 10,240; ours are
#: batches of up to a thousand jobs, so fewer entries cover as much work).
COMPACT_KEEP_ENTRIES = 1024
#: ... and at most this many bytes of them (1,024 entries of 1,000-job batches would be 80 MB).
COMPACT_KEEP_BYTES = 4 << 20
#: WAL segment size: compaction frees whole segments, so this is the granularity of disk use.
WAL_SEGMENT_BYTES = 8 << 20
#: A Ready whose entries hold at most this many bytes (and no new term or vote) is written and
#: fsynced on the event loop itself rather than in a worker thread: handing a small write to a
#: thread and back cost more than the fsync on the shared 2-core machine (0.3 ms to start the
#: thread against 0.2-0.5 ms for the fdatasync); larger writes keep the loop free meanwhile.
PERSIST_INLINE_BYTES_MAX = 64 << 10

#: Open connections per node (clients, workers, peers, dashboards); more are aborted at once and
#: counted. A worker holds one to three; 1,024 leaves room for hundreds of workers.
CONNECTIONS_MAX = 1024
#: A connection must deliver a complete request head (and finish a TLS handshake) within this of
#: its first byte, or it is aborted: slowloris. Ten seconds is ample for any real client.
HEADER_TIMEOUT_S = 10.0
#: Idle keep-alive connections are closed after this (aiohttp's default is an hour).
KEEPALIVE_TIMEOUT_S = 75.0
#: At SIGTERM, requests in flight get this long to finish before their connections are cut. A
#: commit takes milliseconds and long polls answer at once; systemd waits 90 s, Kubernetes 30 s.
SHUTDOWN_GRACE_S = 10.0
#: Queues a cluster holds (a configured queue or one holding job records counts; an empty queue
#: with default settings leaves the state). Each costs metric series and a little state; a
#: misbehaving client writing to ever-new names is refused (409) past it instead.
QUEUES_MAX = 10_000
#: Workers the leader keeps liveness for; past it the one heard from longest ago (holding no
#: lease) is forgotten first, so made-up worker names cannot grow the table without bound.
KNOWN_WORKERS_MAX = 10_000

#: The largest snapshot file a node accepts from a leader (InstallSnapshot announces the size
#: first): a million queued 1 KiB jobs make about 1.3 GB, so 16 GiB leaves room while a forged
#: "10^18-byte snapshot" is refused before a byte of it touches the disk.
SNAPSHOT_FILE_BYTES_MAX = 16 << 30
#: Shortest cluster secret a node accepts: 16 characters of a random token are ~96 bits.
CLUSTER_SECRET_CHARS_MIN = 16

#: Messages waiting in the node's inbox for the drive loop.
INBOX_COUNT_MAX = 10_000

#: How often the leader looks for due work (expiries, delayed jobs, dead workers).
HOUSEKEEPING_INTERVAL_S = 0.05

#: Retry-After seconds for 503 answers (no leader, overloaded) and 429 (queue full).
RETRY_AFTER_S = 1
