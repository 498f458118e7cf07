"""Health and /metrics against clients that hold or bloat them (issue 17's probe): neither needs a
token, so neither may grow with what a client sends."""

import socket
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc

from .conftest import RunningServer


def _scrape(server) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()


def _value(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_health_requests_are_small_and_watch_streams_bounded(served_repository):
    server = RunningServer(served_repository, "--max-health-watches", "3", "--grace-period", "60")
    try:
        with grpc.insecure_channel(server.url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            # a 4 MB service name: refused at once (the gRPC limit is sized for images, not for health)
            with pytest.raises(grpc.RpcError) as info:
                health.Check(health_pb2.HealthCheckRequest(service="x" * (4 << 20)), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as info:
                next(iter(health.Watch(health_pb2.HealthCheckRequest(service="x" * (4 << 20)), timeout=10)))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # three Watch streams are held; the fourth is refused, and counted
            streams = [health.Watch(health_pb2.HealthCheckRequest(service="digits")) for _ in range(3)]
            assert all(next(s).status == health_pb2.HealthCheckResponse.SERVING for s in streams)
            with pytest.raises(grpc.RpcError) as info:
                next(iter(health.Watch(health_pb2.HealthCheckRequest(), timeout=10)))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _value(_scrape(server), 'convserve_refusals_total{limit="health_watches"}') == 1
            # the rest answers; a held stream hears the model go
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            started = time.monotonic()
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
            assert time.monotonic() - started < 1.0
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="digits"), timeout=30)
            assert next(streams[0]).status == health_pb2.HealthCheckResponse.NOT_SERVING
            # a closed stream frees its place
            streams[1].cancel()
            deadline = time.monotonic() + 10
            while True:
                try:
                    again = health.Watch(health_pb2.HealthCheckRequest())
                    next(again)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            # stopping ends the watchers' streams: the grace period is not spent waiting for them
            started = time.monotonic()
            assert server.stop() == 0, server.output()
            assert time.monotonic() - started < 15
    finally:
        server.stop()


def test_metrics_connections_are_bounded_and_idle_ones_closed(served_repository):
    server = RunningServer(served_repository, "--metrics-max-connections", "8")
    held: list[socket.socket] = []
    try:
        assert "convserve_metrics_connections_refused_total 0.0" in _scrape(server)
        for _ in range(40):  # idle sockets: the endpoint holds 8, closes the rest at once
            held.append(socket.create_connection(("127.0.0.1", server.metrics_port), timeout=5))
        time.sleep(0.5)
        with grpc.insecure_channel(server.url) as channel:  # gRPC never notices
            assert pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5).live
        # within its idle timeout (10 s) the endpoint closes every held socket, and scrapes again
        deadline = time.monotonic() + 30
        closed = 0
        for sock in held:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            if sock.recv(1) == b"":
                closed += 1
        assert closed == len(held)
        text = _scrape(server)
        assert _value(text, "convserve_metrics_connections_refused_total") >= 30
    finally:
        for sock in held:
            sock.close()
        assert server.stop() == 0, server.output()


def test_compression_bombs_are_refused_off_the_loop_and_health_stays_fast(server):
    """Issue 27's fault 7: eight 1 MiB gzip bombs at once (1 GiB of zeros each) are 413, inflated no
    further than the body limit and off the event loop: health on other connections stays under 200 ms."""
    import gzip
    import threading
    import urllib.error

    bomb = gzip.compress(b"\0" * (1 << 30), compresslevel=1)
    url = f"http://127.0.0.1:{server.http_port}/v2/models/digits/infer"
    statuses: list[int] = []

    def send() -> None:
        request = urllib.request.Request(url, data=bomb, headers={"Content-Encoding": "gzip"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                statuses.append(answer.status)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
        except OSError:  # the server may close before the whole bomb is sent: refused as well
            statuses.append(413)

    worst = 0.0
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)  # the connection is up
        senders = [threading.Thread(target=send) for _ in range(8)]
        for thread in senders:
            thread.start()
        while any(thread.is_alive() for thread in senders):
            started = time.perf_counter()
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            worst = max(worst, time.perf_counter() - started)
            time.sleep(0.01)
        for thread in senders:
            thread.join()
    print(f"eight bombs: {statuses}, worst health {worst * 1000:.0f} ms")
    assert statuses == [413] * 8, statuses
    assert worst < 0.2, f"health took {worst * 1000:.0f} ms while the bombs were inflated"
