"""V2 HTTP/REST inference bodies <-> the core's InferRequest and InferResult.

Runs in each front-end. A request is V2 JSON, optionally followed by binary tensors (Triton's binary
tensor extension: the JSON's length in `Inference-Header-Content-Length`, each input's bytes named by
its `binary_data_size`). Each input is read as an `InputTensor` for the core's one set of checks
(`inference.parse_request`): binary data as a view of the body (no copy: FP32 becomes an array over
it), JSON `data` as typed values (numbers, or base64 strings for BYTES). The answer is JSON around
the output tensors, each as JSON numbers or, with `binary_data`, as raw bytes after the JSON.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from convserve.wire import DTYPES, SHM_REGION, deserialize_bytes

from ...errors import InvalidInput
from ..inference import DEFAULT_INPUTS, InferRequest, InferResult, InputTensor, ModelInputs, parse_request

HEADER_LENGTH = "Inference-Header-Content-Length"


def _parameters(value: Any, where: str) -> Mapping[str, Any]:
    """A JSON `parameters` object: values are booleans, numbers or strings, as V2 says."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, (bool, int, float, str)) for v in value.values()):
        raise InvalidInput(f"{where}: parameters are an object of booleans, numbers or strings")
    return value


def _values(tensor: dict, name: str, datatype: str) -> Any:
    """An input's JSON `data` as typed values: base64 strings decode to the images they hold."""
    data = tensor.get("data")
    if data is None:
        raise InvalidInput(f"input {name!r} has no data (JSON `data` or binary_data_size)")
    if datatype != "BYTES":  # numbers: a list, or the array a large body's parser made of it
        return data if isinstance(data, (list, np.ndarray)) else [data]
    items = np.asarray(data, dtype=object).ravel()
    if not all(isinstance(item, str) for item in items):
        raise InvalidInput("BYTES input elements in JSON are base64 strings")
    try:
        return [base64.b64decode(item, validate=True) for item in items]
    except ValueError:
        raise InvalidInput("a BYTES input element is not valid base64") from None


def parse_infer_request(
    name: str,
    version: str,
    header: Any,
    binary: memoryview,
    max_batch_size: int | None = None,
    model_inputs: ModelInputs = DEFAULT_INPUTS,
) -> InferRequest:
    """V2 JSON (and the binary part after it), read as the core's InferRequest."""
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidInput("the request body is a JSON object with a list of inputs")
    inputs, offset = [], 0
    for tensor in header["inputs"]:
        if not isinstance(tensor, dict):
            raise InvalidInput("each input is a JSON object")
        input_name, datatype = str(tensor.get("name", "")), str(tensor.get("datatype", ""))
        shape = tensor.get("shape", [])
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidInput(f"input {input_name!r}: shape is a list of integers")
        parameters = dict(_parameters(tensor.get("parameters"), f"input {input_name!r}"))
        size = parameters.pop("binary_data_size", None)
        read = InputTensor(input_name, datatype, shape, parameters)
        if SHM_REGION in parameters:
            pass  # its bytes are in the region
        elif size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise InvalidInput(f"input {input_name!r}: binary_data_size {size} runs past the body")
            read.raw = binary[offset : offset + size]
            offset += size
        else:
            read.values = _values(tensor, input_name, datatype)
        inputs.append(read)
    if offset != len(binary):  # as Triton: bytes no input claims are a mistake, not padding
        raise InvalidInput(f"unexpected additional input data for model {name!r}: {len(binary) - offset} bytes")
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("the request's id is a JSON string")
    outputs = []
    for output in _requested(header):
        output_name = str(output.get("name", ""))
        parameters = dict(_parameters(output.get("parameters"), f"output {output_name!r}"))
        if parameters.get("classification") == 0 and not isinstance(parameters["classification"], bool):
            del parameters["classification"]  # over HTTP, as Triton: classification 0 is the plain tensor
        outputs.append((output_name, parameters))
    return parse_request(
        name,
        version,
        request_id,
        _parameters(header.get("parameters"), "request"),
        inputs,
        outputs,
        max_batch_size,
        model_inputs,
    )


def _requested(header: dict) -> list[dict]:
    """The outputs a request names, each once: as Triton's HTTP endpoint, the first request of an
    output is the one kept (gRPC's rule differs: see inference._requested_outputs)."""
    outputs, seen = [], set()
    for output in header.get("outputs") or []:
        if not isinstance(output, dict):
            raise InvalidInput("each requested output is a JSON object")
        name = str(output.get("name", ""))
        if name not in seen:
            seen.add(name)
            outputs.append(output)
    return outputs


def infer_response(header: dict, result: InferResult) -> tuple[bytes, int]:
    """The answer's body and the JSON part's length (the body's length when it has no binary part).
    An output is binary when its own `binary_data` says so; the request's `binary_data_output`
    applies only when no output is named, as in Triton."""
    everything_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    binary_wanted = {
        str(o.get("name")): bool((o.get("parameters") or {}).get("binary_data", False)) for o in _requested(header)
    }
    outputs, chunks = [], []
    for tensor in result.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters: dict[str, Any] = {}
        if tensor.shm is not None:
            pass  # in its region; as Triton over HTTP, no parameters (clients read any as binary_data_size)
        elif binary_wanted.get(tensor.name, everything_binary):
            parameters["binary_data_size"] = len(tensor.data)
            chunks.append(tensor.data)
        elif tensor.datatype == "BYTES":
            entry["data"] = [item.decode("utf-8", "replace") for item in deserialize_bytes(tensor.data)]
        else:
            entry["data"] = np.frombuffer(tensor.data, dtype=DTYPES[tensor.datatype]).tolist()
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    body = {
        "model_name": result.model_name,
        "model_version": result.model_version,
        **({"id": header["id"]} if header.get("id") else {}),
        "parameters": result.parameters,
        "outputs": outputs,
    }
    text = json.dumps(body, separators=(",", ":")).encode()
    return b"".join((text, *chunks)), len(text)
