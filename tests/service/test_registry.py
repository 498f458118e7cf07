"""The registry with real exported models: versions swap under load, nothing in flight is lost."""

import asyncio
import os
import shutil
import time

import numpy as np

from convserve.models.export import export_checkpoint
from convserve.service.engine.batcher import Job
from convserve.service.engine.registry import ModelState, Registry
from convserve.service.metrics import Metrics
from convserve.service.settings import Settings


def test_in_flight_requests_finish_on_the_version_they_started_on(trained, tmp_path):
    result, folder = trained
    repository = tmp_path / "repository"
    shutil.copytree(os.path.dirname(os.path.dirname(folder)), repository)

    async def main():
        registry = Registry(Settings(repository=str(repository), max_batch_size=1, max_queue_size=1000), Metrics())
        await registry.scan()
        old = registry.get("digits", 1)
        run = old.batcher._runner

        def slow_run(batch, names):  # keep version 1 busy while version 2 arrives
            time.sleep(0.005)
            return run(batch, names)

        old.batcher._runner = slow_run
        x = np.zeros((1, 1, 32, 32), np.float32)
        in_flight = [old.batcher.submit(Job(x, frozenset({"logits"}))) for _ in range(200)]
        await asyncio.sleep(0.05)
        export_checkpoint(result.checkpoint, repository=str(repository), name="digits")
        await registry.scan()  # loads version 2, then retires version 1 once its queue is empty
        finished = await asyncio.gather(*in_flight)
        served = [m.version for m in registry.served_versions("digits")]
        await registry.close()
        return old, finished, served

    old, finished, served = asyncio.run(main())
    assert len(finished) == 200 and all(r.outputs["logits"].shape == (1, 10) for r in finished)
    assert old.state is ModelState.UNAVAILABLE and served == [2]


def test_intra_op_spinning_is_off_on_the_cpu_unless_asked_for(trained):
    from convserve.service.engine.runtime import ModelRuntime

    path = os.path.join(trained[1], "model.onnx")

    def spinning(**kwargs):
        options = ModelRuntime(path, Settings(providers="cpu", **kwargs)).session.get_session_options()
        return options.get_session_config_entry("session.intra_op.allow_spinning")

    assert spinning() == "0" and spinning(intra_op_spinning="on") == "1" and spinning(intra_op_spinning="off") == "0"
