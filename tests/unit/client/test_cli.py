"""`raftq` command line: parsing, delegation, tables, and errors without tracebacks.

A tiny aiohttp server speaks the few API paths the commands use (in JSON or msgpack, as asked),
so the real client library sits between the CLI and the "cluster".
"""

from __future__ import annotations

import json
import socket
import sys
import textwrap

import pytest
from aiohttp import web

from raftq.client import cli
from raftq import command
from tests.unit.client.fakes import ApiServer, FakeCluster



# ---------------------------------------------------------------------------- a tiny API server


class TinyServer(ApiServer):
    """Adds the paths the inspection commands use: /v1/cluster, /v1/queues, submit, job, cancel, DLQ."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[tuple[str, list]] = []  # (queue, [job specs]) per request
        self.dead = {"emails": [{"id": "d1", "attempts": 5, "last_error": "ValueError: bad address\n\nTraceback..."}]}
        self.jobs = {"j1": {"id": "j1", "queue": "emails", "state": "done", "attempts": 1, "payload": {"to": "a"},
                            "created_at": 1_700_000_000.5}}

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/cluster", self.cluster_status)
        router.add_get("/v1/queues", self.queues)
        router.add_post("/v1/queues/{queue}/jobs", self.submit)
        router.add_get("/v1/jobs/{id}", self.job)
        router.add_post("/v1/jobs/{id}/cancel", self.cancel)
        router.add_get("/v1/queues/{queue}/dead", self.dead_list)
        router.add_post("/v1/queues/{queue}/dead/redrive", self.redrive)
        router.add_post("/v1/queues/{queue}/dead/purge", self.purge)

    async def cluster_status(self, request):
        return self.respond(request, {"node": "n1", "role": "leader", "term": 3, "leader": "n1",
                                      "leader_url": self.url, "commit_index": 42, "applied_index": 41,
                                      "nodes": [{"id": "n1", "url": self.url, "leader": True}]})

    async def queues(self, request):
        return self.respond(request, {"queues": {"emails": {"ready": 2, "leased": 1, "dead": 1, "done": 7},
                                                 "reports": {"scheduled": 3}},
                                      "settings": {"emails": {"rate_per_s": 2.5, "burst": 5, "max_running_per_key": 2,
                                                              "fifo": False, "max_depth": None},
                                                   "reports": {"rate_per_s": None, "burst": None, "fifo": False,
                                                               "max_running_per_key": None, "max_depth": None}},
                                      "held_back": {"emails": {"rate": 1, "key": 1, "fifo": 0},
                                                    "reports": {"rate": 0, "key": 0, "fifo": 0}}})

    async def submit(self, request):
        jobs = (await self.body(request))["jobs"]
        self.submitted.append((request.match_info["queue"], jobs))
        first = sum(len(batch) for _, batch in self.submitted) - len(jobs)
        return self.respond(request, {"ids": [f"id{first + i}" for i in range(len(jobs))]}, 201)

    async def job(self, request):
        record = self.jobs.get(request.match_info["id"])
        if record is None:
            return self.error(request, 404, "not_found", f"no job {request.match_info['id']}")
        return self.respond(request, record)

    async def cancel(self, request):
        if request.match_info["id"] == "j1":
            return self.error(request, 409, "conflict", "job j1 is done; it cannot be cancelled")
        return self.respond(request, {"ok": True})

    async def dead_list(self, request):
        return self.respond(request, {"jobs": self.dead.get(request.match_info["queue"], [])})

    async def redrive(self, request):
        ids = (await self.body(request)).get("ids")
        dead = self.dead.get(request.match_info["queue"], [])
        return self.respond(request, {"redriven": len(ids) if ids else len(dead)})

    async def purge(self, request):
        return self.respond(request, {"purged": len(self.dead.pop(request.match_info["queue"], []))})


@pytest.fixture
def server():
    tiny = TinyServer()
    tiny.start()
    yield tiny
    tiny.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------- parsing


def test_global_options_go_before_or_after_the_command(monkeypatch):
    monkeypatch.delenv("RAFTQ_NODES", raising=False)
    parser = cli.build_parser()
    before = parser.parse_args(["--json", "--nodes", "http://a:1", "status"])
    after = parser.parse_args(["status", "--json", "--nodes", "http://a:1"])
    for args in (before, after):
        assert (args.command, args.json, cli._nodes(args)) == ("status", True, ["http://a:1"])
    assert cli._nodes(parser.parse_args(["queues"])) == cli.DEFAULT_NODES.split(",")
    monkeypatch.setenv("RAFTQ_NODES", "http://b:2,http://c:3")
    assert cli._nodes(parser.parse_args(["queues"])) == ["http://b:2", "http://c:3"]


def test_submit_and_worker_options_parse():
    args = cli.build_parser().parse_args(["submit", "emails", "--count", "5", "--batch", "1000", "--priority", "9",
                                          "--delay", "1.5", "--max-attempts", "3"])
    assert (args.queue, args.count, args.batch, args.priority, args.delay, args.max_attempts) == \
        ("emails", 5, 1000, 9, 1.5, 3)
    args = cli.build_parser().parse_args(["worker", "tasks:app", "--concurrency", "8", "--pool", "asyncio",
                                          "--burst", "--queues", "a,b"])
    assert (args.target, args.concurrency, args.pool, args.burst, cli._split(args.queues), args.prefetch) == \
        ("tasks:app", 8, "asyncio", True, ["a", "b"], "auto")
    for given, parsed in [("auto", "auto"), ("0", 0), ("64", 64)]:
        assert cli.build_parser().parse_args(["worker", "tasks:app", "--prefetch", given]).prefetch == parsed
    args = cli.build_parser().parse_args(["worker", "tasks:app", "--time-limit", "30", "--soft-time-limit", "25"])
    assert (args.time_limit, args.soft_time_limit) == (30.0, 25.0)


def test_worker_prefetch_flag_is_checked(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_make_client", lambda *args, **kwargs: ClosingFake())
    with pytest.raises(SystemExit) as exit_:
        cli.main(["worker", "tasks:app", "--prefetch", "lots"])
    assert exit_.value.code == 2 and "expected auto or a number of jobs" in capsys.readouterr().err


def test_node_forwards_the_rest_of_the_command_line(monkeypatch):
    from raftq.cluster import main as node_main

    seen = []
    monkeypatch.setattr(node_main, "main", lambda argv: seen.append(argv) or 7)
    assert command.main(["--json", "node", "--id", "n2", "--port", "7002", "--json"]) == 7
    assert seen == [["--id", "n2", "--port", "7002", "--json"]]


def test_bench_gets_the_global_nodes_and_token():
    assert command.split_delegated(
        ["--nodes", "http://a:1", "--json", "--token=t", "--timeout", "3", "bench", "--jobs", "5"]) \
        == ("bench", ["--nodes", "http://a:1", "--token=t", "--jobs", "5"])
    assert command.split_delegated(["--nodes", "http://a:1", "node", "--id", "n1"]) == ("node", ["--id", "n1"])
    assert command.split_delegated(["--nodes", "http://a:1", "status"]) is None


def test_bench_without_its_module_is_a_clear_error(monkeypatch, capsys):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(command.importlib, "import_module", missing)
    code = command.main(["bench", "--jobs", "10"])
    err = capsys.readouterr().err
    assert code == 2 and "raftq bench: the benchmark" in err and "Traceback" not in err


def test_client_commands_go_to_the_client_and_help_lists_the_others(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "main", lambda argv, other_commands: seen.append((argv, other_commands)) or 3)
    assert command.main(["--nodes", "http://a:1", "status"]) == 3
    (argv, others), = seen
    assert argv == ["--nodes", "http://a:1", "status"] and sorted(others) == ["admin", "bench", "chaos", "node"]
    help_text = cli.build_parser(others).format_help()
    assert "node" in help_text and "bench" in help_text and "submit" in help_text


def test_format_table_aligns_columns():
    table = cli.format_table(["QUEUE", "READY"], [["emails", 2], ["a", 10]])
    assert table.splitlines() == ["QUEUE   READY", "emails  2", "a       10"]


# ---------------------------------------------------------------------------- no node answers


@pytest.mark.parametrize("argv", [["status"], ["queues"], ["submit", "q", "{}"], ["job", "j1"], ["dlq", "list", "q"]])
def test_no_node_answering_is_one_line_and_exit_code_2(capsys, argv):
    nodes = f"http://127.0.0.1:{closed_port()},http://127.0.0.1:{closed_port()}"
    code, out, err = run_cli(capsys, "--nodes", nodes, "--timeout", "0.5", *argv)
    assert code == 2 and out == ""
    assert "no node answered" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- commands against the tiny server


def test_status_table(server, capsys):
    down = f"http://127.0.0.1:{closed_port()}"
    code, out, _ = run_cli(capsys, "--nodes", f"{server.url},{down}", "--timeout", "0.5", "status")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["NODE", "URL", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED"]
    assert lines[1].split() == ["n1", server.url, "leader", "3", "n1", "42", "41"]
    assert lines[2].split() == ["-", down, "down", "-", "-", "-", "-"]


def test_queues_table_and_json(server, capsys):
    code, out, _ = run_cli(capsys, "--nodes", server.url, "queues")
    assert code == 0 and out.splitlines() == [
        "QUEUE    READY  SCHEDULED  LEASED  RETRY_WAIT  DEAD  DONE  CANCELLED  LIMITS (HELD BACK)",
        "emails   2      0          1       0           1     7     0          rate 2.5/s burst 5 (1), per key 2 (1)",
        "reports  0      3          0       0           0     0     0          -",
    ]
    code, out, _ = run_cli(capsys, "--nodes", server.url, "queues", "--json")
    assert json.loads(out)["queues"]["reports"] == {"scheduled": 3}


def test_submit_one_payload_prints_its_id(server, capsys):
    code, out, _ = run_cli(capsys, "--nodes", server.url, "submit", "emails", '{"to": "a@example.com"}',
                           "--priority", "7", "--delay", "2")
    [(queue, [spec])] = server.submitted
    assert code == 0 and out == "id0\n" and queue == "emails"
    assert spec["payload"] == {"to": "a@example.com"} and spec["priority"] == 7 and spec["delay_s"] == 2


def test_submit_count_in_batches(server, capsys):
    code, out, err = run_cli(capsys, "--nodes", server.url, "--json", "submit", "bulk", "--count", "5", "--batch", "2")
    assert code == 0 and json.loads(out) == {"ids": [f"id{i}" for i in range(5)]}
    assert [len(batch) for _, batch in server.submitted] == [2, 2, 1]
    assert [spec["payload"] for _, batch in server.submitted for spec in batch] == [{"n": i} for i in range(5)]
    assert "submitted 5 jobs to bulk" in err


def test_submit_count_prints_a_summary_and_ids_on_request(server, capsys):
    code, out, _ = run_cli(capsys, "--nodes", server.url, "submit", "bulk", "--count", "1000")
    assert code == 0 and len(out.splitlines()) == 1, out
    assert out.startswith("submitted 1000 jobs to bulk in ") and out.rstrip().endswith(": id0 .. id999")
    code, out, _ = run_cli(capsys, "--nodes", server.url, "submit", "bulk", "--count", "3", "--ids")
    assert code == 0 and out.split() == ["id1000", "id1001", "id1002"]


def test_submit_file_one_payload_a_line(server, capsys, tmp_path):
    source = tmp_path / "jobs.jsonl"
    source.write_text('{"a": 1}\n\n[1, 2]\n"text"\n')
    code, out, _ = run_cli(capsys, "--nodes", server.url, "submit", "q", "--file", str(source), "--batch", "1")
    assert code == 0 and out.split() == ["id0", "id1", "id2"]
    assert [batch[0]["payload"] for _, batch in server.submitted] == [{"a": 1}, [1, 2], "text"]


def test_submit_bad_input_is_a_usage_error(capsys, tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"a": 1}\nnot json\n')
    code, _, err = run_cli(capsys, "submit", "q", "--file", str(source))
    assert code == 2 and f"{source} line 2 is not JSON" in err
    code, _, err = run_cli(capsys, "submit", "q")
    assert code == 2 and "exactly one of PAYLOAD_JSON, --file or --count" in err


def test_job_cancel_and_their_errors(server, capsys):
    code, out, _ = run_cli(capsys, "--nodes", server.url, "job", "j1")
    assert code == 0 and "state: done" in out and 'payload: {"to": "a"}' in out
    code, _, err = run_cli(capsys, "--nodes", server.url, "job", "nope")
    assert code == 1 and "not_found" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "--nodes", server.url, "cancel", "j1")
    assert code == 1 and "conflict" in err
    code, out, _ = run_cli(capsys, "--nodes", server.url, "cancel", "j2")
    assert code == 0 and out == "cancelled j2\n"


def test_dlq_list_redrive_purge(server, capsys):
    code, out, _ = run_cli(capsys, "--nodes", server.url, "dlq", "list", "emails")
    assert code == 0 and out.splitlines() == ["ID  ATTEMPTS  LAST ERROR", "d1  5         ValueError: bad address"]
    code, out, _ = run_cli(capsys, "--nodes", server.url, "dlq", "redrive", "emails", "d1")
    assert code == 0 and out == "redriven 1 job(s) in emails\n"
    code, out, _ = run_cli(capsys, "--nodes", server.url, "dlq", "purge", "emails")
    assert code == 0 and out == "purged 1 dead job(s) from emails\n"


# ---------------------------------------------------------------------------- worker


class ClosingFake(FakeCluster):
    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass


def test_worker_imports_a_handlers_dict_and_runs_a_burst(capsys, monkeypatch, tmp_path):
    (tmp_path / "cli_tasks_mod.py").write_text(textwrap.dedent("""
        def shout(job):
            return job.payload["text"].upper()

        handlers = {"words": shout}
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    fake = ClosingFake()
    job_id = fake.add("words", {"text": "hi"})
    monkeypatch.setattr(cli, "_make_client", lambda *args, **kwargs: fake)
    code, _, _ = run_cli(capsys, "worker", "cli_tasks_mod:handlers", "--burst", "--concurrency", "2",
                         "--heartbeat", "0.05")
    assert code == 0 and fake.acks == [(job_id, "HI")]


