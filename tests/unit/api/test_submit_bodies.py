"""Submit bodies at the API edge: what `validation.submit` builds from them, fast paths included.

The common job spec (a payload and an idempotency key, what the client libraries send) skips the
per-field lookups; these tests hold it equal to the field-by-field path for every spec it takes.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftq import protocol
from raftq.cluster.api import validation as v
from raftq.cluster.api.wire import ApiError
from raftq.cluster.queue import commands as cmds

NOW_MS = 1_765_000_000_000

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=8)
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
