"""An inference request and its answer as both doors hand them to the core: no protocol in them.

Runs in each front-end. Each door reads its own wire format into `InputTensor`s and plain parameter
values (gRPC: its message's fields; HTTP: V2 JSON and the binary part after it) and calls
`parse_request`, which holds every check a request meets before it reaches a model: the input's name,
datatype and rank, the batch, where its data is (raw bytes, typed values, or a shared-memory region),
and the parameters `timeout`, `priority`, `classification`, `datatype` and `shared_memory_*`. The
counts and sizes are checked before anything is unpacked, so the work is bounded by max_batch_size,
not by what the request claims. Raw FP32 bytes become an array over the very bytes (no copy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from convserve.contract import IMAGE_INPUT_NAME, INPUT_NAME
from convserve.wire import OUTPUT_DATATYPES, SHM_BYTE_SIZE, SHM_OFFSET, SHM_REGION, ShmRef, deserialize_bytes

from ..errors import InvalidInput, ModelNotFound
from ..rules import check_batch_size

Parameters = Mapping[str, Any]  # a request's, an input's or an output's parameters as plain values


@dataclass(frozen=True)
class ModelInputs:
    """What a model takes: its own FP32 input's name, and whether encoded images (`image`) too."""

    tensor: str = INPUT_NAME
    images: bool = True


DEFAULT_INPUTS = ModelInputs()  # convserve's own exports (and an unknown model, refused later)


@dataclass
class InputTensor:
    """One input as a door read it: its data in exactly one of `raw` (the bytes), `values` (typed:
    floats for FP32, encoded images for BYTES) or a shared-memory region its parameters name."""

    name: str
    datatype: str
    shape: Sequence[int]
    parameters: Parameters
    raw: Union[bytes, memoryview, None] = None
    values: Optional[Sequence[Any]] = None


@dataclass
class RequestedOutput:
    name: str
    classification: int = 0  # top-k as BYTES strings when > 0
    datatype: str = "FP32"  # FP16 halves a feature map's bytes
    shm: Optional[ShmRef] = None  # write it there instead of into the response


@dataclass
class InferRequest:
    model_name: str
    model_version: str
    id: str
    input_name: str = INPUT_NAME  # INPUT_NAME or IMAGE_INPUT_NAME
    shape: tuple[int, ...] = ()  # as the request states it
    array: Optional[np.ndarray] = None  # for "input": float32 (N, C, H, W)
    images: Optional[list[bytes]] = None  # for "image": encoded PNG/JPEG, N of them
    input_shm: Optional[ShmRef] = None  # the input's bytes are there: the data plane reads them (read_input)
    outputs: list[RequestedOutput] = field(default_factory=list)
    timeout_us: Optional[int] = None
    tensor_name: str = INPUT_NAME  # the model's own name of its FP32 input (for messages)

    @property
    def batch(self) -> int:
        """Images in the request (known before any shared-memory input is read)."""
        if self.images is not None:
            return len(self.images)
        return self.array.shape[0] if self.array is not None else self.shape[0]


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes  # empty when the tensor went to shared memory
    shm: Optional[ShmRef] = None


@dataclass
class InferResult:
    model_name: str
    model_version: str  # the version that served it
    outputs: list[OutputTensor]
    parameters: dict[str, int | str]  # the request's own metrics (queue_us, compute_us, ...)


INT64_MAX = 2**63 - 1  # every integer parameter fits V2's int64 (JSON numbers may not)


