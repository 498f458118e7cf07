"""perf_analyzer (C++, from tritonclient's wheel) drives `convserve serve` at one and two front-ends,
and checks every answer itself against in-process onnxruntime's (its validation_data: all outputs,
bit for bit, while requests from concurrent streams are batched together)."""

import json
import subprocess

import numpy as np
import onnxruntime as ort
import pytest

from convserve.bench import perf_analyzer

from .conftest import RunningServer

TOOL = perf_analyzer()
# These tests check answers, not speed: on a noisy machine perf_analyzer's stability check (latency
# within 10 % over three windows) can fail a run that answered everything right
STABLE = ["--stability-percentage", "1000"]


@pytest.mark.skipif(TOOL is None, reason="perf_analyzer needs Debian's libb64-0d and nvidia-cuda-runtime-cu12")
@pytest.mark.parametrize(("frontends", "protocol"), [("1", "grpc"), ("2", "grpc"), ("1", "http")])
def test_perf_analyzer_runs_and_every_answer_equals_in_process_onnxruntime(
    served_repository, tmp_path, frontends, protocol
):
    _validated_run(served_repository, served_repository / "digits" / "1" / "model.onnx", tmp_path, frontends, protocol)


@pytest.mark.skipif(TOOL is None, reason="perf_analyzer needs Debian's libb64-0d and nvidia-cuda-runtime-cu12")
def test_perf_analyzer_validates_every_answer_of_an_int8_version(trained, tmp_path):
    """Issue 28: an INT8 version under batching answers as in-process INT8 onnxruntime at batch 1. The
    tolerance perf_analyzer allows is none, and none is needed: the activations' scales are fixed at
    calibration, so each image's answer is the same in any batch, bit for bit."""
    from convserve.models.export import export_checkpoint

    result, _ = trained
    repository = tmp_path / "repository"
    folder = export_checkpoint(result.checkpoint, repository=str(repository), name="digits", precision="int8")
    _validated_run(repository, f"{folder}/model.onnx", tmp_path, "1", "grpc")


def _validated_run(served_repository, model, tmp_path, frontends: str, protocol: str) -> None:
    assert TOOL is not None
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    x = np.random.default_rng(7).standard_normal((1, 1, 32, 32)).astype(np.float32)
    expected = session.run(names, {"input": x})
    data = {
        "data": [{"input": {"content": x[0].ravel().tolist(), "shape": list(x.shape[1:])}}],
        # perf_analyzer asks for every output the model declares, and compares each one it is given
        "validation_data": [
            {n: {"content": v[0].ravel().tolist(), "shape": list(v.shape[1:])} for n, v in zip(names, expected)}
        ],
    }
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    server = RunningServer(served_repository, "--frontends", frontends)
    try:
        result = subprocess.run(
            [
                TOOL[0],
                "-m",
                "digits",
                "-u",
                server.url if protocol == "grpc" else f"127.0.0.1:{server.http_port}",
                "-i",
                protocol,
                "--concurrency-range",
                "4",
                "--input-data",
                str(path),
                "--measurement-interval",
                "1000",
                *STABLE,
            ],
            capture_output=True,
            text=True,
            env=TOOL[1],
            timeout=240,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        assert "had error" not in output and "Concurrency: 4, throughput:" in output, output[-3000:]
    finally:
        assert server.stop() == 0, server.output()


@pytest.mark.skipif(TOOL is None, reason="perf_analyzer needs Debian's libb64-0d and nvidia-cuda-runtime-cu12")
@pytest.mark.parametrize(
    "mode",
    [
        [],
        ["--streaming"],
        ["--async"],
        ["--shared-memory", "system"],
        ["-i", "http"],
        ["-i", "http", "--async"],
        ["-i", "http", "--shared-memory", "system"],
    ],
)
def test_perf_analyzer_without_input_data_in_each_mode(server, mode):
    """Without --input-data perf_analyzer sends every declared input, `input` and `image` (random bytes
    that are no picture): the tensor is used. Its shared-memory mode needs every input too (it refuses
    optional ones named alone), so this is how it runs there."""
    assert TOOL is not None
    http = "http" in mode
    url = f"127.0.0.1:{server.http_port}" if http else server.url
    command = [TOOL[0], "-m", "digits", "-u", url, *([] if http else ["-i", "grpc"]), "--concurrency-range", "2"]
    result = subprocess.run(
        [*command, "--measurement-interval", "500", *STABLE, *mode],
        capture_output=True,
        text=True,
        env=TOOL[1],
        timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Concurrency: 2, throughput:" in output, output[-3000:]
    assert "had error" not in output, output[-3000:]
