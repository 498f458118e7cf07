"""The /metrics endpoint: aiohttp on an event loop of its own, in a thread of the supervisor.

Nothing here may be held by a client that does not scrape: connections are bounded (past
`max_connections`, a new one is closed at once and counted), a connection that brings no complete
request head within `idle_timeout` seconds of opening or of its last answer is closed
(service/connections.py, as the HTTP door's), and collecting, which reads every process's metrics
files, runs off the loop, one scrape at a time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Optional

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily

from .connections import ConnectionLimits
from .rules import BearerToken

log = logging.getLogger(__name__)


class MetricsEndpoint:
    """Serves `registry` at /metrics on host:port until `shutdown()`; with a token, only to
    `Authorization: Bearer <token>`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        token: str = "",
        max_connections: int = 64,
        idle_timeout: float = 10.0,
    ) -> None:
        self.registry = registry
        self.host, self.port = host, port
        self.idle_timeout = idle_timeout
        self.limits = ConnectionLimits(max_connections, idle_timeout)  # touched only on the endpoint's loop
        self._token = BearerToken(token)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: Optional[BaseException] = None
        self._stop: Optional[asyncio.Event] = None
        self._scrape = asyncio.Lock()  # bound to the endpoint's loop at first use
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        registry.register(self)

    def collect(self):
        """Its own refusals, beside the request refusals the serving processes count."""
        family = CounterMetricFamily(
            "convserve_metrics_connections_refused",
            "connections to /metrics closed at once because the endpoint held its most",
        )
        family.add_metric([], self.limits.refused)
        yield family

    def start(self) -> MetricsEndpoint:
        """Listen; raises what binding raised (a port in use)."""
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self

    def shutdown(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._started.set()
            self._loop.close()

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._metrics)  # prometheus_client's own server answers on any path
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=self.idle_timeout, handle_signals=False)
        await runner.setup()
        self._stop = asyncio.Event()
        assert runner.server is not None
        factory: Any = runner.server
        try:
            server = await self._loop.create_server(
                lambda: self.limits.protocol(factory()), self.host, self.port, reuse_address=True
            )
        except OSError as exc:
            self._error = exc
            await runner.cleanup()
            return
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            await runner.shutdown()
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self.limits.request_started(request.transport)
        if not self._token.admits(request.headers.get("Authorization")):
            return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})
        async with self._scrape:  # reading every process's files: one scrape at a time, off the loop
            body = await asyncio.to_thread(generate_latest, self.registry)
        response = web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            response.enable_compression(web.ContentCoding.gzip)
        return response
