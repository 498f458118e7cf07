"""Free TCP ports, for a server that may listen anywhere (`--grpc-port 0`), the benchmark's servers and
the tests'. Standard library only."""

from __future__ import annotations

import contextlib
import socket


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` now: all held open at once while picked (picked one at a
    time, the kernel may hand out the same port twice: it did, and a load balancer could not publish).
    "0.0.0.0" means every interface."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host if host != "0.0.0.0" else "", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port(host: str = "127.0.0.1") -> int:
    """One port free on `host` now (another process may take it before it is used)."""
    return free_ports(1, host)[0]
