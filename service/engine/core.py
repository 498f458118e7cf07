"""The engine process: one per device. Owns the models (registry, sessions, batchers, statistics, the
lifecycle) and the clients' shared-memory regions; front-ends connect to it over a Unix socket.

Runs in the engine process only. Every front-end's requests go into the same per-version batcher, so
one model copy (and one CUDA context) serves every connection and batches mix requests from all
front-ends. A request's input is read where it lies (the front-end's arena or the client's region)
and its outputs are written where they are read, from the executor thread that ran the batch; what
travels back is one small message per request, all of one event-loop turn in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from convserve.wire import DTYPES

from ..errors import InvalidInput, ServingError, Unimplemented, status_of
from ..ipc import (
    BEAT_SECONDS,
    Arena,
    Beat,
    BlockingLink,
    Done,
    Failed,
    Handlers,
    Kind,
    Message,
    Models,
    Refused,
    Reply,
    dispatch,
    receive_hello,
)
from ..metrics import Metrics
from ..settings import Settings
from .batcher import Batcher, BatchResult, Job
from .registry import ModelVersion, Registry
from .shm import SystemSharedMemory

log = logging.getLogger("convserve.engine")

Write = tuple[str, Callable[[np.ndarray], None]]  # (output name, what writes its rows where they go)


def _deliver(writes: list[Write], outputs: dict[str, np.ndarray]) -> None:
    """In the worker thread: each output into its destination."""
    for name, write in writes:
        write(outputs[name])


def _into(destination: np.ndarray, value: np.ndarray) -> None:
    np.copyto(destination, value, casting="same_kind")


class FrontendConnection:
    """One connected front-end: its link, its arena (mapped here too), its requests in progress.

    Its reader thread turns each message into work at once: an inference goes straight into its
    model's batcher (no event loop on the way); control calls go to the engine's event loop. It is
    also the batchers' sink for its requests: the answers of one batch leave in one write."""

    def __init__(self, engine: Engine, link: BlockingLink, arena: Arena, hello: dict[str, Any]) -> None:
        self.engine = engine
        self.link = link
        self.arena = arena
        self.name = f"front-end {hello.get('index', '?')} (pid {hello.get('pid', '?')})"
        self.jobs: dict[int, tuple[Job, Batcher]] = {}
        self.seen = -1  # the last models table it applied
        self._outbox: list[Message] = []
        self._lock = threading.Lock()
        # what a front-end sends (ipc.TO_ENGINE), each to the method taking its fields
        self.handlers: Handlers = {
            Kind.INFER: self._infer,
            Kind.CANCEL: self._cancel,
            Kind.STAT: self._stat,
            Kind.CALL: lambda cid, method, args: self.engine.call_soon(self._call(cid, method, args)),
            Kind.SEEN: self._seen,
        }

    # ---- the reader thread -----------------------------------------------------------------------

    def read(self) -> None:
        """Until the front-end goes (in its own thread)."""
        for messages in self.link.messages():
            for wire in messages:
                dispatch(self.handlers, wire)
            self.flush()

    def _stat(self, model: str, version: int, record: tuple) -> None:
        served = self.engine.registry.served(model, version)
        if served is not None:
            served.stats.record_request(record)

    def _seen(self, seq: int) -> None:
        """It routes by models table `seq` now."""
        self.seen = seq
        self.engine.table_seen()

    def _infer(self, rid: int, model: str, version: int, source: tuple, shape: tuple, outputs: list, deadline) -> None:
        try:
            served = self.engine.registry.get(model, version)
            inputs = self._source(source, shape)
            writes = [(out, self._destination(served, out, dest, shape[0])) for out, dest in outputs]
            job = Job(inputs, frozenset(out for out, _ in outputs), deadline, sink=self, tag=rid)
            job.deliver = functools.partial(_deliver, writes)
            batcher = served.batcher
            assert batcher is not None
            self.jobs[rid] = (job, batcher)
            batcher.put(job)
        except Exception as exc:  # refused before its model's queue: not the model's failure
            self.jobs.pop(rid, None)
            self._answer(rid, exc, queued=False)

    def _cancel(self, rid: int) -> None:
        entry = self.jobs.get(rid)
        if entry is not None and entry[1].cancel(entry[0]):  # not started: it never will
            self.jobs.pop(rid, None)
            self._post(Failed(rid, "CANCELLED", "cancelled", "", True))

    def _source(self, source: tuple, shape: tuple) -> np.ndarray:
        if source[0] == "arena":
            return self.arena.array(source[1], shape)
        _, name, offset, byte_size = source
        need = 4 * int(np.prod(shape))
        what = "input 'input'"
        region = self.engine.shm.region(name, what)
        if byte_size != need:
            raise InvalidInput(f"input 'input' of shape {list(shape)} needs {need} bytes, got {byte_size}")
        inputs = np.empty(shape, dtype="<f4")  # read, not mapped: the client may truncate its object
        region.read_into(offset, inputs, what)
        return inputs

    def _destination(self, model: ModelVersion, name: str, dest: tuple, images: int) -> Callable[[np.ndarray], None]:
        shape = (images, *model.outputs[name].shape[1:])
        if dest[0] == "arena":
            return functools.partial(_into, self.arena.array(dest[1], shape))
        _, region_name, offset, byte_size, datatype = dest
        dtype = DTYPES[datatype]
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        what = f"output {name!r}"
        region = self.engine.shm.region(region_name, what)
        if size > byte_size:
            raise InvalidInput(f"{what} needs {size} bytes; its shared-memory window has {byte_size}")
        region._check(offset, size, what)  # refused now, not after the run, when it cannot fit

        def write(value: np.ndarray) -> None:
            region.write(offset, value.astype(dtype, copy=False), what)

        return write

    # ---- answers (the sink of its jobs, called from the batchers' worker threads) -----------------

    def put(self, job: Job, result: Optional[BatchResult], error: Optional[BaseException]) -> None:
        rid = job.tag
        assert isinstance(rid, int)
        self.jobs.pop(rid, None)
        if result is not None:
            self._post(Done(rid, result.queue_ns, result.compute_ns, result.batch_size))
        elif error is None:
            self._post(Failed(rid, "CANCELLED", "cancelled", "", True))
        else:
            self._answer(rid, error)

    def flush(self) -> None:
        with self._lock:
            outbox, self._outbox = self._outbox, []
        if outbox:
            self.link.send(outbox)

    def _post(self, message: Message) -> None:
        with self._lock:
            self._outbox.append(message)

    def _answer(self, rid: int, error: BaseException, queued: bool = True) -> None:
        self._post(Failed(rid, *self._refusal(error, "a request"), queued))

    def _refusal(self, error: BaseException, what: str) -> tuple[str, str, str]:
        """(status code name, message, limit) for an error; a bug is logged with its traceback."""
        code, message = status_of(error)
        if not isinstance(error, ServingError):
            log.error("%s from %s failed", what, self.name, exc_info=error)
        return code.name, message, getattr(error, "limit", "")

    # ---- control calls (on the engine's event loop) ----------------------------------------------

    async def _call(self, cid: int, method: str, args: tuple) -> None:
        try:
            value = await self.engine.call(method, *args)
        except Exception as exc:
            self.link.send([Refused(cid, *self._refusal(exc, method))])
            return
        self.link.send([Reply(cid, value)])

    def detach(self) -> None:
        """The front-end went: drop what it queued (what runs finishes into the arena, then it goes)."""
        for job, batcher in list(self.jobs.values()):
            batcher.cancel(job)
        self.jobs.clear()
        self.link.close()
        self.arena.close()


