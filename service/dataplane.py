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
from .postprocess import serialize_bytes, to_wire, top_k
from .preprocess import ImageDecodeError, preprocess_encoded
from .protocol import InferRequest, InferResult, OutputTensor, RequestedOutput
from .registry import ModelVersion, Registry

DEFAULT_OUTPUTS = ("logits", "probabilities")
# Work on fewer bytes than this (decoding a few small images, converting a digit model's logits)
# takes microseconds: done inline, since a hop to a thread costs more. Anything bigger goes to the
# codec executor, so the event loop never stalls on it.
INLINE_BYTES = 64 * 1024


class DataPlane:
    def __init__(self, registry: Registry, codec_executor: Executor) -> None:
        self.registry = registry
        self._codec = codec_executor  # image decoding and response tensors

    async def infer(self, request: InferRequest, outcome: Outcome, deadline: float | None = None) -> InferResult:
        """Run one request; `deadline` is time.monotonic() seconds (from the gRPC deadline)."""
        received = time.perf_counter_ns()
        model = self.registry.resolve(request.model_name, request.model_version)
        outcome.version, outcome.stats = str(model.version), model.stats
        requested = self._outputs(model, request.outputs)
        inputs = await self._inputs(model, request)
        preprocessed = time.perf_counter_ns()
        if request.timeout_us:
            timeout_deadline = time.monotonic() + request.timeout_us / 1e6
            deadline = timeout_deadline if deadline is None else min(deadline, timeout_deadline)
        assert model.batcher is not None
        future = model.batcher.submit(Job(inputs, frozenset(o.name for o in requested), deadline))
        try:
            batch: BatchResult = await future
        except asyncio.CancelledError:
            future.cancel()  # the batcher drops it if it has not run yet
            raise
        computed = time.perf_counter_ns()
        size = sum(batch.outputs[o.name].nbytes for o in requested)
        if size <= INLINE_BYTES:
            tensors, feature_bytes = _response_tensors(model, requested, batch)
        else:
            tensors, feature_bytes = await asyncio.get_running_loop().run_in_executor(
                self._codec, _response_tensors, model, requested, batch
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
                if sum(len(i) for i in request.images) <= INLINE_BYTES:
                    return preprocess_encoded(request.images, model.spec)
                return await asyncio.get_running_loop().run_in_executor(
                    self._codec, preprocess_encoded, request.images, model.spec
                )
            except ImageDecodeError as exc:
                raise InvalidInput(f"input 'image': {exc}") from None
        assert request.array is not None
        if tuple(request.array.shape[1:]) != model.input_shape:
            raise InvalidInput(
                f"input 'input' must be [N, {', '.join(map(str, model.input_shape))}], not {list(request.array.shape)}"
            )
        return request.array


def _response_tensors(
    model: ModelVersion, requested: list[RequestedOutput], batch: BatchResult
) -> tuple[list[OutputTensor], int]:
    """The requested outputs as wire tensors (top-k strings, FP16 ...), and the feature-map bytes among them."""
    tensors, feature_bytes = [], 0
    for wanted in requested:
        value = batch.outputs[wanted.name]
        if wanted.classification:
            strings = top_k(value, wanted.classification, model.labels)
            tensors.append(OutputTensor(wanted.name, "BYTES", strings.shape, serialize_bytes(strings.ravel())))
        else:
            data = to_wire(value, wanted.datatype)
            if wanted.name in model.feature_maps:
                feature_bytes += len(data)
            tensors.append(OutputTensor(wanted.name, wanted.datatype, value.shape, data))
    return tensors, feature_bytes
