"""Dynamic batching: one queue per model version, `instances` workers, one future per request.

Batch while busy: a worker that finds the runtime idle runs what is queued at once, so a lone
client never waits. Only while another batch is running (with instances > 1) does a worker wait,
up to `max_queue_delay`, for more requests to fill its batch: then the wait costs nothing, since
the cores are busy anyway. Requests that arrive while a batch runs are gathered for the next one,
up to `max_batch_size` images.

The data path: one np.concatenate per batch (the requests' inputs lie in the front-ends' arenas or in
clients' shared memory), and each request's outputs written by its `deliver` straight from the batch's
outputs to where its front-end reads them, in the same executor thread as the run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import DeadlineExceeded, ModelNotReady, QueueFull
from ..rules import check_batch_size

Runner = Callable[[np.ndarray, list[str]], list[np.ndarray]]


@dataclass
class Job:
    """One request's share of a batch."""

    inputs: np.ndarray  # float32 (n, C, H, W)
    outputs: frozenset[str]  # the model outputs this request needs
    deadline: Optional[float] = None  # time.monotonic() after which it must not run
    # resolves to its BatchResult; made with the job, so on the event loop that will run it
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued_ns: int = 0
    # Called in the executor thread with the job's output views, right after its batch ran: writes them
    # where they are read (an arena block, a client's region). Without it, the views come back in the
    # BatchResult.
    deliver: Optional[Callable[[dict[str, np.ndarray]], None]] = None
    taken: bool = False  # in a batch that is running or ran: too late to cancel

    @property
    def size(self) -> int:
        return self.inputs.shape[0]


@dataclass
class BatchResult:
    outputs: dict[str, np.ndarray]  # name -> (n, ...) view into the batch's output (empty once delivered)
    queue_ns: int  # submit -> its batch started
    compute_ns: int  # the session run of its batch
    batch_size: int  # images in the batch it ran in


@dataclass(frozen=True)
class BatchStats:
    """What one executed batch reports (for statistics and metrics)."""

    batch_size: int  # images
    compute_ns: int  # the session run
    input_ns: int = 0  # gathering the requests' inputs into one batch
    output_ns: int = 0  # splitting the outputs back into the requests' answers


class Batcher:
    def __init__(
        self,
        runner: Runner,
        executor: Executor,
        *,
        output_order: list[str],
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        instances: int = 1,
        on_batch: Optional[Callable[[BatchStats], None]] = None,
    ) -> None:
        self._runner = runner
        self._executor = executor
        self._order = {name: i for i, name in enumerate(output_order)}
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._on_batch = on_batch
        self._queue: collections.deque[Job] = collections.deque()
        self._arrived = asyncio.Event()
        self._running = 0
        self._closed = False
        self._workers = [asyncio.create_task(self._work(), name=f"batcher-{i}") for i in range(instances)]

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def check_size(self, images: int) -> None:
        """Refuse a request larger than one batch (callers check before they decode anything)."""
        check_batch_size(images, self.max_batch_size)

    def submit(self, job: Job) -> asyncio.Future:
        """Queue a job; its future resolves to a BatchResult. Raises QueueFull / ModelNotReady at once."""
        if self._closed:
            raise ModelNotReady("this model version is being unloaded")
        self.check_size(job.size)
        if len(self._queue) >= self.max_queue_size:
            raise QueueFull(f"queue full ({self.max_queue_size} requests waiting); retry later", limit="queue_size")
        job.enqueued_ns = time.perf_counter_ns()
        self._queue.append(job)
        self._arrived.set()
        return job.future

    async def close(self) -> None:
        """Stop taking jobs, finish every queued one, then stop the workers."""
        self._closed = True
        self._arrived.set()
        await asyncio.gather(*self._workers, return_exceptions=True)

    # ---- workers -----------------------------------------------------------------------------

    def _queued_images(self) -> int:
        return sum(job.size for job in self._queue)

    async def _wait(self, timeout: Optional[float]) -> None:
        self._arrived.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), timeout)

    async def _work(self) -> None:
        while True:
            while not self._queue:
                if self._closed:
                    return
                await self._wait(None)
            if self._running and self.max_queue_delay_s > 0 and not self._closed:
                # another batch holds the runtime: a short wait buys a fuller batch for free
                until = time.monotonic() + self.max_queue_delay_s
                while self._queued_images() < self.max_batch_size and (left := until - time.monotonic()) > 0:
                    await self._wait(left)
            batch = self._take()
            if not batch:
                continue
            self._running += 1
            try:
                await self._run(batch)
            finally:
                self._running -= 1
                if self._queue:
                    self._arrived.set()  # let an idle worker pick up what arrived meanwhile

    def _concat_and_run(
        self, batch: list[Job], names: list[str]
    ) -> tuple[list[np.ndarray], list[Optional[BaseException]], int, int, int]:
        """In the executor thread (a 32-image AlexNet batch is 19 MB to copy, too much for the event
        loop): gather, run, deliver. Returns (outputs, each job's delivery error, ns gathering the
        inputs, ns of the session run, ns delivering)."""
        started = time.perf_counter_ns()
        inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([job.inputs for job in batch])
        gathered = time.perf_counter_ns()
        outputs = self._runner(inputs, names)
        ran = time.perf_counter_ns()
        errors: list[Optional[BaseException]] = []
        offset = 0
        for job in batch:
            error = None
            if job.deliver is not None:
                n = job.size
                try:
                    job.deliver(
                        {name: out[offset : offset + n] for name, out in zip(names, outputs) if name in job.outputs}
                    )
                except Exception as exc:  # this request's destination, not the batch, failed
                    error = exc
            errors.append(error)
            offset += job.size
        return outputs, errors, gathered - started, ran - gathered, time.perf_counter_ns() - ran

    def _take(self) -> list[Job]:
        """Jobs from the head of the queue, up to max_batch_size images; drops cancelled and expired ones."""
        batch, images, now = [], 0, time.monotonic()
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # cancelled by its client
                self._queue.popleft()
                continue
            if job.deadline is not None and now > job.deadline:
                self._queue.popleft()
                job.future.set_exception(DeadlineExceeded("deadline passed while the request was queued"))
                continue
            if images + job.size > self.max_batch_size:
                break
            job.taken = True
            batch.append(self._queue.popleft())
            images += job.size
        return batch

    async def _run(self, batch: list[Job]) -> None:
        names = sorted(set().union(*(job.outputs for job in batch)), key=self._order.__getitem__)
        started = time.perf_counter_ns()
        try:
            outputs, errors, input_ns, compute_ns, deliver_ns = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._concat_and_run, batch, names
            )
        except Exception as exc:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        split_started = time.perf_counter_ns()
        total = sum(job.size for job in batch)
        offset = 0
        for job, error in zip(batch, errors):
            n = job.size
            if not job.future.done():
                if error is not None:
                    job.future.set_exception(error)
                else:
                    views = (
                        {}
                        if job.deliver is not None
                        else {
                            name: out[offset : offset + n] for name, out in zip(names, outputs) if name in job.outputs
                        }
                    )
                    job.future.set_result(BatchResult(views, started - job.enqueued_ns, compute_ns, total))
            offset += n
        if self._on_batch is not None:
            output_ns = deliver_ns + time.perf_counter_ns() - split_started
            self._on_batch(BatchStats(total, compute_ns, input_ns, output_ns))


def _share(job: Job, names: list[str], outputs: list[np.ndarray], offset: int) -> dict[str, np.ndarray]:
    """A job's rows of the batch's outputs, the ones it asked for (views, no copies)."""
    return {name: out[offset : offset + job.size] for name, out in zip(names, outputs) if name in job.outputs}
