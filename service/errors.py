"""Domain errors of the serving half, their protocol-neutral status codes, and the two tables that
turn a code into what each door answers: `status_of` (the code and the client's message, the gRPC
door's answer) and `http_status_of` (the HTTP status Triton gives the same case).

`Code` names gRPC's status codes without importing gRPC: the engine and the HTTP door never load it,
and the gRPC door maps a code by its name (`grpc.StatusCode[code.name]`)."""

from __future__ import annotations

import asyncio
import enum


class Code(enum.Enum):
    """A request's status, named as gRPC names it (the names travel between processes and label metrics)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class StartupError(Exception):
    """A process that cannot start for a reason its user can mend (a port in use): one line says
    what and how. A child sends it to the supervisor over its ready pipe; the command prints it."""


def port_in_use(port: int, door: str, setting: str) -> StartupError:
    """The one line for a port someone else holds: which, and the flag and variable that move it."""
    flag, variable = "--" + setting.replace("_", "-"), "CONVSERVE_" + setting.upper()
    return StartupError(f"port {port} ({door}) is in use; set {flag} or {variable}")


class ServingError(Exception):
    """Base of every error a client should see as a status code and a message.

    `limit` names the limit a refusal enforces (image_pixels, batch_size, queue_size ...), so the
    metrics count refusals by limit; empty for other errors.
    """

    code = Code.INTERNAL

    def __init__(self, message: str = "", *, limit: str = "") -> None:
        super().__init__(message)
        self.limit = limit


class InvalidInput(ServingError):
    code = Code.INVALID_ARGUMENT


class NotFound(ServingError):
    code = Code.NOT_FOUND


class ModelNotFound(NotFound):
    pass


class AlreadyExists(ServingError):
    code = Code.ALREADY_EXISTS


class ModelNotReady(ServingError):
    code = Code.UNAVAILABLE


class BodyTooLarge(ServingError):
    """An HTTP body (or what it inflates to) over the body limit: 413, and the connection closes."""

    code = Code.RESOURCE_EXHAUSTED
    http_status = 413


class BodyTimeout(ServingError):
    """An HTTP body that did not arrive in time: 408, and the connection closes."""

    code = Code.DEADLINE_EXCEEDED
    http_status = 408


class QueueFull(ServingError):
    code = Code.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    code = Code.DEADLINE_EXCEEDED


class ShuttingDown(ServingError):
    code = Code.UNAVAILABLE


class EngineUnavailable(ServingError):
    """The engine process is down (it is being restarted): answered at once, never waited on."""

    code = Code.UNAVAILABLE


class EngineRefusal(ServingError):
    """An error the engine answered with: its status code, message and limit, as the engine gave them."""

    def __init__(self, code: str, message: str, limit: str = "", queued: bool = False) -> None:
        super().__init__(message, limit=limit)
        self.code = Code.__members__.get(code, Code.INTERNAL)
        self.queued = queued  # it reached its model's queue before it failed


class FailedPrecondition(ServingError):
    """The request is well formed, but what it asks for does not exist in this state (a version
    exported without the file it needs)."""

    code = Code.FAILED_PRECONDITION


class Unimplemented(ServingError):
    code = Code.UNIMPLEMENTED


class LoadFailed(ServingError):
    """A model version that did not pass validation (checksum, load, warm-up)."""

    code = Code.INVALID_ARGUMENT


# What a client reads when the server itself failed: the details (class names, addresses, paths)
# stay in the server's log, with the traceback.
INTERNAL_MESSAGE = "internal error: the server logged the details"


def status_of(error: BaseException) -> tuple[Code, str]:
    """(status code, message) for any exception; unexpected ones are INTERNAL with a plain message."""
    if isinstance(error, ServingError):
        return error.code, str(error)
    if isinstance(error, asyncio.CancelledError):
        return Code.CANCELLED, "cancelled"
    return Code.INTERNAL, INTERNAL_MESSAGE


# Code -> the HTTP status Triton answers for the same error (anything else is 500)
_HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 400,
    Code.OUT_OF_RANGE: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 400,  # Triton's HTTP answers a second register of a region 400, not 409
    Code.RESOURCE_EXHAUSTED: 429,
    Code.CANCELLED: 499,
    Code.UNIMPLEMENTED: 501,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
}


def http_status_of(error: BaseException) -> tuple[int, str]:
    """(HTTP status, message) for any exception, as Triton's HTTP endpoint answers the same case."""
    code, message = status_of(error)
    return getattr(error, "http_status", None) or _HTTP_STATUS.get(code, 500), message
