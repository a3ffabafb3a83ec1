"""Defaults and hard bounds, one place, each with the reason for its number.

Call sites pass options explicitly; only `cluster.config` and the API edge read this module.
"""

import re

#: SPEC.md: queue names are `[A-Za-z0-9_.:-]{1,128}` so they fit in URLs and metric labels as-is.
QUEUE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
#: Worker ids travel in URL paths and logs; the same alphabet as queues, a little longer for host-pid-rand.
WORKER_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")

#: SQS's visibility timeout default is 30 s; Celery's acks_late users pick minutes. SPEC bounds: 1 s – 12 h.
LEASE_MS_DEFAULT = 30_000
LEASE_MS_MIN = 1_000
LEASE_MS_MAX = 12 * 3_600_000

#: SPEC: max attempts default 5, 1 – 1000.
MAX_ATTEMPTS_DEFAULT = 5
MAX_ATTEMPTS_MAX = 1000

#: SPEC backoff: base 1 s, ×2 per attempt, cap 300 s, full jitter.
BACKOFF_BASE_MS = 1_000
BACKOFF_CAP_MS = 300_000

#: SPEC: delay at submit 0 – 7 days (SQS allows 15 min; a week covers "remind me next week").
DELAY_MS_MAX = 7 * 86_400_000

PRIORITY_MIN = 0
PRIORITY_MAX = 9

#: SPEC: payloads ≤ 1 MiB by default (SQS allows 256 KiB; big blobs belong in object storage).
PAYLOAD_BYTES_MAX = 1 << 20
#: A whole request body; a batch of many small jobs or one maximal payload plus envelope.
BODY_BYTES_MAX = 8 << 20
#: Jobs in one submit, and items in one ack/fail/extend batch: SQS caps at 10, we batch far more
#: because one batch is one log entry and one fsync; 1000 keeps one entry well under a MiB for small jobs.
BATCH_COUNT_MAX = 1000
#: Jobs one lease request may take.
LEASE_COUNT_MAX = 1000
#: Queues one lease request may name.
QUEUES_PER_LEASE_MAX = 64
#: Idempotency keys are client-made; bounded so the index cannot be inflated by one request.
IDEMPOTENCY_KEY_BYTES_MAX = 256
#: Error text kept with a failed job (a traceback is useful; a megabyte of it is not).
ERROR_TEXT_BYTES_MAX = 8 << 10
#: Result kept with an acked job.
RESULT_BYTES_MAX = 64 << 10

#: SPEC: idempotency window 1 h, finished-job retention 1 h.
IDEMPOTENCY_WINDOW_MS = 3_600_000
RETENTION_MS = 3_600_000

#: SPEC: long-poll wait up to 20 s (SQS's ReceiveMessage WaitTimeSeconds maximum).
LEASE_WAIT_S_MAX = 20.0

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
#: Entries kept in memory behind the newest snapshot, so a follower that is only a little behind
#: gets appends rather than a whole snapshot (etcd keeps 5,000, hashicorp/raft 10,240; ours are
#: batches of up to a thousand jobs, so fewer entries cover as much work).
COMPACT_KEEP_ENTRIES = 1024
#: ... and at most this many bytes of them (1,024 entries of 1,000-job batches would be 80 MB).
COMPACT_KEEP_BYTES = 4 << 20
#: WAL segment size: compaction frees whole segments, so this is the granularity of disk use.
WAL_SEGMENT_BYTES = 8 << 20

#: Messages waiting in the node's inbox for the drive loop.
INBOX_COUNT_MAX = 10_000

#: How often the leader looks for due work (expiries, delayed jobs, dead workers).
HOUSEKEEPING_INTERVAL_S = 0.05

#: Retry-After seconds for 503 answers (no leader, overloaded) and 429 (queue full).
RETRY_AFTER_S = 1
