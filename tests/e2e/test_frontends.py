"""One engine, N front-ends on one port: they all serve, answer control calls as one server, batch
together, and survive each other's deaths."""

import contextlib
import os
import re
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
from multiprocessing import shared_memory

import grpc
import numpy as np
import pytest

from convserve.client import build_request
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc
from convserve.wire import ShmRef

from .conftest import RunningServer

X = np.zeros((1, 1, 32, 32), np.float32)


def _channels_on_each_frontend(url: str, count: int, tries: int = 200) -> dict[str, grpc.Channel]:
    """One channel per front-end (a new connection each time: the kernel spreads connections)."""
    found: dict[str, grpc.Channel] = {}
    for _ in range(tries):
        channel = grpc.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)])
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ModelStatistics.with_call(pb.ModelStatisticsRequest(name="digits"))
        identity = dict(call.trailing_metadata())["convserve-frontend"]
        if identity in found:
            channel.close()
        else:
            found[identity] = channel
        if len(found) == count:
            return found
    raise AssertionError(f"only reached front-ends {sorted(found)}")


# a channel of its own connection: gRPC otherwise shares one with any channel of this process to the
# same address, and a "fresh" probe would ride an old connection
FRESH = [("grpc.use_local_subchannel_pool", 1)]


def _pids(server: RunningServer, frontends: int = 0) -> dict[str, int]:
    """The engine's and each front-end's pid, as the log names them (the latest of each). With
    `frontends`, waits (up to 30 s) until the log names that many: the server answers ready through
    the first front-end that connects, before the other's line may be written."""
    deadline = time.monotonic() + 30
    while True:
        text = open(server.log_path).read()
        pids = {"engine": int(re.findall(r"engine pid (\d+) ready", text)[-1])}
        for index, pid in re.findall(r"front-end (\d+) \(pid (\d+)\) connected", text):
            pids[f"frontend-{index}"] = int(pid)
        if all(f"frontend-{i}" in pids for i in range(frontends)) or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet is dead: it holds no socket)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in handle)
    except FileNotFoundError:
        return False


def _shm_files() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if "convserve" in name}


def test_two_frontends_serve_as_one_server_and_batch_together(served_repository):
    server = RunningServer(served_repository, "--frontends", "2")
    try:
        channels = _channels_on_each_frontend(server.url, 2)
        assert set(channels) == {"0/2", "1/2"}
        stubs = {identity: pb_grpc.GRPCInferenceServiceStub(channel) for identity, channel in channels.items()}
        shared_batches = []
        sent = {identity: 0 for identity in stubs}

        # Each client sends one image at a time and waits for its answer: a batch of two can only hold
        # one request from each front-end.
        def client(identity):
            stub = stubs[identity]
            until = time.monotonic() + 3
            while time.monotonic() < until:
                response = stub.ModelInfer(build_request("digits", array=X), timeout=10)
                sent[identity] += 1
                if response.parameters["batch_size"].int64_param == 2:
                    shared_batches.append(identity)

        threads = [threading.Thread(target=client, args=(identity,)) for identity in stubs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert shared_batches, "no executed batch held requests from both front-ends"
        # statistics are the engine's: both front-ends answer the same, and count every request
        answers = [
            stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits")).model_stats[0] for stub in stubs.values()
        ]
        assert answers[0].inference_count == answers[1].inference_count == sum(sent.values()) + 0
        assert any(b.batch_size == 2 for b in answers[0].batch_stats)
        # the one /metrics adds the front-ends' request counts
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        ok = [
            line
            for line in text.splitlines()
            if line.startswith("convserve_requests_total") and 'method="ModelInfer"' in line and 'code="OK"' in line
        ]
        assert len(ok) == 1 and float(ok[0].rsplit(" ", 1)[1]) == sum(sent.values()), ok
        assert 'convserve_model_ready{model="digits",version="1"} 1.0' in text
        # a region registered through one front-end is known to, and used through, the other
        region = shared_memory.SharedMemory(create=True, size=X.nbytes)
        try:
            np.ndarray(X.shape, np.float32, region.buf)[:] = X
            stubs["0/2"].SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="x", key=region.name, byte_size=X.nbytes)
            )
            status = stubs["1/2"].SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
            assert list(status.regions) == ["x"]
            request = build_request("digits", input_shm=(ShmRef("x", X.nbytes), X.shape))
            assert stubs["1/2"].ModelInfer(request).outputs[0].name == "logits"
            stubs["1/2"].SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
        finally:
            region.close()
            region.unlink()
        for channel in channels.values():
            channel.close()
    finally:
        assert server.stop() == 0, server.output()
    assert not _shm_files()


@pytest.mark.parametrize("victim", ["engine", "frontend-0"])
def test_a_killed_engine_or_frontend_fails_requests_unavailable_and_comes_back(served_repository, victim):
    server = RunningServer(served_repository, "--frontends", "2")
    results = {"ok": 0, "unavailable": 0, "other": []}
    stop = threading.Event()

    def client():
        channel = grpc.insecure_channel(server.url, options=[("grpc.use_local_subchannel_pool", 1)])
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = stub.ModelInfer(build_request("digits", array=X), timeout=5)
                assert response.outputs[0].name == "logits"
                results["ok"] += 1
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    results["unavailable"] += 1
                    time.sleep(0.05)
                else:
                    results["other"].append((exc.code(), exc.details()))
            assert time.monotonic() - started < 5.5  # every answer within its deadline
        channel.close()

    try:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        before = results["ok"]
        os.kill(_pids(server, frontends=2)[victim], signal.SIGKILL)
        time.sleep(1.0)
        # serves again within seconds
        deadline = time.monotonic() + 30
        recovered = results["ok"]
        while time.monotonic() < deadline and results["ok"] < recovered + 20:
            time.sleep(0.1)
        stop.set()
        for thread in threads:
            thread.join()
        assert before > 0 and results["ok"] >= recovered + 20, results
        assert results["other"] == [], results
        server.wait_ready(timeout=30)
    finally:
        stop.set()
        assert server.stop() == 0, server.output()
    assert not _shm_files()
    print(f"{victim} killed: {results}")


