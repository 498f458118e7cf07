"""Domain errors of the serving half, and the one place that maps them to gRPC status codes."""

from __future__ import annotations

import asyncio

import grpc


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

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str = "", *, limit: str = "") -> None:
        super().__init__(message)
        self.limit = limit


class InvalidInput(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class ModelNotFound(NotFound):
    pass


class AlreadyExists(ServingError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ModelNotReady(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class QueueFull(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ShuttingDown(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class EngineUnavailable(ServingError):
    """The engine process is down (it is being restarted): answered at once, never waited on."""

    code = grpc.StatusCode.UNAVAILABLE


class EngineRefusal(ServingError):
    """An error the engine answered with: its status code, message and limit, as the engine gave them."""

    def __init__(self, code: str, message: str, limit: str = "", queued: bool = False) -> None:
        super().__init__(message, limit=limit)
        self.code = getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL)
        self.queued = queued  # it reached its model's queue before it failed


class FailedPrecondition(ServingError):
    """The request is well formed, but what it asks for does not exist in this state (a version
    exported without the file it needs)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(ServingError):
    code = grpc.StatusCode.UNIMPLEMENTED


class LoadFailed(ServingError):
    """A model version that did not pass validation (checksum, load, warm-up)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


# What a client reads when the server itself failed: the details (class names, addresses, paths)
# stay in the server's log, with the traceback.
INTERNAL_MESSAGE = "internal error: the server logged the details"


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, message) for any exception; unexpected ones are INTERNAL with a plain message."""
    if isinstance(error, ServingError):
        return error.code, str(error)
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "cancelled"
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
