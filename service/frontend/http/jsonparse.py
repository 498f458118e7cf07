"""Request JSON, parsed where it cannot stall the event loop.

Python's JSON parser holds the GIL for the whole parse (C code, no release), so a thread would not
free the loop: four 5 MB bodies of numbers held health for about half a second. A body over
`OFF_LOOP_BYTES` is parsed in a worker process of this front-end (started on first need, one body at
a time), which also turns each input's numeric `data` into an array, so what comes back is a small
dict and a few buffers (cheap to unpickle), not half a million floats. Smaller bodies parse inline:
the round trip would cost more than the parse.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import sys
from typing import Any, Optional

import numpy as np

from ...errors import InvalidInput

log = logging.getLogger(__name__)

OFF_LOOP_BYTES = 1 << 20
V2_REQUEST_KEYS = ("id", "parameters", "inputs", "outputs")


def parse(data: bytes) -> Any:
    """The JSON of a body; InvalidInput for one that does not parse or nests too deep."""
    if not data:
        return {}
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("the request's JSON does not parse") from None
    except RecursionError:  # nesting deeper than Python's parser follows
        raise InvalidInput("the request's JSON is nested too deep") from None


def parse_with_arrays(data: bytes) -> tuple[Optional[str], Any]:
    """In the worker: (error message or None, the JSON with each non-BYTES input's numeric `data` as
    an array). Data that is not uniformly numeric (strings, booleans, ragged) is left as it came, for
    the door's checks to refuse with their own message."""
    try:
        header = parse(data)
    except InvalidInput as exc:
        return str(exc), None
    inputs = header.get("inputs") if isinstance(header, dict) else None
    for tensor in inputs if isinstance(inputs, list) else []:
        if isinstance(tensor, dict) and tensor.get("datatype") != "BYTES" and isinstance(tensor.get("data"), list):
            try:
                array = np.asarray(tensor["data"])
            except (TypeError, ValueError):
                continue
            if array.dtype.kind in "fiu":
                tensor["data"] = array
    if isinstance(header, dict):  # what the door reads of a request, and nothing else to unpickle
        header = {key: header[key] for key in V2_REQUEST_KEYS if key in header}
    return None, header


class JsonParser:
    """One front-end's parser: inline for small bodies, its worker process for large ones.

    The worker is a child process of its own (`python -m` this module: front-ends are daemonic, and
    multiprocessing lets those have no children), fed over its stdin one body at a time as a length
    and the bytes, answering the same way with a pickle of `parse_with_arrays`'s result. If it dies,
    the next large body starts another; meanwhile, or if it cannot start, the body parses inline."""

    def __init__(self, off_loop_bytes: int = OFF_LOOP_BYTES) -> None:
        self.off_loop_bytes = off_loop_bytes
        self._worker: Optional[asyncio.subprocess.Process] = None
        self._turn = asyncio.Lock()

    async def request(self, data: bytes) -> Any:
        if len(data) < self.off_loop_bytes:
            return parse(data)
        async with self._turn:
            try:
                error, header = await self._ask(data)
            except (OSError, EOFError, asyncio.IncompleteReadError, pickle.UnpicklingError):
                log.warning("the JSON worker failed; parsing this body in the front-end", exc_info=True)
                self.close()
                return parse(data)
        if error is not None:
            raise InvalidInput(error)
        return header

    async def _ask(self, data: bytes) -> tuple[Optional[str], Any]:
        if self._worker is None or self._worker.returncode is not None:
            self._worker = await asyncio.create_subprocess_exec(
                sys.executable, "-m", __name__, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
        worker = self._worker
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(len(data).to_bytes(8, "little") + data)
        await worker.stdin.drain()
        size = int.from_bytes(await worker.stdout.readexactly(8), "little")
        return pickle.loads(await worker.stdout.readexactly(size))

    def close(self) -> None:
        if self._worker is not None and self._worker.returncode is None:
            self._worker.kill()
        self._worker = None

    async def aclose(self) -> None:
        """Stop the worker and wait for it (the door's cleanup, while the event loop still runs)."""
        worker = self._worker
        self.close()
        if worker is not None:
            await worker.wait()


def _serve() -> None:
    """The worker: bodies in on stdin, answers out on stdout, until its parent closes the pipe."""
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while len(head := source.read(8)) == 8:
        body = source.read(int.from_bytes(head, "little"))
        answer = pickle.dumps(parse_with_arrays(body), protocol=pickle.HIGHEST_PROTOCOL)
        sink.write(len(answer).to_bytes(8, "little") + answer)
        sink.flush()


if __name__ == "__main__":
    _serve()
