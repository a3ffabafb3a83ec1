"""Everything the sync `Client` and the `AsyncClient` share: requests, msgpack, retries, leader memory.

Theory of operation
-------------------
Each public call becomes a `Call`: method, path, body, how to read the answer, its per-request
timeout and its overall deadline. `_BaseClient._plan(call)` is a generator that decides what to do
next and never does I/O itself. It yields

    Send(request)   the twin sends it through its transport and sends back the `Response`, or the
                    `errors.TransportError` the transport raised;
    Sleep(seconds)  the twin sleeps (time.sleep or asyncio.sleep), then sends back None;

and returns the call's result, or raises its error. So the twins hold only a ten-line driver
loop each, and the retry rules are tested once, without sockets (httpx's BaseClient idea, h11's
sans-IO idea).

Retry rules, all inside the call's deadline (seconds from the first attempt):

    answer                              what happens
    2xx                                 done; that node is remembered as the leader
    307/308 + Location                  follow at once, remember the target (and X-Raftq-Leader)
    no answer (refused, reset, timeout) next node; the node is forgotten as leader
    502/503/504 (+ Retry-After)         next node
    429 (+ Retry-After)                 submit only (RetryPolicy.retry_queue_full): same node again
    any other status                    raise its error at once (4xx are the caller's to fix)

A round ends when every node has failed once since the last pause; the client then pauses for a
full-jitter backoff (uniform in [0, min(cap, base * 2**round)]), but never less than the largest
Retry-After seen in the round, and starts the next round. Failing over to a node not yet tried in
the round is immediate. When the next attempt could not start before the deadline, the call raises
the last failure's class with a message naming the nodes, the reason and the deadline.

Redirects are followed without a pause, at most `RetryPolicy.redirects_max` times per round, and
never to a node that already failed in the round (its peer has not noticed it is gone yet): that
counts as a failure of the redirecting node, so a redirect loop ends in backoff, not a spin.

The token (and the request's body) goes only to nodes the client trusts: those it was given, and
those the cluster itself lists in `GET /v1/cluster`. A redirect to any other base URL first asks
the redirecting node for that list (a `Verify` of the target, one GET); a target the list does
not name is never contacted, and counts as a failure of the node that named it. So a node that is
compromised, misconfigured, or impersonated on a plain-HTTP path cannot collect the token by
answering 307 with a Location of its choosing.

Retrying is safe for every call: submit carries an idempotency key per job (24 random URL-safe
base64 characters unless given), made once per call and sent unchanged on every attempt, so a
submit whose answer was lost is not applied twice (SPEC guarantee 5); a repeated ack with the
same lease is accepted; extend and heartbeat only restate; a repeated release is refused (409)
once the first went through, and changes nothing; GETs change nothing. One consequence to know:
a fetch whose answer was lost leaves its jobs leased until their leases run out; then they are
delivered again.
"""

from __future__ import annotations

import base64
import enum
import functools
import json
import os
import random
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Sequence
from urllib.parse import quote, urlencode, urljoin, urlsplit

import msgpack

from raftq.client import errors
from raftq.client._transports import MSGPACK, Request, Response, base_url
# Jobs per submit request and items per ack/fail/extend request (one batch is one log entry;
# bigger requests are refused with 413): the client splits larger calls into chunks of this.
from raftq.protocol import BATCH_COUNT_MAX, JOB_WAIT_S_MAX, LEADER_HEADER

#: Nodes a client may know: those given plus leaders learned from redirects. Bounded so a
#: misconfigured node that redirects to ever-new addresses cannot grow the list without end.
NODES_MAX = 16
#: A job leaves none of these states by itself; `wait` returns once the job is in one.
FINAL_STATES = ("done", "dead", "cancelled")
#: Characters of an unreadable error body quoted in the error message.
BODY_QUOTE_CHARS_MAX = 200

USER_AGENT = "raftq-client/0.1"
#: Characters `quote` never escapes (RFC 3986 unreserved).
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")


class ClientState(enum.Enum):
    """A client's life: UNOPENED until first used or entered, OPENED, CLOSED for good (httpx)."""

    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


