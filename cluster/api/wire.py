"""Bodies in and out: msgpack or JSON, and the one error shape.

Requests say what they carry with Content-Type; answers use the Accept header when it names one
of the two types, else the request's own type, else JSON (so `curl` shows text). Binary values in
a JSON answer (a payload that holds msgpack `bin`) become `{"$bytes": "<base64>"}`.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack
from aiohttp import web

from raftq.protocol import CONTENT_TYPE_JSON as JSON
from raftq.protocol import CONTENT_TYPE_MSGPACK as MSGPACK
from raftq.protocol import CONTENT_TYPE_MSGPACK_ALIASES as _MSGPACK_ALIASES


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


async def read_body(request: web.Request, body_bytes_max: int) -> Any:
    """Decodes the request body; an empty body is an empty map.

    Raises:
        ApiError: 413 when larger than body_bytes_max, 400 when the bytes do not decode.
    """
    if request.content_length is not None and request.content_length > body_bytes_max:
        raise ApiError(413, "too_large", f"request body of {request.content_length} bytes exceeds {body_bytes_max}")
    raw = await _read_limited(request, body_bytes_max)
    if not raw:
        return {}
    if request.content_type in _MSGPACK_ALIASES:
        try:
            return msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types for bad input
            raise invalid(f"body is not valid msgpack: {exc}") from None
    # Anything else is read as JSON, so that `curl -d '{...}'` works without a Content-Type.
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"body is neither {MSGPACK} nor valid JSON: {exc}") from None


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
    if any(alias in accept for alias in _MSGPACK_ALIASES):
        return True
    if JSON in accept:
        return False
    return request.content_type in _MSGPACK_ALIASES


def respond(request: web.Request, body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    if wants_msgpack(request):
        data = msgpack.packb(body, use_bin_type=True)
        return web.Response(body=data, status=status, headers=headers, content_type=MSGPACK)
    data = json.dumps(body, default=_json_default, separators=(",", ":")).encode()
    return web.Response(body=data, status=status, headers=headers, content_type=JSON)


def error_response(request: web.Request, error: ApiError) -> web.Response:
    body = {"error": {"code": error.code, "message": error.message}}
    return respond(request, body, status=error.status, headers=error.headers)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, msgpack.ExtType):
        return {"$ext": value.code, "$bytes": base64.b64encode(value.data).decode()}
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def pack_payload(value: Any) -> bytes:
    """The stored form of a job payload: its msgpack encoding."""
    return msgpack.packb(value, use_bin_type=True)


def unpack_payload(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
