"""Side by side: the same requests to a real tritonserver (PyTriton's, running the digits ONNX model
with onnxruntime in its Python backend) and to convserve, printing what each answers.

Run in a venv of its own (PyTriton brings tritonserver; do not mix it into .venv):
    python3 -m venv /tmp/pyt && /tmp/pyt/bin/pip install nvidia-pytriton 'tritonclient[grpc]' onnxruntime numpy
    /tmp/pyt/bin/python scripts/triton_side_by_side.py MODEL_REPOSITORY CONVSERVE_URL [CONVSERVE_HTTP_URL]
(its Python backend's stub links the system's libpython; when the venv's Python is another build of
the same version, e.g. pyenv's, point LD_LIBRARY_PATH at that Python's lib/ folder, or the model
fails to load with "'_thread.RLock' object has no attribute '_recursion_count'")
with `convserve serve --repository MODEL_REPOSITORY` listening at CONVSERVE_URL (gRPC, host:port) and,
for the HTTP door's cases, CONVSERVE_HTTP_URL (http://host:port). Only the protocol
front end is compared (codes, messages, order, statistics); the backends differ by design.
"""

from __future__ import annotations

import glob
import json
import os
import queue
import re
import sys

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as triton
from pytriton.decorators import batch
from pytriton.exceptions import PyTritonUnrecoverableError
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig


def start_triton(repository: str) -> tuple[Triton, str]:
    path = sorted(glob.glob(os.path.join(repository, "digits", "*", "model.onnx")))[-1]
    with open(os.path.join(os.path.dirname(path), "model.json")) as handle:
        shape = json.load(handle)["inputs"][0]["shape"][1:]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    @batch
    def infer(input=None, image=None):
        if input is None:
            raise PyTritonUnrecoverableError("this stand-in takes the tensor input only")
        logits, probabilities = session.run(["logits", "probabilities"], {"input": input.astype(np.float32)})
        return {"logits": logits, "probabilities": probabilities}

    server = Triton(
        config=TritonConfig(grpc_port=8601, http_port=8600, metrics_port=8602),
        security_config=TritonSecurityConfig(restricted_endpoints=[]),  # plain Triton: nothing behind a token
    )
    server.bind(
        model_name="digits",
        infer_func=infer,
        # as convserve declares them: the tensor or an encoded image, each optional
        inputs=[
            Tensor(name="input", dtype=np.float32, shape=tuple(shape), optional=True),
            Tensor(name="image", dtype=np.bytes_, shape=(1,), optional=True),
        ],
        outputs=[
            Tensor(name="logits", dtype=np.float32, shape=(-1,)),
            Tensor(name="probabilities", dtype=np.float32, shape=(-1,)),
        ],
        config=ModelConfig(max_batch_size=32, batcher=DynamicBatcher(max_queue_delay_microseconds=2000)),
    )
    server.run()
    return server, "127.0.0.1:8601"


def good(shape=(1, 1, 32, 32)):
    tensor = triton.InferInput("input", list(shape), "FP32")
    tensor.set_data_from_numpy(np.zeros(shape, np.float32))
    return tensor


def bad():
    return good((1, 3, 32, 32))


def error_text(call) -> str:
    try:
        call()
        return "OK"
    except triton.InferenceServerException as exc:
        return f"{exc.status()}: {exc.message()}"[:160]


class _Report(dict):
    """The answers so far, each printed (to stderr) as it comes: a probe that hangs shows where."""

    def __setitem__(self, key, value):
        print(f"  {key}: {value}", file=sys.stderr, flush=True)
        super().__setitem__(key, value)


