"""The command line: JSON output, and bad input as one line on stderr with exit code 2.

The commands run in this process (`convserve.cli.main`, what `python -m convserve` calls: a test in
test_architecture runs that entry point itself), their output captured: a subprocess would spend
seconds importing torch for each line of input checked."""

import contextlib
import io
import json
import os
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convserve(*args, cwd=None):
    """Run `convserve ARGS` as the command would: its exit code, stdout and stderr."""
    from convserve.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd or ROOT)  # (contextlib.chdir is Python 3.11's; the project runs on 3.10)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    except SystemExit as exc:  # argparse's own errors, and --help
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(here)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_arithmetic_alexnet_json():
    result = convserve("arithmetic", "alexnet", "--json")
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    assert table["total_params"] == 61_100_840
    assert isinstance(table["total_macs"], int) and isinstance(table["layers"], list)
    assert table["layers"][0]["name"] == "conv1"


def test_arithmetic_table_and_paper():
    result = convserve("arithmetic", "alexnet_small", "--input", "1x32x32", "--num-classes", "10")
    assert result.returncode == 0 and "conv5" in result.stdout and "fc layers" in result.stdout
    paper = convserve("arithmetic", "googlenet", "--paper")
    assert paper.returncode == 0 and "differs > 5%" in paper.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("arithmetic", "resnet9000"),
        ("arithmetic", "alexnet", "--input", "3x224"),
        ("arithmetic", "alexnet", "--input", "3x10x10"),
        ("arithmetic", "tests/conftest.py"),
        ("arithmetic", "missing/model.onnx"),
        ("arithmetic", "alexnet", "--bogus"),
        ("arithmetic", "alexnet", "--paper"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args):
    result = convserve(*args)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("convserve: error:"), result.stderr


def _write_png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 128).save(path)


@pytest.fixture
def bad_datasets(tmp_path):
    (tmp_path / "empty").mkdir()
    _write_png(tmp_path / "noimages" / "a" / "0.png")
    (tmp_path / "noimages" / "b").mkdir()
    _write_png(tmp_path / "undecodable" / "a" / "0.png")
    (tmp_path / "undecodable" / "a" / "1.png").write_bytes(b"\x89PNG\r\n broken")
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "data_batch_1").write_bytes(b"not a pickle")
    (tmp_path / "afile").write_text("x")
    return tmp_path


@pytest.mark.parametrize(
    "args",
    [
        ["--dataset", "imagenet"],
        ["--arch", "resnet"],
        ["--dataset", "imagefolder:{d}/missing"],
        ["--dataset", "imagefolder:{d}/empty"],
        ["--dataset", "imagefolder:{d}/noimages"],
        ["--dataset", "imagefolder:{d}/undecodable"],
        ["--dataset", "cifar10:{d}/cifar"],
        ["--epochs", "0"],
        ["--repository", "{d}/afile"],
        ["--name", "../escape"],
    ],
)
def test_train_bad_input_is_one_line_exit_2_and_writes_nothing(bad_datasets, args):
    repository = bad_datasets / "repository"
    args = [a.format(d=bad_datasets) for a in args]
    if "--repository" not in args:
        args += ["--repository", str(repository)]
    result = convserve("train", "--no-progress", "--output", str(bad_datasets / "run"), *args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("convserve: error:"), result.stderr[-2000:]
    assert not repository.exists() or not any(repository.rglob("*"))


def _subcommands():
    import argparse

    from convserve.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_help_shows_the_defaults_and_every_flag_explains_itself():
    commands = _subcommands()
    for name, parser in commands.items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"convserve {name} {action.option_strings[0]} has no help text"
    shown = {name: " ".join(parser.format_help().split()) for name, parser in commands.items()}
    assert "gRPC port (0: any free port) (default: 8001)" in shown["serve"]
    assert "(default: 8000)" in shown["serve"] and "(default: 8002)" in shown["serve"]
    assert "labels to show per image (default: 5)" in shown["infer"]
    assert "the server's gRPC address (default: 127.0.0.1:8001)" in shown["infer"]
    assert "passes over the training split (default: 15)" in shown["train"]
    assert "(default: visualize)" in shown["visualize"]
