"""The processes `raftq bench` starts: producers and workers, each with a client of its own.

Theory of operation
-------------------
Every role runs in a process started with multiprocessing's "spawn" method (a fork of a parent
that runs threads may copy a held lock), so each imports only this module and the client, and
none shares a GIL with another or with the parent. They talk to the parent through `Channels`:

    start      set by the parent once every role said it is ready; the clock starts then
    stop       set by the parent once `acked` reached the jobs expected (or on an error)
    submitted  jobs submitted so far, all producers together (the parent's progress bar)
    acked      jobs acked so far, all workers together (progress, and when to stop)
    results    each role puts ("ready", role, index), then ("done", role, index, dict) or
               ("error", role, index, traceback text)

A job's payload is `{"t": wall time of its submit call, "pad": "x" * k}`, about `payload_bytes`
long once encoded. The worker that acks it records `ack answered - t`: its end-to-end latency,
submit to durable ack, including the time it waited in the queue. Producers record the latency
of each submit request. Both travel to the parent once, at the end, as packed doubles.

Workers come in three shapes:

    lean ("single" pool)   no Worker runtime: `concurrency` lanes (threads sharing one client),
                           each fetching `batch` jobs, running them in order, and acking them all
                           with one ack_many. With --concurrency 1 it is one thread.
    runtime (threads, processes, asyncio)   `client.worker.Worker` as users run it, through a
                           client wrapper that notes fetch and ack times. Before the clock starts
                           each runs one warm-up job from a queue of its own, so that process
                           pools are spawned and connections open outside the measured time.
    cli                    `raftq worker` itself, a process of its own started by the worker role
                           with default flags (but --concurrency, and --prefetch when given),
                           handlers from `raftq.bench.cli_worker`. The role cannot see its acks:
                           it counts the queue's done jobs every CLI_POLL_S (so no end-to-end
                           latencies), after one warm-up job went through the same way.

Job kinds: noop; io, a 1 ms sleep (a quick database call); cpu, about 1 ms of pure Python; echo,
one request and its reply over loopback TCP to an echo server that the worker role runs (the
peers' shape: one Redis INCR per job), one connection per worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from array import array
from dataclasses import dataclass
from typing import Any, Callable

import msgpack

from raftq import AsyncClient, Client

#: Seconds one request may take; a benchmark under load must not give up early.
REQUEST_TIMEOUT_S = 30.0
#: Seconds one call may spend across retries (leader changes, 503 backpressure).
CALL_DEADLINE_S = 120.0
#: Long poll of the lean workers' fetches: how soon a lane notices `stop` when its queue is empty.
LEAN_WAIT_S = 0.5
#: Long poll of the Worker runtime's fetches; its shutdown waits for a fetch in flight.
RUNTIME_WAIT_S = 0.5
#: How long a runtime worker waits for its warm-up job before it reports an error.
WARMUP_S_MAX = 60.0
#: The I/O-bound job: a sleep this long (a quick database or HTTP call).
IO_JOB_S = 0.001

KINDS = ("noop", "io", "cpu", "echo")
BENCH_POOLS = ("single", "threads", "processes", "asyncio", "cli")
#: pool "cli": how often the worker role counts the queue's done jobs.
CLI_POLL_S = 0.02
#: How often a role waiting on a `Flag` looks at it: a run's roles start within this of each other.
FLAG_POLL_S = 0.001
#: ... and how often a thread that waits for a whole run looks at `stop` (its wake-ups cost the run's CPU).
STOP_POLL_S = 0.02
#: pool "cli": how long `raftq worker` may take to stop after SIGTERM before it is killed.
CLI_STOP_S = 30.0
#: The environment of a `raftq worker` started by the bench (read by raftq.bench.cli_worker),
#: and of every process that runs "echo" jobs.
CLI_QUEUES_ENV = "RAFTQ_BENCH_QUEUES"
CLI_KIND_ENV = "RAFTQ_BENCH_KIND"
CLI_CPU_LOOPS_ENV = "RAFTQ_BENCH_CPU_LOOPS"
ECHO_ADDRESS_ENV = "RAFTQ_BENCH_ECHO"


@dataclass(frozen=True)
class RoleConfig:
    """What one producer or worker process needs to know (it is pickled into the child)."""

    nodes: tuple[str, ...]
    token: str | None
    queue: str
    jobs: int  #: producers: this producer's share of the jobs; workers: unused
    batch: int  #: producers: jobs per submit request; lean workers: jobs per fetch and per ack
    concurrency: int  #: workers: lanes (lean) or the Worker's concurrency
    pool: str  #: workers: one of BENCH_POOLS
    kind: str  #: workers: one of KINDS
    cpu_loops: int  #: iterations of the CPU-bound job's loop (calibrated to about 1 ms)
    payload_bytes: int  #: producers: encoded size of each payload
    rate_per_s: float | None  #: producers: this producer's submit rate; None: as fast as it can
    prefetch: int | None = None  #: Worker runtime: its `prefetch`; None: the Worker's default

    def worker_options(self) -> dict[str, Any]:
        """Options of the Worker runtime that the run sets rather than leaving to the Worker's defaults."""
        return {} if self.prefetch is None else {"prefetch": self.prefetch}

    def client(self, *, asynchronous: bool = False) -> Any:
        kind = AsyncClient if asynchronous else Client
        return kind(list(self.nodes), token=self.token, timeout=REQUEST_TIMEOUT_S, deadline=CALL_DEADLINE_S)


