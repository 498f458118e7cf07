"""What the front-ends and the engine share, and nothing else: the arena and the message link.

Runs in both processes. Tensors never travel through the socket: a front-end writes a request's input
into its arena (a memfd both processes map), the engine gathers batches from it and writes each
request's outputs back into the same block. Only small control messages travel, over one Unix socket
per front-end, as length-prefixed pickles of a *list* of messages: everything a process sends in one
event-loop turn goes in one write (one message per front-end per executed batch, not one per request).

Each message is a class below (a NamedTuple: its fields are its documentation), sent as a plain
tuple `(kind as an int, *fields)`: pickling a tuple of plain values costs a fifth of pickling the NamedTuple
itself. The receiving side dispatches on the kind through a table of handlers whose parameters are
the message's fields (`tests/test_architecture.py` checks that every kind has one).

The arena is a memfd (os.memfd_create), passed to the engine once over the socket (SCM_RIGHTS): it
has no name under /dev/shm, so nothing of it outlives the processes that map it, even after kill -9.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
import logging
import math
import mmap
import os
import pickle
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Optional, Union

import numpy as np

# ---- the messages ---------------------------------------------------------------------------------


class Kind(enum.IntEnum):
    # front-end -> engine
    INFER = 1
    CANCEL = 2
    STAT = 3
    CALL = 4
    SEEN = 5
    # engine -> front-end
    DONE = 11
    FAILED = 12
    REPLY = 13
    REFUSED = 14
    MODELS = 15
    BEAT = 16


class Infer(NamedTuple):
    """Run a request whose input is in `source`, its outputs into `outputs`' destinations."""

    rid: int
    model: str
    version: int
    source: tuple  # ("arena", offset) | ("shm", region, offset, byte_size)
    shape: tuple  # of the input, (N, C, H, W)
    outputs: list  # [(name, ("arena", offset) | ("shm", region, offset, byte_size, datatype))]
    deadline: Optional[float]  # time.monotonic() seconds (CLOCK_MONOTONIC: one clock for all processes)


class Cancel(NamedTuple):
    """Its client went: drop the request if it has not started (it is answered either way)."""

    rid: int


class Stat(NamedTuple):
    """A finished request, for ModelStatistics (the engine counts for every front-end)."""

    model: str
    version: int
    record: tuple


class Call(NamedTuple):
    """A control call: `method` one of the engine's calls (index, load, statistics, shm_* ...)."""

    cid: int
    method: str
    args: tuple


class Seen(NamedTuple):
    """The front-end routes by models table `seq` now: the engine may retire what it replaced."""

    seq: int


class Done(NamedTuple):
    """A request ran; its outputs are in their destinations."""

    rid: int
    queue_ns: int
    compute_ns: int
    batch_size: int


class Failed(NamedTuple):
    """A request did not run. `code` is a grpc.StatusCode name; `queued`: it reached its model's queue
    (Triton counts failures from there)."""

    rid: int
    code: str
    message: str
    limit: str
    queued: bool


class Reply(NamedTuple):
    """A control call's answer (plain data)."""

    cid: int
    value: Any


class Refused(NamedTuple):
    """A control call that failed: as Failed, without `queued`."""

    cid: int
    code: str
    message: str
    limit: str


class Models(NamedTuple):
    """The served models and the repository's index, after every change (and on connecting)."""

    table: dict


class Beat(NamedTuple):
    """The engine is alive and its threads run (every BEAT_SECONDS): a front-end that hears none for
    a while says NOT_SERVING (a frozen engine keeps its socket open, so only silence tells)."""

    at: float  # the engine's time.monotonic()


BEAT_SECONDS = 0.25
# A serving front-end tells its supervisor the same, over its ready pipe: this, every BEAT_SECONDS
FRONTEND_BEAT = "beat"

Message = Union[Infer, Cancel, Stat, Call, Seen, Done, Failed, Reply, Refused, Models, Beat]
TO_ENGINE: dict[Kind, type] = {
    Kind.INFER: Infer,
    Kind.CANCEL: Cancel,
    Kind.STAT: Stat,
    Kind.CALL: Call,
    Kind.SEEN: Seen,
}
TO_FRONTEND: dict[Kind, type] = {
    Kind.DONE: Done,
    Kind.FAILED: Failed,
    Kind.REPLY: Reply,
    Kind.REFUSED: Refused,
    Kind.MODELS: Models,
    Kind.BEAT: Beat,
}
KIND_OF: dict[type, Kind] = {cls: kind for kind, cls in {**TO_ENGINE, **TO_FRONTEND}.items()}
# the kind as it travels: a plain int (an enum member pickles as its class), looked up once per message
_WIRE_KIND: dict[type, int] = {cls: int(kind) for cls, kind in KIND_OF.items()}
Handlers = dict[Kind, Callable[..., None]]  # a kind -> a callable taking the message's fields


def on_wire(message: Message) -> tuple:
    """(kind, *fields): what travels (the kind as a plain int: an enum member pickles as its class)."""
    return (_WIRE_KIND[type(message)], *message)


