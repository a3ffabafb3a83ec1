"""HTTP views: decode, validate, build a command, `await node.propose(...)`, map the result.

Errors become HTTP only at this edge (`cluster.api.app` maps NotLeaderError to 307, service errors
to 503). Reads of queue state take a ReadIndex barrier first, so a deposed leader cannot answer
from a stale state machine.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

from aiohttp import web

from raftq.cluster import constants as c
from raftq.cluster import schedules as sched
from raftq.cluster import long_poll
from raftq.cluster.api import validation as v
from raftq.cluster.api.keys import NODE, PEER_SESSION
from raftq.cluster.api.wire import ApiError, Packed, read_body, respond
from raftq.cluster.queue import commands as cmds
from raftq.cluster.queue import results


def _now_ms(request: web.Request) -> int:
    """The cluster's time for the command this request builds: never this node's wall clock
    (cluster/leader_clock.py)."""
    return request.app[NODE].now_ms()


async def _body(request: web.Request) -> Any:
    return await read_body(request, request.app[NODE].config.body_bytes_max)


# ---------------------------------------------------------------------- jobs


async def submit(request: web.Request) -> web.Response:
    node = request.app[NODE]
    started = time.perf_counter()
    queue = v.queue_name(request.match_info["queue"])
    body = await read_body(request, node.config.body_bytes_max, submit=True)
    node.require_leader()
    _check_queue_limit(node, queue)
    command = v.submit(body, queue, now_ms=node.now_ms(), payload_bytes_max=node.config.payload_bytes_max)
    result = await node.propose(command)
    if isinstance(result, results.QueueFull):
        raise ApiError(429, "queue_full", f"queue {queue} is full ({result.max_depth} jobs)",
                       headers={"Retry-After": str(c.RETRY_AFTER_S)})
    node.metrics.submit_seconds.observe(time.perf_counter() - started)
    return respond(request, {"ids": list(result.ids)}, status=201)


async def fetch(request: web.Request) -> web.Response:
    node = request.app[NODE]
    worker, queues, max_jobs, wait_s = v.fetch(await _body(request))
    node.require_leader()
    node.touch_worker(worker)
    jobs = await long_poll.fetch(node, worker, queues, max_jobs=max_jobs, wait_s=wait_s)
    now_ms = node.now_ms()  # one reading for the whole answer: its jobs were leased by one entry
    return respond(request, {"jobs": [_leased_job(job, now_ms) for job in jobs]})


def _leased_job(job: Any, now_ms: int) -> dict:
    return {
        "id": job.id,
        "queue": job.queue,
        "payload": Packed(job.payload),  # the stored bytes, as they came (wire.pack_answer)
        "attempt": job.attempt,
        "lease": job.lease_token,
        "lease_s": job.lease_ms / 1000,
        **_lease_end(job.lease_expires_at_ms, now_ms),
        "priority": job.priority,
    }


def _lease_end(expires_at_ms: int, now_ms: int) -> dict:
    """When a lease ends: `lease_expires_at` on the cluster's clock (the clock that decides it),
    and `lease_expires_in_s` from this answer, which is what a worker should plan with: no wall
    clock, ours or its own, has to agree with the cluster's."""
    return {"lease_expires_at": expires_at_ms / 1000,
            "lease_expires_in_s": max(0, expires_at_ms - now_ms) / 1000}


async def ack(request: web.Request) -> web.Response:
    command = v.ack(await _body(request), now_ms=_now_ms(request))
    return await _lease_items(request, command)


async def fail(request: web.Request) -> web.Response:
    command = v.fail(await _body(request), now_ms=_now_ms(request), entropy=request.app[NODE].entropy())
    return await _lease_items(request, command)


async def extend(request: web.Request) -> web.Response:
    command = v.extend(await _body(request), now_ms=_now_ms(request))
    return await _lease_items(request, command)


async def release(request: web.Request) -> web.Response:
    """Hands leased jobs back to ready without counting an attempt (a worker's unstarted buffer)."""
    command = v.release(await _body(request), now_ms=_now_ms(request))
    return await _lease_items(request, command)


