"""Export a zoo CNN to ONNX with its feature maps as extra outputs, check it, write it as a version.

Graph: input `input` (N, C, H, W) float32 with a dynamic batch; outputs `logits` (N, K),
`probabilities` (N, K) and one per feature-map tap, named as the zoo names the layer (conv1 ...),
taken after its activation. Nothing is written until onnx.checker passes and onnxruntime's outputs
equal PyTorch's within `ATOL` for every output at batch 1 and 7, on real and on random inputs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

from .arithmetic_torch import analyze_module
from .repository import write_version
from .zoo import ZooCNN, get_model

OPSET = 18
ATOL = 1e-4
PARITY_BATCHES = (1, 7)


class ExportError(ValueError):
    pass


class _WithFeatureMaps(nn.Module):
    """The model's forward, returning (logits, probabilities, *feature maps in tap order)."""

    def __init__(self, model: ZooCNN) -> None:
        super().__init__()
        self.model = model
        self.taps = list(model.feature_taps)

    def forward(self, input: torch.Tensor):  # noqa: A002 - the ONNX input is called "input"
        logits, maps = self.model.forward_with_feature_maps(input)
        return (logits, torch.softmax(logits, dim=1), *[maps[t] for t in self.taps])


def output_names(model: ZooCNN) -> list[str]:
    return ["logits", "probabilities", *model.feature_taps]


def to_onnx_bytes(model: ZooCNN, input_shape: tuple[int, int, int]) -> bytes:
    """The ONNX file of `model` (eval mode), dynamic batch, opset 18, as bytes."""
    wrapper = _WithFeatureMaps(model.eval()).eval()
    example = torch.zeros(2, *input_shape)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the exporter warns at length that torchvision's ops are not there; we use none of them
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(
            wrapper, (example,), path, dynamo=True, opset_version=OPSET, external_data=False,
            input_names=["input"], output_names=output_names(model),
            dynamic_shapes={"input": {0: torch.export.Dim("batch", min=1, max=1 << 16)}},
            verbose=False)
        with open(path, "rb") as handle:
            return handle.read()


