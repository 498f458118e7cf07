"""The ONNX path of the arithmetic gives the PyTorch path's numbers on exported zoo models."""

import warnings

import pytest
import torch

from convserve.models import arithmetic as ar
from convserve.models.arithmetic_torch import analyze_module
from convserve.models.zoo import get_model


def _export(model, shape, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (torch.zeros(1, *shape),),
            str(path),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            verbose=False,
        )


def _weighted(table):
    return [(r.kind, r.output_shape, r.params, r.macs) for r in table.layers if r.kind in ("conv", "fc")]


@pytest.mark.parametrize(
    "name,shape",
    [
        ("alexnet_small", (3, 32, 32)),
        ("alexnet_small", (1, 32, 32)),
        ("googlenet", (3, 224, 224)),
        ("alexnet", (3, 224, 224)),
    ],
)
def test_onnx_path_matches_pytorch_path(tmp_path, name, shape):
    model = get_model(name, in_channels=shape[0], num_classes=10)
    path = tmp_path / "model.onnx"
    _export(model, shape, path)
    nodes, onnx_shape = ar.from_onnx(str(path))
    assert onnx_shape == shape
    from_onnx = ar.analyze(nodes, onnx_shape)
    from_torch = analyze_module(model, shape)
    assert from_onnx.total_params == from_torch.total_params
    assert from_onnx.total_macs == from_torch.total_macs
    assert _weighted(from_onnx) == _weighted(from_torch)
    # receptive fields of the conv layers agree too
    assert [r.receptive_field for r in from_onnx.layers if r.kind == "conv"] == [
        r.receptive_field for r in from_torch.layers if r.kind == "conv"
    ]


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model")
    with pytest.raises(ar.NotOnnxError):
        ar.from_onnx(str(path))
