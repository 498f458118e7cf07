"""The registry with real exported models: versions swap under load, nothing in flight is lost."""

import asyncio
import os
import shutil
import time

import numpy as np

from models.export import export_checkpoint
from service.dataplane import DataPlane
from service.protocol import InferRequest
from service.registry import Registry
from service.settings import Settings


def test_in_flight_requests_finish_on_the_version_they_started_on(trained, tmp_path):
    result, folder = trained
    repository = tmp_path / "repository"
    shutil.copytree(os.path.dirname(os.path.dirname(folder)), repository)

    async def main():
        registry = Registry(Settings(repository=str(repository), max_batch_size=1, max_queue_size=1000))
        await registry.scan()
        plane = DataPlane(registry)
        old = registry.resolve("digits")
        run = old.batcher._runner

        def slow_run(batch, names):   # keep version 1 busy while version 2 arrives
            time.sleep(0.005)
            return run(batch, names)

        old.batcher._runner = slow_run
        x = np.zeros((1, 1, 32, 32), np.float32)
        in_flight = [asyncio.create_task(plane.infer(InferRequest("digits", "", str(i), "input", array=x)))
                     for i in range(200)]
        await asyncio.sleep(0.05)
        export_checkpoint(os.path.join(result.config.output, "checkpoint.pt"), repository=str(repository),
                          name="digits")
        await registry.scan()   # loads version 2, then retires version 1 once its queue is empty
        finished = await asyncio.gather(*in_flight)
        after, _ = await plane.infer(InferRequest("digits", "", "new", "input", array=x))
        await registry.close()
        return old, finished, after

    old, finished, after = asyncio.run(main())
    assert len(finished) == 200 and all(model.version == 1 for model, _ in finished)
    assert old.state == "UNAVAILABLE" and after.version == 2
