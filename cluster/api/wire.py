"""Bodies in and out: msgpack or JSON, and the one error shape.

Requests say what they carry with Content-Type; answers use the Accept header when it names one
of the two types, else the request's own type, else JSON (so `curl` shows text). Binary values in
a JSON answer (a payload that holds msgpack `bin`) become `{"$bytes": "<base64>"}`.

Every decoded body holds only what both wires can carry back out, so that a value accepted now
cannot fail to encode later (into the log, or into an answer): no NaN or Infinity, integers
within msgpack's range, no lone UTF-16 surrogates in strings. A body nests at most as deep as
msgpack unpacks (1024 levels; Python's JSON parser stops a little earlier), and a value the node
stores and sends back later (a payload, a result) passes `check_storable`: at most
NESTING_DEPTH_MAX levels, map keys that are strings or integers. Breaking any of it is a 400.

Payloads pass through. A msgpack submit body is scanned rather than decoded whole
(`decode_submit`): each job's payload stays the bytes it arrived as (a `Packed`), which the node
checks, stores in the log entry, replicates and later writes into a msgpack lease answer as they
are (`respond` splices them in). The checks still read the payload's decoded value (msgpack's C
decoder builds it while the scan steps over it; it is dropped after the checks): what is dropped
is the re-encoding. A JSON body's payloads are encoded once, and a JSON answer decodes a stored
payload once: each conversion happens at the edge, once.
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any

import msgpack
from aiohttp import web

from raftq.cluster import constants as c
from raftq.protocol import CONTENT_TYPE_JSON as JSON
from raftq.protocol import CONTENT_TYPE_MSGPACK as MSGPACK
from raftq.protocol import CONTENT_TYPE_MSGPACK_ALIASES as MSGPACK_ALIASES


class ApiError(Exception):
    """Raised inside a view to answer with an error body: `{"error": {"code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid", message)


class Packed:
    """A value carried as its msgpack encoding `data`.

    `respond` writes it into a msgpack answer as these bytes and decodes it only for a JSON one.
    `value` is its decoded value when it came from a request body (the checks read that; its
    map keys are all strings, see `decode_submit`), else unset.
    """

    __slots__ = ("data", "value")

    def __init__(self, data: bytes, value: Any = None) -> None:
        self.data = data
        self.value = value

    def __repr__(self) -> str:
        return f"Packed({self.data[:40]!r}{'...' if len(self.data) > 40 else ''})"


async def read_body(request: web.Request, body_bytes_max: int, *, submit: bool = False) -> Any:
    """Decodes the request body; an empty body is an empty map.

    With `submit`, a msgpack body's job payloads stay as they arrived (`decode_submit`).

    Raises:
        ApiError: 413 when larger than body_bytes_max, 400 when the bytes do not decode.
    """
    if request.content_length is not None and request.content_length > body_bytes_max:
        raise ApiError(413, "too_large", f"request body of {request.content_length} bytes exceeds {body_bytes_max}")
    raw = await _read_limited(request, body_bytes_max)
    if not raw:
        return {}
    if request.content_type in MSGPACK_ALIASES:
        return decode_submit(raw) if submit else decode_msgpack(raw)
    # Anything else is read as JSON, so that `curl -d '{...}'` works without a Content-Type
    # (the API's middleware refuses other types on the writes a browser could forge).
    return decode_json(raw)


def decode_msgpack(raw: bytes) -> Any:
    """The whole body decoded.

    Raises:
        ApiError: 400 when the bytes are not one msgpack value.
    """
    try:
        # Strict UTF-8 (no surrogates), integers within 64 bits, StackError past 1024 levels.
        return msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise invalid(f"body is not valid msgpack: {exc!r}"[:300]) from None


def decode_submit(raw: bytes) -> Any:
    """A msgpack submit body, decoded but for each job's payload, which is a `Packed` of its bytes.

    The scan takes the shape `{"jobs": [{"payload": ANY, NAME: SCALAR, ...}, ...], NAME: SCALAR,
    ...}` with msgpack's streaming Unpacker: map and array headers are read one at a time, and
    `tell()` before and after a payload gives its byte range. Every other value is decoded as
    `unpackb` would. A body of any other shape (a field holding a container where the validation
    wants a scalar, a job that is not a map, ...) or that is not msgpack at all is decoded whole
    by `decode_msgpack` instead, so the validation sees and refuses it exactly as before; so is
    a body with a map key in a payload that is not a string (an integer key is good, but rare:
    holding payload keys to strings here spares the checks a walk, see `check_storable`). Holding
    the non-payload values to scalars also keeps the body's depth where a whole decode would
    have it: three levels above a payload, whose own depth the checks bound.

    Raises:
        ApiError: 400 when the bytes are not one msgpack value.
    """
    try:
        return _scan_submit(raw)
    except Exception:  # not this shape, or not msgpack (several unrelated types): see above
        return decode_msgpack(raw)


def _scan_submit(raw: bytes) -> dict:
    # Every map key in a payload a string (check_storable's text_keys): strict_map_key lets only
    # strings and bytes through, _text_keys_only refuses bytes; a body with another key takes
    # the whole decode.
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, object_hook=_text_keys_only,
                                max_buffer_size=len(raw))
    unpacker.feed(raw)
    unpack, tell, map_header = unpacker.unpack, unpacker.tell, unpacker.read_map_header  # once per job each
    body = {}
    for _ in range(map_header()):  # ValueError when the body is not a map
        key = unpack()
        if key != "jobs" or raw[tell()] not in _ARRAY_MARKERS:
            body[key] = _scalar(unpack())
            continue
        jobs = body[key] = []
        for _ in range(unpacker.read_array_header()):
            spec = {}
            for _ in range(map_header()):  # ValueError when a job is not a map
                key = unpack()
                if key == "payload":
                    start = tell()
                    value = unpack()
                    spec[key] = Packed(raw[start:tell()], value)
                else:
                    spec[key] = _scalar(unpack())
            jobs.append(spec)
    if tell() != len(raw):
        raise ValueError("bytes after the body")
    return body


def _text_keys_only(value: dict) -> dict:
    if bytes in map(type, value):
        raise ValueError("a bytes map key")
    return value


def _scalar(value: Any) -> Any:
    if type(value) is list or type(value) is dict:
        raise ValueError("a container where the scan takes only scalars")
    return value


def decode_json(raw: bytes) -> Any:
    """JSON without NaN, Infinity, integers msgpack cannot hold, or lone surrogates.

    Raises:
        ApiError: 400 naming what is wrong.
    """
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_int=_wire_int, parse_float=_finite_float)
    except RecursionError:
        raise invalid("body nests too deep for the JSON parser") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"body is neither {MSGPACK} nor valid JSON: {exc}"[:300]) from None
    # A decoded string can only hold a lone surrogate when the text escapes one.
    if _SURROGATE_ESCAPE.search(raw) is not None:
        _walk(body, check_text=True, depth_max=None)
    return body


def check_storable(value: Any, packed: bytes, *, text_keys: bool = False) -> None:
    """Raises a 400 unless `value` (whose msgpack encoding is `packed`) can travel both wires.

    Most payloads are maps of short strings and numbers: their encoding holds few container
    headers, no bin or ext marker and no float whose exponent bits are all ones (NaN, Infinity),
    which `bytes.translate` and a regex find without walking the value in Python (a marker
    byte inside a string or a float only sends the value to the walk). Map keys are the one thing
    bytes cannot show: with `text_keys` (the decoder held every key to a string, see
    `decode_submit`) they are known good, and bin and ext values are good anywhere else; without,
    a value holding a float, a bin or ext, or a map along with a nil or boolean, is walked.
    `packed` is any msgpack encoding of `value`, also a client's own (a wider header than needed
    changes no marker family).
    """
    marks = packed.translate(None, _PLAIN_BYTES)  # container, float, bin and ext markers
    if len(marks) <= c.NESTING_DEPTH_MAX:
        if text_keys:
            if _finite_floats(marks, packed):
                return
        elif not marks.translate(None, _CONTAINER_BYTES) and (not marks.translate(None, _ARRAY_BYTES)
                                                              or not packed.translate(None, _NOT_NIL_OR_BOOL_BYTES)):
            return
    _walk(value, check_text=False, depth_max=c.NESTING_DEPTH_MAX)


def storable_by_bytes(payloads: list[bytes]) -> bool:
    """True when every one of `payloads` passes `check_storable(..., text_keys=True)` by its
    bytes alone (see there), told for a whole batch at once: the float test runs over the
    payloads joined (a float's bytes cannot hide across a join, and a false match across one
    only answers False). False says nothing: check each payload then.

    The depth bound holds for a payload of at most NESTING_DEPTH_MAX bytes without looking (each
    container takes a byte); a longer one has its container markers counted.
    """
    joined = b"".join(payloads)
    if not _finite_floats(joined.translate(None, _PLAIN_BYTES), joined):
        return False
    depth_max = c.NESTING_DEPTH_MAX
    for packed in payloads:
        if len(packed) > depth_max and len(packed.translate(None, _PLAIN_BYTES)) > depth_max:
            return False
    return True


def _finite_floats(marks: bytes, packed: bytes) -> bool:
    """True when no float in `packed` is NaN or an infinity, told from its bytes and their
    `marks` (container, float, bin and ext markers): a float's marker followed by an exponent
    of all ones is searched for only when a float marker shows."""
    if b"\xcb" not in marks and b"\xca" not in marks:
        return True
    return _NON_FINITE_FLOAT64.search(packed) is None and _NON_FINITE_FLOAT32.search(packed) is None


def _walk(value: Any, *, check_text: bool, depth_max: int | None) -> None:
    """Checks every value inside `value` without recursion (it may nest 1024 levels)."""
    if check_text and isinstance(value, str) and _has_lone_surrogate(value):
        raise invalid("a string holds a lone UTF-16 surrogate (not valid Unicode text)")
    stack = [([value], 0)]  # a list around it, so that a bare top-level value is checked too
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = []
            for key, child in item.items():
                if depth_max is not None and (not isinstance(key, (str, int)) or isinstance(key, bool)):
                    # JSON answers can only carry string keys (and integers written as strings).
                    raise invalid(f"map keys must be strings or integers, got {type(key).__name__}")
                children.append(key)
                children.append(child)
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth_max is not None and depth > depth_max:
            raise invalid(f"a payload or result nests deeper than {depth_max} levels")
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
            elif kind is float and not math.isfinite(child):
                raise invalid("NaN and Infinity are not numbers either wire can carry")
            elif kind is int and not c.WIRE_INT_MIN <= child <= c.WIRE_INT_MAX:
                raise invalid(f"integer {child} is outside [-2**63, 2**64-1]")
            elif check_text and kind is str and _has_lone_surrogate(child):
                raise invalid("a string holds a lone UTF-16 surrogate (not valid Unicode text)")


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON or msgpack can carry")


def _wire_int(text: str) -> int:
    value = int(text)
    if not c.WIRE_INT_MIN <= value <= c.WIRE_INT_MAX:
        raise ValueError(f"integer {text[:40]} is outside [-2**63, 2**64-1]")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} does not fit a 64-bit float")
    return value


#: A JSON escape of a UTF-16 surrogate (\ud800-\udfff); a valid pair decodes to one character.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
#: msgpack marker bytes: container headers (fixmap, fixarray, array16/32, map16/32) and the
#: float, bin and ext families. Every other byte is "plain" for check_storable.
_CONTAINER_BYTES = bytes([*range(0x80, 0xA0), *range(0xDC, 0xE0)])
_SPECIAL_BYTES = bytes([*range(0xC4, 0xCC), *range(0xD4, 0xD9)])
_PLAIN_BYTES = bytes(b for b in range(256) if b not in _CONTAINER_BYTES + _SPECIAL_BYTES)
_ARRAY_BYTES = bytes([*range(0x90, 0xA0), 0xDC, 0xDD])
#: A float64 (0xcb) or float32 (0xca) marker followed by a sign bit and an exponent of all ones.
#: Two patterns, each with a fixed first byte, which the regex engine finds much faster than
#: one alternation (a 15 KB body: 9 against 38 µs).
_NON_FINITE_FLOAT64 = re.compile(rb"\xcb[\x7f\xff][\xf0-\xff]")
_NON_FINITE_FLOAT32 = re.compile(rb"\xca[\x7f\xff][\x80-\xff]")
_NOT_NIL_OR_BOOL_BYTES = bytes(b for b in range(256) if b not in (0xC0, 0xC2, 0xC3))
_ARRAY_MARKERS = frozenset(_ARRAY_BYTES)


async def _read_limited(request: web.Request, body_bytes_max: int) -> bytes:
    chunks = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > body_bytes_max:
            raise ApiError(413, "too_large", f"request body exceeds {body_bytes_max} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def wants_msgpack(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    if any(alias in accept for alias in MSGPACK_ALIASES):
        return True
    if JSON in accept:
        return False
    return request.content_type in MSGPACK_ALIASES


def respond(request: web.Request, body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Answers with `body` in the wire the request wants; a `Packed` inside it travels as its bytes."""
    if wants_msgpack(request):
        data = pack_answer(body)
        return web.Response(body=data, status=status, headers=headers, content_type=MSGPACK)
    data = json.dumps(body, default=_json_default, separators=(",", ":")).encode()
    return web.Response(body=data, status=status, headers=headers, content_type=JSON)


def error_response(request: web.Request, error: ApiError) -> web.Response:
    body = {"error": {"code": error.code, "message": error.message}}
    return respond(request, body, status=error.status, headers=error.headers)


def pack_answer(body: Any) -> bytes:
    """The msgpack encoding of `body`, with each `Packed` inside it written as its bytes.

    msgpack's C encoder packs the whole body in one call, each Packed standing in as a
    placeholder (an empty ext value of type 127, three bytes that overlap no other occurrence of
    themselves); the stored bytes then take the placeholders' places. Should those three bytes
    also occur inside some other value of the answer (a float's or an integer's bytes), the
    placeholders cannot be told apart and the answer is packed with the values decoded instead.
    """
    spliced: list[bytes] = []

    def stand_in(value: Any) -> Any:
        if type(value) is not Packed:
            raise TypeError(f"cannot encode {type(value).__name__} as msgpack")
        spliced.append(value.data)
        return _PLACEHOLDER

    packed = msgpack.packb(body, use_bin_type=True, default=stand_in)
    if not spliced:
        return packed
    pieces = packed.split(_PLACEHOLDER_BYTES)
    if len(pieces) != len(spliced) + 1:
        return msgpack.packb(body, use_bin_type=True, default=_decoded)
    parts = [pieces[0]]
    for data, piece in zip(spliced, pieces[1:]):
        parts.append(data)
        parts.append(piece)
    return b"".join(parts)


_PLACEHOLDER = msgpack.ExtType(127, b"")
_PLACEHOLDER_BYTES = msgpack.packb(_PLACEHOLDER)


def _decoded(value: Any) -> Any:
    if type(value) is not Packed:
        raise TypeError(f"cannot encode {type(value).__name__}")
    return unpack_payload(value.data)


def _json_default(value: Any) -> Any:
    if type(value) is Packed:
        return unpack_payload(value.data)  # json encodes the result, bytes inside it included
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, msgpack.ExtType):
        return {"$ext": value.code, "$bytes": base64.b64encode(value.data).decode()}
    if isinstance(value, msgpack.Timestamp):  # msgpack's ext type -1, which the decoder turns into this
        return {"$ext": -1, "$bytes": base64.b64encode(value.to_bytes()).decode()}
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def pack_payload(value: Any) -> bytes:
    """The stored form of a job payload: its msgpack encoding."""
    return msgpack.packb(value, use_bin_type=True)


def unpack_payload(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