class Engine:
    def __init__(self, settings: Settings, socket_path: str) -> None:
        self.settings = settings
        self.socket_path = socket_path
        self.metrics = Metrics()
        self.metrics.queue_capacity.set(settings.max_queue_size)
        self.registry = Registry(settings, self.metrics, on_change=self._models_changed)
        self.shm = SystemSharedMemory(max_regions=settings.max_shm_regions, any_owner=bool(settings.shm_any_owner))
        self.frontends: set[FrontendConnection] = set()
        self._background: set[asyncio.Future] = set()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.table: dict[str, Any] = {"served": [], "index": [], "pending": [], "failed": [], "seq": 0}
        self._seen = asyncio.Event()  # set whenever a front-end says which table it routes by
        # the control calls a front-end may forward (ipc.Call's `method`), built once
        self._calls: dict[str, Callable[..., Any]] = {
            "index": self._index,
            "load": self._load,
            "unload": self._unload,
            "statistics": self._statistics,
            "shm_register": self.shm.register,
            "shm_status": lambda *name: [(r.name, r.key, r.offset, r.byte_size) for r in self.shm.status(*name)],
            "shm_unregister": self.shm.unregister,
            # an encoded image a client left in its region (bytes, not a tensor)
            "shm_read": lambda name, offset, size, what: self.shm.region(name, what).read(offset, size, what),
        }

    def in_background(self, work) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def models(self) -> dict[str, Any]:
        """The "models" table every front-end keeps: served versions and the repository's index."""
        rows = await self.registry.index()
        return {
            "served": [m.describe() for m in self.registry.served_versions()],
            "index": [(name, version, state.value, reason) for name, version, state, reason in rows],
            "pending": self.registry.pending_names(),
            "failed": self.registry.failed_names(),
            "seq": self.table["seq"] + 1,
        }

    async def _models_changed(self, settled: bool = False) -> None:
        """After every registry change: the table is built once (a disk scan), kept for replies and new
        front-ends, and sent to every front-end. `settled`: also wait (a few seconds at most) until every
        front-end routes by it, so that a version about to be retired gets no more requests."""
        self.table = await self.models()
        for frontend in list(self.frontends):
            frontend.link.send([Models(self.table)])
        if settled:
            deadline = asyncio.get_running_loop().time() + 5.0
            while any(f.seen < self.table["seq"] for f in list(self.frontends)):
                self._seen.clear()
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    log.warning("a front-end did not take the new models table within 5 s")
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._seen.wait(), remaining)

    def table_seen(self) -> None:
        """From a reader thread: a front-end applied a table."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the engine is exiting
                self._loop.call_soon_threadsafe(self._seen.set)

    def call_soon(self, work) -> None:
        """From a reader thread: run a coroutine on the engine's event loop."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.in_background, work)

    async def call(self, method: str, *args) -> Any:
        """The control calls front-ends forward (ipc.Call's `method`); plain data in, plain data out."""
        if method not in self._calls:
            raise Unimplemented(f"unknown engine call {method!r}")
        answer = self._calls[method](*args)
        return await answer if asyncio.iscoroutine(answer) else answer

    async def _index(self) -> list:
        return (await self.models())["index"]

    async def _load(self, name: str) -> dict:
        await self.registry.load(name)
        return self.table  # the registry's change callback has built the new table by now

    async def _unload(self, name: str) -> dict:
        await self.registry.unload(name)
        return self.table

    def _statistics(self, name: str, version: Optional[int]) -> list[dict]:
        return [
            {"name": m.name, "version": m.version, **vars(m.stats), "batches": dict(m.stats.batches)}
            for m in self.registry.served_versions(name)
            if version is None or m.version == version
        ]

    # ---- front-ends ------------------------------------------------------------------------------

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            self.in_background(self._attach(conn))

    async def _attach(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(True)
            hello, arena = await asyncio.to_thread(receive_hello, conn)
        except (OSError, ValueError, EOFError) as exc:
            log.warning("a front-end's connection failed before its hello: %s", exc)
            conn.close()
            return
        frontend = FrontendConnection(self, BlockingLink(conn), arena, hello)
        self.frontends.add(frontend)
        log.info("%s connected", frontend.name)
        frontend.link.send([Models(self.table)])
        loop, ended = asyncio.get_running_loop(), asyncio.Event()

        def read() -> None:  # a thread of its own: the default pool's few threads are for disk scans
            try:
                frontend.read()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: the engine is exiting
                    loop.call_soon_threadsafe(ended.set)

        threading.Thread(target=read, name=f"reader-{hello.get('index', '?')}", daemon=True).start()
        try:
            await ended.wait()
        finally:
            self.frontends.discard(frontend)
            frontend.detach()
            log.info("%s disconnected", frontend.name)

    # ---- lifecycle -------------------------------------------------------------------------------

    async def run(self, ready: Callable[[int], None], stop: Optional[asyncio.Event] = None) -> None:
        """Load the repository, then take front-ends until SIGTERM (or `stop`, for an engine on a
        thread of a process that has other uses for its signals); `ready(versions)` once loaded."""
        loop = self._loop = asyncio.get_running_loop()
        if stop is None:
            stop = asyncio.Event()
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGHUP, lambda: self.in_background(self.rescan()))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a killed engine's
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        listener.listen(64)
        listener.setblocking(False)
        if not os.path.isdir(self.registry.repository):
            log.warning("repository %s does not exist: serving no models until it does", self.registry.repository)
        await self.registry.scan()
        for model in self.registry.ready_models():
            log.info("serving %s version %d (%s)", model.name, model.version, model.execution_provider)
        tasks = [asyncio.create_task(self._accept(listener)), asyncio.create_task(self._refresh_metrics())]
        beating = threading.Event()
        threading.Thread(target=self._beat, args=(beating,), name="heartbeat", daemon=True).start()
        if self.settings.poll_interval:
            tasks.append(asyncio.create_task(self._poll()))
        ready(len(self.registry.ready_models()))
        try:
            await stop.wait()
        finally:
            beating.set()
            for task in tasks:
                task.cancel()
            listener.close()
            await self.registry.close()
            for frontend in list(self.frontends):
                frontend.link.close()
            self.shm.close()

    def _beat(self, stop: threading.Event) -> None:
        """Tell every front-end, every BEAT_SECONDS, that this process runs: from a thread of its own,
        so that neither a blocked send nor a busy event loop holds it up."""
        while not stop.wait(BEAT_SECONDS):
            beat: list[Message] = [Beat(time.monotonic())]
            for frontend in list(self.frontends):
                frontend.link.send(beat)

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


def main(settings: Settings, socket_path: str, ready: Optional[Any] = None) -> None:
    """The engine process's entry point (`ready`: a multiprocessing Connection told the version count)."""

    def tell(versions: int) -> None:
        if ready is not None:
            with contextlib.suppress(OSError):  # a restarted engine's supervisor may not listen
                ready.send(versions)

    asyncio.run(Engine(settings, socket_path).run(tell))