def probes(url: str) -> dict[str, str]:
    client = triton.InferenceServerClient(url)
    out: dict[str, str] = _Report()
    # 1. stream order with errors
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    wrong = {4, 11, 12, 23}
    for i in range(24):
        client.async_stream_infer("digits", [bad() if i in wrong else good()], request_id=str(i))
    got = [answers.get(timeout=60) for _ in range(24)]
    client.stop_stream()
    order = [("E" if e is not None else r.get_response().id) for r, e in got]
    out["stream order (24 requests, bad at 4 11 12 23)"] = " ".join(order)
    first_error = next(e for _, e in got if e is not None)
    out["stream error message"] = str(first_error.message())[:120]
    # 2. timeout parameter of 10 us
    out["timeout=10 us parameter"] = error_text(lambda: client.infer("digits", [good()], timeout=10))
    # 3. statistics over 48 concurrent requests
    before = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:  # 16 clients at once, each its own connection
        list(pool.map(lambda _: triton.InferenceServerClient(url).infer("digits", [good()]), range(16)))
    after = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]

    def delta(stage):
        return int(after["inference_stats"][stage].get("count", 0)) - int(
            before["inference_stats"][stage].get("count", 0)
        )

    out["16 concurrent requests: success / compute_infer counts"] = f"{delta('success')} / {delta('compute_infer')}"
    out["batch_stats fields"] = ",".join(sorted(k for k in after.get("batch_stats", [{}])[0] if k != "batch_size"))
    # 4. a failed request: where it is counted
    before = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]
    error_text(lambda: client.infer("digits", [bad()]))
    after = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]
    out["bad shape: fail count delta"] = str(delta("fail"))
    # 5. classification of a model without labels
    result = client.infer("digits", [good()], outputs=[triton.InferRequestedOutput("probabilities", class_count=2)])
    out["classification string"] = result.as_numpy("probabilities")[0][0].decode()
    # 6. the same output twice
    twice = [triton.InferRequestedOutput("probabilities"), triton.InferRequestedOutput("probabilities", class_count=1)]
    out["same output twice"] = error_text(lambda: client.infer("digits", [good()], outputs=twice))
    # 7. unload of an unknown model, load with a config override
    out["unload unknown model"] = error_text(lambda: client.unload_model("no_such_model"))
    out["load with config override"] = error_text(lambda: client.load_model("digits", config='{"max_batch_size": 4}'))
    # 8. metadata: extensions, inputs
    out["extensions"] = ",".join(sorted(client.get_server_metadata(as_json=True)["extensions"]))
    meta = client.get_model_metadata("digits", as_json=True)
    out["metadata inputs"] = ";".join(f"{i['name']}{i['shape']}" for i in meta["inputs"])
    config = client.get_model_config("digits", as_json=True)["config"]
    out["config version_policy"] = json.dumps(config.get("version_policy"))
    # 9. log settings keys
    out["log settings keys"] = ",".join(sorted(client.get_log_settings(as_json=True)["settings"]))
    out["trace_level"] = str(client.get_trace_settings(as_json=True)["settings"].get("trace_level"))
    # 10. health for Triton's service name
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(url) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=5
            )
            out["health inference.GRPCInferenceService"] = health_pb2.HealthCheckResponse.ServingStatus.Name(
                status.status
            )
        except grpc.RpcError as exc:
            out["health inference.GRPCInferenceService"] = exc.code().name
    second_pass(url, client, out)
    return out


