"""Benchmark: the server against the limit in-process onnxruntime sets on the same model, in one run.

    convserve export --arch alexnet --random-init --repository /tmp/bench --name alexnet
    convserve bench --repository /tmp/bench --model alexnet --clients 1,4,16,64 --seconds 5 --json-out b.json

First the limit: in-process onnxruntime (one session made as the server makes it, one thread, as the
server's one instance) at batch sizes 1, 2, 4 ... max_batch_size, for the output sets the cases ask
for: its best-batch throughput and its batch-1 latency. Then a real `convserve serve` process under
that many concurrent asyncio gRPC callers, one image per request, for each case:

    input        FP32 `input` over the wire, logits and probabilities back
    image        the same image as a PNG (`image`), decoded by the server
    fmaps        `input`, plus every conv feature map in FP32
    fmaps-fp16   the same, feature maps in FP16
    shm          input and outputs in system shared memory (one region pair per client)
    shm-fmaps    the same, with every feature map
    http         `input` over V2 HTTP/REST, tensors in Triton's binary extension (perf_analyzer -i http)
    http-json    the same with JSON tensors both ways

Every server figure is printed as a ratio of the limit: throughput / in-process best-batch
throughput, and p50 latency - in-process batch-1 latency. The server serves the model's newest
version; with `--baseline-version N` (an FP32 version beside an INT8 one, say) the in-process limit of
version N is measured too, and each row also gives its throughput as × that limit. Client and server share the machine's
cores: compare ratios from one run, not absolute numbers across runs.

The load comes from perf_analyzer (C++, in tritonclient[grpc]'s wheel: `bin/perf_analyzer`) where it
runs, for the cases it can send (input, image, and the http ones, which need it); a Python client is
itself the ceiling on a few cores.
It needs two libraries: Debian's `libb64-0d`, and `libcudart.so.12` from `pip install
nvidia-cuda-runtime-cu12` (found in that package without setting LD_LIBRARY_PATH). Without them, and
for the feature-map and shared-memory cases, an asyncio gRPC client in this process sends the load.

Each row also gives the server's CPU per request: the CPU time of its whole process tree (supervisor,
engine, front-ends) over the requests it answered, and that less in-process onnxruntime's CPU per image
at its best batch: what serving costs beyond the model. With `--frontends 1,2,4` every case runs
against a server with each front-end count.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any

import grpc
import numpy as np

from convserve.client import build_request, channel_options, wait_until_ready
from convserve.contract import DEFAULT_OUTPUTS, MODEL_FILE, ModelCard, normalize, version_dir, versions
from convserve.ports import free_ports
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc
from convserve.sessions import SessionSettings, open_session
from convserve.wire import ShmRef, serialize_bytes

CASES = ("input", "image", "fmaps", "fmaps-fp16", "shm", "shm-fmaps", "http", "http-json")
# perf_analyzer over V2 HTTP/REST: Triton's binary tensor extension (its default), or JSON tensors
_HTTP_FORMATS = {"http": "binary", "http-json": "json"}
_DEFAULT_OUTPUTS = list(DEFAULT_OUTPUTS)
# the largest batch measured in-process, and the server's --max-batch-size here (its default too)
MAX_BATCH_SIZE = 32


@dataclass
class Measurement:
    images: int
    seconds: float
    latencies_ms: list[float]
    batch_sizes: list[int] = field(default_factory=list)  # server only: the batches its requests ran in
    quantiles: dict[float, float] = field(default_factory=dict)  # what perf_analyzer reports instead

    @property
    def throughput(self) -> float:
        return self.images / self.seconds

    def percentile(self, q: float) -> float:
        if q in self.quantiles:
            return self.quantiles[q]
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class Limit:
    """What in-process onnxruntime does alone with one output set."""

    best_batch: int
    best_images_per_s: float
    batch1_p50_ms: float
    images_per_s_by_batch: dict[int, float]
    best_cpu_ms_per_image: float = 0.0  # process CPU time per image at the best batch


def in_process_limit(session: Any, x: np.ndarray, outputs: list[str], max_batch: int, seconds: float) -> Limit:
    """Run batches of 1, 2, 4 ... max_batch copies of x (1, C, H, W) back to back, seconds/steps each."""
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_batch]
    by_batch, cpu_by_batch, batch1_ms = {}, {}, float("nan")
    for size in sizes:
        batch = np.ascontiguousarray(np.repeat(x, size, axis=0))
        feed = {session.get_inputs()[0].name: batch}
        session.run(outputs, feed)  # warm
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds / len(sizes)
        cpu_started = time.process_time()
        while time.perf_counter() < stop_at or len(latencies) < 3:
            started = time.perf_counter()
            session.run(outputs, feed)
            latencies.append(time.perf_counter() - started)
        cpu_by_batch[size] = (time.process_time() - cpu_started) * 1000 / (size * len(latencies))
        by_batch[size] = size / statistics.fmean(latencies)
        if size == 1:
            batch1_ms = statistics.median(latencies) * 1000
    best = max(by_batch, key=by_batch.__getitem__)
    return Limit(best, by_batch[best], batch1_ms, by_batch, cpu_by_batch[best])


# ---- the server's CPU -------------------------------------------------------------------------------


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (Linux /proc)."""
    total, ticks = 0.0, os.sysconf("SC_CLK_TCK")
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    pending += [int(child) for child in handle.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _answered(url: str, model: str) -> int:
    """Requests the server has answered for `model` (ModelStatistics: the engine counts all front-ends)."""
    with grpc.insecure_channel(url) as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=10
        )
    return sum(m.inference_stats.success.count for m in stats.model_stats)


