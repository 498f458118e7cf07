"""The V2 HTTP/REST protocol (KServe's, with Triton's binary tensor extension), on aiohttp.

Runs in each front-end, on the event loop its gRPC server runs on, on `--http-port` (shared by the
front-ends as gRPC's is). Every route turns its request into the gRPC request message and calls the
same servicer method gRPC calls, so validation, limits, metrics and statistics are one code; the
answer message becomes V2 JSON. Inference builds the JSON itself around the output tensors, which
travel as JSON numbers or, with `binary_data`, as raw bytes after the JSON header
(`Inference-Header-Content-Length`). Errors are V2's `{"error": "..."}` with the HTTP status Triton
gives the same case.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Optional

import grpc
import numpy as np
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from PIL import Image

from convserve.contract import PreprocessSpec
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import introspection_pb2 as ipb
from convserve.wire import DTYPES, SHM_REGION, deserialize_bytes, serialize_bytes

from ..errors import INTERNAL_MESSAGE, InvalidInput, ServingError, status_of
from ..rules import BearerToken
from .introspection import IntrospectionServicer
from .observe import Outcome
from .preprocess import ImageDecodeError, ImageLimits, decode_image
from .protocol import InferResult
from .servicer import InferenceServicer

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# gRPC status -> the HTTP status Triton answers for the same error
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_INTEGER_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _Context:
    """What the servicer's methods use of a gRPC context, for a request that came over HTTP."""

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise _Aborted(code, message)

    def time_remaining(self) -> Optional[float]:
        return None  # HTTP carries no deadline

    def set_trailing_metadata(self, metadata) -> None:
        pass


def _preprocessed_png(data: bytes, spec: PreprocessSpec, limits: ImageLimits) -> bytes:
    pixels = decode_image(data, spec, limits)  # uint8 (H, W, C)
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _error(code: grpc.StatusCode, message: str) -> web.Response:
    return web.json_response({"error": message}, status=_HTTP_STATUS.get(code, 500))


def to_json(message: Message) -> dict:
    """A response message as V2's JSON: field names as in the .proto, 64-bit integers as numbers."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    _numbers(message, data)
    return data


def _numbers(message: Message, data: dict) -> None:
    for field, value in message.ListFields():
        if field.name not in data:
            continue
        if field.type in _INTEGER_TYPES:
            data[field.name] = [int(v) for v in value] if _repeated(field) else int(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    for key, item in value.items():
                        _numbers(item, data[field.name][str(key)])
                elif value_field.type in _INTEGER_TYPES:
                    data[field.name] = {k: int(v) for k, v in data[field.name].items()}
            elif _repeated(field):
                for item, item_data in zip(value, data[field.name]):
                    _numbers(item, item_data)
            else:
                _numbers(value, data[field.name])


def _repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf 6; `label` before
    return bool(repeated) if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


def _set_parameter(parameter: pb.InferParameter, value: Any, where: str) -> None:
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    elif isinstance(value, str):
        parameter.string_param = value
    else:
        raise InvalidInput(f"{where}: parameter values are booleans, numbers or strings")


def _tensor_bytes(tensor: dict, datatype: str) -> bytes:
    """An input's JSON `data` as the raw bytes gRPC would carry."""
    data = tensor.get("data")
    if data is None:
        raise InvalidInput(f"input {tensor.get('name')!r} has no data (JSON `data` or binary_data_size)")
    if datatype == "BYTES":  # base64 strings, each one element (an encoded image)
        items = np.asarray(data, dtype=object).ravel()
        if not all(isinstance(item, str) for item in items):
            raise InvalidInput("BYTES input elements in JSON are base64 strings")
        try:
            return serialize_bytes(base64.b64decode(item, validate=True) for item in items)
        except ValueError:
            raise InvalidInput("a BYTES input element is not valid base64") from None
    dtype = DTYPES.get(datatype)  # the input is FP32 (the request's checks refuse any other type)
    if dtype is None:
        raise InvalidInput(f"input {tensor.get('name')!r}: datatype {datatype!r} is not one this server reads")
    try:
        return np.asarray(data, dtype=dtype).tobytes()
    except (TypeError, ValueError):
        raise InvalidInput(f"input {tensor.get('name')!r}: `data` is not a list of {datatype} numbers") from None


