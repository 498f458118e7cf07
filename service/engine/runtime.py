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

import ctypes.util
import glob
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import onnxruntime as ort

from ..settings import Settings, default_intra_op_threads

log = logging.getLogger(__name__)

_PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def gpu_present() -> bool:
    """An NVIDIA device and driver on this machine (cheap: no CUDA initialisation)."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or (
        ctypes.util.find_library("cuda") is not None and os.path.exists("/proc/driver/nvidia")
    )


def requested_providers(settings: Settings) -> list[str]:
    """onnxruntime provider names to ask for, in order.

    `auto` asks for CUDA (and TensorRT where its library is installed) only when a GPU is present:
    onnxruntime-gpu lists CUDA as available on any machine and fails loudly when asked for it on
    one without a GPU.
    """
    available = set(ort.get_available_providers())
    names = settings.provider_list()
    if names == ["auto"]:
        names = []
        if gpu_present():
            if ctypes.util.find_library("nvinfer"):
                names.append("tensorrt")
            names.append("cuda")
        names.append("cpu")
    wanted = [_PROVIDER_NAMES[n] for n in names if _PROVIDER_NAMES[n] in available]
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    return wanted


def _preload_gpu_libraries() -> None:
    # onnxruntime-gpu >= 1.21 can load CUDA and cuDNN from the nvidia-* pip packages
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # a machine without them still serves on the CPU
            log.debug("onnxruntime.preload_dlls failed: %s", exc)


class ModelRuntime:
    """An onnxruntime session for one model file."""

    def __init__(self, path: str, settings: Settings) -> None:
        wanted = requested_providers(settings)
        if any(p != "CPUExecutionProvider" for p in wanted):
            _preload_gpu_libraries()
        options = ort.SessionOptions()
        self.instances = settings.instances or (2 if "CUDAExecutionProvider" in wanted else 1)
        on_cpu = wanted == ["CPUExecutionProvider"]
        # With a GPU provider the graph runs on the device and the CPU threads only feed it: one
        # intra-op thread per run, not spinning. Measured on an H200 (16 cores, AlexNet, shm, 64
        # clients): 1,537 img/s against 1,272 with CPUs/instances spinning threads, which take the
        # cores gRPC and the event loop need. On the CPU: the CPUs divided among the runs.
        options.intra_op_num_threads = settings.intra_op_threads or (
            default_intra_op_threads(self.instances) if on_cpu else 1
        )
        options.inter_op_num_threads = settings.inter_op_threads
        # Spinning threads keep a core busy after every run: measured on 2 cores (see README), off
        # serves the small model faster and cuts p99; on a GPU see above. `on` is there to measure.
        spinning = "off" if settings.intra_op_spinning == "auto" else settings.intra_op_spinning
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning == "on" else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: provider fallbacks are reported by us, once
        provider_options = []
        for name in wanted:
            if name == "CUDAExecutionProvider":
                cuda = {
                    "device_id": str(settings.cuda_device_id),
                    "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
                }
                if settings.gpu_mem_limit_bytes:
                    cuda["gpu_mem_limit"] = str(settings.gpu_mem_limit_bytes)
                provider_options.append(cuda)
            elif name == "TensorrtExecutionProvider":
                provider_options.append({"device_id": str(settings.cuda_device_id)})
            else:
                provider_options.append({})
        self.session = ort.InferenceSession(
            path, sess_options=options, providers=wanted, provider_options=provider_options
        )
        self.providers = self.session.get_providers()
        if self.providers[0] != wanted[0]:
            log.warning("%s: asked for %s, got %s", path, wanted, self.providers)
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
