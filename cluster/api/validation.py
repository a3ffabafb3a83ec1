"""Checks every field of a request and builds the queue command, or raises a 4xx ApiError.

Nothing here touches state: a request that fails validation changes nothing, and a command that
leaves this module is well-formed, so `QueueStateMachine.apply` never sees garbage.
"""

from __future__ import annotations

import math
import os
import random
import reprlib
from typing import Any

from raftq.cluster import constants as c
from raftq.cluster import schedules as sched
from raftq.cluster.api.wire import ApiError, Packed, check_storable, invalid, pack_payload, storable_by_bytes
from raftq.cluster.queue import commands as cmds
from raftq.cluster.queue import schedules as sched_records

_MISSING = object()


def queue_name(value: Any, what: str = "queue name") -> str:
    if not isinstance(value, str) or not c.QUEUE_NAME_PATTERN.fullmatch(value):
        raise invalid(f"{what} {_show(value)} must match [A-Za-z0-9_.:-]{{1,128}}")
    return value


def worker_id(value: Any) -> str:
    if not isinstance(value, str) or not c.WORKER_ID_PATTERN.fullmatch(value):
        raise invalid(f"worker {_show(value)} must be a string matching [A-Za-z0-9_.:@-]{{1,200}}")
    return value


def job_id(value: Any) -> str:
    if not isinstance(value, str) or not c.JOB_ID_PATTERN.fullmatch(value):
        raise invalid(f"job id {_show(value)} must be a string matching {c.JOB_ID_PATTERN.pattern}")
    return value


#: Job id randomness: seeded once from the OS, then drawn without a system call per job (a
#: profile of the leader showed os.urandom at 4 % of its time). Ids need to be unique, not secret.
_id_random = random.Random(os.urandom(16))


def new_job_id(now_ms: int) -> str:
    """Time-ordered, unique without coordination: 44 bits of milliseconds, 48 random bits."""
    return f"{now_ms:011x}{_id_random.getrandbits(48):012x}"


def _job_id_after(prefix: str) -> str:
    """new_job_id with the milliseconds already formatted (`f"{now_ms:011x}"`, once per batch)."""
    return prefix + f"{_id_random.getrandbits(48):012x}"


def mapping(body: Any, what: str = "body") -> dict:
    if not isinstance(body, dict):
        raise invalid(f"{what} must be a map, got {type(body).__name__}")
    return body


def items(body: dict, key: str, *, count_max: int) -> list:
    value = body.get(key, _MISSING)
    if value is _MISSING:
        raise invalid(f"field {key!r} is required")
    if not isinstance(value, list):
        raise invalid(f"field {key!r} must be a list")
    if not value:
        raise invalid(f"field {key!r} must not be empty")
    if len(value) > count_max:
        raise ApiError(413, "too_large", f"{len(value)} items in {key!r}; at most {count_max} per request")
    return value


def integer(body: dict, key: str, *, low: int, high: int, default: Any = _MISSING) -> int:
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise invalid(f"field {key!r} is required")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"field {key!r} must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise invalid(f"field {key!r} = {value} is out of range [{low}, {high}]")
    return value


def seconds_as_ms(body: dict, key: str, *, low_ms: int, high_ms: int, default_ms: Any = _MISSING) -> int:
    """Reads a duration in seconds (float allowed) and returns whole milliseconds."""
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        if default_ms is _MISSING:
            raise invalid(f"field {key!r} is required")
        return default_ms
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"field {key!r} must be a number of seconds, got {_show(value)}")
    ms = int(round(value * 1000)) if abs(value) < 1e15 else None  # 1e308 s would overflow round()
    if ms is None or not low_ms <= ms <= high_ms:
        raise invalid(f"field {key!r} = {value} s is out of range [{low_ms / 1000:g}, {high_ms / 1000:g}] s")
    return ms


def text(body: dict, key: str, *, bytes_max: int, required: bool = True) -> str | None:
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise invalid(f"field {key!r} is required")
        return None
    if not isinstance(value, str):
        raise invalid(f"field {key!r} must be a string, got {_show(value)}")
    if len(value.encode()) > bytes_max:
        raise invalid(f"field {key!r} is longer than {bytes_max} bytes")
    return value


