"""`raftq`: the command line.

    raftq [--nodes URL,URL,...] [--token T] [--ca FILE] [--no-verify] [--timeout S] [--json] COMMAND ...

    submit QUEUE [PAYLOAD_JSON]   submit jobs (--file F: one JSON payload a line; --count N)
    worker MODULE:ATTR            run a worker for an App, or for a {queue: handler} dict
    status                        each node's view of the cluster
    queues                        depth of every queue, by state
    job ID / cancel ID            show / cancel one job
    dlq list|redrive|purge QUEUE  the dead-letter queue
    cluster members               the members: voter or learner, how far each has replicated
    cluster add ID URL            add a node started empty with --join (promoted once caught up)
    cluster remove ID             remove a member for good
    cluster transfer [ID]         move leadership to ID, or to the most caught-up voter

`raftq node`, `raftq bench` and `raftq chaos` belong to other packages: the `raftq` command
(raftq/command.py) dispatches them before this module sees the command line.

Global options may also follow the command. Exit codes: 0 done, 1 the cluster refused (unknown
job, conflict, ...), 2 bad usage or no node answered, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import importlib
import json
import logging
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

from raftq.client._progress import ProgressBar
from raftq.client.errors import RaftqError, TransportError

DEFAULT_NODES = "http://127.0.0.1:7001,http://127.0.0.1:7002,http://127.0.0.1:7003"
#: Seconds a command keeps trying (across nodes and retries) before it reports that no node answered.
DEFAULT_TIMEOUT_S = 10.0
#: Jobs per submit request for --count and --file: one log entry and one fsync per 100 jobs.
BATCH_DEFAULT = 100
#: `status` asks every node on its own; a down node should cost the table this long, not the full timeout.
STATUS_NODE_TIMEOUT_S = 2.0
#: Characters of a dead job's error shown in `dlq list`.
ERROR_COLUMN_MAX = 60


class UsageError(Exception):
    """Raised when the command line cannot be carried out as written (exit code 2)."""


def main(argv: Sequence[str] | None = None, *, other_commands: dict[str, str] | None = None) -> int:
    """Runs one client command of `raftq`.

    Args:
        argv: the arguments after the program name (default: sys.argv[1:]).
        other_commands: commands other packages own ({name: help}), listed in --help only.

    Returns:
        The exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(other_commands or {})
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args) or 0
    except UsageError as exc:
        print(f"raftq {args.command}: {exc}", file=sys.stderr)
        return 2
    except TransportError as exc:
        print(f"raftq: no node answered (tried {', '.join(_nodes(args))}): {exc}", file=sys.stderr)
        return 2
    except RaftqError as exc:
        print(f"raftq {args.command}: {_describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raftq: interrupted", file=sys.stderr)
        return 130


