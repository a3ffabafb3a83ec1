"""Queue command codec, the backoff draw, and the purity rule of cluster/queue."""

from __future__ import annotations

import ast
import pathlib

import msgpack
import pytest

from raftq.cluster.queue import commands as c
from raftq.cluster.queue.jobs import backoff_delay_ms, splitmix64

QUEUE_PACKAGE = pathlib.Path(__file__).resolve().parents[3] / "cluster" / "queue"

NEW_JOB = c.NewJob(
    id="j1", payload=b"\x81\xa1k\x01", priority=9, delay_ms=250, max_attempts=5, lease_ms=30_000,
    idempotency_key="order-42", backoff_base_ms=1_000, backoff_cap_ms=300_000,
)

#: One instance of every command type, with every optional field both set and unset somewhere.
EVERY_COMMAND = [
    c.Submit(now_ms=1, queue="emails", jobs=(NEW_JOB, c.NewJob("j2", b"", 0, 0, 1, 1_000, None, 0, 0))),
    c.Submit(now_ms=1, queue="emails", jobs=()),
    c.Lease(now_ms=2, worker="w1", queues=("emails", "sms"), max_jobs=10),
    c.Lease(now_ms=2, worker="w1", queues=(), max_jobs=1),
    c.Ack(now_ms=3, worker="w1", items=(c.AckItem("j1", 7, b"\xc3"), c.AckItem("j2", 8, None))),
    c.Ack(now_ms=3, worker="w1", items=()),
    c.Fail(now_ms=4, worker="w1", entropy=(1 << 64) - 1,
           items=(c.FailItem("j1", 7, "Traceback ...", True, None), c.FailItem("j2", 8, "", False, 5_000))),
    c.Extend(now_ms=5, worker="w1", items=(c.ExtendItem("j1", 7, 60_000),)),
    c.Tick(now_ms=6, entropy=12345),
    c.WorkerLost(now_ms=7, worker="w1", entropy=0),
    c.RenewLeases(now_ms=8),
    c.Cancel(now_ms=9, id="j1"),
    c.Redrive(now_ms=10, queue="emails", ids=("j1", "j2")),
    c.Redrive(now_ms=10, queue="emails", ids=None),
    c.Purge(now_ms=11, queue="emails", state="dead"),
    c.SetQueueConfig(now_ms=12, queue="emails", max_depth=100),
    c.SetQueueConfig(now_ms=12, queue="emails", max_depth=None),
    c.SetQueueConfig(now_ms=12, queue="emails", max_depth=None, rate_per_ks=50_000, burst=10,
                     max_running_per_key=2, fifo=True),
    c.Submit(now_ms=1, queue="emails", jobs=(c.NewJob("j3", b"", 0, 0, 1, 1_000, None, 0, 0, key="tenant-7"),
                                             c.NewJob("j4", b"", 0, 0, 1, 1_000, None, 0, 0, group="order-9"))),
    c.PutSchedule(now_ms=13, name="nightly", queue="emails", payload=b"\x90", cron="0 3 * * *", every_ms=None,
                  timezone="Europe/Paris", overlap="skip", catch_up="latest", priority=0, max_attempts=5,
                  lease_ms=30_000, backoff_base_ms=1_000, backoff_cap_ms=300_000, next_fire_ms=1_000_000),
    c.PutSchedule(now_ms=13, name="often", queue="emails", payload=b"\x90", cron=None, every_ms=2_000,
                  timezone="UTC", overlap="allow", catch_up="all", priority=9, max_attempts=1,
                  lease_ms=1_000, backoff_base_ms=0, backoff_cap_ms=0, next_fire_ms=15),
    c.DeleteSchedule(now_ms=14, name="nightly"),
    c.PauseSchedule(now_ms=15, name="often", paused=True, next_fire_ms=0),
    c.FireSchedule(now_ms=16, name="often", revision=40, fire_ms=15, next_fire_ms=2_015, run=True, job_id="j9"),
    c.Release(now_ms=13, worker="w1", items=(c.ReleaseItem("j1", 7), c.ReleaseItem("j2", 8))),
    c.Release(now_ms=13, worker="w1", items=()),
    c.DeleteQueue(now_ms=14, queue="q", force=True),
]


def test_entries_of_the_shorter_shapes_still_decode():
    """Entries written before jobs had key and group, and queues had limits, stay readable."""
    old_submit = msgpack.packb((c.Submit.TAG, 1, "q", (("j1", b"", 0, 0, 1, 1_000, None, 0, 0),)))
    assert c.decode_command(old_submit).jobs[0] == c.NewJob("j1", b"", 0, 0, 1, 1_000, None, 0, 0, None, None)
    old_config = msgpack.packb((c.SetQueueConfig.TAG, 1, "q", 7))
    assert c.decode_command(old_config) == c.SetQueueConfig(1, "q", 7, None, None, None, False)
    with pytest.raises(c.CommandDecodeError):
        c.decode_command(msgpack.packb((c.SetQueueConfig.TAG, 1, "q")))


def test_every_command_type_is_covered():
    assert {type(command) for command in EVERY_COMMAND} == set(c.COMMAND_TYPES)


