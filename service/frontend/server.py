"""A front-end process: the gRPC server (V2, introspection, health, reflection) on the shared port,
its arena, its link to the engine. It never loads a model.

Runs in each front-end. Health is SERVING while the engine is connected and the server is not
stopping; per model, while the model serves. SIGTERM: NOT_SERVING, refuse new requests, finish those
in flight within the grace period; a second SIGTERM cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from convserve.cpus import available_cpus
from convserve.proto import POOL
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import introspection_pb2 as ipb
from convserve.proto import introspection_pb2_grpc as ipb_grpc

from ..connections import ConnectionLimits
from ..errors import Code, StartupError, port_in_use
from ..ipc import BEAT_SECONDS, FRONTEND_BEAT, Arena
from ..metrics import Metrics
from ..settings import Settings
from .core import FrontendCore, ServerState
from .dataplane import DataPlane
from .engine_link import EngineLink
from .grpc.auth import AuthInterceptor
from .grpc.health import NOT_SERVING, SERVING, Health
from .grpc.introspection import IntrospectionServicer
from .grpc.servicer import InferenceServicer, add_to_server
from .http.door import HttpDoor
from .limits import cards_on_disk, largest_messages, message_limits
from .models import ModelTable
from .observe import Outcome, Recorder
from .preprocess import blank_png, preprocess_encoded
from .tls import Tls

log = logging.getLogger("convserve.frontend")


class Frontend:
    """One front-end: started once the engine has answered, stopped on SIGTERM."""

    def __init__(self, settings: Settings, socket_path: str, port: int, index: int, count: int) -> None:
        self.settings = settings
        self.port = port
        self.index = index
        self.state = ServerState.STARTING
        self.metrics = Metrics()
        self.models = ModelTable(settings)
        self.arena = Arena.create(f"convserve-frontend-{index}", settings.arena_mib << 20)
        self.engine = EngineLink(socket_path, self.arena, index, self._models_changed, self._engine_changed)
        self.recorder = Recorder(self.metrics, self.models.is_served, self.engine.stat)
        self.health = Health(settings.max_health_watches, self.recorder)
        # Image decoding and response tensors: CPU work that must stay off the event loop; as many
        # threads as CPUs, since more would only queue for the same cores.
        self.codec_executor = ThreadPoolExecutor(max_workers=available_cpus(), thread_name_prefix="codec")
        self.dataplane = DataPlane(self.models, self.engine, self.arena, self.codec_executor)
        self.identity = f"{index}/{count}"
        self.core = FrontendCore(
            self.models, self.engine, self.dataplane, settings, lambda: self.state, self.recorder, self.identity
        )
        self.tls = Tls.of(settings)
        self.grpc_server: Optional[grpc.aio.Server] = None
        self.http_runner: Optional[web.AppRunner] = None
        self.http_listener: Optional[asyncio.AbstractServer] = None
        self.http_limits: Optional[ConnectionLimits] = None
        self.limits = message_limits(cards_on_disk(settings.repository), settings)
        self._background: set[asyncio.Future] = set()

    # ---- what the engine tells ------------------------------------------------------------------

    def _models_changed(self, table: dict[str, Any]) -> None:
        before = {(m.name, m.version) for m in self.models.served_versions()}
        self.models.update(table)
        for model in self.models.served_versions():
            if (model.name, model.version) in before:
                continue
            # decode one image: loads PIL's codecs before a client waits
            preprocess_encoded([blank_png(model.spec)], model.spec)
            need = largest_messages(model.card, self.settings)
            if need.receive > self.limits.receive or need.send > self.limits.send:
                log.warning(
                    "model %s version %s: its largest request or response (%d / %d bytes) exceeds the server's "
                    "gRPC message limits (%d / %d), fixed at start: restart, or set --max-message-bytes",
                    model.name,
                    model.version,
                    need.receive,
                    need.send,
                    self.limits.receive,
                    self.limits.send,
                )
        self._update_health()

    def _engine_changed(self, connected: bool) -> None:
        self._update_health()

    def _in_background(self, work) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _update_health(self) -> None:
        """Overall: SERVING while ready, the engine is there and (with --strict-readiness) no model
        failed to load; per model: SERVING while it serves."""
        serving = self.state is ServerState.READY and self.engine.connected and not self.models.failed
        overall = SERVING if serving else NOT_SERVING
        statuses = {"": overall}  # what any other name gets, as Triton answers
        for name in self.models.known_names():
            statuses[name] = NOT_SERVING
        for name in self.models.served_names():
            statuses[name] = overall
        self.health.set(statuses)

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.engine.start()
        await self.engine.wait_connected(timeout=600)
        log.info("gRPC messages: at most %d bytes received, %d sent", self.limits.receive, self.limits.send)
        options = [
            ("grpc.max_receive_message_length", self.limits.receive),
            ("grpc.max_send_message_length", self.limits.send),
            ("grpc.max_concurrent_streams", s.max_streams_per_connection),
            ("grpc.so_reuseport", 1),  # the front-ends share the port; the kernel spreads connections
        ]
        interceptors = [AuthInterceptor(s.auth_token, self.recorder)] if s.auth_token else []
        self.grpc_server = grpc.aio.server(interceptors=interceptors, options=options)
        add_to_server(InferenceServicer(self.core), self.grpc_server)
        ipb_grpc.add_IntrospectionServicer_to_server(IntrospectionServicer(self.core), self.grpc_server)
        self.grpc_server.add_generic_rpc_handlers((self.health.handler(),))
        # Reflection reads our descriptor pool; health's file joins it so it can be reflected too.
        try:
            POOL.FindFileByName(health_pb2.DESCRIPTOR.name)
        except KeyError:
            POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
        service_names = [
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            ipb.DESCRIPTOR.services_by_name["Introspection"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(service_names, self.grpc_server, pool=POOL)
        address = f"{s.host}:{self.port}"
        if self.tls is not None:
            bound = self.grpc_server.add_secure_port(address, self.tls.grpc_credentials())
        else:
            bound = self.grpc_server.add_insecure_port(address)
        if bound == 0:  # gRPC says no more; a port held by another program is the usual cause
            raise port_in_use(self.port, "gRPC", "grpc_port")
        if s.http_port:
            await self._start_http()
        self.state = ServerState.READY
        self._update_health()
        await self.grpc_server.start()
        log.info("front-end %s listening on %s (gRPC)", self.identity, address)

    async def _start_http(self) -> None:
        """V2 HTTP/REST on the same event loop, over the same core, its port shared by the front-ends;
        its connections bounded in number and in the time they take to bring a request
        (service/connections.py)."""
        s = self.settings
        self.http_limits = ConnectionLimits(
            s.http_max_connections,
            s.http_head_timeout,
            lambda why: self.recorder.record(Outcome("HTTP", code=Code.RESOURCE_EXHAUSTED, limit=f"http_{why}")),
        )
        door = HttpDoor(self.core, s.auth_token, self.limits.receive, self.http_limits, s.http_body_timeout)
        self.http_runner = web.AppRunner(
            door.application(),
            access_log=None,
            handle_signals=False,
            keepalive_timeout=s.http_head_timeout,
            auto_decompress=False,  # the door inflates, bounded and off the loop
        )
        await self.http_runner.setup()
        assert self.http_runner.server is not None
        handler: Any = self.http_runner.server
        context = self.tls.ssl_context() if self.tls is not None else None
        try:
            self.http_listener = await asyncio.get_running_loop().create_server(
                lambda: self.http_limits.protocol(handler()), s.host, s.http_port, ssl=context, reuse_port=True
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise port_in_use(s.http_port, "HTTP", "http_port") from None
            raise
        log.info("front-end %s listening on %s:%d (HTTP)", self.identity, s.host, s.http_port)

    def stop_now(self) -> None:
        """Cut the grace period short: the RPCs still running are cancelled."""
        if self.grpc_server is not None:
            self._in_background(self.grpc_server.stop(None))

    async def stop(self) -> None:
        """NOT_SERVING, refuse new requests, finish those in flight within the grace period."""
        self.state = ServerState.STOPPING
        self._update_health()
        self.health.close()
        # Both doors close at once. gRPC's stop stops listening and sends GOAWAY on every connection
        # straight away, so a load balancer's next request opens a connection elsewhere instead of
        # meeting this front-end's refusal (UNAVAILABLE), which it would pass on to its client.
        closing = []
        if self.http_listener is not None:
            self.http_listener.close()  # stops listening; requests in progress finish
        if self.http_runner is not None:
            closing.append(self.http_runner.shutdown())
        if self.grpc_server is not None:
            closing.append(self.grpc_server.stop(self.settings.grace_period))
        await asyncio.gather(*closing)
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        await self.engine.close()
        await asyncio.to_thread(self.codec_executor.shutdown, wait=True)
        self.arena.close()


async def serve(settings: Settings, socket_path: str, port: int, index: int, count: int, ready=None) -> None:
    """Run one front-end until SIGTERM, then drain; a second SIGTERM stops at once."""
    frontend = Frontend(settings, socket_path, port, index, count)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        # SIGTERM while starting (waiting for an engine that is not there yet, say) stops it at once
        starting, stopping = asyncio.ensure_future(frontend.start()), asyncio.ensure_future(stop.wait())
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        stopping.cancel()
        starting.result()  # a StartupError, raised
        if ready is not None:
            ready()
        await stop.wait()
        log.info("front-end %s: finishing in-flight requests (grace %.0f s)", frontend.identity, settings.grace_period)
        loop.add_signal_handler(signal.SIGTERM, frontend.stop_now)
    finally:
        await frontend.stop()


def main(settings: Settings, socket_path: str, port: int, index: int, count: int, ready: Optional[Any] = None) -> None:
    """The front-end process's entry point (`ready`: a multiprocessing Connection told when it listens,
    then, from a thread of its own, every BEAT_SECONDS that this process runs: the supervisor kills and
    restarts a front-end that goes silent, one stopped or stuck, which the kernel would otherwise go on
    handing new connections)."""

    def tell(answer: Any = True) -> None:
        if ready is not None:
            with contextlib.suppress(OSError):  # a restarted front-end's supervisor does not wait
                ready.send(answer)
            if answer is True:
                threading.Thread(target=beat, args=(ready,), name="heartbeat", daemon=True).start()

    def beat(pipe: Any) -> None:
        while True:
            time.sleep(BEAT_SECONDS)
            try:
                pipe.send(FRONTEND_BEAT)
            except (OSError, ValueError):  # the supervisor went (its children follow it)
                return

    try:
        asyncio.run(serve(settings, socket_path, port, index, count, tell))
    except StartupError as exc:  # the supervisor says it, once, and stops: no traceback from here
        tell(exc)
        sys.exit(1)
