"""The model repository as the server sees it: name/version -> loaded, validated model version.

A version is validated before it serves: model.json parses (convserve.contract.ModelCard),
its files match their sha256s, the session loads, a warm-up run gives finite outputs, its answers
have the card's shapes and do not depend on batch-mates (the checks are engine/validation.py's). A version
that fails stays out with its reason (RepositoryIndex shows it) and the version already serving
keeps serving. A retired version takes no new requests, finishes those it holds, then releases
its session.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from convserve.contract import (
    CARD_FILE,
    MODEL_FILE,
    ContractError,
    ModelCard,
    ignored_entries,
    model_names,
)
from convserve.contract import versions as versions_on_disk

from ..errors import LoadFailed, ModelNotFound, ModelNotReady
from ..metrics import Metrics
from ..rules import check_model_name
from ..settings import Settings
from .batcher import Batcher, BatchStats
from .runtime import ModelRuntime
from .stats import BatchRecorder, VersionStats
from .validation import check_answers, check_files

log = logging.getLogger(__name__)


class ModelState(str, enum.Enum):
    """A version's state, named as RepositoryIndex reports it."""

    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


class ModelVersion:
    """One validated version: its model card, runtime session and batcher."""

    def __init__(self, name: str, version: int, card: ModelCard, runtime: ModelRuntime) -> None:
        self.name = name
        self.version = version
        self.card = card
        self.runtime: Optional[ModelRuntime] = runtime
        # what the session really got; kept after retire() drops the session, for requests still answering
        self.execution_provider = runtime.execution_provider
        self.providers = list(runtime.providers)
        self.instances = runtime.instances
        self.input_shape = card.preprocess.input_shape
        self.outputs = {o.name: o for o in card.outputs}
        self.stats = VersionStats()
        self.folder = ""  # the version folder it was loaded from
        self.batcher: Optional[Batcher] = None
        self.state = ModelState.READY

    def describe(self) -> dict:
        """What a front-end needs to know of it (ipc "models" table): plain data."""
        return {
            "name": self.name,
            "version": self.version,
            "state": self.state.value,
            "card": self.card,
            "folder": self.folder,
            "execution_provider": self.execution_provider,
            "providers": self.providers,
            "instances": self.instances,
        }

    def start(self, settings: Settings, on_batch: Callable[[BatchStats], None]) -> None:
        assert self.runtime is not None
        self.batcher = Batcher(
            self.runtime.run,
            self.runtime.executor,
            output_order=self.runtime.output_names,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
            instances=self.instances,
            on_batch=on_batch,
        )

    async def retire(self) -> None:
        """No new requests; finish the queued ones; release the session."""
        self.state = ModelState.UNLOADING
        if self.batcher is not None:
            await self.batcher.close()
        self.state = ModelState.UNAVAILABLE
        if self.runtime is not None:
            await asyncio.to_thread(self.runtime.close)
        self.runtime = None  # drops the session and its memory


def validate_version(path: str, name: str, version: int, settings: Settings) -> ModelVersion:
    """Load and check one version folder (blocking: run it in an executor). Raises LoadFailed."""
    try:
        card = ModelCard.read(path)
        check_files(path, card)
        runtime = ModelRuntime(os.path.join(path, MODEL_FILE), settings)
        try:
            model = ModelVersion(name, version, card, runtime)
            model.folder = path
            missing = set(model.outputs) - set(runtime.output_names)
            if missing:
                raise LoadFailed(f"model.onnx lacks outputs {sorted(missing)} that model.json names")
            seconds = runtime.warm_up(model.input_shape)
            log.info("model %s version %s warmed up in %.2f s", name, version, seconds)
            runtime.executor.submit(check_answers, runtime, card, settings.max_batch_size).result()
        except BaseException:
            runtime.close()
            raise
        return model
    except LoadFailed:
        raise
    except ContractError as exc:
        raise LoadFailed(str(exc)) from None
    except FileNotFoundError as exc:
        raise LoadFailed(f"missing {os.path.basename(exc.filename or '?')}") from None
    except Exception as exc:
        log.warning("model %s version %s: validation failed", name, version, exc_info=True)
        first_line = str(exc).splitlines()[0] if str(exc) else "unknown error"
        raise LoadFailed(f"failed to load: {first_line}") from None


