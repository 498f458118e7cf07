"""Where a Triton client can tell convserve from Triton, convserve behaves as Triton (issue 12):
each test is one difference seen side by side with tritonserver 2.51, as convserve's own behaviour."""

import os
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.client import Client, build_request

from .conftest import InProcessServer

X = np.zeros((1, 1, 32, 32), np.float32)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    allowing = InProcessServer(own_repository, "--allow-timeout-override", "1")
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
    from convserve.proto import grpc_service_pb2 as pb

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


def test_log_and_trace_settings_as_triton_names_them(server):
    client = triton.InferenceServerClient(server.url)
    settings = client.get_log_settings(as_json=True)["settings"]
    assert settings["log_info"]["bool_param"] is True and settings["log_format"]["string_param"] == "default"
    updated = client.update_log_settings({"log_verbose_level": 1}, as_json=True)["settings"]
    assert updated["log_verbose_level"]["uint32_param"] == 1
    restored = client.update_log_settings({"log_verbose_level": 0, "log_info": True}, as_json=True)["settings"]
    assert restored.get("log_verbose_level", {}).get("uint32_param", 0) == 0
    assert "log_colour" not in client.update_log_settings({"log_colour": True}, as_json=True)["settings"]  # as Triton
    for bad, code in (({"log_file": "/tmp/x.log"}, "UNIMPLEMENTED"),):  # a wrong type: test_loopback
        try:
            client.update_log_settings(bad)
            raise AssertionError(f"{bad} was accepted")
        except triton.InferenceServerException as exc:
            assert exc.status() == f"StatusCode.{code}", exc
    trace = client.get_trace_settings(as_json=True)["settings"]
    assert trace["trace_level"]["value"] == ["OFF"]
    try:
        client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
        raise AssertionError("tracing was turned on")
    except triton.InferenceServerException as exc:
        assert exc.status() == "StatusCode.UNIMPLEMENTED"
    extensions = client.get_server_metadata(as_json=True)["extensions"]
    # the trace settings are served (read, and set to off), so "trace" is listed, as are parameters
    assert {"logging", "trace", "parameters"} <= set(extensions)
    assert not any("unload_dependents" in e for e in extensions)


def test_metadata_and_config_describe_what_requests_may_carry(server, own_repository):
    client = triton.InferenceServerClient(server.url)
    metadata = client.get_model_metadata("digits", as_json=True)
    config = client.get_model_config("digits", as_json=True)["config"]
    inputs = {i["name"]: i for i in config["input"]}
    assert all(i.get("optional") for i in inputs.values())  # alternatives: a request carries one
    for entry in metadata["inputs"]:  # metadata = [-1] + config dims, as Triton reports them
        assert [int(d) for d in entry["shape"]] == [-1, *[int(d) for d in inputs[entry["name"]]["dims"]]]
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert config["parameters"]["default_outputs"]["string_value"] == "logits,probabilities"
    # an image as [N, 1], the config's shape, is accepted as well as [N]
    image = triton.InferInput("image", [1, 1], "BYTES")
    with open(os.path.join(ROOT, "examples", "digits", "2-test2.png"), "rb") as handle:
        image.set_data_from_numpy(np.array([[handle.read()]], dtype=object))
    # the same output twice, plain and as classification: it comes back once, as classification (2.51)
    outputs = [
        triton.InferRequestedOutput("probabilities"),
        triton.InferRequestedOutput("probabilities", class_count=1),
    ]
    result = client.infer("digits", [image], outputs=outputs).get_response()
    assert [(o.name, o.datatype) for o in result.outputs] == [("probabilities", "BYTES")]
    # a config override at load time is refused, not ignored
    try:
        client.load_model("digits", config='{"max_batch_size": 4}')
        raise AssertionError("a config override was accepted")
    except triton.InferenceServerException as exc:
        assert exc.status() == "StatusCode.UNIMPLEMENTED" and "config" in exc.message()


def test_failures_count_where_triton_counts_them_and_unloading_the_unknown_is_ok(server):
    """Side by side with tritonserver 2.51: a bad-shape request leaves fail.count unchanged (it never
    reached the model), and RepositoryModelUnload of a model nobody has answers OK."""
    from convserve.proto import grpc_service_pb2 as pb

    with Client(server.url) as client:
        before = _statistics(client).inference_stats.fail.count
        try:
            client.infer("digits", array=np.zeros((1, 3, 32, 32), np.float32))
            raise AssertionError("a wrong shape was accepted")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _statistics(client).inference_stats.fail.count == before
        client.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="no_such_model"), timeout=10)
        assert client.infer("digits", array=X).outputs  # and nothing else changed


def test_codes_for_unknown_and_empty_names_and_versions_are_tritons(server):
    """Each as tritonserver 2.51 answered it in the differential run (issue 17)."""
    from convserve.proto import grpc_service_pb2 as pb

    with Client(server.url) as client:
        stub = client.stub

        def code(call, request):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10)
            return info.value.code()

        not_found = grpc.StatusCode.NOT_FOUND
        assert code(stub.ModelInfer, build_request("digits", array=X, version="0")) == not_found
        assert code(stub.ModelInfer, build_request("", array=X)) == not_found
        assert code(stub.ModelInfer, pb.ModelInferRequest()) == not_found
        for call, request in (
            (stub.ModelMetadata, pb.ModelMetadataRequest(name="digits", version="0")),
            (stub.ModelMetadata, pb.ModelMetadataRequest()),
            (stub.ModelConfig, pb.ModelConfigRequest(name="digits", version="0")),
            (stub.ModelConfig, pb.ModelConfigRequest()),
        ):
            assert code(call, request) == not_found, request
        for request in (pb.ModelReadyRequest(name="digits", version="0"), pb.ModelReadyRequest()):
            assert stub.ModelReady(request, timeout=10).ready is False
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        assert code(stub.ModelStatistics, pb.ModelStatisticsRequest(name="no_such_model")) == invalid
        assert code(stub.ModelStatistics, pb.ModelStatisticsRequest(name="digits", version="9")) == invalid
        assert code(stub.TraceSetting, pb.TraceSettingRequest(model_name="no_such_model")) == invalid
        unimplemented = grpc.StatusCode.UNIMPLEMENTED
        assert code(stub.RepositoryIndex, pb.RepositoryIndexRequest(repository_name="models")) == unimplemented
        # request parameters: classification 0, a priority that is no unsigned integer
        zero = build_request("digits", array=X, outputs=["logits"])
        zero.outputs[0].parameters["classification"].int64_param = 0
        assert code(stub.ModelInfer, zero) == invalid
        wrong = build_request("digits", array=X)
        wrong.parameters["priority"].string_param = "high"
        assert code(stub.ModelInfer, wrong) == invalid
        fine = build_request("digits", array=X)
        fine.parameters["priority"].uint64_param = 1
        assert stub.ModelInfer(fine, timeout=10).outputs


def test_health_answers_for_any_service_name_as_the_server(server):
    with grpc.insecure_channel(server.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "inference.GRPCInferenceService", "anything.at.all", "digits"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, name