@dataclass(frozen=True)
class RetryPolicy:
    """How a client paces its retries. The defaults suit a 3-node cluster on a LAN.

    Attributes:
        backoff_base_s: the first round's backoff cap, seconds (full jitter below it).
        backoff_cap_s: the backoff never exceeds this, seconds. An election takes 1-2 s; a
            cap well under that finds the new leader soon after it is elected (a 2 s cap cost up
            to 2 s more per failover, seen in the chaos suite's failover times), and a node
            that is in an election holds requests until it knows the leader anyway, so retries
            do not spin.
        redirects_max: redirects followed per round before the round counts as failed.
        retry_after_max_s: a larger Retry-After header is clamped to this, seconds.
        retry_queue_full: submit and submit_many wait out 429 (queue full) within the deadline,
            honouring Retry-After; False raises `errors.QueueFull` at once.
    """

    backoff_base_s: float = 0.05
    backoff_cap_s: float = 0.5
    redirects_max: int = 3
    retry_after_max_s: float = 30.0
    retry_queue_full: bool = True

    def validate(self) -> None:
        """Raises ValueError when a field is out of range."""
        if not 0 < self.backoff_base_s <= self.backoff_cap_s:
            raise ValueError("RetryPolicy: need 0 < backoff_base_s <= backoff_cap_s")
        if self.redirects_max < 1 or self.retry_after_max_s < 0:
            raise ValueError("RetryPolicy: redirects_max must be >= 1 and retry_after_max_s >= 0")


@dataclass(frozen=True)
class LeasedJob:
    """A job leased to a worker by `fetch`.

    Attributes:
        id: the job id.
        queue: the queue it came from.
        payload: the submitted value, decoded from msgpack.
        attempt: 1 on the first delivery, 2 on the second, ...
        lease_token: the fencing token that ack, fail and extend must present (`lease` on the wire).
        lease_expires_at: when the lease runs out unless extended, on the cluster's clock (unix
            seconds; close to real time, but no machine's wall clock need agree with it).
        lease_expires_in_s: how long the lease had left when the server answered (None from a
            server before it was reported): what to plan extends with, whatever the clocks say.
        priority: 0-9, 9 runs first.
        lease_s: the job's own lease length (set on submit): a worker extends the lease by this
            much each time (None from a server before it was reported).
    """

    id: str
    queue: str
    payload: Any
    attempt: int
    lease_token: int
    lease_expires_at: float
    priority: int = 0
    lease_expires_in_s: float | None = None
    lease_s: float | None = None


# ---------------------------------------------------------------------------- plan steps


@dataclass(frozen=True)
class Call:
    """One public call, before any I/O. `parse(body, node)` turns a 2xx body into the result."""

    method: str
    path: str
    parse: Callable[[Any, str], Any]
    timeout_s: float
    deadline_s: float
    body: Any = None
    has_body: bool = False
    retry_queue_full: bool = False
    #: Answered by whichever node is asked (cluster status): the answer says nothing of the leader.
    any_node: bool = False


@dataclass(frozen=True)
class Send:
    """Plan step: send this request; reply with the Response or the TransportError raised."""

    request: Request


@dataclass(frozen=True)
class Sleep:
    """Plan step: wait this many seconds, then reply None."""

    seconds: float


Step = Send | Sleep
Reply = Response | errors.TransportError | None
Plan = Generator[Step, Reply, Any]


@dataclass(frozen=True)
class _Next:
    url: str
    sleep_s: float


@dataclass(frozen=True)
class _Verify:
    """Before following `target` (not yet trusted), ask `node` which nodes the cluster has."""

    node: str
    target: str
    leader: str | None


@dataclass
class _Attempts:
    """Bookkeeping of one call across its attempts."""

    deadline_at: float
    count: int = 0
    rounds: int = 0
    redirects: int = 0
    retry_after_s: float = 0.0
    failed_round: set[str] = field(default_factory=set)
    failures: dict[str, errors.RaftqError] = field(default_factory=dict)  # node -> its last failure, in first-failure order
    last_error: errors.RaftqError | None = None
    last_server_error: errors.RaftqError | None = None

    def fail(self, node: str, error: errors.RaftqError, *, cut_short: bool = False) -> None:
        """Notes a failed attempt at `node`. `cut_short`: it timed out with less than the call's
        timeout, the rest of the deadline; that says nothing new about a node that failed before
        in this call (a TLS refusal, a refused connection), so its earlier failure stands."""
        self.failed_round.add(node)
        if cut_short and node in self.failures:
            error = self.failures[node]
        self.failures[node] = error
        self.last_error = error
        if not isinstance(error, errors.TransportError):
            self.last_server_error = error
        self.retry_after_s = max(self.retry_after_s, error.retry_after or 0.0)

    @property
    def reasons(self) -> dict[str, str]:
        """node -> the message of its last failure, in first-failure order."""
        return {node: error.message for node, error in self.failures.items()}

    def new_round(self) -> None:
        self.rounds += 1
        self.redirects = 0
        self.retry_after_s = 0.0
        self.failed_round.clear()


