"""Export a zoo CNN to ONNX with its feature maps as extra outputs, check it, write it as a version.

Graph: input `input` (N, C, H, W) float32 with a dynamic batch; outputs `logits` (N, K),
`probabilities` (N, K) and one per feature-map tap, named as the zoo names the layer (conv1 ...),
taken after its activation. Nothing is written until onnx.checker passes and onnxruntime's outputs
equal PyTorch's within `ATOL` for every output at batch 1 and 7, on real and on random inputs. A
lower precision (`precision.py`: INT8, FP16) is made from that checked FP32 graph, and is written
only if its held-out accuracy stays within the gate.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import os
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

from convserve.contract import (
    CARD_FILE,
    FILTERS_FILE,
    INPUT_NAME,
    MODEL_FILE,
    ModelCard,
    PreprocessSpec,
    TensorSpec,
    normalize,
)

from .arithmetic_torch import analyze_module
from .checkpoint import Checkpoint, CheckpointError
from .config import TrainError
from .data import DataError, load_dataset
from .precision import (
    DEFAULT_CALIBRATION,
    DEFAULT_MAX_ACCURACY_DROP,
    PrecisionError,
    PrecisionPlan,
    lower,
)
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

    def forward(self, input: torch.Tensor):
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
            wrapper,
            (example,),
            path,
            dynamo=True,
            opset_version=OPSET,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=output_names(model),
            dynamic_shapes={"input": {0: torch.export.Dim("batch", min=1, max=1 << 16)}},
            verbose=False,
        )
        with open(path, "rb") as handle:
            return handle.read()


def check_parity(
    model: ZooCNN, onnx_bytes: bytes, input_shape: tuple[int, int, int], real_inputs: np.ndarray | None, seed: int = 0
) -> dict[str, float]:
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
            got = session.run(names, {INPUT_NAME: x})
            for name, e, g in zip(names, expected, got):
                if e.shape != g.shape:
                    raise ExportError(f"output {name} has shape {g.shape} in ONNX, {e.shape} in PyTorch")
                diff = float(np.max(np.abs(e - g))) if e.size else 0.0
                worst[name] = max(worst[name], diff)
                if diff > ATOL:
                    raise ExportError(
                        f"output {name} differs from PyTorch by {diff:.3g} (> {ATOL}) at batch {batch} on {kind} inputs"
                    )
    return worst


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def export_model(
    model: ZooCNN,
    *,
    repository: str,
    name: str,
    labels: list[str],
    preprocess: PreprocessSpec,
    training: dict,
    real_inputs: np.ndarray | None = None,
    precision: PrecisionPlan | None = None,
) -> str:
    """Export, check and write `model` as the next version of `name`; returns the version folder.
    With a precision plan, the version is the lowered graph (INT8 or FP16), if it passes its gate."""
    input_shape = preprocess.input_shape
    model = model.eval()
    onnx_bytes = to_onnx_bytes(model, input_shape)
    worst = check_parity(model, onnx_bytes, input_shape, real_inputs)
    record: dict = {"precision": "fp32"}
    if precision is not None and precision.precision != "fp32":
        try:
            onnx_bytes, record = lower(onnx_bytes, precision)
        except PrecisionError as exc:
            raise ExportError(str(exc)) from None
    with torch.no_grad():
        _, maps = model.forward_with_feature_maps(torch.zeros(1, *input_shape))
    filters = feature_map_filters(model)
    feature_maps = [
        {
            "name": tap,
            "layer": f"features.{child}",
            "shape": [-1, *maps[tap].shape[1:]],
            **({"conv": filters[tap][0]} if tap in filters else {}),
        }
        for tap, child in model.feature_taps.items()
    ]
    outputs = [
        TensorSpec("logits", "FP32", (-1, len(labels))),
        TensorSpec("probabilities", "FP32", (-1, len(labels))),
        *[TensorSpec(f["name"], "FP32", tuple(f["shape"])) for f in feature_maps],
    ]
    card = ModelCard(
        name=name,
        version=0,
        labels=labels,
        preprocess=preprocess,
        outputs=outputs,
        feature_maps=feature_maps,
        sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        onnx_bytes=len(onnx_bytes),
        arithmetic=analyze_module(model, input_shape).to_dict(),
        training=training,
        export={
            "opset": OPSET,
            "parity_max_abs_diff": worst,
            "parity_batches": list(PARITY_BATCHES),  # of the FP32 graph, before any lowering
            "date": _now(),
            "versions": _versions(),
            **record,
        },
    )

    def card_json(version: int) -> bytes:  # the card records the version the writer claims
        card.version = version
        return card.to_json()

    kernels = io.BytesIO()
    np.savez(kernels, **{tap: weights for tap, (_, weights) in filters.items()})
    files = {MODEL_FILE: onnx_bytes, FILTERS_FILE: kernels.getvalue(), CARD_FILE: card_json}
    folder, _ = write_version(repository, name, files)
    return folder


def feature_map_filters(model: ZooCNN) -> dict[str, tuple[str, np.ndarray]]:
    """{feature-map name: (conv row name in the arithmetic table, its kernels (out, in, kh, kw))} for
    the feature maps that one convolution makes: the tap's own child of `features`, or the nearest
    weighted one before it, holding exactly one Conv2d (an inception block's output has many, and
    no single filter bank)."""
    children = list(model.features.named_children())
    found = {}
    for tap, child in model.feature_taps.items():
        index = next(i for i, (name, _) in enumerate(children) if name == child)
        while index > 0 and not any(True for _ in children[index][1].parameters()):
            index -= 1
        name, module = children[index]
        convs = [(sub, m) for sub, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)]
        if len(convs) == 1:
            sub, conv = convs[0]
            layer = name + (f".{sub}" if sub else "")  # the arithmetic table's row name (conv1, conv1.conv)
            found[tap] = (layer, conv.weight.detach().cpu().numpy().astype(np.float32))
    return found


def export_checkpoint(
    checkpoint: str,
    *,
    repository: str,
    name: str | None = None,
    precision: str = "fp32",
    calibration: int = DEFAULT_CALIBRATION,
    calibration_method: str = "minmax",
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
) -> str:
    """Export a training checkpoint into the repository (as the next version of `name`), in FP32 or,
    with `precision`, INT8 (calibrated on `calibration` training images) or FP16, gated on the
    held-out split's accuracy against FP32."""
    try:
        state = Checkpoint.load(checkpoint)
        model = state.build_model()
    except (CheckpointError, TrainError) as exc:
        raise ExportError(str(exc)) from None
    plan = None
    if precision != "fp32":
        plan = _plan_from_training(state, precision, calibration, calibration_method, max_accuracy_drop)
    config, last = state.config, state.history[-1]
    training = {
        "dataset": config.dataset,
        "arch": config.arch,
        "width_mult": config.width_mult,
        "split": state.split,
        "epochs": state.epoch,
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "train_accuracy": last["train_accuracy"],
        "seed": config.seed,
        "optimizer": config.optimizer,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "date": _now(),
        "versions": _versions(),
    }
    return export_model(
        model,
        repository=repository,
        name=name or config.dataset_kind(),
        labels=state.labels,
        preprocess=state.preprocess,
        training=training,
        real_inputs=state.samples.numpy() if state.samples is not None else None,
        precision=plan,
    )


