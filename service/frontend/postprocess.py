"""Output tensors as a client asked for them: top-k classification strings, FP16 feature maps
(the wire's own rules, BYTES framing and dtypes, are convserve.wire's)."""

from __future__ import annotations

import numpy as np

from convserve.wire import DTYPES


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


def to_wire(array: np.ndarray, datatype: str) -> bytes:
    """A numeric output as little-endian row-major bytes in `datatype` (FP32 or FP16)."""
    dtype = DTYPES[datatype]
    if array.dtype != np.dtype(dtype):
        array = array.astype(dtype)
    return array.tobytes()