class Flag:
    """A yes/no that the bench's processes share: `multiprocessing.Event`'s calls, without its hang.

    `Event.set()` waits until every process counted as waiting on the event has woken, so a role
    that exited while one of its threads waited (a Worker stopped by an error, its conductor
    thread still in `stop.wait()`) left the parent in `set()` for good, the run never reported.
    This one is a byte in shared memory (no lock: one writer sets it once), and a wait polls it.
    """

    def __init__(self, context: Any) -> None:
        self._value = context.RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def is_set(self) -> bool:
        return self._value.value == 1

    def wait(self, timeout_s: float | None = None, *, poll_s: float = FLAG_POLL_S) -> bool:
        """True once set; False when `timeout_s` passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)  # polling a shared byte, with the caller's deadline
        return True


@dataclass(frozen=True)
class Channels:
    """The shared objects of one run (made by the parent from a spawn context)."""

    start: Flag
    stop: Flag
    submitted: Any
    acked: Any
    results: Any


# ---------------------------------------------------------------------------- the jobs


def padding(payload_bytes: int) -> str:
    """The "pad" text that makes `{"t": <float>, "pad": pad}` encode to `payload_bytes` (or the least it can)."""
    pad = ""
    for _ in range(3):  # msgpack's string header grows at 32 and 256 characters: converge on the size
        size = len(msgpack.packb({"t": 0.0, "pad": pad}))
        pad = "x" * max(0, len(pad) + payload_bytes - size)
    return pad


def cpu_work(loops: int) -> int:
    """About 1 ms of pure Python work for the calibrated `loops`."""
    total = 0
    for i in range(loops):
        total += i * i
    return total


def calibrate_cpu_loops(target_s: float = 0.001) -> int:
    """Loop iterations of `cpu_work` that take about `target_s` on this machine (best of 5)."""
    probe = 50_000
    best_s = min(_timed(cpu_work, probe) for _ in range(5))
    return max(1, int(probe * target_s / max(best_s, 1e-9)))


def _timed(function: Callable[[int], Any], argument: int) -> float:
    started = time.perf_counter()
    function(argument)
    return time.perf_counter() - started


def run_noop(job: Any) -> None:
    return None


def run_io(job: Any) -> None:
    time.sleep(IO_JOB_S)


def run_cpu(loops: int, job: Any) -> None:
    cpu_work(loops)


_echo_connections = threading.local()


def run_echo(job: Any) -> None:
    """One small request and its reply over loopback TCP, on this thread's connection."""
    connection = getattr(_echo_connections, "socket", None)
    if connection is None:
        host, port = os.environ[ECHO_ADDRESS_ENV].rsplit(":", 1)
        connection = socket.create_connection((host, int(port)))
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _echo_connections.socket = connection
    connection.sendall(b"INCR bench\r\n")
    if not connection.recv(64):
        raise ConnectionError("the bench's echo server closed the connection")


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := self.request.recv(64):
            self.request.sendall(data)


