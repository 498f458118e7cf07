"""Settings, protocol parsing, postprocessing and preprocessing as plain functions."""

import argparse
import io

import numpy as np
import pytest
from PIL import Image

from convserve.cli.base import add_flags
from convserve.client import build_request
from convserve.contract import PreprocessSpec
from convserve.service import settings as settings_module
from convserve.service.errors import InvalidInput, ModelNotFound
from convserve.service.frontend.grpc.protocol import parse_infer_request
from convserve.service.frontend.postprocess import top_k
from convserve.service.frontend.preprocess import ImageDecodeError, decode_image, preprocess_encoded
from convserve.wire import deserialize_bytes, serialize_bytes


def test_settings_flags_over_environment_over_defaults():
    parser = argparse.ArgumentParser()
    add_flags(parser, settings_module.Settings)
    env = {"CONVSERVE_GRPC_PORT": "9001", "CONVSERVE_MAX_BATCH_SIZE": "8", "CONVSERVE_PROVIDERS": "cpu"}
    s = settings_module.from_sources(parser.parse_args(["--grpc-port", "9100"]), env)
    assert s.grpc_port == 9100 and s.max_batch_size == 8 and s.providers == "cpu" and s.metrics_port == 8002
    with pytest.raises(ValueError, match="CONVSERVE_MAX_BATCH_SIZE"):
        settings_module.from_sources(parser.parse_args([]), {"CONVSERVE_MAX_BATCH_SIZE": "many"})
    for bad in (["--max-batch-size", "0"], ["--version-policy", "newest"], ["--providers", "rocm"]):
        with pytest.raises(ValueError):
            settings_module.from_sources(parser.parse_args(bad), {})
    assert settings_module.from_sources(
        parser.parse_args(["--version-policy", "specific:1,3"]), {}
    ).specific_versions() == [1, 3]


def test_parse_request_reads_raw_contents_without_copying():
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    request = build_request("m", array=x, outputs=["logits", "conv1"], classification=2, fp16=["conv1"])
    parsed = parse_infer_request(request)
    assert np.array_equal(parsed.array, x) and not parsed.array.flags.owndata
    assert [(o.name, o.classification, o.datatype) for o in parsed.outputs] == [
        ("logits", 2, "FP32"),
        ("conv1", 0, "FP16"),
    ]


def _timeout_as_text(request):
    request.parameters["timeout"].string_param = "soon"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: (r.inputs.add(name="other", datatype="FP32", shape=[1]), r.raw_input_contents.append(b"")), "both"),
        (lambda r: r.inputs.add(name="other", datatype="FP32", shape=[1]), "one entry per input"),
        (lambda r: setattr(r.inputs[0], "datatype", "INT8"), "must be FP32"),
        (lambda r: r.inputs[0].shape.__setitem__(1, 2), "needs"),
        (lambda r: setattr(r.inputs[0], "name", "pixels"), "unknown input"),
        (_timeout_as_text, "timeout"),
    ],
)
def test_parse_request_errors(mutate, message):
    request = build_request("m", array=np.zeros((1, 1, 4, 4), np.float32))
    mutate(request)
    with pytest.raises(InvalidInput, match=message):
        parse_infer_request(request)


def test_an_empty_model_name_is_no_such_model():  # as Triton answers it: NOT_FOUND, not INVALID_ARGUMENT
    request = build_request("m", array=np.zeros((1, 1, 4, 4), np.float32))
    request.model_name = ""
    with pytest.raises(ModelNotFound):
        parse_infer_request(request)


def test_bytes_tensors_round_trip_and_truncation():
    items = [b"", b"abc", bytes(range(256))]
    assert deserialize_bytes(serialize_bytes(items)) == items
    with pytest.raises(ValueError):
        deserialize_bytes(serialize_bytes(items)[:-1])
    request = build_request("m", images=[b"x"])
    request.raw_input_contents[0] = request.raw_input_contents[0][:3]
    with pytest.raises(InvalidInput):
        parse_infer_request(request)


