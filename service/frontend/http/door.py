"""The V2 HTTP/REST protocol (KServe's, with Triton's binary tensor extension), and the page, on aiohttp.

Runs in each front-end, on the event loop its gRPC server runs on, on `--http-port` (shared by the
front-ends as gRPC's is). Every route reads its request, calls the core (`..core.FrontendCore`, the
same calls the gRPC door makes, recorded there) and answers the core's data as V2 JSON: the core's
answers are V2's JSON shapes already. Inference reads and writes its body in `protocol`. Errors are
V2's `{"error": "..."}` with the HTTP status Triton gives the same case (errors.http_status_of).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import os
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, Optional

from aiohttp import web

from ...connections import ConnectionLimits
from ...errors import BodyTimeout, BodyTooLarge, Code, InvalidInput, Unimplemented, http_status_of
from ...rules import BearerToken
from ..core import FrontendCore
from ..observe import LOGGED, Outcome
from .jsonparse import JsonParser, parse
from .protocol import HEADER_LENGTH, infer_response, parse_infer_request

log = logging.getLogger(__name__)

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(error: BaseException) -> web.Response:
    status, message = http_status_of(error)
    return web.json_response({"error": message}, status=status)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer: only this server may be talked to or loaded from; no framing, no sniffing."""
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"


def _log_value(value: Any) -> Any:
    """A log setting's JSON value: booleans, non-negative integers or strings."""
    if isinstance(value, (bool, str)) or (isinstance(value, int) and value >= 0):
        return value
    raise InvalidInput("log settings are booleans, non-negative integers or strings")


def _trace_value(value: Any) -> list[str]:
    """A trace setting as set over HTTP: a string (Triton's JSON), or a list of them (trace_level's)."""
    return [str(v) for v in (value if isinstance(value, list) else [value])]


def _trace_answer(settings: dict[str, list[str]]) -> dict[str, Any]:
    """Trace settings as Triton's HTTP answers them: trace_level a list, every other one a string."""
    return {key: values if key == "trace_level" else (values[0] if values else "") for key, values in settings.items()}


