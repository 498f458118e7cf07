"""System shared memory, driven by tritonclient's own shared-memory calls: the same answers as the
wire path, and every bad region, offset and size refused with INVALID_ARGUMENT while the server
keeps serving."""

import os
import uuid

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from convserve.client import build_request
from convserve.proto import grpc_service_pb2_grpc as pb_grpc
from convserve.wire import ShmRef

shm = pytest.importorskip("tritonclient.utils.shared_memory", reason="needs setuptools<81 (pkg_resources)")

X = np.random.default_rng(3).standard_normal((2, 1, 32, 32)).astype(np.float32)
CONV1 = (2, 32, 32, 32)


@pytest.fixture
def regions(server):
    """An input region holding X and an output region, registered; unregistered and destroyed after."""
    client = triton.InferenceServerClient(server.url)
    tag = uuid.uuid4().hex[:8]
    made = []

    def make(name, byte_size):
        key = f"/convserve_test_{tag}_{name}"
        handle = shm.create_shared_memory_region(f"{name}_{tag}", key, byte_size)
        made.append(handle)
        return f"{name}_{tag}", key, handle

    yield client, make
    client.unregister_system_shared_memory()
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def _code(call):
    with pytest.raises(triton.InferenceServerException) as info:
        call()
    return info.value.status().removeprefix("StatusCode.")  # tritonclient says "StatusCode.X"


def test_inputs_and_feature_maps_through_shared_memory_equal_the_wire(regions):
    client, make = regions
    in_name, in_key, in_handle = make("in", X.nbytes)
    out_size = 2 * 10 * 4 + int(np.prod(CONV1)) * 2
    out_name, out_key, out_handle = make("out", out_size)
    shm.set_shared_memory_region(in_handle, [X])
    client.register_system_shared_memory(in_name, in_key, X.nbytes)
    client.register_system_shared_memory(out_name, out_key, out_size)
    status = client.get_system_shared_memory_status(as_json=True)["regions"]
    assert status[in_name]["byte_size"] == str(X.nbytes) and status[out_name]["key"] == out_key

    inp = triton.InferInput("input", list(X.shape), "FP32")
    inp.set_shared_memory(in_name, X.nbytes)
    probabilities = triton.InferRequestedOutput("probabilities")
    probabilities.set_shared_memory(out_name, 2 * 10 * 4)
    conv1 = triton.InferRequestedOutput("conv1")
    conv1.set_shared_memory(out_name, int(np.prod(CONV1)) * 2, offset=2 * 10 * 4)
    conv1._output.parameters["datatype"].string_param = "FP16"  # our FP16 parameter, through shm too
    result = client.infer("digits", [inp], outputs=[probabilities, conv1])
    assert result.get_output("conv1").datatype == "FP16"
    got_p = shm.get_contents_as_numpy(out_handle, np.float32, [2, 10])
    got_c = shm.get_contents_as_numpy(out_handle, np.float16, list(CONV1), offset=2 * 10 * 4)

    wire_in = triton.InferInput("input", list(X.shape), "FP32")
    wire_in.set_data_from_numpy(X)
    wire = client.infer(
        "digits", [wire_in], outputs=[triton.InferRequestedOutput(n) for n in ("probabilities", "conv1")]
    )
    assert np.array_equal(got_p, wire.as_numpy("probabilities"))
    assert np.allclose(got_c, wire.as_numpy("conv1"), rtol=1e-3, atol=1e-3)
    assert list(result.get_response().raw_output_contents) == [b"", b""]  # nothing travelled in the response


