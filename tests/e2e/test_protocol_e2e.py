"""End to end over real gRPC: our client, tritonclient (written by others), health, reflection."""

import io
import json
import os
import queue
import threading
import urllib.request

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from convserve.client import Client, build_request
from convserve.models.data import digits_as_uint8, seeded_split
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import introspection_pb2 as ipb
from convserve.proto import introspection_pb2_grpc as ipb_grpc

FEATURE_MAPS = ["conv1", "conv2", "conv3", "conv4", "conv5"]


def _png(image):
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0]).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def meta(trained):
    return json.load(open(os.path.join(trained[1], "model.json")))


@pytest.fixture(scope="module")
def held_out(meta):
    images, labels = digits_as_uint8()
    _, test = seeded_split(len(images), 0.2, meta["training"]["seed"])
    return [_png(images[i]) for i in test], labels[test]


@pytest.fixture(scope="module")
def torch_model(trained):
    from convserve.models.checkpoint import Checkpoint

    result, _ = trained
    return Checkpoint.load(result.checkpoint).build_model()


def test_tritonclient_health_and_metadata(server):
    client = triton.InferenceServerClient(server.url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    assert not client.is_model_ready("no_such_model")
    metadata = client.get_model_metadata("digits", as_json=True)
    assert [i["name"] for i in metadata["inputs"]] == ["input", "image"]
    assert [o["name"] for o in metadata["outputs"]] == ["logits", "probabilities", *FEATURE_MAPS]
    config = client.get_model_config("digits", as_json=True)["config"]
    assert config["name"] == "digits" and config["max_batch_size"] == 32
    assert config["input"][0]["dims"] == ["1", "32", "32"]
    assert config["parameters"]["execution_provider"]["string_value"] == "CPUExecutionProvider"
    server_meta = client.get_server_metadata(as_json=True)
    assert server_meta["name"] == "convserve" and "classification" in server_meta["extensions"]


def test_tritonclient_infer_input_image_feature_maps_classification(server, held_out, torch_model):
    client = triton.InferenceServerClient(server.url)
    pngs, labels = held_out
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    fp16 = triton.InferRequestedOutput("conv3")
    fp16._output.parameters["datatype"].string_param = "FP16"  # tritonclient has no setter for it
    outputs = [
        triton.InferRequestedOutput("logits"),
        triton.InferRequestedOutput("probabilities", class_count=3),
        triton.InferRequestedOutput("conv2"),
        fp16,
    ]
    result = client.infer("digits", [inp], outputs=outputs)
    with torch.no_grad():
        logits, maps = torch_model.forward_with_feature_maps(torch.from_numpy(x))
    np.testing.assert_allclose(result.as_numpy("logits"), logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("conv2"), maps["conv2"].numpy(), atol=1e-4)
    half = result.as_numpy("conv3")
    assert half.dtype == np.float16 and half.shape == tuple(maps["conv3"].shape)
    # FP16 keeps 11 significant bits: within half a unit in the last place of the value (plus 1e-4 export slack)
    expected = maps["conv3"].numpy()
    assert np.all(np.abs(half.astype(np.float32) - expected) <= np.abs(expected) * 2.0**-11 + 1e-4)
    top = result.as_numpy("probabilities")
    assert top.shape == (3, 3)
    score, index, label = top[0][0].decode().split(":")
    assert int(index) == int(logits[0].argmax()) and label == str(index)
    # encoded images
    img = triton.InferInput("image", [4], "BYTES")
    img.set_data_from_numpy(np.array(pngs[:4], dtype=object))
    result = client.infer("digits", [img])
    assert result.as_numpy("logits").shape == (4, 10)
    assert (result.as_numpy("logits").argmax(1) == labels[:4]).mean() >= 0.75


def test_tritonclient_async_and_stream(server, held_out):
    client = triton.InferenceServerClient(server.url)
    pngs, _ = held_out
    results = queue.Queue()

    def make_input(i):
        img = triton.InferInput("image", [1], "BYTES")
        img.set_data_from_numpy(np.array([pngs[i]], dtype=object))
        return img

    for i in range(4):
        client.async_infer(
            "digits", [make_input(i)], callback=lambda result, error: results.put((result, error)), request_id=str(i)
        )
    answers = [results.get(timeout=30) for _ in range(4)]
    assert all(e is None and r.as_numpy("logits").shape == (1, 10) for r, e in answers)

    stream_results = queue.Queue()
    client.start_stream(callback=lambda result, error: stream_results.put((result, error)))
    client.async_stream_infer("digits", [make_input(0)], request_id="a")
    bad = triton.InferInput("input", [1, 3, 32, 32], "FP32")  # wrong channel count
    bad.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    client.async_stream_infer("digits", [bad], request_id="bad")
    client.async_stream_infer("digits", [make_input(1)], request_id="b")
    got = [stream_results.get(timeout=30) for _ in range(3)]
    client.stop_stream()
    errors = [e for r, e in got if e is not None]
    ok = [r for r, e in got if e is None]
    assert len(errors) == 1 and "must be [N, 1, 32, 32]" in str(errors[0])
    assert sorted(r.get_response().id for r in ok) == ["a", "b"]  # the stream stayed open


def test_held_out_pngs_classified_with_recorded_accuracy(server, held_out, meta):
    pngs, labels = held_out
    predictions = []
    with Client(server.url) as client:
        for start in range(0, len(pngs), 32):
            response = client.infer("digits", images=pngs[start : start + 32], outputs=["logits"])
            predictions.append(client.output(response, "logits").argmax(1))
    accuracy = float((np.concatenate(predictions) == labels).mean())
    assert abs(accuracy - meta["training"]["test_accuracy"]) <= 0.01


def test_our_client_metrics_and_feature_maps(server, torch_model):
    x = np.random.default_rng(1).standard_normal((2, 1, 32, 32)).astype(np.float32)
    with Client(server.url) as client:
        response = client.infer("digits", array=x, outputs=["logits", *FEATURE_MAPS], fp16=["conv5"])
        params = client.parameters(response)
        for key in ("queue_us", "preprocess_us", "compute_us", "postprocess_us", "server_us", "batch_size"):
            assert isinstance(params[key], int) and params[key] >= 0, key
        assert params["execution_provider"] == "CPUExecutionProvider" and params["batch_size"] >= 2
        assert params["server_us"] >= params["compute_us"]
        with torch.no_grad():
            _, maps = torch_model.forward_with_feature_maps(torch.from_numpy(x))
        for name in FEATURE_MAPS[:4]:
            np.testing.assert_allclose(client.output(response, name), maps[name].numpy(), atol=1e-4)
        assert client.output(response, "conv5").dtype == np.float16
        default = client.infer("digits", array=x)
        assert [o.name for o in default.outputs] == ["logits", "probabilities"]


def test_sixteen_concurrent_clients_batch_and_match_unbatched(server):
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal((1, 1, 32, 32)).astype(np.float32) for _ in range(16 * 8)]
    with Client(server.url) as client:
        alone = [
            client.output(client.infer("digits", array=x, outputs=["logits", "conv1"]), "logits") for x in inputs[:16]
        ]
    answers, batch_sizes, errors = {}, [], []

    def worker(k):
        with Client(server.url) as client:
            for i in range(k, len(inputs), 16):
                try:
                    response = client.infer("digits", array=inputs[i], outputs=["logits", "conv1"])
                    answers[i] = client.output(response, "logits")
                    batch_sizes.append(client.parameters(response)["batch_size"])
                except grpc.RpcError as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert max(batch_sizes) > 1, batch_sizes
    for i in range(16):
        np.testing.assert_array_equal(answers[i], alone[i])  # identical, not just close


