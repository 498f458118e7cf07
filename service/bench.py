"""Benchmark: the server against in-process onnxruntime on the same model, in the same run.

    convserve export --arch alexnet --random-init --repository /tmp/bench --name alexnet
    convserve bench --repository /tmp/bench --model alexnet --clients 1,16 --seconds 10

For each client count: in-process onnxruntime (that many threads calling session.run on one image
each, same providers and threads as the server) and the server (a real `convserve serve` process,
that many concurrent gRPC callers from an asyncio client), each for `--seconds`. Prints images/s
and latency percentiles, and the server's numbers as ratios of the in-process ones.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np

from convserve.contract import MODEL_FILE, ModelCard, normalize, version_dir, versions

from .client import build_request, wait_until_ready
from .proto import grpc_service_pb2 as pb
from .proto import grpc_service_pb2_grpc as pb_grpc
from .runtime import ModelRuntime
from .settings import Settings


@dataclass
class Measurement:
    images: int
    seconds: float
    latencies_ms: list[float]
    mean_batch: float = 1.0  # server only: mean size of the batches its requests ran in

    @property
    def throughput(self) -> float:
        return self.images / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def in_process(runtime: ModelRuntime, x: np.ndarray, outputs: list[str], clients: int, seconds: float) -> Measurement:
    """`clients` threads, each running session.run on its own request until time is up."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def loop():
        mine = []
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            runtime.run(x, outputs)
            mine.append((time.perf_counter() - started) * 1000)
        with lock:
            latencies.extend(mine)

    runtime.run(x, outputs)  # warm
    started = time.perf_counter()
    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Measurement(len(latencies) * x.shape[0], time.perf_counter() - started, latencies)


async def _over_grpc(url: str, request: pb.ModelInferRequest, clients: int, seconds: float) -> Measurement:
    latencies: list[float] = []
    batch_sizes: list[int] = []
    async with grpc.aio.insecure_channel(url, options=[("grpc.max_receive_message_length", 1 << 30)]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(request)  # warm
        stop_at = time.perf_counter() + seconds

        async def loop():
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                response = await stub.ModelInfer(request)
                latencies.append((time.perf_counter() - started) * 1000)
                batch_sizes.append(response.parameters["batch_size"].int64_param)

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    images = len(latencies) * request.inputs[0].shape[0]
    return Measurement(images, elapsed, latencies, statistics.fmean(batch_sizes) if batch_sizes else 0.0)


def run(
    repository: str,
    model: str,
    clients_list: list[int],
    seconds: float,
    kind: str = "input",
    feature_maps: list[str] | None = None,
    fp16: bool = False,
    server_args: list[str] | None = None,
) -> list[dict]:
    folder = version_dir(repository, model, versions(os.path.join(repository, model))[-1])
    spec = ModelCard.read(folder).preprocess
    c, h, w = spec.input_shape
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, c), dtype=np.uint8)
    x = normalize(pixels[None], spec)  # (1, C, H, W): the tensor the server makes of the same image
    outputs = ["logits", "probabilities", *(feature_maps or [])]
    half = (feature_maps or []) if fp16 else []
    if kind == "image":
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(pixels[:, :, 0] if c == 1 else pixels).save(buffer, format="PNG")
        request = build_request(model, images=[buffer.getvalue()], outputs=outputs, fp16=half)
    else:
        request = build_request(model, array=x, outputs=outputs, fp16=half)

    runtime = ModelRuntime(os.path.join(folder, MODEL_FILE), Settings())
    rows = []
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "convserve",
            "serve",
            "--repository",
            repository,
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(port),
            "--metrics-port",
            "0",
            "--log-level",
            "WARNING",
            *(server_args or []),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until_ready(f"127.0.0.1:{port}", server)
        for clients in clients_list:
            local = in_process(runtime, x, outputs, clients, seconds)
            remote = asyncio.run(_over_grpc(f"127.0.0.1:{port}", request, clients, seconds))
            rows.append(
                {
                    "clients": clients,
                    "input": kind,
                    "outputs": outputs,
                    "in_process_images_per_s": local.throughput,
                    "server_images_per_s": remote.throughput,
                    "throughput_ratio": remote.throughput / local.throughput,
                    "in_process_p50_ms": local.percentile(0.5),
                    "server_p50_ms": remote.percentile(0.5),
                    "in_process_p99_ms": local.percentile(0.99),
                    "server_p99_ms": remote.percentile(0.99),
                    "added_p50_ms": remote.percentile(0.5) - local.percentile(0.5),
                    "server_mean_batch": remote.mean_batch,
                    "provider": runtime.execution_provider,
                }
            )
    finally:
        server.terminate()
        server.wait(60)
    return rows


def format_rows(rows: list[dict]) -> str:
    header = (
        f"{'clients':>7} {'input':>6} {'in-proc img/s':>14} {'server img/s':>13} {'ratio':>6} "
        f"{'in-proc p50 ms':>15} {'server p50 ms':>14} {'added ms':>9} {'server p99 ms':>14} {'mean batch':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['clients']:>7} {r['input']:>6} {r['in_process_images_per_s']:>14.1f} "
            f"{r['server_images_per_s']:>13.1f} {r['throughput_ratio']:>6.2f} {r['in_process_p50_ms']:>15.2f} "
            f"{r['server_p50_ms']:>14.2f} {r['added_p50_ms']:>9.2f} {r['server_p99_ms']:>14.2f} "
            f"{r['server_mean_batch']:>10.1f}"
        )
    if rows:
        lines.append(f"provider: {rows[0]['provider']}; outputs: {', '.join(rows[0]['outputs'])}")
    return "\n".join(lines)
