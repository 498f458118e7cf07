"""Model versions coming and going without a restart, and a graceful SIGTERM under load."""

import os
import shutil
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from convserve.client import Client, build_request
from convserve.models.export import export_checkpoint
from convserve.proto import grpc_service_pb2 as pb

from .conftest import InProcessServer, RunningServer, repository_index

X = np.zeros((1, 1, 32, 32), np.float32)


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_new_version_served_without_restart_and_corrupt_one_refused(trained, own_repository):
    result, _ = trained
    server = InProcessServer(own_repository, "--poll-interval", "0.3")
    try:
        with Client(server.url) as client:
            assert client.infer("digits", array=X).model_version == "1"
            # a good version 2 appears: served without a restart
            export_checkpoint(result.checkpoint, repository=str(own_repository), name="digits")
            assert _wait_for(lambda: client.infer("digits", array=X).model_version == "2"), server.output()
            # a corrupt version 3: refused, version 2 keeps serving
            corrupt = own_repository / "digits" / "3"
            staging = own_repository / ".staging"
            shutil.copytree(own_repository / "digits" / "2", staging)
            with open(staging / "model.onnx", "r+b") as handle:
                handle.seek(1000)
                handle.write(b"\x00" * 64)
            os.rename(staging, corrupt)
            assert _wait_for(lambda: "sha256" in repository_index(client).get(("digits", "3"), ("", ""))[1]), (
                repository_index(client)
            )
            assert repository_index(client)[("digits", "3")][0] == "UNAVAILABLE"
            assert client.infer("digits", array=X).model_version == "2"
            # an explicit load retries and reports the failure; unload and load work on demand
            with pytest.raises(grpc.RpcError) as info:
                client.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            client.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="digits"))
            with pytest.raises(grpc.RpcError) as info:
                client.infer("digits", array=X)
            assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
            time.sleep(1.0)  # a poll must not bring an unloaded model back
            assert not client.stub.ModelReady(pb.ModelReadyRequest(name="digits")).ready
            shutil.rmtree(corrupt)
            client.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits"))
            assert client.infer("digits", array=X).model_version == "2"
            with pytest.raises(grpc.RpcError) as info:
                client.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="../digits"))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        assert server.stop() == 0, server.output()


def _health(client, service=""):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(client.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_a_model_that_failed_at_start_makes_the_server_not_ready_as_tritons_strict_readiness(own_repository):
    from grpc_health.v1 import health_pb2

    broken = own_repository / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.json").write_text("{not json")
    (broken / "model.onnx").write_bytes(b"junk")
    server = RunningServer(own_repository, wait=False)  # never ready: it waits for the model instead
    try:
        with Client(server.url) as client:
            assert _wait_for(lambda: _ready(client, "digits"), timeout=60), server.output()
            state, reason = repository_index(client)[("broken", "1")]
            assert state == "UNAVAILABLE" and "JSON" in reason
            # Triton 2.51 with --strict-readiness (its default): not ready, health NOT_SERVING, the rest serve
            assert client.stub.ServerLive(pb.ServerLiveRequest()).live
            assert not client.stub.ServerReady(pb.ServerReadyRequest()).ready
            assert _health(client) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert client.infer("digits", array=X).model_name == "digits"
            with pytest.raises(grpc.RpcError) as info:
                client.infer("broken", array=X)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            # unloaded on request: ready again, and the index keeps the load error as the reason
            client.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="broken"))
            assert _wait_for(lambda: client.stub.ServerReady(pb.ServerReadyRequest()).ready, timeout=10)
            assert _health(client) == health_pb2.HealthCheckResponse.SERVING
            assert "JSON" in repository_index(client)[("broken", "1")][1]
            # a load that fails again: not ready again
            with pytest.raises(grpc.RpcError) as info:
                client.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"))
            assert _wait_for(lambda: not client.stub.ServerReady(pb.ServerReadyRequest()).ready, timeout=10)
    finally:
        assert server.stop() == 0


