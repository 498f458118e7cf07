"""The V2 HTTP/REST front door against tritonclient.http, unmodified: JSON and binary tensors equal
gRPC's answers, classification, feature maps, the image input, compression, repository calls,
errors with Triton's HTTP codes, and the token."""

import gzip
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from .conftest import InProcessServer

X = np.random.default_rng(3).standard_normal((2, 1, 32, 32)).astype(np.float32)


def _http(server) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")


def _grpc_answer(server, outputs):
    client = grpcclient.InferenceServerClient(server.url)
    tensor = grpcclient.InferInput("input", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    result = client.infer("digits", [tensor], outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
    return {n: result.as_numpy(n) for n in outputs}


@pytest.mark.parametrize("binary", [False, True])
def test_json_and_binary_inference_equal_grpcs_answers(server, binary):
    outputs = ["logits", "probabilities", "conv1"]
    client = _http(server)
    tensor = httpclient.InferInput("input", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X, binary_data=binary)
    result = client.infer(
        "digits", [tensor], outputs=[httpclient.InferRequestedOutput(n, binary_data=binary) for n in outputs]
    )
    expected = _grpc_answer(server, outputs)
    for name in outputs:
        np.testing.assert_allclose(result.as_numpy(name), expected[name], rtol=1e-6, atol=1e-6)
    answer = result.get_response()
    assert answer["model_name"] == "digits" and answer["parameters"]["batch_size"] >= 1


def test_classification_image_input_and_compression(server):
    client = _http(server)
    buffer = io.BytesIO()
    Image.fromarray((np.eye(32) * 255).astype(np.uint8)).save(buffer, format="PNG")
    image = httpclient.InferInput("image", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[buffer.getvalue()]], dtype=object), binary_data=True)
    result = client.infer(
        "digits",
        [image],
        outputs=[httpclient.InferRequestedOutput("probabilities", class_count=3)],
        request_compression_algorithm="gzip",
        response_compression_algorithm="deflate",
    )
    top = [item.decode() for item in result.as_numpy("probabilities").ravel()]
    assert len(top) == 3 and all(len(item.split(":")) >= 2 for item in top)
    scores = [float(item.split(":")[0]) for item in top]
    assert scores == sorted(scores, reverse=True)


def test_image_as_base64_in_json(server):
    import base64

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(buffer, format="PNG")
    body = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(buffer.getvalue()).decode()]}
        ],
        "outputs": [{"name": "probabilities"}],
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/v2/models/digits/infer", data=json.dumps(body).encode(), method="POST"
    )
    answer = json.loads(urllib.request.urlopen(request, timeout=10).read())
    (output,) = answer["outputs"]
    assert output["shape"] == [1, 10] and abs(sum(output["data"]) - 1) < 1e-4


def test_health_metadata_config_statistics_and_repository(server):
    client = _http(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    assert not client.is_model_ready("no_such_model")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "convserve" and "binary_tensor_data" in metadata["extensions"]
    model = client.get_model_metadata("digits")
    assert model["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 32, 32]}
    config = client.get_model_config("digits")
    assert config["name"] == "digits" and config["max_batch_size"] == 32
    stats = client.get_inference_statistics("digits")["model_stats"][0]
    assert stats["name"] == "digits" and isinstance(stats["inference_count"], int)
    index = client.get_model_repository_index()
    assert any(m["name"] == "digits" and m["state"] == "READY" for m in index)


def test_load_unload_over_http(own_repository):
    server = InProcessServer(own_repository)
    try:
        client = _http(server)
        client.unload_model("digits")
        assert not client.is_model_ready("digits")
        client.load_model("digits")
        assert client.is_model_ready("digits")
    finally:
        assert server.stop() == 0, server.output()


def _status(server, path, body=None, headers=None, method=None):
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}{path}", data=body, headers=headers or {}, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_errors_have_tritons_http_codes_and_v2_bodies(server):
    infer = "/v2/models/digits/infer"
    wrong_shape = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}
    cases = [
        ("/v2/models/no_such_model/infer", json.dumps(wrong_shape).encode(), {}, 404),
        (infer, json.dumps(wrong_shape).encode(), {}, 400),
        (infer, b"{not json", {}, 400),
        (infer, json.dumps({"inputs": "x"}).encode(), {}, 400),
        (infer, b"x" * 64, {"Content-Encoding": "gzip"}, 400),
        (infer, gzip.compress(b"\0" * (64 << 20)), {"Content-Encoding": "gzip"}, 413),
        ("/v2/models/digits/versions/0/infer", json.dumps(wrong_shape).encode(), {}, 404),
    ]
    for path, body, headers, status in cases:
        code, text = _status(server, path, body, headers, "POST")
        assert code == status, (path, headers, text[:200])
        assert set(json.loads(text)) == {"error"} and "Traceback" not in json.loads(text)["error"]
    code, text = _status(server, "/v2/models/no_such_model")
    assert code == 404 and "error" in json.loads(text)
    # the server keeps serving
    client = _http(server)
    tensor = httpclient.InferInput("input", [1, 1, 32, 32], "FP32")
    tensor.set_data_from_numpy(X[:1])
    assert client.infer("digits", [tensor]).as_numpy("logits").shape == (1, 10)
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no_such_model")
    assert "no_such_model" in info.value.message()


