"""Submit bodies at the API edge: what `validation.submit` builds from them, fast paths included.

A msgpack body is scanned (`wire.decode_submit`), its payloads kept as the bytes they came in;
the property tests hold the scan to the whole decode it replaces, on good and hostile bodies:
the same values, the same command, the same refusal. The common job spec (a payload and an
idempotency key, what the client libraries send) skips the per-field lookups; it is held equal
to the field-by-field path. And an answer splices stored payload bytes in (`wire.pack_answer`)
to the same value a decode and encode would give.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct

import msgpack
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from raftq import protocol
from raftq.cluster.api import validation as v
from raftq.cluster.api.wire import ApiError, Packed, decode_msgpack, decode_submit, pack_answer, storable_by_bytes
from raftq.cluster.queue import commands as cmds

NOW_MS = 1_765_000_000_000

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
           | st.text(max_size=8))
payloads = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=12)
keys = st.none() | st.text(max_size=10) | st.integers() | st.just("k" * (protocol.IDEMPOTENCY_KEY_BYTES_MAX + 1))


def submit(body):
    return v.submit(body, "q", now_ms=NOW_MS, payload_bytes_max=protocol.PAYLOAD_BYTES_MAX)


def outcome(body):
    """The command (job ids blanked: they are random) or the refusal (status, message)."""
    try:
        command = submit(body)
    except ApiError as exc:
        return exc.status, exc.message
    return cmds.Submit(command.now_ms, command.queue, tuple(job._replace(id="") for job in command.jobs))


@settings(max_examples=300, deadline=None)
@given(payload=payloads, key=keys, with_key=st.booleans())
def test_the_plain_spec_path_equals_the_field_by_field_path(payload, key, with_key):
    spec = {"payload": payload, **({"idempotency_key": key} if with_key else {})}
    # An extra unknown field sends the same spec down the field-by-field path (unknown fields are ignored).
    assert outcome({"jobs": [spec]}) == outcome({"jobs": [{**spec, "unknown": 1}]})


def test_a_plain_spec_takes_every_default():
    (job,) = submit({"jobs": [{"payload": {"n": 1}, "idempotency_key": "order-1"}]}).jobs
    assert job[2:] == (0, 0, protocol.MAX_ATTEMPTS_DEFAULT, protocol.LEASE_MS_DEFAULT, "order-1", 1_000, 300_000,
                       None, None)
    assert job.id.startswith(f"{NOW_MS:011x}") and len(job.id) == 23


def test_ids_of_one_batch_differ():
    command = submit({"jobs": [{"payload": i} for i in range(protocol.BATCH_COUNT_MAX)]})
    assert len({job.id for job in command.jobs}) == protocol.BATCH_COUNT_MAX


def test_a_bad_key_in_a_plain_spec_names_its_job():
    with pytest.raises(ApiError) as refused:
        submit({"jobs": [{"payload": 1}, {"payload": 2, "idempotency_key": 7}]})
    assert refused.value.status == 400 and refused.value.message.startswith("jobs[1]: field 'idempotency_key'")


# ---------------------------------------------------------------------- the scan of a msgpack body

#: Values a hostile client may put anywhere: what both wires refuse (NaN, deep nesting, keys that
#: are not strings or integers) next to what they take.
hostile_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
                   | st.text(max_size=8) | st.binary(max_size=4)
                   | st.sampled_from([msgpack.ExtType(5, b"x"), "payload", "jobs", "idempotency_key"]))
hostile_keys = st.text(max_size=6) | st.integers(-3, 3) | st.none() | st.booleans() | st.binary(max_size=2) \
    | st.floats(allow_nan=False) | st.sampled_from(["payload", "jobs", "priority", "idempotency_key"])
hostile_values = st.recursive(hostile_scalars, lambda inner: st.lists(inner, max_size=3)
                              | st.dictionaries(hostile_keys, inner, max_size=3), max_leaves=15)
job_specs = st.dictionaries(st.sampled_from(["payload", "idempotency_key", "priority", "lease_s", "key", "x"])
                            | hostile_keys, hostile_values, max_size=4)
submit_bodies = st.dictionaries(st.just("jobs") | hostile_keys,
                                st.lists(job_specs | hostile_values, max_size=4) | hostile_values, max_size=3)


def deep(levels: int):
    value = 1
    for _ in range(levels):
        value = [value]
    return value


def pack(body) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def unwrap(value):
    """The scan's result with every Packed replaced by its value (what a whole decode gives)."""
    if type(value) is Packed:
        assert msgpack.unpackb(value.data, raw=False, strict_map_key=False) == value.value
        return value.value
    if type(value) is dict:
        return {key: unwrap(item) for key, item in value.items()}
    if type(value) is list:
        return [unwrap(item) for item in value]
    return value


