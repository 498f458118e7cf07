"""One settings object: command-line flags over CONVSERVE_* environment variables over defaults.

The `convserve serve` flags are derived from the fields (their help is the field's own).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any, Optional

from convserve.cpus import available_cpus
from convserve.sessions import SessionSettings


def _opt(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class Settings:
    # where models come from
    repository: str = _opt("model_repository", "model repository folder")
    version_policy: str = _opt("latest", "which versions to serve: latest, all, or specific:1,3")
    poll_interval: float = _opt(0.0, "rescan the repository every N seconds (0: never)")
    # network; 8001 and 8002 are Triton's numbers, so dashboards and habits carry over
    host: str = _opt("0.0.0.0", "address to listen on")
    grpc_port: int = _opt(8001, "gRPC port (0: any free port)")
    http_port: int = _opt(8000, "V2 HTTP/REST port, Triton's binary tensor extension included (0: off)")
    metrics_port: int = _opt(8002, "Prometheus /metrics port (0: off)")
    max_message_bytes: int = _opt(
        0, "largest gRPC message accepted or sent (0: what the served models' largest request and response need)"
    )
    tls_cert: str = _opt("", "PEM certificate chain: serve gRPC over TLS (with --tls-key)")
    tls_key: str = _opt("", "PEM private key of --tls-cert")
    tls_client_ca: str = _opt("", "PEM CA bundle: require client certificates signed by it (mutual TLS)")
    metrics_host: str = _opt("", "address of the metrics endpoint (default: --host)")
    metrics_require_token: int = _opt(0, "1: /metrics needs the auth token too (Prometheus: authorization credentials)")
    metrics_max_connections: int = _opt(
        64, "connections /metrics holds at once (more are closed at once; idle ones close after 10 s)"
    )
    auth_token: str = _opt(
        "",
        "require 'authorization: Bearer TOKEN' on every RPC but health "
        "(prefer CONVSERVE_AUTH_TOKEN: flags show in `ps`)",
    )
    # what a client may send
    image_formats: str = _opt("PNG,JPEG", "image formats the `image` input accepts (Pillow's names, comma list)")
    max_image_bytes: int = _opt(0, "largest encoded image accepted, in bytes (0: 3 per allowed pixel, at most 16 MiB)")
    max_image_pixels: int = _opt(
        0, "largest image accepted, in pixels, read from its header (0: 64x the model's input area, 1024² to 4096²)"
    )
    max_streams_per_connection: int = _opt(
        100, "RPCs one client connection may have in progress (HTTP/2 max concurrent streams; more wait at the client)"
    )
    max_stream_in_flight: int = _opt(
        32, "requests of one ModelStreamInfer in progress or unread; past it the stream is not read until answers are"
    )
    allow_timeout_override: int = _opt(
        0,
        "1: a request's `timeout` parameter (microseconds) bounds its time in the queue, as Triton's queue "
        "policy allow_timeout_override; 0 (Triton's default): ignored, the gRPC deadline still applies",
    )
    http_request_timeout: float = _opt(
        60.0,
        "seconds an HTTP/REST inference may take at most, its queue included (HTTP carries no deadline; gRPC "
        "requests bring their own); past it 504. 0: none",
    )
    http_max_connections: int = _opt(
        1024, "HTTP connections each front-end keeps open at once; past it a new one is closed at once, and counted"
    )
    http_head_timeout: float = _opt(
        10.0,
        "seconds an HTTP connection has to bring a complete request head (line and headers), when new and "
        "between requests; then it is closed",
    )
    http_body_timeout: float = _opt(60.0, "seconds an HTTP request has to bring its whole body; then 408")
    max_health_watches: int = _opt(
        64, "health Watch streams each front-end keeps open at once (health needs no token); past it RESOURCE_EXHAUSTED"
    )
    max_shm_regions: int = _opt(
        0, "system shared-memory regions that may be registered at once (0: a quarter of the open-file limit)"
    )
    shm_any_owner: int = _opt(
        0,
        "1: register shared-memory objects of any user, not only the server's own (any client may then "
        "read and write them, as in Triton)",
    )
    # batching
    max_batch_size: int = _opt(32, "most images per session run")
    max_queue_delay_ms: float = _opt(2.0, "longest a request waits for a fuller batch, only while another batch runs")
    max_queue_size: int = _opt(256, "requests that may wait per model version before RESOURCE_EXHAUSTED")
    # runtime
    providers: str = _opt("auto", "execution providers: auto, or a list of tensorrt, cuda, cpu in order")
    instances: Optional[int] = _opt(None, "concurrent session runs per model (default 1 on CPU, 2 on GPU)")
    # runs times threads never exceed the CPUs this process may use: oversubscribed cores only switch
    intra_op_threads: Optional[int] = _opt(
        None, "onnxruntime intra-op threads per run (default: CPUs / instances on CPU, 1 with a GPU provider)"
    )
    inter_op_threads: int = _opt(1, "onnxruntime inter-op threads per run")
    intra_op_spinning: str = _opt(
        "auto", "onnxruntime intra-op threads spin between runs: auto (off: measured faster on CPU and GPU), on, off"
    )
    cuda_device_id: int = _opt(0, "GPU to run on")
    cudnn_conv_algo_search: str = _opt(
        "HEURISTIC",
        "cuDNN convolution algorithm search: HEURISTIC (default: 4x the server's throughput of EXHAUSTIVE at 16 clients"
        " on an H200, same in-process speed), EXHAUSTIVE, DEFAULT",
    )
    gpu_mem_limit_bytes: int = _opt(0, "CUDA arena limit in bytes (0: none)")
    frontends: str = _opt(
        "auto",
        "front-end processes sharing the gRPC port (SO_REUSEPORT), all fed by one engine; "
        "auto: half the CPUs this process may use, 1 to 16",
    )
    arena_mib: int = _opt(
        256, "each front-end's shared memory for tensors in flight to and from the engine, MiB (taken as written)"
    )
    # lifecycle
    strict_readiness: int = _opt(
        1,
        "1 (Triton's default): a model that failed to load makes the server not ready (ServerReady false, "
        "health NOT_SERVING) until it loads or is unloaded; 0: ready while any model serves",
    )
    grace_period: float = _opt(30.0, "seconds to finish in-flight requests on SIGTERM")
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING, ERROR")

    def validate(self) -> Settings:
        if self.max_batch_size < 1 or self.max_queue_size < 1:
            raise ValueError("max_batch_size and max_queue_size must be at least 1")
        delays = (self.max_queue_delay_ms, self.poll_interval, self.grace_period, self.http_request_timeout)
        if min(delays) < 0 or min(self.http_head_timeout, self.http_body_timeout) <= 0 or self.http_max_connections < 1:
            raise ValueError(
                "delays, intervals and grace periods cannot be negative; HTTP timeouts and connections are positive"
            )
        if min(self.max_image_bytes, self.max_image_pixels, self.max_message_bytes) < 0 or not self.image_format_list():
            raise ValueError("limits cannot be negative (0: derived), and at least one image format must be accepted")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.metrics_require_token and not self.auth_token:
            raise ValueError("--metrics-require-token needs an auth token (CONVSERVE_AUTH_TOKEN)")
        bounds = (self.max_streams_per_connection, self.max_stream_in_flight, self.max_health_watches)
        if min(*bounds, self.metrics_max_connections) < 1:
            raise ValueError(
                "max_streams_per_connection, max_stream_in_flight, max_health_watches, metrics_max_connections: "
                "at least 1"
            )
        if self.frontends != "auto" and not (self.frontends.isdigit() and 1 <= int(self.frontends) <= 64):
            raise ValueError(f"frontends must be auto or 1 to 64, not {self.frontends!r}")
        if self.max_shm_regions < 0:
            raise ValueError("max_shm_regions cannot be negative (0: derived)")
        if self.arena_mib < 1:
            raise ValueError("arena_mib must be at least 1")
        if self.instances is not None and self.instances < 1:
            raise ValueError("instances must be at least 1")
        policy = self.version_policy
        if policy not in ("latest", "all") and not (
            policy.startswith("specific:")
            and all(v.strip().isdigit() for v in policy[len("specific:") :].split(",") if v.strip())
        ):
            raise ValueError(f"version_policy must be latest, all or specific:1,2 — not {policy!r}")
        if self.intra_op_spinning not in ("auto", "on", "off"):
            raise ValueError("intra_op_spinning must be auto, on or off")
        if self.cudnn_conv_algo_search not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
            raise ValueError("cudnn_conv_algo_search must be EXHAUSTIVE, HEURISTIC or DEFAULT")
        for name in self.provider_list():
            if name not in ("auto", "tensorrt", "cuda", "cpu"):
                raise ValueError(f"unknown provider {name!r}; use tensorrt, cuda, cpu or auto")
        return self

    def frontend_count(self) -> int:
        """--frontends as a number: `auto` is half the CPUs this process may use, at least 1, at most 16."""
        if self.frontends == "auto":
            return max(1, min(16, available_cpus() // 2))
        return int(self.frontends)

    def image_format_list(self) -> tuple[str, ...]:
        return tuple(f.strip().upper() for f in self.image_formats.split(",") if f.strip())

    def session_settings(self) -> SessionSettings:
        """What onnxruntime sessions are opened with (convserve.sessions)."""
        return SessionSettings(
            providers=tuple(self.provider_list()),
            instances=self.instances,
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            intra_op_spinning=self.intra_op_spinning,
            cuda_device_id=self.cuda_device_id,
            cudnn_conv_algo_search=self.cudnn_conv_algo_search,
            gpu_mem_limit_bytes=self.gpu_mem_limit_bytes,
        )

    def provider_list(self) -> list[str]:
        return [p.strip().lower() for p in self.providers.split(",") if p.strip()]

    def specific_versions(self) -> list[int]:
        return [int(v) for v in self.version_policy[len("specific:") :].split(",") if v.strip()]


def _kind(f: Field) -> type:
    # annotations are strings here (from __future__ import annotations)
    return {"int": int, "float": float, "Optional[int]": int}.get(str(f.type), str)


def from_sources(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags win over CONVSERVE_<NAME> variables, which win over the defaults."""
    if environ is None:
        environ = os.environ
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
