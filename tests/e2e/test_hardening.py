"""What a careless or hostile client sends cannot stall, bloat or fool the server: image bombs,
claims of millions of elements, stray version folders and strings; and the signals a daemon
answers to (SIGHUP rescans, a second SIGINT stops at once)."""

import io
import os
import shutil
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from convserve.client import Client, build_request
from convserve.models.export import export_checkpoint
from convserve.proto import grpc_service_pb2 as pb
from convserve.wire import serialize_bytes

from .conftest import InProcessServer, RunningServer, repository_index

X = np.zeros((1, 1, 32, 32), np.float32)


def _encoded(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _code(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


class HealthWatch:
    """Checks health every 20 ms on its own channel, while a test sends the bad request."""

    def __init__(self, url):
        self.url, self.worst_ms, self._stop = url, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        with grpc.insecure_channel(self.url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set():
                started = time.perf_counter()
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                self.worst_ms = max(self.worst_ms, (time.perf_counter() - started) * 1000)
                time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(20)


def test_image_bombs_and_other_formats_are_refused_from_their_headers(server):
    bomb = _encoded(Image.new("L", (13000, 13000)), "PNG")  # 169 M pixels in a few hundred KB
    webp = _encoded(Image.new("L", (32, 32)), "WEBP", lossless=True)
    with Client(server.url) as client, HealthWatch(server.url) as health:
        rss_before = _rss_bytes(server.process.pid)
        started = time.perf_counter()
        for _ in range(5):
            code, details = _code(lambda: client.infer("digits", images=[bomb] * 3))
        elapsed = time.perf_counter() - started
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "13000x13000 pixels" in details, details
        assert elapsed < 5.0, elapsed
        # decoded, one bomb is 169 MB: refused from its header, the server grows by no more than noise
        assert _rss_bytes(server.process.pid) - rss_before < 30 * 1024 * 1024
        code, details = _code(lambda: client.infer("digits", images=[webp]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "PNG or JPEG" in details, details
        assert client.infer("digits", images=[_encoded(Image.new("L", (8, 8), 200), "PNG")]).outputs
    assert health.worst_ms < 500, health.worst_ms
    refused = _refusals(server)
    assert refused["image_pixels"] >= 1 and refused["image_format"] >= 1, refused


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        line = next(line for line in handle if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def _refusals(server) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    prefix = 'convserve_refusals_total{limit="'
    return {
        line[len(prefix) :].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def test_claims_of_millions_of_elements_are_refused_before_any_unpacking(server):
    claim = pb.ModelInferRequest(model_name="digits")
    claim.inputs.add(name="image", datatype="BYTES", shape=[10_000_000])
    claim.raw_input_contents.append(b"")
    hidden = pb.ModelInferRequest(model_name="digits")  # a batch of one that holds a million
    hidden.inputs.add(name="image", datatype="BYTES", shape=[1])
    # built before the health watch starts: building it holds this process's GIL for a while
    hidden.raw_input_contents.append(serialize_bytes([b""] * 1_000_000))
    # more than the message limit derived from the digits model (about 6 MB): refused by gRPC itself
    oversize = pb.ModelInferRequest(model_name="digits")
    oversize.inputs.add(name="input", datatype="FP32", shape=[32, 1, 8, 8])
    oversize.raw_input_contents.append(bytes(8 * 1024 * 1024))
    with Client(server.url) as client, HealthWatch(server.url) as health:
        code, details = _code(lambda: client.stub.ModelInfer(claim, timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "exceeds max_batch_size" in details
        started = time.perf_counter()
        code, details = _code(lambda: client.stub.ModelInfer(hidden, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "more than 1 elements" in details, details
        assert time.perf_counter() - started < 5
        code, details = _code(lambda: client.stub.ModelInfer(oversize, timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        assert client.infer("digits", array=X).outputs
    assert health.worst_ms < 500, health.worst_ms
    assert _refusals(server)["batch_size"] >= 1


def test_version_folders_and_strings_are_ascii_digits_only(own_repository):
    (own_repository / "digits" / "²").mkdir()  # isdigit() is true, int() fails
    (own_repository / "digits" / "١").mkdir()  # Arabic-Indic one: int() gives 1
    (own_repository / "bad name").mkdir()
    server = RunningServer(own_repository, "--poll-interval", "0.2")
    try:
        with Client(server.url) as client:
            assert set(repository_index(client)) == {("digits", "1")}
            time.sleep(1.0)  # several rescans: each stray folder is still logged once
            for version in ("²", "١", "01", "1.0", "-1"):
                request = build_request("digits", array=X, version=version)
                code, _ = _code(lambda r=request: client.stub.ModelInfer(r))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (version, code)
            assert client.infer("digits", array=X, version="1").model_version == "1"
    finally:
        assert server.stop() == 0, server.output()
    log = server.output()
    for stray in ("'bad name'", "'digits/²'", "'digits/١'"):
        assert log.count(f"ignoring {stray}") == 1, log


def test_failed_versions_are_retried_when_fixed_and_forgotten_when_removed(trained, own_repository):
    result, _ = trained
    version2 = own_repository / "digits" / "2"
    export_checkpoint(result.checkpoint, repository=str(own_repository), name="digits")
    os.chmod(version2 / "model.onnx", 0)  # unreadable: refused
    server = RunningServer(own_repository, "--poll-interval", "0.3")
    try:
        with Client(server.url) as client:
            if os.geteuid() != 0:  # root reads anything: chmod cannot break it there
                assert repository_index(client)[("digits", "2")][0] == "UNAVAILABLE"
            os.chmod(version2 / "model.onnx", 0o644)  # fixed by chmod alone: retried
            deadline = time.monotonic() + 20
            while client.infer("digits", array=X).model_version != "2" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.infer("digits", array=X).model_version == "2"
            broken = own_repository / "digits" / "3"
            broken.mkdir()
            (broken / "model.json").write_text("{not json")
            deadline = time.monotonic() + 20
            while ("digits", "3") not in repository_index(client) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert repository_index(client)[("digits", "3")][0] == "UNAVAILABLE"
            shutil.rmtree(broken)  # removed: it leaves the index
            deadline = time.monotonic() + 20
            while ("digits", "3") in repository_index(client) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert ("digits", "3") not in repository_index(client)
    finally:
        assert server.stop() == 0, server.output()


def test_sighup_rescans_and_a_second_sigint_stops_at_once(trained, own_repository):
    result, _ = trained
    server = RunningServer(own_repository, "--grace-period", "60")  # no polling: only SIGHUP rescans
    try:
        with Client(server.url) as client:
            export_checkpoint(result.checkpoint, repository=str(own_repository), name="digits")
            assert client.infer("digits", array=X).model_version == "1"
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while client.infer("digits", array=X).model_version != "2" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.infer("digits", array=X).model_version == "2" and server.process.poll() is None
            # an idle stream would hold the process for the whole grace period
            idle = threading.Event()

            def requests():
                idle.wait(120)
                yield from ()

            stream = client.stub.ModelStreamInfer(requests())  # opens the stream; sends nothing
            time.sleep(0.5)
            server.process.send_signal(signal.SIGINT)
            time.sleep(1.0)
            assert server.process.poll() is None  # draining: the stream is still open
            started = time.monotonic()
            server.process.send_signal(signal.SIGINT)
            server.process.wait(15)
            assert time.monotonic() - started < 10
            idle.set()
            stream.cancel()
    finally:
        server.stop()


def test_an_undecodable_stream_message_ends_the_stream_with_a_status(server):
    with grpc.insecure_channel(server.url) as channel:
        raw = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        good = build_request("digits", array=X).SerializeToString()
        started = time.perf_counter()
        call = raw(iter([good, b"\xff\xff\xff\xff not a protobuf"]), timeout=30)
        answers = []
        with pytest.raises(grpc.RpcError) as info:
            for answer in call:
                answers.append(answer)
        assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL), info.value
        assert time.perf_counter() - started < 10  # not held until the deadline
    with Client(server.url) as client:
        assert client.infer("digits", array=X).outputs


def test_an_exporter_killed_mid_write_leaves_nothing_half_loadable(own_repository):
    import hashlib
    import subprocess
    import sys

    from convserve.contract import ModelCard, versions

    # SIGKILL the exporter exactly mid-write: after its n-th fsync (model.onnx written, then model.json,
    # then the staging folder), before the rename that publishes the version; no cleanup can run.
    kill_after_fsync = """
import os, runpy, signal, sys
calls, limit, fsync = [0], int(sys.argv.pop(1)), os.fsync
def fsync_then_die(fd):
    fsync(fd)
    calls[0] += 1
    if calls[0] == limit:
        os.kill(os.getpid(), signal.SIGKILL)
os.fsync = fsync_then_die
sys.argv[0] = "convserve"
runpy.run_module("convserve", run_name="__main__")
"""
    for limit in (1, 2, 3):
        exporter = subprocess.run(
            [
                sys.executable,
                "-c",
                kill_after_fsync,
                str(limit),
                "export",
                "--arch",
                "alexnet_small",
                "--random-init",
                "--input",
                "1x32x32",
                "--repository",
                str(own_repository),
                "--name",
                "killed",
            ],
            capture_output=True,
            timeout=300,
        )
        assert exporter.returncode == -9, exporter.stderr[-2000:]
    left = sorted(p.name for p in own_repository.iterdir() if p.name.startswith(".tmp-killed"))
    assert len(left) == 3, left  # three half-written staging folders, as a crash leaves them
    for version in versions(str(own_repository / "killed")):  # what was renamed into place is whole
        folder = own_repository / "killed" / str(version)
        card = ModelCard.read(str(folder))
        assert hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest() == card.sha256
    server = InProcessServer(own_repository)
    try:
        with Client(server.url) as client:
            rows = repository_index(client)
            assert all(state == "READY" for (name, _), (state, _) in rows.items() if name == "killed"), rows
            assert not any(name.startswith(".") for name, _ in rows)  # staging folders are never models
            assert client.infer("digits", array=X).outputs
    finally:
        assert server.stop() == 0, server.output()


def _finish_order(url: str) -> list[str]:
    """A slow request (32 JPEGs of 1024² to decode) then a fast one, on one connection: which ends first."""
    pattern = np.add.outer(np.arange(1024), np.arange(1024)) % 251
    slow = build_request("digits", images=[_encoded(Image.fromarray(pattern.astype(np.uint8)), "JPEG")] * 32)
    fast = build_request("digits", array=X)
    done: list[str] = []
    with Client(url) as client:
        first = client.stub.ModelInfer.future(slow, timeout=60)
        first.add_done_callback(lambda f: done.append("slow"))
        time.sleep(0.05)
        second = client.stub.ModelInfer.future(fast, timeout=60)
        second.add_done_callback(lambda f: done.append("fast"))
        assert first.result().outputs and second.result().outputs
    return done


def test_a_connection_has_a_bounded_number_of_calls_in_progress(server, own_repository):
    # by default a connection runs many calls at once: the fast one overtakes the slow one
    assert _finish_order(server.url) == ["fast", "slow"]
    limited = RunningServer(own_repository, "--max-streams-per-connection", "1")
    try:
        # one at a time: the second waits at the client (HTTP/2 max concurrent streams), costing the server nothing
        assert _finish_order(limited.url) == ["slow", "fast"]
    finally:
        assert limited.stop() == 0, limited.output()
