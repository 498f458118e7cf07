"""The core both doors call, in this process (service/loopback.py: the engine and a front-end on
threads, linked as under `convserve serve`): each door's answer is the core's data in its own wire
format, a call through either door is recorded the same, and errors map to each door's table."""

import contextlib
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from convserve.client import Client, build_request
from convserve.ports import free_ports
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import model_config_pb2 as mc
from convserve.service.errors import InvalidInput, ShuttingDown
from convserve.service.frontend.core import ServerState
from convserve.service.loopback import Loopback
from convserve.service.settings import Settings
from convserve.wire import output_array

X = np.random.default_rng(11).standard_normal((3, 1, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    _, folder = trained
    repository = tmp_path_factory.mktemp("loopback") / "repository"
    shutil.copytree(os.path.dirname(os.path.dirname(folder)), repository)
    grpc_port, http_port = free_ports(2)
    settings = Settings(repository=str(repository), host="127.0.0.1", http_port=http_port, grace_period=5.0)
    with Loopback(settings, grpc_port) as loopback:
        loopback.http = f"http://127.0.0.1:{http_port}"
        yield loopback


def _http(served, path, body=None, headers=None):
    request = urllib.request.Request(served.http + path, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_both_doors_answer_the_same_inference_bit_for_bit(served):
    outputs = ["logits", "probabilities", "conv1"]
    with Client(served.url) as client:
        answer = client.infer("digits", array=X, outputs=outputs)
    by_grpc = {name: output_array(answer, name) for name in outputs}
    header = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(X.shape), "parameters": {}}],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs],
    }
    header["inputs"][0]["parameters"]["binary_data_size"] = X.nbytes
    text = json.dumps(header).encode()
    status, body, headers = _http(
        served, "/v2/models/digits/infer", text + X.tobytes(), {"Inference-Header-Content-Length": str(len(text))}
    )
    assert status == 200, body[:300]
    length = int(headers["Inference-Header-Content-Length"])
    meta, offset = json.loads(body[:length]), length
    for tensor in meta["outputs"]:
        size = tensor["parameters"]["binary_data_size"]
        got = np.frombuffer(body[offset : offset + size], "<f4").reshape(tensor["shape"])
        offset += size
        assert np.array_equal(got, by_grpc[tensor["name"]]), tensor["name"]
    # JSON numbers: the same values
    header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(X.shape), "data": X.ravel().tolist()}]}
    status, body, _ = _http(served, "/v2/models/digits/infer", json.dumps(header).encode())
    logits = next(o for o in json.loads(body)["outputs"] if o["name"] == "logits")
    assert np.array_equal(np.asarray(logits["data"], np.float32).reshape(3, 10), by_grpc["logits"])


def test_each_doors_metadata_config_and_statistics_are_the_cores_data(served):
    core = served.core
    with Client(served.url) as client:
        stub = client.stub
        grpc_metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
        grpc_config = stub.ModelConfig(pb.ModelConfigRequest(name="digits")).config
        grpc_statistics = stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits"))
    status, body, _ = _http(served, "/v2/models/digits")
    assert status == 200 and json.loads(body) == core.model_metadata("digits")
    # the HTTP door's JSON, read as gRPC's message, is the gRPC door's answer
    assert json_format.ParseDict(json.loads(body), pb.ModelMetadataResponse()) == grpc_metadata
    status, body, _ = _http(served, "/v2/models/digits/config")
    config = json.loads(body)
    assert config == core.model_config("digits") and config["max_batch_size"] == 32
    assert json_format.ParseDict(config, mc.ModelConfig()) == grpc_config
    status, body, _ = _http(served, "/v2/models/digits/stats")
    http_statistics = json_format.ParseDict(json.loads(body), pb.ModelStatisticsResponse())
    assert http_statistics == grpc_statistics  # no inference between the two: the same counts


def test_a_call_through_either_door_is_recorded_once_under_its_v2_name(served):
    from prometheus_client import generate_latest

    def count(method):
        text = generate_latest(served.frontend.metrics.registry).decode()
        found = re.search(rf'^convserve_requests_total{{[^}}]*method="{method}"[^}}]*}} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    before = count("ModelMetadata")
    with Client(served.url) as client:
        client.stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
    _http(served, "/v2/models/digits")
    assert count("ModelMetadata") == before + 2


def test_errors_map_to_each_doors_table(served):
    with pytest.raises(InvalidInput):
        served.core.model_ready("digits", "first")
    with Client(served.url) as client, pytest.raises(grpc.RpcError) as failed:
        client.stub.ModelReady(pb.ModelReadyRequest(name="digits", version="first"))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status, body, _ = _http(served, "/v2/models/digits/versions/first/ready")
    assert status == 400 and "invalid model version" in json.loads(body)["error"]
    wrong = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}
    status, body, _ = _http(served, "/v2/models/digits/infer", json.dumps(wrong).encode())
    assert status == 400 and json.loads(body)["error"].startswith("input 'input' must be [N, 1, 32, 32]")
    status, body, _ = _http(served, "/v2/models/nothing_here/infer", json.dumps(wrong).encode())
    assert status == 404
    assert served.core.model_ready("nothing_here") is False


def test_a_stopping_core_refuses_inference_at_both_doors_and_still_answers_health(served):
    frontend = served.frontend
    frontend.state = ServerState.STOPPING
    try:
        with pytest.raises(ShuttingDown), served.core.inference("ModelInfer", "digits"):
            pass
        with Client(served.url) as client:
            with pytest.raises(grpc.RpcError) as failed:
                client.stub.ModelInfer(build_request("digits", array=X[:1]))
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert client.stub.ServerLive(pb.ServerLiveRequest()).live
        header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [0.0] * 1024}]}
        status, body, _ = _http(served, "/v2/models/digits/infer", json.dumps(header).encode())
        assert status == 503 and "shutting down" in json.loads(body)["error"]
        assert _http(served, "/v2/health/ready")[0] == 400 and _http(served, "/v2/health/live")[0] == 200
    finally:
        frontend.state = ServerState.READY


