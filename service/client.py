"""A small client for convserve (any V2 gRPC server works): infer with arrays or encoded images."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Optional

import grpc
import numpy as np

from .postprocess import serialize_bytes
from .proto import grpc_service_pb2 as pb
from .proto import grpc_service_pb2_grpc as pb_grpc
from .protocol import ShmRef, output_array


def build_request(
    model: str,
    *,
    array: Optional[np.ndarray] = None,
    images: Optional[list[bytes]] = None,
    input_shm: Optional[tuple[ShmRef, Sequence[int]]] = None,
    outputs: Iterable[str] = (),
    classification: int = 0,
    fp16: Iterable[str] = (),
    output_shm: Mapping[str, ShmRef] = MappingProxyType({}),
    version: str = "",
    request_id: str = "",
) -> pb.ModelInferRequest:
    """A ModelInferRequest: `array` float32 (N, C, H, W) as `input`, or `images` as `image` (raw contents),
    or `input_shm` = (region window, shape) for an FP32 `input` already in shared memory.

    Outputs named in `output_shm` are written by the server into those regions instead of the response.
    """
    if sum(x is not None for x in (array, images, input_shm)) != 1:
        raise ValueError("give exactly one of array, images or input_shm")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    if array is not None:
        array = np.ascontiguousarray(array, dtype="<f4")
        request.inputs.add(name="input", datatype="FP32", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    elif images is not None:
        request.inputs.add(name="image", datatype="BYTES", shape=[len(images)])
        request.raw_input_contents.append(serialize_bytes(images))
    elif input_shm is not None:
        ref, shape = input_shm
        _shm_parameters(request.inputs.add(name="input", datatype="FP32", shape=list(shape)).parameters, ref)
    fp16 = set(fp16)
    for name in outputs:
        out = request.outputs.add(name=name)
        if classification and name in ("logits", "probabilities"):
            out.parameters["classification"].int64_param = classification
        if name in fp16:
            out.parameters["datatype"].string_param = "FP16"
        if name in output_shm:
            _shm_parameters(out.parameters, output_shm[name])
    return request


def _shm_parameters(parameters, ref: ShmRef) -> None:
    parameters["shared_memory_region"].string_param = ref.region
    parameters["shared_memory_byte_size"].int64_param = ref.byte_size
    if ref.offset:
        parameters["shared_memory_offset"].int64_param = ref.offset


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call on a channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        # grpc hands interceptors a namedtuple of the call's details
        return details._replace(metadata=[*(details.metadata or []), self._header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


@dataclass(frozen=True)
class Tls:
    """TLS for a client: the CA that signed the server's certificate (None: the system's), and for
    mutual TLS this client's own certificate and key. PEM file paths."""

    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Optional[str]) -> Optional[bytes]:
            if not path:
                return None
            with open(path, "rb") as handle:
                return handle.read()

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def open_channel(
    url: str, token: str = "", max_message_bytes: int = 256 * 1024 * 1024, tls: Optional[Tls] = None
) -> grpc.Channel:
    """A channel to `url` (TLS when `tls` is given), sending the bearer token when one is given."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if tls is not None:
        channel = grpc.secure_channel(url, tls.credentials(), options=options)
    else:
        channel = grpc.insecure_channel(url, options=options)
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel


class Client:
    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        *,
        token: str = "",
        tls: Optional[Tls] = None,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.channel = open_channel(url, token, max_message_bytes, tls)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def live(self) -> bool:
        return self.stub.ServerLive(pb.ServerLiveRequest()).live

    def ready(self) -> bool:
        return self.stub.ServerReady(pb.ServerReadyRequest()).ready

    def infer(self, model: str, *, timeout: Optional[float] = None, **kwargs) -> pb.ModelInferResponse:
        return self.stub.ModelInfer(build_request(model, **kwargs), timeout=timeout)

    @staticmethod
    def output(response: pb.ModelInferResponse, name: str) -> np.ndarray:
        return output_array(response, name)

    @staticmethod
    def parameters(response: pb.ModelInferResponse) -> dict:
        return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in response.parameters.items()}


def wait_until_ready(
    url: str, process: Optional[subprocess.Popen] = None, timeout: float = 120.0, tls: Optional[Tls] = None
) -> None:
    """Poll ServerReady until it answers true; raises RuntimeError if `process` exits or time runs out."""
    deadline = time.monotonic() + timeout
    with open_channel(url, tls=tls) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"server at {url} not ready within {timeout:.0f} s")