def _plan_from_training(
    state: Checkpoint, precision: str, calibration: int, method: str, max_accuracy_drop: float
) -> PrecisionPlan:
    """The training run's own data, read again: calibration images from its training split, the gate
    on its held-out split, both as the model sees them (the checkpoint's preprocessing)."""
    config, spec = state.config, state.preprocess
    try:
        data = load_dataset(
            config.dataset,
            size=(spec.height, spec.width),
            channels=spec.channels,
            seed=config.seed,
            test_fraction=config.test_fraction,
            typed_digits=config.typed_digits,
        )
    except DataError as exc:
        raise ExportError(f"{precision} needs the training data again: {exc}") from None
    split = {"train": len(data.train_labels), "test": len(data.test_labels)}
    if state.split and {k: state.split.get(k) for k in split} != split:
        raise ExportError(
            f"dataset {config.dataset!r} now splits {split['train']}/{split['test']}, the training run saw "
            f"{state.split.get('train')}/{state.split.get('test')}: its held-out split is not the one to gate on"
        )
    if calibration < 1:
        raise ExportError("--calibration must be at least 1 image")
    picks = np.sort(np.random.default_rng(config.seed).permutation(len(data.train_images))[:calibration])
    return PrecisionPlan(
        precision,
        calibration=normalize(data.train_images[picks], spec),
        held_out=(normalize(data.test_images, spec), data.test_labels),
        method=method,
        max_accuracy_drop=max_accuracy_drop,
    )


def export_random_init(
    arch: str,
    *,
    repository: str,
    name: str,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] | None = None,
    seed: int = 0,
    precision: str = "fp32",
    calibration: int = DEFAULT_CALIBRATION,
    calibration_method: str = "minmax",
    **kwargs,
) -> str:
    """An untrained zoo model (for benchmarks and arithmetic); labels class_0 ... class_{K-1}. A lower
    precision calibrates on synthetic images (standard normal, as normalized inputs are) and has no
    held-out accuracy to gate on: its card says so."""
    torch.manual_seed(seed)
    try:
        model = get_model(
            arch, num_classes=num_classes, **({"in_channels": input_shape[0]} if input_shape else {}), **kwargs
        )
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    channels, height, width = input_shape or model.default_input
    preprocess = PreprocessSpec(height, width, channels, "bilinear", (0.5,) * channels, (0.25,) * channels)
    training = {
        "dataset": None,
        "arch": arch,
        "random_init": True,
        "seed": seed,
        "epochs": 0,
        "test_accuracy": None,
        "date": _now(),
        "versions": _versions(),
    }
    plan = None
    if precision != "fp32":
        synthetic = np.random.default_rng(seed).standard_normal((max(1, calibration), channels, height, width))
        plan = PrecisionPlan(precision, calibration=synthetic.astype(np.float32), method=calibration_method)
        plan.synthetic = True
    return export_model(
        model,
        repository=repository,
        name=name,
        labels=[f"class_{i}" for i in range(num_classes)],
        preprocess=preprocess,
        training=training,
        precision=plan,
    )