def dispatch(handlers: Handlers, wire: tuple) -> bool:
    """Hand a received (kind, *fields) to its handler; False for a kind this side has none for."""
    handler = handlers.get(wire[0])
    if handler is None:
        log.error("a message of kind %r, which this side does not take", wire[0])
        return False
    handler(*wire[1:])
    return True


# ---- the socket: framing, the arena ------------------------------------------------------------------

log = logging.getLogger("convserve.ipc")
_LENGTH = struct.Struct("<I")
# Blocks start on cache lines: numpy reads and writes them at full speed, and two requests' blocks
# never share a line that two threads write.
ALIGN = 64


def _frame(value: Any) -> bytes:
    """A value on the socket: its pickle's length (4 bytes, little-endian), then the pickle."""
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


class Arena:
    """A shared byte space with a first-fit allocator (the owner allocates; both sides read and write)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.buffer = mmap.mmap(fd, size)
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, size), sorted by offset
        self._used: dict[int, int] = {}  # offset -> size

    @classmethod
    def create(cls, name: str, size: int) -> Arena:
        """A new arena in memory only (pages are taken when first written)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size)

    def alloc(self, nbytes: int) -> Optional[int]:
        """The offset of a block of at least `nbytes`, or None when none is free."""
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for index, (offset, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[index]
                else:
                    self._free[index] = (offset + need, size - need)
                self._used[offset] = need
                return offset
        return None

    def free(self, offset: int) -> None:
        size = self._used.pop(offset)
        index = bisect.bisect(self._free, (offset, 0))
        # merge with the neighbours, so that big blocks stay possible
        if index < len(self._free) and self._free[index][0] == offset + size:
            size += self._free.pop(index)[1]
        if index > 0 and sum(self._free[index - 1]) == offset:
            offset, previous = self._free[index - 1]
            size += previous
            index -= 1
            del self._free[index]
        self._free.insert(index, (offset, size))

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    def array(self, offset: int, shape: tuple[int, ...], dtype: str = "<f4") -> np.ndarray:
        """A view of the arena's bytes at `offset` as an array (no copy); checked against the arena."""
        count = math.prod(shape)
        if offset < 0 or offset + count * np.dtype(dtype).itemsize > self.size:
            raise ValueError(f"{count} items at offset {offset} fall outside the arena")
        return np.frombuffer(self.buffer, dtype=dtype, count=count, offset=offset).reshape(shape)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a view still alive: the mapping goes with it
            self.buffer.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Link:
    """One end of a front-end <-> engine socket: batched sends, a reader that dispatches each message."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._outgoing: list[tuple] = []
        self._loop = asyncio.get_running_loop()
        self.closed = False

    def send(self, message: Message) -> None:
        """Queue a message; everything queued in this event-loop turn leaves in one write."""
        if self.closed:
            return
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(on_wire(message))

    def _flush(self) -> None:
        if self.closed or not self._outgoing:
            return
        frame = _frame(self._outgoing)
        self._outgoing = []
        self._writer.write(frame)

    async def serve(self, handlers: Handlers) -> None:
        """Read until the other end goes; each message to its handler, in order."""
        try:
            while True:
                header = await self._reader.readexactly(_LENGTH.size)
                (length,) = _LENGTH.unpack(header)
                for wire in pickle.loads(await self._reader.readexactly(length)):
                    dispatch(handlers, wire)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._writer.close()


class BlockingLink:
    """The engine's end of a socket: plain blocking I/O from threads (a reader thread per front-end;
    answers leave from whichever thread has them, one write per batch, under a lock)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._lock = threading.Lock()
        self.closed = False

    def send(self, messages: list[Message]) -> None:
        frame = _frame([on_wire(m) for m in messages])
        try:
            with self._lock:
                self._sock.sendall(frame)
        except OSError:  # the front-end went: its reader thread sees the end and cleans up
            self.closed = True

    def messages(self) -> Iterator[list[tuple]]:
        """Each frame's messages, as (Kind, *fields), until the other end goes."""
        buffer = bytearray()
        while True:
            while len(buffer) >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buffer)
                if len(buffer) < _LENGTH.size + length:
                    break
                frame = bytes(buffer[_LENGTH.size : _LENGTH.size + length])
                del buffer[: _LENGTH.size + length]
                yield pickle.loads(frame)
            try:
                chunk = self._sock.recv(1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                return
            buffer += chunk

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


# ---- the handshake: the front-end's arena travels once, as a file descriptor -----------------------


def send_hello(sock: socket.socket, hello: dict[str, Any], arena: Arena) -> None:
    """Blocking: the front-end's first message, with its arena's descriptor (SCM_RIGHTS)."""
    socket.send_fds(sock, [_frame(hello)], [arena.fd])


def receive_hello(sock: socket.socket, timeout: float = 5.0) -> tuple[dict[str, Any], Arena]:
    """Blocking (run it in a thread): the hello and the arena it names, mapped."""
    sock.settimeout(timeout)
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
    if len(fds) != 1 or len(data) < _LENGTH.size:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("a front-end's hello came without its arena")
    (length,) = _LENGTH.unpack_from(data)
    hello = pickle.loads(data[_LENGTH.size : _LENGTH.size + length])
    sock.settimeout(None)
    return hello, Arena(fds[0], hello["arena_bytes"])
