"""Side by side: the same requests to a real tritonserver (PyTriton's, running the digits ONNX model
with onnxruntime in its Python backend) and to convserve, printing what each answers.

Run in a venv of its own (PyTriton brings tritonserver; do not mix it into .venv):
    python3 -m venv /tmp/pyt && /tmp/pyt/bin/pip install nvidia-pytriton 'tritonclient[grpc]' onnxruntime numpy
    /tmp/pyt/bin/python scripts/triton_side_by_side.py MODEL_REPOSITORY CONVSERVE_URL
with `convserve serve --repository MODEL_REPOSITORY` listening at CONVSERVE_URL. Only the protocol
front end is compared (codes, messages, order, statistics); the backends differ by design.
"""

from __future__ import annotations

import glob
import json
import os
import queue
import sys

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as triton
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig


def start_triton(repository: str) -> tuple[Triton, str]:
    path = sorted(glob.glob(os.path.join(repository, "digits", "*", "model.onnx")))[-1]
    with open(os.path.join(os.path.dirname(path), "model.json")) as handle:
        shape = json.load(handle)["inputs"][0]["shape"][1:]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    @batch
    def infer(input):
        logits, probabilities = session.run(["logits", "probabilities"], {"input": input.astype(np.float32)})
        return {"logits": logits, "probabilities": probabilities}

    server = Triton(
        config=TritonConfig(grpc_port=8601, http_port=8600, metrics_port=8602),
        security_config=TritonSecurityConfig(restricted_endpoints=[]),  # plain Triton: nothing behind a token
    )
    server.bind(
        model_name="digits",
        infer_func=infer,
        inputs=[Tensor(name="input", dtype=np.float32, shape=tuple(shape))],
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
    return out


def main() -> None:
    repository, convserve_url = sys.argv[1], sys.argv[2]
    server, triton_url = start_triton(repository)
    try:
        theirs = probes(triton_url)
    finally:
        server.stop()
    ours = probes(convserve_url)
    print("| request | Triton | convserve |\n|---|---|---|")
    for key in theirs:
        same = "" if theirs[key] == ours.get(key) else " **differs**"
        print(f"| {key}{same} | {theirs[key]} | {ours.get(key)} |")


if __name__ == "__main__":
    main()
