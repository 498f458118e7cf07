"""The model repository as the server sees it: name/version -> loaded, validated model version.

A version is validated before it serves: model.json parses, model.onnx matches its sha256, the
session loads, a warm-up run gives finite outputs. A version that fails stays out with its reason
(RepositoryIndex shows it) and the version already serving keeps serving. A retired version takes
no new requests, finishes those it holds, then releases its session.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

from models.repository import is_valid_name
from models.repository import versions as versions_on_disk
from .batcher import Batcher, BatchStats
from .errors import InvalidInput, LoadFailed, ModelNotFound, ModelNotReady
from .metrics import METRICS
from .preprocess import PreprocessSpec, preprocess_encoded
from .runtime import ModelRuntime
from .settings import Settings

log = logging.getLogger(__name__)


def check_model_name(name: str) -> str:
    """Refuse names that could reach outside the repository ('..', separators, absolute paths)."""
    if not is_valid_name(name):
        raise InvalidInput(f"invalid model name {name!r}")
    return name


def parse_version(version: str) -> Optional[int]:
    """'' -> None (the served default); '3' -> 3; anything else is refused."""
    if version in ("", None):
        return None
    if not version.isdigit() or len(version) > 18:
        raise InvalidInput(f"invalid model version {version!r}: a positive integer, or empty for the default")
    return int(version)


@dataclass
class VersionStats:
    """Cumulative counts and durations (ns) for ModelStatistics."""
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    preprocess_ns: int = 0
    compute_ns: int = 0
    postprocess_ns: int = 0
    inference_count: int = 0     # images
    execution_count: int = 0     # batches
    last_inference_ms: int = 0
    batches: dict = field(default_factory=dict)   # batch size -> [count, compute ns]

    def record_batch(self, stats: BatchStats) -> None:
        self.execution_count += 1
        self.inference_count += stats.batch_size
        self.compute_ns += stats.compute_ns
        self.queue_ns += sum(stats.queue_ns)
        entry = self.batches.setdefault(stats.batch_size, [0, 0])
        entry[0] += 1
        entry[1] += stats.compute_ns
        self.last_inference_ms = int(time.time() * 1000)


class ModelVersion:
    """One validated version: its model.json, runtime session and batcher."""

    def __init__(self, name: str, version: int, path: str, meta: dict, runtime: ModelRuntime) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.meta = meta
        self.runtime = runtime
        # what the session really got; kept after retire() drops the session, for requests still answering
        self.execution_provider = runtime.execution_provider
        self.providers = list(runtime.providers)
        self.instances = runtime.instances
        self.labels: list[str] = meta["labels"]
        self.spec = PreprocessSpec.from_dict(meta["preprocess"])
        self.input_shape = (self.spec.channels, self.spec.height, self.spec.width)
        self.outputs = {o["name"]: o for o in meta["outputs"]}
        self.feature_maps = {f["name"] for f in meta.get("feature_maps", [])}
        self.stats = VersionStats()
        self.batcher: Optional[Batcher] = None
        self.state = "READY"

    def start(self, executor: Executor, settings: Settings) -> None:
        model_label = self.name

        def on_batch(stats: BatchStats) -> None:
            self.stats.record_batch(stats)
            METRICS.batch_size.labels(model_label).observe(stats.batch_size)
            METRICS.compute_duration.labels(model_label).observe(stats.compute_ns / 1e9)
            METRICS.images.labels(model_label).inc(stats.batch_size)
            for queued in stats.queue_ns:
                METRICS.queue_duration.labels(model_label).observe(queued / 1e9)

        self.batcher = Batcher(self.runtime.run, executor, output_order=self.runtime.output_names,
                               max_batch_size=settings.max_batch_size,
                               max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
                               max_queue_size=settings.max_queue_size, instances=self.instances,
                               on_batch=on_batch)

    async def retire(self) -> None:
        """No new requests; finish the queued ones; release the session."""
        self.state = "UNLOADING"
        if self.batcher is not None:
            await self.batcher.close()
        self.state = "UNAVAILABLE"
        self.runtime = None   # type: ignore[assignment]  # drops the session and its memory


def validate_version(path: str, name: str, version: int, settings: Settings) -> ModelVersion:
    """Load and check one version folder (blocking: run it in an executor). Raises LoadFailed."""
    try:
        with open(os.path.join(path, "model.json")) as handle:
            meta = json.load(handle)
        for key in ("labels", "preprocess", "outputs", "onnx"):
            if key not in meta:
                raise LoadFailed(f"model.json has no {key!r}")
        digest = hashlib.sha256()
        with open(os.path.join(path, "model.onnx"), "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != meta["onnx"]["sha256"]:
            raise LoadFailed("model.onnx does not match the sha256 in model.json")
        runtime = ModelRuntime(os.path.join(path, "model.onnx"), settings)
        model = ModelVersion(name, version, path, meta, runtime)
        missing = set(model.outputs) - set(runtime.output_names)
        if missing:
            raise LoadFailed(f"model.onnx lacks outputs {sorted(missing)} that model.json names")
        runtime.warm_up(model.input_shape)
        # decode one image too: checks the preprocessing spec and loads PIL's codecs before a client waits
        preprocess_encoded([_blank_png(model.spec)], model.spec)
        return model
    except LoadFailed:
        raise
    except FileNotFoundError as exc:
        raise LoadFailed(f"missing {os.path.basename(exc.filename or '?')}") from None
    except json.JSONDecodeError as exc:
        raise LoadFailed(f"model.json is not valid JSON ({exc.msg})") from None
    except Exception as exc:
        raise LoadFailed(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


class Registry:
    """Every model version the server knows: served ones, and the failed ones with their reasons."""

    def __init__(self, settings: Settings, on_change: Optional[Callable[[], None]] = None) -> None:
        self.settings = settings
        self.repository = os.path.abspath(settings.repository)
        self.served: dict[str, dict[int, ModelVersion]] = {}
        self.failed: dict[tuple[str, int], tuple[str, float]] = {}   # (name, version) -> (reason, mtime)
        self.loading: set[tuple[str, int]] = set()
        self.unloaded: set[str] = set()      # names unloaded on request: scans leave them alone
        # Session runs: the batchers bound how many run at once; threads that wait cost nothing.
        self.run_executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="onnxruntime")
        self.load_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        self._lock = asyncio.Lock()
        self._on_change = on_change or (lambda: None)

    # ---- lookups -----------------------------------------------------------------------------

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        """The version to serve a request for name/version; raises ModelNotFound / ModelNotReady."""
        check_model_name(name)
        wanted = parse_version(version)
        versions = self.served.get(name)
        if not versions:
            if any(key[0] == name for key in self.failed) or any(key[0] == name for key in self.loading):
                raise ModelNotReady(f"model {name!r} is not ready")
            raise ModelNotFound(f"unknown model {name!r}")
        if wanted is None:
            ready = [m for v, m in versions.items() if m.state == "READY"]
            if not ready:
                raise ModelNotReady(f"model {name!r} has no ready version")
            return max(ready, key=lambda m: m.version)
        model = versions.get(wanted)
        if model is None:
            raise ModelNotFound(f"model {name!r} has no served version {wanted}")
        if model.state != "READY":
            raise ModelNotReady(f"model {name!r} version {wanted} is {model.state.lower()}")
        return model

    def ready_models(self) -> list[ModelVersion]:
        return [m for versions in self.served.values() for m in versions.values() if m.state == "READY"]

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for every version on disk or in memory."""
        rows = {}
        for name in self._names_on_disk():
            for version in self._versions_on_disk(name):
                rows[(name, version)] = ("UNAVAILABLE", "not loaded (version policy)")
        for (name, version), (reason, _) in self.failed.items():
            rows[(name, version)] = ("UNAVAILABLE", reason)
        for key in self.loading:
            rows[key] = ("LOADING", "")
        for name, versions in self.served.items():
            for version, model in versions.items():
                rows[(name, version)] = (model.state, "")
        for name in self.unloaded:
            for key in list(rows):
                if key[0] == name and rows[key][0] != "READY":
                    rows[key] = ("UNAVAILABLE", "unloaded")
        return [(name, str(version), state, reason) for (name, version), (state, reason) in sorted(rows.items())]

    # ---- the repository on disk ----------------------------------------------------------------

    def _names_on_disk(self) -> list[str]:
        if not os.path.isdir(self.repository):
            return []
        return sorted(n for n in os.listdir(self.repository)
                      if is_valid_name(n) and os.path.isdir(os.path.join(self.repository, n)))

    def _versions_on_disk(self, name: str) -> list[int]:
        return versions_on_disk(os.path.join(self.repository, name))

    def _wanted_versions(self, name: str) -> list[int]:
        """Versions the policy asks for, newest first (for `latest`: candidates in order of preference)."""
        on_disk = self._versions_on_disk(name)
        if self.settings.version_policy == "all":
            return sorted(on_disk, reverse=True)
        if self.settings.version_policy.startswith("specific:"):
            return sorted((v for v in self.settings.specific_versions() if v in on_disk), reverse=True)
        return sorted(on_disk, reverse=True)

    # ---- loading -------------------------------------------------------------------------------

    async def scan(self) -> None:
        """Bring the served set in line with the repository and the version policy."""
        async with self._lock:
            names = set(self._names_on_disk()) - self.unloaded
            for name in sorted(names):
                await self._sync_model(name, retry_failed=False)
            for name in sorted(set(self.served) - names - self.unloaded):
                await self._retire(name, list(self.served[name]))
        self._on_change()

    async def load(self, name: str) -> None:
        """RepositoryModelLoad: (re)load a model per the policy, retrying failed versions."""
        check_model_name(name)
        async with self._lock:
            if not self._versions_on_disk(name):
                raise ModelNotFound(f"no model {name!r} in the repository")
            self.unloaded.discard(name)
            await self._sync_model(name, retry_failed=True)
        self._on_change()
        if not self.served.get(name):
            reasons = [r for (n, _), (r, _) in self.failed.items() if n == name]
            raise LoadFailed(f"model {name!r} failed to load: {'; '.join(reasons) or 'no loadable version'}")

    async def unload(self, name: str) -> None:
        """RepositoryModelUnload: retire every served version of a model (in-flight requests finish)."""
        check_model_name(name)
        async with self._lock:
            if name not in self.served and not self._versions_on_disk(name):
                raise ModelNotFound(f"unknown model {name!r}")
            self.unloaded.add(name)
            await self._retire(name, list(self.served.get(name, {})))
        self._on_change()

    async def close(self) -> None:
        async with self._lock:
            for name in list(self.served):
                await self._retire(name, list(self.served[name]))
        self.run_executor.shutdown(wait=True)
        self.load_executor.shutdown(wait=True)

    async def _sync_model(self, name: str, retry_failed: bool) -> None:
        served = self.served.setdefault(name, {})
        wanted = self._wanted_versions(name)
        keep: set[int] = set()
        latest = self.settings.version_policy == "latest"
        for version in wanted:
            if version in served:
                keep.add(version)
                if latest:
                    break
                continue
            path = os.path.join(self.repository, name, str(version))
            mtime = _mtime(path)
            failure = self.failed.get((name, version))
            if failure and not retry_failed and failure[1] == mtime:
                continue   # failed before and unchanged since: do not retry on every scan
            model = await self._validate(name, version, path, mtime)
            if model is not None:
                served[version] = model
                keep.add(version)
                if latest:
                    break
        retire = [v for v in served if v not in keep]
        # A newer version must be ready before the old one goes; with `latest` it is, by construction.
        await self._retire(name, retire)
        if not self.served.get(name):
            self.served.pop(name, None)

    async def _validate(self, name: str, version: int, path: str, mtime: float) -> Optional[ModelVersion]:
        key = (name, version)
        self.loading.add(key)
        try:
            loop = asyncio.get_running_loop()
            model = await loop.run_in_executor(self.load_executor, validate_version, path, name, version,
                                               self.settings)
        except LoadFailed as exc:
            self.failed[key] = (str(exc), mtime)
            METRICS.load_failures.labels(name).inc()
            log.error("model %s version %s refused: %s", name, version, exc)
            return None
        finally:
            self.loading.discard(key)
        self.failed.pop(key, None)
        model.start(self.run_executor, self.settings)
        METRICS.model_ready.labels(name, str(version)).set(1)
        log.info("model %s version %s ready on %s", name, version, model.execution_provider)
        return model

    async def _retire(self, name: str, versions: list[int]) -> None:
        served = self.served.get(name, {})
        retiring = [served.pop(v) for v in versions if v in served]
        for model in retiring:
            log.info("model %s version %s unloading", name, model.version)
            METRICS.model_ready.labels(name, str(model.version)).set(0)
        await asyncio.gather(*(m.retire() for m in retiring))
        if name in self.served and not self.served[name]:
            del self.served[name]


def _blank_png(spec: PreprocessSpec) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(spec.mode, (spec.width, spec.height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _mtime(path: str) -> float:
    try:
        return max(os.stat(os.path.join(path, f)).st_mtime for f in ("model.json", "model.onnx"))
    except OSError:
        return os.stat(path).st_mtime if os.path.exists(path) else 0.0