def start_echo_server() -> str:
    """An echo server on a thread of this process, one thread per connection; its "host:port"
    is also put in this process's environment, for the handlers and the processes it starts."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="bench-echo", daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    os.environ[ECHO_ADDRESS_ENV] = address
    return address


async def arun_noop(job: Any) -> None:
    return None


async def arun_io(job: Any) -> None:
    await asyncio.sleep(IO_JOB_S)


async def arun_cpu(loops: int, job: Any) -> None:
    cpu_work(loops)  # on the event loop, as an async handler that computes would


def handler_for(kind: str, cpu_loops: int, *, asynchronous: bool = False) -> Callable[[Any], Any]:
    """The job handler of `kind`: top-level functions (and partials of them), so they pickle."""
    if kind == "noop":
        return arun_noop if asynchronous else run_noop
    if kind == "io":
        return arun_io if asynchronous else run_io
    if kind == "cpu":
        return functools.partial(arun_cpu if asynchronous else run_cpu, cpu_loops)
    if kind == "echo" and not asynchronous:
        return run_echo
    raise ValueError(f"unknown job kind {kind!r}")


# ---------------------------------------------------------------------------- process memory


def peak_rss_kib(pid: int | str = "self") -> int | None:
    """VmHWM (peak resident set) of a process in KiB, from /proc; None where that is not readable."""
    return _status_kib(pid, "VmHWM:")


def rss_kib(pid: int | str = "self") -> int | None:
    """VmRSS (resident set now) of a process in KiB, from /proc; None where that is not readable."""
    return _status_kib(pid, "VmRSS:")


def _status_kib(pid: int | str, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def child_pids(pid: int | str = "self") -> list[int]:
    """Direct children of a process (Linux /proc/<pid>/task/<tid>/children), [] where unknown."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as children:
                found += [int(part) for part in children.read().split()]
        except (OSError, ValueError):
            continue
    return found


def _children_peak_rss_kib() -> int:
    return sum(peak_rss_kib(child) or 0 for child in child_pids())


# ---------------------------------------------------------------------------- log records


class _WarningTally(logging.Handler):
    """Counts a role's warnings and errors (the Worker's, the client's) and keeps the first few.

    They go to the parent with the role's report instead of through the progress bar.
    """

    SAMPLES_MAX = 3

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.count = 0
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.samples) < self.SAMPLES_MAX:
            self.samples.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:500])

    def report(self) -> dict:
        return {"warnings": self.count, "warning_samples": list(self.samples)}


def _tally_warnings() -> _WarningTally:
    tally = _WarningTally()
    root = logging.getLogger()
    root.handlers[:] = [tally]
    root.setLevel(logging.WARNING)
    return tally


# ---------------------------------------------------------------------------- producers


def producer_main(index: int, config: RoleConfig, channels: Channels) -> None:
    """Submits `config.jobs` jobs in requests of `config.batch`, paced at `config.rate_per_s` if set."""
    try:
        warnings = _tally_warnings()
        channels.results.put(("done", "producer", index, {**_produce(index, config, channels), **warnings.report()}))
    except BaseException:
        channels.results.put(("error", "producer", index, traceback.format_exc()))


def _produce(index: int, config: RoleConfig, channels: Channels) -> dict:
    pad = padding(config.payload_bytes)
    latencies_ms = array("d")
    with config.client() as client:
        client.cluster()  # a first round trip: the connection is open before the clock starts
        channels.results.put(("ready", "producer", index))
        channels.start.wait()
        started_at = time.time()
        sent = 0
        while sent < config.jobs:
            if channels.stop.is_set():  # the parent gave up on this run
                break
            count = min(config.batch, config.jobs - sent)
            if config.rate_per_s:
                ahead_s = started_at + (sent + count) / config.rate_per_s - time.time()
                if ahead_s > 0:
                    time.sleep(ahead_s)  # pacing a fixed rate is what this loop is for
            submitted_at = time.time()
            payloads = [{"t": submitted_at, "pad": pad}] * count
            request_started = time.perf_counter()
            if config.batch == 1:
                client.submit(config.queue, payloads[0])
            else:
                client.submit_many(config.queue, payloads)
            latencies_ms.append((time.perf_counter() - request_started) * 1000)
            sent += count
            with channels.submitted.get_lock():
                channels.submitted.value += count
        ended_at = time.time()
    return {"submitted": sent, "started_at": started_at, "ended_at": ended_at,
            "submit_latencies_ms": latencies_ms.tobytes(), "rss_peak_kib": peak_rss_kib()}