# ---- perf_analyzer ----------------------------------------------------------------------------------


def perf_analyzer() -> tuple[str, dict[str, str]] | None:
    """(path, environment) of a perf_analyzer that starts here, or None."""
    path = shutil.which("perf_analyzer") or os.path.join(os.path.dirname(sys.executable), "perf_analyzer")
    if not os.path.exists(path):
        return None
    env = dict(os.environ)
    # libcudart.so.12 from the pip package nvidia-cuda-runtime-cu12, where it is installed (optional:
    # a benchmark tool's library, not a dependency of the server)
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        lib = os.path.join(next(iter(spec.submodule_search_locations)), "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH", "")) if p)
    try:
        probe = subprocess.run([path, "--help"], capture_output=True, text=True, env=env, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if "error while loading shared libraries" in probe.stderr:
        return None
    return path, env


_PA_LINE = re.compile(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec, latency (\d+) usec")


def _over_perf_analyzer(
    tool: tuple[str, dict[str, str]],
    url: str,
    model: str,
    data: dict,
    clients: int,
    seconds: float,
    http_format: str = "",
) -> Measurement:
    """perf_analyzer at `clients` concurrent requests (over gRPC, or over HTTP with tensors in
    `http_format`); its p50 latency, its throughput."""
    path, env = tool
    with tempfile.TemporaryDirectory() as folder:
        data_file = os.path.join(folder, "input.json")
        with open(data_file, "w") as handle:
            json.dump({"data": [data]}, handle)
        command = [
            path,
            "-m",
            model,
            "-u",
            url,
            *(
                ["-i", "http", "--input-tensor-format", http_format, "--output-tensor-format", http_format]
                if http_format
                else ["-i", "grpc"]
            ),
            "--concurrency-range",
            str(clients),
            "--input-data",
            data_file,
            "--measurement-interval",
            str(int(seconds * 1000)),
            "--percentile",
            "50",
            # perf_analyzer measures window after window until three agree within the stability
            # percentage: a noisy machine needs more than its default 10 windows. A short run (under
            # 5 s a window) is a look, not a figure to publish: 3 to 6 windows that agree within 50 %.
            "--max-trials",
            "20" if seconds >= 5 else "6",
            "--stability-percentage",
            "10" if seconds >= 5 else "50",
            "--max-threads",
            str(max(4, min(clients, 16))),
        ]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds * 22 + 120)
    found = _PA_LINE.search(result.stdout)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"perf_analyzer failed: {(result.stdout + result.stderr)[-2000:]}")
    throughput, p50_ms = float(found.group(2)), int(found.group(3)) / 1000
    p99 = re.search(r"p99 latency: (\d+) usec", result.stdout)
    quantiles = {0.5: p50_ms, 0.99: int(p99.group(1)) / 1000 if p99 else float("nan")}
    return Measurement(int(throughput * seconds), seconds, [], [], quantiles)


