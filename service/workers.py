"""`convserve serve --workers N`: N server processes sharing one gRPC port (SO_REUSEPORT), each with
its own sessions and batchers; this supervisor serves their Prometheus metrics, aggregated
(prometheus-client's multiprocess mode), and passes SIGTERM/SIGINT on to them.

One Python event loop is the ceiling of one process; the kernel spreads new connections across the
workers (per connection, not per request: a single client channel stays on one worker).
ModelStatistics stays per process: each answer says which worker it is in its trailing metadata
(`convserve-worker: i/N`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from .gpu_metrics import GpuCollector
from .settings import Settings

log = logging.getLogger("convserve")

WORKER_ENV = "CONVSERVE_WORKER"  # "i/N" in a worker; absent in a lone server
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def worker_identity() -> str:
    """'i/N' in a worker process, '' otherwise."""
    return os.environ.get(WORKER_ENV, "")


def _flags(settings: Settings) -> list[str]:
    """The settings as `convserve serve` flags (the token travels in the environment, not in `ps`)."""
    flags = []
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        if value is None or f.name in ("auth_token", "workers", "grpc_port", "metrics_port"):
            continue
        flags += ["--" + f.name.replace("_", "-"), str(value)]
    return flags


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host if host != "0.0.0.0" else "", 0))
        return sock.getsockname()[1]


def run_workers(settings: Settings) -> int:
    """Start settings.workers servers, serve their metrics, stop them on SIGTERM/SIGINT; exit status."""
    from prometheus_client import CollectorRegistry, multiprocess

    from .metrics import serve_metrics

    port = settings.grpc_port or _free_port(settings.host)
    metrics_dir = tempfile.mkdtemp(prefix="convserve-metrics-")
    env = {**os.environ, MULTIPROC_ENV: metrics_dir, "CONVSERVE_AUTH_TOKEN": settings.auth_token}
    command = [
        sys.executable,
        "-m",
        "convserve",
        "serve",
        *_flags(settings),
        "--workers",
        "1",
        "--grpc-port",
        str(port),
        "--metrics-port",
        "0",
    ]
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children = [
        subprocess.Popen(command, env={**env, WORKER_ENV: f"{i}/{settings.workers}"}) for i in range(settings.workers)
    ]
    metrics_server = None
    if settings.metrics_port:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=metrics_dir)
        registry.register(GpuCollector())
        token = settings.auth_token if settings.metrics_require_token else ""
        metrics_server, _ = serve_metrics(
            registry, settings.metrics_port, settings.metrics_host or settings.host, token
        )
    print(f"convserve: {settings.workers} workers on {settings.host}:{port}", flush=True)
    status = 0
    try:
        while any(child.poll() is None for child in children):
            for child in children:
                code = child.poll()
                if code is not None and not stopping:  # one died on its own: stop the rest, report it
                    log.error("worker pid %d exited with %s: stopping the others", child.pid, code)
                    status = 1
                    stop(signal.SIGTERM, None)
            time.sleep(0.2)
        status = status or max((abs(child.returncode) for child in children), default=0)
    finally:
        for child in children:
            multiprocess.mark_process_dead(child.pid, metrics_dir)
        if metrics_server is not None:
            metrics_server.shutdown()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return status
