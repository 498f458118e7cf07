"""What a version must pass at load beyond "the session starts" (issue 17's probe): answers that do
not depend on batch-mates, every file the graph reads hashed, output shapes as the card says, an
arithmetic table DescribeModel can send, filters that are no bigger than the model."""

import hashlib
import json
import os
import shutil
import zipfile

import numpy as np
import onnx
import pytest
from onnx import helper

from convserve.service.engine.registry import validate_version
from convserve.service.errors import LoadFailed
from convserve.service.frontend.introspection import _read_filters
from convserve.service.settings import Settings

SETTINGS = Settings(providers="cpu")


@pytest.fixture
def version(trained, tmp_path):
    """A copy of the trained version folder, to be altered."""
    folder = tmp_path / "digits" / "1"
    shutil.copytree(trained[1], folder)
    return folder


def _card(folder) -> dict:
    return json.loads((folder / "model.json").read_text())


def _write_card(folder, card: dict) -> None:
    (folder / "model.json").write_text(json.dumps(card))


def _rehash(folder) -> dict:
    card = _card(folder)
    card["onnx"]["sha256"] = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    _write_card(folder, card)
    return card


def test_the_trained_version_passes_every_check(version):
    model = validate_version(str(version), "digits", 1, SETTINGS)
    model.runtime.close()


def test_answers_that_depend_on_batch_mates_refuse_the_version(version):
    model = onnx.load(str(version / "model.onnx"))
    producer = next(n for n in model.graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "logits_alone"
    # logits + softmax over the batch axis: each image's answer now depends on the others
    model.graph.node.append(helper.make_node("Softmax", ["logits_alone"], ["logits_mixed"], axis=0))
    model.graph.node.append(helper.make_node("Add", ["logits_alone", "logits_mixed"], ["logits"]))
    onnx.save(model, str(version / "model.onnx"))
    _rehash(version)
    with pytest.raises(LoadFailed, match="depends on the other images in its batch"):
        validate_version(str(version), "digits", 1, SETTINGS)


def test_every_file_the_graph_reads_is_hashed(version):
    model = onnx.load(str(version / "model.onnx"))
    onnx.save(model, str(version / "model.onnx"), save_as_external_data=True, location="weights.bin")
    card = _rehash(version)
    with pytest.raises(LoadFailed, match=r"'weights\.bin', whose sha256 model\.json does not give"):
        validate_version(str(version), "digits", 1, SETTINGS)
    card["onnx"]["external_data"] = {"weights.bin": hashlib.sha256((version / "weights.bin").read_bytes()).hexdigest()}
    _write_card(version, card)
    validate_version(str(version), "digits", 1, SETTINGS).runtime.close()
    weights = bytearray((version / "weights.bin").read_bytes())
    weights[100:104] = np.float32(3.0).tobytes()  # one weight rewritten: the predictions would change
    (version / "weights.bin").write_bytes(bytes(weights))
    with pytest.raises(LoadFailed, match=r"weights\.bin does not match its sha256"):
        validate_version(str(version), "digits", 1, SETTINGS)


def test_output_shapes_must_be_the_cards(version):
    card = _card(version)
    logits = next(o for o in card["outputs"] if o["name"] == "logits")
    logits["shape"] = [-1, 11]
    _write_card(version, card)
    with pytest.raises(
        LoadFailed, match=r"output logits is float32 \[4, 10\] for 4 images; model.json says FP32 \[-1, 11\]"
    ):
        validate_version(str(version), "digits", 1, SETTINGS)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda a: a["layers"][0].update(params="many"),
        lambda a: a["layers"][0].update(output_shape=None),
        lambda a: a.update(total_macs=-1),
        lambda a: a.update(layers={"conv1": 1}),
        lambda a: a["layers"].append("conv9"),
        lambda a: a["layers"][0].update(jump=[1 << 70]),
    ],
)
def test_a_malformed_arithmetic_table_refuses_the_version(version, spoil):
    card = _card(version)
    spoil(card["arithmetic"])
    _write_card(version, card)
    with pytest.raises(LoadFailed, match="arithmetic is malformed"):
        validate_version(str(version), "digits", 1, SETTINGS)


def test_filters_declaring_more_than_the_model_holds_are_refused_before_unpacking(version):
    limit = os.path.getsize(version / "model.onnx")
    shape, weights = _read_filters(str(version), "conv1", limit)
    assert len(weights) == 4 * np.prod(shape) and len(shape) == 4
    # 512 MiB declared in a tiny archive: refused from the header, nothing allocated
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1, 1, 1), np.float32))
    header["shape"] = (4096, 4096, 2, 4)
    with (
        zipfile.ZipFile(version / "filters.npz", "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("conv1.npy", "w") as member,
    ):
        np.lib.format.write_array_header_1_0(member, header)
        member.write(bytes(1 << 16))
    with pytest.raises(ValueError, match=r"more than model\.onnx holds"):
        _read_filters(str(version), "conv1", limit)
