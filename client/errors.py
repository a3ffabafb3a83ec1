"""Errors the raftq client raises.

Every error a call can raise because of the cluster (or the network in between) derives from
`RaftqError` and carries `.code` (the wire code of the error body, or a client-side code for
transport failures) and `.status` (the HTTP status, or None when no answer came):

    RaftqError
    ├── TransportError        could not get an answer             code       status
    │   ├── ConnectError      connection refused / reset / closed "connect"  None
    │   ├── Timeout           no answer within the timeout        "timeout"  None
    │   └── DecodeError       an answer the client cannot read    "decode"   the answer's
    ├── ServerError           the cluster cannot serve it now (retried within the deadline)
    │   ├── Unavailable       503 not ready / overloaded          "unavailable", "timeout"  503
    │   │   └── NoLeader      503 no leader known, or a redirect loop   "no_leader"
    │   └── QueueFull         429 the queue is at its max depth   "queue_full"  429
    ├── RequestError          the request is wrong; retrying will not help
    │   ├── InvalidRequest    400                                 "invalid"
    │   ├── Unauthorized      401 / 403                           "unauthorized", "forbidden"
    │   └── PayloadTooLarge   413                                 "too_large"
    └── JobError              the job is not in a state that allows it
        ├── JobNotFound       404                                 "not_found"
        ├── LeaseError        409                                 "lease_mismatch", "lease_expired"
        ├── Conflict          409                                 "conflict"
        ├── JobFailed         a result waited for: the job ended dead or cancelled   "dead", "cancelled"
        └── JobPending        a result waited for: not finished within the timeout   "pending"

`Unavailable` and `QueueFull` carry `.retry_after` (seconds, from the `Retry-After` header, or
None). Every error carries `.node`, the base URL of the node that answered (or last failed).

`ClientClosed` is apart from the tree on purpose (h11's LocalProtocolError / RemoteProtocolError
split): it reports misuse of the client object by the calling program, never something the
cluster did, so `except RaftqError` in retry loops does not swallow it.
"""

from __future__ import annotations


