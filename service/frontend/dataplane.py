"""The data plane of a front-end: an InferRequest through preprocessing, the engine and postprocessing
to an InferResult.

Runs in each front-end. Knows the model table and the engine link, not gRPC. Model-level validation
lives here: the input's C x H x W against the model's, output names against model.json,
classification k. The request's input goes into one block of this front-end's arena, followed by
room for every output the engine writes there (outputs bound for a client's shared-memory region go
straight into it from the engine); the answer is built from the block, which is then freed. What the
request did (the version that took it, its stage timings, the bytes it sent) goes into the caller's
`Outcome`, which the recorder writes once when the request ends.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import Executor
from typing import Optional

import numpy as np

from convserve.contract import INPUT_NAME
from convserve.wire import serialize_bytes

from ..errors import DeadlineExceeded, InvalidInput, QueueFull
from ..ipc import ALIGN, Arena
from .engine_link import EngineLink
from .inference import InferRequest, InferResult, OutputTensor, RequestedOutput, read_input
from .models import ModelTable, ServedModel
from .observe import Outcome, Timings
from .postprocess import to_wire, top_k
from .preprocess import ImageDecodeError, decode_all, open_checked

# Work this small (a digit model's five feature maps are 344 KB: one memcpy of about 50 µs; decoding a
# few small images) is done inline, since a hop to a thread costs more (measured with perf_analyzer at
# one client: the hop for 344 KB answers cost the front-end more CPU than the copy). Anything bigger goes
# to the codec executor, so the event loop never stalls long on it. Images are sized by the pixels their
# headers claim, not by their encoded bytes (a 6 KB PNG can hold 100 million pixels).
INLINE_BYTES = 1024 * 1024
INLINE_PIXELS = 64 * 64 * 8


class DataPlane:
    def __init__(self, models: ModelTable, engine: EngineLink, arena: Arena, codec_executor: Executor) -> None:
        self.models = models
        self.engine = engine
        self.arena = arena
        self._codec = codec_executor  # image decoding and response tensors

    async def infer(self, request: InferRequest, outcome: Outcome, deadline: float | None = None) -> InferResult:
        """Run one request; `deadline` is time.monotonic() seconds (from the gRPC deadline)."""
        received = time.perf_counter_ns()
        model = self.models.resolve(request.model_name, request.model_version)
        outcome.version = str(model.version)
        requested = self._outputs(model, request.outputs)
        images = request.batch
        layout, size = _block_layout(model, request, requested)
        inputs = await self._inputs(model, request)  # before the block: a bad image costs no arena
        block = self.arena.alloc(size) if size else None
        if size and block is None:
            raise QueueFull(
                f"this front-end's arena ({self.arena.size >> 20} MiB) is full; retry later", limit="queue_size"
            )
        try:
            if inputs is None:  # FP32 in the client's region: the engine reads it there
                ref = request.input_shm
                assert ref is not None
                source: tuple = ("shm", ref.region, ref.offset, ref.byte_size)
            else:
                assert block is not None
                np.copyto(self.arena.array(block, inputs.shape), inputs)
                source = ("arena", block)
            destinations = [(name, ("arena", (block or 0) + offset)) for name, offset in layout.items()] + [
                (w.name, ("shm", w.shm.region, w.shm.offset, w.shm.byte_size, w.datatype))
                for w in requested
                if w.shm is not None and not w.classification
            ]
            if request.timeout_us and self.models.settings.allow_timeout_override:
                # Triton's queue policy: a request's own `timeout` counts only where the model allows it
                timeout_deadline = time.monotonic() + request.timeout_us / 1e6
                deadline = timeout_deadline if deadline is None else min(deadline, timeout_deadline)
            shape = (images, *model.input_shape)
            rid, future = self.engine.infer(block, model.name, model.version, source, shape, destinations, deadline)
        except BaseException:
            if block is not None:
                self.arena.free(block)
            raise
        preprocessed = time.perf_counter_ns()
        # The deadline is kept here too (an engine that is frozen drops nothing from its queue): a timer
        # that cancels the future, not asyncio.wait_for, whose extra future costs every request a turn
        # of the event loop.
        expiry = None if deadline is None else _Expiry(future, deadline)
        try:
            queue_ns, compute_ns, batch_size = await future
        except asyncio.CancelledError:
            outcome.queued = True
            if future.cancelled():  # still out when cancelled: the link frees the block once the engine lets go
                self.engine.cancel(rid)
            elif block is not None:  # its answer came just before the cancellation (a short deadline makes
                self.arena.free(block)  # that common): the link handed it over, so nobody else frees it
            if expiry is not None and expiry.expired:  # (a client gone at that moment hears nothing either way)
                raise DeadlineExceeded("the deadline passed while the engine had the request") from None
            raise
        except BaseException as exc:
            outcome.queued = getattr(exc, "queued", False)
            if block is not None:
                self.arena.free(block)
            raise
        finally:
            if expiry is not None:
                expiry.timer.cancel()
        outcome.queued = True
        computed = time.perf_counter_ns()
        views = {
            name: self.arena.array((block or 0) + offset, (images, *model.outputs[name].shape[1:]))
            for name, offset in layout.items()
        }
        try:
            if size <= INLINE_BYTES:
                tensors, feature_bytes = _response_tensors(model, requested, views, images)
            else:
                tensors, feature_bytes = await asyncio.get_running_loop().run_in_executor(
                    self._codec, _response_tensors, model, requested, views, images
                )
        finally:
            del views  # no view may outlive the block: it is reused at once
            if block is not None:
                self.arena.free(block)
        done = time.perf_counter_ns()
        outcome.feature_map_bytes = feature_bytes
        outcome.timings = Timings(
            queue_ns=queue_ns,
            preprocess_ns=preprocessed - received,
            compute_ns=compute_ns,
            postprocess_ns=done - computed,
            server_ns=done - received,
            batch_size=batch_size,
        )
        return InferResult(
            model.name, str(model.version), tensors, outcome.timings.parameters(model.execution_provider)
        )

    @staticmethod
    def _outputs(model: ServedModel, requested: list[RequestedOutput]) -> list[RequestedOutput]:
        if not requested:
            return [RequestedOutput(name) for name in model.card.default_outputs]
        for wanted in requested:
            if wanted.name not in model.outputs:
                raise InvalidInput(
                    f"model {model.name!r} has no output {wanted.name[:128]!r}; it has {', '.join(model.outputs)}"
                )
            if wanted.classification and len(model.outputs[wanted.name].shape) != 2:
                raise InvalidInput(f"classification applies to an (N, classes) output, not {wanted.name!r}")
            if wanted.classification and wanted.shm is not None:
                raise InvalidInput(
                    f"output {wanted.name!r}: classification cannot be written to shared memory (as in Triton)"
                )
        # answered in the model's order of its outputs, as Triton does, whatever order they were asked in
        order = {name: index for index, name in enumerate(model.outputs)}
        return sorted(requested, key=lambda wanted: order[wanted.name])

    async def _inputs(self, model: ServedModel, request: InferRequest) -> Optional[np.ndarray]:
        """The request's input as an array, or None when it is FP32 in the client's own region."""
        if request.input_shm is not None:
            if request.input_name == INPUT_NAME:
                _check_shape(model, request.shape)
                return None
            ref = request.input_shm  # encoded images: their bytes come from the engine's mapping
            read_input(
                request, await self.engine.call("shm_read", ref.region, ref.offset, ref.byte_size, "input 'image'")
            )
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
        _check_shape(model, request.array.shape)
        return request.array


class _Expiry:
    """Cancels a request's future at its deadline (time.monotonic() seconds), and says it did."""

    def __init__(self, future: asyncio.Future, deadline: float) -> None:
        self.expired = False
        loop = asyncio.get_running_loop()
        self.timer = loop.call_at(loop.time() + deadline - time.monotonic(), self._expire, future)

    def _expire(self, future: asyncio.Future) -> None:
        self.expired = future.cancel()


