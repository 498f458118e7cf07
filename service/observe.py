"""What a request reports: one `Outcome`, made when the request starts and recorded once when it ends.

Unary RPCs, each message of a stream and refused authentications all go through `Recorder`, which
feeds both Prometheus (`Metrics`) and the served version's `VersionStats` (ModelStatistics) from
the same record, so the two never disagree. Executed batches are recorded here too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import grpc

from .batcher import BatchStats
from .errors import ServingError, status_of
from .metrics import Metrics

log = logging.getLogger(__name__)


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


@dataclass
class Timings:
    """Where an inference request's server time went (ns); sent back as its response parameters."""

    queue_ns: int = 0  # submitted -> its batch started
    preprocess_ns: int = 0  # received -> submitted (image decoding, checks)
    compute_ns: int = 0  # its batch's session run
    postprocess_ns: int = 0  # batch done -> response tensors ready
    server_ns: int = 0  # received -> response tensors ready
    batch_size: int = 0  # images in the batch it ran in

    def parameters(self, execution_provider: str) -> dict[str, int | str]:
        return {
            "queue_us": self.queue_ns // 1000,
            "preprocess_us": self.preprocess_ns // 1000,
            "compute_us": self.compute_ns // 1000,
            "postprocess_us": self.postprocess_ns // 1000,
            "server_us": self.server_ns // 1000,
            "batch_size": self.batch_size,
            "execution_provider": execution_provider,
        }


@dataclass
class Outcome:
    """One request, as it ended."""

    method: str  # the RPC's name: ModelInfer, ModelStreamInfer, ModelReady ...
    model: str = ""  # the model the request named ("" if none)
    version: str = ""  # the version that took it ("" if none did)
    code: grpc.StatusCode = grpc.StatusCode.OK
    seconds: float = 0.0  # server time of the whole request
    stats: Optional[VersionStats] = None  # the statistics of the version that took it
    timings: Optional[Timings] = None  # an inference's stages, once it has run
    feature_map_bytes: int = 0
    limit: str = ""  # the limit that refused it, if one did
    queued: bool = False  # it reached its model's queue (Triton counts failures from there on)


class Recorder:
    """Writes outcomes and batches into the metrics and the statistics: the one writer of both.

    Model labels come from requests: only served names become label values, so a client sending
    random names cannot blow up the metrics' cardinality.
    """

    def __init__(self, metrics: Metrics, is_served: Callable[[str], bool]) -> None:
        self.metrics = metrics
        self._is_served = is_served

    @contextlib.contextmanager
    def observe(self, outcome: Outcome) -> Iterator[Outcome]:
        """Time the block, take the status code from what escapes it, record the outcome once.

        An unexpected error (a bug) is logged here with its traceback, on every path.
        """
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            yield outcome
        except BaseException as exc:
            outcome.code, _ = status_of(exc)
            outcome.limit = getattr(exc, "limit", "")
            if not isinstance(exc, ServingError) and outcome.code == grpc.StatusCode.INTERNAL:
                log.error("unexpected error in %s for model %r", outcome.method, outcome.model[:128], exc_info=exc)
            raise
        finally:
            self.metrics.in_flight.dec()
            outcome.seconds = time.perf_counter() - started
            self.record(outcome)

    def record(self, outcome: Outcome) -> None:
        m = self.metrics
        model, version = outcome.model, outcome.version
        if model and not self._is_served(model):
            model, version = "unknown", ""
        m.requests.labels(model, version, outcome.method, outcome.code.name).inc()
        m.request_duration.labels(model, outcome.method).observe(outcome.seconds)
        timings = outcome.timings
        if timings is not None:
            m.queue_duration.labels(model).observe(timings.queue_ns / 1e9)
        if outcome.limit:
            m.refusals.labels(outcome.limit).inc()
        if outcome.feature_map_bytes:
            m.feature_map_bytes.labels(model).inc(outcome.feature_map_bytes)
        stats = outcome.stats
        if stats is None:
            return
        elapsed_ns = int(outcome.seconds * 1e9)
        if outcome.code == grpc.StatusCode.OK and timings is not None:
            stats.success_count += 1
            stats.success_ns += elapsed_ns
            stats.queue_ns += timings.queue_ns
            stats.preprocess_ns += timings.preprocess_ns
            stats.request_compute_ns += timings.compute_ns
            stats.postprocess_ns += timings.postprocess_ns
        elif outcome.queued:  # a request refused before the queue (bad shape, bad image) is not
            stats.fail_count += 1  # the model's failure: Triton does not count it either
            stats.fail_ns += elapsed_ns

    def record_batch(self, model: str, stats: VersionStats, batch: BatchStats) -> None:
        stats.execution_count += 1
        stats.inference_count += batch.batch_size
        entry = stats.batches.setdefault(batch.batch_size, [0, 0, 0, 0])
        entry[0] += 1
        entry[1] += batch.input_ns
        entry[2] += batch.compute_ns
        entry[3] += batch.output_ns
        stats.last_inference_ms = int(time.time() * 1000)  # wall clock: ModelStatistics reports a timestamp
        self.metrics.batch_size.labels(model).observe(batch.batch_size)
        self.metrics.compute_duration.labels(model).observe(batch.compute_ns / 1e9)
        self.metrics.images.labels(model).inc(batch.batch_size)


# ---- log settings (Triton's logging extension), over Python's logging ---------------------------

_LOGGER = "convserve"  # the server's loggers all sit under it


def log_settings() -> dict[str, bool | int | str]:
    """The server's log settings as Triton names them, read from the `convserve` logger's level."""
    level = logging.getLogger(_LOGGER).getEffectiveLevel()
    return {
        "log_file": "",
        "log_info": level <= logging.INFO,
        "log_warning": level <= logging.WARNING,
        "log_error": level <= logging.ERROR,
        "log_verbose_level": 1 if level <= logging.DEBUG else 0,
        "log_format": "default",
    }


def set_log_settings(**updates: bool | int) -> None:
    """Apply Triton-named settings: the lowest level any of them turns on becomes the level."""
    current = {**log_settings(), **updates}
    if current["log_verbose_level"]:
        level = logging.DEBUG
    elif current["log_info"]:
        level = logging.INFO
    elif current["log_warning"]:
        level = logging.WARNING
    elif current["log_error"]:
        level = logging.ERROR
    else:
        level = logging.CRITICAL + 1
    logging.getLogger(_LOGGER).setLevel(level)