class RaftqError(Exception):
    """Raised when a raftq call did not succeed; the base of every error below."""

    #: Client default when the answer names no code; subclasses override it.
    default_code = "error"
    #: HTTP status when the class implies one.
    default_status: int | None = None

    def __init__(self, message: str = "", *, code: str | None = None, status: int | None = None,
                 retry_after: float | None = None, node: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.status = status if status is not None else self.default_status
        self.retry_after = retry_after
        self.node = node

    def __reduce__(self):  # keeps the keyword fields across pickling (the process pool pickles errors)
        return (_rebuild, (type(self), self.message, self.code, self.status, self.retry_after, self.node))


def _rebuild(cls: type, message: str, code: str, status: int | None, retry_after: float | None,
             node: str | None) -> RaftqError:
    return cls(message, code=code, status=status, retry_after=retry_after, node=node)


# ---------------------------------------------------------------------------- transport


class TransportError(RaftqError):
    """Raised when no usable answer came back from any node."""

    default_code = "transport"


class ConnectError(TransportError):
    """Raised when a connection was refused, reset or closed before an answer came."""

    default_code = "connect"


class Timeout(TransportError):
    """Raised when a node did not answer within the per-request timeout."""

    default_code = "timeout"


class DecodeError(TransportError):
    """Raised when a node's answer cannot be decoded or lacks a field the client needs."""

    default_code = "decode"


# ---------------------------------------------------------------------------- server state


class ServerError(RaftqError):
    """Raised when the cluster cannot serve the request now (or answered with an unexpected 5xx)."""

    default_code = "internal"
    default_status = 500


class Unavailable(ServerError):
    """Raised when nodes kept answering 503 (not ready, overloaded) until the deadline."""

    default_code = "unavailable"
    default_status = 503


class NoLeader(Unavailable):
    """Raised when no node knew a leader (503 no_leader), or nodes redirected in a loop, until the deadline."""

    default_code = "no_leader"


class QueueFull(ServerError):
    """Raised when the queue is at its configured max depth (429) and stayed so, or retries were off."""

    default_code = "queue_full"
    default_status = 429


# ---------------------------------------------------------------------------- caller mistakes


class RequestError(RaftqError):
    """Raised when the cluster refused the request itself (a 4xx); sending it again will not help."""

    default_code = "invalid"
    default_status = 400


class InvalidRequest(RequestError):
    """Raised when a field is malformed or out of range (400)."""


class Unauthorized(RequestError):
    """Raised when the bearer token is missing or wrong (401 / 403)."""

    default_code = "unauthorized"
    default_status = 401


class PayloadTooLarge(RequestError):
    """Raised when a payload, body or batch exceeds a node's bound (413)."""

    default_code = "too_large"
    default_status = 413


# ---------------------------------------------------------------------------- job state


class JobError(RaftqError):
    """Raised when the job is not in a state that allows the operation."""

    default_code = "conflict"
    default_status = 409


class JobNotFound(JobError):
    """Raised when no job has that id (never existed, or finished past the retention window) (404)."""

    default_code = "not_found"
    default_status = 404


class LeaseError(JobError):
    """Raised when an ack, fail or extend presents a lease that expired or is not the holder's (409)."""

    default_code = "lease_mismatch"


class Conflict(JobError):
    """Raised when the job's state forbids the change, e.g. cancelling a finished job (409)."""


class JobFailed(JobError):
    """Raised by `JobHandle.result()` when the job ended dead-lettered or cancelled instead of done.

    `.record` is the job's record: its `state`, `attempts` and `last_error` (the handler's error
    and traceback). Its code is the final state, "dead" or "cancelled".
    """

    def __init__(self, message: str = "", *, record: dict | None = None, **fields) -> None:
        super().__init__(message, **fields)
        self.record = record or {}


class JobPending(JobError):
    """Raised by `JobHandle.result(timeout=)` when the job did not finish within the timeout."""

    default_code = "pending"


# ---------------------------------------------------------------------------- local misuse


class ClientClosed(RuntimeError):
    """Raised when a client is used after `close()` / `aclose()` (a bug in the calling program)."""


# ---------------------------------------------------------------------------- mapping answers to errors

#: Wire codes whose class does not follow from the status alone.
_CLASS_OF_CODE: dict[str, type[RaftqError]] = {
    "not_found": JobNotFound,
    "lease_mismatch": LeaseError,
    "lease_expired": LeaseError,
    "conflict": Conflict,
    "no_leader": NoLeader,
    "queue_full": QueueFull,
    "too_large": PayloadTooLarge,
    "unauthorized": Unauthorized,
    "forbidden": Unauthorized,
    "invalid": InvalidRequest,
}

_CLASS_OF_STATUS: dict[int, type[RaftqError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: JobNotFound,
    409: Conflict,
    413: PayloadTooLarge,
    429: QueueFull,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}

#: Status an item-level error would have had as a whole answer (batch items carry only a code).
_STATUS_OF_CODE = {"not_found": 404, "lease_mismatch": 409, "lease_expired": 409, "conflict": 409}


def error_for_status(status: int, code: str | None, message: str, *, retry_after: float | None = None,
                     node: str | None = None) -> RaftqError:
    """The error for a non-2xx answer: the code picks the class within the status's family.

    Args:
        status: the HTTP status.
        code: `error.code` of the body, or None when the body had none.
        message: `error.message` of the body (or a description of the answer).
        retry_after: the Retry-After header in seconds, if any.
        node: the base URL of the node that answered.

    Returns:
        An instance of the most specific class; never raises.
    """
    cls = _CLASS_OF_STATUS.get(status)
    by_code = _CLASS_OF_CODE.get(code or "")
    # The code refines the class only within the status's family (a 409 "lease_expired" is a
    # LeaseError; a 503 "no_leader" is NoLeader), so an odd pairing still gets the status's class.
    if by_code is not None and (cls is None or _family(by_code) is _family(cls)):
        cls = by_code
    if cls is None:
        cls = ServerError if status >= 500 else RequestError
    return cls(message, code=code, status=status, retry_after=retry_after, node=node)


def _family(cls: type[RaftqError]) -> type[RaftqError]:
    """The top-level group of an error class (TransportError, ServerError, RequestError, JobError)."""
    return next(c for c in cls.__mro__ if c.__bases__ == (RaftqError,))


def error_for_item(code: str | None, message: str, *, node: str | None = None) -> RaftqError:
    """The error for one item of a batch answer (`{"error": {"code", "message"}}`).

    Args:
        code: the item's wire code ("not_found", "lease_mismatch", "lease_expired", ...).
        message: the item's message.
        node: the base URL of the node that answered.

    Returns:
        A JobError subclass for the known codes (status as the single-item call would have had),
        else a RequestError.
    """
    status = _STATUS_OF_CODE.get(code or "", 400)
    return error_for_status(status, code, message, node=node)
