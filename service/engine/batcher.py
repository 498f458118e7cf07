"""Dynamic batching: one queue per model version, `instances` worker threads, one answer per request.

Batch while busy: a worker that finds the runtime idle runs what is queued at once, so a lone
client never waits. Only while another batch is running (with instances > 1) does a worker wait,
up to `max_queue_delay`, for more requests to fill its batch: then the wait costs nothing, since
the cores are busy anyway. Requests that arrive while a batch runs are gathered for the next one,
up to `max_batch_size` images.

The workers are plain threads (the session's own: `executor` is the runtime's pool, whose threads the
warm-up ran in), not event-loop tasks: a request goes from the thread that read it to the thread that
runs it through one condition variable, and its answer leaves from that same thread, with no event
loop to wake on either side. onnxruntime releases the GIL while it runs.

The data path: one np.concatenate per batch (the requests' inputs lie in the front-ends' arenas or in
clients' shared memory), and each request's outputs written by its `deliver` straight from the batch's
outputs to where its front-end reads them, in the worker thread, right after the run.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

from ..errors import DeadlineExceeded, ModelNotReady, QueueFull
from ..rules import check_batch_size

Runner = Callable[[np.ndarray, list[str]], list[np.ndarray]]


class Sink(Protocol):
    """Where answers go: `put` for each job of a batch, then one `flush` for the batch."""

    def put(self, job: Job, result: Optional[BatchResult], error: Optional[BaseException]) -> None: ...

    def flush(self) -> None: ...


@dataclass
class Job:
    """One request's share of a batch."""

    inputs: np.ndarray  # float32 (n, C, H, W)
    outputs: frozenset[str]  # the model outputs this request needs
    deadline: Optional[float] = None  # time.monotonic() after which it must not run
    sink: Optional[Sink] = None  # told the answer, from the worker thread
    tag: object = None  # the sink's own reference (a request id)
    enqueued_ns: int = 0
    # Called in the executor thread with the job's output views, right after its batch ran: writes them
    # where they are read (an arena block, a client's region). Without it, the views come back in the
    # BatchResult.
    deliver: Optional[Callable[[dict[str, np.ndarray]], None]] = None
    taken: bool = False  # in a batch that is running or ran: too late to cancel
    cancelled: bool = False  # dropped before it ran (its sink is told)

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


