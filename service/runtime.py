"""One onnxruntime session per model version: providers from settings, a warm-up run, `run`.

Knows nothing of gRPC or batching. `run` blocks (onnxruntime releases the GIL while it computes),
so callers hand it to an executor.
"""

from __future__ import annotations

import ctypes.util
import glob
import logging
import os

import numpy as np
import onnxruntime as ort

from .settings import Settings, default_intra_op_threads

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
        options.intra_op_num_threads = settings.intra_op_threads or default_intra_op_threads(self.instances)
        options.inter_op_num_threads = settings.inter_op_threads
        # Spinning intra-op threads keep a core busy after every run. On a CPU provider that core is
        # the one the event loop and gRPC need between runs: measured on 2 cores (see README), off
        # serves the small model faster and cuts p99; with a GPU provider the CPU threads only feed
        # the device, and spinning shortens the hand-off.
        spinning = settings.intra_op_spinning
        if spinning == "auto":
            spinning = "off" if wanted == ["CPUExecutionProvider"] else "on"
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

    @property
    def execution_provider(self) -> str:
        """The provider that runs the graph (the first the session really got)."""
        return self.providers[0]

    def run(self, batch: np.ndarray, output_names: list[str]) -> list[np.ndarray]:
        """float32 (N, C, H, W) -> the named outputs, each (N, ...)."""
        return self.session.run(output_names, {self.input_name: batch})

    def warm_up(self, input_shape: tuple[int, ...], batch_sizes=(1, 2)) -> None:
        """Run every output once per batch size, so the first request pays no allocation or tuning."""
        for size in batch_sizes:
            outputs = self.run(np.zeros((size, *input_shape), dtype=np.float32), self.output_names)
            for name, value in zip(self.output_names, outputs):
                if not np.all(np.isfinite(value)):
                    raise ValueError(f"warm-up output {name} is not finite")