def test_kill_9_of_the_supervisor_leaves_nothing_listening(served_repository):
    server = RunningServer(served_repository, "--frontends", "2")
    pids = _pids(server, frontends=2)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids.values()):
        time.sleep(0.1)
    alive = [name for name, pid in pids.items() if _alive(pid)]
    assert not alive, alive
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=1)
    assert not _shm_files()
    server.log.close()
    # the run folder (engine socket, metrics files) of the killed supervisor: the next start removes it
    left = [e for e in os.listdir(tempfile.gettempdir()) if e.startswith(f"convserve-run-{server.process.pid}-")]
    assert left, "the killed run left no folder: nothing to clean"
    again = RunningServer(served_repository)
    try:
        assert not any(os.path.exists(os.path.join(tempfile.gettempdir(), e)) for e in left)
    finally:
        assert again.stop() == 0, again.output()
    assert not [e for e in os.listdir(tempfile.gettempdir()) if e.startswith(f"convserve-run-{again.process.pid}-")]


def test_an_engine_killed_while_the_front_ends_start_is_restarted_and_the_server_serves(served_repository):
    """Issue 27's fault 3: supervision works while the front-ends start. The engine is killed the
    moment it has loaded, while both front-ends wait to connect to it: a new engine comes, both
    front-ends connect to it, the serving lines come out, and SIGTERM ends it all."""
    server = RunningServer(served_repository, "--frontends", "2", wait=False)
    try:
        deadline = time.monotonic() + 60
        while not (loaded := re.search(r"engine pid (\d+) ready", server.output())):
            assert time.monotonic() < deadline and server.process.poll() is None, server.output()
            time.sleep(0.01)
        os.kill(int(loaded.group(1)), signal.SIGKILL)
        killed = time.monotonic()
        server.wait_ready(timeout=30)
        assert time.monotonic() - killed < 10, server.output()
        channels = _channels_on_each_frontend(server.url, 2)
        for channel in channels.values():
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelInfer(build_request("digits", array=X), timeout=30).outputs
        log = server.output()
        assert "restarting it" in log and len(re.findall(r"engine pid \d+ ready", log)) == 2, log
        assert log.count("convserve: serving") == 1, log
    finally:
        assert server.stop() == 0, server.output()


def test_a_frozen_engine_is_not_serving_within_2_s_and_http_requests_end_at_their_deadline(served_repository):
    """Issue 27's fault 4: health follows the engine's heartbeat, not only its socket; an HTTP request,
    which carries no deadline, gets the server's (--http-request-timeout)."""
    import json

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = RunningServer(served_repository, "--frontends", "1", "--http-request-timeout", "2")
    engine = _pids(server)["engine"]
    body = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [0.0] * 1024}]}
    )

    def http(path, data=None):
        request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=data)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def health():
        with grpc.insecure_channel(server.url, options=FRESH) as channel:  # a fresh connection, as a probe makes
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status

    def within(seconds, condition):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.05)
        return False

    try:
        assert health() == health_pb2.HealthCheckResponse.SERVING
        os.kill(engine, signal.SIGSTOP)
        assert within(2.0, lambda: health() == health_pb2.HealthCheckResponse.NOT_SERVING), server.output()
        assert http("/v2/health/ready") == 400 and http("/v2/health/live") == 200
        started = time.monotonic()
        assert http("/v2/models/digits/infer", body.encode()) == 504
        assert 1.5 < time.monotonic() - started < 5
        os.kill(engine, signal.SIGCONT)
        assert within(2.0, lambda: health() == health_pb2.HealthCheckResponse.SERVING), server.output()
        assert http("/v2/models/digits/infer", body.encode()) == 200
        assert "no heartbeat from the engine" in server.output()
    finally:
        os.kill(engine, signal.SIGCONT)
        assert server.stop() == 0, server.output()


def test_a_stopped_front_end_is_killed_and_restarted_and_fresh_connections_are_served(served_repository):
    """Issue 27's fault 2: SO_REUSEPORT goes on handing a stopped front-end new connections, which
    hang. It stops beating to its supervisor, which kills it (its socket goes, and the kernel hands
    the connections to the other) and starts a new one."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = RunningServer(served_repository, "--frontends", "2")
    stopped = 0  # known inside the try: a failure there still stops the server

    def fresh_health() -> bool:
        try:
            with grpc.insecure_channel(server.url, options=FRESH) as channel:  # a new connection each time
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                return answer.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    try:
        stopped = _pids(server, frontends=2)["frontend-0"]
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()
        deadline = started + 10
        while not all(fresh_health() for _ in range(10)):  # ten fresh connections in a row served
            assert time.monotonic() < deadline, server.output()
        print(f"fresh connections served again {time.monotonic() - started:.2f} s after the stop")
        assert time.monotonic() - started < 3, server.output()
        assert not _alive(stopped)
        assert re.search(r"front-end 0 \(pid \d+\) has not beaten for", server.output()), server.output()
        deadline = time.monotonic() + 30
        while _pids(server).get("frontend-0") == stopped:  # the new one has connected to the engine
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        assert len(_channels_on_each_frontend(server.url, 2)) == 2
    finally:
        with contextlib.suppress(ProcessLookupError):
            if stopped:
                os.kill(stopped, signal.SIGCONT)
        assert server.stop() == 0, server.output()
