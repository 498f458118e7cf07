"""The Python client of convserve: numpy and grpcio only (no torch, no tritonclient).

`Client(url)` (and `AsyncClient` for asyncio) classifies images (`classify`: top-k labels with
probabilities, the feature maps asked for as arrays, the request's metrics), sends raw tensors
(`infer`, any V2 gRPC server), lists the repository (`models`), describes a model layer by layer
(`describe`) and fetches the kernels behind a feature map (`filters`). Shared memory: `infer`
with `input_shm`/`output_shm` (see SystemSharedMemory in the README).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Optional

import grpc
import numpy as np

from convserve.contract import DEFAULT_OUTPUTS, IMAGE_INPUT_NAME, INPUT_NAME
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc
from convserve.proto import introspection_pb2 as ipb
from convserve.proto import introspection_pb2_grpc as ipb_grpc
from convserve.wire import SHM_BYTE_SIZE, SHM_OFFSET, SHM_REGION, ShmRef, output_array, serialize_bytes


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
    classified: Sequence[str] = DEFAULT_OUTPUTS,
) -> pb.ModelInferRequest:
    """A ModelInferRequest: `array` float32 (N, C, H, W) as `input`, or `images` as `image` (raw contents),
    or `input_shm` = (region window, shape) for an FP32 `input` already in shared memory.

    Outputs named in `output_shm` are written by the server into those regions instead of the response;
    `classification` (top-k) applies to the outputs named in `classified`.
    """
    if sum(x is not None for x in (array, images, input_shm)) != 1:
        raise ValueError("give exactly one of array, images or input_shm")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    if array is not None:
        array = np.ascontiguousarray(array, dtype="<f4")
        request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    elif images is not None:
        request.inputs.add(name=IMAGE_INPUT_NAME, datatype="BYTES", shape=[len(images)])
        request.raw_input_contents.append(serialize_bytes(images))
    elif input_shm is not None:
        ref, shape = input_shm
        _shm_parameters(request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=list(shape)).parameters, ref)
    fp16 = set(fp16)
    for name in outputs:
        out = request.outputs.add(name=name)
        if classification and name in classified:
            out.parameters["classification"].int64_param = classification
        if name in fp16:
            out.parameters["datatype"].string_param = "FP16"
        if name in output_shm:
            _shm_parameters(out.parameters, output_shm[name])
    return request


def _shm_parameters(parameters, ref: ShmRef) -> None:
    parameters[SHM_REGION].string_param = ref.region
    parameters[SHM_BYTE_SIZE].int64_param = ref.byte_size
    if ref.offset:
        parameters[SHM_OFFSET].int64_param = ref.offset


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


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC options of a client channel: the same message limit both ways."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def open_channel(
    url: str, token: str = "", max_message_bytes: int = 256 * 1024 * 1024, tls: Optional[Tls] = None
) -> grpc.Channel:
    """A channel to `url` (TLS when `tls` is given), sending the bearer token when one is given."""
    options = channel_options(max_message_bytes)
    if tls is not None:
        channel = grpc.secure_channel(url, tls.credentials(), options=options)
    else:
        channel = grpc.insecure_channel(url, options=options)
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel


@dataclass(frozen=True)
class Prediction:
    label: str  # the model's label, or the index as text for a model without labels
    index: int
    probability: float


@dataclass
class Classification:
    """What `classify` returns per image."""

    top_k: list[Prediction]
    feature_maps: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (C, H, W) float32
    metrics: dict = field(default_factory=dict)  # the request's (shared by the images sent together)

    @property
    def label(self) -> str:
        return self.top_k[0].label


@dataclass(frozen=True)
class ModelStatus:
    name: str
    version: str
    state: str
    reason: str


def _image_bytes(images: Sequence) -> list[bytes]:
    """Encoded images as given, or read from their paths."""
    out = []
    for image in images:
        if isinstance(image, (bytes, bytearray, memoryview)):
            out.append(bytes(image))
        else:
            with open(os.fspath(image), "rb") as handle:
                out.append(handle.read())
    return out


def classify_request(
    model: str,
    images: list[bytes],
    top_k: int,
    feature_maps: Sequence[str],
    fp16: bool,
    version: str,
    classified: str = "probabilities",
) -> pb.ModelInferRequest:
    """`classified`: the output to classify (DescribeModel's classified_output; an imported model's
    scores may have a name of their own)."""
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    half = list(feature_maps) if fp16 else []
    return build_request(
        model,
        images=images,
        outputs=[classified, *feature_maps],
        classification=top_k,
        classified=(classified,),
        fp16=half,
        version=version,
    )


def parse_classifications(
    response: pb.ModelInferResponse, feature_maps: Sequence[str], classified: str = "probabilities"
) -> list[Classification]:
    """One Classification per image of a `classify_request`'s response."""
    metrics = Client.parameters(response)
    rows = output_array(response, classified)
    maps = {name: output_array(response, name).astype(np.float32) for name in feature_maps}
    results = []
    for i, row in enumerate(rows):
        top = []
        for item in row:
            score, index, *label = item.decode().split(":", 2)
            top.append(Prediction(label[0] if label and label[0] else index, int(index), float(score)))
        results.append(Classification(top, {name: fmap[i] for name, fmap in maps.items()}, metrics))
    return results


def model_statuses(index: pb.RepositoryIndexResponse) -> list[ModelStatus]:
    return [ModelStatus(m.name, m.version, m.state, m.reason) for m in index.models]


