"""The server's lifecycle: registry, gRPC server, health, metrics endpoint and the repository poller,
started and stopped together; `serve` runs it until SIGTERM or SIGINT.

The request path lives elsewhere: servicer (V2 RPCs), introspection, auth (interceptor), dataplane
(preprocess -> batcher -> postprocess), observe (what each request reports).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from convserve.cpus import available_cpus

from .auth import AuthInterceptor
from .dataplane import DataPlane
from .introspection import IntrospectionServicer
from .limits import cards_on_disk, message_limits
from .metrics import Metrics
from .observe import Recorder
from .proto import POOL
from .proto import grpc_service_pb2 as pb
from .proto import grpc_service_pb2_grpc as pb_grpc
from .proto import introspection_pb2 as ipb
from .proto import introspection_pb2_grpc as ipb_grpc
from .registry import Registry
from .servicer import InferenceServicer, ServerState
from .settings import Settings
from .shm import SystemSharedMemory
from .workers import worker_identity

log = logging.getLogger("convserve")

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS from the PEM files the settings name; mutual TLS when a client CA is given."""

    def read(path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    client_ca = read(settings.tls_client_ca) if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read(settings.tls_key), read(settings.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class Server:
    """Everything one `convserve serve` runs, started and stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = ServerState.STARTING
        self.metrics = Metrics()
        self.metrics.queue_capacity.set(settings.max_queue_size)
        self.health = health.aio.HealthServicer()
        # the recorder asks the registry (made next) which names are served ones
        self.recorder = Recorder(self.metrics, lambda name: self.registry.is_served(name))
        self.registry = Registry(settings, self.metrics, self.recorder, on_change=self._update_health)
        # Image decoding and response tensors: CPU work that must stay off the event loop; as many
        # threads as CPUs, since more would only queue for the same cores.
        self.codec_executor = ThreadPoolExecutor(max_workers=available_cpus(), thread_name_prefix="codec")
        self.shm = SystemSharedMemory()
        self.dataplane = DataPlane(self.registry, self.codec_executor, self.shm)
        self.grpc_server: Optional[grpc.aio.Server] = None
        self.port: Optional[int] = None
        self._poller: Optional[asyncio.Task] = None
        self._refresher: Optional[asyncio.Task] = None
        self.background: set[asyncio.Future] = set()  # tasks started by signals, kept until done
        self._metrics_server = None

    async def _update_health(self) -> None:
        """Overall health: SERVING once the first scan is done; per model: SERVING while it serves."""
        serving = self.state is ServerState.READY
        overall = _SERVING if serving else _NOT_SERVING
        # Triton answers for its own service name as for the whole server
        statuses = {"": overall, "inference.GRPCInferenceService": overall}
        for name, _, _, _ in await self.registry.index():
            statuses[name] = _NOT_SERVING
        for name in self.registry.served_names():
            statuses[name] = _SERVING if self.state is not ServerState.STOPPING else _NOT_SERVING
        for name, status in statuses.items():
            await self.health.set(name, status)

    async def start(self) -> int:
        s = self.settings
        limits = message_limits(cards_on_disk(self.registry.repository), s)
        self.registry.message_limits = limits
        log.info("gRPC messages: at most %d bytes received, %d sent", limits.receive, limits.send)
        options = [
            ("grpc.max_receive_message_length", limits.receive),
            ("grpc.max_send_message_length", limits.send),
            ("grpc.max_concurrent_streams", s.max_streams_per_connection),
            # workers share the port; a lone server must not share it with a stray process
            ("grpc.so_reuseport", 1 if worker_identity() else 0),
        ]
        interceptors = [AuthInterceptor(s.auth_token, self.recorder)] if s.auth_token else []
        self.grpc_server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.registry, self.dataplane, s, lambda: self.state, self.recorder, self.shm),
            self.grpc_server,
        )
        ipb_grpc.add_IntrospectionServicer_to_server(
            IntrospectionServicer(self.registry, self.recorder), self.grpc_server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
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
        address = f"{s.host}:{s.grpc_port}"
        if s.tls_cert:
            self.port = self.grpc_server.add_secure_port(address, server_credentials(s))
        else:
            self.port = self.grpc_server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {s.host}:{s.grpc_port}")
        await self._update_health()
        if s.metrics_port:
            token = s.auth_token if s.metrics_require_token else ""
            self._metrics_server = self.metrics.serve(s.metrics_port, s.metrics_host or s.host, token)
        if not os.path.isdir(self.registry.repository):
            log.warning("repository %s does not exist: serving no models until it does", self.registry.repository)
        # A lone server listens while it loads (health says NOT_SERVING meanwhile); a worker loads first,
        # since the kernel would hand it connections from the port it shares before it could serve them.
        if worker_identity():
            await self.registry.scan()
        await self.grpc_server.start()
        log.info(
            "listening on %s:%d (gRPC), %s",
            s.host,
            self.port,
            f"metrics on :{s.metrics_port}/metrics" if s.metrics_port else "no metrics endpoint",
        )
        if not worker_identity():
            await self.registry.scan()
        self.state = ServerState.READY
        await self._update_health()
        for model in self.registry.ready_models():
            log.info("serving %s version %d (%s)", model.name, model.version, model.execution_provider)
        if s.poll_interval:
            self._poller = asyncio.create_task(self._poll())
        if self.metrics.multiprocess:
            self._refresher = asyncio.create_task(self._refresh_metrics())
        return self.port

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            await self.rescan()

    async def rescan(self) -> None:
        """Scan the repository again; a failure is logged, and the models already served keep serving."""
        try:
            await self.registry.scan()
        except Exception:
            log.exception("repository scan failed")

    async def _refresh_metrics(self) -> None:
        while True:
            self.metrics.refresh()
            await asyncio.sleep(1.0)

    def stop_now(self) -> None:
        """Cut the grace period short: the RPCs still running are cancelled."""
        if self.grpc_server is not None:
            self.in_background(self.grpc_server.stop(None))

    def in_background(self, work) -> None:
        """Run a coroutine to its end without awaiting it here (signal handlers start such work)."""
        task = asyncio.ensure_future(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def stop(self) -> None:
        """NOT_SERVING, refuse new requests, finish those in flight within the grace period."""
        self.state = ServerState.STOPPING
        await self._update_health()
        for task in (self._poller, self._refresher):
            if task is not None:
                task.cancel()
        if self.grpc_server is not None:
            await self.grpc_server.stop(self.settings.grace_period)
        await self.registry.close()
        self.shm.close()
        await asyncio.to_thread(self.codec_executor.shutdown, wait=True)
        if self._metrics_server is not None:
            server, _thread = self._metrics_server
            await asyncio.to_thread(server.shutdown)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully; a second one stops at once.

    SIGHUP rescans the repository (its usual meaning for a daemon: reread what you serve).
    """
    server = Server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def rescan() -> None:
        log.info("SIGHUP: rescanning the repository")
        server.in_background(server.rescan())

    loop.add_signal_handler(signal.SIGHUP, rescan)
    try:
        await server.start()
        print(
            f"convserve: serving {len(server.registry.ready_models())} model version(s) on "
            f"{settings.host}:{server.port}",
            flush=True,
        )
        await stop.wait()
        log.info(
            "signal received: finishing in-flight requests (grace %.0f s; again to stop now)", settings.grace_period
        )

        def now() -> None:
            log.warning("second signal: stopping now, cancelling what is in flight")
            server.stop_now()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, now)
    finally:
        await server.stop()
    log.info("stopped")