def _code(call) -> str:
    """The gRPC status code a raw call answers, or OK."""
    import grpc

    try:
        call()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def second_pass(url: str, client, out: dict) -> None:
    """Issue 17's ground: names, versions, parameters, shared memory and health, by status code."""
    from multiprocessing import shared_memory

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(url, options=[("grpc.max_send_message_length", 8 << 20)])
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    x = np.zeros((1, 1, 32, 32), np.float32)

    def request(version="", name="digits", **parameters):
        r = pb.ModelInferRequest(model_name=name, model_version=version)
        r.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        r.raw_input_contents.append(x.tobytes())
        for key, value in parameters.items():
            setattr(r.parameters[key], value[0], value[1])
        return r

    out["infer version 0"] = _code(lambda: stub.ModelInfer(request("0"), timeout=10))
    out["infer empty name"] = _code(lambda: stub.ModelInfer(request(name=""), timeout=10))
    out["infer empty request"] = _code(lambda: stub.ModelInfer(pb.ModelInferRequest(), timeout=10))
    out["metadata version 0"] = _code(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="digits", version="0")))
    out["config empty name"] = _code(lambda: stub.ModelConfig(pb.ModelConfigRequest(name="")))
    ready = stub.ModelReady(pb.ModelReadyRequest(name="no_such_model"), timeout=10).ready
    out["ModelReady unknown"] = f"OK ready={ready}"
    out["statistics unknown model"] = _code(lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name="nope")))
    out["statistics unknown version"] = _code(
        lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits", version="9"))
    )
    out["trace setting unknown model"] = _code(lambda: stub.TraceSetting(pb.TraceSettingRequest(model_name="nope")))
    out["index with repository_name"] = _code(
        lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="elsewhere"))
    )
    zero = request()
    zero.outputs.add(name="probabilities").parameters["classification"].int64_param = 0
    out["classification 0"] = _code(lambda: stub.ModelInfer(zero, timeout=10))
    out["priority as a string"] = _code(lambda: stub.ModelInfer(request(priority=("string_param", "high"))))
    both = request()
    both.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
    both.raw_input_contents.append(len(b"png").to_bytes(4, "little") + b"png")
    out["both inputs (tensor used)"] = _code(lambda: stub.ModelInfer(both, timeout=10))
    # shared memory
    block = shared_memory.SharedMemory(create=True, size=1 << 16)
    try:

        def register(name, offset=0, size=1 << 16):
            register_request = pb.SystemSharedMemoryRegisterRequest(
                name=name, key=block.name, offset=offset, byte_size=size
            )
            return _code(lambda: stub.SystemSharedMemoryRegister(register_request, timeout=10))

        out["shm register offset 100"] = register("odd", offset=100, size=4096)
        out["shm region name 'a b/c'"] = register("a b/c")
        via_unknown = request()
        via_unknown.outputs.add(name="logits").parameters["shared_memory_region"].string_param = "never_registered"
        via_unknown.outputs[0].parameters["shared_memory_byte_size"].int64_param = 40
        out["output into an unknown region"] = _code(lambda: stub.ModelInfer(via_unknown, timeout=10))
        classified = request()
        classified.outputs.add(name="probabilities")
        for key, kind, value in (
            ("shared_memory_region", "string_param", "a b/c"),
            ("shared_memory_byte_size", "int64_param", 4096),
            ("classification", "int64_param", 1),
        ):
            setattr(classified.outputs[0].parameters[key], kind, value)
        out["classification into a region"] = _code(lambda: stub.ModelInfer(classified, timeout=10))
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=10)
    finally:
        block.close()
        block.unlink()
    cuda = stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(), timeout=10)
    out["CUDA shm status"] = f"OK regions={len(cuda.regions)}"
    out["CUDA shm unregister all"] = _code(
        lambda: stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest(), timeout=10)
    )
    health = health_pb2_grpc.HealthStub(channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service="anything.at.all"), timeout=10)
    out["health 'anything.at.all'"] = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    out["health 4 MB service name"] = _code(
        lambda: health.Check(health_pb2.HealthCheckRequest(service="x" * (4 << 20)), timeout=10)
    )
    channel.close()


def _http(base: str, method: str, path: str, body=None, headers=None):
    """(status, content type, parsed JSON or raw text) of one raw HTTP call."""
    import http.client
    import json as _json
    from urllib.parse import urlsplit

    host = urlsplit(base)
    connection = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
    if isinstance(body, (dict, list)):
        body = _json.dumps(body).encode()
    connection.request(method, path, body=body, headers=headers or {})
    answer = connection.getresponse()
    data = answer.read()
    connection.close()
    kind = (answer.getheader("Content-Type") or "").split(";")[0]
    length = answer.getheader("Inference-Header-Content-Length")
    if length is not None:  # JSON, then the binary outputs
        data = data[: int(length)]
    try:
        parsed = _json.loads(data) if data else ""
    except ValueError:
        parsed = data[:60]
    return answer.status, kind, parsed, answer


def _keys(value) -> str:
    return ",".join(sorted(value)) if isinstance(value, dict) else repr(value)[:80]


