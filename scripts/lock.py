"""Refresh the two locks from pyproject.toml (`make lock`): requirements.lock, which `make setup`
(and so `make serve`, `make test` and CI) installs from, and deploy/requirements.lock, the images'.

pip-tools' pip-compile resolves pyproject's dependencies with the train and dev extras for this
machine's Python into requirements.lock. torch itself is left out: the Makefile installs it first,
from a build that suits the machine (a plain pin would pull a CUDA build of several GB); the lock is
resolved with the Makefile's torch, so torch's own dependencies are pinned too. The images' lock is
then resolved *inside* the development lock (pip-compile -c requirements.lock), so both name the same
version of every package they share; the CPU image's onnxruntime takes onnxruntime-gpu's version.
tests/test_deploy.py checks that they agree.

    python scripts/lock.py            # needs pip-tools (`make lock` brings it up in .lock-venv)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV_LOCK = os.path.join(ROOT, "requirements.lock")
DEV_HEADER = """\
# The development environment's pins: pyproject's dependencies with the train and dev extras, for
# Python 3.11 on Linux x86_64, resolved with the Makefile's torch (itself left out: the Makefile
# installs it first). `make setup` installs with pip -c from here. Made by scripts/lock.py
# (`make lock`); do not edit.
"""
IMAGE_LOCK = os.path.join(ROOT, "deploy", "requirements.lock")
IMAGE_HEADER = """\
# Pins for the images' pip installs (pip install -c): pyproject's dependencies and its train extra
# (onnxruntime for the CPU; torch is pinned by the Dockerfiles), resolved within requirements.lock.
# Made by scripts/lock.py (`make lock`); do not edit.
"""


def pip_compile(*args: str) -> None:
    command = [
        sys.executable,
        "-m",
        "piptools",
        "compile",
        "--quiet",
        "--strip-extras",
        "--no-emit-index-url",
        "--no-emit-find-links",
        "--unsafe-package",
        "torch",
        *args,
    ]
    subprocess.run(command, check=True, cwd=ROOT)


def makefile_torch() -> str:
    """The torch requirement `make setup` installs first (the Makefile's TORCH default)."""
    with open(os.path.join(ROOT, "Makefile")) as handle:
        match = re.search(r"^TORCH \?= (\S+)$", handle.read(), flags=re.M)
    if not match:
        raise SystemExit("the Makefile names no TORCH")
    return match.group(1)


def pinned_version(lock: str, package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==([^\s;]+)", lock, flags=re.M | re.I)
    if not match:
        raise SystemExit(f"{package} is not pinned in requirements.lock")
    return match.group(1)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        torch = os.path.join(tmp, "torch.in")
        with open(torch, "w") as handle:
            handle.write(makefile_torch() + "\n")
        output = os.path.join(tmp, "dev.lock")
        pip_compile(
            "--upgrade",
            "--no-header",
            "--extra",
            "train",
            "--extra",
            "dev",
            "--output-file",
            output,
            "pyproject.toml",
            torch,
        )
        with open(output) as handle:
            dev_lock = handle.read().replace(f"-r {torch}", "the Makefile's TORCH")
    _write(DEV_LOCK, DEV_HEADER + dev_lock)
    images = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "deploy", "requirements.py"),
            "--extra",
            "train",
            os.path.join(ROOT, "pyproject.toml"),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        requirements = os.path.join(tmp, "requirements.in")
        with open(requirements, "w") as handle:
            handle.write(images)
            handle.write(makefile_torch() + "\n")  # the training image's; its dependencies are pinned here
            handle.write(f"-c {DEV_LOCK}\n")
            # the CPU image's onnxruntime is the same release as the GPU build the dev lock holds
            handle.write(f"onnxruntime=={pinned_version(dev_lock, 'onnxruntime-gpu')}\n")
        output = os.path.join(tmp, "images.lock")
        pip_compile("--no-annotate", "--no-header", "--output-file", output, requirements)
        with open(output) as handle:
            pins = handle.read()
    _write(IMAGE_LOCK, IMAGE_HEADER + pins)


def _write(path: str, text: str) -> None:
    """Whole or not at all: an interrupted refresh leaves the old lock."""
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
