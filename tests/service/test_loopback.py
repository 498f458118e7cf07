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
    status, body, _ = _http(served, "/v2/models/digits/versions/0123/ready")  # digits, not a version
    assert status == 400 and "invalid model version" in json.loads(body)["error"]
    assert _http(served, "/v2/models/digits/versions/first/ready")[0] == 404  # no such route, as in Triton
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


def _post(served, path, body=b"", headers=None):
    return _http(served, path, body if isinstance(body, bytes) else json.dumps(body).encode(), headers)


def test_the_http_door_answers_as_tritonserver_2_51_does(served):
    """Issue 27's differential run, case by case: what tritonserver 2.51 answered for the same request
    (scripts/triton_side_by_side.py prints both). Triton's 500s for a client's mistake stay 400 here,
    as README's deviations list."""
    infer = "/v2/models/digits/infer"
    good = {"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [0.0] * 1024}

    def outputs(answer):
        status, body, _ = answer
        assert status == 200, body[:300]
        return [(o["name"], o["datatype"], "parameters" in o) for o in json.loads(body)["outputs"]]

    # trace settings: only trace_level is a list
    trace = json.loads(_http(served, "/v2/trace/setting")[1])
    assert trace["trace_level"] == ["OFF"] and trace["trace_rate"] == "1000" and trace["log_frequency"] == "0"
    # zero and default fields are there
    stats = json.loads(_http(served, "/v2/models/digits/stats")[1])["model_stats"][0]
    assert stats["memory_usage"] == [] and stats["response_stats"] == {}
    assert stats["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0} == stats["inference_stats"]["cache_miss"]
    config = json.loads(_http(served, "/v2/models/digits/config")[1])
    for key in ("runtime", "batch_input", "batch_output", "optimization", "model_warmup", "metric_tags"):
        assert key in config, key
    assert config["input"][0]["is_shape_tensor"] is False and config["input"][0]["allow_ragged_batch"] is False
    assert config["output"][0]["label_filename"] == "" and config["output"][0]["is_non_linear_format_io"] is False
    assert config["optimization"]["input_pinned_memory"] == {"enable": True}
    # requests Triton refuses
    refused = [
        {"inputs": [{**good, "data": [str(v) for v in good["data"]]}]},  # FP32 as JSON strings
        {"inputs": [{**good, "data": [True] * 1024}]},
        {"id": 7, "inputs": [good]},  # a numeric id
    ]
    for body in refused:
        status, answer, _ = _post(served, infer, body)
        assert status == 400 and json.loads(answer)["error"], body.get("id", body["inputs"][0]["data"][:1])
    header = json.dumps({"inputs": [{**good, "data": None, "parameters": {"binary_data_size": 4096}}]}).encode()
    header = header.replace(b'"data": null, ', b"")
    status, answer, _ = _post(
        served, infer, header + bytes(4096) + b"tail", {"Inference-Header-Content-Length": str(len(header))}
    )
    assert status == 400 and "unexpected additional input data" in json.loads(answer)["error"]
    # binary_data_output applies only where no output is named; the first request of an output is kept;
    # classification 0 is the plain tensor; outputs come in the model's order
    named = {"inputs": [good], "outputs": [{"name": "logits"}], "parameters": {"binary_data_output": True}}
    assert outputs(_post(served, infer, named)) == [("logits", "FP32", False)]
    twice = [{"name": "probabilities"}, {"name": "probabilities", "parameters": {"classification": 1}}]
    assert outputs(_post(served, infer, {"inputs": [good], "outputs": twice})) == [("probabilities", "FP32", False)]
    twice.reverse()
    assert outputs(_post(served, infer, {"inputs": [good], "outputs": twice})) == [("probabilities", "BYTES", False)]
    zero = [{"name": "probabilities", "parameters": {"classification": 0}}]
    assert outputs(_post(served, infer, {"inputs": [good], "outputs": zero})) == [("probabilities", "FP32", False)]
    order = [{"name": "conv1"}, {"name": "probabilities"}, {"name": "logits"}]
    got = [name for name, _, _ in outputs(_post(served, infer, {"inputs": [good], "outputs": order}))]
    assert got == ["logits", "probabilities", "conv1"]
    # not ready, unknown, no route
    status, body, headers = _http(served, "/v2/models/nope/ready")
    assert (status, json.loads(body)) == (400, {"error": "Model version not ready"})
    assert headers["Content-Type"].startswith("text/plain")  # as Triton labels it
    assert _post(served, "/v2/models/nope/infer", {})[0] == 404  # looked up before the body is read
    assert _post(served, "/v2/models/digits/versions/abc/infer", {"inputs": [good]})[0] == 404
    for answer in (_http(served, "/v2/no/such/route"), _http(served, "/v2/health/live", b"x")):
        assert answer[0] in (404, 405) and answer[2]["Content-Type"].startswith("text/plain")
    assert _post(served, infer, b"xx", {"Content-Encoding": "br"})[0] == 501
    # shared memory: offset a number, a name registered once (400 the second time, as Triton's HTTP)
    block = b"\0" * 4096
    key = f"/convserve_probe_{os.getpid()}"
    fd = os.open(f"/dev/shm{key}", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, block)
        region = "/v2/systemsharedmemory/region/probe"
        assert _post(served, region + "/register", {"key": key, "offset": "0", "byte_size": 4096})[0] == 400
        assert _post(served, region + "/register", {"key": key, "offset": 0, "byte_size": 4096})[0] == 200
        assert _post(served, region + "/register", {"key": key, "offset": 0, "byte_size": 4096})[0] == 400
        assert json.loads(_http(served, region + "/status")[1])[0]["offset"] == 0
        assert _post(served, "/v2/systemsharedmemory/unregister")[0] == 200
    finally:
        os.close(fd)
        os.unlink(f"/dev/shm{key}")
    cuda = {"raw_handle": {"b64": "AAAA"}, "device_id": 0, "byte_size": 64}
    assert _post(served, "/v2/cudasharedmemory/region/c/register", cuda)[0] == 501  # the route is there
    # unload of an unknown model: 200, empty; an unknown log key is ignored; extensions as served
    assert _post(served, "/v2/repository/models/no_such_model/unload")[:2] == (200, b"")
    status, body, _ = _post(served, "/v2/logging", {"no_such_key": True})
    assert status == 200 and "no_such_key" not in json.loads(body)
    extensions = set(json.loads(_http(served, "/v2")[1])["extensions"])
    assert {"parameters", "trace", "statistics", "system_shared_memory"} <= extensions
    assert "cuda_shared_memory" not in extensions and "sequence" not in extensions


def test_large_json_bodies_are_parsed_in_a_worker_process_with_the_same_answers(served):
    """Issue 27: JSON's parser holds the GIL, so a body over 1 MB is parsed by a worker process of
    the front-end; the answers (and the refusals) are those of a small body."""
    infer = "/v2/models/digits/infer"
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": X[0].ravel().tolist()}
    request = {"inputs": [tensor], "outputs": [{"name": "logits"}]}
    small = _post(served, infer, request)
    large = _post(served, infer, {**request, "pad": [0.5] * 300_000})  # about 1.5 MB, a key V2 ignores
    assert small[0] == large[0] == 200
    assert json.loads(small[1])["outputs"] == json.loads(large[1])["outputs"]
    workers = [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit() and b"jsonparse" in open(f"/proc/{pid}/cmdline", "rb").read()
    ]
    assert workers, "no JSON worker process"
    strings = {"inputs": [{**tensor, "data": [str(v) for v in tensor["data"]]}], "pad": [0.5] * 300_000}
    status, body, _ = _post(served, infer, strings)
    assert status == 400 and "FP32 numbers" in json.loads(body)["error"]
    status, body, _ = _post(served, infer, b'{"inputs": [' + b"1," * 600_000)
    assert status == 400 and "does not parse" in json.loads(body)["error"]


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
        # each was refused (past the cap) or timed out; how many of each depends on how fast they came
        assert limits.refused + limits.timed_out >= 1000 and limits.timed_out >= 100, (limits.refused, limits.timed_out)
        # a body promised and not sent
        with socket.create_connection(("127.0.0.1", http_port)) as sock:
            sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
            sock.settimeout(5)
            assert sock.recv(1024).startswith(b"HTTP/1.1 408"), "no 408"
        assert _http(served, "/v2/health/ready")[0] == 200
