"""grpc.health.v1 as Triton answers it, with bounds a health endpoint needs.

Runs in each front-end. Any service name the server does not know (Triton knows none) gets the
server's own status, for Check and Watch alike; a model's name gets the model's. Health needs no
token, so nothing in it may grow with what a client sends: a request is at most MAX_REQUEST_BYTES
(service names are short; the gRPC message limit is sized for images, not for this), and at most
`max_watches` Watch streams are open at once. The request is parsed here, after its size is
checked, so an oversized one costs its bytes for the moment it takes to refuse it.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import AsyncIterator, Mapping
from typing import Any, Optional

import grpc
from grpc_health.v1 import health_pb2

from ...errors import Code
from ..observe import Outcome, Recorder

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MAX_REQUEST_BYTES = 1024
try:
    _LIBC: Any = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: nothing to trim
    _LIBC = None
_SERVICE = "grpc.health.v1.Health"


class Health:
    def __init__(self, max_watches: int, recorder: Recorder) -> None:
        self.max_watches = max_watches
        self.watches = 0  # Watch streams open now
        self._recorder = recorder
        self._statuses: dict[str, int] = {"": NOT_SERVING}
        self._changed = asyncio.Event()  # replaced after every change: watchers wait on the one they saw
        self._closing = False
        self._trim: Optional[asyncio.TimerHandle] = None

    def set(self, statuses: Mapping[str, int]) -> None:
        """The whole table at once ("" is the server); every Watch stream looks again."""
        self._statuses = {"": NOT_SERVING, **statuses}
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        """Stopping: every Watch stream sends its last status (NOT_SERVING by now) and ends, so that
        the grace period waits for requests, not for watchers."""
        self._closing = True
        self.set(self._statuses)

    def _trim_soon(self) -> None:
        """After oversized requests, hand their freed memory back to the system (glibc keeps freed
        multi-megabyte blocks in its heap once its mmap threshold has grown past them): once, a moment
        after a burst, not per request."""
        if self._trim is None and _LIBC is not None:
            self._trim = asyncio.get_running_loop().call_later(0.5, self._trimmed)

    def _trimmed(self) -> None:
        self._trim = None
        _LIBC.malloc_trim(0)

    def status(self, service: str) -> int:
        return self._statuses.get(service, self._statuses[""])

    async def _request(self, raw: bytes, context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckRequest:
        if len(raw) > MAX_REQUEST_BYTES:
            self._trim_soon()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"health request of {len(raw)} bytes: at most {MAX_REQUEST_BYTES} (a service name is short)",
            )
        try:
            return health_pb2.HealthCheckRequest.FromString(raw)
        except Exception:  # protobuf's DecodeError, and what a hostile message may raise instead
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the health request does not parse")
            raise  # not reached: abort raises

    async def check(self, raw: bytes, context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        request = await self._request(raw, context)
        return health_pb2.HealthCheckResponse(status=self.status(request.service))

    async def watch(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        request = await self._request(raw, context)
        if self.watches >= self.max_watches:
            self._recorder.record(Outcome("HealthWatch", code=Code.RESOURCE_EXHAUSTED, limit="health_watches"))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.watches} health Watch streams are open, the most this front-end keeps "
                "(--max-health-watches); use Check, or close one",
            )
        self.watches += 1
        try:
            sent = None
            while True:
                changed = self._changed
                status = self.status(request.service)
                if status != sent:
                    yield health_pb2.HealthCheckResponse(status=status)
                    sent = status
                if self._closing:
                    return
                await changed.wait()
        finally:
            self.watches -= 1

    def handler(self) -> grpc.GenericRpcHandler:
        """Registered as grpc.health.v1.Health; requests arrive as bytes (parsed once their size is known)."""
        return grpc.method_handlers_generic_handler(
            _SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.check, response_serializer=health_pb2.HealthCheckResponse.SerializeToString
                ),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    self.watch, response_serializer=health_pb2.HealthCheckResponse.SerializeToString
                ),
            },
        )