class Registry:
    """Every model version the server knows: served ones, and the failed ones with their reasons."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        on_change: Optional[Callable[[bool], Awaitable[None]]] = None,
    ) -> None:
        self.settings = settings
        self.repository = os.path.abspath(settings.repository)
        self._metrics = metrics
        self._served: dict[str, dict[int, ModelVersion]] = {}
        # (name, version) -> (reason, fingerprint of its files when it failed)
        self._failed: dict[tuple[str, int], tuple[str, tuple]] = {}
        self._loading: set[tuple[str, int]] = set()
        self._unloaded: set[str] = set()
        self._ignored_logged: set[str] = set()  # names unloaded on request: scans leave them alone
        self.load_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        self._lock = asyncio.Lock()
        self._on_change = on_change
        metrics.read_queue_depth_from(self.queue_depths)

    # ---- lookups -----------------------------------------------------------------------------

    def get(self, name: str, version: int) -> ModelVersion:
        """The served version a front-end resolved (it may have been retired since)."""
        model = self._served.get(name, {}).get(version)
        if model is None:
            raise ModelNotFound(f"model {name!r} has no served version {version}")
        if model.state is not ModelState.READY:
            raise ModelNotReady(f"model {name!r} version {version} is {model.state.value.lower()}")
        return model

    def pending_names(self) -> list[str]:
        """Names with a version loading (requests for them are UNAVAILABLE, not NOT_FOUND), and with
        --strict-readiness 0 those that failed too."""
        names = {name for name, _ in self._loading}
        if not self.settings.strict_readiness:
            names |= {name for name, _ in self._failed}
        return sorted(names)

    def failed_names(self) -> list[str]:
        """Names that failed to load and serve no version, unless unloaded on request since: with
        --strict-readiness (Triton's default) any of them makes the server not ready."""
        if not self.settings.strict_readiness:
            return []
        return sorted(
            {name for name, _ in self._failed}
            - set(self._served)
            - {name for name, _ in self._loading}
            - self._unloaded
        )

    def served(self, name: str, version: int) -> Optional[ModelVersion]:
        return self._served.get(name, {}).get(version)

    def is_served(self, name: str) -> bool:
        return name in self._served

    def served_names(self) -> list[str]:
        return sorted(self._served)

    def served_versions(self, name: str = "") -> list[ModelVersion]:
        """Every served version of `name` (of every model when empty), by name and version."""
        names = [name] if name else sorted(self._served)
        return [self._served[n][v] for n in names if n in self._served for v in sorted(self._served[n])]

    def ready_models(self) -> list[ModelVersion]:
        return [m for m in self.served_versions() if m.state is ModelState.READY]

    def queue_depths(self) -> dict[str, int]:
        """Requests waiting per model name, over its versions (read by the metrics at scrape time)."""
        depths: dict[str, int] = {}
        for model in self.served_versions():
            if model.batcher is not None:
                depths[model.name] = depths.get(model.name, 0) + model.batcher.queue_depth
        return depths

    async def index(self) -> list[tuple[str, str, ModelState, str]]:
        """(name, version, state, reason) for every version on disk or in memory."""
        on_disk = await self._in_thread(self._disk_versions)
        rows: dict[tuple[str, int], tuple[ModelState, str]] = {
            key: (ModelState.UNAVAILABLE, "not loaded (version policy)") for key in on_disk
        }
        for key, (reason, _) in self._failed.items():
            rows[key] = (ModelState.UNAVAILABLE, reason)
        for key in self._loading:
            rows[key] = (ModelState.LOADING, "")
        for model in self.served_versions():
            rows[(model.name, model.version)] = (model.state, "")
        for key, (state, _) in list(rows.items()):
            # a version that failed keeps its load error as the reason, after an unload too (as Triton)
            if key[0] in self._unloaded and state is not ModelState.READY and key not in self._failed:
                rows[key] = (ModelState.UNAVAILABLE, "unloaded")
        return [(name, str(version), state, reason) for (name, version), (state, reason) in sorted(rows.items())]

    # ---- the repository on disk (blocking: called through _in_thread) ----------------------------

    def _disk_versions(self) -> list[tuple[str, int]]:
        for entry in ignored_entries(self.repository):
            if entry not in self._ignored_logged:  # once per folder, not once per scan
                self._ignored_logged.add(entry)
                log.warning(
                    "ignoring %r in the repository: model names are letters, digits, '.', '_' and '-'; "
                    "versions are ASCII digits",
                    entry,
                )
        return [
            (name, v)
            for name in model_names(self.repository)
            for v in versions_on_disk(os.path.join(self.repository, name))
        ]

    def _wanted_versions(self, name: str) -> list[int]:
        """Versions the policy asks for, newest first (for `latest`: candidates in order of preference)."""
        on_disk = versions_on_disk(os.path.join(self.repository, name))
        if self.settings.version_policy.startswith("specific:"):
            return sorted((v for v in self.settings.specific_versions() if v in on_disk), reverse=True)
        return sorted(on_disk, reverse=True)

    @staticmethod
    async def _in_thread(function, *args):
        """Disk scans: short, but blocking, so never on the event loop (and never behind a long load)."""
        return await asyncio.to_thread(function, *args)

    # ---- loading -------------------------------------------------------------------------------

    async def scan(self) -> None:
        """Bring the served set in line with the repository and the version policy."""
        async with self._lock:
            on_disk = set(await self._in_thread(self._disk_versions))
            for key in [k for k in self._failed if k not in on_disk]:  # removed: it leaves the index
                del self._failed[key]
            # one listing of the repository per scan: a model folder without versions serves nothing anyway
            names = {name for name, _ in on_disk} - self._unloaded
            for name in sorted(names):
                await self._sync_model(name, retry_failed=False)
            for name in sorted(set(self._served) - names - self._unloaded):
                await self._retire(name, list(self._served[name]))
        await self._changed()

    async def load(self, name: str) -> None:
        """RepositoryModelLoad: (re)load a model per the policy, retrying failed versions."""
        check_model_name(name)
        async with self._lock:
            if not await self._in_thread(versions_on_disk, os.path.join(self.repository, name)):
                raise ModelNotFound(f"no model {name!r} in the repository")
            self._unloaded.discard(name)
            await self._sync_model(name, retry_failed=True)
            # decided under the lock: a concurrent unload may retire the model the moment it is released
            loaded = bool(self._served.get(name))
            reasons = [r for (n, _), (r, _) in self._failed.items() if n == name]
        await self._changed()
        if not loaded:
            raise LoadFailed(f"model {name!r} failed to load: {'; '.join(reasons) or 'no loadable version'}")

    async def unload(self, name: str) -> None:
        """RepositoryModelUnload: retire every served version of a model (in-flight requests finish)."""
        check_model_name(name)
        async with self._lock:
            if name not in self._served and not await self._in_thread(
                versions_on_disk, os.path.join(self.repository, name)
            ):
                # Triton 2.51 answers OK to unloading a model it does not know: nothing to unload
                log.info("unload of %r, which is not in the repository: nothing to do", name[:128])
                return
            self._unloaded.add(name)
            await self._retire(name, list(self._served.get(name, {})))
        await self._changed()

    async def close(self) -> None:
        async with self._lock:
            for name in list(self._served):
                await self._retire(name, list(self._served[name]))
        # waiting for the pools' threads blocks: not on the event loop
        await asyncio.to_thread(self.load_executor.shutdown, wait=True)

    async def _changed(self, settled: bool = False) -> None:
        """Tell the front-ends (settled: and wait until they route by what they were told)."""
        if self._on_change is not None:
            await self._on_change(settled)

    async def _sync_model(self, name: str, retry_failed: bool) -> None:
        served = self._served.setdefault(name, {})
        wanted = await self._in_thread(self._wanted_versions, name)
        keep: set[int] = set()
        latest = self.settings.version_policy == "latest"
        for version in wanted:
            if version in served:
                keep.add(version)
                if latest:
                    break
                continue
            path = os.path.join(self.repository, name, str(version))
            files = await self._in_thread(_fingerprint, path)
            failure = self._failed.get((name, version))
            if failure and not retry_failed and failure[1] == files:
                continue  # failed before and unchanged since: do not retry on every scan
            model = await self._validate(name, version, path, files)
            if model is not None:
                served[version] = model
                keep.add(version)
                if latest:
                    break
        # A newer version must be ready before the old one goes; with `latest` it is, by construction.
        # The front-ends are told of it, and route by it, before the old one stops taking requests.
        retiring = [v for v in served if v not in keep]
        if retiring and any(v not in retiring for v in served):
            await self._changed(settled=True)
        await self._retire(name, retiring)
        if not self._served.get(name):
            self._served.pop(name, None)

    async def _validate(self, name: str, version: int, path: str, files: tuple) -> Optional[ModelVersion]:
        key = (name, version)
        # the failure counter exists at 0 from the first sight of a model: an alert on its increase
        # sees the first failure (a series born at 1 has no increase to Prometheus)
        self._metrics.load_failures.labels(name)
        self._loading.add(key)
        try:
            model = await asyncio.get_running_loop().run_in_executor(
                self.load_executor, validate_version, path, name, version, self.settings
            )
        except LoadFailed as exc:
            self._failed[key] = (str(exc), files)
            self._metrics.load_failures.labels(name).inc()
            log.error("model %s version %s refused: %s", name, version, exc)
            return None
        finally:
            self._loading.discard(key)
        self._failed.pop(key, None)
        model.start(self.settings, BatchRecorder(self._metrics, name, model.stats))
        self._metrics.model_ready.labels(name, str(version)).set(1)
        log.info("model %s version %s ready on %s", name, version, model.execution_provider)
        return model

    async def _retire(self, name: str, versions: list[int]) -> None:
        served = self._served.get(name, {})
        retiring = [served.pop(v) for v in versions if v in served]
        for model in retiring:
            log.info("model %s version %s unloading", name, model.version)
            self._metrics.model_ready.labels(name, str(model.version)).set(0)
        await asyncio.gather(*(m.retire() for m in retiring))
        if name in self._served and not self._served[name]:
            del self._served[name]


def _fingerprint(path: str) -> tuple:
    """What changes when a version folder's files are rewritten, replaced or re-permissioned (chmod
    changes ctime): a failed version is retried when this changes, not on every scan."""
    marks: list[tuple[int, ...] | None] = []
    for name in ("", CARD_FILE, MODEL_FILE):
        try:
            info = os.stat(os.path.join(path, name) if name else path)
            marks.append((info.st_mtime_ns, info.st_ctime_ns, info.st_mode, info.st_size))
        except OSError:
            marks.append(None)
    return tuple(marks)