def test_bad_regions_offsets_and_sizes_are_refused_and_the_server_keeps_serving(regions, server):
    client, make = regions
    name, key, handle = make("small", 4096)
    shm.set_shared_memory_region(handle, [X[:1]])
    invalid = grpc.StatusCode.INVALID_ARGUMENT.name
    # registration: a missing object, a path outside /dev/shm, a region past the object's end, a taken name
    assert _code(lambda: client.register_system_shared_memory("nope", "/convserve_no_such_object", 16)) == invalid
    assert _code(lambda: client.register_system_shared_memory("evil", "/../etc/passwd", 16)) == invalid
    assert _code(lambda: client.register_system_shared_memory("evil", "sub/dir", 16)) == invalid
    assert _code(lambda: client.register_system_shared_memory("big", key, 8192)) == invalid
    assert _code(lambda: client.register_system_shared_memory("late", key, 16, offset=4090)) == invalid
    client.register_system_shared_memory(name, key, 4096)
    assert _code(lambda: client.register_system_shared_memory(name, key, 4096)) == "ALREADY_EXISTS"

    def infer(input_region, size, offset=0, outputs=None):
        inp = triton.InferInput("input", [1, 1, 32, 32], "FP32")
        inp.set_shared_memory(input_region, size, offset=offset)
        return client.infer("digits", [inp], outputs=outputs)

    assert _code(lambda: infer("unregistered", 4096)) == "NOT_FOUND"  # as Triton
    assert _code(lambda: infer(name, 4096, offset=8)) == invalid  # past the region's end
    assert _code(lambda: infer(name, 2048)) == invalid  # not the tensor's size
    small_out = triton.InferRequestedOutput("conv1")
    small_out.set_shared_memory(name, 64)
    assert _code(lambda: infer(name, 4096, outputs=[small_out])) == invalid  # output window too small
    assert infer(name, 4096).as_numpy("logits").shape == (1, 10)  # and the server still serves
    client.unregister_system_shared_memory(name)
    assert _code(lambda: infer(name, 4096)) == "NOT_FOUND"
    assert _code(lambda: client.get_system_shared_memory_status(region_name=name)) == "NOT_FOUND"
    assert not os.path.exists("/dev/shm/convserve_no_such_object")


def test_cuda_shared_memory_status_and_unregister_answer_with_no_regions(server):
    """As Triton without CUDA regions (perf_analyzer calls both while it cleans up); registering one
    stays UNIMPLEMENTED until it is built and run on a GPU."""
    client = triton.InferenceServerClient(server.url)
    assert client.get_cuda_shared_memory_status(as_json=True) == {}
    client.unregister_cuda_shared_memory()
    client.unregister_cuda_shared_memory(name="never_registered")
    assert _code(lambda: client.get_cuda_shared_memory_status(region_name="nope")) == "NOT_FOUND"


def test_region_answers_as_triton_2_51_gives_them(regions, server):
    """Observed on tritonserver 2.51: an offset that is not a page is INVALID_ARGUMENT; names are free
    text; an unregistered region on an input or an output is NOT_FOUND before the model runs (the
    version's fail count does not move); classification into a region is INVALID_ARGUMENT."""
    client, make = regions
    _, key, handle = make("text", 8192)
    shm.set_shared_memory_region(handle, [X[:1]])
    assert _code(lambda: client.register_system_shared_memory("odd", key, 16, offset=8)) == "INVALID_ARGUMENT"
    name = f"my region/{uuid.uuid4().hex[:6]}"  # a space and a slash
    client.register_system_shared_memory(name, key, 8192)
    assert name in client.get_system_shared_memory_status(as_json=True)["regions"]

    def fails():
        stats = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]["inference_stats"]
        return int(stats.get("fail", {}).get("count", 0))

    before = fails()
    inp = triton.InferInput("input", [1, 1, 32, 32], "FP32")
    inp.set_shared_memory(name, 4096)
    assert client.infer("digits", [inp]).as_numpy("logits").shape == (1, 10)
    missing = triton.InferRequestedOutput("logits")
    missing.set_shared_memory("no such region", 40)
    assert _code(lambda: client.infer("digits", [inp], outputs=[missing])) == "NOT_FOUND"
    ghost = triton.InferInput("input", [1, 1, 32, 32], "FP32")
    ghost.set_shared_memory("no such region", 4096)
    assert _code(lambda: client.infer("digits", [ghost])) == "NOT_FOUND"
    assert fails() == before
    # tritonclient refuses it itself; a client that sends it anyway:
    request = build_request(
        "digits",
        input_shm=(ShmRef(name, 4096), (1, 1, 32, 32)),
        outputs=["logits"],
        classification=1,
        output_shm={"logits": ShmRef(name, 64, 4096)},
    )
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