# ---------------------------------------------------------------------------- workers


class _Tally:
    """A worker process's acks: count, end-to-end latencies, time of the last one. Thread-safe."""

    def __init__(self, acked_counter: Any) -> None:
        self._lock = threading.Lock()
        self._acked_counter = acked_counter
        self.latencies_ms = array("d")
        self.acked = 0
        self.refused = 0
        self.failed = 0
        self.last_ack_at = 0.0

    def record(self, submitted_at: list[float | None], results: list[Any]) -> None:
        """Notes one ack_many answer; `submitted_at` holds each job's submit time (None: not measured)."""
        now = time.time()
        ok = 0
        with self._lock:
            for started, result in zip(submitted_at, results):
                if started is None:
                    continue
                if result is None:
                    ok += 1
                    self.latencies_ms.append((now - started) * 1000)
                else:
                    self.refused += 1
            if ok:
                self.acked += ok
                self.last_ack_at = max(self.last_ack_at, now)
        if ok:
            with self._acked_counter.get_lock():
                self._acked_counter.value += ok

    def count(self, done: int) -> None:
        """Notes `done` more jobs finished, seen from outside the worker (no latencies)."""
        with self._lock:
            self.acked += done
            self.last_ack_at = time.time()
        with self._acked_counter.get_lock():
            self._acked_counter.value += done

    def result(self, **extra: Any) -> dict:
        with self._lock:
            return {"acked": self.acked, "refused": self.refused, "failed": self.failed,
                    "last_ack_at": self.last_ack_at, "e2e_latencies_ms": self.latencies_ms.tobytes(), **extra}


def worker_main(index: int, config: RoleConfig, channels: Channels) -> None:
    """Works on `config.queue` until the parent sets `stop`; reports acks and latencies."""
    try:
        warnings = _tally_warnings()
        if config.kind == "echo":
            start_echo_server()
        if config.pool == "single":
            result = _lean_worker(index, config, channels)
        elif config.pool == "cli":
            result = _cli_worker(index, config, channels)
        elif config.pool == "asyncio":
            result = asyncio.run(_async_runtime_worker(index, config, channels))
        else:
            result = _runtime_worker(index, config, channels)
        channels.results.put(("done", "worker", index, {**result, **warnings.report()}))
    except BaseException:
        channels.results.put(("error", "worker", index, traceback.format_exc()))


def _lean_worker(index: int, config: RoleConfig, channels: Channels) -> dict:
    handler = handler_for(config.kind, config.cpu_loops)
    tally = _Tally(channels.acked)
    failures: list[BaseException] = []

    def lane(worker_id: str) -> None:
        try:
            while not channels.stop.is_set():
                jobs = client.fetch(worker_id, [config.queue], max_jobs=config.batch, wait_s=LEAN_WAIT_S)
                if not jobs:
                    continue
                for job in jobs:
                    handler(job)
                results = client.ack_many(worker_id, [(job.id, job.lease_token, None) for job in jobs])
                tally.record([_submitted_at(job) for job in jobs], results)
        except BaseException as exc:
            failures.append(exc)
            channels.stop.set()  # the parent sees the error and ends the run

    with config.client() as client:
        # An empty queue of its own: the connection opens and the leader is found before the clock starts.
        client.fetch(f"bench-w{index}", [_warmup_queue(config, index)], max_jobs=1, wait_s=0)
        channels.results.put(("ready", "worker", index))
        channels.start.wait()
        lanes = [threading.Thread(target=lane, args=(f"bench-w{index}-{n}",), name=f"bench-lane-{n}", daemon=True)
                 for n in range(config.concurrency)]
        for thread in lanes:
            thread.start()
        for thread in lanes:
            thread.join()
    if failures:
        raise failures[0]
    return tally.result(rss_peak_kib=peak_rss_kib(), children_rss_peak_kib=0)