LeaseItems = cmds.Ack | cmds.Fail | cmds.Extend | cmds.Release


async def _lease_items(request: web.Request, command: LeaseItems) -> web.Response:
    """The shared tail of ack, fail, extend and release: one outcome per item, in order."""
    node = request.app[NODE]
    node.require_leader()
    node.touch_worker(command.worker)
    outcomes = await _settle_items(node, command)
    now_ms = node.now_ms()  # one reading for the whole answer, as for a lease answer
    return respond(request, {"results": [_outcome(o, now_ms) for o in outcomes]})


async def _settle_items(node: Any, command: LeaseItems) -> Sequence[Any]:
    """Outcomes of an ack/fail/extend/release batch; a batch the state already refuses whole skips the log."""
    known = node.queue.precheck(command, command.now_ms)
    if all(outcome is not None for outcome in known):
        return known
    result = await node.propose(command)
    return result.outcomes


def _outcome(outcome: Any, now_ms: int) -> Any:
    if isinstance(outcome, results.ItemError):
        return {"error": {"code": outcome.code, "message": outcome.message}}
    if isinstance(outcome, results.Extended):
        return {"ok": True, **_lease_end(outcome.expires_at_ms, now_ms)}
    return "ok"


async def heartbeat(request: web.Request) -> web.Response:
    node = request.app[NODE]
    worker = v.worker_id(request.match_info["worker"])
    job_ids = v.heartbeat(await _body(request))
    node.require_leader()
    node.touch_worker(worker)
    lost = []
    for job_id in job_ids:
        holder = node.queue.lease_holder(job_id)
        if holder is None or holder[0] != worker:
            lost.append(job_id)
    return respond(request, {"ok": True, "lost": lost})


async def get_job(request: web.Request) -> web.Response:
    node = request.app[NODE]
    job_id = v.job_id(request.match_info["job_id"])
    wait_s = _query_seconds(request, "wait_s", high=c.JOB_WAIT_S_MAX)
    await node.read_barrier()
    if wait_s > 0:
        await _wait_until_final(node, job_id, wait_s)
    record = node.queue.get_job(job_id)
    if record is None:
        retention_s = node.config.retention_ms / 1000
        raise ApiError(404, "not_found",
                       f"no job {job_id}: it never existed here, or it finished more than {retention_s:g} s ago "
                       "and its record was dropped")
    return respond(request, job_record(record))


#: The states a job does not leave by itself: `GET /v1/jobs/{id}?wait_s=` answers once it is in one.
FINAL_STATES = ("done", "dead", "cancelled")


async def _wait_until_final(node: Any, job_id: str, wait_s: float) -> None:
    """The long poll of `GET /v1/jobs/{id}?wait_s=N`: returns once the job is final, unknown
    (never was, or dropped after retention) or `wait_s` has passed, whichever comes first.

    Wakes at each applied batch (the lease long poll's signal) and looks at one dict entry.
    Raises NotLeaderError when this node stops leading meanwhile: the client asks the new leader.
    """
    deadline = time.monotonic() + wait_s
    while True:
        changed = node.jobs_changed()
        state = node.queue.job_state(job_id)
        remaining = deadline - time.monotonic()
        if state is None or state in FINAL_STATES or remaining <= 0 or node.draining:
            return
        try:
            await asyncio.wait_for(asyncio.shield(changed), remaining)
        except asyncio.TimeoutError:
            return
        node.require_leader()


