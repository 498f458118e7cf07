"""The V2 inference service (inference.GRPCInferenceService): thin.

Runs in each front-end. Each RPC converts the message (protocol), asks the data plane, the model
table or the engine (the state every front-end shares: repository, statistics, shared memory),
converts back.
`rpc` wraps every unary method once: it opens the request's `Outcome`, records it when the method
ends, and turns domain errors into status codes (errors.status_of is the one table). The stream
handler does the same per message.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Optional

import grpc

from convserve import __version__
from convserve.contract import DEFAULT_OUTPUTS, IMAGE_INPUT_NAME, INPUT_NAME, PLATFORM
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc
from convserve.proto import model_config_pb2 as mc

from ..errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    NotFound,
    ServingError,
    ShuttingDown,
    Unimplemented,
    status_of,
)
from ..rules import check_model_name
from ..settings import Settings
from .dataplane import DataPlane
from .engine_link import EngineLink
from .models import ModelTable
from .observe import Outcome, Recorder, log_settings, set_log_settings
from .protocol import (
    InferRequest,
    InferResult,
    build_infer_response,
    encode_infer_response,
    parse_infer_request,
    serialize_response,
)

log = logging.getLogger(__name__)

EXTENSIONS = [
    "classification",
    "model_repository",
    "statistics",
    "model_configuration",
    "binary_tensor_data",
    "convserve_feature_maps",
    "system_shared_memory",
    "logging",
]
# The log settings that can be set, with the value type each takes (Triton's names)
LOG_SETTING_TYPES = {
    "log_info": "bool_param",
    "log_warning": "bool_param",
    "log_error": "bool_param",
    "log_verbose_level": "uint32_param",
}
# Triton's trace settings as a server without tracing has them; only "tracing off" can be set.
TRACE_SETTINGS = {
    "trace_level": ["OFF"],
    "trace_rate": ["1000"],
    "trace_count": ["-1"],
    "log_frequency": ["0"],
    "trace_file": [""],
    "trace_mode": ["triton"],
}
# CUDA shared memory needs cudaIpc handles opened on a GPU; it is not built until it can be tested there.
_NO_CUDA_SHM = "CUDA shared memory is not supported by this server yet; use system shared memory"

Handler = Callable[[Any, Any, grpc.aio.ServicerContext, Outcome], Awaitable[Any]]


def rpc(method: Handler):
    """Observe and map errors for one unary RPC: `method(self, request, context, outcome)`."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        outcome = Outcome(name, getattr(request, "model_name", "") or getattr(request, "name", ""))
        try:
            with self.recorder.observe(outcome):
                return await method(self, request, context, outcome)
        except Exception as exc:  # CancelledError is a BaseException: it passes
            code, message = status_of(exc)
        await context.abort(code, message)

    return wrapper