# ---------------------------------------------------------------------------- the shared client


class _BaseClient:
    """Pure logic of both twins; see the module docstring."""

    def __init__(self, nodes: str | Sequence[str], *, token: str | None, timeout: float, deadline: float,
                 retry: RetryPolicy | None, clock: Callable[[], float], rng: random.Random | None) -> None:
        if not timeout > 0 or not deadline > 0:
            raise ValueError(f"timeout and deadline must be positive seconds, got {timeout!r} and {deadline!r}")
        self._nodes = parse_nodes(nodes)
        #: Base URLs that may receive the token: those given, and those the cluster lists.
        self._trusted = set(self._nodes)
        self._retry = retry or RetryPolicy()
        self._retry.validate()
        self.timeout = float(timeout)
        self.deadline = float(deadline)
        self._clock = clock
        self._rng = rng or random.Random()
        self._headers = {"Accept": MSGPACK, "User-Agent": USER_AGENT}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._preferred = self._nodes[0]  # first node each call tries: the leader when known
        self._leader: str | None = None
        self._leader_url: str | None = None
        self._nodes_lock = threading.Lock()  # the sync Client is shared by a worker's threads
        self._state = ClientState.UNOPENED

    # ------------------------------------------------------------------ what callers may read

    @property
    def nodes(self) -> tuple[str, ...]:
        """Base URLs this client knows: those given, then leaders learned from redirects."""
        return tuple(self._nodes)

    @property
    def leader(self) -> str | None:
        """Node id of the leader, from the last redirect's X-Raftq-Leader header (None: unknown)."""
        return self._leader

    @property
    def leader_url(self) -> str | None:
        """Base URL of the node last seen leading (a redirect target or a node that served a write)."""
        return self._leader_url

    @property
    def state(self) -> ClientState:
        return self._state

    def _open(self) -> None:
        if self._state is ClientState.CLOSED:
            raise errors.ClientClosed("this raftq client is closed; make a new one")
        self._state = ClientState.OPENED

    # ------------------------------------------------------------------ the plan

    def _plan(self, call: Call) -> Plan:
        """Yields Send/Sleep steps and returns the call's result; see the module docstring.

        Raises:
            errors.RaftqError: the answer's error, or the last failure once the deadline is spent.
        """
        content = encode(call.body) if call.has_body else b""
        # Every write says its type, even with no body: a node refuses untyped writes (a browser
        # can send those cross-site without asking).
        headers = dict(self._headers, **({"Content-Type": MSGPACK} if call.method != "GET" else {}))
        attempts = _Attempts(deadline_at=self._clock() + call.deadline_s)
        url = self._preferred + call.path
        while True:
            remaining_s = attempts.deadline_at - self._clock()
            if remaining_s <= 0:
                raise self._deadline_error(call, attempts) from attempts.last_error
            attempts.count += 1
            request = Request(call.method, url, headers, content, min(call.timeout_s, remaining_s))
            reply = yield Send(request)
            step = self._judge(call, attempts, request, reply)
            if isinstance(step, _Verify):
                listing = Request("GET", step.node + "/v1/cluster", self._headers, b"",
                                  min(call.timeout_s, max(attempts.deadline_at - self._clock(), 0.001)))
                step = self._after_verify(call, attempts, step, (yield Send(listing)))
            if isinstance(step, _Next):
                if step.sleep_s > 0:
                    yield Sleep(step.sleep_s)
                url = step.url
                continue
            return step

    def _judge(self, call: Call, attempts: _Attempts, request: Request, reply: Reply) -> Any:
        """The next URL (a `_Next`), a target to check first (`_Verify`) or the result; raises a
        non-retryable error."""
        node = base_url(request.url)
        if isinstance(reply, errors.TransportError):
            cut_short = isinstance(reply, errors.Timeout) and request.timeout_s < call.timeout_s
            return self._after_failure(call, attempts, node, reply, rotate=True, cut_short=cut_short)
        assert isinstance(reply, Response), f"a plan step got {reply!r}"
        if reply.status in (307, 308):
            return self._after_redirect(call, attempts, request, reply)
        if 200 <= reply.status < 300:
            if not call.any_node:
                self._remember_leader(node)
            return self._parse(call, node, reply)
        error = self._error(node, reply)
        if isinstance(error, errors.Unavailable):
            return self._after_failure(call, attempts, node, error, rotate=True)
        if isinstance(error, errors.QueueFull) and call.retry_queue_full:
            return self._after_failure(call, attempts, node, error, rotate=False)
        raise error

    def _after_redirect(self, call: Call, attempts: _Attempts, request: Request,
                        reply: Response) -> _Next | _Verify:
        node = base_url(request.url)
        location = reply.headers.get("location")
        leader = reply.headers.get(LEADER_HEADER.lower()) or None
        if not location:
            error = errors.NoLeader(f"{node} answered {reply.status} without a Location", status=reply.status,
                                    node=node)
            return self._after_failure(call, attempts, node, error, rotate=True)
        target = urljoin(request.url, location)
        target_node = base_url(target)
        if target_node in attempts.failed_round or attempts.redirects >= self._retry.redirects_max:
            why = (f"{node} says {target_node} leads, but {target_node} just failed"
                   if target_node in attempts.failed_round else
                   f"redirected {attempts.redirects + 1} times in a row, last {node} -> {target_node}")
            error = errors.NoLeader(why, status=reply.status, node=node)
            return self._after_failure(call, attempts, node, error, rotate=True)
        attempts.redirects += 1
        if target_node not in self._trusted:
            return _Verify(node, target, leader)
        self._remember_leader(self._learn_node(target_node), leader)
        return _Next(target, 0.0)

    def _after_verify(self, call: Call, attempts: _Attempts, verify: _Verify, reply: Reply) -> _Next:
        """Follows verify.target if the cluster's own list names it; else fails the redirecting node."""
        target_node = base_url(verify.target)
        if isinstance(reply, Response) and reply.status == 200:
            try:
                listed = cluster_urls(decode(reply, verify.node))
            except errors.DecodeError:
                listed = set()
            with self._nodes_lock:
                for url in sorted(listed):
                    if len(self._trusted) < NODES_MAX:
                        self._trusted.add(url)
        if target_node in self._trusted:
            self._remember_leader(self._learn_node(target_node), verify.leader)
            return _Next(verify.target, 0.0)
        error = errors.NoLeader(f"{verify.node} redirected to {target_node}, which neither the given nodes nor "
                                "the cluster's own list name: not sending the request (or its token) there",
                                status=307, node=verify.node)
        return self._after_failure(call, attempts, verify.node, error, rotate=True)

    def _after_failure(self, call: Call, attempts: _Attempts, node: str, error: errors.RaftqError, *,
                       rotate: bool, cut_short: bool = False) -> _Next:
        """Where and when to try next after a retryable failure at `node`."""
        attempts.fail(node, error, cut_short=cut_short)
        if rotate:
            self._forget_leader(node)
        following = self._next_node(node, attempts.failed_round) if rotate else None
        sleep_s = 0.0
        if following is None:  # the round is over: every node failed once (or we stay on this one)
            sleep_s = max(self._backoff_s(attempts.rounds), min(attempts.retry_after_s, self._retry.retry_after_max_s))
            attempts.new_round()
            following = self._next_node(node, set()) if rotate else node
        if self._clock() + sleep_s >= attempts.deadline_at:
            raise self._deadline_error(call, attempts) from error
        return _Next(following + call.path, sleep_s)

    def _backoff_s(self, rounds: int) -> float:
        ceiling_s = min(self._retry.backoff_cap_s, self._retry.backoff_base_s * 2 ** min(rounds, 32))
        return self._rng.uniform(0.0, ceiling_s)

    # ------------------------------------------------------------------ nodes and the leader

    def _next_node(self, node: str, skip: set[str]) -> str | None:
        """The first node after `node` in order (wrapping) that is not in `skip`."""
        nodes = self._nodes
        start = nodes.index(node) + 1 if node in nodes else 0
        for offset in range(len(nodes)):
            candidate = nodes[(start + offset) % len(nodes)]
            if candidate not in skip:
                return candidate
        return None

    def _learn_node(self, node: str) -> str:
        with self._nodes_lock:
            if node not in self._nodes and len(self._nodes) < NODES_MAX:
                self._nodes.append(node)
        return node

    def _remember_leader(self, node: str, leader: str | None = None) -> None:
        if leader is not None or node != self._leader_url:
            self._leader = leader
        self._leader_url = node
        self._preferred = node

    def _forget_leader(self, node: str) -> None:
        if self._leader_url == node:
            self._leader_url = None
            self._leader = None
        if self._preferred == node:
            self._preferred = self._next_node(node, {node}) or node

    # ------------------------------------------------------------------ answers

    def _parse(self, call: Call, node: str, reply: Response) -> Any:
        body = decode(reply, node)
        try:
            return call.parse(body, node)
        except errors.RaftqError:
            raise
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise errors.DecodeError(f"{node} answered {call.method} {call.path} with an unexpected body: "
                                     f"{type(exc).__name__}: {exc}", status=reply.status, node=node) from None

    def _error(self, node: str, reply: Response) -> errors.RaftqError:
        code, message = None, f"HTTP {reply.status}"
        try:
            body = decode(reply, node)
        except errors.DecodeError:
            body = reply.content[:BODY_QUOTE_CHARS_MAX].decode(errors="replace")
        detail = body.get("error") if isinstance(body, dict) else None
        if isinstance(detail, dict):
            code = detail.get("code") if isinstance(detail.get("code"), str) else None
            message = str(detail.get("message") or code or message)
        elif body:
            message = f"{message}: {str(body)[:BODY_QUOTE_CHARS_MAX]}"
        return errors.error_for_status(reply.status, code, message, retry_after=retry_after_s(reply), node=node)

    def _deadline_error(self, call: Call, attempts: _Attempts) -> errors.RaftqError:
        """The error once the deadline is spent: the class of the last server answer (a node that
        answers 503 says more than one that is down), else of the last transport failure."""
        last = attempts.last_server_error or attempts.last_error or errors.Timeout("no answer before the deadline")
        spent = f"deadline {call.deadline_s:.1f} s, {attempts.count} attempts"
        if isinstance(last, errors.TransportError):
            if len(set(attempts.reasons.values())) <= 1:
                text = f"no raftq node answered at {', '.join(attempts.reasons)}: {last.message} ({spent})"
            else:
                why = "; ".join(f"{node}: {reason}" for node, reason in attempts.reasons.items())
                text = f"no raftq node answered: {why} ({spent})"
        else:
            others = "".join(f"; {node}: {reason}" for node, reason in attempts.reasons.items() if node != last.node)
            text = (f"{call.method} {call.path}: the cluster could not serve it before the deadline; {last.node} "
                    f"answered {last.status} {last.code}: {last.message}{others} ({spent})")
        return type(last)(text, code=last.code, status=last.status, retry_after=last.retry_after, node=last.node)

    # ------------------------------------------------------------------ calls

    def _call(self, method: str, path: str, parse: Callable[[Any, str], Any], *, body: Any = None,
              has_body: bool = False, wait_s: float = 0.0, retry_queue_full: bool = False,
              any_node: bool = False) -> Call:
        return Call(method, path, parse, timeout_s=self.timeout + wait_s, deadline_s=self.deadline + wait_s,
                    body=body, has_body=has_body, retry_queue_full=retry_queue_full, any_node=any_node)

    def _submit_calls(self, queue: str, payloads: Sequence[Any], keys: Sequence[str | None],
                      options: dict[str, Any]) -> list[Call]:
        """One call per chunk of at most BATCH_COUNT_MAX jobs; each job carries an idempotency key."""
        fresh = iter(fresh_keys(sum(key is None for key in keys)))
        jobs = [{"payload": payload, "idempotency_key": next(fresh) if key is None else key, **options}
                for payload, key in zip(payloads, keys, strict=True)]
        path = f"/v1/queues/{segment(queue)}/jobs"
        return [self._call("POST", path, functools.partial(_parse_ids, count=len(chunk)), body={"jobs": chunk},
                           has_body=True, retry_queue_full=self._retry.retry_queue_full)
                for chunk in chunks(jobs)]

    def _fetch_call(self, worker: str, queues: Sequence[str], max_jobs: int, wait_s: float) -> Call:
        queue_list = [queues] if isinstance(queues, str) else list(queues)
        body = {"worker": worker, "queues": queue_list, "max_jobs": max_jobs, "wait_s": wait_s}
        return self._call("POST", "/v1/lease", _parse_jobs, body=body, has_body=True, wait_s=max(0.0, wait_s))

    def _batch_calls(self, path: str, worker: str, key: str, items: list[dict], *, extend: bool = False) -> list[Call]:
        """Ack, fail and extend: one call per chunk; each answer is one outcome per item."""
        return [self._call("POST", path, functools.partial(_parse_outcomes, count=len(chunk), extend=extend),
                           body={"worker": worker, key: chunk}, has_body=True)
                for chunk in chunks(items)]

    def _ack_calls(self, worker: str, items: Sequence[tuple[str, int, Any]]) -> list[Call]:
        acks = [{"id": job_id, "lease": lease, **({"result": result} if result is not None else {})}
                for job_id, lease, result in items]
        return self._batch_calls("/v1/ack", worker, "acks", acks)

    def _fail_calls(self, worker: str, items: Sequence[tuple[str, int, str, bool, float | None]]) -> list[Call]:
        fails = [{"id": job_id, "lease": lease, "error": error, "retry": retry,
                  **({"delay_s": delay_s} if delay_s is not None else {})}
                 for job_id, lease, error, retry, delay_s in items]
        return self._batch_calls("/v1/fail", worker, "fails", fails)

    def _extend_calls(self, worker: str, items: Sequence[tuple[str, int, float]]) -> list[Call]:
        leases = [{"id": job_id, "lease": lease, "lease_s": lease_s} for job_id, lease, lease_s in items]
        return self._batch_calls("/v1/extend", worker, "leases", leases, extend=True)

    def _release_calls(self, worker: str, items: Sequence[tuple[str, int]]) -> list[Call]:
        leases = [{"id": job_id, "lease": lease} for job_id, lease in items]
        return self._batch_calls("/v1/release", worker, "leases", leases)

    def _heartbeat_call(self, worker: str, job_ids: Sequence[str]) -> Call:
        return self._call("POST", f"/v1/workers/{segment(worker)}/heartbeat", _field("lost", list),
                          body={"jobs": list(job_ids)}, has_body=True)

    def _get_call(self, job_id: str) -> Call:
        return self._call("GET", f"/v1/jobs/{segment(job_id)}", _mapping)

    def _wait_plan(self, job_id: str, timeout: float | None) -> Generator[Call, dict | None, dict]:
        """The long polls of `wait`: yields a Call, is sent its record, returns the last record.

        One `GET /v1/jobs/{id}?wait_s=N` per JOB_WAIT_S_MAX (the server's bound) until the job is in
        a final state or `timeout` has passed; each poll is a call of its own (own retries, own
        deadline plus its wait), so a failover in the middle costs one poll, not the wait.
        """
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be None or non-negative seconds, got {timeout!r}")
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            left_s = JOB_WAIT_S_MAX if deadline is None else max(0.0, deadline - self._clock())
            wait_s = round(min(JOB_WAIT_S_MAX, left_s), 3)
            record = yield self._call("GET", f"/v1/jobs/{segment(job_id)}?wait_s={wait_s:g}", _mapping,
                                      wait_s=wait_s)
            if record.get("state") in FINAL_STATES or (deadline is not None and self._clock() >= deadline):
                return record

    def _cancel_call(self, job_id: str) -> Call:
        return self._call("POST", f"/v1/jobs/{segment(job_id)}/cancel", _nothing)

    def _queues_call(self, *, detail: bool = False) -> Call:
        return self._call("GET", "/v1/queues", _mapping if detail else _field("queues", dict))

    def _configure_queue_call(self, queue: str, settings: dict[str, Any]) -> Call:
        return self._call("PUT", f"/v1/queues/{segment(queue)}", _mapping, body=settings, has_body=True)

    def _delete_queue_call(self, queue: str, force: bool) -> Call:
        return self._call("DELETE", f"/v1/queues/{segment(queue)}?force={'true' if force else 'false'}", _mapping)

    def _schedule_call(self, method: str, name: str, action: str = "", body: Any = None) -> Call:
        path = f"/v1/schedules/{segment(name)}" + (f"/{action}" if action else "")
        return self._call(method, path, _mapping, body=body, has_body=method in ("PUT", "POST"))

    def _schedules_call(self) -> Call:
        return self._call("GET", "/v1/schedules", _field("schedules", list))

    def _dead_call(self, queue: str, limit: int, after: str | None) -> Call:
        query = urlencode({"limit": limit, **({"after": after} if after is not None else {})})
        return self._call("GET", f"/v1/queues/{segment(queue)}/dead?{query}", _field("jobs", list))

    def _redrive_call(self, queue: str, ids: Sequence[str] | None) -> Call:
        body = {"ids": list(ids)} if ids is not None else {}
        return self._call("POST", f"/v1/queues/{segment(queue)}/dead/redrive", _field("redriven", int), body=body,
                          has_body=True)

    def _purge_dead_call(self, queue: str) -> Call:
        return self._call("POST", f"/v1/queues/{segment(queue)}/dead/purge", _field("purged", int))

    def _cluster_call(self) -> Call:
        return self._call("GET", "/v1/cluster", _mapping, any_node=True)

    def _add_member_call(self, node_id: str, url: str) -> Call:
        return self._call("POST", "/v1/cluster/members", _mapping, body={"id": node_id, "url": url}, has_body=True)

    def _remove_member_call(self, node_id: str) -> Call:
        return self._call("DELETE", f"/v1/cluster/members/{segment(node_id)}", _mapping)

    def _transfer_call(self, to: str | None) -> Call:
        return self._call("POST", "/v1/cluster/transfer", _mapping, body={} if to is None else {"to": to},
                          has_body=True)

    def _workers_call(self) -> Call:
        return self._call("GET", "/v1/workers", _field("workers", list))