def test_the_core_answers_directly_without_a_door(served):
    core = served.core
    assert core.live() and core.ready()
    index = served.call(core.repository_index(ready=True))
    assert [(m["name"], m["state"]) for m in index] == [("digits", "READY")]
    assert core.server_metadata()["name"] == "convserve"
    filters = served.call(core.layer_filters("digits", "", "conv1"))
    out, inputs, kh, kw = filters["shape"]
    assert len(filters["weights"]) == out * inputs * kh * kw * 4
    settings = core.log_settings({})
    assert settings["log_format"] == "default"
    with pytest.raises(InvalidInput, match="wrong type"):
        core.log_settings({"log_info": 1})


def test_malformed_http_bodies_are_400s_with_a_message(served):
    """What a hostile probe found answered 500 (issue 27): each is the client's mistake."""
    deep = b"[" * 100_000 + b"]" * 100_000
    infer = "/v2/models/digits/infer"
    good = {"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [0.0] * 1024}
    cases = [
        (infer, deep, {}),
        (infer, json.dumps({"inputs": [{**good, "data": "DEEP"}]}).encode().replace(b'"DEEP"', deep), {}),
        ("/v2/repository/index", deep, {}),
        (infer, json.dumps({"inputs": [good]}).encode(), {"Inference-Header-Content-Length": "²"}),
        (
            infer,
            json.dumps(
                {"inputs": [good], "outputs": [{"name": "logits", "parameters": {"classification": 2**64}}]}
            ).encode(),
            {},
        ),
        (infer, json.dumps({"inputs": [good], "parameters": {"priority": 2**63}}).encode(), {}),
    ]
    for path, body, headers in cases:
        status, answer, _ = _http(served, path, body, headers)
        assert status == 400, (path, headers, status, answer[:200])
        assert json.loads(answer)["error"], answer[:200]
    assert served.core.ready()  # and serving goes on


def test_every_arena_block_comes_back_whatever_happens_to_its_request(served):
    """Issue 27's fault 1: requests cut short by their deadline at any moment (before the engine,
    in its queue, or after it answered but before the answer was read) leave no block behind."""
    import asyncio

    from convserve.client import AsyncClient

    arena = served.frontend.arena
    request_outputs = ["logits", "conv1", "conv2", "conv3", "conv4", "conv5"]

    async def hammer():
        async with AsyncClient(served.url) as client:

            async def one(deadline):
                try:
                    await client.infer("digits", array=X[:1], outputs=request_outputs, timeout=deadline)
                except grpc.RpcError as exc:
                    assert exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), exc

            for turn in range(100):  # eight at a time, deadlines of 1 to 30 ms: around the latency
                await asyncio.gather(*(one(0.001 * (1 + (i + turn) % 30)) for i in range(8)))

    asyncio.run(hammer())

    async def used():
        return arena.used_bytes

    deadline = time.monotonic() + 10
    while served.call(used()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert served.call(used()) == 0
    with Client(served.url) as client:  # and the arena serves the next request
        assert client.infer("digits", array=X, outputs=request_outputs).outputs


def test_idle_and_slow_http_connections_are_closed_and_bounded(trained, tmp_path):
    """Issue 27's fault 6: 1,000 connections that send nothing or half a head are closed within the
    head timeout (or at once, past the cap), and counted; then the door serves again. A body that
    does not arrive in time is 408. (Up to the cap, such connections do hold their places: the
    timeout bounds for how long.)"""
    import selectors
    import socket

    _, folder = trained
    repository = tmp_path / "repository"
    shutil.copytree(os.path.dirname(os.path.dirname(folder)), repository)
    grpc_port, http_port = free_ports(2)
    settings = Settings(
        repository=str(repository),
        host="127.0.0.1",
        http_port=http_port,
        http_max_connections=200,
        http_head_timeout=1.0,
        http_body_timeout=1.0,
    )
    with Loopback(settings, grpc_port) as served:
        served.http = f"http://127.0.0.1:{http_port}"
        held = []
        for i in range(1000):
            sock = socket.create_connection(("127.0.0.1", http_port))
            if i % 2:
                with contextlib.suppress(OSError):  # past the cap it is closed at once
                    sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHo")  # a head that never ends
            held.append(sock)
        started = time.monotonic()
        watching = selectors.DefaultSelector()  # epoll: select() stops at descriptor 1024
        for sock in held:
            watching.register(sock, selectors.EVENT_READ)
        still_open = len(held)
        while still_open and time.monotonic() - started < 5:
            for key, _ in watching.select(0.5):
                try:
                    closed = key.fileobj.recv(1024) == b""
                except ConnectionResetError:
                    closed = True
                if closed:
                    watching.unregister(key.fileobj)
                    still_open -= 1
        watching.close()
        assert not still_open, f"{still_open} of 1000 still open after {time.monotonic() - started:.1f} s"
        for sock in held:
            sock.close()
        assert _http(served, "/v2/health/live")[0] == 200  # and the door serves again
        limits = served.frontend.http_limits
        assert limits.refused >= 700 and limits.timed_out >= 100, (limits.refused, limits.timed_out)
        # a body promised and not sent
        with socket.create_connection(("127.0.0.1", http_port)) as sock:
            sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
            sock.settimeout(5)
            assert sock.recv(1024).startswith(b"HTTP/1.1 408"), "no 408"
        assert _http(served, "/v2/health/ready")[0] == 200
