"""The batcher as a plain class: batch while busy, bounded queue, deadlines, cancellation."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from convserve.service.engine.batcher import Batcher, Job
from convserve.service.errors import DeadlineExceeded, InvalidInput, QueueFull


class SlowRunner:
    """Doubles its input; records batch sizes; each run takes `seconds`."""

    def __init__(self, seconds=0.05):
        self.seconds = seconds
        self.batches = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch, names):
        self.gate.wait(5)
        self.batches.append((batch.shape[0], tuple(names)))
        time.sleep(self.seconds)
        return [batch * (i + 2) for i in range(len(names))]


def _batcher(runner, **kwargs):
    options = dict(output_order=["a", "b"], max_batch_size=8, max_queue_delay_s=0.002, max_queue_size=64)
    options.update(kwargs)
    return Batcher(runner, ThreadPoolExecutor(4), **options)


def _job(value, n=1, outputs=("a",), deadline=None):
    return Job(np.full((n, 1), value, np.float32), frozenset(outputs), deadline)


def test_lone_request_runs_at_once_without_waiting():
    async def main():
        runner = SlowRunner(seconds=0.0)
        batcher = _batcher(runner, max_queue_delay_s=1.0)  # a long delay a lone client must never pay
        started = time.perf_counter()
        result = await batcher.submit(_job(3.0))
        elapsed = time.perf_counter() - started
        await batcher.close()
        return result, elapsed

    result, elapsed = asyncio.run(main())
    assert elapsed < 0.5 and result.batch_size == 1
    assert result.outputs["a"].tolist() == [[6.0]]


def test_requests_arriving_while_busy_are_batched_and_sliced_back():
    async def main():
        runner = SlowRunner(seconds=0.05)
        batcher = _batcher(runner)
        first = batcher.submit(_job(1.0))
        await asyncio.sleep(0.01)  # the first batch is running now
        rest = [batcher.submit(_job(float(v), outputs=("a", "b") if v % 2 else ("a",))) for v in range(2, 7)]
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return runner, results

    runner, results = asyncio.run(main())
    assert [size for size, _ in runner.batches] == [1, 5]
    assert runner.batches[1][1] == ("a", "b")  # the union of what the batch asked for
    for value, result in zip(range(1, 7), results):
        assert result.outputs["a"].tolist() == [[value * 2.0]]
        assert ("b" in result.outputs) == (value % 2 == 1 and value > 1)
    assert results[1].batch_size == 5 and results[1].queue_ns > 0


def test_batches_never_exceed_max_batch_size_and_multi_image_requests():
    async def main():
        runner = SlowRunner(seconds=0.02)
        runner.gate.clear()
        batcher = _batcher(runner, max_batch_size=4)
        futures = [batcher.submit(_job(1.0, n=3)) for _ in range(3)] + [batcher.submit(_job(2.0, n=1))]
        runner.gate.set()
        results = await asyncio.gather(*futures)
        with pytest.raises(InvalidInput):
            batcher.submit(_job(1.0, n=5))
        await batcher.close()
        return runner, results

    runner, results = asyncio.run(main())
    assert all(size <= 4 for size, _ in runner.batches)
    assert sum(size for size, _ in runner.batches) == 10
    assert all(r.outputs["a"].shape[0] in (1, 3) for r in results)


def test_queue_full_is_refused_at_once():
    async def main():
        runner = SlowRunner(seconds=0.0)
        runner.gate.clear()
        batcher = _batcher(runner, max_queue_size=2, max_batch_size=1)
        first = batcher.submit(_job(1.0))
        await asyncio.sleep(0.01)  # the worker holds the first; two may wait
        waiting = [batcher.submit(_job(2.0)), batcher.submit(_job(3.0))]
        with pytest.raises(QueueFull):
            batcher.submit(_job(4.0))
        runner.gate.set()
        await asyncio.gather(first, *waiting)
        await batcher.close()

    asyncio.run(main())


def test_expired_and_cancelled_jobs_are_not_run():
    async def main():
        runner = SlowRunner(seconds=0.0)
        runner.gate.clear()
        batcher = _batcher(runner, max_batch_size=1)
        first = batcher.submit(_job(1.0))
        await asyncio.sleep(0.01)
        expired = batcher.submit(_job(2.0, deadline=time.monotonic() + 0.01))
        cancelled = batcher.submit(_job(3.0))
        kept = batcher.submit(_job(4.0))
        cancelled.cancel()
        await asyncio.sleep(0.05)  # the deadline passes while they wait
        runner.gate.set()
        await first
        with pytest.raises(DeadlineExceeded):
            await expired
        await kept
        await batcher.close()
        return runner

    runner = asyncio.run(main())
    assert len(runner.batches) == 2  # the first and the kept one; neither the expired nor the cancelled


def test_close_finishes_queued_jobs():
    async def main():
        runner = SlowRunner(seconds=0.01)
        batcher = _batcher(runner, max_batch_size=1)
        futures = [batcher.submit(_job(float(i))) for i in range(5)]
        await batcher.close()
        return [f.result().outputs["a"][0, 0] for f in futures]

    assert asyncio.run(main()) == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_a_failing_run_fails_its_batch_only():
    async def main():
        calls = {"n": 0}

        def flaky(batch, names):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
            return [batch]

        batcher = _batcher(flaky, output_order=["a"])
        with pytest.raises(RuntimeError):
            await batcher.submit(_job(1.0))
        ok = await batcher.submit(_job(2.0))
        await batcher.close()
        return ok

    assert asyncio.run(main()).outputs["a"].tolist() == [[2.0]]