def test_without_strict_readiness_a_failed_model_is_unavailable_and_the_server_ready(own_repository):
    broken = own_repository / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.json").write_text("{not json")
    server = InProcessServer(own_repository, "--strict-readiness", "0")
    try:
        with Client(server.url) as client:
            assert client.stub.ServerReady(pb.ServerReadyRequest()).ready
            with pytest.raises(grpc.RpcError) as info:
                client.infer("broken", array=X)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert server.stop() == 0


def _ready(client, name):
    try:
        return client.stub.ModelReady(pb.ModelReadyRequest(name=name)).ready
    except grpc.RpcError:
        return False  # not listening yet


def test_sigterm_under_load_answers_every_accepted_request(own_repository):
    server = RunningServer(own_repository, "--grace-period", "20")
    outcomes = []  # (sent at, ok, status code)
    stop_sending = threading.Event()

    def worker():
        with Client(server.url) as client:
            while not stop_sending.is_set():
                sent_at = time.monotonic()
                try:
                    client.infer("digits", array=X, timeout=30)
                    outcomes.append((sent_at, True, grpc.StatusCode.OK))
                except grpc.RpcError as exc:
                    outcomes.append((sent_at, False, exc.code()))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    _wait_for(lambda: len(outcomes) > 60, timeout=30)
    signalled_at = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(60)
    stop_sending.set()
    for t in threads:
        t.join(30)
    assert code == 0, server.output()
    before = [o for o in outcomes if o[0] < signalled_at - 0.05]
    assert len(before) > 30  # under load (a loaded machine answers slower: the last 50 ms are left out)
    # everything sent before the signal was accepted, so it was answered, and answered well
    assert all(ok for _, ok, _ in before), [c for _, ok, c in before if not ok]
    # what came after was refused cleanly (the server no longer listened), never dropped half-way
    after = [c for _, ok, c in outcomes if not ok]
    assert set(after) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, after
    assert "stopped" in server.output()


def test_a_full_queue_answers_resource_exhausted_and_serving_goes_on(own_repository):
    server = InProcessServer(own_repository, "--max-queue-size", "1", "--max-batch-size", "1")
    try:
        with Client(server.url) as client:
            request = build_request("digits", array=np.zeros((1, 1, 32, 32), np.float32))
            futures = [client.stub.ModelInfer.future(request, timeout=30) for _ in range(64)]
            codes = []
            for future in futures:
                try:
                    future.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
            assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)
            assert client.infer("digits", array=X).model_name == "digits"
    finally:
        assert server.stop() == 0


def test_auth_token_guards_every_rpc_but_health(own_repository):
    import tritonclient.grpc as triton
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = InProcessServer(own_repository, env={"CONVSERVE_AUTH_TOKEN": "s3cret"}, wait=False)
    try:
        with grpc.insecure_channel(server.url) as channel:  # health needs no token: probes use it
            health = health_pb2_grpc.HealthStub(channel)

            def serving():
                try:
                    return (
                        health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                        == health_pb2.HealthCheckResponse.SERVING
                    )
                except grpc.RpcError:
                    return False

            assert _wait_for(serving, timeout=60), server.output()
        for token in ("", "wrong"):
            with Client(server.url, token=token) as client:
                with pytest.raises(grpc.RpcError) as info:
                    client.infer("digits", array=X)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(server.url, token="s3cret") as client:
            assert client.infer("digits", array=X).model_name == "digits"
        # a client nobody here wrote, with the header it already knows how to send
        triton_client = triton.InferenceServerClient(server.url)
        assert triton_client.is_server_live(headers={"authorization": "Bearer s3cret"})
        with pytest.raises(Exception, match="UNAUTHENTICATED"):
            triton_client.is_server_live()
        # streams are guarded too
        results = []
        triton_client.start_stream(callback=lambda result, error: results.append(error))
        inp = triton.InferInput("input", [1, 1, 32, 32], "FP32")
        inp.set_data_from_numpy(X)
        try:
            triton_client.async_stream_infer("digits", [inp])
        except triton.InferenceServerException:
            pass  # the stream may already be closed by the refusal; the callback holds the reason
        assert _wait_for(lambda: results, timeout=10)
        triton_client.stop_stream()
        assert results[0] is not None and "UNAUTHENTICATED" in str(results[0])
    finally:
        assert server.stop() == 0, server.output()


def test_concurrent_loads_and_unloads_of_a_good_model_never_fail(own_repository):
    server = InProcessServer(own_repository)
    failures: list[str] = []

    def toggle() -> None:
        with Client(server.url) as client:
            for _ in range(8):
                try:
                    client.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits"))
                    client.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="digits"))
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")

    try:
        threads = [threading.Thread(target=toggle) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert failures == []  # a load's outcome is decided before another client's unload may run
        with Client(server.url) as client:
            client.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits"))
            assert client.infer("digits", array=X).model_name == "digits"
    finally:
        assert server.stop() == 0
