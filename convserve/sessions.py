"""How convserve opens an onnxruntime session: the providers, the threads and the provider options,
from a handful of settings. The engine opens one per model version (service/engine/runtime.py); the
benchmark opens the same to measure the in-process limit, without importing the server.

`SessionSettings()`'s defaults are `convserve serve`'s (a test holds them equal to
`Settings().session_settings()`). onnxruntime is imported where a session is opened, not here: the
settings (which every process reads, front-ends too) name this module's dataclass.
"""

from __future__ import annotations

import ctypes.util
import glob
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from convserve.cpus import available_cpus

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


@dataclass(frozen=True)
class SessionSettings:
    providers: tuple[str, ...] = ("auto",)  # "auto", or names of PROVIDER_NAMES in order
    instances: Optional[int] = None  # concurrent runs (default 1 on CPU, 2 on GPU)
    intra_op_threads: Optional[int] = None  # per run (default: CPUs / instances on CPU, 1 with a GPU provider)
    inter_op_threads: int = 1
    intra_op_spinning: str = "auto"  # auto (off), on, off
    cuda_device_id: int = 0
    cudnn_conv_algo_search: str = "HEURISTIC"
    gpu_mem_limit_bytes: int = 0  # 0: none


def gpu_present() -> bool:
    """An NVIDIA device and driver on this machine (cheap: no CUDA initialisation)."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or (
        ctypes.util.find_library("cuda") is not None and os.path.exists("/proc/driver/nvidia")
    )


def requested_providers(names: tuple[str, ...] | list[str]) -> list[str]:
    """onnxruntime provider names to ask for, in order.

    `auto` asks for CUDA (and TensorRT where its library is installed) only when a GPU is present:
    onnxruntime-gpu lists CUDA as available on any machine and fails loudly when asked for it on
    one without a GPU.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    names = list(names)
    if names == ["auto"]:
        names = []
        if gpu_present():
            if ctypes.util.find_library("nvinfer"):
                names.append("tensorrt")
            names.append("cuda")
        names.append("cpu")
    wanted = [PROVIDER_NAMES[n] for n in names if PROVIDER_NAMES[n] in available]
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    return wanted


def default_intra_op_threads(instances: int) -> int:
    """Threads per session run so that `instances` concurrent runs fill the CPUs, never more."""
    return max(1, available_cpus() // max(1, instances))


def _preload_gpu_libraries() -> None:
    import onnxruntime as ort

    # onnxruntime-gpu >= 1.21 can load CUDA and cuDNN from the nvidia-* pip packages
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # a machine without them still serves on the CPU
            log.debug("onnxruntime.preload_dlls failed: %s", exc)


def instances_of(settings: SessionSettings, wanted: list[str]) -> int:
    return settings.instances or (2 if "CUDAExecutionProvider" in wanted else 1)


def open_session(path: str, settings: SessionSettings) -> onnxruntime.InferenceSession:
    """The session for the model file at `path`."""
    import onnxruntime as ort

    wanted = requested_providers(settings.providers)
    if any(p != "CPUExecutionProvider" for p in wanted):
        _preload_gpu_libraries()
    options = ort.SessionOptions()
    on_cpu = wanted == ["CPUExecutionProvider"]
    # With a GPU provider the graph runs on the device and the CPU threads only feed it: one
    # intra-op thread per run, not spinning. Measured on an H200 (16 cores, AlexNet, shm, 64
    # clients): 1,537 img/s against 1,272 with CPUs/instances spinning threads, which take the
    # cores gRPC and the event loop need. On the CPU: the CPUs divided among the runs.
    options.intra_op_num_threads = settings.intra_op_threads or (
        default_intra_op_threads(instances_of(settings, wanted)) if on_cpu else 1
    )
    options.inter_op_num_threads = settings.inter_op_threads
    # Spinning threads keep a core busy after every run: measured on 2 cores (see README), off
    # serves the small model faster and cuts p99; on a GPU see above. `on` is there to measure.
    spinning = "off" if settings.intra_op_spinning == "auto" else settings.intra_op_spinning
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning == "on" else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: provider fallbacks are reported by the caller, once
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
    session = ort.InferenceSession(path, sess_options=options, providers=wanted, provider_options=provider_options)
    if session.get_providers()[0] != wanted[0]:
        log.warning("%s: asked for %s, got %s", path, wanted, session.get_providers())
    return session
