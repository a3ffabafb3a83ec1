"""One behaviour suite for every Worker pool (threads, processes, asyncio) against a real node.

Each test runs once per pool with the same handlers (top-level functions in worker_apps.py, so the
process pool can pickle them) and the same expectations: results kept, failures sent to the
dead-letter queue with the handler's traceback, every job acked once, buffered jobs handed back
unstarted (no attempt counted) when the worker stops, and a job that finishes within the grace
period acked rather than handed back. Time limits (App tasks, apply_async): a soft limit raises in
the job, a hard limit fails it, and the jobs beside it are not touched; the process pool kills and
replaces only the child past its hard limit.
"""

from __future__ import annotations

import asyncio
import collections
import threading

import pytest

from raftq import AsyncClient, Client, Worker
from raftq.client.app import AsyncDispatch, Dispatch
from raftq.cluster.localcluster import wait_until
from tests.integration import worker_apps

POOLS = ["threads", "processes", "asyncio"]


class Running:
    """A Worker of one pool on a thread of its own, with the client that pool needs."""

    def __init__(self, pool: str, urls: list[str], handlers: dict, **options) -> None:
        self.pool = pool
        self.client = AsyncClient(urls) if pool == "asyncio" else Client(urls)
        self.worker = Worker(self.client, handlers, pool=pool, wait_s=0.5, heartbeat_s=0.5, **options)
        self.stats = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            if self.pool == "asyncio":
                self.stats = asyncio.run(self._arun())
            else:
                with self.client:
                    self.stats = self.worker.run()
        except BaseException as exc:  # reported by join()
            self.error = exc

    async def _arun(self):
        async with self.client:
            return await self.worker.arun()

    def join(self, timeout_s: float = 60.0):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the {self.pool} worker did not stop within {timeout_s} s"
        assert self.error is None, f"the {self.pool} worker failed: {self.error!r}"
        return self.stats


@pytest.mark.parametrize("pool", POOLS)
def test_burst_keeps_results_dead_letters_failures_and_acks_each_job_once(single_node, pool):
    with Client(single_node.urls) as client:
        ok = client.submit_many("squares", [{"n": n} for n in range(40)])
        # One attempt: a burst ends when the queues are empty, before a retry's backoff would be due.
        bad = client.submit_many("explodes", [{"n": n} for n in range(3)], max_attempts=1)
        stats = Running(pool, single_node.urls, {"squares": worker_apps.square, "explodes": worker_apps.explode},
                        concurrency=3, burst=True).join()
        assert [client.get(job_id)["result"] for job_id in ok] == [n * n for n in range(40)]
        for n, job_id in enumerate(bad):
            record = client.get(job_id)
            assert (record["state"], record["attempts"]) == ("dead", 1), record
            assert f"ValueError: bad n {n}" in record["last_error"] and "in explode" in record["last_error"]
        assert (stats.succeeded, stats.failed, stats.lost, stats.dropped) == (40, 3, 0, 0), stats
        depth = client.queues()
        assert depth["squares"]["done"] == 40 and depth["explodes"]["dead"] == 3


@pytest.mark.parametrize("pool", POOLS)
def test_stop_releases_buffered_jobs_and_lets_the_running_one_finish(single_node, pool, tmp_path):
    hold = tmp_path / "hold"
    hold.write_text("")
    with Client(single_node.urls) as client:
        held_id = client.submit("holds", {"path": str(hold)})
        ids = client.submit_many("holds", [{"path": str(tmp_path / "never")} for _ in range(4)])
        running = Running(pool, single_node.urls, {"holds": worker_apps.hold_while_file_exists}, concurrency=1,
                          prefetch=4, grace_s=60, worker_id=f"pools-{pool}")
        try:
            wait_until(lambda: client.get(held_id)["state"] == "leased" and
                       [client.get(i)["state"] for i in ids] == ["leased"] * 4,
                       timeout_s=60, what="1 running + 4 buffered leases",
                       seen=lambda: [client.get(i)["state"] for i in [held_id, *ids]])
            running.worker.stop()
            # Handed back at once, unstarted: ready again with no attempt counted, long before any lease ran out.
            wait_until(lambda: [client.get(i)["state"] for i in ids] == ["ready"] * 4, timeout_s=15,
                       what="the four buffered jobs released", seen=lambda: [client.get(i)["state"] for i in ids])
            assert [client.get(i)["attempts"] for i in ids] == [0] * 4
            assert running.thread.is_alive()  # the running job still has its grace period
        finally:
            hold.unlink()
        stats = running.join()
        record = client.get(held_id)
        assert (record["state"], record["result"], record["attempts"]) == ("done", "held", 1), record
        assert (stats.released, stats.succeeded) == (4, 1), stats
        assert collections.Counter(client.get(i)["state"] for i in ids) == {"ready": 4}


