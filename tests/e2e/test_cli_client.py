"""The client side against a real server: `convserve infer` (table, JSON Lines, PNG grids, progress),
`visualize`, `arithmetic --explain`, the error lines, and the Python client (sync and asyncio)."""

import asyncio
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from convserve.client import AsyncClient, Client
from convserve.pictures import BORDER_VALUE, layout

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples", "digits")


def convserve(*args, url=None, timeout=120):
    extra = ["--url", url] if url else []
    return subprocess.run(
        [sys.executable, "-m", "convserve", *args, *extra], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _digit(path: str) -> str:
    return os.path.basename(path).split("-")[0]


def test_infer_prints_a_table_per_image_and_no_progress_frames_when_piped(server):
    run = convserve("infer", "examples/digits", "--top-k", "3", "--batch-size", "4", url=server.url)
    assert run.returncode == 0, run.stderr
    blocks = run.stdout.strip().split("\nexamples/")
    assert len(blocks) == 10
    correct = 0
    for block in blocks:
        lines = block.splitlines()
        path = lines[0]
        ranks = [line for line in lines if re.match(r"\s+\d+\. ", line)]
        assert len(ranks) == 3, block
        probabilities = [float(line.rsplit(None, 1)[1].rstrip("%")) for line in ranks]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 100.01
        correct += ranks[0].split()[1] == _digit(path)
        assert "metrics: batch " in lines[-1] and "compute" in lines[-1]
    assert correct >= 9, run.stdout  # held-out digits; the model scores about 99% on them
    # piped: the progress is plain lines, never carriage-return frames
    assert "\r" not in run.stderr and "images 10/10" in run.stderr


def test_infer_json_lines_and_feature_map_grids(server, tmp_path):
    run = convserve(
        "infer", "examples/digits/3-test13.png", "examples/digits/7-test44.png", "--json", "--feature-maps", "all",
        "--save-dir", str(tmp_path), url=server.url,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["image"] for r in records] == ["examples/digits/3-test13.png", "examples/digits/7-test44.png"]
    for record in records:
        assert record["top_k"][0]["label"] == _digit(record["image"])
        assert {"label", "index", "probability"} <= set(record["top_k"][0])
        assert record["metrics"]["batch_size"] == 2 and record["metrics"]["compute_us"] > 0
        assert set(record["feature_maps"]) == {"conv1", "conv2", "conv3", "conv4", "conv5"}
        for name, path in record["feature_maps"].items():
            channels, height, width = record["feature_map_shapes"][name]
            assert os.path.basename(path).endswith(f"_{name}_{channels}x{height}x{width}.png")
            _check_grid(np.asarray(Image.open(path)), channels, height, width)
        seen = Image.open(record["input_image"])
        assert seen.mode == "L" and seen.size[0] >= 128  # 1x32x32, enlarged to be seen


def _check_grid(picture: np.ndarray, channels: int, height: int, width: int) -> None:
    """One tile per channel, each normalised to its own range, border everywhere else."""
    plan = layout(channels, height, width)
    assert picture.shape == plan.size and picture.dtype == np.uint8
    covered = np.zeros(picture.shape, dtype=bool)
    for index in range(channels):
        top, left, bottom, right = plan.tile_box(index)
        tile = picture[top:bottom, left:right]
        assert (tile.min(), tile.max()) in ((0, 255), (0, 0)), (index, tile.min(), tile.max())
        covered[top:bottom, left:right] = True
    assert np.all(picture[~covered] == BORDER_VALUE)  # borders, and the cells past the last channel


def test_visualize_draws_filters_beside_feature_maps_per_conv_layer(server, tmp_path):
    """One picture per conv layer, named by the image, the model and the layer, so a second image does not
    overwrite the first; --save-dir defaults to ./visualize."""
    written = []
    for image in ("5-test109", "3-test13"):
        args = ["visualize", "digits", os.path.join(EXAMPLES, image + ".png")]
        run = subprocess.run(
            [sys.executable, "-m", "convserve", *args, "--url", server.url],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr
        paths = run.stdout.split()
        names = [os.path.basename(p) for p in paths]
        assert [n.split("_")[:3] for n in names] == [[image, "digits", f"conv{i}"] for i in range(1, 6)], names
        assert all(os.path.dirname(p) == "visualize" for p in paths)
        written += [tmp_path / p for p in paths]
    assert len(set(written)) == 10 and all(p.exists() for p in written)
    for path in written:
        picture = Image.open(path)
        assert picture.mode == "RGB" and picture.size[0] > 200 and picture.size[1] > 100


def test_the_python_client_classifies_and_fetches_filters(server, served_repository):
    images = [os.path.join(EXAMPLES, name) for name in sorted(os.listdir(EXAMPLES))]
    with Client(server.url) as client:
        assert ("digits", "READY") in {(m.name, m.state) for m in client.models()}
        results = client.classify(images, "digits", top_k=2, feature_maps=["conv1"], fp16=True)
        assert sum(r.label == _digit(p) for p, r in zip(images, results)) >= 9
        assert results[0].feature_maps["conv1"].shape == (32, 32, 32)
        assert results[0].feature_maps["conv1"].dtype == np.float32 and results[0].metrics["batch_size"] == 10
        layer, kernels = client.filters("digits", "conv1")
        assert layer == "conv1" and kernels.shape == (32, 1, 3, 3)
        version = [d for d in os.listdir(served_repository / "digits") if d.isdigit()][-1]
        with np.load(served_repository / "digits" / version / "filters.npz") as saved:
            assert np.array_equal(saved["conv1"], kernels)

    async def with_asyncio():
        async with AsyncClient(server.url) as client:
            return await client.classify(images[:3], "digits", feature_maps="all")

    results = asyncio.run(with_asyncio())
    assert [r.label for r in results] == [_digit(p) for p in images[:3]]
    assert set(results[0].feature_maps) == {"conv1", "conv2", "conv3", "conv4", "conv5"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["infer", "examples/digits/1-test90.png", "--url", "127.0.0.1:1"], "cannot reach a convserve server at"),
        (["infer", "examples/digits/1-test90.png", "--model", "nope"], "unknown model 'nope'; the server has: digits"),
        (["infer", "README.md"], "README.md is not a PNG or JPEG image"),
        (["infer", "examples/digits", "--feature-maps", "conv9"], "no feature map 'conv9' in digits; it has: conv1"),
        (["infer", "no/such/file.png"], "no such file or folder: no/such/file.png"),
        (["visualize", "nope", "examples/digits/1-test90.png", "--save-dir", "x"], "unknown model 'nope'"),
        (["describe", "digitz"], "unknown model 'digitz'; the server has: digits"),
        (["models", "--url", "127.0.0.1:1"], "cannot reach a convserve server at 127.0.0.1:1"),
        (["describe", "digits", "--url", "127.0.0.1:1"], "cannot reach a convserve server at 127.0.0.1:1"),
    ],
)  # fmt: skip
def test_errors_are_one_line_and_a_nonzero_exit(server, args, message):
    url = [] if "--url" in args else ["--url", server.url]
    run = subprocess.run(
        [sys.executable, "-m", "convserve", *args, *url], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr


def test_arithmetic_explain_matches_the_table():
    explained = convserve("arithmetic", "alexnet", "--explain")
    table = json.loads(convserve("arithmetic", "alexnet", "--json").stdout)
    assert explained.returncode == 0, explained.stderr
    text = explained.stdout
    assert "height: floor((224 + 2·2 − 11)/4) + 1 = 55" in text
    assert "parameters: 11·11·3·64 + 64 = 23,296" in text
    rows = {row["name"]: row for row in table["layers"]}
    for block in text.split("\n\n")[1:-1]:
        name = block.split()[0]
        row = rows[name]
        if "parameters:" in block:
            assert int(re.search(r"parameters: .* = ([\d,]+)", block).group(1).replace(",", "")) == row["params"]
        if "MACs:" in block:
            assert int(re.search(r"MACs: .* = ([\d,]+)", block).group(1).replace(",", "")) == row["macs"]
        if "height:" in block:
            assert int(re.search(r"height: .* = (\d+)", block).group(1)) == row["output_shape"][1]
        if "receptive field" in block:
            rf, jump = re.search(r"receptive field .* = (\d+); jump .* = (\d+)", block).groups()
            assert [int(rf), int(jump)] == [row["receptive_field"][0], row["jump"][0]]
    assert f"= {table['total_params']:,}" in text.splitlines()[-1]


def test_health_exits_0_for_a_serving_server_and_1_for_none(server):
    from tests.e2e.conftest import free_port

    run = convserve("health", url=server.url)
    assert run.returncode == 0 and run.stdout.strip() == f"{server.url}: SERVING", run.stdout + run.stderr
    run = convserve("health", "--service", "inference.GRPCInferenceService", url=server.url)
    assert run.returncode == 0, run.stdout
    nobody = f"127.0.0.1:{free_port()}"
    run = convserve("health", "--timeout", "1", url=nobody)
    assert run.returncode == 1 and run.stdout.startswith(f"{nobody}: UNAVAILABLE"), run.stdout + run.stderr