def deadline_of(context: grpc.aio.ServicerContext) -> Optional[float]:
    """The RPC's deadline as time.monotonic() seconds, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class ServerState(enum.Enum):
    STARTING = "starting"  # listening, loading the repository
    READY = "ready"  # the first scan is done
    STOPPING = "stopping"  # refusing new requests, finishing those in flight


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        models: ModelTable,
        engine: EngineLink,
        dataplane: DataPlane,
        settings: Settings,
        server_state: Callable[[], ServerState],
        recorder: Recorder,
        identity: str = "",
    ) -> None:
        self.models = models
        self.engine = engine
        self.identity = identity  # "i/N": the front-end, named in ModelStatistics' trailing metadata
        self.dataplane = dataplane
        self.settings = settings
        self.server_state = server_state
        self.recorder = recorder

    # ---- health and metadata -----------------------------------------------------------------

    @rpc
    async def ServerLive(self, request, context, outcome):
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request, context, outcome):
        return pb.ServerReadyResponse(
            ready=self.server_state() is ServerState.READY
            and self.engine.connected
            and bool(self.models.ready_models())
            and not self.models.failed  # only with --strict-readiness does the engine report them
        )

    @rpc
    async def ModelReady(self, request, context, outcome):
        try:
            self.models.resolve(request.name, request.version)
        except InvalidInput:
            raise  # a version that is no number is an error, not "not ready"
        except ServingError:  # unknown (an empty name, version "0" too) or not ready: OK, ready=false
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.server_state() is not ServerState.STOPPING and self.engine.connected)

    @rpc
    async def ServerMetadata(self, request, context, outcome):
        return pb.ServerMetadataResponse(name="convserve", version=__version__, extensions=EXTENSIONS)

    @rpc
    async def ModelMetadata(self, request, context, outcome):
        model = self.models.resolve(request.name, request.version)
        versions = [str(m.version) for m in self.models.served_versions(model.name)]
        response = pb.ModelMetadataResponse(name=model.name, versions=versions, platform=PLATFORM)
        response.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[-1, *model.input_shape])
        # the config's dims with the batch dimension in front, as Triton reports them
        response.inputs.add(name=IMAGE_INPUT_NAME, datatype="BYTES", shape=[-1, 1])
        for output in model.card.outputs:
            response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        return response

    @rpc
    async def ModelConfig(self, request, context, outcome):
        model = self.models.resolve(request.name, request.version)
        gpu = model.execution_provider != "CPUExecutionProvider"
        config = mc.ModelConfig(
            name=model.name,
            platform=PLATFORM,
            backend="onnxruntime",
            max_batch_size=self.settings.max_batch_size,
            default_model_filename="model.onnx",
        )
        # two alternatives: a request carries exactly one of them, so each is optional
        config.input.add(
            name=INPUT_NAME,
            data_type=mc.TYPE_FP32,
            format=mc.ModelInput.FORMAT_NCHW,
            dims=list(model.input_shape),
            optional=True,
        )
        config.input.add(name=IMAGE_INPUT_NAME, data_type=mc.TYPE_STRING, dims=[1], optional=True)
        policy = self.settings.version_policy
        if policy == "all":
            config.version_policy.all.SetInParent()
        elif policy.startswith("specific:"):
            config.version_policy.specific.versions.extend(self.settings.specific_versions())
        else:
            config.version_policy.latest.num_versions = 1
        for output in model.card.outputs:
            config.output.add(name=output.name, data_type=mc.TYPE_FP32, dims=output.shape[1:])
        config.dynamic_batching.max_queue_delay_microseconds = int(self.settings.max_queue_delay_ms * 1000)
        config.instance_group.add(
            name=model.name,
            count=model.instances,
            kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU,
            gpus=[self.settings.cuda_device_id] if gpu else [],
        )
        config.parameters["execution_provider"].string_value = model.execution_provider
        config.parameters["providers"].string_value = ",".join(model.providers)
        config.parameters["max_queue_size"].string_value = str(self.settings.max_queue_size)
        # what a request that names no outputs gets (Triton would send every output: feature maps are
        # megabytes, so convserve sends them only when asked for by name)
        config.parameters["default_outputs"].string_value = ",".join(DEFAULT_OUTPUTS)
        return pb.ModelConfigResponse(config=config)

    @rpc
    async def ModelStatistics(self, request, context, outcome):
        if request.name or request.version:
            try:
                self.models.resolve(request.name, request.version)
            except (ModelNotFound, ModelNotReady) as exc:  # Triton: INVALID_ARGUMENT for statistics
                raise InvalidInput(str(exc)) from None
        version = int(request.version) if request.name and request.version else None
        response = pb.ModelStatisticsResponse()
        if self.identity:  # the statistics are the engine's, for every front-end: say which one answered
            context.set_trailing_metadata((("convserve-frontend", self.identity),))
        for s in await self.engine.call("statistics", request.name, version):
            entry = response.model_stats.add(
                name=s["name"],
                version=str(s["version"]),
                last_inference=s["last_inference_ms"],
                inference_count=s["inference_count"],
                execution_count=s["execution_count"],
            )
            stats = entry.inference_stats
            successes = s["success_count"]
            stats.success.count, stats.success.ns = successes, s["success_ns"]
            stats.fail.count, stats.fail.ns = s["fail_count"], s["fail_ns"]
            stats.queue.count, stats.queue.ns = successes, s["queue_ns"]
            stats.compute_input.count, stats.compute_input.ns = successes, s["preprocess_ns"]
            # per request, as Triton counts them: each request carries its batch's run time
            stats.compute_infer.count, stats.compute_infer.ns = successes, s["request_compute_ns"]
            stats.compute_output.count, stats.compute_output.ns = successes, s["postprocess_ns"]
            for size, (count, input_ns, infer_ns, output_ns) in sorted(s["batches"].items()):
                batch = entry.batch_stats.add(batch_size=size)  # per execution of that batch size
                batch.compute_input.count, batch.compute_input.ns = count, input_ns
                batch.compute_infer.count, batch.compute_infer.ns = count, infer_ns
                batch.compute_output.count, batch.compute_output.ns = count, output_ns
        return response

    # ---- repository --------------------------------------------------------------------------

    @rpc
    async def RepositoryIndex(self, request, context, outcome):
        if request.repository_name:
            raise Unimplemented("convserve serves one repository: RepositoryIndex takes no repository_name")
        response = pb.RepositoryIndexResponse()
        for name, version, state, reason in await self.engine.call("index"):
            if request.ready and state != "READY":
                continue
            response.models.add(name=name, version=version, state=state, reason=reason)
        return response

    @rpc
    async def RepositoryModelLoad(self, request, context, outcome):
        overrides = sorted(k for k in request.parameters if k == "config" or k.startswith("file:"))
        if overrides:  # Triton would apply them; convserve cannot, and says so rather than ignore them
            raise Unimplemented(
                f"RepositoryModelLoad with {', '.join(overrides)} is not supported: convserve loads the model "
                "folder as exported, and its settings are `convserve serve` flags"
            )
        check_model_name(request.model_name)
        # the answer carries the new table: this front-end answers from it at once (the others get it
        # in the engine's broadcast)
        self.models.update(await self.engine.call("load", request.model_name))
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request, context, outcome):
        check_model_name(request.model_name)
        self.models.update(await self.engine.call("unload", request.model_name))
        return pb.RepositoryModelUnloadResponse()

    # ---- logging and tracing (Triton's extensions) ---------------------------------------------

    @rpc
    async def LogSettings(self, request, context, outcome):
        """Read, and set, what the server logs: Triton's keys, applied to convserve's loggers."""
        updates: dict[str, bool | int] = {}
        for key, value in request.settings.items():
            choice = value.WhichOneof("parameter_choice") or ""
            given = getattr(value, choice) if choice else ""
            if LOG_SETTING_TYPES.get(key) == choice:
                updates[key] = getattr(value, choice)
            elif key == "log_file" and choice == "string_param":
                if given:
                    raise Unimplemented("log_file: convserve logs to stderr; redirect it (or let the container log it)")
            elif key == "log_format" and choice == "string_param":
                if given != "default":
                    raise Unimplemented(f"log_format {given[:32]!r}: only 'default' is implemented")
            else:
                raise InvalidInput(
                    f"unknown log setting {key[:64]!r}, or a value of the wrong type ({choice or 'none'})"
                )
        if updates:
            set_log_settings(**updates)
        response = pb.LogSettingsResponse()
        for key, current in log_settings().items():
            if isinstance(current, bool):
                response.settings[key].bool_param = current
            elif isinstance(current, int):
                response.settings[key].uint32_param = current
            else:
                response.settings[key].string_param = current
        return response

    @rpc
    async def TraceSetting(self, request, context, outcome):
        if request.model_name:
            try:
                self.models.resolve(request.model_name)
            except (ModelNotFound, ModelNotReady) as exc:  # Triton 2.51: INVALID_ARGUMENT here
                raise InvalidInput(str(exc)) from None
        for key, value in request.settings.items():
            if key not in TRACE_SETTINGS:
                raise InvalidInput(f"unknown trace setting {key[:64]!r}")
            if list(value.value) not in ([], TRACE_SETTINGS[key]):
                raise Unimplemented("tracing is not implemented: trace settings can be read, and set only to off")
        response = pb.TraceSettingResponse()
        for key, values in TRACE_SETTINGS.items():
            response.settings[key].value.extend(values)
        return response

    # ---- shared memory -------------------------------------------------------------------------

    @rpc
    async def SystemSharedMemoryRegister(self, request, context, outcome):
        await self.engine.call("shm_register", request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc
    async def SystemSharedMemoryStatus(self, request, context, outcome):
        response = pb.SystemSharedMemoryStatusResponse()
        for name, key, offset, byte_size in await self.engine.call("shm_status", request.name):
            response.regions[name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(name=name, key=key, offset=offset, byte_size=byte_size)
            )
        return response

    @rpc
    async def SystemSharedMemoryUnregister(self, request, context, outcome):
        await self.engine.call("shm_unregister", request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc
    async def CudaSharedMemoryRegister(self, request, context, outcome):
        raise Unimplemented(_NO_CUDA_SHM)

    @rpc
    async def CudaSharedMemoryStatus(self, request, context, outcome):
        # no CUDA region can be registered: none to report (perf_analyzer asks while it cleans up)
        if request.name:
            raise NotFound(f"no CUDA shared-memory region {request.name[:64]!r} is registered")
        return pb.CudaSharedMemoryStatusResponse()

    @rpc
    async def CudaSharedMemoryUnregister(self, request, context, outcome):
        return pb.CudaSharedMemoryUnregisterResponse()  # idempotent, as the system one: nothing to forget

    # ---- inference ---------------------------------------------------------------------------

    async def parse_and_infer(
        self, request: pb.ModelInferRequest, outcome: Outcome, deadline: Optional[float]
    ) -> tuple[InferRequest, InferResult]:
        """Refused while stopping; the message parsed and checked, then run by the data plane."""
        if self.server_state() is ServerState.STOPPING:
            raise ShuttingDown("the server is shutting down")
        parsed = parse_infer_request(request, self.settings.max_batch_size)
        return parsed, await self.dataplane.infer(parsed, outcome, deadline)

    async def infer_message(
        self, request: pb.ModelInferRequest, outcome: Outcome, deadline: Optional[float]
    ) -> pb.ModelInferResponse:
        return build_infer_response(*await self.parse_and_infer(request, outcome, deadline))

    @rpc
    async def ModelInfer(self, request, context, outcome):
        # the wire bytes themselves (registered with `serialize_response`: see add_to_server)
        return encode_infer_response(*await self.parse_and_infer(request, outcome, deadline_of(context)))

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
        slots = asyncio.Semaphore(self.settings.max_stream_in_flight)
        pending: set[asyncio.Task] = set()

        async def answer(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            outcome = Outcome("ModelStreamInfer", request.model_name)
            try:
                with self.recorder.observe(outcome):
                    response = await self.infer_message(request, outcome, deadline_of(context))
                return pb.ModelStreamInferResponse(infer_response=response)
            except Exception as exc:  # recorded (and, if a bug, logged) by observe
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