def check_parity(model: ZooCNN, onnx_bytes: bytes, input_shape: tuple[int, int, int],
                 real_inputs: np.ndarray | None, seed: int = 0) -> dict[str, float]:
    """onnx.checker, then onnxruntime (CPU) against PyTorch for every output; raises ExportError.

    Returns the largest absolute difference seen per output.
    """
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(onnx.load_from_string(onnx_bytes), full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejects the export: {exc}".splitlines()[0]) from None
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = output_names(model)
    if [o.name for o in session.get_outputs()] != names:
        raise ExportError(f"exported outputs {[o.name for o in session.get_outputs()]} != {names}")
    wrapper = _WithFeatureMaps(model.eval()).eval()
    rng = np.random.default_rng(seed)
    worst = {name: 0.0 for name in names}
    for batch in PARITY_BATCHES:
        inputs = {"random": rng.standard_normal((batch, *input_shape)).astype(np.float32)}
        if real_inputs is not None and len(real_inputs):
            picks = np.resize(np.arange(len(real_inputs)), batch)
            inputs["real"] = np.ascontiguousarray(real_inputs[picks], dtype=np.float32)
        for kind, x in inputs.items():
            with torch.no_grad():
                expected = [t.numpy() for t in wrapper(torch.from_numpy(x))]
            got = session.run(names, {"input": x})
            for name, e, g in zip(names, expected, got):
                if e.shape != g.shape:
                    raise ExportError(f"output {name} has shape {g.shape} in ONNX, {e.shape} in PyTorch")
                diff = float(np.max(np.abs(e - g))) if e.size else 0.0
                worst[name] = max(worst[name], diff)
                if diff > ATOL:
                    raise ExportError(f"output {name} differs from PyTorch by {diff:.3g} (> {ATOL}) "
                                      f"at batch {batch} on {kind} inputs")
    return worst


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def export_model(model: ZooCNN, *, repository: str, name: str, labels: list[str], preprocess: dict,
                 training: dict, real_inputs: np.ndarray | None = None) -> str:
    """Export, check and write `model` as the next version of `name`; returns the version folder."""
    input_shape = (preprocess["channels"], preprocess["height"], preprocess["width"])
    model = model.eval()
    onnx_bytes = to_onnx_bytes(model, input_shape)
    worst = check_parity(model, onnx_bytes, input_shape, real_inputs)
    with torch.no_grad():
        _, maps = model.forward_with_feature_maps(torch.zeros(1, *input_shape))
    num_classes = len(labels)
    feature_maps = [{"name": tap, "layer": f"features.{child}", "shape": [-1, *maps[tap].shape[1:]]}
                    for tap, child in model.feature_taps.items()]
    sha256 = hashlib.sha256(onnx_bytes).hexdigest()

    def model_json(version: int) -> bytes:
        doc = {
            "name": name,
            "version": version,
            "platform": "onnxruntime_onnx",
            "labels": labels,
            "preprocess": preprocess,
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *input_shape]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, num_classes]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, num_classes]},
                        *[{"name": f["name"], "datatype": "FP32", "shape": f["shape"]} for f in feature_maps]],
            "feature_maps": feature_maps,
            "arithmetic": analyze_module(model, input_shape).to_dict(),
            "training": training,
            "export": {"opset": OPSET, "parity_max_abs_diff": worst, "parity_batches": list(PARITY_BATCHES),
                       "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "versions": _versions()},
            "onnx": {"file": "model.onnx", "sha256": sha256, "bytes": len(onnx_bytes)},
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    folder, _ = write_version(repository, name, {"model.onnx": onnx_bytes, "model.json": model_json})
    return folder


def export_checkpoint(checkpoint: str, *, repository: str, name: str | None = None) -> str:
    """Export a training checkpoint (models.train) into the repository."""
    from .train import build_model, config_from_checkpoint

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        config = config_from_checkpoint(state)
    except FileNotFoundError:
        raise ExportError(f"no checkpoint at {checkpoint}") from None
    except Exception as exc:
        raise ExportError(f"{checkpoint} is not a convserve checkpoint ({type(exc).__name__})") from None
    preprocess = state["preprocess"]
    model = build_model(config, preprocess["channels"], len(state["labels"]))
    model.load_state_dict(state["model"])
    last = state["history"][-1]
    training = {
        "dataset": config.dataset, "arch": config.arch, "width_mult": config.width_mult,
        "split": state["split"], "epochs": state["epoch"], "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"], "train_accuracy": last["train_accuracy"], "seed": config.seed,
        "optimizer": config.optimizer, "lr": config.lr, "batch_size": config.batch_size,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "versions": _versions(),
    }
    samples = state.get("samples")
    return export_model(model, repository=repository, name=name or config.model_name(), labels=state["labels"],
                        preprocess=preprocess, training=training,
                        real_inputs=samples.numpy() if samples is not None else None)


def export_random_init(arch: str, *, repository: str, name: str, num_classes: int = 10,
                       input_shape: tuple[int, int, int] | None = None, seed: int = 0, **kwargs) -> str:
    """An untrained zoo model (for benchmarks and arithmetic); labels class_0 ... class_{K-1}."""
    torch.manual_seed(seed)
    try:
        model = get_model(arch, num_classes=num_classes,
                          **({"in_channels": input_shape[0]} if input_shape else {}), **kwargs)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    channels, height, width = input_shape or model.default_input
    preprocess = {"height": height, "width": width, "channels": channels, "resize": "bilinear",
                  "mean": [0.5] * channels, "std": [0.25] * channels, "scale": 1 / 255, "layout": "NCHW",
                  "color_mode": "L" if channels == 1 else "RGB", "channel_order": "L" if channels == 1 else "RGB"}
    training = {"dataset": None, "arch": arch, "random_init": True, "seed": seed, "epochs": 0,
                "test_accuracy": None, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "versions": _versions()}
    return export_model(model, repository=repository, name=name, labels=[f"class_{i}" for i in range(num_classes)],
                        preprocess=preprocess, training=training)