async def _over_grpc(url: str, requests: Sequence[pb.ModelInferRequest], seconds: float) -> Measurement:
    """One caller per request (each sends its own request again and again) until time is up."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    options = channel_options(1 << 30)
    async with grpc.aio.insecure_channel(url, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await asyncio.gather(*(stub.ModelInfer(r) for r in requests))  # warm, and check each works
        stop_at = time.perf_counter() + seconds

        async def loop(request):
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                response = await stub.ModelInfer(request)
                latencies.append((time.perf_counter() - started) * 1000)
                batch_sizes.append(response.parameters["batch_size"].int64_param)

        started = time.perf_counter()
        await asyncio.gather(*(loop(r) for r in requests))
        elapsed = time.perf_counter() - started
    images = len(latencies) * requests[0].inputs[0].shape[0]
    return Measurement(images, elapsed, latencies, batch_sizes)


class _ShmPairs:
    """Per client, an input region (holding x) and an output region, created and registered on the server."""

    def __init__(self, url: str, x: np.ndarray, output_bytes: dict[str, int]) -> None:
        self._url, self._x, self._output_bytes = url, x, output_bytes
        self._blocks: list[shared_memory.SharedMemory] = []
        self._names: list[str] = []

    def requests(self, model: str, outputs: list[str], clients: int) -> list[pb.ModelInferRequest]:
        made = []
        with grpc.insecure_channel(self._url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(clients):
                tag = uuid.uuid4().hex[:12]
                size_out = sum(self._output_bytes[n] for n in outputs)
                block_in = self._block(f"cs_bench_in_{tag}", self._x.nbytes)
                block_in.buf[: self._x.nbytes] = self._x.tobytes()  # type: ignore[index]
                block_out = self._block(f"cs_bench_out_{tag}", size_out)
                for block in (block_in, block_out):
                    stub.SystemSharedMemoryRegister(
                        pb.SystemSharedMemoryRegisterRequest(
                            name=block.name, key="/" + block.name, byte_size=block.size
                        )
                    )
                    self._names.append(block.name)
                offset, windows = 0, {}
                for name in outputs:
                    windows[name] = ShmRef(block_out.name, self._output_bytes[name], offset)
                    offset += self._output_bytes[name]
                made.append(
                    build_request(
                        model,
                        input_shm=(ShmRef(block_in.name, self._x.nbytes), self._x.shape),
                        outputs=outputs,
                        output_shm=windows,
                    )
                )
        return made

    def _block(self, name: str, size: int) -> shared_memory.SharedMemory:
        block = shared_memory.SharedMemory(name=name, create=True, size=size)
        self._blocks.append(block)
        return block

    def close(self) -> None:
        try:
            with grpc.insecure_channel(self._url) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for name in self._names:
                    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=name), timeout=5)
        except grpc.RpcError:
            pass  # the server is gone: it forgot them anyway
        for block in self._blocks:
            block.close()
            block.unlink()


def run(
    repository: str,
    model: str,
    clients_list: list[int],
    seconds: float,
    cases: Sequence[str] = CASES,
    server_args: Sequence[str] = (),
    progress: Callable[[str], None] = lambda line: None,
    frontends_list: Sequence[int] = (1,),
    driver: str = "auto",
    baseline_version: int | None = None,
) -> dict:
    """Measure; returns {"model", "provider", "limits": {output set: Limit}, "rows": [...]}."""
    folder = version_dir(repository, model, versions(os.path.join(repository, model))[-1])
    card = ModelCard.read(folder)
    baseline_card = None
    if baseline_version is not None:
        baseline_folder = version_dir(repository, model, baseline_version)
        baseline_card = ModelCard.read(baseline_folder)
    spec = card.preprocess
    c, h, w = spec.input_shape
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, c), dtype=np.uint8)
    x = normalize(pixels[None], spec)  # (1, C, H, W): the tensor the server makes of the same image
    buffer = io.BytesIO()
    from PIL import Image

    Image.fromarray(pixels[:, :, 0] if c == 1 else pixels).save(buffer, format="PNG")
    png = buffer.getvalue()
    fmaps = [*_DEFAULT_OUTPUTS, *card.feature_map_names]
    # the session `convserve serve` opens with its defaults (the server below runs with them, and with
    # MAX_BATCH_SIZE, which is its default too)
    session = open_session(os.path.join(folder, MODEL_FILE), SessionSettings())
    output_sets = {"logits": _DEFAULT_OUTPUTS, "fmaps": fmaps}
    tool = perf_analyzer() if driver != "python" else None
    if driver == "perf_analyzer" and tool is None:
        raise RuntimeError("perf_analyzer does not start here: see `convserve bench --help` for its two libraries")
    by_pa = {"input", "image", *_HTTP_FORMATS} if tool is not None else set()
    if tool is None and set(cases) & set(_HTTP_FORMATS):
        raise RuntimeError("the http cases are driven by perf_analyzer, which does not start here")

    def output_set(case: str) -> str:
        # perf_analyzer asks for every output the model declares: all five feature maps come back, so
        # its rows are measured against in-process onnxruntime computing the same outputs
        return "fmaps" if "fmaps" in case or case in by_pa else "logits"

    wanted_sets = {output_set(case) for case in cases}
    limits = {}
    spent = {"in-process limits": 0.0, "server starts": 0.0, "measurements": 0.0}  # where the time goes
    for key in sorted(wanted_sets):
        progress(f"in-process limit for {key} ...")
        started = time.perf_counter()
        limits[key] = in_process_limit(session, x, output_sets[key], MAX_BATCH_SIZE, seconds)
        spent["in-process limits"] += time.perf_counter() - started
    provider = session.get_providers()[0]
    del session  # its threads would compete with the server's
    baseline_limits = {}
    if baseline_card is not None:
        baseline = open_session(os.path.join(baseline_folder, MODEL_FILE), SessionSettings())
        for key in sorted(wanted_sets):
            progress(f"in-process limit of version {baseline_version} ({baseline_card.precision}) for {key} ...")
            started = time.perf_counter()
            baseline_limits[key] = in_process_limit(baseline, x, output_sets[key], MAX_BATCH_SIZE, seconds)
            spent["in-process limits"] += time.perf_counter() - started
        del baseline

    output_bytes = {o.name: 4 * int(np.prod(o.shape[1:])) for o in card.outputs}
    pa_data = {
        "input": {"input": {"content": x[0].ravel().tolist(), "shape": list(x.shape[1:])}},
        # perf_analyzer sends a "b64" value's bytes as the tensor's raw contents: the BYTES framing
        "image": {"image": {"b64": base64.b64encode(serialize_bytes([png])).decode(), "shape": [1]}},
    }
    for case in _HTTP_FORMATS:
        pa_data[case] = pa_data["input"]
    rows = []
    for frontends in frontends_list:
        port, http_port = free_ports(2)
        url = f"127.0.0.1:{port}"
        started = time.perf_counter()
        server = _start_server(
            repository, port, ["--frontends", str(frontends), "--http-port", str(http_port), *server_args]
        )
        try:
            wait_until_ready(url, server)
            spent["server starts"] += time.perf_counter() - started
            progress(f"server with {_plural(frontends, 'front-end')} ready in {time.perf_counter() - started:.1f} s")
            for case in cases:
                outputs = fmaps if output_set(case) == "fmaps" else _DEFAULT_OUTPUTS
                limit = limits[output_set(case)]
                for clients in clients_list:
                    by = "perf_analyzer" if case in by_pa else "python"
                    progress(f"server ({_plural(frontends, 'front-end')}): {case}, {clients} clients, {by} ...")
                    started = time.perf_counter()
                    answered, cpu = _answered(url, model), tree_cpu_seconds(server.pid)
                    try:
                        if by == "perf_analyzer":
                            assert tool is not None
                            http_format = _HTTP_FORMATS.get(case, "")
                            target = f"127.0.0.1:{http_port}" if http_format else url
                            measured = _over_perf_analyzer(
                                tool, target, model, pa_data[case], clients, seconds, http_format
                            )
                        else:
                            measured = _over_python(
                                url, model, case, clients, seconds, x, png, outputs, output_bytes, card
                            )
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:  # one row lost, not the run
                        progress(f"  failed: {str(exc).splitlines()[0][:200]}")
                        measured = Measurement(0, seconds, [], [], {0.5: float("nan"), 0.99: float("nan")})
                    cpu = tree_cpu_seconds(server.pid) - cpu
                    answered = _answered(url, model) - answered
                    took = time.perf_counter() - started
                    spent["measurements"] += took
                    progress(f"  {took:.1f} s (windows of {seconds:g} s until they agree)")
                    cpu_ms = cpu * 1000 / answered if answered else float("nan")
                    batches = measured.batch_sizes
                    rows.append(
                        {
                            "frontends": frontends,
                            "case": case,
                            "clients": clients,
                            "driver": by,
                            "outputs": outputs,
                            "server_images_per_s": measured.throughput,
                            "throughput_ratio": measured.throughput / limit.best_images_per_s,
                            **(
                                {
                                    "throughput_vs_baseline": measured.throughput
                                    / baseline_limits[output_set(case)].best_images_per_s
                                }
                                if baseline_limits
                                else {}
                            ),
                            "server_p50_ms": measured.percentile(0.5),
                            "server_p99_ms": measured.percentile(0.99),
                            "added_p50_ms": measured.percentile(0.5) - limit.batch1_p50_ms,
                            "latency_ratio": measured.percentile(0.5) / limit.batch1_p50_ms,
                            "server_mean_batch": statistics.fmean(batches) if batches else 0.0,
                            "requests": answered,
                            "server_cpu_ms_per_request": cpu_ms,
                            "beyond_model_cpu_ms": cpu_ms - limit.best_cpu_ms_per_image,
                        }
                    )
        finally:
            server.terminate()
            server.wait(60)
    return {
        "model": model,
        "version": card.version,
        "precision": card.precision,
        "provider": provider,
        "seconds": seconds,
        "limits": {k: vars(v) for k, v in limits.items()},
        **(
            {
                "baseline": {
                    "version": baseline_version,
                    "precision": baseline_card.precision,
                    "limits": {k: vars(v) for k, v in baseline_limits.items()},
                }
            }
            if baseline_card is not None
            else {}
        ),
        "driver": "perf_analyzer" if tool is not None else "python",
        "rows": rows,
        "spent_seconds": spent,
    }


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _start_server(repository: str, port: int, args: Sequence[str]) -> subprocess.Popen:
    return subprocess.Popen(
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
            "--http-port",
            "0",  # unless `args` asks for it
            "--log-level",
            "WARNING",
            "--max-batch-size",
            str(MAX_BATCH_SIZE),
            *args,
        ],
        stdout=subprocess.DEVNULL,
    )


def _over_python(
    url: str,
    model: str,
    case: str,
    clients: int,
    seconds: float,
    x: np.ndarray,
    png: bytes,
    outputs: list[str],
    output_bytes: dict[str, int],
    card: ModelCard,
) -> Measurement:
    pairs = _ShmPairs(url, x, output_bytes) if case.startswith("shm") else None
    try:
        if pairs is not None:
            requests = pairs.requests(model, outputs, clients)
        else:
            half = card.feature_map_names if case == "fmaps-fp16" else ()
            one = (
                build_request(model, images=[png], outputs=outputs)
                if case == "image"
                else build_request(model, array=x, outputs=outputs, fp16=half)
            )
            requests = [one] * clients
        return asyncio.run(_over_grpc(url, requests, seconds))
    finally:
        if pairs is not None:
            pairs.close()


def format_report(report: dict) -> str:
    title = f"model {report['model']} version {report.get('version', '?')} ({report.get('precision', 'fp32')})"
    lines = [f"{title} on {report['provider']}; in-process limits (one thread, back-to-back runs):"]
    baseline = report.get("baseline")
    sources = [("", report["limits"])]
    if baseline:
        sources.append((f"version {baseline['version']} ({baseline['precision']}): ", baseline["limits"]))
    for prefix, limits in sources:
        for key, limit in limits.items():
            by_batch = ", ".join(f"b{b}: {v:.0f}" for b, v in limit["images_per_s_by_batch"].items())
            lines.append(
                f"  {prefix}{key:<7} best batch {limit['best_batch']:>3}: {limit['best_images_per_s']:8.1f} img/s; "
                f"batch 1 p50 {limit['batch1_p50_ms']:.2f} ms; CPU {limit['best_cpu_ms_per_image']:.3f} ms per "
                f"image at the best batch   ({by_batch})"
            )
    against = f"× v{baseline['version']} {baseline['precision']}" if baseline else ""
    header = (
        f"{'fe':>2} {'case':<11} {'clients':>7} {'driver':<13} {'server img/s':>13} {'× best batch':>13} "
        + (f"{against:>14} " if baseline else "")
        + f"{'p50 ms':>8} {'p50 - b1 ms':>12} {'p99 ms':>8} {'CPU ms/req':>10} {'beyond model':>12}"
    )
    lines += ["", header, "-" * len(header)]
    for r in report["rows"]:
        lines.append(
            f"{r['frontends']:>2} {r['case']:<11} {r['clients']:>7} {r['driver']:<13} "
            f"{r['server_images_per_s']:>13.1f} {r['throughput_ratio']:>13.2f} "
            + (f"{r['throughput_vs_baseline']:>14.2f} " if baseline else "")
            + f"{r['server_p50_ms']:>8.2f} {r['added_p50_ms']:>+12.2f} {r['server_p99_ms']:>8.2f} "
            f"{r['server_cpu_ms_per_request']:>10.3f} {r['beyond_model_cpu_ms']:>12.3f}"
        )
    spent = report.get("spent_seconds")
    if spent:
        parts = ", ".join(f"{what} {seconds:.0f} s" for what, seconds in spent.items())
        lines += ["", f"time: {sum(spent.values()):.0f} s ({parts})"]
    return "\n".join(lines)