def decoded_or_refused(decode, raw: bytes):
    try:
        return decode(raw)
    except ApiError as exc:
        return exc.status


def same(a, b) -> bool:
    """Equality that takes NaN as equal to itself (a body may carry one; the check refuses it later)."""
    return pack(a) == pack(b) if a != a or b != b else a == b or repr(a) == repr(b)


@settings(max_examples=400, deadline=None)
@given(body=submit_bodies)
@example(body={"jobs": [{"payload": deep(150)}]})
@example(body={"jobs": [{"payload": {None: 1}}, {"payload": {True: 1}}, {"payload": {b"k": 1}}]})
@example(body={"jobs": [{"payload": float("nan")}], "jobs2": [1]})
@example(body={"jobs": [{"payload": 1, "priority": [1]}]})
@example(body={"jobs": "x", "x": {"y": 1}})
def test_the_scan_equals_the_whole_decode_and_builds_the_same_command(body):
    raw = pack(body)
    scanned = decode_submit(raw)
    whole = decode_msgpack(raw)
    assert same(unwrap(scanned), whole)
    for spec in scanned.get("jobs", []) if isinstance(scanned, dict) and isinstance(scanned.get("jobs"), list) else []:
        if isinstance(spec, dict) and type(spec.get("payload")) is Packed:
            # The stored bytes are the client's own; a canonical encoder sent what a re-encode gives.
            assert spec["payload"].data == pack(spec["payload"].value)
    assert outcome(scanned) == outcome(whole)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=40) | submit_bodies.map(pack).flatmap(
    lambda raw: st.integers(0, len(raw)).map(lambda cut: raw[:cut]) | st.just(raw + b"\x01")))
def test_bytes_that_are_not_one_msgpack_value_get_the_same_answer(raw):
    scanned, whole = decoded_or_refused(decode_submit, raw), decoded_or_refused(decode_msgpack, raw)
    assert same(unwrap(scanned), whole)
    if whole == 400:
        assert scanned == 400


def test_a_payload_keeps_its_own_encoding():
    """Wider headers than needed (str16 for a short string, uint32 for 1, float32): stored as sent."""
    payload = b"\x82" + b"\xda\x00\x01a" + b"\xce\x00\x00\x00\x01" + b"\xa1f" + b"\xca" + struct.pack(">f", 1.5)
    raw = b"\x81\xa4jobs\x91\x82\xa7payload" + payload + b"\xafidempotency_key\xa1k"
    command = submit(decode_submit(raw))
    assert command.jobs[0].payload == payload
    assert command.jobs[0].idempotency_key == "k"
    assert msgpack.unpackb(command.jobs[0].payload) == {"a": 1, "f": 1.5}


@pytest.mark.parametrize("payload, status", [
    (float("nan"), 400), (float("-inf"), 400), ({"a": [1, float("inf")]}, 400), (deep(101), 400), (deep(100), None),
    ({None: 1}, 400), ({True: 1}, 400), ({b"k": 1}, 400), ({"a": [None, True], "b": 2.5}, None),
    ("\xcb\x7f\xf0", None), ({"t": 1.5, "x": "\u00ca\u007f\u0080"}, None),  # NaN-like bytes inside text
    ("x" * protocol.PAYLOAD_BYTES_MAX, 413),
])
def test_the_payload_checks_hold_for_passed_through_bytes(payload, status):
    second = {"payload": payload, "idempotency_key": "k"}
    for body in ({"jobs": [{"payload": payload}]}, {"jobs": [{"payload": 1}, second]}):
        raw = pack(body)
        # A key that is not text sends the body to the whole decode (strict_map_key, _text_keys_only).
        assert (type(decode_submit(raw)["jobs"][-1]["payload"]) is Packed) == (repr(payload)[:2] not in ("{N", "{T", "{b"))
        if status is None:
            assert submit(decode_submit(raw)).jobs[-1].payload == pack(payload)
        else:
            with pytest.raises(ApiError) as refused:
                submit(decode_submit(raw))
            assert refused.value.status == status
            assert outcome(decode_msgpack(raw))[0] == status  # the whole decode refuses it the same way


