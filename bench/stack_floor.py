"""`raftq bench floor`: what raftq's fixed stack costs by itself, without raftq.

    raftq bench floor                     1,000 one-job submits, 3 runs
    raftq bench floor --jobs 3000 --runs 5

Theory of operation
-------------------
The SPEC fixes the stack: Python, HTTP/1.1 over aiohttp (uvloop where available), msgpack bodies,
prometheus-client. This bench runs the least a replicated, fsynced one-job submit can do on it,
with the hops and disk writes of raftq's and no more, so that a figure of raftq's can be split
into what the stack takes and what raftq's own work takes (Raft, the WAL's records, validation,
the queue state machine, auth and the other middlewares):

    producer ──HTTP POST──► leader ──WebSocket frame──► follower × 2
                              │ write + fdatasync          │ write + fdatasync, answer
                              ◄──────── one answer (with the leader's own write: 2 of 3) ┘
                              answers 201

Three processes (`python -m raftq.bench.stack_floor follower|leader ...`) on loopback, each an
aiohttp server on uvloop; each appends every entry to a preallocated file (as the WAL does) and
fdatasyncs it before it counts (leader) or answers (follower). The leader serves raftq's submit path
(`POST /v1/queues/{queue}/jobs`, msgpack in and out), so the producer is raftq's own `Client`
calling `submit()`, one job at a time, each waited for: the producer of `raftq bench --scenario
submit --batch 1 --producers 1`. Nothing else is checked or kept: no term, no index check, no
record framing, no state. It is not a queue and must not be mistaken for one.

It prints, per run and as medians: one-job submits/s with p50 / p99 latency, and the three
processes' RSS (now and peak), which is the footprint of the stack with nothing held. So that
the servers' memory is the stack's, they import only it: what the parent alone uses (raftq's
client, the bench's helpers) is imported where it is used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Sequence

#: Each process's file is preallocated to this size, so an fdatasync never commits a size change.
FILE_BYTES = 64 << 20
#: Waits for a process to listen, and for the leader's peer links to open.
START_TIMEOUT_S = 30.0
QUEUE = "floor"
#: Jobs submitted before each run's clock starts (connections open, code paths warm).
WARMUP_JOBS = 100


# ---------------------------------------------------------------------------- the two servers


def _open_log(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.posix_fallocate(fd, 0, FILE_BYTES)
    os.fsync(fd)
    return fd


class _Log:
    """A preallocated file that frames are appended to, wrapping around at its end."""

    def __init__(self, path: str) -> None:
        self._fd = _open_log(path)
        self._offset = 0

    def append_and_sync(self, data: bytes) -> None:
        if self._offset + len(data) > FILE_BYTES:
            self._offset = 0
        os.pwrite(self._fd, data, self._offset)
        self._offset += len(data)
        os.fdatasync(self._fd)


async def _serve(app, port: int) -> None:
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


async def _follower(port: int, path: str) -> None:
    import msgpack
    from aiohttp import WSMsgType, web

    log = _Log(path)

    async def stream(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is not WSMsgType.BINARY:
                continue
            index = msgpack.unpackb(message.data)["index"]  # a follower has to read what it stores
            log.append_and_sync(message.data)
            await ws.send_bytes(msgpack.packb({"index": index}))
        return ws

    app = web.Application()
    app.router.add_get("/stream", stream)
    await _serve(app, port)


async def _leader(port: int, path: str, follower_ports: Sequence[int]) -> None:
    import msgpack
    from aiohttp import ClientSession, web

    log = _Log(path)
    waiting: dict[int, asyncio.Future] = {}
    last_index = 0
    session = ClientSession()
    links = [await session.ws_connect(f"http://127.0.0.1:{p}/stream") for p in follower_ports]

    async def read_answers(ws) -> None:
        async for message in ws:
            future = waiting.pop(msgpack.unpackb(message.data)["index"], None)
            if future is not None and not future.done():
                future.set_result(None)

    answer_readers = [asyncio.create_task(read_answers(ws)) for ws in links]  # referenced while the leader runs

    async def submit(request: web.Request) -> web.Response:
        nonlocal last_index
        jobs = msgpack.unpackb(await request.read())["jobs"]
        last_index += 1
        index = last_index
        entry = msgpack.packb({"index": index, "queue": request.match_info["queue"], "jobs": jobs})
        answered = asyncio.get_running_loop().create_future()
        waiting[index] = answered
        for ws in links:
            await ws.send_bytes(entry)
        log.append_and_sync(entry)  # the leader's copy, while the followers write theirs
        await answered  # one follower's copy: with the leader's own, 2 of 3
        ids = [f"{index}-{i}" for i in range(len(jobs))]
        return web.Response(status=201, body=msgpack.packb({"ids": ids}), content_type="application/msgpack")

    app = web.Application()
    app.router.add_post("/v1/queues/{queue}/jobs", submit)
    try:
        await _serve(app, port)
    finally:
        for reader in answer_readers:
            reader.cancel()


def _serve_role(argv: Sequence[str]) -> None:
    from raftq.cluster.lean_aiohttp import import_aiohttp

    import_aiohttp()  # as a node imports it (without the tables no node reads)
    import prometheus_client  # noqa: F401 (every node loads it: its memory is part of the floor)

    try:
        import uvloop
    except ImportError:
        uvloop = None
    role, port, path, *peers = argv
    coroutine = _follower(int(port), path) if role == "follower" else _leader(int(port), path, [int(p) for p in peers])
    if uvloop is not None:
        uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)


# ---------------------------------------------------------------------------- the bench


class _Chain:
    """The three processes, their files in `directory`, stopped on exit."""

    def __init__(self, directory: str) -> None:
        from raftq.cluster.localcluster import free_ports

        self.directory = directory
        self.leader_port, *self.follower_ports = free_ports(3)
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> "_Chain":
        for i, port in enumerate(self.follower_ports):
            self._start("follower", port, f"follower{i + 1}")
        for port in self.follower_ports:
            _wait_listening(port)
        self._start("leader", self.leader_port, "leader", *map(str, self.follower_ports))
        _wait_listening(self.leader_port)
        return self

    def _start(self, role: str, port: int, name: str, *peers: str) -> None:
        log = open(os.path.join(self.directory, f"{name}.log"), "wb")
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "raftq.bench.stack_floor", role, str(port),
             os.path.join(self.directory, f"{name}.data"), *peers],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log.close()

    def __exit__(self, *exc_info) -> None:
        from raftq.bench.measure import stop_processes

        stop_processes(self.processes)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.leader_port}"


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1.0)
        except urllib.error.HTTPError:
            return  # it answers (404, 405: no route there), so it listens
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port} after {START_TIMEOUT_S:.0f} s") from None
            time.sleep(0.05)
        else:
            return


def _run(chain: _Chain, jobs: int, payload: dict) -> dict:
    from raftq import Client
    from raftq.bench.roles import peak_rss_kib, rss_kib

    client = Client(chain.url)
    try:
        for _ in range(WARMUP_JOBS):
            client.submit(QUEUE, payload)
        latencies = []
        started = time.perf_counter()
        for _ in range(jobs):
            sent = time.perf_counter()
            client.submit(QUEUE, payload)
            latencies.append(time.perf_counter() - sent)
        elapsed = time.perf_counter() - started
    finally:
        client.close()
    latencies.sort()
    pids = [process.pid for process in chain.processes]
    return {
        "submits_per_s": jobs / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
        "rss_mib": sum(rss_kib(pid) or 0 for pid in pids) / 1024,
        "rss_peak_mib": sum(peak_rss_kib(pid) or 0 for pid in pids) / 1024,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raftq bench floor",
        description="One-job submits and memory of raftq's fixed stack (aiohttp, uvloop, msgpack; three processes, "
                    "an fdatasync on each) without raftq's own work: what a raftq figure cannot go below here.")
    p.add_argument("--jobs", type=int, default=1000, help="one-job submits per run (default 1000)")
    p.add_argument("--runs", type=int, default=3, help="runs, each on fresh processes; medians reported (default 3)")
    p.add_argument("--payload-bytes", type=int, default=100, help="bytes of padding in each payload (default 100)")
    p.add_argument("--data-dir", default=None,
                   help="where the three files go (default: a temporary folder; put it on the disk raftq uses)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.jobs < 1 or args.runs < 1 or args.payload_bytes < 0:
        parser.error("--jobs and --runs ≥ 1, --payload-bytes ≥ 0")
    payload = {"t": time.time(), "pad": "x" * args.payload_bytes}
    print(f"raftq bench floor: {args.jobs:,} one-job submits a run, {args.runs} runs; the stack alone "
          f"(3 processes, an fdatasync on each, no Raft, no queue); machine: {os.cpu_count()} cores", flush=True)
    results = []
    for run in range(1, args.runs + 1):
        directory = tempfile.mkdtemp(prefix="raftq-bench-floor-", dir=args.data_dir)
        try:
            with _Chain(directory) as chain:
                result = _run(chain, args.jobs, payload)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        results.append(result)
        print(f"run {run}: {result['submits_per_s']:,.0f} submits/s, p50 {result['p50_ms']:.2f} ms, "
              f"p99 {result['p99_ms']:.2f} ms; RSS of the three {result['rss_mib']:.1f} MiB "
              f"(peak {result['rss_peak_mib']:.1f})", flush=True)
    median = {key: statistics.median(r[key] for r in results) for key in results[0]}
    print(f"median: {median['submits_per_s']:,.0f} one-job submits/s (p50 {median['p50_ms']:.2f} ms, "
          f"p99 {median['p99_ms']:.2f} ms); RSS of the three processes {median['rss_mib']:.1f} MiB "
          f"(peak {median['rss_peak_mib']:.1f})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("follower", "leader"):
        _serve_role(sys.argv[1:])
    else:
        sys.exit(main(sys.argv[1:]))
