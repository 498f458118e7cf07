"""`convserve serve`: the supervising process. Starts the engine, then the front-ends once the models
are ready; serves the one /metrics of all of them (prometheus-client's multiprocess mode); restarts
whichever dies; turns signals into the lifecycle.

    SIGTERM, SIGINT  drain: the front-ends stop taking requests and finish theirs, then the engine stops
                     (a second one: the front-ends cancel what is left)
    SIGHUP           the engine rescans the repository

Every child dies with this process (a parent-death signal), so kill -9 of the supervisor leaves nothing
listening. Arenas are memfds (nothing under /dev/shm); the run folder (the engine's socket, the metrics
files) is removed on the way out, and a killed run's folder by the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from convserve.ports import free_port

from .errors import StartupError, port_in_use
from .ipc import BEAT_SECONDS, FRONTEND_BEAT
from .settings import Settings

log = logging.getLogger("convserve")

RUN_PREFIX = "convserve-run-"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_START_TIMEOUT = 600.0
# A serving front-end beats every BEAT_SECONDS; silent this long, it is killed and restarted
FRONTEND_SILENT_SECONDS = 6 * BEAT_SECONDS  # seconds for the engine to load the repository (a big model on a cold GPU)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_runs(root: str) -> None:
    """Remove the run folders of supervisors that are gone (killed with -9: nobody else will)."""
    with contextlib.suppress(OSError):
        for entry in os.listdir(root):
            if not entry.startswith(RUN_PREFIX):
                continue
            pid = entry[len(RUN_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
                log.info("removed %s, left by a server that was killed", entry)


def set_title(title: str) -> None:
    """What `ps` and `top` show for this process (nginx's and PostgreSQL's habit), instead of a spawned
    child's `python -B -c from multiprocessing.spawn ...`."""
    try:
        import setproctitle
    except ImportError:  # pyproject installs it; without it, the kernel's 15-character name at least
        ctypes.CDLL(None).prctl(_PR_SET_NAME, title.encode()[:15], 0, 0, 0)
        return
    setproctitle.setproctitle(title)


def child_process(role: str, settings: Settings, parent: int, target: Callable[..., None], *args: Any) -> None:
    """A child's entry point: die with the parent, leave SIGINT to the supervisor, log, run `target`."""
    set_title("convserve: " + role.replace("frontend-", "front-end "))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C reaches the whole group: the supervisor decides
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s %(name)s [{role}]: %(message)s"
    )
    target(settings, *args)


def _engine_target(settings: Settings, socket_path: str, ready: Any) -> None:
    from .engine.core import main

    main(settings, socket_path, ready)


def _frontend_target(settings: Settings, socket_path: str, port: int, index: int, count: int, ready: Any) -> None:
    from .frontend.server import main

    main(settings, socket_path, port, index, count, ready)


