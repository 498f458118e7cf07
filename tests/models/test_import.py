"""`convserve import` (issue 26, first part): a user's own ONNX classifier keeps its names, gains its
feature maps, and serves through tritonclient as onnxruntime runs the original file. The test models
are built here with seeded random weights and exported by torch.onnx.export: a small ResNet (residual
adds, batch norm folded by the exporter, global pooling; input `pixels`, output `scores`) and a small
net that ends in Softmax with its batch fixed to 1 (input `data`, output `prob`)."""

import io
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from PIL import Image
from torch import nn

from convserve.client import Client
from convserve.contract import CARD_FILE
from convserve.models.export import ExportError
from convserve.models.importer import import_onnx
from convserve.ports import free_ports
from convserve.proto import introspection_pb2 as ipb
from convserve.proto import introspection_pb2_grpc as ipb_grpc
from convserve.service.loopback import Loopback
from convserve.service.settings import Settings


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.down(x))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.Sequential(_Block(8, 8, 1), _Block(8, 16, 2))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class SoftmaxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5)
        self.fc = nn.Linear(4 * 12 * 12, 3)

    def forward(self, x):
        y = nn.functional.max_pool2d(torch.sigmoid(self.conv(x)), 2)
        return torch.softmax(self.fc(torch.flatten(y, 1)), dim=1)


def _export(model: nn.Module, path, shape, input_name: str, output_name: str, dynamic: bool) -> nn.Module:
    torch.manual_seed(0)
    model = model.eval()
    for module in model.modules():  # batch norm with statistics of its own, not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic else None
    torch.onnx.export(
        model,
        (torch.randn(1, *shape),),
        str(path),
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes=axes,
        dynamo=False,
    )
    return model


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    model = _export(TinyResNet(), folder / "resnet.onnx", (3, 32, 32), "pixels", "scores", dynamic=True)
    labels = folder / "labels.txt"
    labels.write_text("\n".join(["cat", "dog", "fox", "owl", "elk"]) + "\n")
    return model, folder / "resnet.onnx", labels


def _card(folder) -> dict:
    with open(os.path.join(folder, CARD_FILE)) as handle:
        return json.load(handle)


def test_an_imported_resnet_keeps_its_names_and_gains_feature_maps_and_probabilities(resnet, tmp_path):
    model, path, labels = resnet
    folder = import_onnx(str(path), repository=str(tmp_path), name="resnet", labels_file=str(labels))
    card = _card(folder)
    assert card["inputs"][0]["name"] == "pixels" and card["image_input"] is True
    assert card["default_outputs"] == ["scores", "probabilities"] and card["labels"][0] == "cat"
    maps = card["feature_maps"]
    assert [m["name"] for m in maps] == [f"conv{i}" for i in range(1, 7)]  # six convs, the 1x1 shortcut too
    assert maps[0]["tensor"].endswith("Relu_output_0")  # after the activation that follows the conv
    assert maps[3]["shape"] == [-1, 16, 16, 16] and all("conv" in m for m in maps)
    export = card["export"]
    assert export["imported"] and export["scores"] == "scores" and not export["softmax_in_graph"]
    assert export["parity"]["optimized_max_abs_diff"] < 1e-6
    # the arithmetic is the file's: the exporter folded each batch norm into its conv (a bias of C
    # for the 2C of gamma and beta), so it counts torch's parameters less one C per batch norm
    norms = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert card["arithmetic"]["total_params"] == sum(p.numel() for p in model.parameters()) - norms


