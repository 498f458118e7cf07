"""TLS and mutual TLS for gRPC (server, our client, the CLI, tritonclient), with certificates the
test makes; the metrics endpoint on its own address, behind the token when asked."""

import datetime as dt
import ipaddress
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.client import Client, Tls

from .conftest import InProcessServer, RunningServer

X = np.zeros((1, 1, 32, 32), np.float32)


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject, key, issuer, issuer_key, *, ca=False, server=False):
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("convserve test CA", ca_key, "convserve test CA", ca_key, ca=True)
    files = {"ca.pem": ca.public_bytes(serialization.Encoding.PEM)}
    for name, server in (("server", True), ("client", False)):
        key = _key()
        files[f"{name}.pem"] = _cert(name, key, "convserve test CA", ca_key, server=server).public_bytes(
            serialization.Encoding.PEM
        )
        files[f"{name}.key"] = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {name: str(root / name) for name in files}


def test_tls_serves_our_client_the_cli_and_tritonclient_and_refuses_plain_text(own_repository, pki):
    tls = Tls(ca=pki["ca.pem"])
    server = InProcessServer(own_repository, "--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"], tls=tls)
    try:
        with Client(server.url, tls=tls) as client:
            assert client.infer("digits", array=X).model_version == "1"
        with Client(server.url) as plain, pytest.raises(grpc.RpcError) as info:
            plain.live()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        triton_client = triton.InferenceServerClient(server.url, ssl=True, root_certificates=pki["ca.pem"])
        assert triton_client.is_model_ready("digits")
        models = subprocess.run(
            [sys.executable, "-m", "convserve", "models", "--url", server.url, "--tls-ca", pki["ca.pem"]],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert models.returncode == 0 and "digits" in models.stdout, models.stderr
        # HTTP/REST over the same certificate; plain HTTP to it fails
        import ssl
        import urllib.request

        import tritonclient.http as httpclient

        https = httpclient.InferenceServerClient(
            f"127.0.0.1:{server.http_port}", ssl=True, ssl_options={"ca_certs": pki["ca.pem"]}
        )
        assert https.is_model_ready("digits") and https.get_model_metadata("digits")["name"] == "digits"
        context = ssl.create_default_context(cafile=pki["ca.pem"])
        with urllib.request.urlopen(f"https://127.0.0.1:{server.http_port}/v2/health/ready", context=context) as ok:
            assert ok.status == 200
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/health/ready", timeout=5)
    finally:
        assert server.stop() == 0, server.output()


def test_mutual_tls_needs_a_client_certificate(own_repository, pki):
    tls = Tls(ca=pki["ca.pem"], cert=pki["client.pem"], key=pki["client.key"])
    server = InProcessServer(
        own_repository,
        "--tls-cert",
        pki["server.pem"],
        "--tls-key",
        pki["server.key"],
        "--tls-client-ca",
        pki["ca.pem"],
        tls=tls,
    )
    try:
        with Client(server.url, tls=tls) as client:
            assert client.infer("digits", array=X).outputs
        with Client(server.url, tls=Tls(ca=pki["ca.pem"])) as anonymous, pytest.raises(grpc.RpcError) as info:
            anonymous.live()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert server.stop() == 0, server.output()


def test_the_metrics_endpoint_can_require_the_token_while_health_stays_open(own_repository):
    server = RunningServer(
        own_repository,
        "--metrics-require-token",
        "1",
        "--metrics-host",
        "127.0.0.1",
        env={"CONVSERVE_AUTH_TOKEN": "s3cret"},
        wait=False,
    )
    try:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with grpc.insecure_channel(server.url) as channel:  # health needs no token
            stub = health_pb2_grpc.HealthStub(channel)

            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url, timeout=10)
        assert info.value.code == 401
        request = urllib.request.Request(url, headers={"Authorization": "Bearer s3cret"})
        assert "convserve_model_ready" in urllib.request.urlopen(request, timeout=10).read().decode()
    finally:
        assert server.stop() == 0, server.output()