def test_top_k_is_triton_shaped():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)
    out = top_k(scores, 2, ["cat", "dog", "eel"])
    assert out.shape == (2, 2)
    assert out[0].tolist() == [b"0.700000:1:dog", b"0.200000:2:eel"]
    assert out[1][0] == b"0.500000:0:cat"
    assert top_k(scores, 1, [])[0].tolist() == [b"0.700000:1"]  # no labels: no trailing colon, as Triton


def test_preprocess_resizes_converts_and_normalises():
    spec = PreprocessSpec(32, 32, 1, "bilinear", (0.5,), (0.25,))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(buffer, format="PNG")
    batch = preprocess_encoded([buffer.getvalue()] * 2, spec)
    assert batch.shape == (2, 1, 32, 32) and batch.dtype == np.float32
    assert np.allclose(batch, (1.0 - 0.5) / 0.25)
    assert decode_image(buffer.getvalue(), spec).shape == (32, 32, 1)
    with pytest.raises(ImageDecodeError):
        decode_image(b"GIF89a-but-not-really", spec)


def _twin_bytes(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_16_bit_and_exif_rotated_images_decode_like_their_8_bit_upright_twins():
    spec = PreprocessSpec(32, 32, 1, "bilinear", (0.5,), (0.25,))
    pixels = (np.add.outer(np.arange(40), np.arange(48) * 3) % 256).astype(np.uint8)  # (H, W), not symmetric
    eight = _twin_bytes(Image.fromarray(pixels, mode="L"), "PNG")
    sixteen = _twin_bytes(Image.fromarray(pixels.astype(np.uint16) * 257), "PNG")
    assert Image.open(io.BytesIO(sixteen)).mode.startswith("I")
    assert np.array_equal(decode_image(eight, spec), decode_image(sixteen, spec))
    # the same photo stored rotated, with the EXIF orientation that shows it upright (6: rotate 90 cw)
    rgb = PreprocessSpec(32, 32, 3, "bilinear", (0.5,) * 3, (0.25,) * 3)
    upright = Image.fromarray(np.stack([pixels, pixels[::-1], 255 - pixels], axis=-1))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated_jpeg = _twin_bytes(stored, "JPEG", quality=95, exif=exif.tobytes())
    upright_jpeg = _twin_bytes(upright, "JPEG", quality=95)
    difference = np.abs(decode_image(rotated_jpeg, rgb).astype(int) - decode_image(upright_jpeg, rgb).astype(int))
    assert difference.mean() < 4, difference.mean()
    plain_stored = _twin_bytes(stored, "JPEG", quality=95)  # without the tag it stays rotated
    assert np.abs(decode_image(plain_stored, rgb).astype(int) - decode_image(upright_jpeg, rgb).astype(int)).mean() > 20
    # palette images keep their colours
    palette = Image.fromarray(pixels, mode="L").convert("P")
    assert (
        np.abs(
            decode_image(_twin_bytes(palette, "PNG"), spec).astype(int) - decode_image(eight, spec).astype(int)
        ).max()
        <= 1
    )


def _card(c, h, w, outputs):
    from convserve.contract import ModelCard, TensorSpec

    specs = [TensorSpec(name, "FP32", (-1, *shape)) for name, shape in outputs.items()]
    return ModelCard(
        "m", 1, [], PreprocessSpec(height=h, width=w, channels=c, mean=(0.0,) * c, std=(1.0,) * c), specs, [], "0" * 64
    )


def test_limits_are_derived_from_the_model_unless_set():
    from convserve.service.frontend.limits import image_limits, largest_messages, message_limits

    digits = _card(1, 8, 8, {"logits": (10,), "probabilities": (10,), "conv1": (16, 8, 8)})
    alexnet = _card(3, 224, 224, {"logits": (1000,), "probabilities": (1000,), "conv1": (64, 55, 55)})
    s = settings_module.Settings()
    small, large = image_limits(digits, s), image_limits(alexnet, s)
    assert small.max_pixels == 1024 * 1024 and small.max_bytes == 3 * 1024 * 1024  # the floor: photos of digits
    assert large.max_pixels == 64 * 224 * 224 and large.max_bytes == 3 * 64 * 224 * 224
    assert small.formats == ("PNG", "JPEG")
    # a full batch of FP32 input (twice, for margin) or two of the largest images; a full batch of every output
    batch = 4 * 3 * 224 * 224 * 32
    assert largest_messages(alexnet, s).receive == max(2 * batch, 2 * large.max_bytes) + 64 * 1024
    assert largest_messages(alexnet, s).send == 32 * 4 * (1000 + 1000 + 64 * 55 * 55) + 64 * 1024
    both = message_limits([digits, alexnet], s)
    assert both.receive == largest_messages(alexnet, s).receive < 64 * 1024 * 1024  # not 256 MB
    assert message_limits([digits], s).receive < 8 * 1024 * 1024
    assert message_limits([], s).receive == 1024 * 1024
    chosen = settings_module.Settings(max_image_pixels=500, max_image_bytes=7, max_message_bytes=99)
    assert image_limits(alexnet, chosen).max_pixels == 500 and image_limits(alexnet, chosen).max_bytes == 7
    assert message_limits([alexnet], chosen) == type(both)(99, 99)


def test_the_hand_encoded_answer_is_the_protobuf_answer():
    from convserve.proto import grpc_service_pb2 as pb
    from convserve.service.frontend.grpc.protocol import build_infer_response, encode_infer_response
    from convserve.service.frontend.inference import InferRequest, InferResult, OutputTensor
    from convserve.wire import ShmRef

    big = np.arange(70_000, dtype="<f4").tobytes()  # a length that takes a three-byte varint
    result = InferResult(
        "digits",
        "3",
        [
            OutputTensor("logits", "FP32", (1, 10), np.ones(10, "<f4").tobytes()),
            OutputTensor("conv1", "FP32", (1, 70_000), big),
            OutputTensor("probabilities", "FP32", (1, 10), b"", ShmRef("out", 40, 8)),
            OutputTensor("logits", "BYTES", (1, 1), b"\x03\x00\x00\x00abc"),
        ],
        {"queue_us": 5, "execution_provider": "CPUExecutionProvider"},
    )
    request = InferRequest("digits", "", "id-7")
    encoded = encode_infer_response(request, result)
    assert pb.ModelInferResponse.FromString(encoded) == build_infer_response(request, result)


def test_both_inputs_the_tensor_is_used_and_the_batches_must_agree():
    request = build_request("m", array=np.ones((2, 1, 4, 4), np.float32))
    request.inputs.add(name="image", datatype="BYTES", shape=[2, 1])
    request.raw_input_contents.append(serialize_bytes([b"not", b"pictures"]))
    parsed = parse_infer_request(request)
    assert parsed.input_name == "input" and parsed.array.shape == (2, 1, 4, 4) and parsed.images is None
    request.inputs[1].shape[:] = [3, 1]
    with pytest.raises(InvalidInput, match="different batches"):
        parse_infer_request(request)
    request.inputs[1].name = "input"  # two of one kind is not two alternatives
    with pytest.raises(InvalidInput, match="or both"):
        parse_infer_request(request)


def test_one_bearer_token_rule_for_every_door():
    from convserve.service.rules import BearerToken

    token = BearerToken("s3cret")
    assert token.required and token.admits("Bearer s3cret") and token.admits(b"Bearer s3cret")
    assert not token.admits("Bearer other") and not token.admits(None) and not token.admits("s3cret")
    anyone = BearerToken("")
    assert not anyone.required and anyone.admits(None) and anyone.admits("Bearer whatever")


def test_the_benchmarks_session_is_the_servers_by_default():
    """The benchmark opens its in-process session with SessionSettings() (it does not import the
    server): the defaults must be `convserve serve`'s."""
    from convserve.sessions import SessionSettings

    assert settings_module.Settings().session_settings() == SessionSettings()
    chosen = settings_module.Settings(providers="cuda,cpu", instances=3, intra_op_spinning="on")
    assert chosen.session_settings() == SessionSettings(providers=("cuda", "cpu"), instances=3, intra_op_spinning="on")
