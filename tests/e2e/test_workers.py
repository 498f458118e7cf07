"""`--workers 2`: two processes share the port, both serve, and their metrics add up."""

import urllib.request

import grpc
import numpy as np

from convserve.client import build_request
from convserve.service.proto import grpc_service_pb2 as pb
from convserve.service.proto import grpc_service_pb2_grpc as pb_grpc

from .conftest import RunningServer

X = np.zeros((1, 1, 32, 32), np.float32)


def test_two_workers_both_serve_and_their_metrics_add_up(served_repository):
    server = RunningServer(served_repository, "--workers", "2")
    try:
        served: dict[str, int] = {}
        sent = 0
        # A new connection each time: the kernel spreads connections, not requests. The second worker
        # may still be loading when the first answers: go on until both have answered.
        for attempt in range(200):
            if attempt >= 16 and len(served) == 2:
                break
            with grpc.insecure_channel(server.url, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(3):
                    stub.ModelInfer(build_request("digits", array=X))
                    sent += 1
                stats, call = stub.ModelStatistics.with_call(pb.ModelStatisticsRequest(name="digits"))
                worker = dict(call.trailing_metadata())["convserve-worker"]
                served[worker] = stats.model_stats[0].inference_count  # per process, cumulative
        assert set(served) == {"0/2", "1/2"}, served
        assert sum(served.values()) == sent
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        total = [
            line
            for line in text.splitlines()
            if line.startswith("convserve_requests_total") and 'method="ModelInfer"' in line and 'code="OK"' in line
        ]
        assert len(total) == 1 and float(total[0].rsplit(" ", 1)[1]) == sent, total
        assert 'convserve_model_ready{model="digits",version="1"} 1.0' in text
    finally:
        assert server.stop() == 0, server.output()