# ---------------------------------------------------------------------------- pure helpers


def job_options(*, priority: int | None, delay_s: float | None, max_attempts: int | None, lease_s: float | None,
                backoff_base_s: float | None = None, backoff_cap_s: float | None = None, key: str | None = None,
                group: str | None = None) -> dict[str, Any]:
    """The per-job fields of a submit that were given (None: the server's default)."""
    given = {"priority": priority, "delay_s": delay_s, "max_attempts": max_attempts, "lease_s": lease_s,
             "backoff_base_s": backoff_base_s, "backoff_cap_s": backoff_cap_s, "key": key, "group": group}
    return {key: value for key, value in given.items() if value is not None}


def queue_settings(*, max_depth: int | None, rate_per_s: float | None, burst: int | None,
                   max_running_per_key: int | None, fifo: bool) -> dict[str, Any]:
    """The body of PUT /v1/queues/{queue}: the whole settings (left out = unlimited / off)."""
    given = {"max_depth": max_depth, "rate_per_s": rate_per_s, "burst": burst,
             "max_running_per_key": max_running_per_key}
    return {key: value for key, value in given.items() if value is not None} | ({"fifo": True} if fifo else {})


def cluster_urls(status: Any) -> set[str]:
    """Base URLs of every node a `GET /v1/cluster` answer names (its `nodes` and `leader_url`)."""
    urls = set()
    if isinstance(status, dict):
        entries = status.get("nodes") if isinstance(status.get("nodes"), list) else []
        for value in [status.get("leader_url"), *(e.get("url") for e in entries if isinstance(e, dict))]:
            if isinstance(value, str) and value.startswith(("http://", "https://")):
                urls.add(base_url(value.rstrip("/")))
    return urls


