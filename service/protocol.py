"""V2 messages <-> domain objects. Converts and validates the wire format; knows no onnxruntime.

Raw contents become arrays with np.frombuffer (no copy); a response's tensors are built once as
bytes and placed in raw_output_contents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import InvalidInput
from .postprocess import deserialize_bytes
from .proto import grpc_service_pb2 as pb

_DTYPES = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "UINT8": "u1"}


@dataclass
class RequestedOutput:
    name: str
    classification: int = 0  # top-k as BYTES strings when > 0
    datatype: str = "FP32"  # FP16 halves a feature map's bytes


@dataclass
class InferRequest:
    model_name: str
    model_version: str
    id: str
    array: Optional[np.ndarray] = None  # for "input": float32 (N, C, H, W)
    images: Optional[list[bytes]] = None  # for "image": encoded PNG/JPEG, N of them
    outputs: list[RequestedOutput] = field(default_factory=list)
    timeout_us: Optional[int] = None

    @property
    def batch(self) -> int:
        if self.images is not None:
            return len(self.images)
        assert self.array is not None
        return self.array.shape[0]


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass
class InferResult:
    model_name: str
    model_version: str  # the version that served it
    outputs: list[OutputTensor]
    parameters: dict[str, int | str]  # the request's own metrics (queue_us, compute_us, ...)


def _param_value(param: pb.InferParameter):
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def parse_infer_request(request: pb.ModelInferRequest) -> InferRequest:
    """Check a ModelInferRequest's wire-level consistency and turn it into an InferRequest."""
    if not request.model_name:
        raise InvalidInput("model_name is empty")
    if len(request.inputs) != 1:
        raise InvalidInput(f"expected one input, 'input' (FP32) or 'image' (BYTES); got {len(request.inputs)}")
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput("raw_input_contents must hold one entry per input")
    # Of the parameters clients send (priority, sequence_*, binary_data_output ...), only `timeout`
    # means something here; the others are accepted and ignored, as Triton does for a stateless model.
    timeout_us = None
    for key, param in request.parameters.items():
        if key == "timeout":
            value = _param_value(param)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInput("request parameter 'timeout' must be a non-negative integer (microseconds)")
            timeout_us = value or None
    tensor = request.inputs[0]
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input shape {list(shape)} has a negative dimension")
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    if raw is not None and tensor.HasField("contents"):
        raise InvalidInput(f"input {tensor.name!r} has both raw and typed contents")
    parsed = InferRequest(request.model_name, request.model_version, request.id, timeout_us=timeout_us)
    if tensor.name == "image":
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input 'image' must be BYTES, not {tensor.datatype}")
        if len(shape) != 1:
            raise InvalidInput(f"input 'image' must have shape [N], not {list(shape)}")
        try:
            images = deserialize_bytes(raw) if raw is not None else list(tensor.contents.bytes_contents)
        except ValueError as exc:
            raise InvalidInput(f"input 'image': {exc}") from None
        if len(images) != shape[0]:
            raise InvalidInput(f"input 'image' has shape [{shape[0]}] but holds {len(images)} elements")
        parsed.images = images
    elif tensor.name == "input":
        if tensor.datatype != "FP32":
            raise InvalidInput(f"input 'input' must be FP32, not {tensor.datatype}")
        if len(shape) != 4:
            raise InvalidInput(f"input 'input' must have shape [N, C, H, W], not {list(shape)}")
        count = int(np.prod(shape))
        if raw is not None:
            if len(raw) != count * 4:
                raise InvalidInput(f"input 'input' of shape {list(shape)} needs {count * 4} bytes, got {len(raw)}")
            array = np.frombuffer(raw, dtype="<f4").reshape(shape)
        else:
            values = tensor.contents.fp32_contents
            if len(values) != count:
                raise InvalidInput(f"input 'input' of shape {list(shape)} needs {count} values, got {len(values)}")
            array = np.asarray(values, dtype=np.float32).reshape(shape)
        parsed.array = array
    else:
        raise InvalidInput(f"unknown input {tensor.name!r}; a served CNN takes 'input' (FP32) or 'image' (BYTES)")
    if parsed.batch < 1:
        raise InvalidInput("the batch is empty")
    seen = set()
    for out in request.outputs:
        if out.name in seen:
            raise InvalidInput(f"output {out.name!r} is requested twice")
        seen.add(out.name)
        wanted = RequestedOutput(out.name)
        for key, param in out.parameters.items():
            value = _param_value(param)
            if key == "classification":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise InvalidInput(f"output {out.name!r}: classification must be a non-negative integer")
                wanted.classification = value
            elif key == "datatype":
                if value not in ("FP32", "FP16"):
                    raise InvalidInput(f"output {out.name!r}: datatype must be FP32 or FP16, not {value!r}")
                wanted.datatype = value
            # other keys (binary_data, ...) are HTTP-protocol hints with no meaning over gRPC
        parsed.outputs.append(wanted)
    return parsed


def build_infer_response(request: InferRequest, result: InferResult) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=result.model_name, model_version=result.model_version, id=request.id)
    for tensor in result.outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(tensor.data)
    for key, value in result.parameters.items():
        if isinstance(value, str):
            response.parameters[key].string_param = value
        else:
            response.parameters[key].int64_param = int(value)
    return response


def output_array(response: pb.ModelInferResponse, name: str) -> np.ndarray:
    """A numeric output of a response as an array (for clients and tests)."""
    for index, tensor in enumerate(response.outputs):
        if tensor.name == name:
            if tensor.datatype == "BYTES":
                return np.array(deserialize_bytes(response.raw_output_contents[index]), dtype=object).reshape(
                    tuple(tensor.shape)
                )
            return np.frombuffer(response.raw_output_contents[index], dtype=_DTYPES[tensor.datatype]).reshape(
                tuple(tensor.shape)
            )
    raise KeyError(name)