class _FutureSink:
    """`Batcher.submit`'s sink: resolves an asyncio future on its event loop."""

    def __init__(self, future: asyncio.Future) -> None:
        self.future = future
        self.loop = future.get_loop()

    def put(self, job: Job, result: Optional[BatchResult], error: Optional[BaseException]) -> None:
        self.loop.call_soon_threadsafe(self._resolve, result, error)

    def _resolve(self, result: Optional[BatchResult], error: Optional[BaseException]) -> None:
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)

    def flush(self) -> None:
        pass


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
        self._order = {name: i for i, name in enumerate(output_order)}
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._on_batch = on_batch
        self._queue: collections.deque[Job] = collections.deque()
        self._queued_images = 0
        self._cond = threading.Condition()
        self._running = 0
        self._closed = False
        self._workers: list[Future] = [executor.submit(self._work) for _ in range(instances)]

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def check_size(self, images: int) -> None:
        """Refuse a request larger than one batch (callers check before they decode anything)."""
        check_batch_size(images, self.max_batch_size)

    def put(self, job: Job) -> None:
        """Queue a job whose sink hears its answer (any thread). Raises QueueFull / ModelNotReady at once."""
        self.check_size(job.size)
        with self._cond:
            if self._closed:
                raise ModelNotReady("this model version is being unloaded")
            if len(self._queue) >= self.max_queue_size:
                raise QueueFull(f"queue full ({self.max_queue_size} requests waiting); retry later", limit="queue_size")
            job.enqueued_ns = time.perf_counter_ns()
            self._queue.append(job)
            self._queued_images += job.size
            self._cond.notify()

    def cancel(self, job: Job) -> bool:
        """Drop a job that has not started (its sink is told CANCELLED-by-absence: a None result and no
        error); False when it is running or ran."""
        with self._cond:
            if job.taken or job.cancelled:
                return False
            job.cancelled = True
        return True

    def submit(self, job: Job) -> asyncio.Future:
        """Queue a job from a coroutine; the future resolves to its BatchResult (cancelling it drops the job)."""
        future = asyncio.get_running_loop().create_future()
        job.sink = _FutureSink(future)
        self.put(job)
        future.add_done_callback(lambda f: self.cancel(job) if f.cancelled() else None)
        return future

    def close_now(self) -> None:
        """Stop taking jobs; the workers finish every queued one, then end (blocking: waits for them)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.result()

    async def close(self) -> None:
        await asyncio.to_thread(self.close_now)
        await asyncio.sleep(0)  # the answers the workers posted to this loop are delivered first

    # ---- workers -----------------------------------------------------------------------------

    def _work(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._queue:
                    if self._closed:
                        return
                    cond.wait()
                if self._running and self.max_queue_delay_s > 0 and not self._closed:
                    # another batch holds the runtime: a short wait buys a fuller batch for free
                    until = time.monotonic() + self.max_queue_delay_s
                    while self._queued_images < self.max_batch_size and (left := until - time.monotonic()) > 0:
                        cond.wait(left)
                batch, dropped = self._take()
                if batch:
                    self._running += 1
            _answer_each(dropped)
            if not batch:
                continue
            try:
                self._run(batch)
            finally:
                with cond:
                    self._running -= 1
                    if self._queue:
                        cond.notify()  # an idle worker picks up what arrived meanwhile

    def _take(self) -> tuple[list[Job], list[tuple[Job, Optional[BaseException]]]]:
        """Jobs from the head of the queue, up to max_batch_size images; drops cancelled and expired ones
        (with the lock held)."""
        batch: list[Job] = []
        dropped: list[tuple[Job, Optional[BaseException]]] = []
        images, now = 0, time.monotonic()
        while self._queue:
            job = self._queue[0]
            if job.cancelled:
                self._queue.popleft()
                self._queued_images -= job.size
                dropped.append((job, None))
                continue
            if job.deadline is not None and now > job.deadline:
                self._queue.popleft()
                self._queued_images -= job.size
                dropped.append((job, DeadlineExceeded("deadline passed while the request was queued")))
                continue
            if images + job.size > self.max_batch_size:
                break
            job.taken = True
            batch.append(self._queue.popleft())
            self._queued_images -= job.size
            images += job.size
        return batch, dropped

    def _run(self, batch: list[Job]) -> None:
        names = sorted(set().union(*(job.outputs for job in batch)), key=self._order.__getitem__)
        started = time.perf_counter_ns()
        try:
            inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([job.inputs for job in batch])
            gathered = time.perf_counter_ns()
            outputs = self._runner(inputs, names)
        except Exception as exc:
            _answer_each([(job, exc) for job in batch])
            return
        ran = time.perf_counter_ns()
        total, compute_ns = sum(job.size for job in batch), ran - gathered
        offset = 0
        for job in batch:
            views = _share(job, names, outputs, offset)
            offset += job.size
            result, error = BatchResult(views, started - job.enqueued_ns, compute_ns, total), None
            if job.deliver is not None:
                try:
                    job.deliver(views)
                except Exception as exc:  # this request's destination, not the batch, failed
                    error = exc
                result.outputs = {}
            if job.sink is not None:
                job.sink.put(job, None if error else result, error)
        for sink in {id(job.sink): job.sink for job in batch if job.sink is not None}.values():
            sink.flush()  # one message per front-end per executed batch
        if self._on_batch is not None:
            self._on_batch(BatchStats(total, compute_ns, gathered - started, time.perf_counter_ns() - ran))


def _answer_each(answers: list[tuple[Job, Optional[BaseException]]]) -> None:
    """Tell the sinks of jobs that will not run (cancelled: no error; expired, failed: the error)."""
    for job, error in answers:
        if job.sink is not None:
            job.sink.put(job, None, error)
    for sink in {id(job.sink): job.sink for job, _ in answers if job.sink is not None}.values():
        sink.flush()


def _share(job: Job, names: list[str], outputs: list[np.ndarray], offset: int) -> dict[str, np.ndarray]:
    """A job's rows of the batch's outputs, the ones it asked for (views, no copies)."""
    return {name: out[offset : offset + job.size] for name, out in zip(names, outputs) if name in job.outputs}
