"""The V2 inference service (inference.GRPCInferenceService): the gRPC door.

Runs in each front-end. Each RPC reads its message, calls the core (`..core.FrontendCore`, which
both doors call, and which records every call's Outcome), and writes the core's answer as its
response message: V2's JSON-shaped data goes through protobuf's own JSON mapping (`json_format`),
inference through `protocol`. `rpc` turns what a call raises into a status code (errors.status_of);
the stream handler does the same per message.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Optional

import grpc
from google.protobuf import json_format

from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc
from convserve.proto import model_config_pb2 as mc

from ...errors import status_of
from ..core import FrontendCore
from .protocol import build_infer_response, encode_infer_response, parse_infer_request, plain, serialize_response

log = logging.getLogger(__name__)

Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def code_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for what a call raised (the core's codes carry gRPC's names)."""
    code, message = status_of(error)
    return grpc.StatusCode[code.name], message


def rpc(method: Handler):
    """One unary RPC: what it raises becomes the call's status (the core has recorded it)."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except Exception as exc:  # CancelledError is a BaseException: it passes
            code, message = code_of(exc)
        await context.abort(code, message)

    return wrapper


def deadline_of(context: grpc.aio.ServicerContext) -> Optional[float]:
    """The RPC's deadline as time.monotonic() seconds, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _message(data: dict, message):
    """V2's JSON-shaped data as a response message (field names as in the .proto)."""
    return json_format.ParseDict(data, message)


