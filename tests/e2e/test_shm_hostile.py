"""Shared memory against hostile clients (issue 17's probe): a truncated object answers INVALID_ARGUMENT
instead of killing the engine with SIGBUS; registrations are capped; other users' objects are refused."""

import os
import re
import urllib.request
import uuid
from multiprocessing import shared_memory

import grpc
import numpy as np
import pytest

from convserve.client import build_request
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc
from convserve.wire import ShmRef

from .conftest import RunningServer

X = np.zeros((1, 1, 32, 32), np.float32)


def _code(call, request):
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    return info.value.code()


@pytest.fixture
def objects():
    made = []

    def make(size):
        block = shared_memory.SharedMemory(name=f"convserve_hostile_{uuid.uuid4().hex[:8]}", create=True, size=size)
        made.append(block)
        return block

    yield make
    for block in made:
        block.close()
        try:
            block.unlink()
        except FileNotFoundError:
            pass


def test_a_truncated_object_is_refused_and_the_engine_lives(served_repository, objects):
    server = RunningServer(served_repository, "--max-shm-regions", "2")
    try:
        with grpc.insecure_channel(server.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            block = objects(1 << 20)
            stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="r", key=block.name, byte_size=1 << 20)
            )
            into = {"logits": ShmRef("r", 40, 8192)}
            request = build_request(
                "digits", input_shm=(ShmRef("r", X.nbytes), X.shape), outputs=["logits"], output_shm=into
            )
            assert stub.ModelInfer(request, timeout=10).outputs
            os.truncate(f"/dev/shm/{block.name}", 0)
            assert _code(stub.ModelInfer, request) == grpc.StatusCode.INVALID_ARGUMENT
            output_only = build_request("digits", array=X, outputs=["logits"], output_shm=into)
            assert _code(stub.ModelInfer, output_only) == grpc.StatusCode.INVALID_ARGUMENT
            assert stub.ModelInfer(build_request("digits", array=X), timeout=10).outputs  # still serving
            # at most --max-shm-regions at once: RESOURCE_EXHAUSTED, counted by the limit
            other = objects(4096)
            stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="s", key=other.name, byte_size=16)
            )
            third = pb.SystemSharedMemoryRegisterRequest(name="t", key=other.name, byte_size=16)
            assert _code(stub.SystemSharedMemoryRegister, third) == grpc.StatusCode.RESOURCE_EXHAUSTED
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
            stub.SystemSharedMemoryRegister(third)  # room again
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        assert 'convserve_refusals_total{limit="shm_regions"} 1.0' in text
    finally:
        assert server.stop() == 0, server.output()
    assert len(re.findall(r"engine pid \d+ ready", server.output())) == 1, server.output()  # never restarted


@pytest.mark.skipif(os.geteuid() != 0, reason="handing an object to another user needs root")
def test_other_users_objects_are_refused_unless_widened(served_repository, objects):
    block = objects(4096)
    os.chown(f"/dev/shm/{block.name}", 65534, 65534)
    request = pb.SystemSharedMemoryRegisterRequest(name="theirs", key=block.name, byte_size=16)
    for flags, allowed in (((), False), (("--shm-any-owner", "1"), True)):
        server = RunningServer(served_repository, *flags)
        try:
            with grpc.insecure_channel(server.url) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                if allowed:
                    stub.SystemSharedMemoryRegister(request, timeout=10)
                else:
                    assert _code(stub.SystemSharedMemoryRegister, request) == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            assert server.stop() == 0, server.output()
