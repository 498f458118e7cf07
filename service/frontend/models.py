"""The served models as a front-end knows them: the engine's "models" table, kept up to date.

Runs in each front-end. The engine sends the table when a front-end connects and after every change
(load, unload, a new version, a failure), so metadata, configuration and readiness are answered here
without a round trip, and every front-end answers the same. A front-end never loads a model: it
reads the cards, which say how to check and preprocess a request and what the answer looks like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from convserve.contract import ModelCard, is_valid_name

from ..errors import ModelNotFound, ModelNotReady
from ..rules import parse_requested_version
from ..settings import Settings
from .limits import image_limits
from .preprocess import ImageLimits


@dataclass
class ServedModel:
    """One version the engine serves, as the front-end needs it."""

    name: str
    version: int
    state: str  # READY, UNLOADING ...
    card: ModelCard
    folder: str
    execution_provider: str
    providers: list[str]
    instances: int
    image_limits: ImageLimits = field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        self.spec = self.card.preprocess
        self.input_shape = self.card.preprocess.input_shape
        self.input_name = self.card.input_name  # the model's own name for its FP32 input
        self.outputs = {o.name: o for o in self.card.outputs}
        self.feature_maps = set(self.card.feature_map_names)
        # FP32 bytes of one image's input and of each output: an arena block's layout, per request
        self.input_bytes = 4 * math.prod(self.input_shape)
        self.output_bytes = {o.name: 4 * math.prod(o.shape[1:]) for o in self.card.outputs}

    @property
    def labels(self) -> list[str]:
        return self.card.labels

    @property
    def ready(self) -> bool:
        return self.state == "READY"


class ModelTable:
    """name -> version -> ServedModel, and the repository's index, as the engine last sent them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._served: dict[str, dict[int, ServedModel]] = {}
        self.index: list[tuple[str, str, str, str]] = []  # (name, version, state, reason)
        self._pending: set[str] = set()  # names with a version loading (or failed, without strict readiness)
        self.failed: list[str] = []  # names that failed to load and serve nothing: not ready, when strict

    def update(self, table: dict[str, Any]) -> None:
        served: dict[str, dict[int, ServedModel]] = {}
        known = {(m.name, m.version): m for m in self.served_versions()}
        for entry in table["served"]:
            model = known.get((entry["name"], entry["version"]))
            if model is None or model.folder != entry["folder"]:
                model = ServedModel(**entry)
                model.image_limits = image_limits(model.card, self.settings)
            model.state = entry["state"]
            served.setdefault(model.name, {})[model.version] = model
        self._served = served
        self.index = [tuple(row) for row in table["index"]]
        self._pending = set(table["pending"])
        self.failed = list(table["failed"])

    def resolve(self, name: str, version: str = "") -> ServedModel:
        """The version to serve a request for name/version; raises ModelNotFound / ModelNotReady."""
        # A lookup: any name that is not served is unknown (NOT_FOUND, as Triton answers), and so is
        # version "0"
        if not is_valid_name(name):
            raise ModelNotFound(f"unknown model {name[:128]!r}")
        if version and not version.strip("0"):
            raise ModelNotFound(f"model {name!r} has no version {version[:32]}")
        wanted = parse_requested_version(version)
        versions = self._served.get(name)
        if not versions:
            if name in self._pending:
                raise ModelNotReady(f"model {name!r} is not ready")
            if name in self.failed:
                raise ModelNotFound(f"model {name!r} failed to load and serves no version")
            raise ModelNotFound(f"unknown model {name!r}")
        if wanted is None:
            ready = [m for m in versions.values() if m.ready]
            if not ready:
                raise ModelNotReady(f"model {name!r} has no ready version")
            return max(ready, key=lambda m: m.version)
        model = versions.get(wanted)
        if model is None:
            raise ModelNotFound(f"model {name!r} has no served version {wanted}")
        if not model.ready:
            raise ModelNotReady(f"model {name!r} version {wanted} is {model.state.lower()}")
        return model

    def is_served(self, name: str) -> bool:
        return name in self._served

    def served_names(self) -> list[str]:
        return sorted(self._served)

    def served_versions(self, name: str = "") -> list[ServedModel]:
        """Every served version of `name` (of every model when empty), by name and version."""
        names = [name] if name else sorted(self._served)
        return [self._served[n][v] for n in names if n in self._served for v in sorted(self._served[n])]

    def ready_models(self) -> list[ServedModel]:
        return [m for m in self.served_versions() if m.ready]

    def known_names(self) -> set[str]:
        return {name for name, _, _, _ in self.index} | set(self._served)
