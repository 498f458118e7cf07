"""What convserve shows of a served model, as plain data: its arithmetic table and training provenance
(`describe`, from the card the engine sent) and one convolution's kernels (`read_filters`, from the
version folder's filters file). Runs in each front-end; the doors call it through the core."""

from __future__ import annotations

import asyncio
import json
import math
import os
import zipfile
from typing import Any

import numpy as np

from convserve.contract import FILTERS_FILE, MODEL_FILE

from ..errors import FailedPrecondition, NotFound
from .models import ServedModel

# a layer's fields, as introspection.proto names them; the receptive field and jump are left out
# where a layer has none (as protobuf's JSON leaves out an empty list)
_LAYER_FIELDS = ("name", "kind", "op", "input_shape", "output_shape", "params", "macs", "activations", "detail")


def describe(model: ServedModel) -> dict[str, Any]:
    """DescribeModel's answer, with introspection.proto's field names."""
    card = model.card
    arithmetic = card.arithmetic or {"layers": [], "total_params": 0, "total_macs": 0}
    layers = []
    for layer in arithmetic["layers"]:
        row = {key: layer.get(key, "") for key in _LAYER_FIELDS}
        for key in ("receptive_field", "jump"):
            if layer.get(key):
                row[key] = list(layer[key])
        layers.append(row)
    return {
        "name": model.name,
        "version": str(model.version),
        "total_params": arithmetic["total_params"],
        "total_macs": arithmetic["total_macs"],
        "layers": layers,
        "feature_maps": list(card.feature_map_names),
        "labels": list(card.labels),
        "training_json": json.dumps(card.training),
        "preprocess_json": json.dumps(card.preprocess.to_dict()),
        "execution_provider": model.execution_provider,
        "sha256": card.sha256,
        "precision": card.precision,
        "export_json": json.dumps(card.export),
        "input_name": card.input_name,
        "default_outputs": list(card.default_outputs),
        "classified_output": "probabilities" if "probabilities" in model.outputs else card.default_outputs[0],
    }


async def read_filters(model: ServedModel, feature_map: str) -> dict[str, Any]:
    """LayerFilters' answer: the kernels of the convolution whose output `feature_map` is, as
    (out, in, kh, kw) little-endian float32 bytes."""
    entry = next((f for f in model.card.feature_maps if f["name"] == feature_map), None)
    if entry is None:
        known = ", ".join(model.card.feature_map_names) or "none"
        raise NotFound(f"no feature map {feature_map[:64]!r}; this model has: {known}")
    if "conv" not in entry:
        raise FailedPrecondition(f"feature map {entry['name']!r} is not the output of a single convolution")
    limit = model.card.onnx_bytes or os.path.getsize(os.path.join(model.folder, MODEL_FILE))
    try:
        shape, weights = await asyncio.to_thread(_read_filters, model.folder, entry["name"], limit)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise FailedPrecondition(
            f"version {model.version} of {model.name!r} has no readable {FILTERS_FILE} ({str(exc)[:200]}): "
            "export it again"
        ) from None
    return {"feature_map": entry["name"], "layer": entry["conv"], "shape": shape, "weights": weights}


def _read_filters(folder: str, name: str, limit: int) -> tuple[list[int], bytes]:
    """One layer's kernels as (shape, little-endian float32 bytes), in a worker thread.

    The sizes the archive declares are checked before anything is unpacked: a layer's kernels are
    part of model.onnx, so they cannot take more bytes than it has (`limit`)."""
    with zipfile.ZipFile(os.path.join(folder, FILTERS_FILE)) as archive:
        info = archive.getinfo(f"{name}.npy")
        if info.file_size > limit + 4096:  # the .npy header is at most a few KiB
            raise ValueError(f"{name} unpacks to {info.file_size} bytes, more than model.onnx holds")
        with archive.open(info) as member:
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            reader = readers.get(np.lib.format.read_magic(member))
            if reader is None:
                raise ValueError(f"{name}: an .npy format this server does not read")
            shape, fortran, dtype = reader(member)
            if len(shape) != 4:
                raise ValueError(f"{name}: expected (out, in, kh, kw), got {shape}")
            declared = math.prod(shape) * dtype.itemsize
            if dtype.kind != "f" or dtype.hasobject or declared > limit:
                raise ValueError(f"{name} declares {dtype} {shape}: {declared} bytes, more than model.onnx holds")
            data = member.read(declared)
    if len(data) != declared:
        raise ValueError(f"{name} is truncated")
    weights = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return list(shape), weights.astype("<f4").tobytes()
