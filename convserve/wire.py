"""The V2 wire format's small rules, one place for every side that speaks it: the server's two doors
and its engine, the Python client and the benchmark. numpy only: the client imports it without
importing the server.

    DTYPES              a V2 datatype -> numpy's little-endian dtype (raw contents are little-endian,
                        row-major)
    serialize_bytes     BYTES elements -> each behind its 4-byte little-endian length
    deserialize_bytes   the inverse, bounded
    ShmRef, SHM_*       where a tensor lies in a registered system shared-memory region (parameters)
    output_array        a response's output as an array
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

# The numeric datatypes convserve reads or writes, with the numpy dtype of their raw contents
DTYPES = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "UINT8": "u1"}
# What an output may be asked to come back as (FP16 halves a feature map's bytes)
OUTPUT_DATATYPES = ("FP32", "FP16")
# The shared-memory extension's tensor parameters (Triton's names)
SHM_REGION = "shared_memory_region"
SHM_OFFSET = "shared_memory_offset"
SHM_BYTE_SIZE = "shared_memory_byte_size"


@dataclass(frozen=True)
class ShmRef:
    """Where a tensor's bytes lie in a registered system shared-memory region."""

    region: str
    byte_size: int
    offset: int = 0


def serialize_bytes(elements: Iterable[Any]) -> bytes:
    """BYTES tensor elements (row-major) -> each behind its 4-byte little-endian length."""
    parts = []
    for element in elements:
        data = element if isinstance(element, bytes) else str(element).encode()
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(raw: bytes | memoryview, most: int | None = None) -> list[bytes]:
    """The inverse of serialize_bytes; raises ValueError on a truncated buffer, or past `most` elements
    (so a buffer of millions of empty elements costs no more than `most` of them)."""
    out: list[bytes] = []
    offset, view = 0, memoryview(raw)
    while offset < len(raw):
        if most is not None and len(out) == most:
            raise ValueError(f"BYTES contents hold more than {most} elements")
        if offset + 4 > len(raw):
            raise ValueError("BYTES contents end inside a 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ValueError("BYTES contents end inside an element")
        out.append(bytes(view[offset : offset + length]))
        offset += length
    return out


def output_array(response: Any, name: str) -> np.ndarray:
    """A response's (a ModelInferResponse's) output `name` as an array: numbers as their dtype,
    BYTES as an object array of bytes."""
    for index, tensor in enumerate(response.outputs):
        if tensor.name == name:
            raw, shape = response.raw_output_contents[index], tuple(tensor.shape)
            if tensor.datatype == "BYTES":
                return np.array(deserialize_bytes(raw), dtype=object).reshape(shape)
            return np.frombuffer(raw, dtype=DTYPES[tensor.datatype]).reshape(shape)
    raise KeyError(name)