class HttpDoor:
    """The routes, over the core the gRPC door calls too."""

    def __init__(
        self,
        core: FrontendCore,
        token: str,
        max_body_bytes: int,
        connections: Optional[ConnectionLimits] = None,
        body_timeout: float = 60.0,
    ) -> None:
        self.core = core
        self.max_body_bytes = max_body_bytes
        self._token = BearerToken(token)
        self._connections = connections  # told when a request's head has come
        self.body_timeout = body_timeout
        self._inflating = asyncio.Semaphore(1)
        self._parser = JsonParser()  # an inference body's JSON: large ones in a worker process

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._guard])
        core = self.core
        route = app.router.add_route

        route("GET", "/v2/health/live", _handler(lambda r: core.live(), _presence))
        route("GET", "/v2/health/ready", _handler(lambda r: core.ready(), _presence))
        # a version is a number: "versions/abc" is no route (404), as in Triton
        route("GET", "/v2", _handler(lambda r: core.server_metadata()))
        route("GET", "/v2/models/stats", _handler(lambda r: core.statistics()))
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version:[0-9]+}"):
            route("GET", prefix, _handler(lambda r: core.model_metadata(*_named(r))))
            route("GET", prefix + "/ready", _handler(lambda r: core.model_ready(*_named(r)), _model_presence))
            route("GET", prefix + "/config", _handler(lambda r: core.model_config(*_named(r))))
            route("GET", prefix + "/stats", _handler(lambda r: core.statistics(*_named(r))))
            route("POST", prefix + "/infer", self._infer)
        route("POST", "/v2/repository/index", _handler(self._index))
        route("POST", "/v2/repository/models/{model}/load", _handler(lambda r: core.load(_model(r)), _empty))
        route("POST", "/v2/repository/models/{model}/unload", _handler(lambda r: core.unload(_model(r)), _empty))
        # system shared memory (the same engine state gRPC registers into); CUDA: status and unregister
        shm, cuda = "/v2/systemsharedmemory", "/v2/cudasharedmemory"
        route("POST", shm + "/region/{region}/register", _handler(self._shm_register, _empty))
        route("GET", shm + "/status", _handler(lambda r: core.shm_status()))
        route("GET", shm + "/region/{region}/status", _handler(lambda r: core.shm_status(_region(r))))
        route("POST", shm + "/unregister", _handler(lambda r: core.shm_unregister(), _empty))
        route("POST", shm + "/region/{region}/unregister", _handler(lambda r: core.shm_unregister(_region(r)), _empty))
        route("POST", cuda + "/region/{region}/register", _handler(lambda r: core.cuda_shm_register(), _empty))
        route("GET", cuda + "/status", _handler(lambda r: core.cuda_shm_status()))
        route("GET", cuda + "/region/{region}/status", _handler(lambda r: core.cuda_shm_status(_region(r))))
        for path in (cuda + "/unregister", cuda + "/region/{region}/unregister"):
            route("POST", path, _handler(lambda r: core.cuda_shm_unregister(), _empty))
        # logging and trace settings, read (GET) and set (POST), as the gRPC calls
        for method in ("GET", "POST"):
            route(method, "/v2/logging", _handler(self._log_settings))
            for path in ("/v2/trace/setting", "/v2/models/{model}/trace/setting"):
                route(method, path, _handler(self._trace_settings))
        # convserve's own calls, as JSON, under a prefix V2 cannot use
        own = "/convserve/v1/models/{model}"
        route("GET", own + "/describe", _handler(lambda r: core.describe_model(_model(r))))
        route("GET", own + "/filters/{feature_map}", _handler(self._filters))
        route("POST", own + "/preprocess", _handler(self._preprocessed, _png))
        # the page: the server's own files, with a policy that lets them talk to this server only
        route("GET", "/", self._page)
        app.router.add_static("/static/", STATIC, follow_symlinks=False)
        app.on_response_prepare.append(_security_headers)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        await self._parser.aclose()

    async def _page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(os.path.join(STATIC, "index.html"))

    # ---- plumbing ---------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler):
        """The token (rules.needs_token says which calls need none), and no traceback ever reaches a
        client: what a call raises becomes V2's error body with Triton's status."""
        if self._connections is not None:
            self._connections.request_started(request.transport)
        if not self._token.admits_call(request.path, request.headers.get("Authorization")):
            self.core.recorder.record(Outcome("HTTP", code=Code.UNAUTHENTICATED))
            return web.json_response(
                {"error": "missing or wrong bearer token"}, status=401, headers={"WWW-Authenticate": "Bearer"}
            )
        try:
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own (unknown route, wrong method): V2's error shape
            if exc.status in (404, 405):  # no such route, or not this method: as Triton (labelled text/plain)
                text = json.dumps({"error": exc.reason})
                return web.Response(text=text, status=exc.status, content_type="text/plain")
            return web.json_response({"error": exc.reason}, status=exc.status)
        except Exception as exc:  # a bug is logged by the core's observe; one outside a call, here
            if http_status_of(exc)[0] == 500 and not getattr(exc, LOGGED, False):
                log.error("HTTP %s %s failed", request.method, request.path[:200], exc_info=exc)
            answer = _error(exc)
            if isinstance(exc, (BodyTooLarge, BodyTimeout)):
                answer.force_close()  # the rest of that body is not read, nor waited for
            return answer

    async def _body(self, request: web.Request) -> bytes:
        """The body, inflated when its Content-Encoding is gzip or deflate (as Triton takes). aiohttp
        reads it as sent, up to the body limit; inflating runs in a worker thread (zlib lets the event
        loop run meanwhile) and stops one byte past the limit, so a compression bomb costs at most the
        limit, off the loop, and is refused 413. A body late past the body timeout is 408."""
        try:
            data = await asyncio.wait_for(request.read(), self.body_timeout)
        except asyncio.TimeoutError:  # a slow body holds a connection and its buffer: 408, and it closes
            raise BodyTimeout("the request body did not arrive in time") from None
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLarge(f"request body over {self.max_body_bytes} bytes", limit="body_bytes") from None
        except Exception as exc:  # a connection cut mid-body
            raise InvalidInput(f"the request body could not be read: {str(exc)[:200]}") from None
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return data
        if encoding not in ("gzip", "deflate"):
            raise Unimplemented(f"Content-Encoding {encoding[:32]!r} is not supported: gzip or deflate")
        try:
            async with self._inflating:  # one at a time: a burst of bombs takes one core, not every one
                return await asyncio.to_thread(_inflate, data, encoding, self.max_body_bytes)
        except zlib.error as exc:
            raise InvalidInput(f"the request body does not inflate ({encoding}): {exc}") from None

    async def _preprocessed(self, request: web.Request) -> bytes:
        """An image (the body, PNG or JPEG) as the model sees it (the page's preview)."""
        body = await self._body(request)
        return await self.core.preprocessed(_model(request), request.query.get("version", ""), body)

    async def _filters(self, request: web.Request) -> dict[str, Any]:
        filters = await self.core.layer_filters(_model(request), "", request.match_info["feature_map"])
        return {**filters, "weights": base64.b64encode(filters["weights"]).decode()}

    async def _shm_register(self, request: web.Request) -> None:
        body = parse(await self._body(request))
        if not isinstance(body, dict):
            raise InvalidInput("the register body is a JSON object: key, offset, byte_size")
        key, offset, size = body.get("key", ""), body.get("offset", 0), body.get("byte_size", 0)
        if not isinstance(key, str):
            raise InvalidInput("key is a string: the shared-memory object's name")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (offset, size)):
            raise InvalidInput("offset and byte_size are non-negative integers (JSON numbers)")
        await self.core.shm_register(_region(request), key, offset, size)

    async def _settings_body(self, request: web.Request) -> dict:
        """What a POST sets (a JSON object of key -> value); a GET sets nothing."""
        if request.method != "POST":
            return {}
        body = parse(await self._body(request))
        if not isinstance(body, dict):
            raise InvalidInput("the settings body is a JSON object")
        return body

    async def _log_settings(self, request: web.Request) -> dict[str, Any]:
        updates = {str(k): _log_value(v) for k, v in (await self._settings_body(request)).items()}
        return self.core.log_settings(updates)

    async def _trace_settings(self, request: web.Request) -> dict[str, Any]:
        updates = {str(k): _trace_value(v) for k, v in (await self._settings_body(request)).items()}
        return _trace_answer(self.core.trace_settings(request.match_info.get("model", ""), updates))

    async def _index(self, request: web.Request) -> list[dict[str, Any]]:
        body = parse(await self._body(request))
        ready = bool(body.get("ready", False)) if isinstance(body, dict) else False
        return await self.core.repository_index(ready=ready)

    async def _infer(self, request: web.Request) -> web.Response:
        core = self.core
        name, version = _named(request)
        # HTTP carries no deadline: the server gives one (its `timeout` parameter may shorten it)
        timeout = core.settings.http_request_timeout
        deadline = time.monotonic() + timeout if timeout else None
        with core.inference("ModelInfer", name) as outcome:
            inputs = core.served(name, version)  # an unknown model is 404 before its body is read, as Triton
            body = await self._body(request)
            length = request.headers.get(HEADER_LENGTH)
            if length is not None:
                if not (length.isascii() and length.isdigit()) or int(length) > len(body):  # '²' is a digit
                    raise InvalidInput(f"{HEADER_LENGTH} {length[:32]!r} does not fit the body of {len(body)} bytes")
                split = int(length)
            else:
                split = len(body)
            header = await self._parser.request(body[:split])
            binary = memoryview(body)[split:]
            parsed = parse_infer_request(name, version, header, binary, core.settings.max_batch_size, inputs)
            result = await core.infer(parsed, outcome, deadline)
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


