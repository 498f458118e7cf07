"""One settings object: command-line flags over CONVSERVE_* environment variables over defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import Field, dataclass, fields
from typing import Optional

_CORES = os.cpu_count() or 1


@dataclass
class Settings:
    # where models come from
    repository: str = "model_repository"
    version_policy: str = "latest"          # latest | all | specific:1,3
    poll_interval: float = 0.0              # seconds between repository rescans; 0: never
    # network
    host: str = "0.0.0.0"
    grpc_port: int = 8001                   # Triton's numbers, so dashboards and habits carry over
    metrics_port: int = 8002                # 0: no metrics endpoint
    max_message_bytes: int = 256 * 1024 * 1024
    auth_token: str = ""                    # when set, RPCs (but health) need "authorization: Bearer <token>"
    # batching
    max_batch_size: int = 32                # images per session run
    max_queue_delay_ms: float = 2.0         # only ever waited while another batch runs (see batcher)
    max_queue_size: int = 256               # requests waiting per model version; past it RESOURCE_EXHAUSTED
    # runtime
    providers: str = "auto"                 # auto | comma list of tensorrt, cuda, cpu
    instances: Optional[int] = None         # concurrent session runs per model; default 1 on CPU, 2 on GPU
    intra_op_threads: Optional[int] = None  # default: cores // instances, so runs never oversubscribe cores
    inter_op_threads: int = 1
    cuda_device_id: int = 0
    cudnn_conv_algo_search: str = "EXHAUSTIVE"   # EXHAUSTIVE | HEURISTIC | DEFAULT
    gpu_mem_limit_bytes: int = 0            # 0: no limit
    # lifecycle
    grace_period: float = 30.0              # seconds to finish in-flight requests on SIGTERM
    log_level: str = "INFO"

    def validate(self) -> "Settings":
        if self.max_batch_size < 1 or self.max_queue_size < 1:
            raise ValueError("max_batch_size and max_queue_size must be at least 1")
        if self.max_queue_delay_ms < 0 or self.poll_interval < 0 or self.grace_period < 0:
            raise ValueError("delays, intervals and grace periods cannot be negative")
        if self.instances is not None and self.instances < 1:
            raise ValueError("instances must be at least 1")
        policy = self.version_policy
        if policy not in ("latest", "all") and not (policy.startswith("specific:") and all(
                v.strip().isdigit() for v in policy[len("specific:"):].split(",") if v.strip())):
            raise ValueError(f"version_policy must be latest, all or specific:1,2 — not {policy!r}")
        if self.cudnn_conv_algo_search not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
            raise ValueError("cudnn_conv_algo_search must be EXHAUSTIVE, HEURISTIC or DEFAULT")
        for name in self.provider_list():
            if name not in ("auto", "tensorrt", "cuda", "cpu"):
                raise ValueError(f"unknown provider {name!r}; use tensorrt, cuda, cpu or auto")
        return self

    def provider_list(self) -> list[str]:
        return [p.strip().lower() for p in self.providers.split(",") if p.strip()]

    def specific_versions(self) -> list[int]:
        return [int(v) for v in self.version_policy[len("specific:"):].split(",") if v.strip()]


_HELP = {
    "repository": "model repository folder",
    "version_policy": "which versions to serve: latest, all, or specific:1,3",
    "poll_interval": "rescan the repository every N seconds (0: never)",
    "host": "address to listen on",
    "grpc_port": "gRPC port (0: any free port)",
    "metrics_port": "Prometheus /metrics port (0: off)",
    "max_message_bytes": "largest gRPC message accepted or sent",
    "auth_token": "require 'authorization: Bearer TOKEN' on every RPC but health (prefer CONVSERVE_AUTH_TOKEN)",
    "max_batch_size": "most images per session run",
    "max_queue_delay_ms": "longest a request waits for a fuller batch, only while another batch runs",
    "max_queue_size": "requests that may wait per model version before RESOURCE_EXHAUSTED",
    "providers": "execution providers: auto, or a list of tensorrt, cuda, cpu in order",
    "instances": "concurrent session runs per model (default 1 on CPU, 2 on GPU)",
    "intra_op_threads": "onnxruntime intra-op threads per run (default cores / instances)",
    "inter_op_threads": "onnxruntime inter-op threads per run",
    "cuda_device_id": "GPU to run on",
    "cudnn_conv_algo_search": "cuDNN convolution algorithm search: EXHAUSTIVE, HEURISTIC, DEFAULT",
    "gpu_mem_limit_bytes": "CUDA arena limit in bytes (0: none)",
    "grace_period": "seconds to finish in-flight requests on SIGTERM",
    "log_level": "DEBUG, INFO, WARNING, ERROR",
}


def _kind(f: Field) -> type:
    # annotations are strings here (from __future__ import annotations)
    return {"int": int, "float": float, "Optional[int]": int}.get(str(f.type), str)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (--grpc-port ...), all defaulting to None so the environment can fill in."""
    for f in fields(Settings):
        parser.add_argument("--" + f.name.replace("_", "-"), type=_kind(f), default=None, help=_HELP.get(f.name))


def from_sources(args: argparse.Namespace | None = None, environ: dict | None = None) -> Settings:
    """Flags win over CONVSERVE_<NAME> variables, which win over the defaults."""
    environ = os.environ if environ is None else environ
    values = {}
    for f in fields(Settings):
        kind = _kind(f)
        flag = getattr(args, f.name, None) if args is not None else None
        env = environ.get("CONVSERVE_" + f.name.upper())
        if flag is not None:
            values[f.name] = flag
        elif env not in (None, ""):
            try:
                values[f.name] = kind(env)
            except ValueError:
                raise ValueError(f"CONVSERVE_{f.name.upper()}={env!r} is not a valid {kind.__name__}") from None
    return Settings(**values).validate()


def default_intra_op_threads(instances: int) -> int:
    return max(1, _CORES // max(1, instances))


