"""The requirements an image installs, read from pyproject.toml (the one list of dependencies).

    python3 deploy/requirements.py [--extra train] [--onnxruntime onnxruntime|onnxruntime-gpu] [PYPROJECT]

pyproject.toml asks for onnxruntime-gpu on Linux x86_64 and onnxruntime elsewhere; an image knows
which one it wants (the CPU image has no use for CUDA kernels), so both lines become the one named,
without their platform markers. torch is left to the image (its wheel index differs by build).
Standard library only: it runs in the image before anything is installed.
"""

import argparse
import re

import tomllib


def requirements(pyproject: dict, extras: list[str], onnxruntime: str) -> list[str]:
    listed = list(pyproject["project"]["dependencies"])
    for extra in extras:
        listed += pyproject["project"]["optional-dependencies"][extra]
    out: list[str] = []
    for line in listed:
        spec = line.split("#", 1)[0].strip()
        name = re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower()
        if name == "torch":
            continue
        if name in ("onnxruntime", "onnxruntime-gpu"):
            spec = onnxruntime + spec.split(";", 1)[0][len(name) :].strip()
            if spec in out:
                continue
        out.append(spec)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", nargs="?", default="pyproject.toml")
    parser.add_argument("--extra", action="append", default=[], help="an optional-dependencies group (repeatable)")
    parser.add_argument("--onnxruntime", default="onnxruntime", choices=("onnxruntime", "onnxruntime-gpu"))
    args = parser.parse_args()
    with open(args.pyproject, "rb") as handle:
        print("\n".join(requirements(tomllib.load(handle), args.extra, args.onnxruntime)))


if __name__ == "__main__":
    main()