def _unsigned(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX


def shm_ref(parameters: Parameters, what: str) -> Optional[ShmRef]:
    """The shared_memory_* parameters of an input or a requested output, checked; None without them."""
    if SHM_REGION not in parameters:
        return None
    region = parameters[SHM_REGION]
    if not isinstance(region, str) or not region:
        raise InvalidInput(f"{what}: shared_memory_region must be a region name")
    size, offset = parameters.get(SHM_BYTE_SIZE), parameters.get(SHM_OFFSET, 0)
    for key, value in ((SHM_BYTE_SIZE, size), (SHM_OFFSET, offset)):
        if not _unsigned(value):
            raise InvalidInput(f"{what}: {key} must be a non-negative integer")
    return ShmRef(region, int(size or 0), int(offset))


def parse_request(
    model_name: str,
    model_version: str,
    request_id: str,
    parameters: Parameters,
    inputs: Sequence[InputTensor],
    outputs: Sequence[tuple[str, Parameters]],
    max_batch_size: Optional[int] = None,
    model_inputs: ModelInputs = DEFAULT_INPUTS,
) -> InferRequest:
    """Check a request's consistency and turn it into an InferRequest. `model_inputs` names the
    model's own input (InferRequest.input_name calls it INPUT_NAME from here on)."""
    if not model_name:  # as Triton: no name, no such model
        raise ModelNotFound("unknown model ''")
    own = model_inputs.tensor
    names = [t.name for t in inputs]
    if not (len(names) == 1 or (model_inputs.images and sorted(names) == sorted((own, IMAGE_INPUT_NAME)))):
        either = f"{own!r} (FP32)" + (" or 'image' (BYTES), or both" if model_inputs.images else "")
        raise InvalidInput(f"expected {either}; got {len(names)} inputs")
    # Both optional inputs may come (perf_analyzer sends every declared input): the tensor is used, the
    # images are not decoded, and the two must be the same batch.
    index = names.index(own) if len(names) == 2 else 0
    if len(names) == 2:
        other = inputs[1 - index]
        batch = [int(d) for d in inputs[index].shape[:1]], [int(d) for d in other.shape[:1]]
        if batch[0] != batch[1]:
            raise InvalidInput(f"inputs {own!r} and 'image' hold different batches: {batch[0]} and {batch[1]}")
    # Of the parameters clients send (priority, sequence_*, binary_data_output ...), only `timeout`
    # means something here; the others are accepted and ignored, as Triton does for a stateless model,
    # once they have the type Triton checks (priority: an unsigned integer).
    timeout_us = None
    if parameters:
        if "timeout" in parameters:
            if not _unsigned(parameters["timeout"]):
                raise InvalidInput("request parameter 'timeout' must be a non-negative integer (microseconds)")
            timeout_us = parameters["timeout"] or None
        if "priority" in parameters and not _unsigned(parameters["priority"]):
            raise InvalidInput("request parameter 'priority' must be an unsigned integer")
    tensor = inputs[index]
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input shape {list(shape)} has a negative dimension")
    if tensor.name == IMAGE_INPUT_NAME and len(shape) == 2 and shape[1] == 1:
        shape = (shape[0],)  # [N, 1], as the config's dims [1] say, is the same batch as [N]
    expected = {own: ("FP32", 4, "[N, C, H, W]")}
    if model_inputs.images:
        expected[IMAGE_INPUT_NAME] = ("BYTES", 1, "[N] or [N, 1]")
    if tensor.name not in expected:
        takes = " or ".join(f"{n!r} ({d})" for n, (d, _, _) in expected.items())
        raise InvalidInput(f"unknown input {tensor.name!r}; this model takes {takes}")
    datatype, rank, form = expected[tensor.name]
    if tensor.datatype != datatype:
        raise InvalidInput(f"input {tensor.name!r} must be {datatype}, not {tensor.datatype}")
    if len(shape) != rank:
        raise InvalidInput(f"input {tensor.name!r} must have shape {form}, not {list(shape)}")
    if shape[0] < 1:
        raise InvalidInput("the batch is empty")
    if max_batch_size is not None:
        check_batch_size(shape[0], max_batch_size)
    shm = shm_ref(tensor.parameters, f"input {tensor.name!r}") if tensor.parameters else None
    if sum((tensor.raw is not None, tensor.values is not None, shm is not None)) > 1:
        raise InvalidInput(f"input {tensor.name!r} has its data in more than one place (raw, typed, shared memory)")
    internal = IMAGE_INPUT_NAME if tensor.name == IMAGE_INPUT_NAME else INPUT_NAME
    parsed = InferRequest(model_name, model_version, request_id, internal, shape, input_shm=shm, timeout_us=timeout_us)
    parsed.tensor_name = own
    if tensor.raw is not None:
        read_input(parsed, tensor.raw)
    elif shm is None:  # typed values, or none at all (counted as none held)
        _read_values(parsed, tensor.values if tensor.values is not None else ())
    parsed.outputs = _requested_outputs(outputs)
    return parsed


def _read_values(request: InferRequest, values: Sequence[Any]) -> None:
    """Typed contents: the images themselves, or FP32 numbers (flat, or nested as the shape)."""
    shape = request.shape
    if request.input_name == IMAGE_INPUT_NAME:
        if len(values) != shape[0]:  # checked before the list is copied
            raise InvalidInput(f"input 'image' has shape [{shape[0]}] but holds {len(values)} elements")
        _set_images(request, list(values))
        return
    count = math.prod(shape)
    if len(values) not in (count, shape[0]):  # flat, or nested by image: anything else is refused unread
        raise InvalidInput(
            f"input {request.tensor_name!r} of shape {list(shape)} needs {count} values, got {len(values)}"
        )
    try:
        array = np.asarray(values)  # its own type first: strings and booleans are not FP32 numbers
    except (TypeError, ValueError):  # ragged
        array = None
    if array is None or array.dtype.kind not in "fiu":
        raise InvalidInput(f"input {request.tensor_name!r}: its data is not a list of FP32 numbers") from None
    array = array.astype(np.float32, copy=False)
    if array.size != count:
        raise InvalidInput(
            f"input {request.tensor_name!r} of shape {list(shape)} needs {count} values, got {array.size}"
        )
    request.array = array.reshape(shape)


def _requested_outputs(outputs: Sequence[tuple[str, Parameters]]) -> list[RequestedOutput]:
    """The outputs asked for, checked. The same output may be asked for twice (plain and with
    classification): as in Triton 2.51, it comes back once, as classification."""
    requested = []
    for name, parameters in outputs:
        wanted = RequestedOutput(name, shm=shm_ref(parameters, f"output {name!r}") if parameters else None)
        if "classification" in parameters:
            value = parameters["classification"]
            if not _unsigned(value) or value < 1:
                raise InvalidInput(f"output {name!r}: classification must be a positive integer")
            wanted.classification = value
        if "datatype" in parameters:
            value = parameters["datatype"]
            if value not in OUTPUT_DATATYPES:
                raise InvalidInput(f"output {name!r}: datatype must be FP32 or FP16, not {value!r}")
            wanted.datatype = value
        # other keys (binary_data, ...) are hints of the HTTP protocol, handled by its door
        requested.append(wanted)
    classified = {o.name for o in requested if o.classification}
    seen: set[tuple[str, int]] = set()
    kept = []
    for wanted in requested:
        key = (wanted.name, wanted.classification)
        if (wanted.classification or wanted.name not in classified) and key not in seen:
            seen.add(key)
            kept.append(wanted)
    return kept


def read_input(request: InferRequest, raw: bytes | memoryview) -> None:
    """Fill the request's array or images from the input's bytes (raw contents, an HTTP body's binary
    part, or a shared-memory view). FP32 input becomes an array over the very bytes (np.frombuffer: no copy).
    """
    if request.input_name == IMAGE_INPUT_NAME:
        try:
            _set_images(request, deserialize_bytes(raw, most=request.shape[0]))
        except ValueError as exc:
            raise InvalidInput(f"input 'image': {exc}") from None
        return
    count = math.prod(request.shape)
    if len(raw) != count * 4:
        raise InvalidInput(
            f"input {request.tensor_name!r} of shape {list(request.shape)} needs {count * 4} bytes, got {len(raw)}"
        )
    request.array = np.frombuffer(raw, dtype="<f4").reshape(request.shape)


def _set_images(request: InferRequest, images: list[bytes]) -> None:
    if len(images) != request.shape[0]:
        raise InvalidInput(f"input 'image' has shape [{request.shape[0]}] but holds {len(images)} elements")
    request.images = images