def infer_request(name: str, version: str, header: dict, binary: memoryview) -> pb.ModelInferRequest:
    """V2 JSON (and the binary part after it) -> the gRPC request message."""
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidInput("the request body is a JSON object with a list of inputs")
    request = pb.ModelInferRequest(model_name=name, model_version=version, id=str(header.get("id", "")))
    for key, value in (header.get("parameters") or {}).items():
        _set_parameter(request.parameters[key], value, "request")
    offset = 0
    for tensor in header["inputs"]:
        if not isinstance(tensor, dict):
            raise InvalidInput("each input is a JSON object")
        datatype = str(tensor.get("datatype", ""))
        message = request.inputs.add(name=str(tensor.get("name", "")), datatype=datatype)
        try:
            message.shape.extend(int(d) for d in tensor.get("shape", []))
        except (TypeError, ValueError):
            raise InvalidInput(f"input {message.name!r}: shape is a list of integers") from None
        parameters = dict(tensor.get("parameters") or {})
        size = parameters.pop("binary_data_size", None)
        for key, value in parameters.items():
            _set_parameter(message.parameters[key], value, f"input {message.name!r}")
        if SHM_REGION in parameters:
            request.raw_input_contents.append(b"")  # its bytes are in the region
        elif size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(f"input {message.name!r}: binary_data_size {size} runs past the body")
            request.raw_input_contents.append(bytes(binary[offset : offset + size]))
            offset += size
        else:
            request.raw_input_contents.append(_tensor_bytes(tensor, datatype))
    if any(SHM_REGION in (t.get("parameters") or {}) for t in header["inputs"]):
        del request.raw_input_contents[:]  # as gRPC clients send it: no raw contents with a region
    for output in header.get("outputs") or []:
        if not isinstance(output, dict):
            raise InvalidInput("each requested output is a JSON object")
        message = request.outputs.add(name=str(output.get("name", "")))
        for key, value in (output.get("parameters") or {}).items():
            _set_parameter(message.parameters[key], value, f"output {message.name!r}")
    return request


def _log_value(setting: Any, value: Any) -> None:
    if isinstance(value, bool):
        setting.bool_param = value
    elif isinstance(value, int) and value >= 0:
        setting.uint32_param = value
    elif isinstance(value, str):
        setting.string_param = value
    else:
        raise InvalidInput("log settings are booleans, non-negative integers or strings")


def _trace_value(setting: Any, value: Any) -> None:
    values = value if isinstance(value, list) else [value]
    setting.value.extend(str(v) for v in values)


