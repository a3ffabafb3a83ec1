"""The Celery-like task API: payload shape, submit options, dispatch by task name."""

from __future__ import annotations

import pickle

import pytest

from raftq.client.app import App, Dispatch, Task
from raftq.client.worker import Reject, TimeLimits
from raftq import LeasedJob
from tests.unit.client.fakes import AsyncFake, FakeCluster

app = App("http://127.0.0.1:7001, http://127.0.0.1:7002", default_queue="jobs")


@app.task(queue="emails", max_attempts=3, priority=5, lease_s=60)
def send(to, *, lang="en"):
    return f"{to}:{lang}"


@app.task
def add(a, b):
    return a + b


@app.task(name="custom.name")
async def double(x):
    return 2 * x


class Recorder:
    def __init__(self):
        self.calls = []

    def submit(self, queue, payload, **options):
        self.calls.append((queue, payload, options))
        return f"id-{len(self.calls)}"


@pytest.fixture
def recorder():
    previous = app._client
    app.client = Recorder()
    yield app.client
    app.client = previous


def test_submit_sends_the_task_call_payload_with_the_task_options(recorder):
    assert send.submit("a@example.com", lang="de") == "id-1"
    assert recorder.calls == [("emails", {"task": "test_app.send", "args": ["a@example.com"], "kwargs": {"lang": "de"}},
                               {"priority": 5, "delay_s": None, "max_attempts": 3, "lease_s": 60,
                                "idempotency_key": None})]


def test_submit_with_overrides_per_job_options(recorder):
    add.submit_with((1, 2), delay_s=30, priority=9, idempotency_key="k-1")
    [(queue, payload, options)] = recorder.calls
    assert queue == "jobs" and payload == {"task": "test_app.add", "args": [1, 2], "kwargs": {}}
    assert options == {"priority": 9, "delay_s": 30, "max_attempts": None, "lease_s": None, "idempotency_key": "k-1"}


def test_arguments_must_be_msgpack_data(recorder):
    with pytest.raises(TypeError, match="test_app.add: arguments must be msgpack-serialisable"):
        add.submit(object(), 1)
    assert recorder.calls == []


def test_calling_a_task_runs_it_here():
    assert add(2, 3) == 5 and send("x") == "x:en"
    assert isinstance(add, Task) and add.__name__ == "add" and add.queue == "jobs"


def test_names_and_options_are_checked():
    local = App(["http://127.0.0.1:7001"])
    local.task(lambda: None, name="same")
    with pytest.raises(ValueError, match="already registered"):
        local.task(lambda: None, name="same")
    with pytest.raises(ValueError, match="priority"):
        local.task(lambda: None, name="p", priority=10)
    assert app.tasks["custom.name"] is double and app.nodes == ["http://127.0.0.1:7001", "http://127.0.0.1:7002"]


def test_dispatch_runs_the_named_task_and_rejects_unknown_or_malformed_calls():
    dispatch = Dispatch(app.tasks)
    job = LeasedJob("j1", "jobs", add.payload((4, 5)), 1, 1, 0.0)
    assert dispatch(job) == 9
    with pytest.raises(Reject, match="unknown task 'nope'.*known: custom.name, test_app.add, test_app.limited, test_app.send"):
        dispatch(LeasedJob("j2", "jobs", {"task": "nope", "args": [], "kwargs": {}}, 1, 1, 0.0))
    with pytest.raises(Reject, match="not a task call"):
        dispatch(LeasedJob("j3", "jobs", [1, 2], 1, 1, 0.0))


def test_app_worker_dispatches_by_name_and_dead_letters_unknown_tasks():
    cluster = FakeCluster()
    good = cluster.add("jobs", add.payload((1, 2)))
    mail = cluster.add("emails", send.payload(("b@example.com",)))
    unknown = cluster.add("jobs", {"task": "gone.task", "args": [], "kwargs": {}}, max_attempts=5)
    stats = app.worker(client=cluster, burst=True, heartbeat_s=0.05).run()
    assert sorted(cluster.acks) == sorted([(good, 3), (mail, "b@example.com:en")])
    [(failed_id, error, retry, _)] = cluster.fails
    assert (failed_id, retry) == (unknown, False) and "unknown task 'gone.task'" in error
    assert cluster.state(unknown) == "dead" and stats.rejected == 1


