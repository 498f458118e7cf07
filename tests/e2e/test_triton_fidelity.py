"""Where a Triton client can tell convserve from Triton, convserve behaves as Triton (issue 12):
each test is one difference seen side by side with tritonserver 2.51, as convserve's own behaviour."""

import queue

import grpc
import numpy as np
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.service.client import Client, build_request

from .conftest import RunningServer

X = np.zeros((1, 1, 32, 32), np.float32)


def _input(good: bool):
    shape = [1, 1, 32, 32] if good else [1, 3, 32, 32]  # the bad one has the wrong channel count
    tensor = triton.InferInput("input", shape, "FP32")
    tensor.set_data_from_numpy(np.zeros(shape, np.float32))
    return tensor


def test_a_stream_answers_in_request_order_with_plain_error_messages(server):
    """Triton answered 40-request streams in request order; tritonclient gives an error no request
    id, so clients match answers by position. Errors carry no 'INVALID_ARGUMENT: ' prefix."""
    client = triton.InferenceServerClient(server.url)
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    bad = {4, 11, 12, 23, 30, 31, 39}
    for i in range(40):
        client.async_stream_infer("digits", [_input(i not in bad)], request_id=str(i))
    got = [answers.get(timeout=60) for _ in range(40)]
    client.stop_stream()
    for i, (result, error) in enumerate(got):
        if i in bad:
            assert result is None and error is not None, i
            assert str(error.message()).startswith("input 'input' must be"), error.message()
        else:
            assert error is None and result.get_response().id == str(i), (i, error)


def test_the_request_timeout_parameter_is_ignored_unless_the_queue_policy_allows_it(server, own_repository):
    request = build_request("digits", array=X)
    request.parameters["timeout"].int64_param = 10  # microseconds: already over when it is queued
    with Client(server.url) as client:
        assert client.stub.ModelInfer(request, timeout=30).outputs  # Triton's default: ignored
    allowing = RunningServer(own_repository, "--allow-timeout-override", "1")
    try:
        with Client(allowing.url) as client:
            try:
                client.stub.ModelInfer(request, timeout=30)
                raise AssertionError("a 10 us timeout was not applied")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        assert allowing.stop() == 0, allowing.output()


def test_health_answers_for_triton_service_name(server):
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        named = health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=5)
    assert named.status == health_pb2.HealthCheckResponse.SERVING


def _statistics(client):
    from convserve.service.proto import grpc_service_pb2 as pb

    (entry,) = client.stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits"), timeout=10).model_stats
    return entry


def test_statistics_count_requests_where_triton_does_and_carry_batch_stats(server):
    """Triton counts compute_infer per request (48 concurrent requests: 48), convserve counted batch
    runs (5); batch_stats carry compute_input/infer/output per executed batch size."""
    with Client(server.url) as client:
        before = _statistics(client)
        futures = [client.stub.ModelInfer.future(build_request("digits", array=X), timeout=60) for _ in range(48)]
        assert all(f.result().outputs for f in futures)
        after = _statistics(client)
    done = after.inference_stats.success.count - before.inference_stats.success.count
    assert done == 48
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        delta = getattr(after.inference_stats, stage).count - getattr(before.inference_stats, stage).count
        assert delta == 48, stage
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    executions = after.execution_count - before.execution_count
    assert 1 <= executions <= 48 and after.inference_count - before.inference_count == 48

    def by_size(entry):
        return {b.batch_size: b for b in entry.batch_stats}

    old, new = by_size(before), by_size(after)
    images = runs = 0
    for size, stats in new.items():
        count = stats.compute_infer.count - (old[size].compute_infer.count if size in old else 0)
        assert stats.compute_input.count == stats.compute_infer.count == stats.compute_output.count
        assert stats.compute_infer.ns > 0
        images, runs = images + size * count, runs + count
    assert images == 48 and runs == executions
