"""Versions in INT8 and FP16 (issue 28): exported from the trained digits model, gated on its held-out
accuracy against FP32, and served (through tritonclient, feature maps included) beside FP32."""

import json
import os
import shutil

import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton

from convserve.contract import CARD_FILE, MODEL_FILE, normalize
from convserve.models.checkpoint import Checkpoint
from convserve.models.data import load_dataset
from convserve.models.export import ExportError, export_checkpoint, export_model, export_random_init
from convserve.models.precision import PrecisionPlan
from convserve.ports import free_ports
from convserve.service.loopback import Loopback
from convserve.service.settings import Settings


def _card(folder: str) -> dict:
    with open(os.path.join(folder, CARD_FILE)) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def lowered(trained, tmp_path_factory):
    """A repository with the trained digits model as version 1 (FP32), 2 (INT8) and 3 (FP16)."""
    result, folder = trained
    repository = tmp_path_factory.mktemp("precision") / "repository"
    shutil.copytree(folder, repository / "digits" / "1")
    int8 = export_checkpoint(result.checkpoint, repository=str(repository), name="digits", precision="int8")
    fp16 = export_checkpoint(result.checkpoint, repository=str(repository), name="digits", precision="fp16")
    return result, repository, int8, fp16


def test_the_int8_export_of_the_trained_digits_is_within_the_accuracy_gate(lowered):
    _, _, int8, _ = lowered
    card = _card(int8)
    export = card["export"]
    assert export["precision"] == "int8" and export["quantization"]["calibration_source"] == "training split"
    accuracy = export["accuracy"]
    assert accuracy["held_out_images"] > 300 and accuracy["fp32"] > 90
    assert accuracy["drop_points"] == pytest.approx(accuracy["fp32"] - accuracy["int8"], abs=1e-2)
    assert accuracy["drop_points"] <= 1.0
    graph = onnx.load(os.path.join(int8, MODEL_FILE)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ: the convolutions run in INT8
    # the same outputs, all FP32: logits, probabilities and every feature map
    assert [o.name for o in graph.output] == [o["name"] for o in card["outputs"]]
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in graph.output)


def test_a_version_that_breaks_the_gate_is_refused_with_its_numbers_and_nothing_is_written(trained, tmp_path):
    result, _ = trained
    state = Checkpoint.load(result.checkpoint)
    data = load_dataset("digits", size=(32, 32), seed=state.config.seed)
    held_out = (normalize(data.test_images, state.preprocess), data.test_labels)
    # activations' ranges calibrated on blank images: every real activation saturates
    blank = np.full((64, 1, 32, 32), normalize(np.zeros((1, 32, 32, 1), np.uint8), state.preprocess)[0, 0, 0, 0])
    plan = PrecisionPlan("int8", calibration=blank.astype(np.float32), held_out=held_out)
    with pytest.raises(ExportError) as refused:
        export_model(
            state.build_model(),
            repository=str(tmp_path),
            name="digits",
            labels=state.labels,
            preprocess=state.preprocess,
            training={},
            precision=plan,
        )
    message = str(refused.value)
    assert "held-out accuracy" in message and "% FP32 ->" in message and "--max-accuracy-drop 1" in message
    assert not os.path.exists(tmp_path / "digits")  # no version, no half-written folder


def test_an_untrained_int8_export_calibrates_on_synthetic_images_and_says_there_is_no_gate(tmp_path):
    folder = export_random_init(
        "alexnet_small", repository=str(tmp_path), name="random", input_shape=(1, 32, 32), precision="int8"
    )
    export = _card(folder)["export"]
    assert export["precision"] == "int8" and export["accuracy"] is None and export["gate"].startswith("none")
    assert export["quantization"]["calibration_source"].startswith("synthetic")


def test_int8_and_fp16_versions_serve_through_tritonclient_with_feature_maps(lowered):
    result, repository, _, _ = lowered
    state = Checkpoint.load(result.checkpoint)
    data = load_dataset("digits", size=(32, 32), seed=state.config.seed)
    x = normalize(data.test_images[:16], state.preprocess)
    grpc_port, http_port = free_ports(2)
    settings = Settings(repository=str(repository), host="127.0.0.1", http_port=http_port, version_policy="all")
    with Loopback(settings, grpc_port) as served:
        client = triton.InferenceServerClient(served.url)
        answers = {}
        for version in ("1", "2", "3"):
            tensor = triton.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            wanted = [triton.InferRequestedOutput(name) for name in ("logits", "conv1", "conv4")]
            answer = client.infer("digits", [tensor], model_version=version, outputs=wanted)
            assert answer.as_numpy("conv1").shape == (16, 32, 32, 32)
            assert answer.as_numpy("conv1").dtype == np.float32 and answer.as_numpy("conv4").ndim == 4
            answers[version] = answer.as_numpy("logits")
            config = client.get_model_config("digits", version, as_json=True)["config"]
            answers[version + " precision"] = config["parameters"]["precision"]["string_value"]
    assert [answers[v + " precision"] for v in "123"] == ["fp32", "int8", "fp16"]
    top1 = {v: answers[v].argmax(axis=1) for v in "123"}
    assert (top1["2"] == top1["1"]).mean() >= 0.9 and (top1["3"] == top1["1"]).all()
    assert np.abs(answers["3"] - answers["1"]).max() < 0.05  # FP16 keeps the logits close
