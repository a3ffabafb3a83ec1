"""Graceful stop and rolling restarts (issue 13, Build 2), with real processes under load.

SIGTERM: a node answers its long polls at once, finishes the requests in flight and exits 0.
`raftq admin rolling-restart` (here `rolling_restart` with a restart that SIGTERMs the process
and starts it again, as `systemctl restart` would) restarts all three nodes, followers first and
the leader last, while a producer submits and a worker leases and acks: no client call fails
after its retries, every job submitted is acked exactly as the worker saw it, a follower's
restart costs no election and the leader's at most one.
"""

from __future__ import annotations

import threading
import time

from raftq.client import Client
from raftq.cluster.localcluster import LocalCluster, http_json, wait_until
from raftq.admin import ClusterView, rolling_restart

QUEUE = "rolling"


def test_sigterm_answers_long_polls_and_exits_cleanly(single_node):
    node = single_node.nodes["n1"]
    answer: dict = {}

    def long_poll() -> None:
        with Client(single_node.urls, timeout=30, deadline=60) as client:
            started = time.monotonic()
            answer["jobs"] = client.fetch("w-sigterm", ["nothing-here"], wait_s=20)
            answer["seconds"] = time.monotonic() - started

    poller = threading.Thread(target=long_poll)
    poller.start()
    # The worker is registered just before its fetch starts waiting, with no await between.
    wait_until(lambda: any(w.get("worker") == "w-sigterm" for w in
                           http_json(single_node.urls[0] + "/v1/workers")[1].get("workers", [])),
               timeout_s=10, what="the long poll to be waiting")
    node.process.terminate()
    poller.join(timeout=30)
    assert answer.get("jobs") == [], answer
    assert answer["seconds"] < 10, f"the 20 s long poll held the stop for {answer['seconds']:.1f} s"
    assert node.process.wait(timeout=15) == 0
    log = single_node.log_text("n1")
    assert "long polls answer now" in log and log.rstrip().endswith("stopped"), log[-2000:]


class _Load:
    """A producer and a worker (real worker runtime) through the client; any failure is kept."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.submitted: list[str] = []
        self.done: list[str] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self.worker = None
        self.threads = [threading.Thread(target=self._guard, args=(f,)) for f in (self._produce, self._work)]

    def _guard(self, role) -> None:
        try:
            with Client(self.urls, timeout=5, deadline=60) as client:
                role(client)
        except BaseException as exc:
            self.errors.append(exc)

    def _produce(self, client: Client) -> None:
        n = 0
        while not self.stopping.is_set():
            self.submitted += client.submit_many(QUEUE, [{"n": n + i} for i in range(5)])
            n += 5
            self.stopping.wait(0.02)

    def _work(self, client: Client) -> None:
        from raftq.client.worker.runtime import Worker

        self.worker = Worker(client, {QUEUE: lambda job: self.done.append(job.id)}, concurrency=4, wait_s=1.0,
                             grace_s=5)
        self.worker.run()


def test_rolling_restart_under_load_fails_no_request_and_loses_nothing(tmp_path):
    with LocalCluster(str(tmp_path / "cluster"), size=3, extra_args=["--worker-timeout", "3"]) as cluster:
        load = _Load(cluster.urls)
        for thread in load.threads:
            thread.start()
        try:
            wait_until(lambda: len(load.done) >= 50 or load.errors, timeout_s=30, what="the load to run")

            def restart_one(node_id: str) -> None:
                cluster.terminate(node_id)  # SIGTERM, as systemctl restart sends
                assert cluster.nodes[node_id].process.returncode == 0, cluster.log_text(node_id)[-2000:]
                cluster.start_node(node_id)

            lines: list[str] = []
            reports = rolling_restart(ClusterView(cluster.urls, token=None, ca_file=None), restart_one,
                                      catch_up_timeout_s=60, say=lines.append)
            done_at_end = len(load.done)
            wait_until(lambda: len(load.done) >= done_at_end + 50 or load.errors, timeout_s=30,
                       what="the load to go on after the restarts")
        finally:
            load.stopping.set()
            load.threads[0].join(timeout=60)
            submitted = set(load.submitted)
            wait_until(lambda: submitted <= set(load.done) or load.errors, timeout_s=60,
                       what="every submitted job to be done", seen=lambda: len(submitted - set(load.done)))
            if load.worker is not None:
                load.worker.stop()
            load.threads[1].join(timeout=60)
        print("\n".join(lines))
        assert not load.errors, load.errors
        assert [r["was_leader"] for r in reports] == [False, False, True], reports
        assert reports[-1]["term_before"] is not None
        for report in reports[:2]:
            assert report["term_after"] == report["term_before"], f"a follower's restart caused an election: {report}"
        assert reports[2]["term_after"] - reports[2]["term_before"] <= 1, f"more than one election: {reports[2]}"
        cluster.wait_converged()
        # A leader stopped with a bare SIGTERM (as Kubernetes and `systemctl stop` send) hands
        # leadership on first: one election, with no election timeout to wait out.
        leader = cluster.wait_for_leader()
        term = cluster.status(leader)["term"]
        cluster.terminate(leader)
        assert "handed leadership to" in cluster.log_text(leader), cluster.log_text(leader)[-2000:]
        successor = cluster.wait_for_leader(exclude=leader)
        assert cluster.status(successor)["term"] == term + 1


def test_the_probe_command_answers_for_a_live_node_and_fails_for_a_stopped_one(single_node, tmp_path):
    import os
    import subprocess
    import sys

    def probe(*args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTQ_")}
        return subprocess.run([sys.executable, "-m", "raftq", "admin", "--nodes", single_node.urls[0], "probe", *args],
                              capture_output=True, text=True, timeout=60, env=env)

    single_node.wait_for_leader()
    assert probe().returncode == 0 and probe("--ready").returncode == 0
    single_node.terminate("n1")
    stopped = probe("--ready")
    assert stopped.returncode == 1 and "no answer" in stopped.stderr, stopped