def serving_lines(s: Settings, port: int, frontends: int, versions: int) -> str:
    """What a person starting the server needs: where each door is, the page's address, and a
    warning when anyone on the network may use it."""
    doors = [f"gRPC {s.host}:{port}"]
    if s.http_port:
        doors.append(f"HTTP :{s.http_port}")
    if s.metrics_port:
        doors.append(f"metrics :{s.metrics_port}")
    count = f"{frontends} front-end{'s' if frontends > 1 else ''}"
    lines = [f"convserve: serving {versions} model version(s) on {', '.join(doors)} ({count}, one engine)"]
    everywhere = s.host in ("0.0.0.0", "::", "")
    if s.http_port:
        scheme = "https" if s.tls_cert else "http"
        lines.append(f"convserve: the page: {scheme}://{'127.0.0.1' if everywhere else s.host}:{s.http_port}/")
    if everywhere and not s.auth_token:
        lines.append(
            "convserve: listening on every interface with no token: anyone who reaches this machine can use"
            " and load models; set --auth-token (CONVSERVE_AUTH_TOKEN) or --host 127.0.0.1"
        )
    return "\n".join(lines)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = settings.frontend_count()
        self.port = settings.grpc_port or free_port(settings.host)
        root = tempfile.gettempdir()
        clean_stale_runs(root)
        self.run_dir = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=root)
        self.socket_path = os.path.join(self.run_dir, "engine.sock")
        self.metrics_dir = os.path.join(self.run_dir, "metrics")
        os.mkdir(self.metrics_dir)
        os.environ[MULTIPROC_ENV] = self.metrics_dir  # the children inherit it: every Metrics writes files
        self.context = multiprocessing.get_context("spawn")
        self.engine: Any = None
        self.frontends: list[Any] = [None] * self.count
        self.pipes: dict[int, Any] = {}  # front-end index -> its pipe: "listening" (or why not), then beats
        self.starting: set[int] = set()  # front-ends that have not said they listen yet
        self.heard: dict[int, float] = {}  # front-end index -> time.monotonic() of its last beat
        self.serving = False  # every front-end has listened once: the serving lines are out
        self.stopping = 0  # signals received
        self.versions = 0  # model versions the engine loaded at start
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._signals: list[int] = []

    # ---- children --------------------------------------------------------------------------------

    def _spawn(self, role: str, target: Callable[..., None], *args: Any) -> tuple[Any, Any]:
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=child_process,
            args=(role, self.settings, os.getpid(), target, *args, send),
            name=f"convserve-{role}",
            daemon=True,
        )
        process.start()
        send.close()
        return process, receive

    def _await_ready(self, process: Any, ready: Any, what: str) -> Any:
        """What the child says once it serves; its StartupError raised here; RuntimeError when it dies."""
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline and not self.stopping:
            if ready.poll(0.1):
                try:
                    answer = ready.recv()
                except EOFError:  # it died without a word
                    process.join(5.0)
                    raise RuntimeError(f"{what} exited with {process.exitcode} while starting") from None
                if isinstance(answer, StartupError):
                    raise answer
                return answer
            if not process.is_alive():
                raise RuntimeError(f"{what} exited with {process.exitcode} while starting")
            self._handle_signals()
        raise RuntimeError(f"{what} did not start")

    def start_engine(self) -> int:
        self.engine, ready = self._spawn("engine", _engine_target, self.socket_path)
        versions = self._await_ready(self.engine, ready, "the engine")
        log.info("engine pid %d ready: %d model version(s)", self.engine.pid, versions)
        return versions

    def start_frontend(self, index: int) -> None:
        """Spawn front-end `index`; the watch loop hears when it listens (or why it cannot)."""
        process, ready = self._spawn(
            f"frontend-{index}", _frontend_target, self.socket_path, self.port, index, self.count
        )
        self.frontends[index] = process
        self.pipes[index] = ready
        self.starting.add(index)

    # ---- signals ---------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                log.info("SIGHUP: the engine rescans the repository")
                if self.engine is not None and self.engine.is_alive():
                    os.kill(self.engine.pid, signal.SIGHUP)
                continue
            self.stopping += 1
            if self.stopping == 1:
                log.info(
                    "signal received: finishing in-flight requests (grace %.0f s; again to stop now)",
                    self.settings.grace_period,
                )
            else:
                log.warning("second signal: stopping now, cancelling what is in flight")
            for process in self.frontends:  # the first drains, the second cancels
                if process is not None and process.is_alive():
                    os.kill(process.pid, signal.SIGTERM)

    # ---- the run ---------------------------------------------------------------------------------

    def run(self) -> int:
        set_title("convserve: supervisor")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        metrics_server = None
        try:
            self._check_ports()  # before anything loads: a port in use is one line, at once
            if self.settings.metrics_port:  # first: it answers (model_ready 0) while the models load
                metrics_server = self._serve_metrics()
            self.versions = self.start_engine()
            for index in range(self.count):  # all at once: the watch loop supervises their start too
                self.start_frontend(index)
            self._watch()
            return 0
        except StartupError as exc:
            print(f"convserve: {exc}", file=sys.stderr, flush=True)
            return 1
        except RuntimeError as exc:
            log.error("%s", exc)
            return 1
        finally:
            self._stop_all()
            if metrics_server is not None:
                metrics_server.shutdown()
            shutil.rmtree(self.run_dir, ignore_errors=True)
            if self.engine is not None:
                log.info("stopped")

    def _watch(self) -> None:
        """Until a stopping signal: restart whatever dies, in every phase, the front-ends' start
        included (an engine killed while a front-end waits for it is restarted like any other), and
        say the serving lines once every front-end has listened."""
        while not self.stopping:
            sentinels = [p.sentinel for p in [self.engine, *self.frontends] if p is not None]
            multiprocessing.connection.wait([*sentinels, *self.pipes.values(), self._wake_r], timeout=BEAT_SECONDS)
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(64)
            self._handle_signals()
            if self.stopping:
                return
            self._hear_frontends()
            if not self.engine.is_alive():
                log.error("the engine (pid %d) exited with %s: restarting it", self.engine.pid, self.engine.exitcode)
                self._dead(self.engine)
                try:
                    self.start_engine()
                except RuntimeError as exc:
                    log.error("%s; trying again", exc)
                    time.sleep(1.0)
            for index, process in enumerate(self.frontends):
                if process is not None and not process.is_alive():
                    if not self.serving and index in self.starting:  # a fault of its own, not of the engine's
                        raise RuntimeError(f"front-end {index} exited with {process.exitcode} while starting")
                    log.error(
                        "front-end %d (pid %d) exited with %s: restarting it", index, process.pid, process.exitcode
                    )
                    self._dead(process)
                    self.start_frontend(index)

    def _hear_frontends(self) -> None:
        """What the front-ends said: that they listen (or why they cannot: at the first start, the
        server stops with that one line; a restarted one's reason is logged), then their beats. One
        that goes silent for FRONTEND_SILENT_SECONDS (stopped, stuck) is killed, and restarted as any
        that dies: the kernel would go on handing it new connections, which would hang."""
        now = time.monotonic()
        for index, pipe in list(self.pipes.items()):
            try:
                while pipe.poll():
                    answer = pipe.recv()
                    self.heard[index] = now
                    if index in self.starting and answer != FRONTEND_BEAT:
                        self.starting.discard(index)
                        if isinstance(answer, StartupError):
                            if not self.serving:
                                raise answer
                            log.error("front-end %d cannot start: %s", index, answer)
            except (EOFError, OSError):  # it died: the watch loop restarts it
                del self.pipes[index]
                continue
            process = self.frontends[index]
            silent = now - self.heard.get(index, now)
            if index not in self.starting and silent > FRONTEND_SILENT_SECONDS and process.is_alive():
                log.error(
                    "front-end %d (pid %d) has not beaten for %.1f s (stopped or stuck): killing it, to restart it",
                    index,
                    process.pid,
                    silent,
                )
                os.kill(process.pid, signal.SIGKILL)
                self.heard.pop(index, None)
        if not self.serving and not self.starting and all(p is not None for p in self.frontends):
            self.serving = True
            print(serving_lines(self.settings, self.port, self.count, self.versions), flush=True)

    def _dead(self, process: Any) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(process.pid, self.metrics_dir)

    def _stop_all(self) -> None:
        """Front-ends first (they finish what is in flight), then the engine."""
        deadline = time.monotonic() + self.settings.grace_period + 10.0
        if not self.stopping:  # a signal already told them (a second SIGTERM would cancel their requests)
            for process in self.frontends:
                if process is not None and process.is_alive():
                    os.kill(process.pid, signal.SIGTERM)
        for process in self.frontends:
            if process is not None:
                while process.is_alive() and time.monotonic() < deadline:
                    process.join(0.2)
                    self._handle_signals()
                if process.is_alive():
                    process.kill()
                process.join()
        if self.engine is not None:
            if self.engine.is_alive():
                os.kill(self.engine.pid, signal.SIGTERM)
            self.engine.join(self.settings.grace_period + 10.0)
            if self.engine.is_alive():
                self.engine.kill()
                self.engine.join()

    def _check_ports(self) -> None:
        """StartupError for the first port anything holds, before any front-end listens. The probe does
        not set SO_REUSEPORT: this server's front-ends share their ports with it, but a second server
        (another convserve's front-ends hold theirs with it too) must not join them and get half the
        connections, so a port held that way refuses the probe as any other does (as Triton refuses)."""
        s = self.settings
        ports = [(self.port, "gRPC", "grpc_port", s.host), (s.http_port, "HTTP", "http_port", s.host)]
        ports.append((s.metrics_port, "metrics", "metrics_port", s.metrics_host or s.host))
        for port, door, setting, host in ports:
            if not port:
                continue
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT left by a stopped one
                try:
                    probe.bind((host, port))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise port_in_use(port, door, setting) from None
                    raise RuntimeError(f"cannot listen on {host}:{port} ({door}): {exc.strerror or exc}") from None

    def _serve_metrics(self):
        from prometheus_client import CollectorRegistry, multiprocess

        from .gpu_metrics import GpuCollector
        from .metrics_http import MetricsEndpoint

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.metrics_dir)
        registry.register(GpuCollector())  # the GPUs, read once for all processes
        s = self.settings
        token = s.auth_token if s.metrics_require_token else ""
        host = s.metrics_host or s.host
        try:
            endpoint = MetricsEndpoint(registry, host, s.metrics_port, token, max_connections=s.metrics_max_connections)
            return endpoint.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise port_in_use(s.metrics_port, "metrics", "metrics_port") from None
            raise RuntimeError(f"cannot serve /metrics on {host}:{s.metrics_port}: {exc.strerror or exc}") from None


def serve(settings: Settings) -> int:
    """Run the server until SIGTERM or SIGINT; the exit status."""
    return Supervisor(settings).run()
