"""A front-end's connection to the engine: requests out, answers back, reconnecting when the engine
restarts.

Runs in each front-end. While the engine is down every request fails at once with UNAVAILABLE (the
ones waiting on it too: none hangs) and health says NOT_SERVING; the link connects again as soon as
the supervisor has a new engine listening.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Optional

from ..errors import EngineRefusal, EngineUnavailable
from ..ipc import BEAT_SECONDS, Arena, Call, Cancel, Handlers, Infer, Kind, Link, Seen, Stat, send_hello

log = logging.getLogger("convserve.frontend")

RETRY_SECONDS = 0.1
# No heartbeat for this long: the engine is frozen (stopped, swapping, stuck): NOT_SERVING until it beats
SILENT_SECONDS = 6 * BEAT_SECONDS


class EngineLink:
    def __init__(
        self,
        socket_path: str,
        arena: Arena,
        index: int,
        on_models: Callable[[dict[str, Any]], None],
        on_connected: Callable[[bool], None],
    ) -> None:
        self.socket_path = socket_path
        self.arena = arena
        self.index = index
        self._on_models = on_models
        self._on_connected = on_connected
        self._link: Optional[Link] = None
        self._ids = itertools.count()
        # rid -> (future, arena block): a block is freed by whoever takes the answer, or here when its
        # request was cancelled (the engine may write into it until it answers)
        self._requests: dict[int, tuple[asyncio.Future, Optional[int]]] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._connected = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self._pending_link: Optional[Link] = None  # connected, its first table not yet read
        self._closing = False
        # what the engine sends (ipc.TO_FRONTEND), each to the method taking its fields
        self.handlers: Handlers = {
            Kind.DONE: self._done,
            Kind.FAILED: self._failed,
            Kind.REPLY: self._reply,
            Kind.REFUSED: self._refused,
            Kind.MODELS: self._models,
            Kind.BEAT: self._beat,
        }
        self._heard = 0.0  # time.monotonic() of the engine's last heartbeat (or first table)
        self._silent = False  # connected, but no heartbeat for SILENT_SECONDS
        self._watchdog: Optional[asyncio.Task] = None

    @property
    def connected(self) -> bool:
        """Linked to an engine that beats: what readiness and health follow."""
        return self._link is not None and not self._silent

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        self._watchdog = asyncio.create_task(self._watch())

    async def wait_connected(self, timeout: float) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def close(self) -> None:
        self._closing = True  # the front-end is stopping: losing the engine now is no news
        for task in (self._task, self._watchdog):
            if task is not None:
                task.cancel()
        if self._link is not None:
            self._link.close()

    # ---- what the data plane and the servicer call ---------------------------------------------------

    def infer(self, block: Optional[int], *fields: Any) -> tuple[int, asyncio.Future]:
        """Send Infer(rid, *fields); the future resolves to (queue_ns, compute_ns, batch_size)."""
        link = self._require()
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._requests[rid] = (future, block)
        link.send(Infer(rid, *fields))
        return rid, future

    def cancel(self, rid: int) -> None:
        """The client went: the engine drops the request if it has not started; its block is freed on the answer."""
        entry = self._requests.get(rid)
        if entry is not None and self._link is not None:
            self._link.send(Cancel(rid))

    def stat(self, model: str, version: int, record: tuple) -> None:
        if self._link is not None:
            self._link.send(Stat(model, version, record))

    async def call(self, method: str, *args: Any) -> Any:
        """A control call answered by the engine (index, load, statistics, shared memory ...)."""
        link = self._require()
        cid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[cid] = future
        link.send(Call(cid, method, args))
        try:
            return await future
        finally:
            self._calls.pop(cid, None)

    def _require(self) -> Link:
        if self._link is None:
            raise EngineUnavailable("the engine is restarting; retry")
        return self._link

    # ---- the connection ------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(self.socket_path)
                    send_hello(
                        sock, {"index": self.index, "pid": os.getpid(), "arena_bytes": self.arena.size}, self.arena
                    )
                    sock.setblocking(False)
                    reader, writer = await asyncio.open_unix_connection(sock=sock)
                except BaseException:
                    sock.close()
                    raise
            except OSError:
                await asyncio.sleep(RETRY_SECONDS)
                continue
            link = Link(reader, writer)
            served = loop.create_task(link.serve(self.handlers))
            self._pending_link = link
            try:
                await served
            finally:
                self._lost(link)
            await asyncio.sleep(RETRY_SECONDS)

    async def _watch(self) -> None:
        """Says NOT_SERVING (through on_connected) when a linked engine stops beating, SERVING again
        when it beats."""
        while True:
            await asyncio.sleep(BEAT_SECONDS)
            if self._link is None or self._silent or time.monotonic() - self._heard < SILENT_SECONDS:
                continue
            self._silent = True
            log.warning(
                "front-end %d: no heartbeat from the engine for %.1f s: not ready until it beats again",
                self.index,
                time.monotonic() - self._heard,
            )
            self._on_connected(False)

    def _beat(self, at: float) -> None:
        self._heard = time.monotonic()
        if self._silent:
            self._silent = False
            log.warning("front-end %d: the engine beats again", self.index)
            self._on_connected(True)

    def _lost(self, link: Link) -> None:
        link.close()
        was = self._link is not None
        self._link = None
        self._connected.clear()
        error = EngineUnavailable("the engine went away; retry")
        requests, self._requests = self._requests, {}
        for future, block in requests.values():
            if future.done():  # cancelled: nobody else frees it
                self._free(block)
            else:
                future.set_exception(error)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        if was and not self._closing:
            log.warning("front-end %d lost the engine: answering UNAVAILABLE until it is back", self.index)
            self._on_connected(False)

    def _free(self, block: Optional[int]) -> None:
        if block is not None:
            self.arena.free(block)

    # ---- what the engine sends (ipc's messages, by kind) ---------------------------------------------

    def _answered(self, rid: int) -> Optional[asyncio.Future]:
        """The future of a request still waited on; None when its client went (its block freed here)."""
        entry = self._requests.pop(rid, None)
        if entry is None:
            return None
        future, block = entry
        if future.done():  # cancelled by its client
            self._free(block)
            return None
        return future

    def _done(self, rid: int, queue_ns: int, compute_ns: int, batch_size: int) -> None:
        future = self._answered(rid)
        if future is not None:
            future.set_result((queue_ns, compute_ns, batch_size))

    def _failed(self, rid: int, code: str, message: str, limit: str, queued: bool) -> None:
        future = self._answered(rid)
        if future is not None:
            future.set_exception(EngineRefusal(code, message, limit, queued))

    def _reply(self, cid: int, value: Any) -> None:
        call = self._calls.get(cid)
        if call is not None and not call.done():
            call.set_result(value)

    def _refused(self, cid: int, code: str, message: str, limit: str) -> None:
        call = self._calls.get(cid)
        if call is not None and not call.done():
            call.set_exception(EngineRefusal(code, message, limit))

    def _models(self, table: dict[str, Any]) -> None:
        self._on_models(table)
        if self._link is None:  # the first table: connected
            self._link = self._pending_link
            self._heard, self._silent = time.monotonic(), False
            self._connected.set()
            log.info("front-end %d connected to the engine", self.index)
            self._on_connected(True)
        if self._link is not None:  # from now on requests go by this table: the engine may retire
            self._link.send(Seen(table["seq"]))