def schedule_spec(queue: str, payload: Any, *, cron: str | None, every_s: float | None, timezone: str | None,
                  overlap: str | None, catch_up: str | None, priority: int | None, max_attempts: int | None,
                  lease_s: float | None) -> dict[str, Any]:
    """The body of PUT /v1/schedules/{name} (None: the server's default)."""
    given = {"cron": cron, "every_s": every_s, "timezone": timezone, "overlap": overlap, "catch_up": catch_up,
             "priority": priority, "max_attempts": max_attempts, "lease_s": lease_s}
    return {"queue": queue, "payload": payload, **{key: value for key, value in given.items() if value is not None}}


def parse_nodes(nodes: str | Sequence[str]) -> list[str]:
    """Base URLs from "http://a:1,http://b:2" or a sequence; trailing slashes dropped, duplicates too.

    Raises:
        ValueError: no node, or one that is not an http(s) URL with a host.
    """
    given = nodes.split(",") if isinstance(nodes, str) else list(nodes)
    result: list[str] = []
    for raw in given:
        text = str(raw).strip().rstrip("/")
        if not text:
            continue
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
            raise ValueError(f"node {raw!r} must look like http://127.0.0.1:7001")
        if text not in result:
            result.append(text)
    if not result:
        raise ValueError("give at least one node URL, like http://127.0.0.1:7001")
    if len(result) > NODES_MAX:
        raise ValueError(f"at most {NODES_MAX} nodes, got {len(result)}")
    return result


