"""A Celery-like task API over the client and the worker runtime.

    app = App("http://127.0.0.1:7001,http://127.0.0.1:7002,http://127.0.0.1:7003")

    @app.task(queue="emails", max_attempts=3)
    def send_welcome(user_id: int, *, lang: str = "en") -> None: ...

    handle = send_welcome.submit(42, lang="de")   # producer side; .delay(...) is the same
    handle.result(timeout=30)                     # waits for a worker to run it
    app.worker(concurrency=8).run()               # worker side (or: raftq worker mymodule:app)

    @app.periodic(cron="*/5 * * * *", queue="reports")
    def refresh_dashboards() -> None: ...        # a job every 5 minutes, made by the cluster

A periodic task is a task plus a schedule of the same name; `app.worker()` puts every schedule
the app declares (an identical one is left as it is; a changed one replaces the stale one), and
the cluster's leader makes each fire time's job (see the README, "Flow control and schedules").

A submitted call is the payload `{"task": name, "args": [...], "kwargs": {...}}` on the task's
queue (plus "time_limit" and "soft_time_limit" when `apply_async` sets them for that call); the
worker looks the name up among the app's tasks. A name defaults to the function's
"module.qualname", so producer and worker agree as long as both import the same module. Payloads
are msgpack data, never pickles: arguments must be msgpack-serialisable.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import importlib
import inspect
import pickle
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import msgpack

from raftq.client._client import JobHandle
from raftq.client.worker import Reject, Worker
from raftq.client.worker.limits import TimeLimits, check_limit
# The bounds of the per-job options a task may fix: the server's, checked here at registration.
from raftq.protocol import (LEASE_S_MAX, LEASE_S_MIN, MAX_ATTEMPTS_MAX, MAX_ATTEMPTS_MIN, PRIORITY_MAX,
                            PRIORITY_MIN)



class App:
    """A registry of tasks plus the client that submits them.

    Args:
        nodes: node URLs, as a list or one comma-separated string.
        token: bearer token, when the cluster wants one.
        default_queue: the queue of tasks that name none.

    The client is made on first use (importing a module that builds an App does no I/O); set
    `app.client` to share one you already have.
    """

    def __init__(self, nodes: str | Sequence[str], *, token: str | None = None, default_queue: str = "default",
                 ca_file: str | None = None, verify: bool = True) -> None:
        self.nodes = [n.strip() for n in nodes.split(",") if n.strip()] if isinstance(nodes, str) else list(nodes)
        self.token = token
        self.ca_file = ca_file
        self.verify = verify
        self.default_queue = default_queue
        self.tasks: dict[str, Task] = {}
        self.schedules: dict[str, dict[str, Any]] = {}  # schedule name -> put_schedule keyword arguments
        self._client: Any = None
        self._client_lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The `client.Client` submits go through (made on first use)."""
        with self._client_lock:
            if self._client is None:
                from raftq.client import Client

                self._client = Client(self.nodes, token=self.token, ca_file=self.ca_file, verify=self.verify)
            return self._client

    @client.setter
    def client(self, value: Any) -> None:
        with self._client_lock:
            self._client = value

    def close(self) -> None:
        """Closes the client, if one was made."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def task(self, fn: Callable | None = None, *, queue: str | None = None, max_attempts: int | None = None,
             priority: int | None = None, lease_s: float | None = None, name: str | None = None,
             time_limit: float | None = None, soft_time_limit: float | None = None) -> Any:
        """Registers a function as a task; use as `@app.task` or `@app.task(queue=..., ...)`.

        Args:
            queue: the queue its jobs go to (default: the app's default_queue).
            max_attempts, priority, lease_s: per-job options (None: the server's defaults).
            name: the name in payloads (default: "module.qualname").
            time_limit: seconds a run may take before it fails with TimeLimitExceeded (the
                process pool kills and replaces the process running it).
            soft_time_limit: seconds before SoftTimeLimitExceeded is raised in the run, which may
                catch it to clean up. What each pool enforces: the README, "Time limits".

        Returns:
            A `Task` (or, with arguments, a decorator that makes one).

        Raises:
            ValueError: an option out of bounds, or a name already registered.
        """
        def register(function: Callable) -> Task:
            task = Task(self, function, name=name or default_task_name(function), queue=queue or self.default_queue,
                        max_attempts=max_attempts, priority=priority, lease_s=lease_s,
                        time_limits=TimeLimits(check_limit("soft_time_limit", soft_time_limit),
                                               check_limit("time_limit", time_limit)))
            if task.name in self.tasks:
                raise ValueError(f"a task named {task.name!r} is already registered; pass name= to tell them apart")
            self.tasks[task.name] = task
            return task

        return register(fn) if fn is not None else register

    def periodic(self, fn: Callable | None = None, *, cron: str | None = None, every_s: float | None = None,
                 timezone: str | None = None, overlap: str | None = None, catch_up: str | None = None,
                 args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **task_options: Any) -> Any:
        """Registers a task that the cluster runs on a schedule: `@app.periodic(cron="0 3 * * *")`.

        Args:
            cron, every_s, timezone, overlap, catch_up: the schedule (see `Client.put_schedule`).
            args, kwargs: the arguments each run gets.
            **task_options: as for `task` (queue, max_attempts, priority, lease_s, name, time limits).

        Returns:
            The `Task` (it can still be submitted by hand).
        """
        if (cron is None) == (every_s is None):
            raise ValueError("a periodic task needs exactly one of cron= and every_s=")

        def register(function: Callable) -> Task:
            task = self.task(function, **task_options)
            self.schedules[task.name] = {
                "queue": task.queue, "payload": task.payload(args, kwargs), "cron": cron, "every_s": every_s,
                "timezone": timezone, "overlap": overlap, "catch_up": catch_up, "priority": task.priority,
                "max_attempts": task.max_attempts, "lease_s": task.lease_s,
            }
            return task

        return register(fn) if fn is not None else register

    def declare_schedules(self) -> list[dict]:
        """Puts every schedule this app declares (`periodic`); returns them as the cluster has them."""
        return [self.client.put_schedule(name, **spec) for name, spec in sorted(self.schedules.items())]

    def worker(self, *, concurrency: int = 4, pool: str = "threads", queues: Sequence[str] | None = None,
               client: Any = None, **options: Any) -> Worker:
        """A `Worker` that runs this app's tasks.

        Args:
            concurrency, pool: as for `Worker`.
            queues: the queues to work on (default: every queue a task uses).
            client: the client to use (default: the app's client; a new `AsyncClient` for pool="asyncio").
            **options: any other `Worker` option (burst, lease_s, grace_s, middleware, ...).
        """
        queues = list(queues) if queues is not None else sorted({task.queue for task in self.tasks.values()})
        if self.schedules:
            self.declare_schedules()  # declared schedules win over stale ones of the same name
        if client is None:
            if pool == "asyncio":
                from raftq.client import AsyncClient

                client = AsyncClient(self.nodes, token=self.token, ca_file=self.ca_file, verify=self.verify)
            else:
                client = self.client
        dispatch = AsyncDispatch(self.tasks) if pool == "asyncio" else Dispatch(self.tasks)
        return Worker(client, {queue: dispatch for queue in queues}, queues=queues, concurrency=concurrency,
                      pool=pool, **options)


class Task:
    """A registered function: call it to run it here, `.submit(...)` to run it on a worker.

    Attributes: name, queue, max_attempts, priority, lease_s, time_limits, fn (the plain function).
    """

    def __init__(self, app: App, fn: Callable, *, name: str, queue: str, max_attempts: int | None,
                 priority: int | None, lease_s: float | None, time_limits: TimeLimits = TimeLimits()) -> None:
        _check_range("priority", priority, PRIORITY_MIN, PRIORITY_MAX)
        _check_range("max_attempts", max_attempts, MAX_ATTEMPTS_MIN, MAX_ATTEMPTS_MAX)
        _check_range("lease_s", lease_s, LEASE_S_MIN, LEASE_S_MAX)
        self.app = app
        self.fn = fn
        self.name = name
        self.queue = queue
        self.max_attempts = max_attempts
        self.priority = priority
        self.lease_s = lease_s
        self.time_limits = time_limits
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the function here and now."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue}>"

    def __reduce__(self):
        # Pickled by reference (module + qualname), never by value: only process pools pickle a
        # Task, and the child imports the module to find the very same object.
        module, qualname = self.fn.__module__, self.fn.__qualname__
        try:
            found = _load_task(module, qualname)
        except Exception as exc:
            found = exc
        if found is not self:
            raise pickle.PicklingError(f"task {self.name} is not reachable as {module}.{qualname}; "
                                       "pool='processes' needs tasks defined at module top level")
        return _load_task, (module, qualname)

    def submit(self, *args: Any, **kwargs: Any) -> JobHandle:
        """Submits a call of this task with these arguments (Celery's `delay`).

        Returns:
            A `JobHandle`: the job id (a str) with `.state` and `.result(timeout=)`.

        Raises:
            TypeError: an argument is not msgpack-serialisable.
            client.errors.RaftqError: as `Client.submit`.
        """
        return self.submit_with(args, kwargs)

    delay = submit

    def submit_with(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
                    delay_s: float | None = None, priority: int | None = None, queue: str | None = None,
                    idempotency_key: str | None = None, time_limit: float | None = None,
                    soft_time_limit: float | None = None) -> JobHandle:
        """Submits a call with per-job options.

        Args:
            args, kwargs: the call's arguments.
            delay_s: seconds before the job may run.
            priority: 0-9, overriding the task's own.
            queue: another queue than the task's (a worker for it must know this task).
            idempotency_key: a repeated submit with the same key inside the server's window
                returns the first job's id instead of creating another job.
            time_limit, soft_time_limit: this call's limits, over the task's own.

        Returns and raises like `submit`, and ValueError for a limit that is not a positive number.
        """
        payload = self.payload(args, kwargs)
        for key, value in (("time_limit", time_limit), ("soft_time_limit", soft_time_limit)):
            if check_limit(key, value) is not None:
                payload[key] = value
        client = self.app.client
        job_id = client.submit(queue or self.queue, payload,
                               priority=priority if priority is not None else self.priority, delay_s=delay_s,
                               max_attempts=self.max_attempts, lease_s=self.lease_s, idempotency_key=idempotency_key)
        return JobHandle(job_id, client)

    def apply_async(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
                    countdown: float | None = None, eta: datetime.datetime | None = None,
                    priority: int | None = None, queue: str | None = None,
                    idempotency_key: str | None = None, time_limit: float | None = None,
                    soft_time_limit: float | None = None) -> JobHandle:
        """Celery's `apply_async`: `submit_with` under Celery's option names.

        Args:
            args, kwargs: the call's arguments.
            countdown: seconds before the job may run.
            eta: when it may run (an aware datetime, or a naive one in local time); a time in
                the past runs it at once. Kept by the cluster, never by a worker.
            priority: 0-9, 9 runs first.
            queue: another queue than the task's.
            idempotency_key: as for `submit_with`.
            time_limit, soft_time_limit: this call's limits (seconds), over the task's own.

        Raises:
            ValueError: both countdown and eta given, or a limit that is not a positive number.
            TypeError, client.errors.RaftqError: as `submit`.
        """
        if countdown is not None and eta is not None:
            raise ValueError("give countdown or eta, not both")
        delay_s = countdown
        if eta is not None:
            now = datetime.datetime.now(eta.tzinfo) if eta.tzinfo is not None else datetime.datetime.now()
            delay_s = max(0.0, (eta - now).total_seconds())
        return self.submit_with(args, kwargs, delay_s=delay_s, priority=priority, queue=queue,
                                idempotency_key=idempotency_key, time_limit=time_limit,
                                soft_time_limit=soft_time_limit)

    def payload(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> dict:
        """The job payload of a call: {"task": name, "args": [...], "kwargs": {...}}.

        Raises:
            TypeError: an argument is not msgpack-serialisable.
        """
        payload = {"task": self.name, "args": list(args), "kwargs": dict(kwargs or {})}
        try:
            msgpack.packb(payload)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"task {self.name}: arguments must be msgpack-serialisable (None, bool, int, float, "
                            f"str, bytes, list, dict): {exc}") from None
        return payload


class Dispatch:
    """The handler an App's worker runs for every job: calls the task the payload names.

    Raises (in the worker, so the job goes to the dead-letter queue):
        Reject: the payload is not a task call, or names a task this app does not know.
    """

    def __init__(self, tasks: Mapping[str, Task]) -> None:
        self.tasks = dict(tasks)

    def __call__(self, job: Any) -> Any:
        task, args, kwargs = self.resolve(job.payload)
        return task.fn(*args, **kwargs)

    def resolve(self, payload: Any) -> tuple[Task, list, dict]:
        """(task, args, kwargs) of a payload."""
        if not (isinstance(payload, dict) and isinstance(payload.get("task"), str)
                and isinstance(payload.get("args", []), list) and isinstance(payload.get("kwargs", {}), dict)):
            raise Reject(f"payload is not a task call {{'task': str, 'args': list, 'kwargs': dict}}: {payload!r:.200}")
        task = self.tasks.get(payload["task"])
        if task is None:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise Reject(f"unknown task {payload['task']!r}: this worker's app registers no task of that name "
                         f"(known: {known})")
        return task, payload.get("args", []), payload.get("kwargs", {})

    def time_limits(self, job: Any) -> TimeLimits:
        """The call's limits (from `apply_async`), over its task's; the worker enforces them.

        Raises:
            Reject: the payload names a limit that is not a positive number.
        """
        task, _, _ = self.resolve(job.payload)
        try:
            called = TimeLimits(check_limit("soft_time_limit", job.payload.get("soft_time_limit")),
                                check_limit("time_limit", job.payload.get("time_limit")))
        except ValueError as exc:
            raise Reject(f"task {task.name}: {exc}") from None
        return called.over(task.time_limits)


class AsyncDispatch(Dispatch):
    """`Dispatch` for pool="asyncio": awaits async tasks; a plain function runs in a thread."""

    async def __call__(self, job: Any) -> Any:
        task, args, kwargs = self.resolve(job.payload)
        if inspect.iscoroutinefunction(task.fn):
            return await task.fn(*args, **kwargs)
        return await asyncio.to_thread(task.fn, *args, **kwargs)

    def plain_body(self, job: Any) -> Callable[[Any], Any] | None:
        """For a task that is a plain function, `job -> result` to run in a thread (so that the
        worker applies the threads' time limits there); None for an async task."""
        task, args, kwargs = self.resolve(job.payload)
        if inspect.iscoroutinefunction(task.fn):
            return None
        return lambda _job: task.fn(*args, **kwargs)


def default_task_name(fn: Callable) -> str:
    """ "module.qualname"; for a function in a script run directly, the script's module name, so
    that a worker importing the script by name agrees with the producer that ran it."""
    module = fn.__module__
    if module == "__main__":
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name:
            module = spec.name
        elif getattr(main, "__file__", None):
            module = Path(main.__file__).stem
    return f"{module}.{fn.__qualname__}"


def _load_task(module: str, qualname: str) -> Task:
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not isinstance(target, Task):
        raise pickle.UnpicklingError(f"{module}.{qualname} is not a raftq Task")
    return target


def _check_range(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise ValueError(f"{name} must be within [{low:g}, {high:g}], got {value!r}")
