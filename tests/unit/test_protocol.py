"""Every wire limit is defined once, in `raftq.protocol`, and both sides check against it.

Three kinds of evidence: no module of the broker or the client defines a name of the protocol
itself (or writes its content type as a literal); the modules that check a bound import it from
the protocol; and each side, asked with the bound and one past it, accepts the first and refuses
the second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from raftq import protocol

ROOT = Path(__file__).resolve().parents[2]
SIDES = ("cluster", "client")
PROTOCOL_NAMES = {name for name in vars(protocol) if name.isupper()}
#: Local names under which a side once restated a protocol fact.
KNOWN_RESTATEMENTS = {"MSGPACK", "JSON", "LEASE_COUNT_MAX", "QUEUES_PER_LEASE_MAX", "LEASE_WAIT_S_MAX", "WAIT_S_MAX",
                      "RETRY_DELAY_S_MAX", "REPORT_BATCH_MAX", "EXTEND_BATCH_MAX"}
#: Modules that check bounds, and the protocol names each must import.
CHECKERS = {
    "cluster/constants.py": {"PRIORITY_MAX", "LEASE_MS_MIN", "LEASE_MS_MAX", "BATCH_COUNT_MAX", "FETCH_COUNT_MAX",
                             "FETCH_WAIT_S_MAX", "MAX_ATTEMPTS_MAX", "DELAY_MS_MAX", "RESULT_BYTES_MAX",
                             "ERROR_TEXT_BYTES_MAX", "QUEUE_NAME_PATTERN"},
    "cluster/queue/commands.py": {"PRIORITY_MIN", "PRIORITY_MAX"},
    "cluster/api/wire.py": {"CONTENT_TYPE_MSGPACK", "CONTENT_TYPE_JSON", "CONTENT_TYPE_MSGPACK_ALIASES"},
    "client/_transports.py": {"CONTENT_TYPE_MSGPACK"},
    "client/_base.py": {"BATCH_COUNT_MAX", "LEADER_HEADER"},
    "client/app.py": {"PRIORITY_MIN", "PRIORITY_MAX", "LEASE_S_MIN", "LEASE_S_MAX", "MAX_ATTEMPTS_MAX"},
}


def _source_files() -> list[Path]:
    return [path for side in SIDES for path in sorted((ROOT / side).rglob("*.py"))]


def _imported_from_protocol(tree: ast.AST) -> set[str]:
    return {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module == "raftq.protocol" for alias in node.names}


def _restatements(path: Path, root: Path = ROOT) -> list[str]:
    """Module-level definitions of a protocol fact from literals, and protocol strings written out."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        value = getattr(node, "value", None)
        for target in targets:
            names = [t.id for t in ast.walk(target) if isinstance(t, ast.Name)]
            literal = value is not None and not any(isinstance(n, (ast.Name, ast.Attribute)) for n in ast.walk(value))
            for name in names:
                if literal and (name in PROTOCOL_NAMES or name in KNOWN_RESTATEMENTS):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: defines {name} instead of importing it")
    strings = {protocol.CONTENT_TYPE_MSGPACK, protocol.LEADER_HEADER}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in strings:
            found.append(f"{path.relative_to(root)}:{node.lineno}: writes {node.value!r} out")
    return found


def test_no_side_restates_a_protocol_fact():
    found = [line for path in _source_files() for line in _restatements(path)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("module", sorted(CHECKERS))
def test_checking_modules_import_their_bounds_from_the_protocol(module):
    imported = _imported_from_protocol(ast.parse((ROOT / module).read_text()))
    assert CHECKERS[module] <= imported, f"{module} does not import {sorted(CHECKERS[module] - imported)}"


def test_the_restatement_check_can_fail(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('PRIORITY_MAX = 9\nMSGPACK = "application/msgpack"\nOTHER = PRIORITY_MAX\n')
    found = _restatements(planted, tmp_path)
    assert len(found) == 3 and "defines PRIORITY_MAX" in found[0] and "writes 'application/msgpack'" in found[2]


# ---------------------------------------------------------------------- both sides, at the bound


def _submit(**spec):
    from raftq.cluster.api import validation as v

    return v.submit({"jobs": [{"payload": 1, **spec}]}, "q", now_ms=1, payload_bytes_max=protocol.PAYLOAD_BYTES_MAX)


@pytest.mark.parametrize("field, at_bound, past_bound", [
    ("priority", protocol.PRIORITY_MAX, protocol.PRIORITY_MAX + 1),
    ("priority", protocol.PRIORITY_MIN, protocol.PRIORITY_MIN - 1),
    ("max_attempts", protocol.MAX_ATTEMPTS_MAX, protocol.MAX_ATTEMPTS_MAX + 1),
    ("max_attempts", protocol.MAX_ATTEMPTS_MIN, protocol.MAX_ATTEMPTS_MIN - 1),
    ("lease_s", protocol.LEASE_S_MAX, protocol.LEASE_S_MAX + 1),
    ("lease_s", protocol.LEASE_S_MIN, protocol.LEASE_S_MIN - 0.5),
])
def test_server_and_client_take_the_bound_and_refuse_past_it(field, at_bound, past_bound):
    from raftq import App
    from raftq.cluster.api.wire import ApiError

    _submit(**{field: at_bound})
    with pytest.raises(ApiError) as refused:
        _submit(**{field: past_bound})
    assert refused.value.status == 400

    app = App(["http://127.0.0.1:9"])
    app.task(lambda: None, name="at_bound", **{field: at_bound})
    with pytest.raises(ValueError, match=field):
        app.task(lambda: None, name="past_bound", **{field: past_bound})


def test_batch_and_fetch_bounds():
    from raftq.client._base import chunks
    from raftq.cluster.api import validation as v
    from raftq.cluster.api.wire import ApiError

    jobs = [{"payload": i} for i in range(protocol.BATCH_COUNT_MAX + 1)]
    with pytest.raises(ApiError) as refused:
        v.submit({"jobs": jobs}, "q", now_ms=1, payload_bytes_max=protocol.PAYLOAD_BYTES_MAX)
    assert refused.value.status == 413
    assert [len(chunk) for chunk in chunks(jobs)] == [protocol.BATCH_COUNT_MAX, 1]

    fetch = {"worker": "w", "queues": ["q"], "max_jobs": protocol.FETCH_COUNT_MAX, "wait_s": protocol.FETCH_WAIT_S_MAX}
    assert v.fetch(fetch)[2:] == (protocol.FETCH_COUNT_MAX, protocol.FETCH_WAIT_S_MAX)
    for past in ({"max_jobs": protocol.FETCH_COUNT_MAX + 1}, {"wait_s": protocol.FETCH_WAIT_S_MAX + 1}):
        with pytest.raises(ApiError):
            v.fetch(fetch | past)