def filters_array(answer: ipb.LayerFiltersResponse) -> np.ndarray:
    return np.frombuffer(answer.weights, dtype="<f4").reshape(tuple(answer.shape))


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
        self._descriptions: dict[tuple[str, str], ipb.DescribeModelResponse] = {}

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
        """Raw tensors (`array=`), encoded images (`images=`) or shared memory (`input_shm=`), as
        build_request takes them; the V2 response (`Client.outputs(response)` for its arrays)."""
        return self.stub.ModelInfer(build_request(model, **kwargs), timeout=timeout)

    def classify(
        self,
        images: Sequence,
        model: str = "digits",
        *,
        top_k: int = 5,
        feature_maps: Sequence[str] | str = (),
        fp16: bool = False,
        version: str = "",
        timeout: Optional[float] = 60.0,
    ) -> list[Classification]:
        """Encoded images (bytes or file paths) -> per image the top-k labels with probabilities, the
        feature maps asked for (names, or "all") as (C, H, W) arrays, and the request's metrics. The
        images go in one request: at most the model's max batch size."""
        described = self._described(model, version)
        names = list(described.feature_maps) if feature_maps == "all" else list(feature_maps)
        classified = described.classified_output or "probabilities"
        request = classify_request(model, _image_bytes(images), top_k, names, fp16, version, classified)
        return parse_classifications(self.stub.ModelInfer(request, timeout=timeout), names, classified)

    def _described(self, model: str, version: str) -> ipb.DescribeModelResponse:
        """DescribeModel's answer, asked once per model and version (the output names a model keeps)."""
        key = (model, version)
        if key not in self._descriptions:
            self._descriptions[key] = self.describe(model, version)
        return self._descriptions[key]

    def models(self, timeout: Optional[float] = 10.0) -> list[ModelStatus]:
        """Every model version the repository holds, with its state and, if it failed, why."""
        return model_statuses(self.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=timeout))

    def describe(self, model: str, version: str = "", timeout: Optional[float] = 10.0) -> ipb.DescribeModelResponse:
        """A served model layer by layer (the arithmetic table), its labels, feature maps and provenance."""
        request = ipb.DescribeModelRequest(name=model, version=version)
        return ipb_grpc.IntrospectionStub(self.channel).DescribeModel(request, timeout=timeout)

    def filters(
        self, model: str, feature_map: str, version: str = "", timeout: Optional[float] = 30.0
    ) -> tuple[str, np.ndarray]:
        """(conv layer name, its kernels (out, in, kh, kw)) behind one feature map."""
        request = ipb.LayerFiltersRequest(name=model, version=version, feature_map=feature_map)
        answer = ipb_grpc.IntrospectionStub(self.channel).LayerFilters(request, timeout=timeout)
        return answer.layer, filters_array(answer)

    @staticmethod
    def outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
        return {tensor.name: output_array(response, tensor.name) for tensor in response.outputs}

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


class AsyncClient:
    """`Client` for asyncio: the same methods, awaited."""

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        *,
        token: str = "",
        tls: Optional[Tls] = None,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        options = channel_options(max_message_bytes)
        if tls is not None:
            self.channel = grpc.aio.secure_channel(url, tls.credentials(), options=options)
        else:
            self.channel = grpc.aio.insecure_channel(url, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self._descriptions: dict[tuple[str, str], ipb.DescribeModelResponse] = {}
        self._introspection = ipb_grpc.IntrospectionStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def ready(self) -> bool:
        return (await self.stub.ServerReady(pb.ServerReadyRequest(), metadata=self._metadata)).ready

    async def infer(self, model: str, *, timeout: Optional[float] = None, **kwargs) -> pb.ModelInferResponse:
        return await self.stub.ModelInfer(build_request(model, **kwargs), timeout=timeout, metadata=self._metadata)

    async def classify(
        self,
        images: Sequence,
        model: str = "digits",
        *,
        top_k: int = 5,
        feature_maps: Sequence[str] | str = (),
        fp16: bool = False,
        version: str = "",
        timeout: Optional[float] = 60.0,
    ) -> list[Classification]:
        key = (model, version)
        if key not in self._descriptions:
            self._descriptions[key] = await self.describe(model, version)
        described = self._descriptions[key]
        names = list(described.feature_maps) if feature_maps == "all" else list(feature_maps)
        classified = described.classified_output or "probabilities"
        request = classify_request(model, _image_bytes(images), top_k, names, fp16, version, classified)
        response = await self.stub.ModelInfer(request, timeout=timeout, metadata=self._metadata)
        return parse_classifications(response, names, classified)

    async def models(self, timeout: Optional[float] = 10.0) -> list[ModelStatus]:
        index = await self.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=timeout, metadata=self._metadata)
        return model_statuses(index)

    async def describe(
        self, model: str, version: str = "", timeout: Optional[float] = 10.0
    ) -> ipb.DescribeModelResponse:
        request = ipb.DescribeModelRequest(name=model, version=version)
        return await self._introspection.DescribeModel(request, timeout=timeout, metadata=self._metadata)

    async def filters(
        self, model: str, feature_map: str, version: str = "", timeout: Optional[float] = 30.0
    ) -> tuple[str, np.ndarray]:
        request = ipb.LayerFiltersRequest(name=model, version=version, feature_map=feature_map)
        answer = await self._introspection.LayerFilters(request, timeout=timeout, metadata=self._metadata)
        return answer.layer, filters_array(answer)
