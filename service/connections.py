"""What a client may hold of an aiohttp server (the HTTP door, /metrics): connections, and time.

- At most `max_connections` at once: past it a new connection is closed at once, and counted.
- A new connection must bring a complete request head (the request line and headers) within
  `head_timeout` seconds: one that sends nothing, or a byte a second, is closed then, and counted.
  Between requests, aiohttp's keep-alive timeout (set to the same) closes a connection that has not
  brought the next complete head in time.

The server's handler says when a request's head has arrived (`request_started`: the HTTP door's
middleware does). Runs on the server's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Optional


class ConnectionLimits:
    def __init__(
        self,
        max_connections: int,
        head_timeout: float,
        on_refused: Callable[[str], None] = lambda why: None,
    ) -> None:
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.connections = 0  # open now
        self.refused = 0  # closed at once: `max_connections` were open
        self.timed_out = 0  # closed: no complete request head in time
        self._on_refused = on_refused  # "connections" or "head_timeout", when one is closed
        self._waiting: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}

    def protocol(self, inner: asyncio.Protocol) -> asyncio.Protocol:
        """Wrap the server's protocol for one new connection."""
        return _Bounded(self, inner)

    def request_started(self, transport: Optional[asyncio.BaseTransport]) -> None:
        """A request's head has arrived on `transport` (its body has a timeout of its own, where it
        is read; after its answer, aiohttp's keep-alive timeout takes over)."""
        timer = self._waiting.pop(transport, None) if transport is not None else None
        if timer is not None:
            timer.cancel()

    def _wait(self, transport: asyncio.BaseTransport) -> None:
        previous = self._waiting.pop(transport, None)
        if previous is not None:
            previous.cancel()
        self._waiting[transport] = asyncio.get_running_loop().call_later(self.head_timeout, self._late, transport)

    def _late(self, transport: asyncio.BaseTransport) -> None:
        self._waiting.pop(transport, None)
        self.timed_out += 1
        self._on_refused("head_timeout")
        transport.close()

    def _opened(self, transport: asyncio.BaseTransport) -> bool:
        if self.connections >= self.max_connections:
            self.refused += 1
            self._on_refused("connections")
            transport.close()
            return False
        self.connections += 1
        self._wait(transport)
        return True

    def _closed(self, transport: asyncio.BaseTransport) -> None:
        self.connections -= 1
        timer = self._waiting.pop(transport, None)
        if timer is not None:
            timer.cancel()


class _Bounded(asyncio.Protocol):
    """One connection, handed to the server's protocol unless the limits refuse it."""

    def __init__(self, limits: ConnectionLimits, inner: asyncio.Protocol) -> None:
        self._limits = limits
        self._inner = inner
        self._transport: Optional[asyncio.BaseTransport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._limits._opened(transport):
            self._transport = transport
            self._inner.connection_made(transport)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._transport is not None:
            self._limits._closed(self._transport)
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> Optional[bool]:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
