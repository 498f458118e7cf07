"""convserve.v1.Introspection: a served model's arithmetic table and training provenance (front-end:
read from the card the engine sent and the version folder's filters file)."""

from __future__ import annotations

import asyncio
import json
import os
import zipfile

import numpy as np

from convserve.contract import FILTERS_FILE

from ..errors import FailedPrecondition, NotFound
from ..proto import introspection_pb2 as ipb
from ..proto import introspection_pb2_grpc as ipb_grpc
from .models import ModelTable
from .observe import Recorder
from .servicer import rpc


class IntrospectionServicer(ipb_grpc.IntrospectionServicer):
    def __init__(self, models: ModelTable, recorder: Recorder) -> None:
        self.models = models
        self.recorder = recorder

    @rpc
    async def DescribeModel(self, request, context, outcome):
        model = self.models.resolve(request.name, request.version)
        card = model.card
        arithmetic = card.arithmetic or {"layers": [], "total_params": 0, "total_macs": 0}
        response = ipb.DescribeModelResponse(
            name=model.name,
            version=str(model.version),
            total_params=arithmetic["total_params"],
            total_macs=arithmetic["total_macs"],
            feature_maps=card.feature_map_names,
            labels=card.labels,
            training_json=json.dumps(card.training),
            preprocess_json=json.dumps(card.preprocess.to_dict()),
            execution_provider=model.execution_provider,
            sha256=card.sha256,
        )
        for layer in arithmetic["layers"]:
            response.layers.add(
                name=layer["name"],
                kind=layer["kind"],
                op=layer["op"],
                input_shape=layer["input_shape"],
                output_shape=layer["output_shape"],
                params=layer["params"],
                macs=layer["macs"],
                activations=layer["activations"],
                receptive_field=layer["receptive_field"] or [],
                jump=layer["jump"] or [],
                detail=layer.get("detail", ""),
            )
        return response

    @rpc
    async def LayerFilters(self, request, context, outcome):
        model = self.models.resolve(request.name, request.version)
        entry = next((f for f in model.card.feature_maps if f["name"] == request.feature_map), None)
        if entry is None:
            known = ", ".join(model.card.feature_map_names) or "none"
            raise NotFound(f"no feature map {request.feature_map[:64]!r}; this model has: {known}")
        if "conv" not in entry:
            raise FailedPrecondition(f"feature map {entry['name']!r} is not the output of a single convolution")
        try:
            weights = await asyncio.to_thread(_read_filters, model.folder, entry["name"])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            raise FailedPrecondition(
                f"version {model.version} of {model.name!r} has no readable {FILTERS_FILE}: export it again"
            ) from None
        return ipb.LayerFiltersResponse(
            feature_map=entry["name"],
            layer=entry["conv"],
            shape=list(weights.shape),
            weights=weights.astype("<f4", copy=False).tobytes(),
        )


def _read_filters(folder: str, name: str) -> np.ndarray:
    with np.load(os.path.join(folder, FILTERS_FILE), allow_pickle=False) as archive:
        weights = archive[name]
    if weights.ndim != 4:
        raise ValueError(f"{name}: expected (out, in, kh, kw), got {weights.shape}")
    return weights
