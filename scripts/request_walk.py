"""Which of convserve's files one request enters, in order, on the front-end's event loop.

    python scripts/request_walk.py REPOSITORY [MODEL]

Serves REPOSITORY in this process (service/loopback.py), sends one warm-up and then one traced
request through each door (gRPC ModelInfer, HTTP /infer with binary tensors) and prints, per door,
the walk: convserve's files in the order calls enter them, an entry being a call that crosses into
the file from another (a library's or one of ours; calls within a file, and a coroutine resumed,
are not entries). The column
counts the entries per file: a door that goes through the other, or a layer that calls back into the
one above it, shows as a file entered many times. (The engine's side runs on its own threads and is
not traced.)
"""

from __future__ import annotations

import json
import os
import sys
import threading
import urllib.request
from collections import Counter

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ours(path: str) -> str:
    """The project-relative name of a file of convserve's own code, or "" for anything else."""
    name = os.path.relpath(path, ROOT)
    if name.startswith(("convserve/", "service/")) and "/proto/" not in name:
        return name
    return ""


def _walker(entered: list[str]):
    """Records an entry each time a call crosses into one of convserve's files from another file
    (a library's, or another of ours); calls within a file, and a coroutine or generator resumed
    (the same frame again), are not entries."""
    started: set[int] = set()
    frames: list = []  # kept alive while traced, so that no id is reused

    def profile(frame, event, arg):
        if event != "call" or id(frame) in started:
            return
        started.add(id(frame))
        frames.append(frame)
        name = _ours(frame.f_code.co_filename)
        if name and (frame.f_back is None or _ours(frame.f_back.f_code.co_filename) != name):
            entered.append(name)

    return profile


def _on_loop(loop, profile) -> None:
    """Set (or, with None, clear) the profile function of the thread running `loop`."""
    done = threading.Event()

    def set_it() -> None:
        sys.setprofile(profile)
        done.set()

    loop.call_soon_threadsafe(set_it)
    done.wait(10)


def walk(repository: str, model: str) -> dict[str, list[str]]:
    from convserve.client import Client
    from convserve.ports import free_ports
    from convserve.service.loopback import Loopback
    from convserve.service.settings import Settings

    grpc_port, http_port = free_ports(2)
    settings = Settings(repository=repository, host="127.0.0.1", http_port=http_port, grace_period=1.0)
    walks: dict[str, list[str]] = {}
    with Loopback(settings, grpc_port) as served:
        shape = served.core.model_metadata(model)["inputs"][0]["shape"][1:]
        x = np.zeros((1, *shape), np.float32)
        header = json.dumps(
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, *shape], "parameters": {}}]}
        ).replace('"parameters": {}', f'"parameters": {{"binary_data_size": {x.nbytes}}}')

        def over_grpc() -> None:
            with Client(served.url) as client:
                client.infer(model, array=x)

        def over_http() -> None:
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v2/models/{model}/infer",
                data=header.encode() + x.tobytes(),
                headers={"Inference-Header-Content-Length": str(len(header))},
            )
            with urllib.request.urlopen(request, timeout=30) as answer:
                answer.read()

        loop = served.frontend_loop
        for door, send in (("gRPC", over_grpc), ("HTTP", over_http)):
            send()  # warm: first-call imports and caches are not the walk
            entered: list[str] = []
            _on_loop(loop, _walker(entered))
            send()
            _on_loop(loop, None)
            walks[door] = entered
    return walks


def main() -> None:
    repository = sys.argv[1]
    model = sys.argv[2] if len(sys.argv) > 2 else "digits"
    for door, entered in walk(repository, model).items():
        counts = Counter(entered)
        print(f"{door}: {len(entered)} steps, {len(counts)} files, at most {max(counts.values())} entries in one file")
        print("  " + " > ".join(os.path.basename(os.path.dirname(n)) + "/" + os.path.basename(n) for n in entered))
        seen = set()
        for name in entered:
            if name not in seen:
                seen.add(name)
                print(f"  {name:48} {counts[name]}")


if __name__ == "__main__":
    main()
