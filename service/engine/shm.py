"""System shared memory (the V2 extension Triton clients speak): regions registered by name, each a
window of a POSIX shared-memory object under /dev/shm, that tensors name instead of carrying bytes.

Every read and write is checked against its region's bounds before it happens. Only objects
directly under /dev/shm are opened (no paths, no links, regular files only). A name is registered
once: registering a name that is taken is refused (ALREADY_EXISTS), so one client's region is never
silently replaced by another's, nor read through another's request because both picked "input".
A region's memory stays mapped while a request still holds a view of it, even after unregistering.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
from dataclasses import dataclass

from ..errors import AlreadyExists, InvalidInput, NotFound

SHM_ROOT = "/dev/shm"
_KEY = re.compile(r"^/?[A-Za-z0-9_.-]{1,250}$")  # tritonclient's keys look like "/input_data"
MAX_NAME = 256  # region names are free text, as in Triton ("my region", "a/b"), just not unbounded


@dataclass
class Region:
    name: str
    key: str
    offset: int  # into the shared-memory object
    byte_size: int
    _map: mmap.mmap

    def view(self, offset: int, byte_size: int, what: str) -> memoryview:
        """`byte_size` bytes at `offset` within the region; InvalidInput when they fall outside it."""
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidInput(
                f"{what}: {byte_size} bytes at offset {offset} fall outside shared-memory region "
                f"{self.name!r} ({self.byte_size} bytes)"
            )
        start = self.offset + offset
        return memoryview(self._map)[start : start + byte_size]

    def close(self) -> None:
        # a request may still read or write it: then the mapping goes with its last view
        with contextlib.suppress(BufferError):
            self._map.close()


class SystemSharedMemory:
    """The registered regions of one server process."""

    def __init__(self, root: str = SHM_ROOT) -> None:
        self._root = root
        self._regions: dict[str, Region] = {}

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
            if offset + byte_size > info.st_size:
                raise InvalidInput(
                    f"region {name!r} ({byte_size} bytes at offset {offset}) is larger than "
                    f"shared-memory object {key!r} ({info.st_size} bytes)"
                )
            mapped = mmap.mmap(fd, info.st_size)
        finally:
            os.close(fd)
        self._regions[name] = Region(name, key, offset, byte_size, mapped)

    def unregister(self, name: str = "") -> None:
        """Forget one region ("": all). Unknown names are not an error: unregistering is idempotent."""
        names = [name] if name else list(self._regions)
        for n in names:
            region = self._regions.pop(n, None)
            if region is not None:
                region.close()

    def status(self, name: str = "") -> list[Region]:
        if name and name not in self._regions:
            raise NotFound(f"no shared-memory region {name!r} is registered")
        return [self._regions[name]] if name else [self._regions[n] for n in sorted(self._regions)]

    def view(self, name: str, offset: int, byte_size: int, what: str) -> memoryview:
        """A checked window of a registered region (for a tensor's bytes)."""
        region = self._regions.get(name)
        if region is None:  # NOT_FOUND, as in Triton (checked before the request reaches the queue)
            raise NotFound(f"{what}: no shared-memory region {name[:64]!r} is registered")
        return region.view(offset, byte_size, what)

    def close(self) -> None:
        self.unregister()