@pytest.mark.parametrize("payload_bytes, status", [
    (b"\xca\x7f\xc0\x00\x00", 400),  # float32 NaN
    (b"\xca\xff\x80\x00\x00", 400),  # float32 -Infinity
    (b"\xcb\x7f\xf0" + b"\x00" * 6, 400),  # float64 Infinity
    (b"\xca\x7f\x7f\xff\xff", None),  # the largest finite float32
    (b"\x81\xa1k\xcb\xff\xef" + b"\xff" * 6, None),  # the most negative finite float64
])
def test_non_finite_floats_of_either_width_are_found_in_the_bytes(payload_bytes, status):
    raw = b"\x81\xa4jobs\x91\x81\xa7payload" + payload_bytes
    assert outcome(decode_msgpack(raw))[0] == status if status else not isinstance(outcome(decode_msgpack(raw)), tuple)
    if status is None:
        assert submit(decode_submit(raw)).jobs[0].payload == payload_bytes
    else:
        with pytest.raises(ApiError) as refused:
            submit(decode_submit(raw))
        assert refused.value.status == status


# ---------------------------------------------------------------------- the batch of plain specs

plain_specs = st.lists(st.fixed_dictionaries({"payload": hostile_values},
                                             optional={"idempotency_key": st.none() | st.text(max_size=10) | st.integers(-3, 3)
                                                       | st.text(min_size=60, max_size=70) | st.binary(max_size=2)}),
                       min_size=1, max_size=5)


@settings(max_examples=400, deadline=None)
@given(specs=plain_specs)
@example(specs=[{"payload": {"t": 1_796_000_000.25, "pad": "x"}}, {"payload": float("inf")}])
@example(specs=[{"payload": 1, "idempotency_key": "\u00e9" * 129}])  # 129 characters, 258 bytes
@example(specs=[{"payload": deep(101)}, {"payload": 1, "idempotency_key": 5}])
def test_a_batch_of_plain_specs_is_checked_as_each_spec_would_be(specs):
    """The batch path (`_plain_jobs`) builds what the spec-by-spec path builds, and refuses what
    it refuses with the same first error: an unknown field sends every spec down that path."""
    raw, one_by_one = pack({"jobs": specs}), pack({"jobs": [{**spec, "unknown": 1} for spec in specs]})
    assert outcome(decode_submit(raw)) == outcome(decode_submit(one_by_one))


@pytest.mark.parametrize("payload", [
    {"t": 1_796_000_000.25, "pad": "x" * 70},  # a current Unix time: its float's bytes hold 0xc5 (a bin marker)
    {"data": b"\x00\x01", "at": msgpack.Timestamp(1, 0), "ext": msgpack.ExtType(3, b"x")},
    [1.5, -2.5e300, "\u0144"], deep(100),
])
def test_a_batch_of_good_payloads_passes_by_its_bytes(payload):
    assert storable_by_bytes([pack(payload), pack(1)] * 3)


@pytest.mark.parametrize("payload", [float("nan"), [1, float("-inf")], deep(101)])
def test_a_batch_with_one_payload_that_is_not_storable_does_not_pass_by_its_bytes(payload):
    assert not storable_by_bytes([pack(1), pack(payload), pack(2)])


full_specs = st.fixed_dictionaries({"payload": payloads}, optional={
    "idempotency_key": st.text(max_size=10), "priority": st.integers(0, 9), "delay_s": st.floats(0, 100),
    "max_attempts": st.integers(1, 20), "lease_s": st.integers(1, 600) | st.floats(1, 600),
    "backoff_base_s": st.floats(0, 60), "backoff_cap_s": st.integers(0, 600), "key": st.text(max_size=5)})


@settings(max_examples=200, deadline=None)
@given(specs=st.lists(full_specs, min_size=1, max_size=4), wire=st.sampled_from(["msgpack", "json"]))
def test_a_submit_the_edge_builds_decodes_from_the_log_as_the_same_value(specs, wire):
    """The leader applies the Submit it built (cluster/server.py `_apply`), the followers its
    decode: the two must be the same value, field types included."""
    body = decode_submit(pack({"jobs": specs})) if wire == "msgpack" else json.loads(json.dumps({"jobs": specs}))
    try:
        command = submit(body)
    except ApiError:
        assume(False)  # a refused body builds nothing (an infinity in a payload)
    assert_logged_as_built(command, "jobs", cmds.NewJob)


