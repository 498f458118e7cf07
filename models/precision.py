"""A version's precision, lowered from the FP32 export and measured against it before it is written.

- `int8`: onnxruntime's static quantization in the QDQ format, weights per channel (INT8), activations
  per tensor (UINT8), their ranges calibrated on training images. Graph inputs and outputs stay FP32
  (the feature maps are dequantized where they leave the graph), so clients see the same tensors.
- `fp16`: weights and activations in FP16, inputs and outputs FP32 (Cast at the edges): for GPUs.

Each lowered model runs on the held-out split beside the FP32 one; a version that loses more than
`max_accuracy_drop` points of accuracy is refused with the numbers. An untrained export has no
held-out accuracy: it is calibrated on synthetic images and its record says the gate did not apply.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import numpy as np

from convserve.contract import INPUT_NAME

PRECISIONS = ("fp32", "fp16", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIBRATION = 300  # training images
DEFAULT_MAX_ACCURACY_DROP = 1.0  # points of held-out accuracy
_BATCH = 64


class PrecisionError(ValueError):
    """A lowered version that fails its gate, or cannot be built: the message has the numbers."""


@dataclass
class PrecisionPlan:
    precision: str  # fp16 | int8
    calibration: Optional[np.ndarray] = None  # float32 (N, C, H, W), as the model sees them (int8)
    held_out: Optional[tuple[np.ndarray, np.ndarray]] = None  # (inputs, labels); None: no gate (untrained)
    method: str = "minmax"
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP
    synthetic: bool = False  # calibrated on synthetic images (an untrained export)


def accuracy(onnx_bytes: bytes, inputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent of a model's `logits` on (inputs, labels), with onnxruntime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    right = 0
    for start in range(0, len(inputs), _BATCH):
        (logits,) = session.run(["logits"], {INPUT_NAME: np.ascontiguousarray(inputs[start : start + _BATCH])})
        right += int((logits.argmax(axis=1) == labels[start : start + _BATCH]).sum())
    return 100.0 * right / max(1, len(inputs))


def _batches(images: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    """Equal batches (the histogram calibrators stack them): a remainder short of a batch is left out."""
    size = min(_BATCH, len(images))
    for start in range(0, len(images) - size + 1, size):
        yield {INPUT_NAME: np.ascontiguousarray(images[start : start + size], dtype=np.float32)}


def quantize_int8(onnx_bytes: bytes, calibration: np.ndarray, method: str = "minmax") -> bytes:
    """Static QDQ quantization: per-channel INT8 weights, UINT8 activations calibrated on `calibration`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise PrecisionError(f"calibration method {method!r}: one of {', '.join(CALIBRATION_METHODS)}")
    if calibration is None or not len(calibration):
        raise PrecisionError("int8 needs calibration images")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = _batches(calibration)

        def get_next(self):
            return next(self._batches, None)

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with tempfile.TemporaryDirectory() as tmp:
        source, prepared, out = (os.path.join(tmp, f) for f in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        with open(source, "wb") as handle:
            handle.write(onnx_bytes)
        quant_pre_process(source, prepared, skip_symbolic_shape=True)  # shapes and folds, as ORT advises
        quantize_static(
            prepared,
            out,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        with open(out, "rb") as handle:
            return handle.read()


def to_fp16(onnx_bytes: bytes) -> bytes:
    """Weights and activations FP16, inputs and outputs FP32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load_from_string(onnx_bytes), keep_io_types=True)
    return model.SerializeToString()


def lower(onnx_bytes: bytes, plan: PrecisionPlan) -> tuple[bytes, dict]:
    """The lowered model and what the card records of it; PrecisionError when its gate refuses it."""
    if plan.precision == "int8":
        lowered = quantize_int8(onnx_bytes, plan.calibration, plan.method)
        record: dict = {
            "precision": "int8",
            "quantization": {
                "format": "QDQ",
                "weights": "int8, per channel",
                "activations": "uint8, per tensor",
                "calibration_method": plan.method,
                "calibration_images": int(len(plan.calibration) // min(_BATCH, len(plan.calibration)))
                * min(_BATCH, len(plan.calibration)),
                "calibration_source": "synthetic (standard normal)" if plan.synthetic else "training split",
            },
        }
    elif plan.precision == "fp16":
        lowered = to_fp16(onnx_bytes)
        record = {"precision": "fp16", "io": "fp32 inputs and outputs (keep_io_types)"}
    else:
        raise PrecisionError(f"precision {plan.precision!r}: one of {', '.join(PRECISIONS)}")
    if plan.held_out is None:
        record["accuracy"] = None
        record["gate"] = "none: an untrained export has no held-out accuracy to keep"
        _runs(lowered, plan)
        return lowered, record
    inputs, labels = plan.held_out
    try:
        base, got = accuracy(onnx_bytes, inputs, labels), accuracy(lowered, inputs, labels)
    except Exception as exc:  # onnxruntime cannot run it here (no kernel for a type on this CPU ...)
        raise PrecisionError(f"the {plan.precision} model does not run on this machine's CPU: {exc}") from None
    drop = base - got
    record["accuracy"] = {
        "fp32": round(base, 3),
        plan.precision: round(got, 3),
        "drop_points": round(drop, 3),
        "held_out_images": len(inputs),
        "max_accuracy_drop": plan.max_accuracy_drop,
    }
    if drop > plan.max_accuracy_drop:
        raise PrecisionError(
            f"{plan.precision} loses {drop:.2f} points of held-out accuracy ({base:.2f}% FP32 -> {got:.2f}% "
            f"{plan.precision.upper()} on {len(inputs)} images), more than --max-accuracy-drop "
            f"{plan.max_accuracy_drop:g}: not written"
        )
    return lowered, record


def _runs(lowered: bytes, plan: PrecisionPlan) -> None:
    """An ungated version must at least run: one batch through onnxruntime."""
    import onnxruntime as ort

    sample = plan.calibration[:2] if plan.calibration is not None else None
    try:
        session = ort.InferenceSession(lowered, providers=["CPUExecutionProvider"])
        if sample is not None:
            session.run(None, {INPUT_NAME: np.ascontiguousarray(sample, dtype=np.float32)})
    except Exception as exc:
        raise PrecisionError(f"the {plan.precision} model does not run on this machine's CPU: {exc}") from None