def _setting(value: Any) -> pb.LogSettingsResponse.SettingValue:
    setting = pb.LogSettingsResponse.SettingValue()
    if isinstance(value, bool):
        setting.bool_param = value
    elif isinstance(value, int):
        setting.uint32_param = value
    else:
        setting.string_param = value
    return setting


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: FrontendCore) -> None:
        self.core = core

    # ---- health and metadata -----------------------------------------------------------------

    @rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.core.live())

    @rpc
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.core.ready())

    @rpc
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.core.model_ready(request.name, request.version))

    @rpc
    async def ServerMetadata(self, request, context):
        return _message(self.core.server_metadata(), pb.ServerMetadataResponse())

    @rpc
    async def ModelMetadata(self, request, context):
        return _message(self.core.model_metadata(request.name, request.version), pb.ModelMetadataResponse())

    @rpc
    async def ModelConfig(self, request, context):
        config = self.core.model_config(request.name, request.version)
        return pb.ModelConfigResponse(config=_message(config, mc.ModelConfig()))

    @rpc
    async def ModelStatistics(self, request, context):
        statistics = await self.core.statistics(request.name, request.version)
        if self.core.identity:  # the statistics are the engine's, for every front-end: say which one answered
            context.set_trailing_metadata((("convserve-frontend", self.core.identity),))
        return _message(statistics, pb.ModelStatisticsResponse())

    # ---- repository --------------------------------------------------------------------------

    @rpc
    async def RepositoryIndex(self, request, context):
        models = await self.core.repository_index(request.repository_name, request.ready)
        return _message({"models": models}, pb.RepositoryIndexResponse())

    @rpc
    async def RepositoryModelLoad(self, request, context):
        await self.core.load(request.model_name, list(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request, context):
        await self.core.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ---- logging and tracing (Triton's extensions) ---------------------------------------------

    @rpc
    async def LogSettings(self, request, context):
        """Read, and set, what the server logs: Triton's keys, applied to convserve's loggers."""
        current = self.core.log_settings(plain(request.settings))
        response = pb.LogSettingsResponse()
        for key, value in current.items():
            response.settings[key].CopyFrom(_setting(value))
        return response

    @rpc
    async def TraceSetting(self, request, context):
        updates = {key: list(value.value) for key, value in request.settings.items()}
        response = pb.TraceSettingResponse()
        for key, values in self.core.trace_settings(request.model_name, updates).items():
            response.settings[key].value.extend(values)
        return response

    # ---- shared memory -------------------------------------------------------------------------

    @rpc
    async def SystemSharedMemoryRegister(self, request, context):
        await self.core.shm_register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc
    async def SystemSharedMemoryStatus(self, request, context):
        regions = {region["name"]: region for region in await self.core.shm_status(request.name)}
        return _message({"regions": regions}, pb.SystemSharedMemoryStatusResponse())

    @rpc
    async def SystemSharedMemoryUnregister(self, request, context):
        await self.core.shm_unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc
    async def CudaSharedMemoryRegister(self, request, context):
        self.core.cuda_shm_register()
        return pb.CudaSharedMemoryRegisterResponse()

    @rpc
    async def CudaSharedMemoryStatus(self, request, context):
        regions = {region["name"]: region for region in self.core.cuda_shm_status(request.name)}
        return _message({"regions": regions}, pb.CudaSharedMemoryStatusResponse())

    @rpc
    async def CudaSharedMemoryUnregister(self, request, context):
        self.core.cuda_shm_unregister()
        return pb.CudaSharedMemoryUnregisterResponse()

    # ---- inference ---------------------------------------------------------------------------

    @rpc
    async def ModelInfer(self, request, context):
        # the wire bytes themselves (registered with `serialize_response`: see add_to_server)
        core = self.core
        with core.inference("ModelInfer", request.model_name) as outcome:
            inputs = core.inputs_of(request.model_name, request.model_version)
            parsed = parse_infer_request(request, core.settings.max_batch_size, inputs)
            return encode_infer_response(parsed, await core.infer(parsed, outcome, deadline_of(context)))

    async def stream_answer(self, request: pb.ModelInferRequest, deadline: Optional[float]) -> pb.ModelInferResponse:
        core = self.core
        with core.inference("ModelStreamInfer", request.model_name) as outcome:
            inputs = core.inputs_of(request.model_name, request.model_version)
            parsed = parse_infer_request(request, core.settings.max_batch_size, inputs)
            return build_infer_response(parsed, await core.infer(parsed, outcome, deadline))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Answers every request on the stream in request order, as Triton does (tritonclient's
        stream callback gives an error no request id: clients match answers to requests by
        position); a bad request's answer carries error_message, Triton's plain message without a
        status-code prefix. Requests still run concurrently and batch together; only the writing
        waits for the earlier answers.

        At most `max_stream_in_flight` requests are in progress or answered-but-unwritten at once;
        past that the stream is not read until the client takes its answers: a client that sends and
        never reads gets back-pressure (HTTP/2 flow control), not server memory, and one stream holds
        at most that many places in a model's shared queue.
        """
        answers: asyncio.Queue = asyncio.Queue()  # tasks in request order; None ends the stream
        slots = asyncio.Semaphore(self.core.settings.max_stream_in_flight)
        pending: set[asyncio.Task] = set()

        async def answer(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                response = await self.stream_answer(request, deadline_of(context))
                return pb.ModelStreamInferResponse(infer_response=response)
            except Exception as exc:  # recorded (and, if a bug, logged) by the core
                _, message = status_of(exc)
                return pb.ModelStreamInferResponse(
                    error_message=message,
                    infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
                )

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(answer(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    await answers.put(task)
            except Exception:  # an undecodable message or a broken stream: say so, end the stream
                log.warning("ModelStreamInfer: reading the request stream failed", exc_info=True)
                unreadable.set()
            await answers.put(None)

        unreadable = asyncio.Event()
        reader = asyncio.create_task(read())
        try:
            while (task := await answers.get()) is not None:
                yield await task
                slots.release()
            if unreadable.is_set():  # the answers so far are sent; the stream ends with why
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a message on the stream could not be read")
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()


class _Handlers:
    """Stands in for a server to catch the handlers the generated code registers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, dict(handlers)


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """The generated registration, with ModelInfer's answer serialised by `serialize_response` (the
    servicer hands it over already encoded)."""
    caught = _Handlers()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, caught)
    caught.handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=serialize_response,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(caught.service, caught.handlers),))
    server.add_registered_method_handlers(caught.service, caught.handlers)