def _plain(value: Any) -> Any:
    """A setting's JSON as V2 HTTP has it: the bare value, not gRPC's oneof wrapper."""
    if isinstance(value, dict) and len(value) == 1:
        return next(iter(value.values()))
    return value


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer: only this server may be talked to or loaded from; no framing, no sniffing."""
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"


def infer_response(header: dict, result: InferResult) -> tuple[bytes, int]:
    """The answer's body and the JSON part's length (the body's length when it has no binary part)."""
    everything_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    binary_wanted = {
        str(o.get("name")): bool((o.get("parameters") or {}).get("binary_data", everything_binary))
        for o in header.get("outputs") or []
        if isinstance(o, dict)
    }
    outputs, chunks = [], []
    for tensor in result.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters: dict[str, Any] = {}
        if tensor.shm is not None:
            pass  # in its region; as Triton over HTTP, no parameters (clients read any as binary_data_size)
        elif binary_wanted.get(tensor.name, everything_binary):
            parameters["binary_data_size"] = len(tensor.data)
            chunks.append(tensor.data)
        elif tensor.datatype == "BYTES":
            entry["data"] = [item.decode("utf-8", "replace") for item in deserialize_bytes(tensor.data)]
        else:
            entry["data"] = np.frombuffer(tensor.data, dtype=DTYPES[tensor.datatype]).tolist()
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    body = {
        "model_name": result.model_name,
        "model_version": result.model_version,
        **({"id": header["id"]} if header.get("id") else {}),
        "parameters": result.parameters,
        "outputs": outputs,
    }
    text = json.dumps(body, separators=(",", ":")).encode()
    return b"".join((text, *chunks)), len(text)


class HttpFrontDoor:
    """The routes, over one InferenceServicer (the gRPC one: same state, same checks)."""

    def __init__(
        self, servicer: InferenceServicer, introspection: IntrospectionServicer, token: str, max_body_bytes: int
    ) -> None:
        self.servicer = servicer
        self.introspection = introspection
        self.max_body_bytes = max_body_bytes
        self._token = BearerToken(token)

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._guard])
        s = self.servicer
        route = app.router.add_route

        def model(request: web.Request) -> str:
            return request.match_info["model"]

        route("GET", "/v2/health/live", self._health(s.ServerLive, pb.ServerLiveRequest, "live"))
        route("GET", "/v2/health/ready", self._health(s.ServerReady, pb.ServerReadyRequest, "ready"))
        route("GET", "/v2", self._unary(lambda r: (s.ServerMetadata, pb.ServerMetadataRequest())))
        route("GET", "/v2/models/stats", self._unary(lambda r: (s.ModelStatistics, pb.ModelStatisticsRequest())))
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            route("GET", prefix, self._unary(lambda r: (s.ModelMetadata, pb.ModelMetadataRequest(**_named(r)))))
            route("GET", prefix + "/ready", self._model_ready)
            route(
                "GET",
                prefix + "/config",
                self._unary(lambda r: (s.ModelConfig, pb.ModelConfigRequest(**_named(r))), "config"),
            )
            route(
                "GET",
                prefix + "/stats",
                self._unary(lambda r: (s.ModelStatistics, pb.ModelStatisticsRequest(**_named(r)))),
            )
            route("POST", prefix + "/infer", self._infer)
        route("POST", "/v2/repository/index", self._index)
        # system shared memory (the same engine state gRPC registers into); CUDA: status and unregister
        shm = "/v2/systemsharedmemory"
        route("POST", shm + "/region/{region}/register", self._shm_register)
        for path, one in ((shm, False), (shm + "/region/{region}", True)):
            route(
                "GET",
                path + "/status",
                self._listed(s.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest, one),
            )
            route(
                "POST",
                path + "/unregister",
                self._unregister(s.SystemSharedMemoryUnregister, pb.SystemSharedMemoryUnregisterRequest),
            )
            cuda = path.replace("systemsharedmemory", "cudasharedmemory")
            route(
                "GET", cuda + "/status", self._listed(s.CudaSharedMemoryStatus, pb.CudaSharedMemoryStatusRequest, one)
            )
            route(
                "POST",
                cuda + "/unregister",
                self._unregister(s.CudaSharedMemoryUnregister, pb.CudaSharedMemoryUnregisterRequest),
            )
        # logging and trace settings, read (GET) and set (POST), as the gRPC calls
        route("GET", "/v2/logging", self._settings(s.LogSettings, pb.LogSettingsRequest, _log_value))
        route("POST", "/v2/logging", self._settings(s.LogSettings, pb.LogSettingsRequest, _log_value))
        for path in ("/v2/trace/setting", "/v2/models/{model}/trace/setting"):
            route("GET", path, self._settings(s.TraceSetting, pb.TraceSettingRequest, _trace_value))
            route("POST", path, self._settings(s.TraceSetting, pb.TraceSettingRequest, _trace_value))
        # convserve's own calls, as JSON, under a prefix V2 cannot use
        i = self.introspection
        route(
            "GET",
            "/convserve/v1/models/{model}/describe",
            self._unary(lambda r: (i.DescribeModel, ipb.DescribeModelRequest(name=model(r)))),
        )
        route(
            "GET",
            "/convserve/v1/models/{model}/filters/{feature_map}",
            self._unary(
                lambda r: (
                    i.LayerFilters,
                    ipb.LayerFiltersRequest(name=model(r), feature_map=r.match_info["feature_map"]),
                )
            ),
        )
        route("POST", "/convserve/v1/models/{model}/preprocess", self._preprocessed)
        # the page: the server's own files, with a policy that lets them talk to this server only
        route("GET", "/", self._page)
        app.router.add_static("/static/", STATIC, follow_symlinks=False)
        app.on_response_prepare.append(_security_headers)
        load, unload = pb.RepositoryModelLoadRequest, pb.RepositoryModelUnloadRequest
        route(
            "POST",
            "/v2/repository/models/{model}/load",
            self._unary(lambda r: (s.RepositoryModelLoad, load(model_name=model(r)))),
        )
        route(
            "POST",
            "/v2/repository/models/{model}/unload",
            self._unary(lambda r: (s.RepositoryModelUnload, unload(model_name=model(r)))),
        )
        return app

    async def _page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(os.path.join(STATIC, "index.html"))

    # ---- plumbing ---------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        """The token (health needs none, as over gRPC), and no traceback ever reaches a client."""
        # health, as over gRPC, and the page's own files (it asks for the token itself) need none
        open_path = request.path.startswith(("/v2/health/", "/static/")) or request.path == "/"
        if not open_path and not self._token.admits(request.headers.get("Authorization")):
            self.servicer.recorder.record(Outcome("HTTP", code=grpc.StatusCode.UNAUTHENTICATED))
            return web.json_response(
                {"error": "missing or wrong bearer token"}, status=401, headers={"WWW-Authenticate": "Bearer"}
            )
        try:
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own (unknown route, body too large): V2's error shape
            if exc.status == 413:
                return web.json_response({"error": f"request body over {self.max_body_bytes} bytes"}, status=413)
            return web.json_response({"error": exc.reason}, status=exc.status)
        except _Aborted as exc:
            return _error(exc.code, exc.message)
        except ServingError as exc:
            return _error(*status_of(exc))
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path[:200])
            return _error(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

    def _health(self, method, message, field: str):
        async def handle(request: web.Request) -> web.Response:
            answer = await method(message(), _Context())
            return web.Response(status=200 if getattr(answer, field) else 400)

        return handle

    def _unary(self, make: Callable[[web.Request], tuple[Any, Message]], field: str = ""):
        """A call answered with its message as JSON (or one field of it: V2 HTTP's config is the
        ModelConfig itself, not gRPC's wrapper)."""

        async def handle(request: web.Request) -> web.Response:
            method, message = make(request)
            answer = await method(message, _Context())
            return web.json_response(to_json(getattr(answer, field) if field else answer))

        return handle

    async def _preprocessed(self, request: web.Request) -> web.Response:
        """An image (the body, PNG or JPEG) as the model sees it: a PNG after its card's preprocessing
        (the ink step, the resize, the colour mode; before the mean and std), as infer decodes it."""
        model = self.servicer.models.resolve(request.match_info["model"], request.query.get("version", ""))
        body = await _body(request)
        try:
            png = await asyncio.to_thread(_preprocessed_png, body, model.card.preprocess, model.image_limits)
        except ImageDecodeError as exc:
            raise InvalidInput(f"image: {exc}") from None
        return web.Response(body=png, content_type="image/png")

    def _listed(self, method, message, named: bool):
        """Shared-memory status: V2 HTTP answers a list of regions where gRPC has a map."""

        async def handle(request: web.Request) -> web.Response:
            name = request.match_info["region"] if named else ""
            answer = await method(message(name=name), _Context())
            return web.json_response(list(to_json(answer).get("regions", {}).values()))

        return handle

    def _unregister(self, method, message):
        """One region (named in the path) or all; answered with an empty 200, as Triton does."""

        async def handle(request: web.Request) -> web.Response:
            await method(message(name=request.match_info.get("region", "")), _Context())
            return web.Response(status=200)

        return handle

    async def _shm_register(self, request: web.Request) -> web.Response:
        body = await _json(request, await _body(request))
        if not isinstance(body, dict):
            raise InvalidInput("the register body is a JSON object: key, offset, byte_size")
        try:
            message = pb.SystemSharedMemoryRegisterRequest(
                name=request.match_info["region"],
                key=str(body.get("key", "")),
                offset=int(body.get("offset", 0)),
                byte_size=int(body.get("byte_size", 0)),
            )
        except (TypeError, ValueError):
            raise InvalidInput("offset and byte_size are non-negative integers") from None
        await self.servicer.SystemSharedMemoryRegister(message, _Context())
        return web.Response(status=200)

    def _settings(self, method, message, value: Callable[[Any, Any], None]):
        """Log or trace settings: a JSON object of key -> value both ways (POST sets, GET reads)."""

        async def handle(request: web.Request) -> web.Response:
            request_message = message()
            if "model" in request.match_info:
                request_message.model_name = request.match_info["model"]
            if request.method == "POST":
                body = await _json(request, await _body(request))
                if not isinstance(body, dict):
                    raise InvalidInput("the settings body is a JSON object")
                for key, item in body.items():
                    value(request_message.settings[str(key)], item)
            answer = await method(request_message, _Context())
            return web.json_response({k: _plain(v) for k, v in to_json(answer).get("settings", {}).items()})

        return handle

    async def _model_ready(self, request: web.Request) -> web.Response:
        answer = await self.servicer.ModelReady(pb.ModelReadyRequest(**_named(request)), _Context())
        return web.Response(status=200 if answer.ready else 400)

    async def _index(self, request: web.Request) -> web.Response:
        body = await _json(request, await _body(request))
        ready = bool(body.get("ready", False)) if isinstance(body, dict) else False
        answer = await self.servicer.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), _Context())
        return web.json_response(to_json(answer).get("models", []))

    async def _infer(self, request: web.Request) -> web.Response:
        body = await _body(request)
        length = request.headers.get(HEADER_LENGTH)
        if length is not None:
            if not length.isdigit() or int(length) > len(body):
                raise InvalidInput(f"{HEADER_LENGTH} {length[:32]!r} does not fit the body of {len(body)} bytes")
            split = int(length)
        else:
            split = len(body)
        header = await _json(request, body[:split])
        view = memoryview(body)[split:]
        name, version = request.match_info["model"], request.match_info.get("version", "")
        message = infer_request(name, version, header, view)
        servicer = self.servicer
        outcome = Outcome("ModelInfer", name)
        try:
            with servicer.recorder.observe(outcome):  # no deadline over HTTP (its `timeout` parameter counts)
                _, result = await servicer.parse_and_infer(message, outcome, None)
        except Exception as exc:  # recorded (and if a bug, logged) by observe
            return _error(*status_of(exc))
        data, json_length = infer_response(header, result)
        headers = {"Content-Type": "application/json" if json_length == len(data) else "application/octet-stream"}
        if json_length != len(data):
            headers[HEADER_LENGTH] = str(json_length)
        response = web.Response(body=data, headers=headers)
        encoding = request.headers.get("Accept-Encoding", "")
        if "gzip" in encoding:
            response.enable_compression(web.ContentCoding.gzip)
        elif "deflate" in encoding:
            response.enable_compression(web.ContentCoding.deflate)
        return response


def _named(request: web.Request) -> dict:
    """name and version from a /v2/models/{model}[/versions/{version}] path."""
    return {"name": request.match_info["model"], "version": request.match_info.get("version", "")}


async def _body(request: web.Request) -> bytes:
    """The body: aiohttp inflates gzip and deflate (Content-Encoding, as Triton takes) and stops at the
    size limit counted after inflating, so a small compressed bomb is refused as too large."""
    try:
        return await request.read()
    except web.HTTPException:
        raise
    except Exception as exc:  # a body that does not inflate, a connection cut mid-body
        raise InvalidInput(f"the request body could not be read: {str(exc)[:200]}") from None


async def _json(request: web.Request, data: bytes) -> Any:
    if not data:
        return {}
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("the request's JSON does not parse") from None