def segment(value: str) -> str:
    """One URL path segment, escaped (job ids are free text)."""
    value = str(value)
    if _UNRESERVED.fullmatch(value):  # nothing to escape: most queue names and every server-made id
        return value
    return quote(value, safe="")


#: Random bytes behind one idempotency key: 144 bits (a uuid4 has 122), which URL-safe base64 writes
#: in exactly KEY_CHARS characters. Every replica keeps each key for the idempotency window (1 h),
#: so its length is memory: 24 characters make an 80-byte str object, 32 hex digits made a 96-byte one.
KEY_RANDOM_BYTES = 18
KEY_CHARS = KEY_RANDOM_BYTES * 4 // 3


def fresh_keys(count: int) -> list[str]:
    """`count` idempotency keys of KEY_CHARS random URL-safe base64 characters each, from one
    system call: a uuid4 per job cost a 100-job submit about 0.2 ms of the client's time, as much
    as the node's checks of the whole batch."""
    digits = base64.urlsafe_b64encode(os.urandom(KEY_RANDOM_BYTES * count)).decode("ascii")
    return [digits[start:start + KEY_CHARS] for start in range(0, KEY_CHARS * count, KEY_CHARS)]


def chunks(items: list, size: int = BATCH_COUNT_MAX) -> list[list]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def encode(body: Any) -> bytes:
    """msgpack of a request body.

    Raises:
        TypeError: a payload or result holds a value msgpack cannot carry (bug in the caller).
    """
    try:
        return msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"raftq payloads and results must be msgpack values (dict, list, str, bytes, int, "
                        f"float, bool, None): {exc}") from None


