"""The data plane: an InferRequest through preprocess, the batcher and postprocess to an InferResult.

Knows the registry and the stages, not gRPC. Model-level validation lives here: the input's
C x H x W against the model's, output names against model.json, classification k. What the
request did (the version that took it, its stage timings, the bytes it sent) goes into the
caller's `Outcome`, which the recorder writes once when the request ends.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor

import numpy as np

from .batcher import BatchResult, Job
from .errors import InvalidInput
from .observe import Outcome, Timings
from .postprocess import serialize_bytes, to_wire, top_k, wire_dtype
from .preprocess import ImageDecodeError, decode_all, open_checked
from .protocol import InferRequest, InferResult, OutputTensor, RequestedOutput, read_input
from .registry import ModelVersion, Registry
from .shm import SystemSharedMemory

DEFAULT_OUTPUTS = ("logits", "probabilities")
# Work this small (converting a digit model's logits, decoding a few small images) takes
# microseconds: done inline, since a hop to a thread costs more. Anything bigger goes to the codec
# executor, so the event loop never stalls on it. Images are sized by the pixels their headers
# claim, not by their encoded bytes (a 6 KB PNG can hold 100 million pixels).
INLINE_BYTES = 64 * 1024
INLINE_PIXELS = 64 * 64 * 8


class DataPlane:
    def __init__(self, registry: Registry, codec_executor: Executor, shm: SystemSharedMemory) -> None:
        self.registry = registry
        self._codec = codec_executor  # image decoding and response tensors
        self._shm = shm

    async def infer(self, request: InferRequest, outcome: Outcome, deadline: float | None = None) -> InferResult:
        """Run one request; `deadline` is time.monotonic() seconds (from the gRPC deadline)."""
        received = time.perf_counter_ns()
        model = self.registry.resolve(request.model_name, request.model_version)
        outcome.version, outcome.stats = str(model.version), model.stats
        requested = self._outputs(model, request.outputs)
        if request.input_shm is not None:
            ref = request.input_shm
            read_input(request, self._shm.view(ref.region, ref.offset, ref.byte_size, f"input {request.input_name!r}"))
        inputs = await self._inputs(model, request)
        preprocessed = time.perf_counter_ns()
        if request.timeout_us and self.registry.settings.allow_timeout_override:
            # Triton's queue policy: a request's own `timeout` counts only where the model allows it
            timeout_deadline = time.monotonic() + request.timeout_us / 1e6
            deadline = timeout_deadline if deadline is None else min(deadline, timeout_deadline)
        assert model.batcher is not None
        future = model.batcher.submit(Job(inputs, frozenset(o.name for o in requested), deadline))
        outcome.queued = True
        try:
            batch: BatchResult = await future
        except asyncio.CancelledError:
            future.cancel()  # the batcher drops it if it has not run yet
            raise
        computed = time.perf_counter_ns()
        size = sum(batch.outputs[o.name].nbytes for o in requested)
        if size <= INLINE_BYTES:
            tensors, feature_bytes = _response_tensors(model, requested, batch, self._shm)
        else:
            tensors, feature_bytes = await asyncio.get_running_loop().run_in_executor(
                self._codec, _response_tensors, model, requested, batch, self._shm
            )
        done = time.perf_counter_ns()
        outcome.feature_map_bytes = feature_bytes
        outcome.timings = Timings(
            queue_ns=batch.queue_ns,
            preprocess_ns=preprocessed - received,
            compute_ns=batch.compute_ns,
            postprocess_ns=done - computed,
            server_ns=done - received,
            batch_size=batch.batch_size,
        )
        return InferResult(
            model.name, str(model.version), tensors, outcome.timings.parameters(model.execution_provider)
        )

    @staticmethod
    def _outputs(model: ModelVersion, requested: list[RequestedOutput]) -> list[RequestedOutput]:
        if not requested:
            return [RequestedOutput(name) for name in DEFAULT_OUTPUTS]
        for wanted in requested:
            if wanted.name not in model.outputs:
                raise InvalidInput(
                    f"model {model.name!r} has no output {wanted.name[:128]!r}; it has {', '.join(model.outputs)}"
                )
            if wanted.classification and len(model.outputs[wanted.name].shape) != 2:
                raise InvalidInput(f"classification applies to logits or probabilities, not {wanted.name!r}")
        return requested

    async def _inputs(self, model: ModelVersion, request: InferRequest) -> np.ndarray:
        assert model.batcher is not None
        model.batcher.check_size(request.batch)  # before any decoding
        if request.images is not None:
            try:
                # headers only, on the loop: microseconds each, and at most max_batch_size of them
                opened = [open_checked(data, model.image_limits) for data in request.images]
                if sum(image.width * image.height for image in opened) <= INLINE_PIXELS:
                    return decode_all(opened, model.spec)
                return await asyncio.get_running_loop().run_in_executor(self._codec, decode_all, opened, model.spec)
            except ImageDecodeError as exc:
                raise InvalidInput(f"input 'image': {exc}", limit=exc.limit) from None
        assert request.array is not None
        if tuple(request.array.shape[1:]) != model.input_shape:
            raise InvalidInput(
                f"input 'input' must be [N, {', '.join(map(str, model.input_shape))}], not {list(request.array.shape)}"
            )
        return request.array


def _response_tensors(
    model: ModelVersion, requested: list[RequestedOutput], batch: BatchResult, shm: SystemSharedMemory
) -> tuple[list[OutputTensor], int]:
    """The requested outputs as wire tensors (top-k strings, FP16 ...), or written into their shared-memory
    regions; and the feature-map bytes among them."""
    tensors, feature_bytes = [], 0
    for wanted in requested:
        value = batch.outputs[wanted.name]
        if wanted.classification:
            strings = top_k(value, wanted.classification, model.labels)
            datatype, shape, data = "BYTES", strings.shape, serialize_bytes(strings.ravel())
            size = len(data)
        else:
            datatype, shape = wanted.datatype, value.shape
            size = value.size * np.dtype(wire_dtype(datatype)).itemsize
            data = to_wire(value, datatype) if wanted.shm is None else b""
            if wanted.name in model.feature_maps:
                feature_bytes += size
        if wanted.shm is None:
            tensors.append(OutputTensor(wanted.name, datatype, shape, data))
            continue
        ref, what = wanted.shm, f"output {wanted.name!r}"
        if size > ref.byte_size:
            raise InvalidInput(f"{what} needs {size} bytes; its shared-memory window has {ref.byte_size}")
        view = shm.view(ref.region, ref.offset, size, what)
        if datatype == "BYTES":
            view[:] = data
        else:  # converted straight into the region: one copy, no intermediate bytes
            np.copyto(np.frombuffer(view, dtype=wire_dtype(datatype)).reshape(shape), value, casting="same_kind")
        tensors.append(OutputTensor(wanted.name, datatype, shape, b"", ref))
    return tensors, feature_bytes