def _check_shape(model: ServedModel, shape: tuple[int, ...]) -> None:
    if tuple(shape[1:]) != model.input_shape:
        dims = ", ".join(map(str, model.input_shape))
        raise InvalidInput(f"input {model.input_name!r} must be [N, {dims}], not {list(shape)}")


def _block_layout(
    model: ServedModel, request: InferRequest, requested: list[RequestedOutput]
) -> tuple[dict[str, int], int]:
    """Where each output the answer is built from lies in the request's arena block, and the block's size:
    [the input, unless it lies in the client's region] [each such output, once, aligned]."""
    images = request.batch
    in_region = request.input_shm is not None and request.input_name == INPUT_NAME
    size = 0 if in_region else images * model.input_bytes
    layout: dict[str, int] = {}
    for wanted in requested:
        if (wanted.shm is None or wanted.classification) and wanted.name not in layout:
            layout[wanted.name] = size
            size += -(-images * model.output_bytes[wanted.name] // ALIGN) * ALIGN
    return layout, size


def _response_tensors(
    model: ServedModel, requested: list[RequestedOutput], views: dict[str, np.ndarray], images: int
) -> tuple[list[OutputTensor], int]:
    """The requested outputs as wire tensors (top-k strings, FP16 ...), from the engine's outputs in the
    arena; those the engine wrote into a client's region are named back. And the feature-map bytes."""
    tensors, feature_bytes = [], 0
    for wanted in requested:
        if wanted.classification:
            strings = top_k(views[wanted.name], wanted.classification, model.labels)
            tensors.append(OutputTensor(wanted.name, "BYTES", strings.shape, serialize_bytes(strings.ravel())))
            continue
        shape = (images, *model.outputs[wanted.name].shape[1:])
        if wanted.shm is not None:
            tensors.append(OutputTensor(wanted.name, wanted.datatype, shape, b"", wanted.shm))
        else:
            value = views[wanted.name]
            data = to_wire(value, wanted.datatype)
            tensors.append(OutputTensor(wanted.name, wanted.datatype, value.shape, data))
            if wanted.name in model.feature_maps:
                feature_bytes += len(data)
        if wanted.shm is not None and wanted.name in model.feature_maps:
            feature_bytes += math.prod(shape) * (2 if wanted.datatype == "FP16" else 4)
    return tensors, feature_bytes
