"""Prometheus metrics, defined once in their own registry and served on their own HTTP port.

Names follow Prometheus' conventions: prefix convserve_, counters end in _total, durations are
histograms in seconds with buckets for this workload (a 32x32 CNN runs in well under a
millisecond, AlexNet at 224x224 in tens of milliseconds on a CPU). Labels stay low in cardinality:
model, version, method, code. One `Metrics` object is made by the server and handed to whoever
writes (the request recorder, the registry); a second instance never clashes with the first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .gpu_metrics import GpuCollector

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _QueueDepth(Collector):
    """convserve_queue_depth, read from the batchers at scrape time: never stale while idle."""

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[str, int]] = dict

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("convserve_queue_depth", "requests waiting in the batcher", labels=["model"])
        for model, depth in sorted(self.source().items()):
            family.add_metric([model], depth)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("convserve_queue_depth", "requests waiting in the batcher", labels=["model"])


class Metrics:
    """Every convserve metric, in one registry of its own.

    Under `convserve serve` (PROMETHEUS_MULTIPROC_DIR set by the supervisor) the engine and every
    front-end write their values to files that the supervisor aggregates into one /metrics: gauges
    say how (livesum: added over live processes), and the queue depth, read at scrape time where one
    process serves its own registry (tests), is refreshed by the engine instead (`refresh`).
    """

    def __init__(self) -> None:
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "convserve_requests_total",
            "gRPC requests by model, version, method and status code",
            ["model", "version", "method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "convserve_request_duration_seconds",
            "gRPC request duration, server side",
            ["model", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "convserve_queue_duration_seconds",
            "time a request waited for its batch",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "convserve_compute_duration_seconds",
            "onnxruntime run time per batch",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "convserve_batch_size", "images per executed batch", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.images = Counter("convserve_images_total", "images inferred", ["model"], registry=r)
        self.refusals = Counter(
            "convserve_refusals_total", "requests refused by a limit, by the limit", ["limit"], registry=r
        )
        limits = ("batch_size", "queue_size", "image_bytes", "image_format", "image_pixels", "shm_regions")
        for limit in (*limits, "health_watches"):
            self.refusals.labels(limit)  # known label values start at 0
        self._queue_depth = _QueueDepth()
        self._queue_depth_gauge: Optional[Gauge] = None
        if self.multiprocess:
            self._queue_depth_gauge = Gauge(
                "convserve_queue_depth",
                "requests waiting in the batcher",
                ["model"],
                registry=r,
                multiprocess_mode="livesum",
            )
        else:
            r.register(self._queue_depth)
        self.in_flight = Gauge(
            "convserve_requests_in_flight", "gRPC requests being served", registry=r, multiprocess_mode="livesum"
        )
        self.model_ready = Gauge(
            "convserve_model_ready",
            "1 when the model version serves",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.load_failures = Counter(
            "convserve_model_load_failures_total", "model versions that failed validation", ["model"], registry=r
        )
        self.feature_map_bytes = Counter(
            "convserve_feature_map_bytes_total", "feature-map bytes sent", ["model"], registry=r
        )
        self.queue_capacity = Gauge(
            "convserve_queue_capacity",
            "requests that may wait per model version (--max-queue-size): the alert's 'near full'",
            registry=r,
            multiprocess_mode="max",
        )
        if not self.multiprocess:  # under the supervisor, it reads the GPUs once for all
            r.register(GpuCollector())

    def read_queue_depth_from(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Where convserve_queue_depth comes from: model name -> requests waiting, read at each scrape."""
        self._queue_depth.source = source

    def refresh(self) -> None:
        """Multiprocess mode: write the values that a lone server reads at scrape time."""
        if self._queue_depth_gauge is not None:
            for model, depth in self._queue_depth.source().items():
                self._queue_depth_gauge.labels(model).set(depth)