def test_app_worker_with_the_asyncio_pool_awaits_async_tasks():
    cluster = FakeCluster()
    one, two = cluster.add("jobs", double.payload((21,))), cluster.add("jobs", add.payload((2, 2)))
    app.worker(client=AsyncFake(cluster), pool="asyncio", queues=["jobs"], burst=True, heartbeat_s=0.05).run()
    assert sorted(cluster.acks) == sorted([(one, 42), (two, 4)])


def test_tasks_pickle_by_reference_for_process_pools():
    assert pickle.loads(pickle.dumps(add)) is add
    local = App(["http://127.0.0.1:7001"])

    @local.task
    def nested():
        return None

    with pytest.raises(pickle.PicklingError, match="module top level"):
        pickle.dumps(nested)


def test_app_worker_with_the_processes_pool():
    cluster = FakeCluster()
    ids = [cluster.add("jobs", add.payload((n, n))) for n in range(3)]
    stats = app.worker(client=cluster, pool="processes", concurrency=2, queues=["jobs"], burst=True,
                       heartbeat_s=0.05).run()
    assert sorted(cluster.acks) == sorted((job_id, 2 * n) for n, job_id in enumerate(ids))
    assert stats.succeeded == 3


class ScheduleRecorder(Recorder):
    def put_schedule(self, name, **spec):
        self.calls.append(("put_schedule", name, spec))
        return {"name": name, **spec}


def test_periodic_tasks_declare_their_schedules_when_the_worker_starts():
    periodic_app = App("http://127.0.0.1:7001", default_queue="jobs")

    @periodic_app.periodic(cron="*/5 * * * *", timezone="Europe/Paris", overlap="skip", queue="reports",
                           args=(7,), name="reports.refresh")
    def refresh(n):
        return n

    with pytest.raises(ValueError):
        periodic_app.periodic(lambda: None)  # neither cron nor every_s
    recorder = periodic_app.client = ScheduleRecorder()
    periodic_app.worker(client=FakeCluster(), burst=True, heartbeat_s=0.05).run()
    assert recorder.calls == [("put_schedule", "reports.refresh", {
        "queue": "reports", "payload": {"task": "reports.refresh", "args": [7], "kwargs": {}}, "cron": "*/5 * * * *",
        "every_s": None, "timezone": "Europe/Paris", "overlap": "skip", "catch_up": None, "priority": None,
        "max_attempts": None, "lease_s": None})]
    assert refresh(3) == 3 and "reports.refresh" in periodic_app.tasks


@app.task(soft_time_limit=5, time_limit=10)
def limited():
    return "ok"


def test_time_limits_travel_with_the_call_and_win_over_the_task_s(recorder):
    limited.apply_async(time_limit=2)
    [(_, payload, _)] = recorder.calls
    assert payload == {"task": "test_app.limited", "args": [], "kwargs": {}, "time_limit": 2}
    job = LeasedJob("j1", "jobs", payload, 1, 1, 0.0)
    assert Dispatch(app.tasks).time_limits(job) == TimeLimits(soft_s=5, hard_s=2)
    plain = LeasedJob("j2", "jobs", add.payload((1, 2)), 1, 1, 0.0)
    assert Dispatch(app.tasks).time_limits(plain) == TimeLimits()


def test_time_limits_are_checked_at_submit_and_at_dispatch(recorder):
    with pytest.raises(ValueError, match="time_limit must be a positive number"):
        limited.apply_async(time_limit=0)
    with pytest.raises(ValueError, match="soft_time_limit"):
        app.task(soft_time_limit="5")(lambda: None)
    bad = LeasedJob("j1", "jobs", {**limited.payload(), "time_limit": "soon"}, 1, 1, 0.0)
    with pytest.raises(Reject, match="time_limit must be a positive number"):
        Dispatch(app.tasks).time_limits(bad)
