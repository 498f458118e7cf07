"""The gRPC server: V2 inference service, health, reflection, introspection, metrics; lifecycle.

The servicer is thin: convert the message (protocol), call the data plane or the registry, convert
back. Domain errors become status codes in one place, `_rpc`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hmac
import json
import logging
import os
import signal
import time
from typing import Callable, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .dataplane import DataPlane
from .errors import InvalidInput, ServingError, ShuttingDown, status_of
from .metrics import METRICS
from .proto import POOL
from .proto import grpc_service_pb2 as pb
from .proto import grpc_service_pb2_grpc as pb_grpc
from .proto import introspection_pb2 as ipb
from .proto import introspection_pb2_grpc as ipb_grpc
from .proto import model_config_pb2 as mc
from .protocol import build_infer_response, parse_infer_request
from .registry import ModelVersion, Registry
from .settings import Settings

log = logging.getLogger("convserve")
VERSION = "0.1.0"
EXTENSIONS = ["classification", "model_repository", "model_repository(unload_dependents)", "statistics",
              "model_configuration", "binary_tensor_data", "convserve_feature_maps"]

# Per-RPC state the interceptor reads after the handler: which model, which status code.
_RPC_STATE: contextvars.ContextVar[dict] = contextvars.ContextVar("rpc_state")


def _note(model: str = "", version: str = "", code: Optional[grpc.StatusCode] = None) -> None:
    state = _RPC_STATE.get(None)
    if state is not None:
        if model:
            state["model"], state["version"] = model, version
        if code is not None:
            state["code"] = code


def _rpc(method):
    """Map domain errors to status codes, once, for every unary RPC."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except ServingError as exc:
            code, message = status_of(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # a bug: still one request's error, never the server's
            log.exception("unexpected error in %s", method.__name__)
            code, message = status_of(exc)
        _note(code=code)
        await context.abort(code, message)
    return wrapper


def _deadline(context) -> Optional[float]:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RequestRecorder:
    """Counts and times requests; shared by the interceptors and the stream handler.

    Model labels come from requests: only served names become label values, so a client sending
    random names cannot blow up the metrics' cardinality.
    """

    def __init__(self, is_known_model: Callable[[str], bool]) -> None:
        self._is_known_model = is_known_model

    def record(self, model: str, version: str, method: str, code: grpc.StatusCode, seconds: float) -> None:
        if model and not self._is_known_model(model):
            model, version = "unknown", ""
        METRICS.requests.labels(model, version, method, code.name).inc()
        METRICS.request_duration.labels(model, method).observe(seconds)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Times every unary RPC by model, version, method and status code.

    The wrapped handler is built once per method and reused (intercept_service runs on every
    call), so this interceptor must sit inside any that answers differently per call (auth).
    """

    def __init__(self, recorder: RequestRecorder) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._recorder = recorder

    async def intercept_service(self, continuation, handler_call_details):
        method_path = handler_call_details.method
        cached = self._wrapped.get(method_path)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler   # unknown methods (UNIMPLEMENTED) and streams pass through
        wrapped = self._wrap(handler, method_path.rsplit("/", 1)[-1])
        self._wrapped[method_path] = wrapped
        return wrapped

    def _wrap(self, handler, method: str):
        inner = handler.unary_unary
        record = self._recorder.record

        async def timed_unary(request, context):
            state = {"model": getattr(request, "model_name", "") or getattr(request, "name", ""),
                     "version": "", "code": grpc.StatusCode.OK}
            _RPC_STATE.set(state)
            started = time.perf_counter()
            METRICS.in_flight.inc()
            try:
                return await inner(request, context)
            except BaseException:
                if state["code"] == grpc.StatusCode.OK:
                    state["code"] = grpc.StatusCode.CANCELLED if context.cancelled() else grpc.StatusCode.UNKNOWN
                raise
            finally:
                METRICS.in_flight.dec()
                record(state["model"], state["version"], method, state["code"], time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            timed_unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """With a token set, every RPC but health checks needs `authorization: Bearer <token>`."""

    def __init__(self, token: str, recorder: RequestRecorder) -> None:
        self._expected = f"Bearer {token}".encode()
        self._recorder = recorder

    async def intercept_service(self, continuation, handler_call_details):
        method_path = handler_call_details.method
        if method_path.startswith("/grpc.health.v1.Health/"):
            return await continuation(handler_call_details)   # probes carry no credentials
        presented = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(presented.encode() if isinstance(presented, str) else presented, self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = method_path.rsplit("/", 1)[-1]
        recorder = self._recorder

        async def deny(request_or_iterator, context):
            recorder.record("", "", method, grpc.StatusCode.UNAUTHENTICATED, 0.0)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong authorization token")

        async def deny_stream(request_or_iterator, context):
            await deny(request_or_iterator, context)
            yield  # pragma: no cover - abort raises first

        kinds = {"unary_unary": grpc.unary_unary_rpc_method_handler, "unary_stream": grpc.unary_stream_rpc_method_handler,
                 "stream_unary": grpc.stream_unary_rpc_method_handler,
                 "stream_stream": grpc.stream_stream_rpc_method_handler}
        for kind, make in kinds.items():
            if getattr(handler, kind) is not None:
                return make(deny_stream if kind.endswith("_stream") else deny,
                            request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, registry: Registry, dataplane: DataPlane, settings: Settings, server_state: dict,
                 recorder: RequestRecorder) -> None:
        self.registry = registry
        self.dataplane = dataplane
        self.settings = settings
        self.state = server_state
        self.recorder = recorder

    # ---- health and metadata -----------------------------------------------------------------

    @_rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state["ready"] and bool(self.registry.ready_models()))

    @_rpc
    async def ModelReady(self, request, context):
        try:
            self.registry.resolve(request.name, request.version)
        except InvalidInput:
            raise                      # a malformed name or version is an error, not "not ready"
        except ServingError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.state["stopping"])

    @_rpc
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="convserve", version=VERSION, extensions=EXTENSIONS)

    @_rpc
    async def ModelMetadata(self, request, context):
        model = self.registry.resolve(request.name, request.version)
        versions = sorted(self.registry.served.get(model.name, {}))
        response = pb.ModelMetadataResponse(name=model.name, versions=[str(v) for v in versions],
                                            platform="onnxruntime_onnx")
        response.inputs.add(name="input", datatype="FP32", shape=[-1, *model.input_shape])
        response.inputs.add(name="image", datatype="BYTES", shape=[-1])
        for output in model.meta["outputs"]:
            response.outputs.add(name=output["name"], datatype=output["datatype"], shape=output["shape"])
        return response

    @_rpc
    async def ModelConfig(self, request, context):
        model = self.registry.resolve(request.name, request.version)
        gpu = model.execution_provider != "CPUExecutionProvider"
        config = mc.ModelConfig(name=model.name, platform="onnxruntime_onnx", backend="onnxruntime",
                                max_batch_size=self.settings.max_batch_size, default_model_filename="model.onnx")
        config.input.add(name="input", data_type=mc.TYPE_FP32, format=mc.ModelInput.FORMAT_NCHW,
                         dims=list(model.input_shape))
        config.input.add(name="image", data_type=mc.TYPE_STRING, dims=[1], optional=True)
        for output in model.meta["outputs"]:
            config.output.add(name=output["name"], data_type=mc.TYPE_FP32, dims=output["shape"][1:])
        config.dynamic_batching.max_queue_delay_microseconds = int(self.settings.max_queue_delay_ms * 1000)
        config.instance_group.add(name=model.name, count=model.instances,
                                  kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU,
                                  gpus=[self.settings.cuda_device_id] if gpu else [])
        config.parameters["execution_provider"].string_value = model.execution_provider
        config.parameters["providers"].string_value = ",".join(model.providers)
        config.parameters["max_queue_size"].string_value = str(self.settings.max_queue_size)
        return pb.ModelConfigResponse(config=config)

    @_rpc
    async def ModelStatistics(self, request, context):
        if request.name:
            models = list(self.registry.served.get(request.name, {}).values())
            if request.version:
                models = [m for m in models if str(m.version) == request.version]
            if not models:
                self.registry.resolve(request.name, request.version)   # raises the right error
        else:
            models = [m for versions in self.registry.served.values() for m in versions.values()]
        response = pb.ModelStatisticsResponse()
        for model in models:
            s = model.stats
            entry = response.model_stats.add(name=model.name, version=str(model.version),
                                             last_inference=s.last_inference_ms, inference_count=s.inference_count,
                                             execution_count=s.execution_count)
            stats = entry.inference_stats
            stats.success.count, stats.success.ns = s.success_count, s.success_ns
            stats.fail.count, stats.fail.ns = s.fail_count, s.fail_ns
            stats.queue.count, stats.queue.ns = s.success_count, s.queue_ns
            stats.compute_input.count, stats.compute_input.ns = s.success_count, s.preprocess_ns
            stats.compute_infer.count, stats.compute_infer.ns = s.execution_count, s.compute_ns
            stats.compute_output.count, stats.compute_output.ns = s.success_count, s.postprocess_ns
            for size, (count, ns) in sorted(s.batches.items()):
                batch = entry.batch_stats.add(batch_size=size)
                batch.compute_infer.count, batch.compute_infer.ns = count, ns
        return response

    # ---- repository --------------------------------------------------------------------------

    @_rpc
    async def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.registry.index():
            if request.ready and state != "READY":
                continue
            response.models.add(name=name, version=version, state=state, reason=reason)
        return response

    @_rpc
    async def RepositoryModelLoad(self, request, context):
        await self.registry.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request, context):
        await self.registry.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ---- inference ---------------------------------------------------------------------------

    async def _infer(self, request, deadline) -> pb.ModelInferResponse:
        if self.state["stopping"]:
            raise ShuttingDown("the server is shutting down")
        parsed = parse_infer_request(request)
        model, result = await self.dataplane.infer(parsed, deadline)
        _note(model.name, str(model.version))
        return build_infer_response(parsed, model.name, str(model.version), result)

    @_rpc
    async def ModelInfer(self, request, context):
        return await self._infer(request, _deadline(context))

    async def ModelStreamInfer(self, request_iterator, context):
        """Answers every request on the stream, in completion order; a bad one gets error_message."""
        results: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()

        async def answer(request):
            started = time.perf_counter()
            try:
                response = await self._infer(request, _deadline(context))
                item, code = pb.ModelStreamInferResponse(infer_response=response), grpc.StatusCode.OK
            except Exception as exc:
                code, message = status_of(exc)
                item = pb.ModelStreamInferResponse(
                    error_message=f"{code.name}: {message}",
                    infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id))
            version = item.infer_response.model_version
            self.recorder.record(request.model_name, version, "ModelStreamInfer", code, time.perf_counter() - started)
            await results.put(item)

        async def read():
            async for request in request_iterator:
                task = asyncio.create_task(answer(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*list(pending))
            await results.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await results.get()) is not None:
                yield item
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()


class IntrospectionServicer(ipb_grpc.IntrospectionServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    @_rpc
    async def DescribeModel(self, request, context):
        model: ModelVersion = self.registry.resolve(request.name, request.version)
        meta = model.meta
        arithmetic = meta.get("arithmetic", {"layers": [], "total_params": 0, "total_macs": 0})
        response = ipb.DescribeModelResponse(
            name=model.name, version=str(model.version), total_params=arithmetic["total_params"],
            total_macs=arithmetic["total_macs"], feature_maps=[f["name"] for f in meta.get("feature_maps", [])],
            labels=model.labels, training_json=json.dumps(meta.get("training", {})),
            preprocess_json=json.dumps(meta["preprocess"]),
            execution_provider=model.execution_provider, sha256=meta["onnx"]["sha256"])
        for layer in arithmetic["layers"]:
            response.layers.add(
                name=layer["name"], kind=layer["kind"], op=layer["op"], input_shape=layer["input_shape"],
                output_shape=layer["output_shape"], params=layer["params"], macs=layer["macs"],
                activations=layer["activations"], receptive_field=layer["receptive_field"] or [],
                jump=layer["jump"] or [], detail=layer.get("detail", ""))
        return response


class Server:
    """Registry, gRPC server, health, metrics endpoint and the repository poller, started and stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.state = {"ready": False, "stopping": False}
        self.registry = Registry(settings, on_change=self._update_health)
        self.dataplane = DataPlane(self.registry)
        self.grpc_server: Optional[grpc.aio.Server] = None
        self.port: Optional[int] = None
        self._poller: Optional[asyncio.Task] = None
        self._health_tasks: set = set()
        self._metrics_server = None

    def _update_health(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        statuses = {"": serving if self.state["ready"] and not self.state["stopping"] else not_serving}
        for name in self.registry.served:
            statuses[name] = serving if not self.state["stopping"] else not_serving
        for name, _, state, _ in self.registry.index():
            statuses.setdefault(name, not_serving)
        for name, status in statuses.items():
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                task = asyncio.ensure_future(result)
                self._health_tasks.add(task)
                task.add_done_callback(self._health_tasks.discard)

    async def start(self) -> int:
        s = self.settings
        options = [("grpc.max_receive_message_length", s.max_message_bytes),
                   ("grpc.max_send_message_length", s.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        recorder = RequestRecorder(lambda name: name in self.registry.served)
        # auth outermost: the metrics interceptor caches one handler per method
        interceptors = [AuthInterceptor(s.auth_token, recorder)] if s.auth_token else []
        interceptors.append(MetricsInterceptor(recorder))
        self.grpc_server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.registry, self.dataplane, s, self.state, recorder), self.grpc_server)
        ipb_grpc.add_IntrospectionServicer_to_server(IntrospectionServicer(self.registry), self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        # Reflection reads our descriptor pool; health's file joins it so it can be reflected too.
        try:
            POOL.FindFileByName(health_pb2.DESCRIPTOR.name)
        except KeyError:
            POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
        service_names = [pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                         ipb.DESCRIPTOR.services_by_name["Introspection"].full_name,
                         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                         reflection.SERVICE_NAME]
        reflection.enable_server_reflection(service_names, self.grpc_server, pool=POOL)
        self.port = self.grpc_server.add_insecure_port(f"{s.host}:{s.grpc_port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {s.host}:{s.grpc_port}")
        self._update_health()
        if s.metrics_port:
            self._metrics_server = METRICS.serve(s.metrics_port, s.host)
        await self.grpc_server.start()
        log.info("listening on %s:%d (gRPC), %s", s.host, self.port,
                 f"metrics on :{s.metrics_port}/metrics" if s.metrics_port else "no metrics endpoint")
        if not os.path.isdir(self.registry.repository):
            log.warning("repository %s does not exist: serving no models until it does", self.registry.repository)
        await self.registry.scan()
        self.state["ready"] = True
        self._update_health()
        for model in self.registry.ready_models():
            log.info("serving %s version %d (%s)", model.name, model.version, model.execution_provider)
        if s.poll_interval:
            self._poller = asyncio.create_task(self._poll())
        return self.port

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            try:
                await self.registry.scan()
            except Exception:
                log.exception("repository scan failed")

    async def stop(self) -> None:
        """NOT_SERVING, refuse new requests, finish those in flight within the grace period."""
        self.state["stopping"] = True
        self._update_health()
        if self._poller:
            self._poller.cancel()
        if self.grpc_server is not None:
            await self.grpc_server.stop(self.settings.grace_period)
        await self.registry.close()
        if self._metrics_server is not None:
            server, _thread = self._metrics_server
            server.shutdown()


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = Server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        print(f"convserve: serving {len(server.registry.ready_models())} model version(s) on "
              f"{settings.host}:{server.port}", flush=True)
        await stop.wait()
        log.info("signal received: finishing in-flight requests (grace %.0f s)", settings.grace_period)
    finally:
        await server.stop()
    log.info("stopped")