def decode(reply: Response, node: str) -> Any:
    """The body of an answer: msgpack or JSON by Content-Type; None when empty.

    Raises:
        errors.DecodeError: the body does not decode, or its type is neither.
    """
    if not reply.content:
        return None
    kind = reply.headers.get("content-type", "")
    try:
        if "msgpack" in kind:
            return msgpack.unpackb(reply.content, raw=False, strict_map_key=False)
        if "json" in kind:
            return json.loads(reply.content)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise errors.DecodeError(f"{node} sent an undecodable {kind} body: {exc}", status=reply.status,
                                 node=node) from None
    raise errors.DecodeError(f"{node} answered {reply.status} with a {kind or 'untyped'} body, not msgpack",
                             status=reply.status, node=node)


def retry_after_s(reply: Response) -> float | None:
    """The Retry-After header in seconds; None when absent or an HTTP date (raftq sends seconds)."""
    raw = reply.headers.get("retry-after")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def _parse_ids(body: Any, node: str, *, count: int) -> list[str]:
    ids = list(body["ids"])
    if len(ids) != count:
        raise ValueError(f"{len(ids)} ids for {count} jobs")
    return ids


def _parse_jobs(body: Any, node: str) -> list[LeasedJob]:
    return [LeasedJob(id=job["id"], queue=job["queue"], payload=job.get("payload"), attempt=int(job["attempt"]),
                      lease_token=int(job["lease"]), lease_expires_at=float(job["lease_expires_at"]),
                      priority=int(job.get("priority", 0)),
                      lease_expires_in_s=None if job.get("lease_expires_in_s") is None
                      else float(job["lease_expires_in_s"]),
                      lease_s=None if job.get("lease_s") is None else float(job["lease_s"]))
            for job in body["jobs"]]


