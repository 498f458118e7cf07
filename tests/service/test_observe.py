"""One outcome per request, recorded once into Prometheus and ModelStatistics; errors that escape
as INTERNAL are logged with their traceback and reach the client without internal names; a stream
that is not read stops being read."""

import asyncio
import logging

import grpc
import pytest
from prometheus_client import generate_latest

from convserve.cpus import available_cpus
from convserve.proto import grpc_service_pb2 as pb
from convserve.service.engine.stats import VersionStats
from convserve.service.errors import INTERNAL_MESSAGE, Code, DeadlineExceeded, InvalidInput
from convserve.service.frontend.core import FrontendCore, ServerState
from convserve.service.frontend.grpc.servicer import InferenceServicer
from convserve.service.frontend.observe import Outcome, Recorder, Timings
from convserve.service.metrics import Metrics
from convserve.service.settings import Settings


def _text(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_one_outcome_feeds_metrics_and_statistics_alike():
    metrics = Metrics()
    stats = VersionStats()  # the engine's; the front-end sends it each record

    def send_stat(model, version, record):
        assert (model, version) == ("digits", 1)
        stats.record_request(record)

    recorder = Recorder(metrics, lambda name: name == "digits", send_stat)
    ok = Outcome(
        "ModelInfer",
        "digits",
        "1",
        timings=Timings(queue_ns=2_000, preprocess_ns=5_000),
        feature_map_bytes=4096,
        seconds=0.003,
    )
    recorder.record(ok)
    with pytest.raises(InvalidInput), recorder.observe(Outcome("ModelInfer", "digits", "1")):
        raise InvalidInput("bad shape")  # refused before the queue: not the model's failure (as Triton)
    with pytest.raises(DeadlineExceeded), recorder.observe(Outcome("ModelInfer", "digits", "1")) as late:
        late.queued = True
        raise DeadlineExceeded("deadline passed while the request was queued")
    recorder.record(Outcome("ModelInfer", "no_such_model", code=Code.NOT_FOUND))
    text = _text(metrics)
    assert 'convserve_requests_total{code="OK",method="ModelInfer",model="digits",version="1"} 1.0' in text
    assert 'code="INVALID_ARGUMENT",method="ModelInfer",model="digits",version="1"} 1.0' in text
    assert 'code="DEADLINE_EXCEEDED",method="ModelInfer",model="digits",version="1"} 1.0' in text
    assert 'model="unknown"' in text and "no_such_model" not in text
    assert 'convserve_feature_map_bytes_total{model="digits"} 4096.0' in text
    assert 'convserve_queue_duration_seconds_count{model="digits"} 1.0' in text
    assert (stats.success_count, stats.fail_count, stats.queue_ns, stats.preprocess_ns) == (1, 1, 2_000, 5_000)
    assert stats.success_ns == 3_000_000 and stats.fail_ns > 0
    assert "convserve_requests_in_flight 0.0" in text


def test_queue_depth_is_read_at_scrape_time():
    metrics = Metrics()
    depths = {"digits": 3}
    metrics.read_queue_depth_from(lambda: depths)
    assert 'convserve_queue_depth{model="digits"} 3.0' in _text(metrics)
    depths["digits"] = 0
    assert 'convserve_queue_depth{model="digits"} 0.0' in _text(metrics)


class _Context:
    def __init__(self):
        self.aborted = None

    async def abort(self, code, message):
        self.aborted = (code, message)
        raise grpc.RpcError(message)

    def time_remaining(self):
        return None


def test_an_unexpected_error_is_logged_with_its_traceback_and_answered_plainly(caplog):
    class BrokenTable:
        def resolve(self, name, version=""):
            raise KeyError("a secret internal detail at 0x7f00")

    recorder = Recorder(Metrics(), lambda name: True)
    core = FrontendCore(BrokenTable(), None, None, Settings(), lambda: ServerState.READY, recorder)
    context = _Context()
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.RpcError):
        asyncio.run(InferenceServicer(core).ModelReady(pb.ModelReadyRequest(name="digits"), context))
    assert context.aborted == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert "KeyError" not in INTERNAL_MESSAGE and "0x7f" not in INTERNAL_MESSAGE
    record = next(r for r in caplog.records if "unexpected error in ModelReady" in r.getMessage())
    assert record.exc_info is not None and "0x7f00" in str(record.exc_info[1])
    assert 'code="INTERNAL",method="ModelReady"' in _text(recorder.metrics)


def test_a_stream_that_is_not_read_is_not_read_from(monkeypatch):
    pulled = []

    class Servicer(InferenceServicer):
        async def stream_answer(self, request, deadline):
            return pb.ModelInferResponse(model_name=request.model_name, id=request.id)

    settings = Settings(max_stream_in_flight=4)
    recorder = Recorder(Metrics(), lambda name: True)
    servicer = Servicer(FrontendCore(None, None, None, settings, lambda: ServerState.READY, recorder))

    async def requests():
        for i in range(1000):
            pulled.append(i)
            yield pb.ModelInferRequest(model_name="digits", id=str(i))

    async def main():
        stream = servicer.ModelStreamInfer(requests(), _Context())
        first = await stream.__anext__()
        await asyncio.sleep(0.2)  # the client reads nothing for a while
        held = len(pulled)
        rest = [item async for item in stream]
        return first, held, rest

    first, held, rest = asyncio.run(main())
    assert held <= 4 + 2, held  # the limit, plus the one yielded and the one being read
    assert len(rest) + 1 == 1000 and not any(item.error_message for item in rest)


def test_available_cpus_follows_the_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cpus(str(tmp_path)) == min(2, available_cpus(str(tmp_path / "none")))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(str(tmp_path)) == available_cpus(str(tmp_path / "none")) >= 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert available_cpus(str(v1)) == 1


def test_gpu_metrics_come_from_nvml_where_there_is_a_gpu_and_nothing_elsewhere():
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from convserve.service.gpu_metrics import NAMES, GpuCollector

    class FakeNvml:  # what nvidia-ml-py answers on a machine with two GPUs
        def nvmlDeviceGetCount(self):
            return 2

        def nvmlDeviceGetHandleByIndex(self, index):
            return index

        def nvmlDeviceGetMemoryInfo(self, handle):
            return SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30)

        def nvmlDeviceGetUtilizationRates(self, handle):
            return SimpleNamespace(gpu=40 + handle)

    registry = CollectorRegistry()
    registry.register(GpuCollector(FakeNvml()))
    assert registry.get_sample_value("convserve_gpu_memory_used_bytes", {"gpu": "1"}) == 2 * 2**30
    assert registry.get_sample_value("convserve_gpu_memory_total_bytes", {"gpu": "0"}) == 80 * 2**30
    assert registry.get_sample_value("convserve_gpu_utilization_ratio", {"gpu": "1"}) == 0.41
    # this machine: no NVIDIA driver, so no GPU metric at all, and no error
    text = generate_latest(Metrics().registry).decode()
    assert not any(name in text for name in NAMES)
    assert "convserve_queue_capacity" in text