def test_bad_requests_get_the_right_codes_and_the_server_keeps_serving(server):
    with Client(server.url) as client:

        def code_of(request):
            with pytest.raises(grpc.RpcError) as info:
                client.stub.ModelInfer(request, timeout=10)
            return info.value.code()

        x = np.zeros((1, 1, 32, 32), np.float32)
        assert code_of(build_request("no_such_model", array=x)) == grpc.StatusCode.NOT_FOUND
        assert code_of(build_request("../etc", array=x)) == grpc.StatusCode.NOT_FOUND  # no such model
        assert code_of(build_request("digits", array=np.zeros((1, 3, 32, 32)))) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(build_request("digits", array=x, outputs=["fc9"])) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(build_request("digits", images=[b"not an image"])) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(build_request("digits", array=x, version="x1")) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(build_request("digits", array=x, version="99")) == grpc.StatusCode.NOT_FOUND
        assert code_of(build_request("digits", array=np.zeros((33, 1, 32, 32)))) == grpc.StatusCode.INVALID_ARGUMENT
        truncated = build_request("digits", array=x)
        truncated.raw_input_contents[0] = truncated.raw_input_contents[0][:-4]
        assert code_of(truncated) == grpc.StatusCode.INVALID_ARGUMENT
        typed = pb.ModelInferRequest(model_name="digits")
        typed.inputs.add(name="input", datatype="FP32", shape=[1, 1, 32, 32]).contents.fp32_contents.extend(
            [0.0] * 1024
        )
        assert client.stub.ModelInfer(typed).outputs[0].name == "logits"  # typed contents work too
        reserved = build_request("digits", array=x)
        reserved.parameters["priority"].uint64_param = 1
        reserved.parameters["sequence_id"].int64_param = 7
        assert client.stub.ModelInfer(reserved).model_name == "digits"
        # still serving
        assert client.infer("digits", array=x).model_name == "digits"