def _handler(call: Callable[[web.Request], Any], answer: Callable[[Any], web.Response] | None = None) -> Handler:
    """A route: the core's answer to `call` (awaited when it is a coroutine), as JSON unless `answer`
    says otherwise."""

    async def handle(request: web.Request) -> web.Response:
        result = call(request)
        if inspect.isawaitable(result):
            result = await result
        return web.json_response(result) if answer is None else answer(result)

    return handle


def _presence(ready: bool) -> web.Response:
    """V2's health and readiness: the status says it (200 yes, 400 no), the body is empty."""
    return web.Response(status=200 if ready else 400, content_type="text/plain")


def _model_presence(ready: bool) -> web.Response:
    """A model's readiness: as the server's, with Triton's reason when it is not ready."""
    if ready:
        return web.Response(status=200, content_type="text/plain")
    return web.Response(text=json.dumps({"error": "Model version not ready"}), status=400, content_type="text/plain")


def _empty(_: None) -> web.Response:
    return web.Response(status=200, content_type="application/json")


def _png(data: bytes) -> web.Response:
    return web.Response(body=data, content_type="image/png")


def _model(request: web.Request) -> str:
    return request.match_info["model"]


def _region(request: web.Request) -> str:
    return request.match_info["region"]


def _named(request: web.Request) -> tuple[str, str]:
    """name and version from a /v2/models/{model}[/versions/{version}] path."""
    return request.match_info["model"], request.match_info.get("version", "")


def _inflate(data: bytes, encoding: str, limit: int) -> bytes:
    """gzip or deflate (zlib's format, or raw as some clients send it), at most `limit` bytes out."""
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    if encoding == "deflate" and data[:1] and (data[0] & 0x0F) != 8:
        wbits = -zlib.MAX_WBITS  # no zlib header: a raw deflate stream
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(data, limit + 1)
    if len(out) > limit or inflater.unconsumed_tail:
        raise BodyTooLarge(f"request body over {limit} bytes, inflated", limit="body_bytes")
    if not inflater.eof:
        raise zlib.error("the stream ends early")
    return out
