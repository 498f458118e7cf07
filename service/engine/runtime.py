"""One onnxruntime session per model version: providers from settings, a warm-up run, `run`.

Knows nothing of gRPC or batching. `run` blocks (onnxruntime releases the GIL while it computes),
so callers hand it to `executor`: the session's own threads, one per concurrent run. On a GPU the
CUDA provider keeps cuBLAS/cuDNN handles per calling thread, and cuDNN tunes its algorithms per input
shape: a shared pool of many threads, or a batch size first seen under load, pays that set-up in a
client's request (measured on an H200: 16 clients got 97 img/s, p50 168 ms, against 2,000 img/s for
one in-process thread). So the same few threads always run the session, and warm-up runs every batch
size the batcher can form in each of them before the version is served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from convserve.sessions import instances_of, open_session, requested_providers

from ..settings import Settings

log = logging.getLogger(__name__)


class ModelRuntime:
    """An onnxruntime session for one model file."""

    def __init__(self, path: str, settings: Settings) -> None:
        config = settings.session_settings()
        self.instances = instances_of(config, requested_providers(config.providers))
        self.session = open_session(path, config)
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_batch_size = settings.max_batch_size
        self.executor = ThreadPoolExecutor(max_workers=self.instances, thread_name_prefix="onnxruntime")

    @property
    def execution_provider(self) -> str:
        """The provider that runs the graph (the first the session really got)."""
        return self.providers[0]

    def run(self, batch: np.ndarray, output_names: list[str]) -> list[np.ndarray]:
        """float32 (N, C, H, W) -> the named outputs, each (N, ...)."""
        return self.session.run(output_names, {self.input_name: batch})

    def warm_up(self, input_shape: tuple[int, ...], batch_sizes: Optional[Sequence[int]] = None) -> float:
        """Run every output once per batch size in each of the session's threads, so that no request
        pays an allocation, a per-thread context or a cuDNN algorithm search. Returns the seconds taken.

        Default sizes: 1 and 2 on the CPU (its kernels do not tune per shape); every size up to
        `max_batch_size` with a GPU provider."""
        if batch_sizes is None:
            batch_sizes = (
                (1, 2) if self.execution_provider == "CPUExecutionProvider" else range(1, self.max_batch_size + 1)
            )
        sizes = list(batch_sizes)
        started = time.perf_counter()
        # a barrier holds each task until all have started: each lands on its own pool thread
        barrier = threading.Barrier(self.instances)

        def warm() -> None:
            barrier.wait(timeout=600)
            for size in sizes:
                outputs = self.run(np.zeros((size, *input_shape), dtype=np.float32), self.output_names)
                for name, value in zip(self.output_names, outputs):
                    if not np.all(np.isfinite(value)):
                        raise ValueError(f"warm-up output {name} is not finite")

        for future in [self.executor.submit(warm) for _ in range(self.instances)]:
            future.result()
        return time.perf_counter() - started

    def close(self) -> None:
        """Stop the session's threads once their runs finish (blocking)."""
        self.executor.shutdown(wait=True)