def build_parser(other_commands: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The argparse parser of the client commands (`other_commands` are only listed)."""
    parser = argparse.ArgumentParser(prog="raftq", description="raftq: a replicated job queue.")
    _add_globals(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _add_globals(common, suppress=True)  # so that `raftq status --json` works as well as `raftq --json status`
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int | None], help_text: str):
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    for name, help_text in (other_commands or {}).items():  # the dispatcher runs them; listed for --help
        commands.add_parser(name, help=f"{help_text}: run `raftq {name} --help` for its options", add_help=False)
    _add_submit(command("submit", cmd_submit, "Submit jobs to a queue."))
    _add_worker(command("worker", cmd_worker, "Run a worker for an App or a {queue: handler} dict."))
    command("status", cmd_status, "Show each node's view of the cluster.")
    command("queues", cmd_queues, "Show the depth of every queue, by state.")
    command("job", cmd_job, "Show one job.").add_argument("id")
    command("cancel", cmd_cancel, "Cancel a job that has not finished.").add_argument("id")
    dlq = command("dlq", cmd_dlq, "List, redrive or purge a dead-letter queue.")
    dlq.add_argument("action", choices=("list", "redrive", "purge"))
    dlq.add_argument("queue")
    dlq.add_argument("ids", nargs="*", help="redrive: only these jobs (default: all)")
    dlq.add_argument("--limit", type=int, default=100, help="list: at most this many (default 100)")
    dlq.add_argument("--after", help="list: start after this job id (paging)")
    configure = command("configure", cmd_configure,
                        "Set a queue's limits (replaces them all; what is left out is unlimited).")
    configure.add_argument("queue")
    configure.add_argument("--max-depth", type=int, help="jobs not finished; beyond it submits get 429")
    configure.add_argument("--rate", type=float, help="leases per second across all workers (token bucket)")
    configure.add_argument("--burst", type=int, help="leases the bucket holds (default: one second's worth)")
    configure.add_argument("--max-running-per-key", type=int, help="leased jobs of one key at a time")
    configure.add_argument("--fifo", action="store_true", help="one job per group at a time, in submit order")
    cluster = command("cluster", cmd_cluster, "List the members, add or remove one, or move leadership.")
    cluster.add_argument("action", choices=("members", "add", "remove", "transfer"))
    cluster.add_argument("id", nargs="?", help="add, remove: the node's id; transfer: the new leader (optional)")
    cluster.add_argument("url", nargs="?", help="add: the URL the node is reached at")
    schedules = command("schedules", cmd_schedules, "List schedules, or pause, resume or delete one.")
    schedules.add_argument("action", nargs="?", default="list", choices=("list", "pause", "resume", "delete"))
    schedules.add_argument("name", nargs="?")
    return parser


def _add_globals(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--nodes", default=default(None),
                        help=f"node URLs, comma-separated (env RAFTQ_NODES; default {DEFAULT_NODES})")
    parser.add_argument("--token", default=default(None), help="bearer token (env RAFTQ_TOKEN)")
    parser.add_argument("--ca", default=default(None),
                        help="for https:// nodes: PEM file of the CA that signed their certificates (env RAFTQ_CA)")
    parser.add_argument("--no-verify", action="store_true", default=default(False),
                        help="for https:// nodes: skip certificate checks (env RAFTQ_VERIFY=0; tests only)")
    parser.add_argument("--timeout", type=float, default=default(None),
                        help="seconds to keep trying before giving up "
                             f"(env RAFTQ_TIMEOUT; default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--json", action="store_true", default=default(False), help="print JSON")


def _add_submit(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("queue")
    sub.add_argument("payload", nargs="?", metavar="PAYLOAD_JSON", help="one payload as JSON")
    source = sub.add_mutually_exclusive_group()
    source.add_argument("--file", help="one JSON payload a line ('-' for stdin)")
    source.add_argument("--count", type=int, help='submit N generated payloads {"n": i}; prints a summary')
    sub.add_argument("--ids", action="store_true", help="with --count: print every job id, one a line")
    sub.add_argument("--batch", type=int, default=BATCH_DEFAULT, metavar="SIZE",
                     help=f"jobs per request for --count/--file (default {BATCH_DEFAULT}; 1 = one by one)")
    sub.add_argument("--priority", type=int, help="0-9, 9 runs first")
    sub.add_argument("--delay", type=float, help="seconds before the jobs may run")
    sub.add_argument("--max-attempts", type=int)
    sub.add_argument("--lease", type=float, help="lease (visibility timeout) in seconds")
    sub.add_argument("--idempotency-key", help="single payload only: a repeat returns the first job's id")


def _add_worker(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("target", metavar="MODULE:ATTR", help="an App, or a dict {queue: handler}")
    sub.add_argument("--queues", help="comma-separated queues (default: all the target handles)")
    sub.add_argument("--concurrency", type=int, default=4, help="jobs at once (default 4)")
    sub.add_argument("--prefetch", type=_prefetch, default="auto", metavar="N|auto",
                     help="jobs leased ahead of the free slots: auto (default: paced to about 0.1 s of work, "
                          "at most 256 jobs and 16 MiB), a fixed N, or 0 for none (long jobs: each starts on "
                          "the first free worker)")
    sub.add_argument("--pool", choices=("threads", "processes", "asyncio"), default="threads")
    sub.add_argument("--burst", action="store_true", help="exit once the queues are empty")
    sub.add_argument("--grace", type=float, default=30.0, help="seconds running jobs get at shutdown (default 30)")
    sub.add_argument("--wait", type=float, default=5.0, help="long-poll seconds per fetch (default 5)")
    sub.add_argument("--heartbeat", type=float, default=2.0, help="seconds between heartbeats (default 2)")
    sub.add_argument("--time-limit", type=float, help="hard seconds per job, for tasks that set none (processes: "
                                                          "the child is killed and replaced; README \"Time limits\")")
    sub.add_argument("--soft-time-limit", type=float, help="seconds before SoftTimeLimitExceeded is raised in a job, "
                                                               "for tasks that set none")
    sub.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    sub.add_argument("--log-level", default=os.environ.get("RAFTQ_LOG_LEVEL", "INFO"))


# ---------------------------------------------------------------------------- submit


def cmd_submit(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    payloads = _payloads(args)
    if args.idempotency_key is not None and len(payloads) != 1:
        raise UsageError("--idempotency-key goes with a single payload")
    options = {"priority": args.priority, "delay_s": args.delay, "max_attempts": args.max_attempts,
               "lease_s": args.lease}
    ids: list[str] = []
    progress = ProgressBar(len(payloads), label=f"submit {args.queue}",
                        enabled=None if len(payloads) > 1 else False)
    with _client(args) as client:
        try:
            if args.batch > 1 and len(payloads) > 1:
                for chunk in _chunks(payloads, args.batch):
                    ids += client.submit_many(args.queue, chunk, **options)
                    progress.update(len(chunk))
            else:
                for payload in payloads:
                    ids.append(client.submit(args.queue, payload, idempotency_key=args.idempotency_key, **options))
                    progress.update(1)
        finally:
            progress.close()
            if args.count is None or args.ids or args.json:
                _print_ids(args, ids)
    if len(ids) > 1 or args.count is not None:
        elapsed_s = max(progress.elapsed_s, 1e-9)
        summary = f"submitted {len(ids)} jobs to {args.queue} in {elapsed_s:.2f} s ({len(ids) / elapsed_s:,.0f} jobs/s)"
        if args.count is not None and not (args.ids or args.json):
            # --count makes generated jobs: their ids are rarely wanted one by one (--ids prints them).
            span = f": {ids[0]} .. {ids[-1]}" if ids else ""
            print(summary + span)
        else:
            print(summary, file=sys.stderr)
    return 0


def _payloads(args: argparse.Namespace) -> list[Any]:
    given = [args.payload is not None, args.file is not None, args.count is not None]
    if sum(given) != 1:
        raise UsageError("give exactly one of PAYLOAD_JSON, --file or --count")
    if args.count is not None:
        if args.count < 0:
            raise UsageError("--count must not be negative")
        return [{"n": n} for n in range(args.count)]
    if args.payload is not None:
        return [_json_value(args.payload, "PAYLOAD_JSON")]
    stream = sys.stdin if args.file == "-" else _open(args.file)
    with stream:
        return [_json_value(line, f"{args.file} line {number}")
                for number, line in enumerate(stream, start=1) if line.strip()]


def _open(path: str):
    try:
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _json_value(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{where} is not JSON: {exc}") from None


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _print_ids(args: argparse.Namespace, ids: list[str]) -> None:
    if args.json:
        _print_json({"ids": ids})
    elif ids:
        print("\n".join(ids))


# ---------------------------------------------------------------------------- worker


def cmd_worker(args: argparse.Namespace) -> int:
    from raftq.client.app import App
    from raftq.client.worker import PrometheusMiddleware, Worker

    target = _import_target(args.target)
    if not isinstance(target, (App, dict)):
        raise UsageError(f"{args.target} is a {type(target).__name__}; "
                         "expected a raftq App or a dict {queue: handler}")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    is_app = isinstance(target, App)
    # An App knows its cluster; --nodes / RAFTQ_NODES, when given, win.
    nodes = args.nodes or os.environ.get("RAFTQ_NODES") or (target.nodes if is_app else DEFAULT_NODES)
    token = _token(args) or (target.token if is_app else None)
    client = _make_client(nodes, token, _timeout(args), tls=_tls(args), asynchronous=args.pool == "asyncio")  # connects lazily
    metrics = PrometheusMiddleware() if args.metrics_port is not None else None
    options = dict(concurrency=args.concurrency, prefetch=args.prefetch, pool=args.pool, queues=_split(args.queues) or None,
                   burst=args.burst, grace_s=args.grace, wait_s=args.wait,
                   heartbeat_s=args.heartbeat, middleware=[metrics] if metrics else [], time_limit=args.time_limit,
                   soft_time_limit=args.soft_time_limit)
    try:
        worker = target.worker(client=client, **options) if is_app else Worker(client, target, **options)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if metrics is not None:
        metrics.serve(args.metrics_port)
    if args.pool == "asyncio":
        asyncio.run(_run_async(worker, client))
    else:
        with client:
            worker.run()
    return 0


async def _run_async(worker: Any, client: Any) -> None:
    async with client:
        await worker.arun()


def _prefetch(text: str) -> int | str:
    """--prefetch: "auto" or a whole number of jobs (range checked by the Worker)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number of jobs, got {text!r}") from None


def _import_target(spec: str) -> Any:
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"{spec!r} must look like module:attribute (e.g. tasks:app)")
    if os.getcwd() not in sys.path:  # like celery and arq: `raftq worker tasks:app` finds ./tasks.py
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UsageError(f"no module named {module_name!r} "
                             "(looked in the current directory and sys.path)") from None
        raise
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attribute!r}") from None
    return target


