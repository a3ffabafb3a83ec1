"""The sync `Client`: the shared plan (`client._base`) driven over a blocking transport.

Thread-safe: a worker's fetcher, reporter and heartbeat threads share one client.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Sequence

from raftq.client import errors
from raftq.client._base import (FINAL_STATES, Call, ClientState, LeasedJob, RetryPolicy, Send, _BaseClient, job_options,
                          queue_settings, result_of, schedule_spec, single)
from raftq.client._transports import BaseTransport, HTTPTransport, tls_context


class Client(_BaseClient):
    """A raftq client: submit jobs, lease them, report them, inspect queues.

    Follows the leader (307 redirects), fails over between nodes on connection errors, timeouts
    and 503, and retries with full-jitter backoff (honouring Retry-After) within `deadline`.

    Example:
        with Client(["http://127.0.0.1:7001", "http://127.0.0.1:7002", "http://127.0.0.1:7003"]) as client:
            job_id = client.submit("emails", {"to": "a@example.com"})
    """

    def __init__(self, nodes: str | Sequence[str], *, token: str | None = None, timeout: float = 10.0,
                 deadline: float = 30.0, ca_file: str | None = None, verify: bool = True,
                 transport: BaseTransport | None = None, retry: RetryPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], Any] = time.sleep,
                 rng: random.Random | None = None) -> None:
        """Makes a client; nothing is connected until the first call.

        Args:
            nodes: base URLs of the nodes, a sequence or one comma-separated string
                ("http://127.0.0.1:7001"); any subset works, redirects find the leader.
            token: bearer token, sent as `Authorization: Bearer <token>`.
            timeout: seconds to wait for one answer (fetch adds its `wait_s`).
            deadline: seconds one call may take across all its retries and nodes (fetch adds `wait_s`).
            ca_file: for https:// nodes, the PEM file of the CA that signed their certificates
                (default: RAFTQ_CA from the environment, else the system's CAs).
            verify: False skips certificate checks (encrypted, but anyone may answer; tests only).
            transport: what sends the requests (default `HTTPTransport()`; tests: `MockTransport`).
            retry: backoff and redirect limits (default `RetryPolicy()`).
            clock, sleep, rng: injected in tests so that backoff needs no real waiting.

        Raises:
            ValueError: no node, a node that is not an http(s) URL, or a non-positive timeout/deadline.
        """
        super().__init__(nodes, token=token, timeout=timeout, deadline=deadline, retry=retry, clock=clock, rng=rng)
        self._transport = transport if transport is not None else HTTPTransport(
            ssl_context=tls_context(ca_file, verify=verify) if ca_file or not verify else None)
        self._sleep = sleep

    def _send(self, call: Call) -> Any:
        """Drives the plan: sends what it says, sleeps when it says, returns its result."""
        self._open()
        plan = self._plan(call)
        reply = None
        while True:
            try:
                step = plan.send(reply)
            except StopIteration as done:
                return done.value
            if isinstance(step, Send):
                try:
                    reply = self._transport.handle_request(step.request)
                except errors.TransportError as exc:
                    reply = exc
            else:
                self._sleep(step.seconds)
                reply = None

    # ------------------------------------------------------------------ life cycle

    def close(self) -> None:
        """Closes the connections; the client cannot be used again (a second close does nothing)."""
        if self._state is not ClientState.CLOSED:
            self._state = ClientState.CLOSED
            self._transport.close()

    def __enter__(self) -> "Client":
        self._open()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ producers

    def submit(self, queue: str, payload: Any, *, priority: int | None = None, delay_s: float | None = None,
               max_attempts: int | None = None, lease_s: float | None = None, idempotency_key: str | None = None,
               backoff_base_s: float | None = None, backoff_cap_s: float | None = None, key: str | None = None,
               group: str | None = None) -> str:
        """Submits one job; returns once it is durable on a majority of nodes.

        A queue that is full (429) is waited out with backoff, honouring Retry-After, until the
        deadline (`RetryPolicy.retry_queue_full=False` raises at once instead).

        Args:
            queue: the queue name, `[A-Za-z0-9_.:-]{1,128}`.
            payload: any msgpack value (dict, list, str, bytes, int, float, bool, None).
            priority: 0-9, 9 runs first (None: the server's default, 0).
            delay_s: seconds before the job becomes ready (None: at once).
            max_attempts: deliveries before it is dead-lettered (None: the server's default, 5).
            lease_s: how long a worker holds it before it is redelivered (None: 30 s).
            idempotency_key: a repeat with the same key within the window returns the first job's
                id and creates nothing. None: a fresh random key (`fresh_keys`), reused by this call's retries.
            backoff_base_s, backoff_cap_s: the job's retry backoff (None: 1 s and 300 s).
            key: counts against the queue's max_running_per_key (a tenant, an API account).
            group: in a fifo queue, the jobs of a group run one at a time in submit order.

        Returns:
            The job id (the first job's id when the key was seen before).

        Raises:
            errors.InvalidRequest: a field out of range or a bad queue name.
            errors.PayloadTooLarge: the payload exceeds the node's limit.
            errors.QueueFull: the queue stayed full until the deadline.
            errors.TransportError, errors.ServerError: no node could take it before the deadline.
            TypeError: the payload is not a msgpack value.
        """
        options = job_options(priority=priority, delay_s=delay_s, max_attempts=max_attempts, lease_s=lease_s,
                              backoff_base_s=backoff_base_s, backoff_cap_s=backoff_cap_s, key=key, group=group)
        (call,) = self._submit_calls(queue, [payload], [idempotency_key], options)
        return self._send(call)[0]

    def submit_many(self, queue: str, payloads: Sequence[Any], *, priority: int | None = None,
                    delay_s: float | None = None, max_attempts: int | None = None, lease_s: float | None = None,
                    idempotency_keys: Sequence[str | None] | None = None, backoff_base_s: float | None = None,
                    backoff_cap_s: float | None = None, key: str | None = None,
                    group: str | None = None) -> list[str]:
        """Submits many jobs, one request per chunk of up to 1000 (each chunk is one log entry).

        Every job gets its own idempotency key (a fresh random one unless given), reused
        when a chunk is retried. Chunks go one after another, each with its own deadline; when one
        fails, the earlier chunks are already submitted.

        Args:
            queue: the queue name.
            payloads: the jobs' payloads, in order.
            priority, delay_s, max_attempts, lease_s, backoff_base_s, backoff_cap_s: as for
                `submit`, the same for every job.
            idempotency_keys: one key (or None) per payload.

        Returns:
            The job ids, in the order of `payloads`.

        Raises:
            As `submit`; ValueError when idempotency_keys is not one per payload.
        """
        options = job_options(priority=priority, delay_s=delay_s, max_attempts=max_attempts, lease_s=lease_s,
                              backoff_base_s=backoff_base_s, backoff_cap_s=backoff_cap_s, key=key, group=group)
        keys = list(idempotency_keys) if idempotency_keys is not None else [None] * len(payloads)
        if len(keys) != len(payloads):
            raise ValueError(f"{len(keys)} idempotency keys for {len(payloads)} payloads")
        return [job_id for call in self._submit_calls(queue, payloads, keys, options) for job_id in self._send(call)]

    # ------------------------------------------------------------------ workers

    def fetch(self, worker: str, queues: Sequence[str], *, max_jobs: int = 1, wait_s: float = 0.0) -> list[LeasedJob]:
        """Leases up to `max_jobs` ready jobs from `queues` (highest priority first, then FIFO).

        Args:
            worker: this worker's id (`[A-Za-z0-9_.:@-]{1,200}`); its heartbeats keep the leases alive.
            queues: the queues to take from, round-robin (one name is accepted too).
            max_jobs: at most this many jobs (take no more than you have free slots for).
            wait_s: long poll: wait up to this many seconds (at most 20) for a job to become ready;
                added to the per-request timeout and to the deadline.

        Returns:
            The leased jobs; an empty list when nothing came within wait_s.

        Raises:
            errors.InvalidRequest: a bad worker id, queue name or max_jobs.
            errors.TransportError, errors.ServerError: no node could serve it before the deadline.
        """
        return self._send(self._fetch_call(worker, queues, max_jobs, wait_s))

    def ack(self, worker: str, job_id: str, lease_token: int, result: Any = None) -> None:
        """Marks a leased job done. Repeating an accepted ack with the same lease token is fine.

        Args:
            worker: the worker holding the lease.
            job_id: the job.
            lease_token: the token `fetch` gave (LeasedJob.lease_token).
            result: an optional msgpack value kept with the job (at most 64 KiB).

        Raises:
            errors.LeaseError: the lease expired or is not this worker's (code lease_expired /
                lease_mismatch); the job is someone else's now.
            errors.JobNotFound: no such job.
            errors.TransportError, errors.ServerError: no node could serve it before the deadline.
        """
        single(self._send(self._ack_calls(worker, [(job_id, lease_token, result)])[0]))

    def ack_many(self, worker: str, items: Sequence[tuple[str, int, Any]]) -> list[None | errors.RaftqError]:
        """Acks many jobs; one refused item does not fail the others.

        Args:
            worker: the worker holding the leases.
            items: (job_id, lease_token, result or None) per job.

        Returns:
            Per item, in order: None when acked, else its error (LeaseError, JobNotFound).

        Raises:
            errors.TransportError, errors.ServerError, errors.RequestError: the whole request failed.
        """
        return [outcome for call in self._ack_calls(worker, items) for outcome in self._send(call)]

    def fail(self, worker: str, job_id: str, lease_token: int, error: str, *, retry: bool = True,
             delay_s: float | None = None) -> None:
        """Reports a failed attempt; the job is retried with backoff, or dead-lettered.

        Args:
            worker: the worker holding the lease.
            job_id: the job.
            lease_token: the token `fetch` gave.
            error: what went wrong (kept as the job's last error, cut to 8 KiB).
            retry: False dead-letters the job at once.
            delay_s: retry after exactly this many seconds instead of the job's backoff.

        Raises:
            errors.LeaseError, errors.JobNotFound: as for `ack`.
            errors.TransportError, errors.ServerError: no node could serve it before the deadline.
        """
        single(self._send(self._fail_calls(worker, [(job_id, lease_token, error, retry, delay_s)])[0]))

    def fail_many(self, worker: str, items: Sequence[tuple[str, int, str, bool, float | None]]
                  ) -> list[None | errors.RaftqError]:
        """Reports many failed attempts.

        Args:
            worker: the worker holding the leases.
            items: (job_id, lease_token, error, retry, delay_s or None) per job.

        Returns:
            Per item, in order: None when recorded, else its error.

        Raises:
            errors.TransportError, errors.ServerError, errors.RequestError: the whole request failed.
        """
        return [outcome for call in self._fail_calls(worker, items) for outcome in self._send(call)]

    def extend(self, worker: str, job_id: str, lease_token: int, lease_s: float) -> float:
        """Extends a lease to `lease_s` seconds from now.

        Args:
            worker: the worker holding the lease.
            job_id: the job.
            lease_token: the token `fetch` gave (it stays the same).
            lease_s: the new lease length, seconds (1 s - 12 h).

        Returns:
            The new expiry, unix time in seconds.

        Raises:
            errors.LeaseError, errors.JobNotFound: as for `ack`.
            errors.TransportError, errors.ServerError: no node could serve it before the deadline.
        """
        return single(self._send(self._extend_calls(worker, [(job_id, lease_token, lease_s)])[0]))

    def extend_many(self, worker: str, items: Sequence[tuple[str, int, float]]) -> list[float | errors.RaftqError]:
        """Extends many leases.

        Args:
            worker: the worker holding the leases.
            items: (job_id, lease_token, lease_s) per job.

        Returns:
            Per item, in order: the new expiry (unix s), else its error.

        Raises:
            errors.TransportError, errors.ServerError, errors.RequestError: the whole request failed.
        """
        return [outcome for call in self._extend_calls(worker, items) for outcome in self._send(call)]

    def release_many(self, worker: str, items: Sequence[tuple[str, int]]) -> list[None | errors.RaftqError]:
        """Hands leased jobs back unstarted: ready again at once, and no attempt counted.

        Args:
            worker: the worker holding the leases.
            items: (job_id, lease_token) per job.

        Returns:
            Per item, in order: None when handed back, else its error (LeaseError, JobNotFound).

        Raises:
            errors.TransportError, errors.ServerError, errors.RequestError: the whole request failed.
        """
        return [outcome for call in self._release_calls(worker, items) for outcome in self._send(call)]

    def heartbeat(self, worker: str, job_ids: Sequence[str]) -> list[str]:
        """Tells the cluster this worker is alive and which jobs it is running.

        Args:
            worker: this worker's id.
            job_ids: the jobs it holds leases on.

        Returns:
            The ids among job_ids this worker no longer holds (expired or taken away).

        Raises:
            errors.TransportError, errors.ServerError: no node could serve it before the deadline.
        """
        return self._send(self._heartbeat_call(worker, job_ids))

    # ------------------------------------------------------------------ inspection and admin

    def get(self, job_id: str) -> dict:
        """The job's record: "state" (scheduled ready leased retry_wait done dead cancelled), payload,
        attempts, last_error, result, times in seconds.

        Raises:
            errors.JobNotFound: unknown, or finished longer ago than the retention window.
        """
        return self._send(self._get_call(job_id))

    def wait(self, job_id: str, timeout: float | None = None) -> dict:
        """Waits until the job is done, dead or cancelled, or `timeout` seconds have passed.

        Long-polls `GET /v1/jobs/{id}?wait_s=N` (at most 20 s per request), so the answer comes
        as soon as the leader applies the final state, without polling traffic in between.

        Args:
            job_id: the job.
            timeout: seconds to wait at most; None waits as long as it takes.

        Returns:
            The job's record (as `get`): in a final state, or as it is when the timeout ran out.

        Raises:
            errors.JobNotFound: unknown, or finished longer ago than the retention window.
            errors.TransportError, errors.ServerError: no node could serve a poll before its deadline.
        """
        plan = self._wait_plan(job_id, timeout)
        record = None
        while True:
            try:
                call = plan.send(record)
            except StopIteration as done:
                return done.value
            record = self._send(call)

    def result(self, job_id: str, timeout: float | None = None) -> Any:
        """Waits for the job to finish and returns its result; raises as `JobHandle.result`."""
        return result_of(self.wait(job_id, timeout), timeout)

    def handle(self, job_id: str) -> "JobHandle":
        """A `JobHandle` for a job id: its state now, and its result once it has one."""
        return JobHandle(job_id, self)

    def cancel(self, job_id: str) -> None:
        """Cancels a job that has not finished.

        Raises:
            errors.JobNotFound: no such job.
            errors.Conflict: the job is already done.
        """
        self._send(self._cancel_call(job_id))

    def queues(self) -> dict:
        """Depth by state of every queue: {queue: {"ready": n, "leased": n, ...}} (absent states are 0)."""
        return self._send(self._queues_call())

    def configure_queue(self, queue: str, *, max_depth: int | None = None, rate_per_s: float | None = None,
                        burst: int | None = None, max_running_per_key: int | None = None, fifo: bool = False) -> dict:
        """Replaces a queue's settings; a setting left out is unlimited / off.

        Args:
            max_depth: jobs not finished; beyond it submits get 429.
            rate_per_s, burst: a token bucket on leases across all workers (burst: the server's
                default is one second's worth).
            max_running_per_key: leased jobs of one `key` at a time.
            fifo: the jobs of one `group` are leased one at a time, in submit order.

        Returns:
            The node's answer: {"ok": True, "queue": ..., and the settings now in force}.
        """
        return self._send(self._configure_queue_call(queue, queue_settings(
            max_depth=max_depth, rate_per_s=rate_per_s, burst=burst, max_running_per_key=max_running_per_key,
            fifo=fifo)))

    def delete_queue(self, queue: str, *, force: bool = False) -> dict:
        """Removes a queue with its settings and finished records.

        Raises:
            errors.Conflict: it holds unfinished jobs and `force` is False (True cancels them).
            errors.JobNotFound: there is no such queue (404).
        """
        return self._send(self._delete_queue_call(queue, force))

    def queue_details(self) -> dict:
        """{"queues": depth by state, "settings": each queue's settings, "held_back": jobs each
        limit holds back now, by queue}."""
        return self._send(self._queues_call(detail=True))

    # ------------------------------------------------------------------ schedules

    def put_schedule(self, name: str, queue: str, payload: Any = None, *, cron: str | None = None,
                     every_s: float | None = None, timezone: str | None = None, overlap: str | None = None,
                     catch_up: str | None = None, priority: int | None = None, max_attempts: int | None = None,
                     lease_s: float | None = None) -> dict:
        """Creates or replaces the schedule `name`: a job in `queue` at each fire time.

        Args:
            cron: a 5-field cron expression, evaluated in `timezone` (an IANA name; default UTC);
                or every_s: seconds between fire times (at least 1).
            overlap: "allow" (default) or "skip" (no new job while the last one is unfinished).
            catch_up: what fire times missed while the cluster was down do: "latest" (default:
                run the newest one), "all" or "none".
            priority, max_attempts, lease_s: the jobs' settings.

        Returns:
            The schedule, with `next_fire_at` (unix seconds). Re-putting an identical schedule
            changes nothing, so a worker may declare its schedules at every start.
        """
        return self._send(self._schedule_call("PUT", name, body=schedule_spec(
            queue, payload, cron=cron, every_s=every_s, timezone=timezone, overlap=overlap, catch_up=catch_up,
            priority=priority, max_attempts=max_attempts, lease_s=lease_s)))

    def schedule(self, name: str) -> dict:
        """The schedule `name` with its next and last fire times. Raises errors.JobNotFound when unknown."""
        return self._send(self._schedule_call("GET", name))

    def schedules(self) -> list[dict]:
        """Every schedule, by name."""
        return self._send(self._schedules_call())

    def delete_schedule(self, name: str) -> None:
        self._send(self._schedule_call("DELETE", name))

    def pause_schedule(self, name: str) -> dict:
        """Stops the schedule's fires until `resume_schedule`; returns the schedule."""
        return self._send(self._schedule_call("POST", name, "pause", body={}))

    def resume_schedule(self, name: str) -> dict:
        """Fires again from the first fire time after now (those missed while paused are skipped)."""
        return self._send(self._schedule_call("POST", name, "resume", body={}))

    def dead(self, queue: str, *, limit: int = 100, after: str | None = None) -> list[dict]:
        """Dead-lettered jobs of a queue, oldest first, with attempts and last error.

        Args:
            queue: the queue.
            limit: at most this many (1-1000).
            after: continue after this job id (the last one of the previous page).
        """
        return self._send(self._dead_call(queue, limit, after))

    def redrive(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """Moves dead jobs back to ready with attempts reset; all of the queue's when ids is None.

        Returns:
            How many jobs were moved.
        """
        return self._send(self._redrive_call(queue, ids))

    def purge_dead(self, queue: str) -> int:
        """Deletes a queue's dead-lettered jobs. Returns how many."""
        return self._send(self._purge_dead_call(queue))

    def cluster(self) -> dict:
        """The status of the first node that answers (not necessarily the leader): node, role, term,
        leader, leader_url, commit_index, applied_index, nodes."""
        return self._send(self._cluster_call())

    def add_member(self, node_id: str, url: str) -> dict:
        """Adds a node, started empty with `--join`, as a learner; the leader promotes it to voter
        once it has caught up. Returns once the change is committed, with the members.

        Raises:
            errors.Conflict: the id is, or was, a member (ids are never reused).
        """
        return self._send(self._add_member_call(node_id, url))

    def remove_member(self, node_id: str) -> dict:
        """Removes a member for good (the leader itself: it hands leadership on first).
        Returns once the change is committed, with the members left."""
        return self._send(self._remove_member_call(node_id))

    def transfer_leadership(self, to: str | None = None) -> dict:
        """Moves leadership to voter `to`, or to the most caught-up one; returns once another
        node leads: {"previous", "leader", "leader_url"}."""
        return self._send(self._transfer_call(to))

    def workers(self) -> list[dict]:
        """The workers the leader knows, with their last heartbeat and leased jobs."""
        return self._send(self._workers_call())


class JobHandle(str):
    """A submitted job: its id (this is a `str`, so it goes wherever an id goes) and a way to its
    state and result, like Celery's AsyncResult.

    Example:
        handle = add.submit(2, 3)
        handle.result(timeout=10)   # 5, once a worker has run it
    """

    client: Client

    def __new__(cls, job_id: str, client: Client) -> "JobHandle":
        handle = super().__new__(cls, job_id)
        handle.client = client
        return handle

    @property
    def id(self) -> str:
        return str(self)

    @property
    def state(self) -> str:
        """The job's state now: scheduled, ready, leased, retry_wait, done, dead or cancelled."""
        return self.client.get(self.id)["state"]

    def record(self) -> dict:
        """The job's whole record now (`Client.get`)."""
        return self.client.get(self.id)

    def ready(self) -> bool:
        """True once the job is done, dead or cancelled."""
        return self.state in FINAL_STATES

    def result(self, timeout: float | None = None) -> Any:
        """Waits for the job to finish and returns its result (what the handler returned).

        Args:
            timeout: seconds to wait at most; None waits as long as it takes.

        Raises:
            errors.JobFailed: the job was dead-lettered (the message carries its attempts and last
                error, `.record` the whole record) or cancelled.
            errors.JobPending: it did not finish within `timeout`.
            errors.JobNotFound: its record is gone: it finished longer ago than the retention window.
        """
        return result_of(self.client.wait(self.id, timeout), timeout)

    def __reduce__(self):  # a handle pickles as its id; the client stays behind
        return str, (str(self),)
