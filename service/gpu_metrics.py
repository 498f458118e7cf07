"""GPU memory and utilisation per device through NVML (nvidia-ml-py), read at scrape time.

Where there is no NVIDIA driver (or no nvidia-ml-py) the collector yields nothing: no metric, no
error, no log beyond one debug line. Names (label `gpu`: the device index):

  convserve_gpu_memory_used_bytes    device memory in use (all processes)
  convserve_gpu_memory_total_bytes   device memory
  convserve_gpu_utilization_ratio    share of the last sample period a kernel ran, 0..1
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Optional

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

NAMES = ("convserve_gpu_memory_used_bytes", "convserve_gpu_memory_total_bytes", "convserve_gpu_utilization_ratio")


def _load_nvml() -> Optional[Any]:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        return pynvml
    except Exception as exc:  # no module, no driver, no device: a CPU machine
        log.debug("NVML not available, no GPU metrics: %s", exc)
        return None


class GpuCollector(Collector):
    def __init__(self, nvml: Optional[Any] = None) -> None:
        self._nvml = nvml
        self._tried = nvml is not None

    def _handles(self) -> list:
        if not self._tried:
            self._tried = True
            self._nvml = _load_nvml()
        if self._nvml is None:
            return []
        try:
            return [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(self._nvml.nvmlDeviceGetCount())]
        except Exception as exc:
            log.debug("NVML device query failed: %s", exc)
            return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        handles = self._handles()
        if not handles:
            return
        used = GaugeMetricFamily(NAMES[0], "GPU memory in use, bytes (all processes)", labels=["gpu"])
        total = GaugeMetricFamily(NAMES[1], "GPU memory, bytes", labels=["gpu"])
        busy = GaugeMetricFamily(NAMES[2], "share of the last sample period a kernel ran on the GPU", labels=["gpu"])
        assert self._nvml is not None
        for index, handle in enumerate(handles):
            try:
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            except Exception as exc:
                log.debug("NVML read of GPU %d failed: %s", index, exc)
                continue
            used.add_metric([str(index)], float(memory.used))
            total.add_metric([str(index)], float(memory.total))
            busy.add_metric([str(index)], rates.gpu / 100.0)
        yield from (used, total, busy)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # present only where a GPU is: nothing to declare up front
