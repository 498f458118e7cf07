"""Thousands of random ModelInferRequests get only defined status codes and leave the server
answering correctly; a bounded soak answers every request without growing."""

import asyncio
import os
import time

import grpc
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convserve.client import Client, build_request
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc

from .conftest import RunningServer

X = np.zeros((1, 1, 32, 32), np.float32)
# What a client may be told; never INTERNAL or UNKNOWN (a bug), never a hang
DEFINED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

names = st.sampled_from(["input", "image", "logits", "probabilities", "conv1", ""]) | st.text(max_size=12)
datatypes = st.sampled_from(["FP32", "BYTES", "FP16", "INT64", "UINT8", ""]) | st.text(max_size=6)
shapes = st.lists(st.integers(-3, 40) | st.sampled_from([2**31, 2**62, 10_000_000]), max_size=5)
values = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=12))


@st.composite
def infer_requests(draw):
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["digits", "", "nope", "../digits"]) | st.text(max_size=10)),
        model_version=draw(st.sampled_from(["", "1", "2", "²", "-1"]) | st.text(max_size=4)),
        id=draw(st.text(max_size=8)),
    )
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(name=draw(names), datatype=draw(datatypes), shape=draw(shapes))
        for key in draw(
            st.lists(st.sampled_from(["shared_memory_region", "shared_memory_byte_size", "x"]), max_size=2)
        ):
            _set(tensor.parameters[key], draw(values))
        if draw(st.booleans()):
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=8)))
    for _ in range(draw(st.integers(0, 2))):
        request.raw_input_contents.append(draw(st.binary(max_size=5000) | st.just(X.tobytes())))
    for _ in range(draw(st.integers(0, 3))):
        out = request.outputs.add(name=draw(names))
        for key in draw(st.lists(st.sampled_from(["classification", "datatype", "shared_memory_region"]), max_size=2)):
            _set(out.parameters[key], draw(values))
    for key in draw(st.lists(st.sampled_from(["timeout", "priority", "sequence_id"]), max_size=2)):
        _set(request.parameters[key], draw(values))
    return request


def _set(parameter, value):
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    else:
        parameter.string_param = value


def test_random_requests_get_defined_answers_and_the_server_stays_correct(server):
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        seen: dict[str, int] = {}

        @settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
        @given(infer_requests())
        def fuzz(request):
            try:
                stub.ModelInfer(request, timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                assert code in DEFINED, (code, exc.details(), request)
                assert len(exc.details()) < 1000 and "Error" not in exc.details().split(":")[0]
            seen[code.name] = seen.get(code.name, 0) + 1

        fuzz()
        assert sum(seen.values()) >= 2000 and "INVALID_ARGUMENT" in seen
    with Client(server.url) as client:
        expected = client.infer("digits", array=X)
        assert client.output(expected, "probabilities").shape == (1, 10)


def _rss_kib(pid: int) -> int:
    """RSS of the server's whole process tree: supervisor, engine, front-ends."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        with open(f"/proc/{current}/status") as handle:
            total += next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
        for task in os.listdir(f"/proc/{current}/task"):
            with open(f"/proc/{current}/task/{task}/children") as handle:
                pending += [int(child) for child in handle.read().split()]
    return total


def test_soak_32_clients_every_request_answered_and_memory_flat(own_repository):
    server = RunningServer(own_repository)
    try:
        request = build_request("digits", array=X, outputs=["probabilities", "conv1"])
        results = {"ok": 0, "failed": []}

        async def load(seconds):
            async with grpc.aio.insecure_channel(server.url) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                stop_at = time.monotonic() + seconds

                async def client():
                    while time.monotonic() < stop_at:
                        try:
                            await stub.ModelInfer(request, timeout=30)
                            results["ok"] += 1
                        except grpc.RpcError as exc:
                            results["failed"].append(exc.code())

                await asyncio.gather(*(client() for _ in range(32)))

        asyncio.run(load(15))  # warm-up: allocator pools, caches, gRPC buffers
        warm = _rss_kib(server.process.pid)
        asyncio.run(load(60))
        end = _rss_kib(server.process.pid)
        print(f"soak: {results['ok']} requests answered; RSS after warm-up {warm} KiB, at the end {end} KiB")
        assert not results["failed"] and results["ok"] > 1000, (results["ok"], results["failed"][:5])
        assert end <= 1.1 * warm, (warm, end)
    finally:
        assert server.stop() == 0, server.output()