def job_record(record: dict) -> dict:
    """The wire form of a job: times in seconds (points in time on the cluster's clock), payload
    and result as their stored msgpack (decoded only for a JSON answer)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key in ("payload", "result") and isinstance(value, (bytes, bytearray)):
            out[key] = Packed(bytes(value))
        elif key.endswith("_ms"):
            out[key[:-3] + ("_s" if not key.endswith("_at_ms") else "")] = None if value is None else value / 1000
        elif key == "transitions":
            out[key] = [[state, at_ms / 1000] for state, at_ms in value]
        else:
            out[key] = value
    return out


async def cancel(request: web.Request) -> web.Response:
    node = request.app[NODE]
    job_id = v.job_id(request.match_info["job_id"])
    await node.read_barrier()
    if node.queue.get_job(job_id) is None:
        raise ApiError(404, "not_found", f"no job {job_id}")  # answered without touching the log
    outcome = await node.propose(cmds.Cancel(now_ms=_now_ms(request), id=job_id))
    if isinstance(outcome, results.ItemError):
        status = 404 if outcome.code == "not_found" else 409
        raise ApiError(status, outcome.code, outcome.message)
    return respond(request, {"ok": True})


# ---------------------------------------------------------------------- queues


async def list_queues(request: web.Request) -> web.Response:
    node = request.app[NODE]
    await node.read_barrier()
    state = node.queue
    now_ms = _now_ms(request)
    return respond(request, {
        "queues": state.queue_stats(),
        "settings": state.queue_settings(),
        "held_back": {name: state.held_back(name, now_ms) for name in state.queue_stats()},
    })


async def configure_queue(request: web.Request) -> web.Response:
    node = request.app[NODE]
    queue = v.queue_name(request.match_info["queue"])
    command = v.queue_config(await _body(request), queue, now_ms=_now_ms(request))
    node.require_leader()
    _check_queue_limit(node, queue)
    await node.propose(command)
    # Default settings on an empty queue leave no queue behind (it counts against no limit).
    settings = node.queue.queue_settings().get(queue) or v.DEFAULT_QUEUE_SETTINGS
    return respond(request, {"ok": True, "queue": queue, **settings})


async def delete_queue(request: web.Request) -> web.Response:
    """Removes a queue, its settings and finished records; 409 while it holds unfinished jobs
    unless `?force=true`, which cancels them."""
    node = request.app[NODE]
    queue = v.queue_name(request.match_info["queue"])
    force = _query_bool(request, "force")
    node.require_leader()
    outcome = await node.propose(cmds.DeleteQueue(now_ms=_now_ms(request), queue=queue, force=force))
    if isinstance(outcome, results.ItemError):
        raise ApiError(404 if outcome.code == results.NOT_FOUND else 409, outcome.code, outcome.message)
    return respond(request, {"ok": True, "queue": queue})


def _check_queue_limit(node: Any, queue: str) -> None:
    """A write that would make a new queue past the node's limit is refused (409).

    Checked against the applied state before proposing, so that concurrent first writes to new
    queues may pass the limit by the proposals in flight, never by more.
    """
    state = node.queue
    if not state.has_queue(queue) and state.queue_count() >= node.config.queues_max:
        raise ApiError(409, "too_many_queues",
                       f"this cluster holds {state.queue_count()} queues, its limit (--queues-max); "
                       "delete one (DELETE /v1/queues/NAME) or let empty ones finish")


def _query_bool(request: web.Request, key: str) -> bool:
    raw = request.query.get(key, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise v.invalid(f"query parameter {key!r} must be true or false, got {raw[:20]!r}")
    return raw in ("true", "1")


# ---------------------------------------------------------------------- schedules


async def list_schedules(request: web.Request) -> web.Response:
    node = request.app[NODE]
    await node.read_barrier()
    return respond(request, {"schedules": [schedule_record(r) for r in node.queue.schedules()]})


async def get_schedule(request: web.Request) -> web.Response:
    node = request.app[NODE]
    name = v.queue_name(request.match_info["name"], "schedule name")
    await node.read_barrier()
    return respond(request, schedule_record(_known_schedule(node, name)))


async def put_schedule(request: web.Request) -> web.Response:
    node = request.app[NODE]
    name = v.queue_name(request.match_info["name"], "schedule name")
    body = await _body(request)
    node.require_leader()
    await node.read_barrier()
    previous = node.queue.schedule(name)
    if previous is None and node.queue.schedule_count() >= c.SCHEDULES_MAX:
        raise ApiError(409, "too_many", f"the cluster holds {c.SCHEDULES_MAX} schedules, its limit; delete one first")
    await node.propose(v.schedule(body, name, now_ms=_now_ms(request), wall_ms=sched.wall_now_ms(),
                                  previous=previous))
    return respond(request, schedule_record(_known_schedule(node, name)))


async def delete_schedule(request: web.Request) -> web.Response:
    node = request.app[NODE]
    name = v.queue_name(request.match_info["name"], "schedule name")
    node.require_leader()
    await node.read_barrier()
    _known_schedule(node, name)  # an unknown name is answered without touching the log
    outcome = await node.propose(cmds.DeleteSchedule(now_ms=_now_ms(request), name=name))
    if isinstance(outcome, results.ItemError):
        raise ApiError(404, outcome.code, outcome.message)
    return respond(request, {"ok": True, "deleted": name})


async def pause_schedule(request: web.Request) -> web.Response:
    return await _pause_or_resume(request, paused=True)


async def resume_schedule(request: web.Request) -> web.Response:
    return await _pause_or_resume(request, paused=False)


async def _pause_or_resume(request: web.Request, *, paused: bool) -> web.Response:
    node = request.app[NODE]
    name = v.queue_name(request.match_info["name"], "schedule name")
    node.require_leader()
    await node.read_barrier()
    record = _known_schedule(node, name)
    next_fire_ms = 0
    if not paused:  # fires due while paused are skipped: go on from the first one after now
        next_fire_ms = sched.first_fire_from(record["cron"], record["every_ms"], record["timezone"],
                                             sched.wall_now_ms(), record["next_fire_ms"])
    outcome = await node.propose(cmds.PauseSchedule(now_ms=_now_ms(request), name=name, paused=paused,
                                                    next_fire_ms=next_fire_ms))
    if isinstance(outcome, results.ItemError):
        raise ApiError(404, outcome.code, outcome.message)
    return respond(request, schedule_record(_known_schedule(node, name)))


def _known_schedule(node: Any, name: str) -> dict:
    record = node.queue.schedule(name)
    if record is None:
        raise ApiError(404, "not_found", f"no schedule {name}")
    return record


def schedule_record(record: dict) -> dict:
    """The wire form of a schedule: times in seconds (and ISO for people), payload as stored."""
    return {
        "name": record["name"],
        "queue": record["queue"],
        "payload": Packed(record["payload"]),
        "cron": record["cron"],
        "every_s": None if record["every_ms"] is None else record["every_ms"] / 1000,
        "timezone": record["timezone"],
        "overlap": record["overlap"],
        "catch_up": record["catch_up"],
        "priority": record["priority"],
        "max_attempts": record["max_attempts"],
        "lease_s": record["lease_ms"] / 1000,
        "paused": record["paused"],
        "next_fire_at": record["next_fire_ms"] / 1000,
        "next_fire": sched.describe_ms(record["next_fire_ms"]),
        "last_fire_at": None if record["last_fire_ms"] is None else record["last_fire_ms"] / 1000,
        "last_fire": sched.describe_ms(record["last_fire_ms"]),
        "last_job_id": record["last_job_id"],
        "jobs_created": record["created_count"],
        "fires_skipped": record["skipped_count"],
        "revision": record["revision"],
    }


async def list_dead(request: web.Request) -> web.Response:
    node = request.app[NODE]
    queue = v.queue_name(request.match_info["queue"])
    limit = _query_int(request, "limit", default=100, low=1, high=1000)
    after = request.query.get("after")
    await node.read_barrier()
    jobs = node.queue.dead_jobs(queue, limit, after)
    return respond(request, {"jobs": [job_record(job) for job in jobs]})


async def redrive(request: web.Request) -> web.Response:
    node = request.app[NODE]
    queue = v.queue_name(request.match_info["queue"])
    command = v.redrive(await _body(request), queue, now_ms=_now_ms(request))
    node.require_leader()
    result = await node.propose(command)
    return respond(request, {"redriven": result.count})


async def purge_dead(request: web.Request) -> web.Response:
    node = request.app[NODE]
    queue = v.queue_name(request.match_info["queue"])
    node.require_leader()
    result = await node.propose(cmds.Purge(now_ms=_now_ms(request), queue=queue, state="dead"))
    return respond(request, {"purged": result.count})


def _query_seconds(request: web.Request, key: str, *, high: float) -> float:
    """A query parameter of seconds in [0, high]; 0 when absent."""
    raw = request.query.get(key)
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise v.invalid(f"query parameter {key!r} must be a number of seconds, got {raw[:40]!r}") from None
    if not 0 <= value <= high:  # also refuses nan
        raise v.invalid(f"query parameter {key!r} = {value:g} is out of range [0, {high:g}]")
    return value


def _query_int(request: web.Request, key: str, *, default: int, low: int, high: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise v.invalid(f"query parameter {key!r} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise v.invalid(f"query parameter {key!r} = {value} is out of range [{low}, {high}]")
    return value


# ---------------------------------------------------------------------- cluster, workers, metrics, peers


async def cluster_status(request: web.Request) -> web.Response:
    node = request.app[NODE]
    if request.query.get("digest") in ("1", "true"):
        return respond(request, await node.status_with_digest())
    return respond(request, node.status())


async def workers(request: web.Request) -> web.Response:
    node = request.app[NODE]
    node.require_leader()
    return respond(request, {"workers": node.workers_table()})


async def metrics(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    node = request.app[NODE]
    body = generate_latest(node.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def overview(request: web.Request) -> web.Response:
    """Everything the dashboard shows, from any node, in one same-origin request.

    Queue depths and job counters come from this node's applied state (every replica has them);
    peers' status and the worker table (which only the leader knows) are fetched over HTTP with a
    short timeout, and are null when unreachable.
    """
    node = request.app[NODE]
    session = request.app[PEER_SESSION]
    auth = {"Authorization": request.headers["Authorization"]} if "Authorization" in request.headers else {}
    own = node.status()
    peer_urls = {peer_id: node.config.public_urls.get(peer_id, url)
                 for peer_id, url in sorted(node.config.peers.items())}
    fetched = await asyncio.gather(*(_peer_json(session, url + "/v1/cluster", auth) for url in peer_urls.values()))
    by_id = {node.config.node_id: own, **dict(zip(peer_urls, fetched))}
    nodes = [by_id.get(entry["id"]) for entry in own["nodes"]]  # the order of cluster.nodes
    workers_list = None
    if node.is_leader:
        workers_list = node.workers_table()
    elif node.leader_url():
        answer = await _peer_json(session, node.leader_url() + "/v1/workers", auth)
        workers_list = answer.get("workers") if answer else None
    counters: dict[str, dict[str, int]] = {}
    for (event, queue), value in node.queue.counters.items():
        counters.setdefault(queue, {})[event] = value
    extra = {}
    if "dead" in request.query:
        # From this node's applied state, like the queue depths: a follower's page lists the DLQ too.
        dead_queue = v.queue_name(request.query["dead"])
        limit = _query_int(request, "dead_limit", default=50, low=1, high=1000)
        extra["dead"] = {"queue": dead_queue,
                         "jobs": [job_record(r) for r in node.queue.dead_jobs(dead_queue, limit, None)]}
    return respond(request, extra | {
        "cluster": own,
        "nodes": nodes,
        "node_urls": {node.config.node_id: node.config.url, **peer_urls},
        "queues": node.queue.queue_stats(),
        "settings": node.queue.queue_settings(),
        "held_back": {name: node.queue.held_back(name, _now_ms(request)) for name in node.queue.queue_stats()},
        "schedules": [schedule_record(r) for r in node.queue.schedules()],
        "counters": counters,
        "workers": workers_list,
        "time": time.time(),
    })


async def _peer_json(session: Any, url: str, headers: dict[str, str]) -> dict | None:
    import aiohttp

    try:
        async with session.get(url, headers={"Accept": "application/json", **headers},
                               timeout=aiohttp.ClientTimeout(total=1.0), allow_redirects=False) as response:
            if response.status != 200:
                return None
            return await response.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return None
