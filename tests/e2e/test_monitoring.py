"""Deployment against real servers: the dashboard and the alerts query only metrics a server really
exposes, and nginx with deploy/nginx/nginx.conf balances gRPC across two servers."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.client import Client
from convserve.proto import grpc_service_pb2 as pb
from convserve.service.gpu_metrics import NAMES as GPU_NAMES

from ..test_deploy import render_nginx
from .conftest import RunningServer, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
X = np.zeros((1, 1, 32, 32), np.float32)


def _exposed(server) -> set:
    with Client(server.url) as client:
        client.infer("digits", array=X, outputs=["logits", "conv1"])
        with pytest.raises(grpc.RpcError):
            client.infer("digits", array=np.zeros((99, 1, 32, 32), np.float32))  # a refusal: batch size
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def _queried(expressions) -> set:
    return {name for expr in expressions for name in re.findall(r"\b(convserve_[a-z_]+|up)\b", expr)}


def test_the_dashboard_and_the_alerts_query_metrics_the_server_exposes(server):
    exposed = _exposed(server) | set(GPU_NAMES) | {"up"}  # GPU gauges exist only on a GPU; `up` is Prometheus's
    with open(os.path.join(ROOT, "deploy", "grafana", "dashboards", "convserve.json")) as handle:
        dashboard = json.load(handle)
    panel_queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    variables = [v["query"]["query"] for v in dashboard["templating"]["list"]]
    with open(os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")) as handle:
        alerts = [rule["expr"] for group in yaml.safe_load(handle)["groups"] for rule in group["rules"]]
    dashboard_names, alert_names = _queried(panel_queries + variables), _queried(alerts)
    assert not dashboard_names - exposed, dashboard_names - exposed
    assert not alert_names - exposed, alert_names - exposed
    # the dashboard shows what the issue asks of it
    for name in ("convserve_requests_total", "convserve_request_duration_seconds_bucket",
                 "convserve_queue_duration_seconds_bucket", "convserve_compute_duration_seconds_bucket",
                 "convserve_batch_size_bucket", "convserve_queue_depth", "convserve_images_total",
                 "convserve_feature_map_bytes_total", *GPU_NAMES):  # fmt: skip
        assert name in dashboard_names, name
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({quantile}, " in e and "request_duration" in e for e in panel_queries)


@pytest.fixture
def two_servers(served_repository):
    servers = [RunningServer(served_repository), RunningServer(served_repository)]
    yield servers
    for server in servers:
        assert server.stop() == 0, server.output()


def _inferences(server) -> int:
    with Client(server.url) as client:
        stats = client.stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits"), timeout=10)
    return sum(s.inference_stats.success.count for s in stats.model_stats)


def test_nginx_balances_grpc_and_http_across_two_servers_and_passes_health_checks(two_servers, tmp_path):
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("nginx not installed (.ci/run installs it from Debian)")
    port, http_port = free_port(), free_port()
    config = tmp_path / "nginx.conf"
    http_servers = [f"127.0.0.1:{s.http_port}" for s in two_servers]
    config.write_text(render_nginx([s.url for s in two_servers], port, http_servers, http_port))
    proxy = subprocess.Popen(
        [
            nginx,
            "-p",
            str(tmp_path),
            "-c",
            str(config),
            "-g",
            f"daemon off; pid {tmp_path}/nginx.pid; error_log stderr;",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        with grpc.insecure_channel(url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline and proxy.poll() is None, "nginx did not come up"
                    time.sleep(0.2)
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert health.Check(health_pb2.HealthCheckRequest(service="digits"), timeout=2).status == status
        before = [_inferences(s) for s in two_servers]
        with Client(url) as client:  # one client connection: nginx spreads its requests
            for _ in range(20):
                assert client.infer("digits", array=X).model_name == "digits"
        reached = [_inferences(s) - b for s, b in zip(two_servers, before)]
        assert sum(reached) == 20 and min(reached) > 0, reached
        # HTTP through the same balancer: keep-alive connections to both replicas
        import tritonclient.http as httpclient

        before = [_inferences(s) for s in two_servers]
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        assert client.is_server_ready()
        tensor = httpclient.InferInput("input", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X, binary_data=True)
        for _ in range(20):
            assert client.infer("digits", [tensor]).as_numpy("logits").shape == (1, 10)
        reached = [_inferences(s) - b for s, b in zip(two_servers, before)]
        assert sum(reached) == 20 and min(reached) > 0, reached
    finally:
        proxy.send_signal(signal.SIGQUIT)
        proxy.wait(20)
