"""API errors with the messages and status codes of Shopify/toxiproxy's api.go.

The real server answers every failure with the body ``{"error": "<message>", "status": <code>}``
(plus a newline, because it goes through Go's ``http.Error``). Clients match on the status
(toxiproxy-python: 409 -> ProxyExists, 404 -> NotFound, 400 -> InvalidToxic), and people read
the message, so both are copied word for word. A failure that is not one of these kinds (a
``listen`` that cannot be bound, say) is a 500 whose message is the underlying error, as there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ApiError(Exception):
    """A failure the API reports as ``{"error": message, "status": status}``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


@dataclass(frozen=True, slots=True)
class ErrorKind:
    """One of the real server's named errors; call it to get a fresh exception to raise."""

    message: str
    status: int

    def __call__(self, detail: str | None = None) -> ApiError:
        # Go's joinError(): "<kind message>: <detail>".
        message = self.message if detail is None else f"{self.message}: {detail}"
        return ApiError(message, self.status)


BAD_REQUEST_BODY = ErrorKind("bad request body", 400)
MISSING_FIELD = ErrorKind("missing required field", 400)
PROXY_NOT_FOUND = ErrorKind("proxy not found", 404)
PROXY_ALREADY_EXISTS = ErrorKind("proxy already exists", 409)
INVALID_STREAM = ErrorKind("stream was invalid, can be either upstream or downstream", 400)
INVALID_TOXIC_TYPE = ErrorKind("invalid toxic type", 400)
TOXIC_ALREADY_EXISTS = ErrorKind("toxic already exists", 409)
TOXIC_NOT_FOUND = ErrorKind("toxic not found", 404)


def internal(message: str) -> ApiError:
    """An error without a kind: the real server reports it as a 500 with the raw message."""
    return ApiError(message, 500)


# --- decoding JSON fields the way Go's encoding/json does ------------------------------------

def _json_type(value: Any) -> str:
    """How Go's decoder names a JSON value in "cannot unmarshal X into ..." messages."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def decode_field(obj: dict[str, Any], key: str, go_type: str, where: str) -> Any:
    """Return ``obj[key]`` checked against a Go field type, or None when absent or null.

    Go leaves a field untouched when the JSON value is null or missing, and rejects a value of
    the wrong JSON type (including 1.5 or 1e3 for an integer field) as a bad request body.
    ``go_type`` is one of "string", "bool", "int64", "int", "float32".
    """
    value = obj.get(key)
    if value is None:
        return None
    ok = {
        "string": isinstance(value, str),
        "bool": isinstance(value, bool),
        "float32": isinstance(value, (int, float)) and not isinstance(value, bool),
    }.get(go_type)
    if ok is None:  # an integer type
        ok = isinstance(value, int) and not isinstance(value, bool) and _INT64_MIN <= value <= _INT64_MAX
    if not ok:
        raise BAD_REQUEST_BODY(
            f"json: cannot unmarshal {_json_type(value)} into Go struct field {where}.{key} of type {go_type}")
    return float(value) if go_type == "float32" else value


def require_object(value: Any, go_value: str) -> dict[str, Any]:
    """The request body must be a JSON object; Go names the target type in the message."""
    if not isinstance(value, dict):
        raise BAD_REQUEST_BODY(f"json: cannot unmarshal {_json_type(value)} into Go value of type {go_value}")
    return value
