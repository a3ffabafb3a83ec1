"""The wire protocol's shared facts: limits, content types and header names, written once.

Theory of operation
-------------------
The broker validates every request against these bounds (`cluster/api/validation.py`, through
`cluster/constants.py`), and the client checks the same bounds before it sends (`client/app.py`,
`client/_base.py`, the worker), so that a caller learns of a bad value at the call, not from a 4xx
after a round trip, and so that the two sides can never disagree by one restated number. This
module imports nothing: both sides depend on it, it depends on neither (a test checks the import
direction, and that the server's and the client's checks use these objects).

Durations on the wire are seconds (SPEC.md); the broker counts milliseconds inside, so each
bound that is a duration is given in the unit its users work in and the other derived from it.
"""

import re

# ---------------------------------------------------------------------- content and headers

#: Request and response bodies: msgpack, or JSON so that curl works (SPEC.md, Interface).
CONTENT_TYPE_MSGPACK = "application/msgpack"
CONTENT_TYPE_JSON = "application/json"
#: Other names clients use for msgpack; accepted, never sent.
CONTENT_TYPE_MSGPACK_ALIASES = (CONTENT_TYPE_MSGPACK, "application/x-msgpack", "application/vnd.msgpack")
#: The leader's id on a 307 answer (with `Location` on the leader's same path).
LEADER_HEADER = "X-Raftq-Leader"

# ---------------------------------------------------------------------- names

#: SPEC.md: queue names are `[A-Za-z0-9_.:-]{1,128}` so they fit in URLs and metric labels as-is.
QUEUE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
#: Worker ids travel in URL paths and logs; the same alphabet as queues, a little longer for host-pid-rand.
WORKER_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")
#: Job ids are made by the leader (hex); clients only echo them. Printable ASCII keeps them safe in
#: URLs and log lines.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

# ---------------------------------------------------------------------- per-job options

#: SQS's visibility timeout default is 30 s; Celery's acks_late users pick minutes. SPEC bounds: 1 s – 12 h.
LEASE_MS_DEFAULT = 30_000
LEASE_MS_MIN = 1_000
LEASE_MS_MAX = 12 * 3_600_000
LEASE_S_DEFAULT = LEASE_MS_DEFAULT / 1000
LEASE_S_MIN = LEASE_MS_MIN / 1000
LEASE_S_MAX = LEASE_MS_MAX / 1000

#: SPEC: max attempts default 5, 1 – 1000.
MAX_ATTEMPTS_DEFAULT = 5
MAX_ATTEMPTS_MIN = 1
MAX_ATTEMPTS_MAX = 1000

#: SPEC: delay at submit (and of a retry) 0 – 7 days (SQS allows 15 min; a week covers "remind me next week").
DELAY_MS_MAX = 7 * 86_400_000
DELAY_S_MAX = DELAY_MS_MAX / 1000

#: SPEC: priority 0 – 9, 9 runs first.
PRIORITY_MIN = 0
PRIORITY_MAX = 9

# ---------------------------------------------------------------------- sizes and counts

#: SPEC: payloads ≤ 1 MiB by default (SQS allows 256 KiB; big blobs belong in object storage).
#: A node may be configured otherwise (`--payload-bytes-max`); this is the default.
PAYLOAD_BYTES_MAX = 1 << 20
#: A whole request body; a batch of many small jobs or one maximal payload plus envelope.
BODY_BYTES_MAX = 8 << 20
#: Containers nested deeper than this are refused in a payload or result, JSON or msgpack. msgpack
#: unpacks up to 1024 levels and Python's json parser stops near 1000, but a stored payload is sent
#: back inside an answer (and JSON-encoded for a browser), so the bound sits well below both.
NESTING_DEPTH_MAX = 100
#: Integers a body may carry: what msgpack can encode (int64 .. uint64). JSON has no such bound;
#: a bigger one would be accepted and then fail to encode into the log.
WIRE_INT_MIN = -(1 << 63)
WIRE_INT_MAX = (1 << 64) - 1
#: Jobs in one submit, and items in one ack/fail/extend batch: SQS caps at 10, we batch far more
#: because one batch is one log entry and one fsync; 1000 keeps one entry well under a MiB for small jobs.
BATCH_COUNT_MAX = 1000
#: Jobs one fetch (`POST /v1/lease`) may take.
FETCH_COUNT_MAX = 1000
#: Job ids one heartbeat may name (a worker's running and buffered jobs).
HEARTBEAT_JOB_COUNT_MAX = 1000
#: Queues one fetch may name.
QUEUES_PER_FETCH_MAX = 64
#: Idempotency keys are client-made; bounded so the index cannot be inflated by one request.
IDEMPOTENCY_KEY_BYTES_MAX = 256
#: Error text kept with a failed job (a traceback is useful; a megabyte of it is not).
ERROR_TEXT_BYTES_MAX = 8 << 10
#: Result kept with an acked job; a larger one gets the whole ack batch refused (413).
RESULT_BYTES_MAX = 64 << 10

# ---------------------------------------------------------------------- time

#: SPEC: long-poll wait on fetch up to 20 s (SQS's ReceiveMessage WaitTimeSeconds maximum).
FETCH_WAIT_S_MAX = 20.0
#: SPEC: the long poll on one job's state (`GET /v1/jobs/{id}?wait_s=N`) is bounded like the fetch's:
#: a client that waits longer polls again, so no request outlives ordinary proxy and client timeouts.
JOB_WAIT_S_MAX = 20.0