def test_tags_are_unique():
    assert len({cls.TAG for cls in c.COMMAND_TYPES}) == len(c.COMMAND_TYPES)


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=lambda command: type(command).__name__)
def test_round_trip(command):
    data = c.encode_command(command)
    decoded = c.decode_command(data)
    assert decoded == command
    assert type(decoded) is type(command)
    assert c.encode_command(decoded) == data  # the encoding is a function of the value


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=lambda command: type(command).__name__)
def test_truncated_or_extended_encoding_is_refused(command):
    data = c.encode_command(command)
    for cut in range(len(data)):  # every proper prefix, down to a single byte
        with pytest.raises(c.CommandDecodeError):
            c.decode_command(data[:cut])
    with pytest.raises(c.CommandDecodeError):
        c.decode_command(data + b"\x00")


BAD_ENCODINGS = [
    ("not msgpack", b"\xc1"),
    ("not an array", msgpack.packb({"tag": 1})),
    ("empty array", msgpack.packb([])),
    ("tag not an int", msgpack.packb(["submit"])),
    ("unknown tag", msgpack.packb([99, 1])),
    ("too few fields", msgpack.packb([c.Tick.TAG, 1])),
    ("too many fields", msgpack.packb([c.Tick.TAG, 1, 2, 3])),
    ("str where int", msgpack.packb([c.Tick.TAG, "1", 2])),
    ("int where str", msgpack.packb([c.Cancel.TAG, 1, 5])),
    ("str where bytes", msgpack.packb([c.Submit.TAG, 1, "q", [["j", "payload", 0, 0, 1, 1, None, 0, 0]]])),
    ("priority above 9", msgpack.packb([c.Submit.TAG, 1, "q", [["j", b"", 10, 0, 1, 1, None, 0, 0]]],
                                       use_bin_type=True)),
    ("priority below 0", msgpack.packb([c.Submit.TAG, 1, "q", [["j", b"", -1, 0, 1, 1, None, 0, 0]]],
                                       use_bin_type=True)),
    ("job with a field missing", msgpack.packb([c.Submit.TAG, 1, "q", [["j", b"", 0, 0, 1, 1, None, 0]]],
                                               use_bin_type=True)),
    ("jobs not an array", msgpack.packb([c.Submit.TAG, 1, "q", 5])),
    ("queues not strings", msgpack.packb([c.Lease.TAG, 1, "w", [1, 2], 1])),
    ("retry not a bool", msgpack.packb([c.Fail.TAG, 1, "w", 0, [["j", 1, "e", 1, None]]])),
    ("ids not an array", msgpack.packb([c.Redrive.TAG, 1, "q", "j1"])),
]


@pytest.mark.parametrize("data", [d for _, d in BAD_ENCODINGS], ids=[n for n, _ in BAD_ENCODINGS])
def test_bad_encodings_are_refused(data):
    with pytest.raises(c.CommandDecodeError):
        c.decode_command(data)


def test_decode_error_is_a_value_error():
    assert issubclass(c.CommandDecodeError, ValueError)


def test_splitmix64_reference_values():
    # First outputs of the reference SplitMix64 generator seeded with 0 (state += golden, mix).
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    assert all(0 <= splitmix64(x) < 1 << 64 for x in (0, 1, (1 << 64) - 1))


@pytest.mark.parametrize("attempts, bound", [(1, 1_000), (2, 2_000), (3, 4_000), (9, 256_000), (10, 300_000),
                                             (1000, 300_000)])
def test_backoff_stays_within_full_jitter_bounds(attempts, bound):
    delays = [backoff_delay_ms(1_000, 300_000, attempts, entropy, 0) for entropy in range(2_000)]
    assert all(0 <= d < bound for d in delays)
    # Full jitter spreads over the whole range, not a corner of it.
    assert min(delays) < bound // 10 and max(delays) > bound * 9 // 10


def test_backoff_is_deterministic_and_varies_by_position():
    assert backoff_delay_ms(100, 10_000, 3, 42, 0) == backoff_delay_ms(100, 10_000, 3, 42, 0)
    assert len({backoff_delay_ms(100, 10_000, 3, 42, i) for i in range(20)}) > 10
    assert backoff_delay_ms(0, 10_000, 3, 42, 0) == 0
    assert backoff_delay_ms(100, 0, 3, 42, 0) == 0


FORBIDDEN_IMPORTS = {"asyncio", "aiohttp", "socket", "time", "random", "uuid", "os", "threading", "datetime"}


@pytest.mark.parametrize("path", sorted(QUEUE_PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_queue_package_is_pure(path):
    """The state machine must compute the same state on every replica: no clocks, no randomness, no I/O."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN_IMPORTS, f"{path.name}:{node.lineno} imports {name}"


def test_a_submit_decodes_the_same_by_the_one_step_path_and_field_by_field():
    """Jobs of the current shape decode in one step; other arrays take the checked path, with the
    same outcome either way (a bool where an int goes was accepted before and still is)."""
    fast = c.Submit(now_ms=1, queue="q", jobs=(NEW_JOB, NEW_JOB._replace(idempotency_key=None, key="k")))
    assert c.decode_command(c.encode_command(fast)) == fast
    with_bool = msgpack.packb((c.Submit.TAG, 1, "q", (("j1", b"", True, 0, 1, 1_000, None, 0, 0, None, None),)))
    assert c.decode_command(with_bool).jobs[0].priority is True
    priority_10 = ("j1", b"", 10, 0, 1, 1_000, None, 0, 0, None, None)
    text_payload = ("j1", "", 0, 0, 1, 1_000, None, 0, 0, None, None)
    for bad in (priority_10, text_payload):
        with pytest.raises(c.CommandDecodeError):
            c.decode_command(msgpack.packb((c.Submit.TAG, 1, "q", (bad,))))