def http_probes(base: str) -> dict[str, str]:
    """The HTTP door's answers to issue 27's cases (status, and what the body holds)."""
    import json as _json
    from multiprocessing import shared_memory

    out: dict[str, str] = _Report()
    x = [0.0] * (32 * 32)
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": x}

    def infer(body, path="/v2/models/digits/infer", headers=None):
        return _http(base, "POST", path, body, headers)

    def status(answer):
        code, kind, body, _ = answer
        error = body.get("error", "") if isinstance(body, dict) else body
        return f"{code} {kind or '-'} {str(error)[:70]!r}" if code != 200 else f"200 {kind}"

    out["GET trace settings"] = _json.dumps(_http(base, "GET", "/v2/trace/setting")[2], sort_keys=True)[:300]
    stats = _http(base, "GET", "/v2/models/digits/stats")[2]["model_stats"][0]
    out["stats keys"] = _keys(stats)
    out["stats inference_stats keys"] = _keys(stats["inference_stats"])
    out["stats fail (never failed)"] = _json.dumps(stats["inference_stats"]["fail"])
    config = _http(base, "GET", "/v2/models/digits/config")[2]
    out["config keys"] = _keys(config)
    out["config input keys"] = _keys(config["input"][0])
    out["config output keys"] = _keys(config["output"][0])
    out["config instance_group keys"] = _keys(config["instance_group"][0])
    out["config dynamic_batching"] = _json.dumps(config.get("dynamic_batching"), sort_keys=True)[:400]
    out["config optimization"] = _json.dumps(config.get("optimization"), sort_keys=True)[:300]
    out["FP32 data as JSON strings"] = status(infer({"inputs": [{**tensor, "data": [str(v) for v in x]}]}))
    header = _json.dumps({"inputs": [{**tensor, "data": None, "parameters": {"binary_data_size": 4096}}]}).encode()
    header = header.replace(b'"data": null, ', b"")
    extra = infer(header + bytes(4096) + b"tail", headers={"Inference-Header-Content-Length": str(len(header))})
    out["extra binary bytes after the inputs"] = status(extra)
    out["numeric id"] = status(infer({"id": 7, "inputs": [tensor]}))
    named = infer({"inputs": [tensor], "outputs": [{"name": "logits"}], "parameters": {"binary_data_output": True}})
    out["binary_data_output with outputs named"] = (
        f"{named[0]} "
        + ",".join(sorted(o["name"] + ("(binary)" if "parameters" in o else "(json)") for o in named[2]["outputs"]))
        if named[0] == 200
        else status(named)
    )
    twice = infer(
        {
            "inputs": [tensor],
            "outputs": [{"name": "probabilities"}, {"name": "probabilities", "parameters": {"classification": 1}}],
        }
    )
    out["same output twice (plain, then classification)"] = (
        ";".join(f"{o['name']}:{o['datatype']}" for o in twice[2]["outputs"]) if twice[0] == 200 else status(twice)
    )
    zero = infer({"inputs": [tensor], "outputs": [{"name": "probabilities", "parameters": {"classification": 0}}]})
    out["classification 0"] = (
        ";".join(f"{o['name']}:{o['datatype']}" for o in zero[2]["outputs"]) if zero[0] == 200 else status(zero)
    )
    order = infer({"inputs": [tensor], "outputs": [{"name": "probabilities"}, {"name": "logits"}]})
    out["output order (asked: probabilities, logits)"] = ",".join(o["name"] for o in order[2]["outputs"])
    out["ready of an unknown model"] = status(_http(base, "GET", "/v2/models/nope/ready"))
    out["ready of version 9"] = status(_http(base, "GET", "/v2/models/digits/versions/9/ready"))
    out["infer unknown model, body {}"] = status(infer({}, "/v2/models/nope/infer"))
    out["infer version abc"] = status(infer({"inputs": [tensor]}, "/v2/models/digits/versions/abc/infer"))
    out["Content-Encoding br"] = status(infer(b"xx", headers={"Content-Encoding": "br"}))
    out["CUDA shm register"] = status(
        _http(
            base,
            "POST",
            "/v2/cudasharedmemory/region/c/register",
            {"raw_handle": {"b64": "AAAA"}, "device_id": 0, "byte_size": 64},
        )
    )
    out["unload unknown model"] = status(_http(base, "POST", "/v2/repository/models/no_such_model/unload"))
    out["unload unknown model body"] = repr(_http(base, "POST", "/v2/repository/models/no_such_model/unload")[2])[:60]
    out["POST /v2/logging unknown key"] = status(_http(base, "POST", "/v2/logging", {"no_such_key": True}))
    out["/v2 extensions"] = ",".join(sorted(_http(base, "GET", "/v2")[2]["extensions"]))
    out["unknown route"] = status(_http(base, "GET", "/v2/nothing/here"))
    out["wrong method"] = status(_http(base, "DELETE", "/v2/health/live"))
    out["health live content type"] = _http(base, "GET", "/v2/health/live")[1] or "-"
    block = shared_memory.SharedMemory(create=True, size=1 << 16)
    try:
        region = "/v2/systemsharedmemory/region/probe"
        out["shm register offset as string"] = status(
            _http(base, "POST", region + "/register", {"key": block.name, "offset": "0", "byte_size": 4096})
        )
        _http(base, "POST", "/v2/systemsharedmemory/unregister")
        first = _http(base, "POST", region + "/register", {"key": block.name, "offset": 0, "byte_size": 4096})
        out["shm register twice"] = (
            status(_http(base, "POST", region + "/register", {"key": block.name, "offset": 0, "byte_size": 4096}))
            + f" (first {first[0]})"
        )
        status_entry = _http(base, "GET", region + "/status")[2]
        out["shm status, offset 0"] = _json.dumps([{**e, "key": "KEY"} for e in status_entry], sort_keys=True)[:200]
        _http(base, "POST", "/v2/systemsharedmemory/unregister")
    finally:
        block.close()
        block.unlink()
    # mistakes a client makes: Triton answers some of them 500
    mistakes = {
        "malformed JSON": b"{not json",
        "no inputs": {"outputs": []},
        "inputs not a list": {"inputs": {}},
        "short data": {"inputs": [{**tensor, "data": x[:-1]}]},
        "long data": {"inputs": [{**tensor, "data": [*x, 0.0]}]},
        "ragged data": {"inputs": [{**tensor, "data": [x[:10], x[10:]]}]},
        "no datatype": {"inputs": [{k: v for k, v in tensor.items() if k != "datatype"}]},
        "no shape": {"inputs": [{k: v for k, v in tensor.items() if k != "shape"}]},
        "wrong datatype": {"inputs": [{**tensor, "datatype": "INT8"}]},
        "unknown input": {"inputs": [{**tensor, "name": "nope"}]},
        "unknown output": {"inputs": [tensor], "outputs": [{"name": "nope"}]},
        "data null": {"inputs": [{**tensor, "data": None}]},
        "shape strings": {"inputs": [{**tensor, "shape": ["1", "1", "32", "32"]}]},
        "binary size past the body": {"inputs": [{**tensor, "parameters": {"binary_data_size": 99999}}]},
    }
    for name, body in mistakes.items():
        out[f"mistake: {name}"] = status(infer(body))
    return out


def main() -> None:
    repository, convserve_url = sys.argv[1], sys.argv[2]
    convserve_http = sys.argv[3] if len(sys.argv) > 3 else ""
    server, triton_url = start_triton(repository)
    try:
        theirs = probes(triton_url)
        if convserve_http:
            theirs.update(http_probes("http://127.0.0.1:8600"))
    finally:
        server.stop()
    ours = probes(convserve_url)
    if convserve_http:
        ours.update(http_probes(convserve_http))
    print("| request | Triton | convserve |\n|---|---|---|")
    for key in theirs:
        same = "" if _same(theirs[key], ours.get(key)) else " **differs**"
        print(f"| {key}{same} | {theirs[key]} | {ours.get(key)} |")


def _same(theirs: str, ours) -> bool:
    """Equal answers; for an HTTP status line, the same status and Content-Type (messages differ)."""
    if isinstance(ours, str) and re.match(r"\d{3} ", theirs) and re.match(r"\d{3} ", ours):
        return theirs.split(" ")[:2] == ours.split(" ")[:2]
    return theirs == ours


if __name__ == "__main__":
    main()