def test_unimplemented_health_reflection_introspection(server):
    with grpc.insecure_channel(server.url) as channel:
        unknown = channel.unary_unary(
            "/inference.GRPCInferenceService/CudaSharedMemoryRegister",
            request_serializer=lambda m: b"",
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as info:
            unknown(None, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "digits"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=name)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        services = {s.name for s in answer.list_services_response.service}
        assert {"inference.GRPCInferenceService", "convserve.v1.Introspection", "grpc.health.v1.Health"} <= services
        answer = next(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")])
            )
        )
        assert answer.file_descriptor_response.file_descriptor_proto
        described = ipb_grpc.IntrospectionStub(channel).DescribeModel(ipb.DescribeModelRequest(name="digits"))
        assert described.total_params == sum(layer.params for layer in described.layers) > 0
        assert described.feature_maps == FEATURE_MAPS
        assert json.loads(described.training_json)["dataset"] == "digits"


def test_statistics_and_prometheus_metrics(server):
    with Client(server.url) as client:
        client.infer("digits", array=np.zeros((1, 1, 32, 32), np.float32))
        stats = client.stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits")).model_stats[0]
        assert stats.inference_count >= stats.execution_count > 0
        assert stats.inference_stats.success.count > 0 and stats.inference_stats.compute_infer.ns > 0
        with pytest.raises(grpc.RpcError):
            client.infer("digits", array=np.zeros((1, 2, 32, 32), np.float32))
        with pytest.raises(grpc.RpcError):
            client.infer("no_such_model", array=np.zeros((1, 1, 32, 32), np.float32))
        streamed = list(
            client.stub.ModelStreamInfer(iter([build_request("digits", array=np.zeros((1, 1, 32, 32), np.float32))]))
        )
        assert len(streamed) == 1 and not streamed[0].error_message
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'convserve_requests_total{code="OK",method="ModelInfer",model="digits"' in text
    assert 'code="INVALID_ARGUMENT",method="ModelInfer",model="digits"' in text
    assert "convserve_request_duration_seconds_bucket" in text
    # names of models that do not exist never become label values
    assert 'model="no_such_model"' not in text and 'model="unknown"' in text
    assert 'code="OK",method="ModelStreamInfer",model="digits"' in text


def test_models_and_describe_commands(server):
    import subprocess
    import sys

    env = dict(os.environ)

    def convserve(*args):
        return subprocess.run(
            [sys.executable, "-m", "convserve", *args, "--url", server.url],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    models = convserve("models")
    assert models.returncode == 0 and "digits" in models.stdout and "READY" in models.stdout
    described = convserve("describe", "digits")
    assert described.returncode == 0, described.stderr
    assert "conv5" in described.stdout and "fc layers" in described.stdout and "dataset=digits" in described.stdout
    missing = convserve("describe", "nope")
    assert missing.returncode == 2
    assert missing.stderr == "convserve: error: unknown model 'nope'; the server has: digits\n", missing.stderr
