"""System shared memory (the V2 extension Triton clients speak): regions registered by name, each a
window of a POSIX shared-memory object under /dev/shm, that tensors name instead of carrying bytes.

Runs in the engine. A region's bytes are reached with os.preadv / os.pwrite on the object's descriptor,
checked against the object's size (fstat) at the moment of access, never through a mapping: a client
that truncates its object under a request gets INVALID_ARGUMENT, not a SIGBUS that kills the engine.
One descriptor per region, no mapping, and at most `max_regions` regions (RESOURCE_EXHAUSTED past it),
so registrations cannot take the process's descriptors or address space.

Only objects directly under /dev/shm are opened (no paths, no links, regular files only), and by default
only objects owned by the server's own user (`--shm-any-owner 1` widens that). A name is registered
once: registering a name that is taken is refused (ALREADY_EXISTS), so one client's region is never
silently replaced by another's, nor read through another's request because both picked "input".
Trust: any client that may register may read and write every registered region, as in Triton.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from ..errors import AlreadyExists, InvalidInput, NotFound, QueueFull

SHM_ROOT = "/dev/shm"
_KEY = re.compile(r"^/?[A-Za-z0-9_.-]{1,250}$")  # tritonclient's keys look like "/input_data"
MAX_NAME = 256  # region names are free text, as in Triton ("my region", "a/b"), just not unbounded


@dataclass
class Region:
    name: str
    key: str
    offset: int  # into the shared-memory object
    byte_size: int
    fd: int

    def _check(self, offset: int, byte_size: int, what: str) -> int:
        """The object position of `byte_size` bytes at `offset` in the region; InvalidInput when they fall
        outside the region, or outside the object as it is now."""
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidInput(
                f"{what}: {byte_size} bytes at offset {offset} fall outside shared-memory region "
                f"{self.name!r} ({self.byte_size} bytes)"
            )
        position = self.offset + offset
        if position + byte_size > os.fstat(self.fd).st_size:
            raise InvalidInput(f"{what}: shared-memory object {self.key!r} was truncated below region {self.name!r}")
        return position

    def read_into(self, offset: int, buffer: np.ndarray, what: str) -> None:
        """Fill `buffer` (contiguous) from the region at `offset`."""
        view = buffer.data.cast("B")
        position = self._check(offset, len(view), what)
        if os.preadv(self.fd, [view], position) != len(view):
            raise InvalidInput(f"{what}: shared-memory object {self.key!r} shrank while it was read")

    def read(self, offset: int, byte_size: int, what: str) -> bytes:
        data = os.pread(self.fd, byte_size, self._check(offset, byte_size, what))
        if len(data) != byte_size:
            raise InvalidInput(f"{what}: shared-memory object {self.key!r} shrank while it was read")
        return data

    def write(self, offset: int, array: np.ndarray, what: str) -> None:
        """Write a contiguous array's bytes into the region at `offset`."""
        view = np.ascontiguousarray(array).data.cast("B")
        position = self._check(offset, len(view), what)
        while view:
            written = os.pwrite(self.fd, view, position)
            view, position = view[written:], position + written

    def __post_init__(self) -> None:
        # The descriptor closes with the last reference: a request still holding the region (queued,
        # or writing its outputs) keeps it valid after unregistering, so a reused descriptor number can
        # never be written through by mistake.
        weakref.finalize(self, _close, self.fd)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class SystemSharedMemory:
    """The registered regions of one server process."""

    def __init__(self, root: str = SHM_ROOT, max_regions: int = 0, any_owner: bool = False) -> None:
        self._root = root
        self._regions: dict[str, Region] = {}
        self.max_regions = max_regions or default_max_regions()
        self.any_owner = any_owner
        self._lock = threading.Lock()  # registrations on the event loop, lookups from reader threads

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not 0 < len(name) <= MAX_NAME or "\0" in name:
            raise InvalidInput(f"invalid shared-memory region name {name[:64]!r}: 1 to {MAX_NAME} characters")
        if offset % mmap.ALLOCATIONGRANULARITY:  # Triton maps the object from the offset: it must be a page
            raise InvalidInput(
                f"shared-memory offset {offset} is not a multiple of the page size ({mmap.ALLOCATIONGRANULARITY})"
            )
        if not _KEY.match(key) or ".." in key:
            raise InvalidInput(f"invalid shared-memory key {key[:64]!r}: a name under {self._root}, like '/my_input'")
        if name in self._regions:
            raise AlreadyExists(f"shared-memory region {name!r} is already registered")
        if len(self._regions) >= self.max_regions:
            raise QueueFull(
                f"{self.max_regions} shared-memory regions are registered, the most this server takes; "
                "unregister some first",
                limit="shm_regions",
            )
        if byte_size < 1:
            raise InvalidInput("a shared-memory region needs byte_size > 0")
        path = os.path.join(self._root, key.lstrip("/"))
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise InvalidInput(f"no shared-memory object {key!r}") from None
        except OSError as exc:
            raise InvalidInput(f"cannot open shared-memory object {key!r}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(f"shared-memory object {key!r} is not a regular object")
            if not self.any_owner and info.st_uid != os.geteuid():
                raise InvalidInput(
                    f"shared-memory object {key!r} belongs to another user (uid {info.st_uid}); "
                    "the server takes its own user's objects only (--shm-any-owner 1 widens that)"
                )
            if offset + byte_size > info.st_size:
                raise InvalidInput(
                    f"region {name!r} ({byte_size} bytes at offset {offset}) is larger than "
                    f"shared-memory object {key!r} ({info.st_size} bytes)"
                )
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            self._regions[name] = Region(name, key, offset, byte_size, fd)

    def unregister(self, name: str = "") -> None:
        """Forget one region ("": all). Unknown names are not an error: unregistering is idempotent."""
        with self._lock:
            names = [name] if name else list(self._regions)
            gone = [r for r in (self._regions.pop(n, None) for n in names) if r is not None]
        del gone  # each descriptor closes when the last request holding its region lets go

    def status(self, name: str = "") -> list[Region]:
        if name and name not in self._regions:
            raise NotFound(f"no shared-memory region {name!r} is registered")
        return [self._regions[name]] if name else [self._regions[n] for n in sorted(self._regions)]

    def region(self, name: str, what: str) -> Region:
        """A registered region (for a tensor's bytes); NOT_FOUND, as in Triton, when there is none."""
        region = self._regions.get(name)
        if region is None:  # checked before the request reaches the queue
            raise NotFound(f"{what}: no shared-memory region {name[:64]!r} is registered")
        return region

    def close(self) -> None:
        self.unregister()


def default_max_regions() -> int:
    """A quarter of the descriptors this process may open, at most 4,096: registrations never take the
    descriptors connections, models and metrics need."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(4096, soft // 4))