def test_an_imported_model_serves_as_onnxruntime_runs_the_original_file(resnet, tmp_path):
    _, path, labels = resnet
    import_onnx(str(path), repository=str(tmp_path), name="resnet", labels_file=str(labels))
    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    (expected,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["scores"], {"pixels": x})
    grpc_port, http_port = free_ports(2)
    settings = Settings(repository=str(tmp_path), host="127.0.0.1", http_port=http_port)
    with Loopback(settings, grpc_port) as served:
        client = triton.InferenceServerClient(served.url)
        tensor = triton.InferInput("pixels", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        wanted = [triton.InferRequestedOutput("scores"), triton.InferRequestedOutput("conv4")]
        answer = client.infer("resnet", [tensor], outputs=wanted)
        np.testing.assert_allclose(answer.as_numpy("scores"), expected, rtol=0, atol=1e-5)
        assert answer.as_numpy("conv4").shape == (4, 16, 16, 16)
        classified = client.infer("resnet", [tensor], outputs=[triton.InferRequestedOutput("scores", class_count=1)])
        top = classified.as_numpy("scores")[0][0].decode().split(":")
        assert top[2] == ["cat", "dog", "fox", "owl", "elk"][int(expected[0].argmax())]
        plain = client.infer("resnet", [tensor])  # no outputs named: the model's default outputs
        assert sorted(o["name"] for o in plain.get_response(as_json=True)["outputs"]) == ["probabilities", "scores"]
        metadata = client.get_model_metadata("resnet", as_json=True)
        assert [i["name"] for i in metadata["inputs"]] == ["pixels", "image"]
        config = client.get_model_config("resnet", as_json=True)["config"]
        assert config["input"][0]["name"] == "pixels" and config["input"][0]["dims"] == ["3", "32", "32"]
        # over HTTP, with the model's own input name
        http = triton_http.InferenceServerClient(f"127.0.0.1:{http_port}")
        http_tensor = triton_http.InferInput("pixels", list(x.shape), "FP32")
        http_tensor.set_data_from_numpy(x, binary_data=True)
        by_http = http.infer("resnet", [http_tensor], outputs=[triton_http.InferRequestedOutput("scores")])
        np.testing.assert_allclose(by_http.as_numpy("scores"), expected, rtol=0, atol=1e-5)
        # convserve's own calls: the layers and a feature map's kernels
        introspection = ipb_grpc.IntrospectionStub(client._channel)
        described = introspection.DescribeModel(ipb.DescribeModelRequest(name="resnet"))
        assert list(described.feature_maps) == [f"conv{i}" for i in range(1, 7)] and described.total_params > 0
        filters = introspection.LayerFilters(ipb.LayerFiltersRequest(name="resnet", feature_map="conv1"))
        assert list(filters.shape) == [8, 3, 3, 3]
        # an encoded image, preprocessed as --preprocess imagenet says: the same answer as the tensor
        pixels = np.random.default_rng(9).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, format="PNG")
        image = triton.InferInput("image", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[png.getvalue()]], dtype=np.object_))
        by_image = client.infer("resnet", [image], outputs=[triton.InferRequestedOutput("scores")])
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        as_tensor = ((pixels / 255.0 - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
        (reference,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            ["scores"], {"pixels": as_tensor}
        )
        np.testing.assert_allclose(by_image.as_numpy("scores"), reference, rtol=0, atol=1e-4)
        # the old name is refused with the model's own
        wrong = triton.InferInput("input", list(x.shape), "FP32")
        wrong.set_data_from_numpy(x)
        with pytest.raises(triton.InferenceServerException, match="pixels"):
            client.infer("resnet", [wrong])


def test_a_softmax_ended_model_with_a_fixed_batch_is_imported_with_a_dynamic_batch(tmp_path):
    path = tmp_path / "softmax.onnx"
    _export(SoftmaxNet(), path, (1, 28, 28), "data", "prob", dynamic=False)
    folder = import_onnx(str(path), repository=str(tmp_path / "repo"), name="tiny", preprocess="none")
    card = _card(folder)
    assert card["default_outputs"] == ["prob"] and card["export"]["softmax_in_graph"]  # no second softmax
    assert card["image_input"] is False and card["export"]["batch"].startswith("fixed to 1")
    assert [m["name"] for m in card["feature_maps"]] == ["conv1"]
    x = np.random.default_rng(5).standard_normal((3, 1, 28, 28)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = np.concatenate([session.run(["prob"], {"data": x[i : i + 1]})[0] for i in range(3)])
    # the same file with its preprocessing given: it takes encoded images too, and convserve's own
    # client classifies with its `prob` output (DescribeModel's classified_output)
    import_onnx(str(path), repository=str(tmp_path / "repo"), name="tinyimg", preprocess="mean=0.5,std=0.25,color=L")
    pixels = np.random.default_rng(6).integers(0, 256, (28, 28), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    as_tensor = ((pixels / 255.0 - 0.5) / 0.25)[None, None].astype(np.float32)
    (reference,) = session.run(["prob"], {"data": as_tensor})
    grpc_port, http_port = free_ports(2)
    settings = Settings(repository=str(tmp_path / "repo"), host="127.0.0.1", http_port=http_port)
    with Loopback(settings, grpc_port) as served:
        client = triton.InferenceServerClient(served.url)
        tensor = triton.InferInput("data", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        answer = client.infer("tiny", [tensor])  # a batch of 3 through a file that took 1
        np.testing.assert_allclose(answer.as_numpy("prob"), expected, rtol=0, atol=1e-6)
        assert [i["name"] for i in client.get_model_metadata("tiny", as_json=True)["inputs"]] == ["data"]
        with Client(served.url) as ours:
            assert ours.describe("tinyimg").classified_output == "prob"
            (classified,) = ours.classify([png.getvalue()], "tinyimg", top_k=3, feature_maps="all")
            assert classified.top_k[0].index == int(reference[0].argmax())
            assert abs(classified.top_k[0].probability - float(reference[0].max())) < 1e-4
            assert classified.feature_maps["conv1"].shape == (4, 24, 24)


def test_what_cannot_be_imported_is_refused_with_the_reason(resnet, tmp_path):
    _, path, _ = resnet
    with pytest.raises(ExportError, match="--scores 'nope'"):
        import_onnx(str(path), repository=str(tmp_path), name="x", scores="nope")
    with pytest.raises(ExportError, match="labels"):
        bad = tmp_path / "labels.txt"
        bad.write_text("one\ntwo\n")
        import_onnx(str(path), repository=str(tmp_path), name="x", labels_file=str(bad))
    nhwc = tmp_path / "nhwc.onnx"

    class Nhwc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyResNet()

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2))

    _export(Nhwc(), nhwc, (32, 32, 3), "image_nhwc", "scores", dynamic=True)
    with pytest.raises(ExportError, match="NHWC"):
        import_onnx(str(nhwc), repository=str(tmp_path), name="x")
    with pytest.raises(ExportError, match="not an ONNX model"):
        import_onnx(str(tmp_path / "labels.txt"), repository=str(tmp_path), name="x")
    assert not os.path.exists(tmp_path / "x")  # nothing written