# ---------------------------------------------------------------------------- inspection commands


def cmd_status(args: argparse.Namespace) -> int:
    rows, answers = [], []
    for url in _nodes(args):
        try:
            with _make_client([url], _token(args), min(_timeout(args), STATUS_NODE_TIMEOUT_S), tls=_tls(args)) as client:
                view = client.cluster()
        except RaftqError as exc:
            answers.append({"url": url, "error": _describe(exc)})
            rows.append(["-", url, "down", "-", "-", "-", "-"])
            continue
        answers.append({"url": url, **view})
        rows.append([view.get("node", "?"), url, view.get("role", "?"), view.get("term", "?"),
                     view.get("leader") or "-", view.get("commit_index", "?"), view.get("applied_index", "?")])
    if all("error" in answer for answer in answers):
        raise TransportError(answers[0]["error"] if answers else "no nodes given")
    if args.json:
        _print_json({"nodes": answers})
    else:
        print(format_table(["NODE", "URL", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED"], rows))
    return 0


QUEUE_STATES = ("ready", "scheduled", "leased", "retry_wait", "dead", "done", "cancelled")


def cmd_queues(args: argparse.Namespace) -> int:
    with _client(args) as client:
        details = client.queue_details()
    depths = details["queues"]
    if args.json:
        _print_json(details)
        return 0
    rows = [[name] + [counts.get(state, 0) for state in QUEUE_STATES]
            + [_limits(details.get("settings", {}).get(name, {}), details.get("held_back", {}).get(name, {}))]
            for name, counts in sorted(depths.items())]
    if not rows:
        print("no queues yet", file=sys.stderr)
        return 0
    print(format_table(["QUEUE"] + [state.upper() for state in QUEUE_STATES] + ["LIMITS (HELD BACK)"], rows))
    return 0


def _limits(settings: dict, held: dict) -> str:
    parts = []
    if settings.get("rate_per_s") is not None:
        parts.append(f"rate {settings['rate_per_s']:g}/s burst {settings['burst']} ({held.get('rate', 0)})")
    if settings.get("max_running_per_key") is not None:
        parts.append(f"per key {settings['max_running_per_key']} ({held.get('key', 0)})")
    if settings.get("fifo"):
        parts.append(f"fifo ({held.get('fifo', 0)})")
    if settings.get("max_depth") is not None:
        parts.append(f"max depth {settings['max_depth']}")
    return ", ".join(parts) or "-"


def cmd_configure(args: argparse.Namespace) -> int:
    with _client(args) as client:
        answer = client.configure_queue(args.queue, max_depth=args.max_depth, rate_per_s=args.rate,
                                        burst=args.burst, max_running_per_key=args.max_running_per_key,
                                        fifo=args.fifo)
    if args.json:
        _print_json(answer)
    else:
        print(f"{args.queue}: " + _limits(answer, {}).replace(" (0)", ""))
    return 0


def cmd_schedules(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.name:
        raise UsageError(f"`schedules {args.action}` needs a schedule name")
    with _client(args) as client:
        if args.action == "list":
            records = client.schedules()
        elif args.action == "delete":
            client.delete_schedule(args.name)
            records = []
        else:
            records = [getattr(client, f"{args.action}_schedule")(args.name)]
    if args.json:
        _print_json({"schedules": records} if args.action != "delete" else {"deleted": args.name})
        return 0
    if args.action == "delete":
        print(f"deleted schedule {args.name}")
        return 0
    rows = [[r["name"], r["queue"], r["cron"] or f"every {r['every_s']:g} s", r["timezone"],
             "paused" if r["paused"] else "active", r["next_fire"], r["last_fire"] or "-", r["jobs_created"],
             r["fires_skipped"]] for r in records]
    print(format_table(["NAME", "QUEUE", "WHEN", "ZONE", "STATE", "NEXT FIRE", "LAST FIRE", "JOBS", "SKIPPED"], rows)
          if rows else "no schedules")
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    with _client(args) as client:
        record = client.get(args.id)
    if args.json:
        _print_json(record)
        return 0
    for key, value in record.items():
        print(f"{key}: {_show(key, value)}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.cancel(args.id)
    if args.json:
        _print_json({"cancelled": args.id})
    else:
        print(f"cancelled {args.id}")
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    if args.ids and args.action != "redrive":
        raise UsageError("job ids go with `dlq redrive` only")
    with _client(args) as client:
        if args.action == "list":
            jobs = client.dead(args.queue, limit=args.limit, after=args.after)
            if args.json:
                _print_json({"jobs": jobs})
            else:
                rows = [[job.get("id"), job.get("attempts", "?"), _first_line(job.get("last_error"))] for job in jobs]
                print(format_table(["ID", "ATTEMPTS", "LAST ERROR"], rows) if rows else f"{args.queue}: no dead jobs")
        elif args.action == "redrive":
            count = client.redrive(args.queue, list(args.ids) or None)
            _print_json({"redriven": count}) if args.json else print(f"redriven {count} job(s) in {args.queue}")
        else:
            count = client.purge_dead(args.queue)
            _print_json({"purged": count}) if args.json else print(f"purged {count} dead job(s) from {args.queue}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    if args.action in ("add", "remove") and not args.id:
        raise UsageError(f"`cluster {args.action}` needs the node's id")
    if (args.action == "add") != bool(args.url):
        raise UsageError("a URL goes with `cluster add ID URL` only")
    if args.action == "members" and args.id:
        raise UsageError("`cluster members` takes no id")
    with _client(args) as client:
        if args.action == "members":
            view = client.cluster()
            # A follower's view has no match indexes: ask the leader for them when one is known.
            if view.get("leader_url") and view.get("leader") != view.get("node"):
                with _make_client([view["leader_url"]], _token(args), _timeout(args), tls=_tls(args)) as leader:
                    view = leader.cluster()
            if args.json:
                _print_json({"nodes": view.get("nodes", []), "leader": view.get("leader")})
            else:
                rows = [[n.get("id"), n.get("url"), "voter" if n.get("voter") else "learner",
                         "leader" if n.get("leader") else "", "-" if n.get("match_index") is None else n["match_index"]]
                        for n in view.get("nodes", [])]
                print(format_table(["ID", "URL", "ROLE", "", "MATCH"], rows))
            return 0
        if args.action == "add":
            answer = client.add_member(args.id, args.url)
            message = f"added {args.id} as a learner; it becomes a voter once it has caught up"
        elif args.action == "remove":
            answer = client.remove_member(args.id)
            message = f"removed {args.id}"
        else:
            answer = client.transfer_leadership(args.id)
            message = f"leadership moved from {answer.get('previous')} to {answer.get('leader')}"
    _print_json(answer) if args.json else print(message)
    return 0


# ---------------------------------------------------------------------------- helpers


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces, a header line first."""
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in text_rows]) for i, header in enumerate(headers)]
    lines = [headers] + text_rows
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def _nodes(args: argparse.Namespace) -> list[str]:
    text = args.nodes or os.environ.get("RAFTQ_NODES") or DEFAULT_NODES
    return _split(text)


def _token(args: argparse.Namespace) -> str | None:
    return args.token or os.environ.get("RAFTQ_TOKEN") or None


def _timeout(args: argparse.Namespace) -> float:
    if args.timeout is not None:
        return args.timeout
    raw = os.environ.get("RAFTQ_TIMEOUT")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"RAFTQ_TIMEOUT={raw!r} is not a number of seconds") from None


def _tls(args: argparse.Namespace) -> dict[str, Any]:
    """ca_file and verify for the client, from --ca / --no-verify or RAFTQ_CA / RAFTQ_VERIFY."""
    verify = not getattr(args, "no_verify", False) and os.environ.get("RAFTQ_VERIFY", "1") not in ("0", "false", "no")
    return {"ca_file": getattr(args, "ca", None) or os.environ.get("RAFTQ_CA") or None, "verify": verify}


def _client(args: argparse.Namespace) -> Any:
    return _make_client(_nodes(args), _token(args), _timeout(args), tls=_tls(args))


def _make_client(nodes: str | Sequence[str], token: str | None, timeout_s: float, *, tls: dict[str, Any],
                 asynchronous: bool = False) -> Any:
    from raftq.client import AsyncClient, Client

    nodes = _split(nodes) if isinstance(nodes, str) else list(nodes)
    kind = AsyncClient if asynchronous else Client
    return kind(nodes, token=token, timeout=timeout_s, deadline=timeout_s, **tls)


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _describe(exc: RaftqError) -> str:
    code = getattr(exc, "code", None)
    text = str(exc) or type(exc).__name__
    return f"{code}: {text}" if code and not text.startswith(f"{code}:") else text


def _show(key: str, value: Any) -> str:
    if isinstance(value, float) and key.endswith("_at"):
        return datetime.datetime.fromtimestamp(value).isoformat(sep=" ", timespec="milliseconds")
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=_json_default, sort_keys=True)
    return str(value)


def _first_line(text: Any) -> str:
    line = str(text or "").strip().splitlines()[0] if text else "-"
    return line if len(line) <= ERROR_COLUMN_MAX else line[:ERROR_COLUMN_MAX - 3] + "..."


def _print_json(value: Any) -> None:
    print(json.dumps(value, default=_json_default, indent=2, sort_keys=True))


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):  # msgpack payloads may hold raw bytes
        return {"base64": base64.b64encode(bytes(value)).decode()}
    raise TypeError(f"{type(value).__name__} is not JSON")


if __name__ == "__main__":
    sys.exit(main())