def _cli_worker(index: int, config: RoleConfig, channels: Channels) -> dict:
    """Pool "cli": runs `raftq worker` as a process of its own and counts the jobs it finishes."""
    warmup_queue = _warmup_queue(config, index)
    env = {**os.environ, "RAFTQ_NODES": ",".join(config.nodes), CLI_QUEUES_ENV: f"{config.queue},{warmup_queue}",
           CLI_KIND_ENV: config.kind, CLI_CPU_LOOPS_ENV: str(config.cpu_loops)}
    if config.token:
        env["RAFTQ_TOKEN"] = config.token
    command = [sys.executable, "-m", "raftq", "worker", "raftq.bench.cli_worker:handlers",
               "--concurrency", str(config.concurrency)]
    if config.prefetch is not None:
        command += ["--prefetch", str(config.prefetch)]
    tally = _Tally(channels.acked)
    rss_kib = None
    with tempfile.TemporaryFile() as log_file, config.client() as client:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)

        def done(queue: str) -> int:
            if process.poll() is not None:
                log_file.seek(0)
                tail = log_file.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"raftq worker exited with code {process.returncode}:\n{tail}")
            return client.queues().get(queue, {}).get("done", 0)

        try:
            client.submit(warmup_queue, {"t": time.time(), "pad": ""})
            deadline = time.monotonic() + WARMUP_S_MAX
            while done(warmup_queue) < 1:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"raftq worker did not finish its warm-up job within {WARMUP_S_MAX:g} s")
                time.sleep(CLI_POLL_S)
            channels.results.put(("ready", "worker", index))
            channels.start.wait()
            counted = 0
            while not channels.stop.is_set():
                now_done = done(config.queue)
                if now_done > counted:
                    tally.count(now_done - counted)
                    counted = now_done
                channels.stop.wait(CLI_POLL_S)
            rss_kib = peak_rss_kib(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(CLI_STOP_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return tally.result(rss_peak_kib=rss_kib, children_rss_peak_kib=0)


def _submitted_at(job: Any) -> float | None:
    payload = job.payload
    return payload.get("t") if isinstance(payload, dict) else None


class _TimedClient:
    """Wraps the Worker runtime's client: fetches only the warm-up queue until `start`, and times acks.

    Only fetch, ack_many and fail_many are wrapped; every other call goes straight through.
    """

    def __init__(self, client: Any, queue: str, warmup_queue: str, tally: _Tally, channels: Channels) -> None:
        self._client = client
        self._queue = queue
        self._warmup_queue = warmup_queue
        self._tally = tally
        self._channels = channels
        self._submitted_at: dict[str, float | None] = {}
        self._warmup_ids: set[str] = set()
        self.warm = threading.Event()
        self.warmup_error: str | None = None
        self._started = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def _queues_now(self) -> list[str] | None:
        """The queues to fetch from now; None when the run was stopped before it started."""
        if self._started:
            return [self._queue]
        if not self.warm.is_set():
            return [self._warmup_queue]
        while not self._channels.start.wait(0.05):
            if self._channels.stop.is_set():
                return None
        self._started = True
        return [self._queue]

    def _note_fetched(self, jobs: list[Any]) -> list[Any]:
        for job in jobs:
            if job.queue == self._queue:
                self._submitted_at[job.id] = _submitted_at(job)
            else:
                self._warmup_ids.add(job.id)
        return jobs

    def _note_acked(self, items: Any, results: list[Any]) -> list[Any]:
        times = [self._submitted_at.pop(item[0], None) for item in items]
        if any(item[0] in self._warmup_ids for item in items):
            self.warm.set()  # the warm-up job went through the whole path: fetch, pool, ack
        self._tally.record(times, results)
        return results

    def _note_failed(self, items: Any) -> None:
        for item in items:
            if item[0] in self._warmup_ids:
                self.warmup_error = item[2]
                self.warm.set()
            elif self._submitted_at.pop(item[0], None) is not None:
                self._tally.failed += 1

    def fetch(self, worker: str, queues: Any, *, max_jobs: int = 1, wait_s: float = 0.0) -> list[Any]:
        current = self._queues_now()
        if current is None:
            return []
        return self._note_fetched(self._client.fetch(worker, current, max_jobs=max_jobs, wait_s=wait_s))

    def ack_many(self, worker: str, items: Any) -> list[Any]:
        return self._note_acked(items, self._client.ack_many(worker, items))

    def fail_many(self, worker: str, items: Any) -> list[Any]:
        self._note_failed(items)
        return self._client.fail_many(worker, items)


class _AsyncTimedClient(_TimedClient):
    """`_TimedClient` for the asyncio runtime: the same bookkeeping around awaited calls."""

    async def fetch(self, worker: str, queues: Any, *, max_jobs: int = 1, wait_s: float = 0.0) -> list[Any]:
        current = self._queues_now() if self._started or not self.warm.is_set() else \
            await asyncio.to_thread(self._queues_now)
        if current is None:
            return []
        return self._note_fetched(await self._client.fetch(worker, current, max_jobs=max_jobs, wait_s=wait_s))

    async def ack_many(self, worker: str, items: Any) -> list[Any]:
        return self._note_acked(items, await self._client.ack_many(worker, items))

    async def fail_many(self, worker: str, items: Any) -> list[Any]:
        self._note_failed(items)
        return await self._client.fail_many(worker, items)


def _await_warmup(timed: _TimedClient) -> None:
    if not timed.warm.wait(WARMUP_S_MAX):
        raise TimeoutError(f"the warm-up job was not acked within {WARMUP_S_MAX:g} s")
    if timed.warmup_error is not None:
        raise RuntimeError(f"the warm-up job failed: {timed.warmup_error}")


def _warmup_queue(config: RoleConfig, index: int) -> str:
    return f"{config.queue}.warmup{index}"


def _runtime_worker(index: int, config: RoleConfig, channels: Channels) -> dict:
    from raftq.client.worker import Worker

    warmup_queue = _warmup_queue(config, index)
    handler = handler_for(config.kind, config.cpu_loops)
    tally = _Tally(channels.acked)
    children_rss: list[int] = []
    with config.client() as client:
        timed = _TimedClient(client, config.queue, warmup_queue, tally, channels)
        worker = Worker(timed, {config.queue: handler, warmup_queue: handler}, queues=[config.queue, warmup_queue],
                        concurrency=config.concurrency, pool=config.pool, wait_s=RUNTIME_WAIT_S,
                        worker_id=f"bench-w{index}", **config.worker_options())

        def conductor() -> None:
            try:
                client.submit(warmup_queue, {"t": time.time(), "pad": ""})
                _await_warmup(timed)
                channels.results.put(("ready", "worker", index))
                channels.stop.wait(poll_s=STOP_POLL_S)
                children_rss.append(_children_peak_rss_kib())  # a process pool's children end with the Worker
            except BaseException:
                channels.results.put(("error", "worker", index, traceback.format_exc()))
            finally:
                worker.stop("bench: the run is over")

        thread = threading.Thread(target=conductor, name="bench-conductor", daemon=True)
        thread.start()
        stats = worker.run()
        thread.join(5.0)
    return tally.result(rss_peak_kib=peak_rss_kib(), children_rss_peak_kib=sum(children_rss),
                        lost=stats.lost, released=stats.released)


async def _async_runtime_worker(index: int, config: RoleConfig, channels: Channels) -> dict:
    from raftq.client.worker import Worker

    warmup_queue = _warmup_queue(config, index)
    handler = handler_for(config.kind, config.cpu_loops, asynchronous=True)
    tally = _Tally(channels.acked)
    loop = asyncio.get_running_loop()
    async with config.client(asynchronous=True) as client:
        timed = _AsyncTimedClient(client, config.queue, warmup_queue, tally, channels)
        worker = Worker(timed, {config.queue: handler, warmup_queue: handler}, queues=[config.queue, warmup_queue],
                        concurrency=config.concurrency, pool="asyncio", wait_s=RUNTIME_WAIT_S,
                        worker_id=f"bench-w{index}", **config.worker_options())

        def conductor() -> None:
            try:
                asyncio.run_coroutine_threadsafe(client.submit(warmup_queue, {"t": time.time(), "pad": ""}),
                                                 loop).result(CALL_DEADLINE_S)
                _await_warmup(timed)
                channels.results.put(("ready", "worker", index))
                channels.stop.wait(poll_s=STOP_POLL_S)
            except BaseException:
                channels.results.put(("error", "worker", index, traceback.format_exc()))
            finally:
                worker.stop("bench: the run is over")

        thread = threading.Thread(target=conductor, name="bench-conductor", daemon=True)
        thread.start()
        stats = await worker.arun()
        await asyncio.to_thread(thread.join, 5.0)
    return tally.result(rss_peak_kib=peak_rss_kib(), children_rss_peak_kib=0,
                        lost=stats.lost, released=stats.released)