def boolean(body: dict, key: str, *, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise invalid(f"field {key!r} must be true or false, got {_show(value)}")
    return value


def lease_token(body: dict) -> int:
    value = body.get("lease", _MISSING)
    if value is _MISSING:
        raise invalid("field 'lease' is required (the token the lease answer gave)")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(f"field 'lease' must be a non-negative integer token, got {_show(value)}")
    return value


# ---------------------------------------------------------------------- commands


def submit(body: Any, queue: str, *, now_ms: int, payload_bytes_max: int) -> cmds.Submit:
    body = mapping(body)
    specs = items(body, "jobs", count_max=c.BATCH_COUNT_MAX)
    id_prefix = f"{now_ms:011x}"  # new_job_id's time part, the same for the whole batch
    jobs = _plain_jobs(specs, id_prefix, payload_bytes_max)
    if jobs is None:
        jobs = [
            _new_job(spec, position, id_prefix=id_prefix, payload_bytes_max=payload_bytes_max)
            for position, spec in enumerate(specs)
        ]
    return cmds.Submit(now_ms=now_ms, queue=queue, jobs=tuple(jobs))


#: The job fields a client library sends with every job; a spec holding no others takes every
#: other field's default without looking it up (a batch of a thousand such specs is the common,
#: hot case). The defaults are those `_job_fields` resolves for an absent field.
_PLAIN_SPEC_FIELDS = frozenset({"payload", "idempotency_key"})
_DEFAULTS_AFTER_LEASE = (c.BACKOFF_BASE_MS, c.BACKOFF_CAP_MS, None, None)  # backoff base, cap, key, group
#: An idempotency key of at most this many characters is within its byte limit (UTF-8 takes at
#: most 4 bytes a character) without encoding it.
_KEY_CHARS_SURELY_SHORT = c.IDEMPOTENCY_KEY_BYTES_MAX // 4


def _plain_jobs(specs: list, id_prefix: str, payload_bytes_max: int) -> list[cmds.NewJob] | None:
    """The jobs of a batch in which every spec is plain (a passed-through payload and maybe an
    idempotency key: what the client libraries send over msgpack) and plainly good, checked as a
    batch: one loop without per-job calls, the payloads' bytes tested together
    (`wire.storable_by_bytes`). None when any spec is not so: `_new_job` then checks each spec
    in order and names the first that is wrong, so the answer to a bad batch does not change.
    """
    payloads = []
    keys = []
    for spec in specs:
        if type(spec) is not dict or not spec.keys() <= _PLAIN_SPEC_FIELDS:
            return None
        payload = spec.get("payload")
        key = spec.get("idempotency_key")
        if type(payload) is not Packed or len(payload.data) > payload_bytes_max or (
                key is not None and (type(key) is not str or (len(key) > _KEY_CHARS_SURELY_SHORT and
                                                              len(key.encode()) > c.IDEMPOTENCY_KEY_BYTES_MAX))):
            return None
        payloads.append(payload.data)
        keys.append(key)
    if not storable_by_bytes(payloads):
        return None
    draw = _id_random.getrandbits
    new_job = cmds.NewJob
    attempts, lease_ms = c.MAX_ATTEMPTS_DEFAULT, c.LEASE_MS_DEFAULT
    base_ms, cap_ms, flow_key, group = _DEFAULTS_AFTER_LEASE
    return [new_job(id_prefix + f"{draw(48):012x}", payload, 0, 0, attempts, lease_ms, key, base_ms, cap_ms,
                    flow_key, group)
            for payload, key in zip(payloads, keys)]


def _new_job(spec: Any, position: int, *, id_prefix: str, payload_bytes_max: int) -> cmds.NewJob:
    spec = mapping(spec, f"jobs[{position}]")
    if "payload" not in spec:
        raise invalid(f"jobs[{position}]: field 'payload' is required")
    payload = _storable(spec["payload"], f"jobs[{position}]: payload")
    if len(payload) > payload_bytes_max:
        raise ApiError(413, "too_large", f"jobs[{position}]: payload of {len(payload)} bytes exceeds {payload_bytes_max}")
    job_id = _job_id_after(id_prefix)
    try:
        if spec.keys() <= _PLAIN_SPEC_FIELDS:
            key = text(spec, "idempotency_key", bytes_max=c.IDEMPOTENCY_KEY_BYTES_MAX, required=False)
            return cmds.NewJob(job_id, payload, 0, 0, c.MAX_ATTEMPTS_DEFAULT, c.LEASE_MS_DEFAULT, key,
                               *_DEFAULTS_AFTER_LEASE)
        return _job_fields(spec, job_id, payload)
    except ApiError as exc:
        exc.message = f"jobs[{position}]: {exc.message}"
        raise


def _job_fields(spec: dict, job_id: str, payload: bytes) -> cmds.NewJob:
    """A job from a spec with any of the optional fields, each checked."""
    return cmds.NewJob(
        id=job_id,
        payload=payload,
        priority=integer(spec, "priority", low=c.PRIORITY_MIN, high=c.PRIORITY_MAX, default=0),
        delay_ms=seconds_as_ms(spec, "delay_s", low_ms=0, high_ms=c.DELAY_MS_MAX, default_ms=0),
        max_attempts=integer(spec, "max_attempts", low=c.MAX_ATTEMPTS_MIN, high=c.MAX_ATTEMPTS_MAX,
                             default=c.MAX_ATTEMPTS_DEFAULT),
        lease_ms=seconds_as_ms(spec, "lease_s", low_ms=c.LEASE_MS_MIN, high_ms=c.LEASE_MS_MAX,
                               default_ms=c.LEASE_MS_DEFAULT),
        idempotency_key=text(spec, "idempotency_key", bytes_max=c.IDEMPOTENCY_KEY_BYTES_MAX, required=False),
        backoff_base_ms=seconds_as_ms(spec, "backoff_base_s", low_ms=0, high_ms=c.LEASE_MS_MAX,
                                      default_ms=c.BACKOFF_BASE_MS),
        backoff_cap_ms=seconds_as_ms(spec, "backoff_cap_s", low_ms=0, high_ms=c.DELAY_MS_MAX,
                                     default_ms=c.BACKOFF_CAP_MS),
        **_flow_fields(spec),
    )


def fetch(body: Any) -> tuple[str, tuple[str, ...], int, float]:
    """Returns (worker, queues, max_jobs, wait_s)."""
    body = mapping(body)
    worker = worker_id(body.get("worker"))
    queues = items(body, "queues", count_max=c.QUEUES_PER_FETCH_MAX)
    names = tuple(dict.fromkeys(queue_name(q) for q in queues))
    max_jobs = integer(body, "max_jobs", low=1, high=c.FETCH_COUNT_MAX, default=1)
    wait_ms = seconds_as_ms(body, "wait_s", low_ms=0, high_ms=int(c.FETCH_WAIT_S_MAX * 1000), default_ms=0)
    return worker, names, max_jobs, wait_ms / 1000


def ack(body: Any, *, now_ms: int) -> cmds.Ack:
    body = mapping(body)
    worker = worker_id(body.get("worker"))
    result = []
    for position, item in enumerate(items(body, "acks", count_max=c.BATCH_COUNT_MAX)):
        item = mapping(item, f"acks[{position}]")
        outcome = item.get("result")
        packed = None
        if outcome is not None:
            packed = _storable(outcome, f"acks[{position}]: result")
            if len(packed) > c.RESULT_BYTES_MAX:
                raise ApiError(413, "too_large", f"acks[{position}]: result exceeds {c.RESULT_BYTES_MAX} bytes")
        result.append(cmds.AckItem(id=job_id(item.get("id")), lease_token=lease_token(item), result=packed))
    return cmds.Ack(now_ms=now_ms, worker=worker, items=tuple(result))


def fail(body: Any, *, now_ms: int, entropy: int) -> cmds.Fail:
    body = mapping(body)
    worker = worker_id(body.get("worker"))
    result = []
    for position, item in enumerate(items(body, "fails", count_max=c.BATCH_COUNT_MAX)):
        item = mapping(item, f"fails[{position}]")
        error = item.get("error", "")
        if not isinstance(error, str):
            raise invalid(f"fails[{position}]: field 'error' must be a string")
        delay = body_delay(item, position)
        result.append(cmds.FailItem(
            id=job_id(item.get("id")), lease_token=lease_token(item),
            error=error.encode()[: c.ERROR_TEXT_BYTES_MAX].decode(errors="ignore"),
            retry=boolean(item, "retry", default=True), delay_ms=delay,
        ))
    return cmds.Fail(now_ms=now_ms, worker=worker, entropy=entropy, items=tuple(result))


def body_delay(item: dict, position: int) -> int | None:
    if item.get("delay_s") is None:
        return None
    try:
        return seconds_as_ms(item, "delay_s", low_ms=0, high_ms=c.DELAY_MS_MAX)
    except ApiError as exc:
        exc.message = f"fails[{position}]: {exc.message}"
        raise


def extend(body: Any, *, now_ms: int) -> cmds.Extend:
    body = mapping(body)
    worker = worker_id(body.get("worker"))
    result = []
    for position, item in enumerate(items(body, "leases", count_max=c.BATCH_COUNT_MAX)):
        item = mapping(item, f"leases[{position}]")
        lease_ms = seconds_as_ms(item, "lease_s", low_ms=c.LEASE_MS_MIN, high_ms=c.LEASE_MS_MAX)
        result.append(cmds.ExtendItem(id=job_id(item.get("id")), lease_token=lease_token(item), lease_ms=lease_ms))
    return cmds.Extend(now_ms=now_ms, worker=worker, items=tuple(result))


def release(body: Any, *, now_ms: int) -> cmds.Release:
    body = mapping(body)
    worker = worker_id(body.get("worker"))
    result = []
    for position, item in enumerate(items(body, "leases", count_max=c.BATCH_COUNT_MAX)):
        item = mapping(item, f"leases[{position}]")
        result.append(cmds.ReleaseItem(id=job_id(item.get("id")), lease_token=lease_token(item)))
    return cmds.Release(now_ms=now_ms, worker=worker, items=tuple(result))


def heartbeat(body: Any) -> list[str]:
    body = mapping(body)
    jobs = body.get("jobs", [])
    if not isinstance(jobs, list):
        raise invalid("field 'jobs' must be a list of job ids")
    if len(jobs) > c.HEARTBEAT_JOB_COUNT_MAX:
        raise ApiError(413, "too_large", f"at most {c.HEARTBEAT_JOB_COUNT_MAX} job ids per heartbeat")
    return [job_id(j) for j in jobs]


def redrive(body: Any, queue: str, *, now_ms: int) -> cmds.Redrive:
    body = mapping(body)
    ids = body.get("ids")
    if ids is not None:
        ids = tuple(job_id(i) for i in items(body, "ids", count_max=c.BATCH_COUNT_MAX))
    return cmds.Redrive(now_ms=now_ms, queue=queue, ids=ids)


def _flow_fields(spec: dict) -> dict:
    """A job's `key` (per-key concurrency) or `group` (FIFO group); not both."""
    key = text(spec, "key", bytes_max=c.FLOW_KEY_BYTES_MAX, required=False)
    group = text(spec, "group", bytes_max=c.FLOW_KEY_BYTES_MAX, required=False)
    if key is not None and group is not None:
        raise invalid("a job carries a 'key' or a 'group', not both (a FIFO group already runs one job at a time)")
    return {"key": key, "group": group}


#: The fields each settings body may carry. A settings body with any other field is refused, so
#: that a misspelled setting ("max_dept") is a 400 rather than silently ignored. A new setting
#: adds its name here.
SETTINGS_FIELDS: dict[str, frozenset[str]] = {
    "queue": frozenset({"max_depth", "rate_per_s", "burst", "max_running_per_key", "fifo"}),
    "schedule": frozenset({"queue", "payload", "cron", "every_s", "timezone", "overlap", "catch_up", "priority",
                           "max_attempts", "lease_s"}),
}


#: What `PUT /v1/queues/{queue}` answers for a queue left with every setting at its default.
DEFAULT_QUEUE_SETTINGS = {"max_depth": None, "rate_per_s": None, "burst": None, "max_running_per_key": None,
                          "fifo": False}


def settings(body: Any, kind: str) -> dict:
    """The body as a map holding only the fields SETTINGS_FIELDS allows for `kind`."""
    body = mapping(body)
    allowed = SETTINGS_FIELDS[kind]
    unknown = sorted(_show(key) for key in body if key not in allowed)
    if unknown:
        raise invalid(f"unknown {kind} setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:5])}; "
                      f"known: {', '.join(sorted(allowed))}")
    return body


def queue_config(body: Any, queue: str, *, now_ms: int) -> cmds.SetQueueConfig:
    """PUT /v1/queues/{queue}: the whole settings; a field left out is unlimited / off."""
    body = settings(body, "queue")
    max_depth = integer(body, "max_depth", low=1, high=1 << 40, default=None)
    rate_per_s = number(body, "rate_per_s", low=c.RATE_PER_S_MIN, high=c.RATE_PER_S_MAX)
    burst = integer(body, "burst", low=1, high=c.BURST_MAX, default=None)
    if rate_per_s is None:
        if burst is not None:
            raise invalid("field 'burst' goes with 'rate_per_s'")
        rate_per_ks = None
    else:
        rate_per_ks = int(round(rate_per_s * 1000))
        if burst is None:
            burst = max(1, math.ceil(rate_per_s))  # one second's worth
    return cmds.SetQueueConfig(
        now_ms=now_ms, queue=queue, max_depth=max_depth, rate_per_ks=rate_per_ks, burst=burst,
        max_running_per_key=integer(body, "max_running_per_key", low=1, high=c.MAX_RUNNING_PER_KEY_MAX, default=None),
        fifo=boolean(body, "fifo", default=False),
    )


def schedule(body: Any, name: str, *, now_ms: int, wall_ms: int, previous: dict | None) -> cmds.PutSchedule:
    """PUT /v1/schedules/{name}, stamped `now_ms`; the first fire time is computed here, from the
    wall clock's `wall_ms` (or kept, when an every_s schedule keeps its period)."""
    body = settings(body, "schedule")
    queue = queue_name(body.get("queue"), "field 'queue'")
    cron = text(body, "cron", bytes_max=256, required=False)
    every_ms = None
    if body.get("every_s") is not None:
        every_ms = seconds_as_ms(body, "every_s", low_ms=sched.EVERY_MS_MIN, high_ms=sched.EVERY_MS_MAX)
    if (cron is None) == (every_ms is None):
        raise invalid("a schedule needs exactly one of 'cron' and 'every_s'")
    timezone_name = text(body, "timezone", bytes_max=64, required=False) or "UTC"
    try:
        sched.zone(timezone_name)
        if cron is not None:
            sched.check_cron(cron, timezone_name)
    except sched.ScheduleSpecError as exc:
        raise invalid(str(exc)) from None
    overlap = choice(body, "overlap", sched_records.OVERLAP_POLICIES, default="allow")
    catch_up = choice(body, "catch_up", sched_records.CATCH_UP_POLICIES, default="latest")
    try:
        payload = pack_payload(body.get("payload"))
    except (TypeError, ValueError, OverflowError) as exc:
        raise invalid(f"payload cannot be encoded: {exc}") from None
    if len(payload) > c.SCHEDULE_PAYLOAD_BYTES_MAX:
        raise ApiError(413, "too_large", f"a schedule's payload is at most {c.SCHEDULE_PAYLOAD_BYTES_MAX} bytes")
    grid = previous["next_fire_ms"] if previous is not None and previous["every_ms"] == every_ms else None
    return cmds.PutSchedule(
        now_ms=now_ms, name=name, queue=queue, payload=payload, cron=cron, every_ms=every_ms,
        timezone=timezone_name, overlap=overlap, catch_up=catch_up,
        priority=integer(body, "priority", low=c.PRIORITY_MIN, high=c.PRIORITY_MAX, default=0),
        max_attempts=integer(body, "max_attempts", low=1, high=c.MAX_ATTEMPTS_MAX, default=c.MAX_ATTEMPTS_DEFAULT),
        lease_ms=seconds_as_ms(body, "lease_s", low_ms=c.LEASE_MS_MIN, high_ms=c.LEASE_MS_MAX,
                               default_ms=c.LEASE_MS_DEFAULT),
        backoff_base_ms=c.BACKOFF_BASE_MS, backoff_cap_ms=c.BACKOFF_CAP_MS,
        next_fire_ms=sched.first_fire_from(cron, every_ms, timezone_name, wall_ms, grid),
    )


def choice(body: dict, key: str, allowed: tuple[str, ...], *, default: str) -> str:
    value = body.get(key)
    if value is None:
        return default
    if value not in allowed:
        raise invalid(f"field {key!r} must be one of {', '.join(allowed)}, got {_show(value)}")
    return value


def number(body: dict, key: str, *, low: float, high: float) -> float | None:
    """An optional finite number in [low, high]; None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"field {key!r} must be a number, got {_show(value)}")
    if not low <= value <= high:
        raise invalid(f"field {key!r} = {value} is out of range [{low:g}, {high:g}]")
    return float(value)


def _storable(value: Any, what: str) -> bytes:
    """The msgpack encoding of a value the node keeps and sends back later; 400 when it cannot be.

    A `Packed` value (a payload of a msgpack body) is checked and kept as the bytes it came in.
    """
    text_keys = type(value) is Packed
    if text_keys:
        packed, value = value.data, value.value
    else:
        try:
            packed = pack_payload(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise invalid(f"{what} cannot be encoded: {exc}") from None
    try:
        check_storable(value, packed, text_keys=text_keys)
    except ApiError as exc:
        exc.message = f"{what}: {exc.message}"
        raise
    return packed


#: Quotes values in error messages: bounded in length and depth (a body may nest 1024 levels,
#: deeper than plain repr() can recurse).
_quote = reprlib.Repr()
_quote.maxlevel = 3
_quote.maxstring = _quote.maxother = 50


def _show(value: Any) -> str:
    text_value = _quote.repr(value)
    return text_value if len(text_value) <= 60 else text_value[:57] + "..."
