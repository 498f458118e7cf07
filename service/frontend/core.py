"""What both doors call: the server's calls as plain data, no protocol in them.

Runs in each front-end. The gRPC door (frontend/grpc) and the HTTP door (frontend/http) each read
their own wire format, call one method here, and write the answer back in their own format; neither
knows the other. The answers are V2's data as plain Python: dicts shaped as V2's JSON (KServe names
the same fields for both protocols; gRPC's door turns them into its messages), an `InferResult` for
inference. Errors are the domain errors of `..errors`; each door maps them with its own table
(`status_of`, `http_status_of`).

Every call records one `Outcome`, named as the V2 gRPC method it is, through `observe` here: so
Prometheus and the statistics count a call the same whichever door it came through. Inference is
the one call a door opens itself (`inference`), since its parsing, in the door, is part of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

from convserve import __version__
from convserve.contract import IMAGE_INPUT_NAME, PLATFORM

from ..errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    NotFound,
    ServingError,
    ShuttingDown,
    Unimplemented,
)
from ..rules import check_model_name
from ..settings import Settings
from .dataplane import DataPlane
from .engine_link import EngineLink
from .inference import DEFAULT_INPUTS, InferRequest, InferResult, ModelInputs
from .introspection import describe, read_filters
from .models import ModelTable
from .observe import Outcome, Recorder, log_settings, set_log_settings
from .preprocess import ImageDecodeError, preprocessed_png

# What this server serves, by Triton's extension names (its own last); not listed: sequence,
# schedule_policy's priority levels, cuda_shared_memory (its register is not implemented)
EXTENSIONS = [
    "classification",
    "model_repository",
    "model_configuration",
    "system_shared_memory",
    "binary_tensor_data",
    "parameters",
    "statistics",
    "trace",
    "logging",
    "convserve_feature_maps",
]
# The log settings that can be set, with the Python type of each (Triton's names)
LOG_SETTING_TYPES: dict[str, type] = {
    "log_info": bool,
    "log_warning": bool,
    "log_error": bool,
    "log_verbose_level": int,
}
# Triton's trace settings as a server without tracing has them; only "tracing off" can be set.
TRACE_SETTINGS = {
    "trace_level": ["OFF"],
    "trace_rate": ["1000"],
    "trace_count": ["-1"],
    "log_frequency": ["0"],
    "trace_file": [""],
    "trace_mode": ["triton"],
}
# CUDA shared memory needs cudaIpc handles opened on a GPU; it is not built until it can be tested there.
_NO_CUDA_SHM = "CUDA shared memory is not supported by this server yet; use system shared memory"


class ServerState(enum.Enum):
    STARTING = "starting"  # listening, loading the repository
    READY = "ready"  # the first scan is done
    STOPPING = "stopping"  # refusing new requests, finishing those in flight


def _log_value_fits(kind: type | None, value: Any) -> bool:
    """A switch takes a boolean; the verbose level a non-negative integer (and not a boolean)."""
    if kind is bool:
        return isinstance(value, bool)
    return kind is int and isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _counted(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


class FrontendCore:
    def __init__(
        self,
        models: ModelTable,
        engine: EngineLink,
        dataplane: DataPlane,
        settings: Settings,
        server_state: Callable[[], ServerState],
        recorder: Recorder,
        identity: str = "",
    ) -> None:
        self.models = models
        self.engine = engine
        self.dataplane = dataplane
        self.settings = settings
        self.server_state = server_state
        self.recorder = recorder
        self.identity = identity  # "i/N": the front-end, named with statistics (they are every front-end's)

    def observe(self, method: str, model: str = "") -> contextlib.AbstractContextManager[Outcome]:
        """One call's Outcome, recorded when the block ends; its status is what escapes the block (the
        recorder's own context, not one more around it: inference enters this on every request)."""
        return self.recorder.observe(Outcome(method, model))

    @contextlib.contextmanager
    def inference(self, method: str, model: str) -> Iterator[Outcome]:
        """An inference call, observed from before the door parses it; refused while stopping."""
        with self.observe(method, model) as outcome:
            if self.server_state() is ServerState.STOPPING:
                raise ShuttingDown("the server is shutting down")
            yield outcome

    # ---- health and metadata -------------------------------------------------------------------

    def live(self) -> bool:
        with self.observe("ServerLive"):
            return True

    def ready(self) -> bool:
        with self.observe("ServerReady"):
            return (
                self.server_state() is ServerState.READY
                and self.engine.connected
                and bool(self.models.ready_models())
                and not self.models.failed  # only with --strict-readiness does the engine report them
            )

    def model_ready(self, name: str, version: str = "") -> bool:
        with self.observe("ModelReady", name):
            try:
                self.models.resolve(name, version)
            except InvalidInput:
                raise  # a version that is no number is an error, not "not ready"
            except ServingError:  # unknown (an empty name, version "0" too) or not ready: ready=false
                return False
            return self.server_state() is not ServerState.STOPPING and self.engine.connected

    def served(self, name: str, version: str = "") -> ModelInputs:
        """What `name` (version) takes; raises what inference of it would meet first: an unknown model
        or version (NOT_FOUND), one not ready (UNAVAILABLE), a version that is no number (INVALID_ARGUMENT)."""
        model = self.models.resolve(name, version)
        return ModelInputs(model.input_name, model.card.image_input)

    def inputs_of(self, name: str, version: str = "") -> ModelInputs:
        """What `name` (version) takes, for the door's parse; a model that cannot be served gets
        convserve's own inputs, and its error comes where it always has (after the parse)."""
        try:
            return self.served(name, version)
        except ServingError:
            return DEFAULT_INPUTS

    def server_metadata(self) -> dict[str, Any]:
        with self.observe("ServerMetadata"):
            return {"name": "convserve", "version": __version__, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        with self.observe("ModelMetadata", name):
            model = self.models.resolve(name, version)
            return {
                "name": model.name,
                "versions": [str(m.version) for m in self.models.served_versions(model.name)],
                "platform": PLATFORM,
                # the config's dims with the batch dimension in front, as Triton reports them
                "inputs": [
                    {"name": model.input_name, "datatype": "FP32", "shape": [-1, *model.input_shape]},
                    *(
                        [{"name": IMAGE_INPUT_NAME, "datatype": "BYTES", "shape": [-1, 1]}]
                        if model.card.image_input
                        else []
                    ),
                ],
                "outputs": [
                    {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)} for o in model.card.outputs
                ],
            }

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        """The model's configuration as Triton's JSON has it (model_config.proto's field names)."""
        with self.observe("ModelConfig", name):
            model = self.models.resolve(name, version)
            s = self.settings
            gpu = model.execution_provider != "CPUExecutionProvider"
            policy: dict[str, Any] = {"latest": {"num_versions": 1}}
            if s.version_policy == "all":
                policy = {"all": {}}
            elif s.version_policy.startswith("specific:"):
                policy = {"specific": {"versions": list(s.specific_versions())}}
            group: dict[str, Any] = {
                "name": f"{model.name}_0",  # Triton's name for a model's first (unnamed) group
                "kind": "KIND_GPU" if gpu else "KIND_CPU",
                "count": model.instances,
                "gpus": [s.cuda_device_id] if gpu else [],
                "secondary_devices": [],
                "profile": [],
                "passive": False,
                "host_policy": "",
            }
            parameters = {
                "execution_provider": model.execution_provider,
                "providers": ",".join(model.providers),
                "precision": model.card.precision,  # as exported: fp32, fp16 or int8
                "max_queue_size": str(s.max_queue_size),
                # what a request that names no outputs gets (Triton would send every output: feature
                # maps are megabytes, so convserve sends them only when asked for by name)
                "default_outputs": ",".join(model.card.default_outputs),
            }
            tensor = {"is_shape_tensor": False, "is_non_linear_format_io": False}
            # every field Triton's JSON has, defaults included, in its order
            return {
                "name": model.name,
                "platform": PLATFORM,
                "backend": "onnxruntime",
                "runtime": "",
                "version_policy": policy,
                "max_batch_size": s.max_batch_size,
                # two alternatives where images are taken: a request carries one of them, so each is
                # optional; a model that takes only its tensor requires it
                "input": [
                    {
                        "name": model.input_name,
                        "data_type": "TYPE_FP32",
                        "format": "FORMAT_NCHW",
                        "dims": list(model.input_shape),
                        **tensor,
                        "allow_ragged_batch": False,
                        "optional": model.card.image_input,
                    },
                    *(
                        [
                            {
                                "name": IMAGE_INPUT_NAME,
                                "data_type": "TYPE_STRING",
                                "format": "FORMAT_NONE",
                                "dims": [1],
                                **tensor,
                                "allow_ragged_batch": False,
                                "optional": True,
                            }
                        ]
                        if model.card.image_input
                        else []
                    ),
                ],
                "output": [
                    {"name": o.name, "data_type": "TYPE_FP32", "dims": list(o.shape[1:]), "label_filename": ""} | tensor
                    for o in model.card.outputs
                ],
                "batch_input": [],
                "batch_output": [],
                "optimization": {
                    "priority": "PRIORITY_DEFAULT",
                    "input_pinned_memory": {"enable": True},
                    "output_pinned_memory": {"enable": True},
                    "gather_kernel_buffer_threshold": 0,
                    "eager_batching": False,
                },
                "dynamic_batching": {
                    "preferred_batch_size": [s.max_batch_size],  # a batch runs at once when this full
                    "max_queue_delay_microseconds": int(s.max_queue_delay_ms * 1000),
                    "preserve_ordering": False,
                    "priority_levels": 0,
                    "default_priority_level": 0,
                    # the queue is bounded; a request's `timeout` parameter is honoured
                    "default_queue_policy": {
                        "timeout_action": "REJECT",
                        "default_timeout_microseconds": 0,
                        "allow_timeout_override": True,
                        "max_queue_size": s.max_queue_size,
                    },
                    "priority_queue_policy": {},
                },
                "instance_group": [group],
                "default_model_filename": "model.onnx",
                "cc_model_filenames": {},
                "metric_tags": {},
                "parameters": {key: {"string_value": value} for key, value in parameters.items()},
                "model_warmup": [],
            }

    async def statistics(self, name: str = "", version: str = "") -> dict[str, Any]:
        """Triton's statistics for one model (version) or all: the engine's, the same from every front-end."""
        with self.observe("ModelStatistics", name):
            if name or version:
                try:
                    self.models.resolve(name, version)
                except (ModelNotFound, ModelNotReady) as exc:  # Triton: INVALID_ARGUMENT for statistics
                    raise InvalidInput(str(exc)) from None
            wanted = int(version) if name and version else None
            return {"model_stats": [_statistics(s) for s in await self.engine.call("statistics", name, wanted)]}

    # ---- repository ------------------------------------------------------------------------------

    async def repository_index(self, repository: str = "", ready: bool = False) -> list[dict[str, Any]]:
        with self.observe("RepositoryIndex"):
            if repository:
                raise Unimplemented("convserve serves one repository: RepositoryIndex takes no repository_name")
            return [
                {"name": name, "version": version, "state": state, "reason": reason}
                for name, version, state, reason in await self.engine.call("index")
                if not ready or state == "READY"
            ]

    async def load(self, name: str, overrides: Sequence[str] = ()) -> None:
        """Load (or reload) a model; `overrides`: the names of the parameters the request carried."""
        with self.observe("RepositoryModelLoad", name):
            refused = sorted(k for k in overrides if k == "config" or k.startswith("file:"))
            if refused:  # Triton would apply them; convserve cannot, and says so rather than ignore them
                raise Unimplemented(
                    f"RepositoryModelLoad with {', '.join(refused)} is not supported: convserve loads the "
                    "model folder as exported, and its settings are `convserve serve` flags"
                )
            check_model_name(name)
            # the answer carries the new table: this front-end answers from it at once (the others
            # get it in the engine's broadcast)
            self.models.update(await self.engine.call("load", name))

    async def unload(self, name: str) -> None:
        with self.observe("RepositoryModelUnload", name):
            check_model_name(name)
            self.models.update(await self.engine.call("unload", name))

    # ---- logging and tracing (Triton's extensions) -----------------------------------------------

    def log_settings(self, updates: Mapping[str, Any]) -> dict[str, Any]:
        """Set (any of) what the server logs, by Triton's keys, and answer every setting."""
        with self.observe("LogSettings"):
            changes: dict[str, bool | int] = {}
            for key, value in updates.items():
                if _log_value_fits(LOG_SETTING_TYPES.get(key), value):
                    changes[key] = value
                elif key == "log_file" and isinstance(value, str):
                    if value:
                        raise Unimplemented(
                            "log_file: convserve logs to stderr; redirect it (or let the container log it)"
                        )
                elif key == "log_format" and isinstance(value, str):
                    if value != "default":
                        raise Unimplemented(f"log_format {value[:32]!r}: only 'default' is implemented")
                elif key not in LOG_SETTING_TYPES and key not in ("log_file", "log_format"):
                    continue  # as Triton: a key it does not know is ignored
                else:
                    raise InvalidInput(f"log setting {key!r}: a value of the wrong type ({type(value).__name__})")
            if changes:
                set_log_settings(**changes)
            return log_settings()

    def trace_settings(self, model: str, updates: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        with self.observe("TraceSetting", model):
            if model:
                try:
                    self.models.resolve(model)
                except (ModelNotFound, ModelNotReady) as exc:  # Triton 2.51: INVALID_ARGUMENT here
                    raise InvalidInput(str(exc)) from None
            for key, values in updates.items():
                if key not in TRACE_SETTINGS:
                    raise InvalidInput(f"unknown trace setting {key[:64]!r}")
                if list(values) not in ([], TRACE_SETTINGS[key]):
                    raise Unimplemented("tracing is not implemented: trace settings can be read, and set only to off")
            return {key: list(values) for key, values in TRACE_SETTINGS.items()}

    # ---- shared memory ---------------------------------------------------------------------------

    async def shm_register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        with self.observe("SystemSharedMemoryRegister"):
            await self.engine.call("shm_register", name, key, offset, byte_size)

    async def shm_status(self, name: str = "") -> list[dict[str, Any]]:
        with self.observe("SystemSharedMemoryStatus"):
            return [
                {"name": n, "key": key, "offset": offset, "byte_size": size}
                for n, key, offset, size in await self.engine.call("shm_status", name)
            ]

    async def shm_unregister(self, name: str = "") -> None:
        with self.observe("SystemSharedMemoryUnregister"):
            await self.engine.call("shm_unregister", name)

    def cuda_shm_register(self) -> None:
        with self.observe("CudaSharedMemoryRegister"):
            raise Unimplemented(_NO_CUDA_SHM)

    def cuda_shm_status(self, name: str = "") -> list[dict[str, Any]]:
        with self.observe("CudaSharedMemoryStatus"):
            # no CUDA region can be registered: none to report (perf_analyzer asks while it cleans up)
            if name:
                raise NotFound(f"no CUDA shared-memory region {name[:64]!r} is registered")
            return []

    def cuda_shm_unregister(self) -> None:
        with self.observe("CudaSharedMemoryUnregister"):
            pass  # idempotent, as the system one: nothing to forget

    # ---- inference -------------------------------------------------------------------------------

    async def infer(self, request: InferRequest, outcome: Outcome, deadline: Optional[float]) -> InferResult:
        """Run a request the door parsed inside `inference`; `deadline` in time.monotonic() seconds."""
        return await self.dataplane.infer(request, outcome, deadline)

    # ---- convserve's own calls: what a model is, and what it sees -------------------------------

    def describe_model(self, name: str, version: str = "") -> dict[str, Any]:
        with self.observe("DescribeModel", name):
            return describe(self.models.resolve(name, version))

    async def layer_filters(self, name: str, version: str, feature_map: str) -> dict[str, Any]:
        with self.observe("LayerFilters", name):
            return await read_filters(self.models.resolve(name, version), feature_map)

    async def preprocessed(self, name: str, version: str, image: bytes) -> bytes:
        """An image (PNG or JPEG) as the model sees it: a PNG after its card's preprocessing (the ink
        step, the resize, the colour mode; before the mean and std), as inference decodes it."""
        with self.observe("Preprocess", name):
            model = self.models.resolve(name, version)
            try:
                return await asyncio.to_thread(preprocessed_png, image, model.card.preprocess, model.image_limits)
            except ImageDecodeError as exc:
                raise InvalidInput(f"image: {exc}") from None


def _statistics(s: dict[str, Any]) -> dict[str, Any]:
    """One version's statistics, from the engine's counts, as Triton's ModelStatistics has them."""
    successes = s["success_count"]
    return {
        "name": s["name"],
        "version": str(s["version"]),
        "last_inference": s["last_inference_ms"],
        "inference_count": s["inference_count"],
        "execution_count": s["execution_count"],
        "inference_stats": {
            "success": _counted(successes, s["success_ns"]),
            "fail": _counted(s["fail_count"], s["fail_ns"]),
            "queue": _counted(successes, s["queue_ns"]),
            "compute_input": _counted(successes, s["preprocess_ns"]),
            # per request, as Triton counts them: each request carries its batch's run time
            "compute_infer": _counted(successes, s["request_compute_ns"]),
            "compute_output": _counted(successes, s["postprocess_ns"]),
            # no response cache: never a hit, never a miss
            "cache_hit": _counted(0, 0),
            "cache_miss": _counted(0, 0),
        },
        "response_stats": {},  # per response of a decoupled model: none here
        "batch_stats": [  # per execution of each batch size
            {
                "batch_size": size,
                "compute_input": _counted(count, input_ns),
                "compute_infer": _counted(count, infer_ns),
                "compute_output": _counted(count, output_ns),
            }
            for size, (count, input_ns, infer_ns, output_ns) in sorted(s["batches"].items())
        ],
        "memory_usage": [],  # Triton's backends that report it are TensorRT's and PyTorch's
    }
