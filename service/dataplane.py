"""The data plane: an InferRequest through preprocess, the batcher and postprocess to an InferResult.

Knows the registry and the stages, not gRPC. Model-level validation lives here: the input's
C x H x W against the model's, output names against model.json, classification k.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from .batcher import Job
from .errors import InvalidInput, ServingError
from .metrics import METRICS
from .postprocess import serialize_bytes, to_wire, top_k
from .preprocess import ImageDecodeError, preprocess_encoded
from .protocol import InferRequest, InferResult, OutputTensor, RequestedOutput
from .registry import ModelVersion, Registry

DEFAULT_OUTPUTS = ("logits", "probabilities")
# Decoding a few small images takes microseconds: do it inline. Bigger batches go to the executor
# so they never stall the event loop.
_INLINE_DECODE_BYTES = 64 * 1024


class DataPlane:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def infer(self, request: InferRequest, deadline: float | None = None) -> tuple[ModelVersion, InferResult]:
        """Run one request; `deadline` is time.monotonic() seconds (from the gRPC deadline)."""
        received = time.perf_counter_ns()
        model = self.registry.resolve(request.model_name, request.model_version)
        try:
            return model, await self._run(model, request, deadline, received)
        except (ServingError, asyncio.CancelledError):
            # counted here, where the model is known: ModelStatistics' "fail"
            model.stats.fail_count += 1
            model.stats.fail_ns += time.perf_counter_ns() - received
            raise

    async def _run(self, model: ModelVersion, request: InferRequest, deadline: float | None,
                   received: int) -> InferResult:
        requested = self._outputs(model, request.outputs)
        inputs = await self._inputs(model, request)
        preprocessed = time.perf_counter_ns()
        if request.timeout_us:
            timeout_deadline = time.monotonic() + request.timeout_us / 1e6
            deadline = timeout_deadline if deadline is None else min(deadline, timeout_deadline)
        job = Job(inputs, frozenset(o.name for o in requested), deadline)
        future = model.batcher.submit(job)
        METRICS.queue_depth.labels(model.name).set(model.batcher.queue_depth)
        try:
            batch = await future
        except asyncio.CancelledError:
            future.cancel()   # the batcher drops it if it has not run yet
            raise
        computed = time.perf_counter_ns()
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
        if feature_bytes:
            METRICS.feature_map_bytes.labels(model.name).inc(feature_bytes)
        done = time.perf_counter_ns()
        stats = model.stats
        stats.preprocess_ns += preprocessed - received
        stats.postprocess_ns += done - computed
        stats.success_count += 1
        stats.success_ns += done - received
        parameters = {
            "queue_us": batch.queue_ns // 1000,
            "preprocess_us": (preprocessed - received) // 1000,
            "compute_us": batch.compute_ns // 1000,
            "postprocess_us": (done - computed) // 1000,
            "server_us": (done - received) // 1000,
            "batch_size": batch.batch_size,
            "execution_provider": model.execution_provider,
        }
        return InferResult(tensors, parameters)

    @staticmethod
    def _outputs(model: ModelVersion, requested: list[RequestedOutput]) -> list[RequestedOutput]:
        if not requested:
            return [RequestedOutput(name) for name in DEFAULT_OUTPUTS]
        for wanted in requested:
            if wanted.name not in model.outputs:
                raise InvalidInput(f"model {model.name!r} has no output {wanted.name!r}; it has "
                                   f"{', '.join(model.outputs)}")
            if wanted.classification and len(model.outputs[wanted.name]["shape"]) != 2:
                raise InvalidInput(f"classification applies to logits or probabilities, not {wanted.name!r}")
        return requested

    async def _inputs(self, model: ModelVersion, request: InferRequest) -> np.ndarray:
        if request.batch > model.batcher.max_batch_size:
            raise InvalidInput(f"batch of {request.batch} exceeds max_batch_size {model.batcher.max_batch_size}")
        if request.images is not None:
            try:
                if sum(len(i) for i in request.images) <= _INLINE_DECODE_BYTES:
                    return preprocess_encoded(request.images, model.spec)
                return await asyncio.get_running_loop().run_in_executor(
                    None, preprocess_encoded, request.images, model.spec)
            except ImageDecodeError as exc:
                raise InvalidInput(f"input 'image': {exc}") from None
        if tuple(request.array.shape[1:]) != model.input_shape:
            raise InvalidInput(f"input 'input' must be [N, {', '.join(map(str, model.input_shape))}], "
                               f"not {list(request.array.shape)}")
        return request.array
