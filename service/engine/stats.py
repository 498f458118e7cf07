"""ModelStatistics' numbers, kept by the engine for every front-end: per model version, cumulative.

Executed batches are recorded where they run; a request's own times (success, queue, compute, the
front-end's pre- and postprocessing) come from the front-end that answered it, as one `RequestRecord`
sent when the request ends. Prometheus gets the batch metrics here and the request metrics in the
front-ends (service/frontend/observe.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ..metrics import Metrics
from .batcher import BatchStats

# Batches are recorded from worker threads and requests from each front-end's reader thread: one lock
# (uncontended it costs tens of nanoseconds) keeps every count exact.
_LOCK = threading.Lock()


@dataclass
class VersionStats:
    """Cumulative counts and durations (ns) of one model version, for ModelStatistics."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    preprocess_ns: int = 0
    postprocess_ns: int = 0
    inference_count: int = 0  # images
    execution_count: int = 0  # batches
    last_inference_ms: int = 0
    request_compute_ns: int = 0  # over successful requests, each its batch's run (Triton's compute_infer)
    # batch size -> [executions, input ns, compute ns, output ns] (Triton's batch_stats)
    batches: dict[int, list[int]] = field(default_factory=dict)

    def record_request(self, record: tuple[bool, int, int, int, int, int]) -> None:
        """One finished request: (succeeded, server ns, queue ns, preprocess ns, compute ns, postprocess ns).
        A failed request is only sent when it reached the model's queue (Triton counts from there)."""
        ok, elapsed_ns, queue_ns, preprocess_ns, compute_ns, postprocess_ns = record
        with _LOCK:
            self._add(ok, elapsed_ns, queue_ns, preprocess_ns, compute_ns, postprocess_ns)

    def _add(self, ok: bool, elapsed_ns: int, queue_ns: int, preprocess_ns: int, compute_ns: int, postprocess_ns: int):
        if ok:
            self.success_count += 1
            self.success_ns += elapsed_ns
            self.queue_ns += queue_ns
            self.preprocess_ns += preprocess_ns
            self.request_compute_ns += compute_ns
            self.postprocess_ns += postprocess_ns
        else:
            self.fail_count += 1
            self.fail_ns += elapsed_ns

    def record_batch(self, batch: BatchStats) -> None:
        with _LOCK:
            self._add_batch(batch)

    def _add_batch(self, batch: BatchStats) -> None:
        self.execution_count += 1
        self.inference_count += batch.batch_size
        entry = self.batches.setdefault(batch.batch_size, [0, 0, 0, 0])
        entry[0] += 1
        entry[1] += batch.input_ns
        entry[2] += batch.compute_ns
        entry[3] += batch.output_ns
        self.last_inference_ms = int(time.time() * 1000)  # wall clock: ModelStatistics reports a timestamp


class BatchRecorder:
    """One model version's executed batches into its statistics and the Prometheus batch metrics
    (the labelled children looked up once, not per batch)."""

    def __init__(self, metrics: Metrics, model: str, stats: VersionStats) -> None:
        self._stats = stats
        self._batch_size = metrics.batch_size.labels(model)
        self._compute = metrics.compute_duration.labels(model)
        self._images = metrics.images.labels(model)

    def __call__(self, batch: BatchStats) -> None:
        self._stats.record_batch(batch)
        self._batch_size.observe(batch.batch_size)
        self._compute.observe(batch.compute_ns / 1e9)
        self._images.inc(batch.batch_size)