@pytest.fixture
def tasks_on(single_node):
    """worker_apps' App submitting to this test's node; (client, the handlers a pool's worker runs)."""
    app = worker_apps.app
    with Client(single_node.urls) as client:
        app.client = client
        try:
            yield client, lambda pool: {"limits": (AsyncDispatch if pool == "asyncio" else Dispatch)(app.tasks)}
        finally:
            app.client = None


@pytest.mark.parametrize("pool", POOLS)
def test_soft_limit_raises_in_the_job_hard_limit_fails_it_and_other_jobs_run_on(single_node, tasks_on, pool):
    client, handlers = tasks_on
    cleaned = worker_apps.cleans_up_at_soft_limit.delay()  # the task's own soft limit, 0.5 s
    hard = worker_apps.spins.apply_async(time_limit=1)
    soft = worker_apps.spins.apply_async(soft_time_limit=0.5, time_limit=30)
    napping = [worker_apps.naps.apply_async(soft_time_limit=0.5)] if pool == "asyncio" else []
    quick = [worker_apps.quick.delay(n) for n in range(6)]
    stats = Running(pool, single_node.urls, handlers(pool), concurrency=3, burst=True).join()

    assert cleaned.result(timeout=1) == "cleaned up"
    assert [handle.result(timeout=1) for handle in quick] == [n * n for n in range(6)]
    expected_hard = "its pool process was killed and replaced" if pool == "processes" else "TimeLimitExceeded"
    for handle, error, where in [(hard, "TimeLimitExceeded: hard time limit of 1 s exceeded", expected_hard),
                                 (soft, "SoftTimeLimitExceeded: soft time limit of 0.5 s exceeded", "in spins"),
                                 *[(h, "SoftTimeLimitExceeded: soft time limit of 0.5 s", "in naps") for h in napping]]:
        record = handle.record()
        assert (record["state"], record["attempts"]) == ("dead", 1), record
        assert record["last_error"].startswith(error) and where in record["last_error"], record["last_error"]
    assert (stats.succeeded, stats.failed, stats.lost) == (7, 2 + len(napping), 0), stats


def test_process_pool_kills_and_replaces_only_the_child_past_its_hard_limit(single_node, tasks_on):
    client, handlers = tasks_on
    # Blocks SIGALRM and sleeps in C: the soft limit cannot reach it, only the kill at the hard one.
    stuck = worker_apps.blocks_in_c.apply_async(soft_time_limit=0.3, time_limit=1)
    neighbour = worker_apps.pid_after.delay(2.5)  # on the other child, running across the kill
    later = [worker_apps.pid_after.delay(0) for _ in range(4)]
    stats = Running("processes", single_node.urls, handlers("processes"), concurrency=2, prefetch=0,
                    burst=True).join()

    record = stuck.record()
    assert (record["state"], record["attempts"]) == ("dead", 1), record
    assert record["last_error"].startswith("TimeLimitExceeded: hard time limit of 1 s exceeded; its pool process "
                                           "was killed and replaced"), record["last_error"]
    neighbour_record = neighbour.record()  # max_attempts=1: a kill would have sent it to the DLQ
    assert (neighbour_record["state"], neighbour_record["attempts"]) == ("done", 1), neighbour_record
    assert all(isinstance(handle.result(timeout=1), int) for handle in later)
    assert (stats.succeeded, stats.failed) == (5, 1), stats