def _parse_outcomes(body: Any, node: str, *, count: int, extend: bool) -> list[Any]:
    """One outcome per item: None (ok), the new expiry (extend), or the item's error."""
    results = list(body["results"])
    if len(results) != count:
        raise ValueError(f"{len(results)} outcomes for {count} items")
    return [_outcome(item, node, extend) for item in results]


def _outcome(item: Any, node: str, extend: bool) -> Any:
    if isinstance(item, dict) and isinstance(item.get("error"), dict):
        detail = item["error"]
        return errors.error_for_item(detail.get("code"), str(detail.get("message") or detail.get("code")), node=node)
    if extend:
        return float(item["lease_expires_at"])
    if item == "ok" or (isinstance(item, dict) and item.get("ok") is True):
        return None
    raise ValueError(f"unknown outcome {item!r}")


def _field(key: str, kind: type) -> Callable[[Any, str], Any]:
    def parse(body: Any, node: str) -> Any:
        value = body[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise TypeError(f"field {key!r} is {type(value).__name__}, not {kind.__name__}")
        return value

    return parse


def _mapping(body: Any, node: str) -> dict:
    if not isinstance(body, dict):
        raise TypeError(f"expected a map, got {type(body).__name__}")
    return body


def _nothing(body: Any, node: str) -> None:
    return None


def result_of(record: dict, timeout: float | None) -> Any:
    """A finished job's result from its record, as `JobHandle.result()` returns it.

    Raises:
        errors.JobFailed: the job is dead (the message has its attempts and last error) or cancelled.
        errors.JobPending: it is not final yet (the wait ran out).
    """
    state, job_id = record.get("state"), record.get("id")
    if state == "done":
        return record.get("result")
    if state == "dead":
        error = str(record.get("last_error") or "no error text")
        raise errors.JobFailed(f"job {job_id} is dead after {record.get('attempts')} attempt(s); last error: {error}",
                               code="dead", record=record)
    if state == "cancelled":
        raise errors.JobFailed(f"job {job_id} was cancelled", code="cancelled", record=record)
    waited = "" if timeout is None else f" after {timeout:g} s"
    raise errors.JobPending(f"job {job_id} is still {state}{waited}")


def single(outcomes: list[Any]) -> Any:
    """The one outcome of a single-item ack/fail/extend; raises it when it is an error."""
    (outcome,) = outcomes
    if isinstance(outcome, errors.RaftqError):
        raise outcome
    return outcome