def test_the_token_guards_http_but_health(own_repository):
    server = InProcessServer(own_repository, env={"CONVSERVE_AUTH_TOKEN": "s3cret"}, wait=False)
    try:
        client = _http(server)
        import time

        deadline = time.monotonic() + 60
        while True:
            try:
                if client.is_server_ready():
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.3)
        with pytest.raises(InferenceServerException):
            client.get_model_metadata("digits")
        assert client.get_model_metadata("digits", headers={"Authorization": "Bearer s3cret"})["name"] == "digits"
    finally:
        assert server.stop() == 0, server.output()


def test_shared_memory_logging_and_trace_over_http(server):
    import tritonclient.utils.shared_memory as shm

    client = _http(server)
    names = ["logits"]
    expected = _grpc_answer(server, names)["logits"]
    handle = shm.create_shared_memory_region("http_region", "/convserve_http_test", X.nbytes + 4096)
    try:
        shm.set_shared_memory_region(handle, [X])
        client.register_system_shared_memory("http_region", "/convserve_http_test", X.nbytes + 4096)
        assert [r["name"] for r in client.get_system_shared_memory_status()] == ["http_region"]
        tensor = httpclient.InferInput("input", list(X.shape), "FP32")
        tensor.set_shared_memory("http_region", X.nbytes)
        output = httpclient.InferRequestedOutput("logits")
        output.set_shared_memory("http_region", expected.nbytes, offset=X.nbytes)
        result = client.infer("digits", [tensor], outputs=[output])
        assert result.get_output("logits")["shape"] == list(expected.shape)
        got = shm.get_contents_as_numpy(handle, np.float32, expected.shape, offset=X.nbytes)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        client.unregister_system_shared_memory("http_region")
        assert client.get_system_shared_memory_status() == []
        assert client.get_cuda_shared_memory_status() == []
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)
    settings = client.get_log_settings()
    assert settings["log_info"] is True and "log_verbose_level" in settings
    assert client.update_log_settings({"log_verbose_level": 0})["log_verbose_level"] == 0
    assert client.get_trace_settings()["trace_level"] == ["OFF"]
    with pytest.raises(InferenceServerException) as info:
        client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
    assert "not implemented" in info.value.message()


def test_a_full_queue_is_429_over_http(own_repository):
    """Bursts of 64 requests over 32 connections at a queue of one: the ones past it are 429, the
    rest OK, and serving goes on. A burst may happen to drain as fast as it comes on an idle machine:
    up to five bursts, and one of them must overflow."""
    import asyncio

    import aiohttp

    server = InProcessServer(own_repository, "--max-queue-size", "1", "--max-batch-size", "1")
    url = f"http://127.0.0.1:{server.http_port}/v2/models/digits/infer"
    body = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": X[0].ravel().tolist()}]}
    )

    async def burst() -> list[int]:
        connector = aiohttp.TCPConnector(limit=32)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> int:
                async with session.post(url, data=body) as answer:
                    await answer.read()
                    return answer.status

            return await asyncio.gather(*(one() for _ in range(64)))

    try:
        seen: set[int] = set()
        for _ in range(5):
            statuses = set(asyncio.run(burst()))
            assert statuses <= {200, 429}, statuses
            seen |= statuses
            if 429 in seen:
                break
        assert seen == {200, 429}, seen
        client = _http(server)
        tensor = httpclient.InferInput("input", [1, 1, 32, 32], "FP32")
        tensor.set_data_from_numpy(X[:1], binary_data=True)
        assert client.infer("digits", [tensor]).as_numpy("logits").shape == (1, 10)  # and it goes on
    finally:
        assert server.stop() == 0, server.output()
