"""`convserve import`: a user's own ONNX image classifier, written into the repository as a version.

The graph keeps its own input and output names. What is added, by graph surgery with the `onnx`
package (the training/tooling side):

- a graph output per chosen feature map, named readably (`--feature-maps auto`: each Conv node's map
  after the activation that follows it, or the conv's own output when none does), through an Identity
  node so the original tensor keeps its name; the card records that name;
- a `probabilities` output (a Softmax over the scores) when the graph does not end in one;
- a dynamic batch dimension where the file fixed it to 1 and the graph runs at other batch sizes.

Then the parity check: onnxruntime on the original file and on the imported one, at batch 1 and 4
(batch 1 only where the original's batch is fixed), with graph optimizations off, must give the same
scores bit for bit; with them on, as a server runs it, the added outputs change which kernels fuse,
and the difference is recorded (1.5e-8 on a small ResNet). Only then is the version written
(atomically, with its sha256), beside its arithmetic table (`arithmetic.from_onnx`) and
`filters.npz` (each feature map's conv kernels).

This slice reads NCHW float inputs of rank 4; NHWC inputs are refused with that reason.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass

import numpy as np

from convserve.contract import CARD_FILE, FILTERS_FILE, MODEL_FILE, ModelCard, PreprocessSpec, TensorSpec

from .export import ExportError, _now, _versions
from .repository import write_version

ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSwish", "HardSigmoid", "Elu", "Selu", "PRelu", "Tanh"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PARITY_BATCHES = (1, 4)


class ImportError_(ExportError):
    """A model that cannot be imported: the message says why (a subclass of ExportError)."""


@dataclass
class FeatureMap:
    name: str  # the readable name clients ask for (conv1 ... or the node's own)
    tensor: str  # the graph's tensor it shows
    conv: str  # the Conv node it comes from
    weights: str  # that node's weight initializer


def _readable(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")


def _find_feature_maps(graph, wanted: str, taken: set[str]) -> list[FeatureMap]:
    """The feature maps `--feature-maps` asks for: auto, none, or conv node names (comma list)."""
    if wanted == "none":
        return []
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    convs = [node for node in graph.node if node.op_type == "Conv"]
    chosen = convs
    if wanted != "auto":
        names = [n.strip() for n in wanted.split(",") if n.strip()]
        by_name = {node.name: node for node in convs} | {f"conv{i + 1}": node for i, node in enumerate(convs)}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ImportError_(f"--feature-maps: no Conv node {missing}; this graph's are {', '.join(by_name)}")
        chosen = [by_name[n] for n in names]
    maps = []
    for node in chosen:
        tensor = node.output[0]
        after = consumers.get(tensor, [])
        if len(after) == 1 and after[0].op_type in ACTIVATIONS:
            tensor = after[0].output[0]
        index = convs.index(node) + 1
        name = f"conv{index}"
        if name in taken:
            name = f"{_readable(node.name) or 'conv'}_{index}"
        taken.add(name)
        maps.append(FeatureMap(name, tensor, node.name or f"conv{index}", node.input[1]))
    return maps


def _preprocess(text: str, channels: int, height: int, width: int) -> tuple[PreprocessSpec, bool]:
    """(the spec, whether encoded images are taken) from --preprocess imagenet | none | mean=..,std=..."""
    if text == "none":
        return PreprocessSpec(height, width, channels, "bilinear", (0.0,) * channels, (1.0,) * channels), False
    if text == "imagenet":
        if channels != 3:
            raise ImportError_(f"--preprocess imagenet is for 3-channel inputs; this one has {channels}")
        return PreprocessSpec(height, width, 3, "bilinear", IMAGENET_MEAN, IMAGENET_STD), True
    fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    try:
        mean = tuple(float(v) for v in fields.get("mean", "0").split("/"))
        std = tuple(float(v) for v in fields.get("std", "1").split("/"))
        scale = float(fields.get("scale", 1 / 255))
    except ValueError:
        raise ImportError_(f"--preprocess {text!r}: mean=A/B/C,std=A/B/C,scale=S,color=RGB|BGR|L") from None
    color = fields.get("color", "RGB" if channels == 3 else "L")
    if len(mean) == 1:
        mean *= channels
    if len(std) == 1:
        std *= channels
    if len(mean) != channels or len(std) != channels or color not in ("RGB", "BGR", "L"):
        raise ImportError_(f"--preprocess {text!r} does not fit a {channels}-channel input")
    if color == "BGR":
        raise ImportError_("--preprocess color=BGR: this version of convserve decodes images as RGB or L only")
    return PreprocessSpec(height, width, channels, "bilinear", mean, std, scale=scale), True


def import_onnx(
    path: str,
    *,
    repository: str,
    name: str,
    labels_file: str | None = None,
    preprocess: str = "imagenet",
    feature_maps: str = "auto",
    scores: str | None = None,
) -> str:
    """Import `path` as the next version of `name`; returns the version folder."""
    import onnx
    from onnx import helper

    try:
        model = onnx.load(path)
    except Exception as exc:
        raise ImportError_(f"{path} is not an ONNX model ({type(exc).__name__}: {str(exc)[:120]})") from None
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ImportError_(f"an image classifier has one input; this graph has {[i.name for i in inputs]}")
    source = inputs[0]
    tensor_type = source.type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT or len(tensor_type.shape.dim) != 4:
        raise ImportError_(f"input {source.name!r} must be a rank-4 float tensor")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if any(d is None for d in dims[1:]):
        raise ImportError_(f"input {source.name!r} has dynamic image dimensions {dims}: give a fixed C, H, W")
    if dims[3] in (1, 3) and dims[1] not in (1, 3):
        raise ImportError_(f"input {source.name!r} is NHWC {dims}: this version of convserve import reads NCHW")
    channels, height, width = dims[1], dims[2], dims[3]
    if channels not in (1, 3):
        raise ImportError_(f"input {source.name!r} has {channels} channels: an image classifier takes 1 or 3")
    fixed_batch = dims[0] == 1

    # the scores: the only 2-D float output, or --scores
    two_d = [o for o in graph.output if len(o.type.tensor_type.shape.dim) == 2]
    if scores is None:
        if len(two_d) != 1:
            raise ImportError_(f"give --scores: the graph's 2-D outputs are {[o.name for o in two_d]}")
        scores_output = two_d[0]
    else:
        scores_output = next((o for o in graph.output if o.name == scores), None)
        if scores_output is None:
            raise ImportError_(f"--scores {scores!r}: the graph's outputs are {[o.name for o in graph.output]}")
    classes = scores_output.type.tensor_type.shape.dim[1].dim_value
    producer = next((node for node in graph.node if scores_output.name in node.output), None)
    softmaxed = producer is not None and producer.op_type == "Softmax"

    labels = [str(i) for i in range(classes)]
    if labels_file:
        with open(labels_file) as handle:
            labels = [line.strip() for line in handle if line.strip()]
        if len(labels) != classes:
            raise ImportError_(f"{labels_file} has {len(labels)} labels; {scores_output.name!r} has {classes} classes")
    spec, images = _preprocess(preprocess, channels, height, width)

    # graph surgery
    taken = {o.name for o in graph.output} | {source.name, "image"}
    maps = _find_feature_maps(graph, feature_maps, taken)
    outputs = [TensorSpec(scores_output.name, "FP32", (-1, classes))]
    default_outputs = [scores_output.name]
    if not softmaxed:
        probabilities = "probabilities" if "probabilities" not in taken else f"{scores_output.name}_probabilities"
        graph.node.append(helper.make_node("Softmax", [scores_output.name], [probabilities], axis=1))
        graph.output.append(helper.make_tensor_value_info(probabilities, onnx.TensorProto.FLOAT, ["N", classes]))
        outputs.append(TensorSpec(probabilities, "FP32", (-1, classes)))
        default_outputs.append(probabilities)
    for fmap in maps:
        graph.node.append(helper.make_node("Identity", [fmap.tensor], [fmap.name], name=f"feature_map_{fmap.name}"))
        graph.output.append(helper.make_tensor_value_info(fmap.name, onnx.TensorProto.FLOAT, None))
    if fixed_batch:
        _make_batch_dynamic(graph, source.name)
    imported = model.SerializeToString()
    shapes, batch_ok, optimized_diff = _parity(
        path, imported, source.name, scores_output.name, [m.name for m in maps], dims
    )
    if fixed_batch and not batch_ok:
        raise ImportError_(
            f"input {source.name!r} fixes the batch to 1 and the graph does not run at other batch sizes "
            "(a Reshape to a fixed batch?): re-export it with a dynamic batch"
        )
    for fmap in maps:
        outputs.append(TensorSpec(fmap.name, "FP32", (-1, *shapes[fmap.name][1:])))

    # the arithmetic table and the kernels, from the original file
    from .arithmetic import analyze, from_onnx

    nodes, shape = from_onnx(path)
    table = analyze(nodes, shape)
    weights = {init.name: init for init in model.graph.initializer}
    kernels = io.BytesIO()
    arrays = {}
    for fmap in maps:
        if fmap.weights in weights:
            arrays[fmap.name] = onnx.numpy_helper.to_array(weights[fmap.weights]).astype(np.float32)
    np.savez(kernels, **arrays)
    rows = {row.name for row in table.layers}
    card = ModelCard(
        name=name,
        version=0,
        labels=labels,
        preprocess=spec,
        outputs=outputs,
        feature_maps=[
            {
                "name": fmap.name,
                "layer": fmap.conv,
                "tensor": fmap.tensor,
                "shape": [-1, *shapes[fmap.name][1:]],
                **({"conv": fmap.conv} if fmap.name in arrays and fmap.conv in rows else {}),
            }
            for fmap in maps
        ],
        sha256=hashlib.sha256(imported).hexdigest(),
        onnx_bytes=len(imported),
        arithmetic=table.to_dict(),
        training={"imported_from": os.path.basename(path), "source_sha256": _sha256_file(path), "date": _now()},
        export={
            "precision": "fp32",
            "imported": True,
            "scores": scores_output.name,
            "softmax_in_graph": softmaxed,
            "batch": "fixed to 1 in the file; made dynamic" if fixed_batch else "dynamic",
            "parity": {
                "batches": list(PARITY_BATCHES),
                "unoptimized": "scores equal bit for bit, original vs imported",
                "optimized_max_abs_diff": optimized_diff,  # fusions change where outputs were added
            },
            "versions": _versions(),
        },
        input_name=source.name,
        default_outputs=tuple(default_outputs),
        image_input=images,
    )

    def card_json(version: int) -> bytes:
        card.version = version
        return card.to_json()

    folder, _ = write_version(
        repository, name, {MODEL_FILE: imported, FILTERS_FILE: kernels.getvalue(), CARD_FILE: card_json}
    )
    return folder


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _make_batch_dynamic(graph, input_name: str) -> None:
    """The input's and outputs' first dimension symbolic (N) where the file fixed it to 1."""
    for value in [*(i for i in graph.input if i.name == input_name), *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].dim_param = "N"
    del graph.value_info[:]  # shapes inferred for batch 1 would contradict it


def _parity(
    original_path: str, imported: bytes, input_name: str, scores: str, maps: list[str], dims: list
) -> tuple[dict[str, tuple[int, ...]], bool, float]:
    """onnxruntime on the original and the imported graph, at each batch the original runs.

    With graph optimizations off, the scores must be equal bit for bit: the surgery changes no
    arithmetic. With them on (as a server runs), the added outputs change which kernels onnxruntime
    fuses and lays out, so the scores may differ in the last bits: that difference is measured and
    returned, and refused past 1e-4. Returns each feature map's shape, whether the imported graph
    runs batch 4, and that difference."""
    import onnxruntime as ort

    def sessions(level):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # the same kernels in both sessions
        options.graph_optimization_level = level
        original = ort.InferenceSession(original_path, options, providers=["CPUExecutionProvider"])
        ours = ort.InferenceSession(imported, options, providers=["CPUExecutionProvider"])
        return original, ours

    shapes: dict[str, tuple[int, ...]] = {}
    batch_ok, optimized_diff = True, 0.0
    for level, exact in (
        (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, True),
        (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, False),
    ):
        original, ours = sessions(level)
        rng = np.random.default_rng(0)
        for batch in PARITY_BATCHES:
            x = rng.standard_normal((batch, *dims[1:])).astype(np.float32)
            try:
                got = ours.run([scores, *maps], {input_name: x})
            except Exception as exc:
                if batch == 1:
                    raise ImportError_(f"the imported graph does not run: {str(exc)[:200]}") from None
                batch_ok = False
                continue
            shapes.update({name: tuple(value.shape) for name, value in zip(maps, got[1:])})
            if dims[0] == 1 and batch != 1:
                continue  # the original takes batch 1 only: compared there
            (expected,) = original.run([scores], {input_name: x})
            diff = float(np.max(np.abs(expected - got[0]))) if expected.size else 0.0
            if exact and not np.array_equal(expected, got[0]):
                raise ImportError_(f"parity: imported scores differ from the original's by {diff:.3g} at batch {batch}")
            if not exact:
                optimized_diff = max(optimized_diff, diff)
    if optimized_diff > 1e-4:
        raise ImportError_(f"parity: with onnxruntime's optimizations the scores differ by {optimized_diff:.3g}")
    return shapes, batch_ok, optimized_diff