def test_worker_target_errors_are_clear(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cli_not_a_target.py").write_text("thing = 42\n")
    monkeypatch.setattr(cli, "_make_client", lambda *args, **kwargs: ClosingFake())
    for target, message in [("nocolon", "must look like module:attribute"),
                            ("cli_missing_module:app", "no module named 'cli_missing_module'"),
                            ("cli_not_a_target:nothing", "has no attribute 'nothing'"),
                            ("cli_not_a_target:thing", "expected a raftq App or a dict")]:
        code, _, err = run_cli(capsys, "worker", target)
        assert code == 2 and message in err and "Traceback" not in err, (target, err)


def test_admin_takes_the_nodes_and_token_given_before_it():
    assert command.split_delegated(["--nodes", "http://a:1", "--token", "t", "admin", "backup", "f"]) == (
        "admin", ["--nodes", "http://a:1", "--token", "t", "backup", "f"])


@pytest.mark.parametrize("argv, message", [
    (("cluster", "add", "n4"), "a URL goes with `cluster add ID URL` only"),
    (("cluster", "remove"), "`cluster remove` needs the node's id"),
    (("cluster", "transfer", "n2", "http://x"), "a URL goes with `cluster add ID URL` only"),
    (("cluster", "members", "n2"), "`cluster members` takes no id"),
])
def test_cluster_command_usage_errors(capsys, argv, message):
    code, out, err = run_cli(capsys, "--nodes", "http://127.0.0.1:9", *argv)
    assert code == 2 and message in err and "Traceback" not in err, err
