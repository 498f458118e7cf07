"""Output tensors as a client asked for them: top-k classification strings, FP16 feature maps,
and the V2 wire encoding of BYTES tensors."""

from __future__ import annotations

import struct

import numpy as np

from ..ipc import DTYPES


def top_k(scores: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """(N, K) scores -> (N, k) object array of b"score:index:label", best first, as Triton does."""
    k = min(k, scores.shape[1])
    # argpartition then sort only the k kept: O(K) per row instead of a full sort
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(part, np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable"), 1)
    out = np.empty(order.shape, dtype=object)
    for row in range(order.shape[0]):
        for col, index in enumerate(order[row]):
            # Triton: "score:index:label", and "score:index" for a model without labels
            label = f":{labels[index]}" if index < len(labels) else ""
            out[row, col] = f"{scores[row, index]:f}:{index}{label}".encode()
    return out


def serialize_bytes(elements) -> bytes:
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


def wire_dtype(datatype: str) -> str:
    """numpy's little-endian dtype for an output datatype (FP32 or FP16)."""
    return DTYPES[datatype]


def to_wire(array: np.ndarray, datatype: str) -> bytes:
    """A numeric output as little-endian row-major bytes in `datatype` (FP32 or FP16)."""
    dtype = wire_dtype(datatype)
    if array.dtype != np.dtype(dtype):
        array = array.astype(dtype)
    return array.tobytes()