def assert_logged_as_built(command, parts: str, part_type: type) -> None:
    """The command decodes from its log encoding as the same value, field types included, down to
    each of its `parts` (a tuple of `part_type`)."""
    decoded = cmds.decode_command(cmds.encode_command(command))
    assert decoded == command
    built_parts, logged_parts = getattr(command, parts), getattr(decoded, parts)
    assert type(logged_parts) is type(built_parts) is tuple
    names = [field.name for field in dataclasses.fields(part_type)] if dataclasses.is_dataclass(part_type) \
        else list(part_type._fields)
    for built, logged in zip(built_parts, logged_parts):
        assert type(logged) is type(built) is part_type
        assert [type(getattr(logged, n)) for n in names] == [type(getattr(built, n)) for n in names]


ack_items = st.fixed_dictionaries({"id": st.text("0123456789abcdef", min_size=23, max_size=23),
                                   "lease": st.integers(0, 2**63)}, optional={"result": payloads})


@settings(max_examples=200, deadline=None)
@given(items=st.lists(ack_items, min_size=1, max_size=4), wire=st.sampled_from(["msgpack", "json"]))
def test_an_ack_the_edge_builds_decodes_from_the_log_as_the_same_value(items, wire):
    """As for a Submit: the leader applies the Ack it built, the followers its decode."""
    body = {"worker": "w-1", "acks": items}
    body = decode_msgpack(pack(body)) if wire == "msgpack" else json.loads(json.dumps(body))
    try:
        command = v.ack(body, now_ms=NOW_MS)
    except ApiError:
        assume(False)  # a refused body builds nothing (an infinity in a result)
    assert_logged_as_built(command, "items", cmds.AckItem)


def test_a_payload_with_integer_keys_takes_the_whole_decode_and_is_stored():
    raw = pack({"jobs": [{"payload": {1: "a", "b": {2: None}}}]})
    assert type(decode_submit(raw)["jobs"][0]["payload"]) is dict
    assert msgpack.unpackb(submit(decode_submit(raw)).jobs[0].payload, strict_map_key=False) == {1: "a", "b": {2: None}}


def test_a_body_too_deep_for_a_whole_decode_is_refused():
    raw = b"\x81\xa4jobs\x91\x81\xa7payload" + b"\x91" * 2000 + b"\xc0"
    with pytest.raises(ApiError) as refused:
        decode_submit(raw)
    assert refused.value.status == 400


# ---------------------------------------------------------------------- answers with stored bytes

answer_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
                             | st.text(max_size=8) | st.binary(max_size=8),
                             lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                          max_size=3), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(jobs=st.lists(st.tuples(answer_values, answer_values), max_size=5))
@example(jobs=[(struct.unpack(">d", b"\x40\xc7\x00\x7f\x00\x00\x00\x00")[0], {"a": 1})])  # holds the placeholder
def test_an_answer_splices_stored_bytes_to_the_value_a_decode_would_give(jobs):
    spliced = {"jobs": [{"id": "j", "lease_s": other, "payload": Packed(pack(payload)), "n": 1}
                        for other, payload in jobs]}
    decoded = {"jobs": [{"id": "j", "lease_s": other, "payload": payload, "n": 1} for other, payload in jobs]}
    assert msgpack.unpackb(pack_answer(spliced), raw=False) == decoded
    if not any(b"\xc7\x00\x7f" in pack(other) for other, _ in jobs):
        assert pack_answer(spliced) == pack(decoded)  # the same bytes, key order included


def test_an_answer_carries_the_stored_bytes_as_they_are():
    stored = b"\xda\x00\x01a"  # "a" with a wider header than needed: passed on untouched
    assert pack_answer({"payload": Packed(stored)}) == b"\x81\xa7payload" + stored
    assert not math.isnan(msgpack.unpackb(pack_answer([Packed(pack(1.5))]))[0])


def test_a_json_answer_decodes_stored_bytes_once_bin_ext_and_timestamp_included():
    import json

    from raftq.cluster.api.wire import _json_default

    stored = pack([b"\x01", msgpack.ExtType(5, b"x"), msgpack.Timestamp(1, 0)])
    # An ExtType is a named tuple, which json writes as an array before asking the default hook.
    assert json.loads(json.dumps({"payload": Packed(stored)}, default=_json_default)) == {"payload": [
        {"$bytes": "AQ=="}, [5, {"$bytes": "eA=="}], {"$ext": -1, "$bytes": "AAAAAQ=="}]}
