"""The engine and one front-end in this process: the serving path without a process boundary.

The engine runs on a thread with its own event loop, the front-end on another; they are linked as under
`convserve serve` (the engine's Unix socket, the front-end's arena handed over with SCM_RIGHTS, the
same messages), and the front-end listens on real gRPC and HTTP ports. What is left out is what the
supervisor adds: processes, signals, restarts, the shared /metrics port. So the data plane, both
doors and the engine core can be tested in milliseconds, by any client, and `core` can be called
directly (`call`).

    with Loopback(Settings(repository=...), grpc_port) as served:
        Client(served.url) ...
        served.call(served.core.statistics("digits"))
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Coroutine
from typing import Any, Optional, TypeVar

from .engine.core import Engine
from .frontend.core import FrontendCore
from .frontend.server import Frontend
from .settings import Settings

T = TypeVar("T")


class _LoopThread:
    """An event loop running on a thread of its own until `close`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, work: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        if not self.thread.is_alive():
            self.loop.close()


class Loopback:
    def __init__(self, settings: Settings, grpc_port: int) -> None:
        self.settings = settings
        self.port = grpc_port
        self.url = f"{settings.host}:{grpc_port}"
        self._folder = tempfile.mkdtemp(prefix="convserve-loopback-")
        self.socket_path = os.path.join(self._folder, "engine.sock")
        self.engine: Optional[Engine] = None
        self.frontend: Optional[Frontend] = None
        self._engine_thread: Optional[_LoopThread] = None
        self._frontend_thread: Optional[_LoopThread] = None
        self._stop_engine: Optional[asyncio.Event] = None
        self._engine_run: Any = None

    @property
    def core(self) -> FrontendCore:
        assert self.frontend is not None, "not started"
        return self.frontend.core

    @property
    def frontend_loop(self) -> asyncio.AbstractEventLoop:
        """The front-end's event loop (both doors and the core run on it)."""
        assert self._frontend_thread is not None, "not started"
        return self._frontend_thread.loop

    def call(self, work: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the front-end's loop (a core call, say) and return what it returns."""
        assert self._frontend_thread is not None, "not started"
        return self._frontend_thread.call(work, timeout)

    def start(self, timeout: float = 120) -> Loopback:
        engine_thread = self._engine_thread = _LoopThread("loopback-engine")
        engine_thread.call(self._start_engine(), timeout)
        frontend_thread = self._frontend_thread = _LoopThread("loopback-frontend")
        self.frontend = frontend_thread.call(self._start_frontend(), timeout)
        return self

    async def _start_engine(self) -> None:
        self.engine = Engine(self.settings, self.socket_path)
        self._stop_engine = asyncio.Event()
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def loaded(versions: int) -> None:
            if not ready.done():
                ready.set_result(versions)

        self._engine_run = asyncio.ensure_future(self.engine.run(loaded, self._stop_engine))
        # the engine's run ends early only by failing: then say why
        await asyncio.wait([ready, self._engine_run], return_when=asyncio.FIRST_COMPLETED)
        if self._engine_run.done():
            self._engine_run.result()

    async def _start_frontend(self) -> Frontend:
        frontend = Frontend(self.settings, self.socket_path, self.port, 0, 1)
        try:
            await frontend.start()
        except BaseException:
            await frontend.stop()
            raise
        return frontend

    def stop(self) -> None:
        """Stop the front-end (its grace period as configured), then the engine."""
        if self._frontend_thread is not None:
            if self.frontend is not None:
                self._frontend_thread.call(self.frontend.stop(), 120)
            self._frontend_thread.close()
        if self._engine_thread is not None:
            if self._stop_engine is not None:
                self._engine_thread.loop.call_soon_threadsafe(self._stop_engine.set)
                self._engine_thread.call(self._engine_done(), 120)
            self._engine_thread.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    async def _engine_done(self) -> None:
        await self._engine_run

    def __enter__(self) -> Loopback:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
