"""The checks a version passes before it serves (engine process): its files are the ones its card
names (sha256s, external data inside the folder), and its answers are what the card promises (shapes,
dtypes, and each image's answer independent of its batch-mates). The registry runs them at load.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from convserve.contract import MODEL_FILE, ModelCard
from convserve.proto import onnx_files_pb2 as onnx_files

from ..errors import LoadFailed
from .runtime import ModelRuntime


def _sha256(path: str) -> tuple[str, bytes]:
    digest = hashlib.sha256()
    chunks = []
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            chunks.append(chunk)
    return digest.hexdigest(), b"".join(chunks)


def external_files(model: bytes) -> list[str]:
    """The files an ONNX model's tensors keep their data in (their `location`), in order, once each."""
    if b"location" not in model:  # the key is stored as text: without it there is no external data
        return []
    parsed = onnx_files.ModelProto.FromString(model)
    found: dict[str, None] = {}

    def tensor(t) -> None:
        if t.data_location == 1:  # EXTERNAL
            for entry in t.external_data:
                if entry.key == "location":
                    found[entry.value] = None

    def sparse(s) -> None:
        tensor(s.values)
        tensor(s.indices)

    def nodes(items) -> None:
        for node in items:
            for attribute in node.attribute:
                tensor(attribute.t)
                graph(attribute.g)
                for t in attribute.tensors:
                    tensor(t)
                for g in attribute.graphs:
                    graph(g)
                sparse(attribute.sparse_tensor)
                for s in attribute.sparse_tensors:
                    sparse(s)

    def graph(g) -> None:
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            sparse(s)
        nodes(g.node)

    graph(parsed.graph)
    for function in parsed.functions:
        nodes(function.node)
    return list(found)


def check_files(path: str, card: ModelCard) -> None:
    """model.onnx and every file its graph reads match the sha256s in model.json."""
    digest, model = _sha256(os.path.join(path, MODEL_FILE))
    if digest != card.sha256:
        raise LoadFailed("model.onnx does not match the sha256 in model.json")
    for location in external_files(model):
        if os.path.isabs(location) or os.path.normpath(location).startswith(".."):
            raise LoadFailed(f"model.onnx reads {location[:128]!r}, outside its version folder")
        expected = card.external_data.get(location)
        if expected is None:
            raise LoadFailed(f"model.onnx reads {location[:128]!r}, whose sha256 model.json does not give")
        if _sha256(os.path.join(path, location))[0] != expected:
            raise LoadFailed(f"{location[:128]} does not match its sha256 in model.json")


def check_answers(runtime: ModelRuntime, card: ModelCard, max_batch_size: int) -> None:
    """Distinct images in one batch get the answers each gets alone, in the shapes the card gives.

    Warm-up feeds zeros; a graph that mixes the rows of a batch (a softmax over the batch axis, a
    batch-norm left in training mode) passes it and then answers each client by its batch-mates."""
    names = [o.name for o in card.outputs]
    size = max(1, min(4, max_batch_size))
    batch = np.random.default_rng(0).standard_normal((size, *card.preprocess.input_shape)).astype(np.float32)
    together = runtime.run(batch, names)
    for spec, value in zip(card.outputs, together):
        wanted = (size, *spec.shape[1:])
        if value.shape != wanted or value.dtype != np.float32:
            raise LoadFailed(
                f"output {spec.name} is {value.dtype} {list(value.shape)} for {size} images; model.json says "
                f"{spec.datatype} {list(spec.shape)}"
            )
    for row in range(size if size > 1 else 0):
        alone = runtime.run(batch[row : row + 1], names)
        for spec, mixed, single in zip(card.outputs, together, alone):
            scale = float(np.abs(single).max()) + 1e-6
            difference = float(np.abs(mixed[row : row + 1] - single).max())
            if not difference <= 5e-3 * scale + 1e-5:  # TF32 and per-size kernels differ far less
                raise LoadFailed(
                    f"output {spec.name} of an image depends on the other images in its batch (image {row} of "
                    f"{size}: differs by {difference:.3g} from its answer alone): refused"
                )
