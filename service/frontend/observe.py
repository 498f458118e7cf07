"""What a request reports: one `Outcome`, made when the request starts and recorded once when it ends.

Runs in each front-end. Unary RPCs, each message of a stream and refused authentications all go
through `Recorder`, which feeds both Prometheus (`Metrics`, this process's share of the one /metrics)
and the served version's statistics (ModelStatistics, kept by the engine: the record goes there in
the next message) from the same record, so the two never disagree. Executed batches are recorded by
the engine.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import Code, ServingError, status_of
from ..metrics import Metrics

log = logging.getLogger(__name__)
LOGGED = "convserve_logged"  # set on an unexpected error once its traceback is logged


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
    code: Code = Code.OK
    seconds: float = 0.0  # server time of the whole request
    timings: Optional[Timings] = None  # an inference's stages, once it has run
    feature_map_bytes: int = 0
    limit: str = ""  # the limit that refused it, if one did
    queued: bool = False  # it reached its model's queue (Triton counts failures from there on)


class Recorder:
    """Writes outcomes into the metrics and sends them to the statistics: the one writer of both.

    Model labels come from requests: only served names become label values, so a client sending
    random names cannot blow up the metrics' cardinality. Labelled children are looked up once per
    label set and kept (prometheus_client's `labels()` costs a lock and a tuple per call).
    """

    def __init__(
        self,
        metrics: Metrics,
        is_served: Callable[[str], bool],
        send_stat: Callable[[str, int, tuple], None] = lambda model, version, record: None,
    ) -> None:
        self.metrics = metrics
        self._is_served = is_served
        self._send_stat = send_stat
        self._children: dict[tuple, Any] = {}

    def _child(self, metric, *labels: str):
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

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
            if not isinstance(exc, ServingError) and outcome.code == Code.INTERNAL:
                log.error("unexpected error in %s for model %r", outcome.method, outcome.model[:128], exc_info=exc)
                setattr(exc, LOGGED, True)  # a door that catches it need not log it again
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
        self._child(m.requests, model, version, outcome.method, outcome.code.name).inc()
        self._child(m.request_duration, model, outcome.method).observe(outcome.seconds)
        timings = outcome.timings
        if timings is not None:
            self._child(m.queue_duration, model).observe(timings.queue_ns / 1e9)
        if outcome.limit:
            self._child(m.refusals, outcome.limit).inc()
        if outcome.feature_map_bytes:
            self._child(m.feature_map_bytes, model).inc(outcome.feature_map_bytes)
        if not version:
            return
        elapsed_ns = int(outcome.seconds * 1e9)
        if outcome.code == Code.OK and timings is not None:
            t = timings
            record = (True, elapsed_ns, t.queue_ns, t.preprocess_ns, t.compute_ns, t.postprocess_ns)
        elif outcome.queued:  # a request refused before the queue (bad shape, bad image) is not
            record = (False, elapsed_ns, 0, 0, 0, 0)  # the model's failure: Triton does not count it either
        else:
            return
        self._send_stat(outcome.model, int(version), record)


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
