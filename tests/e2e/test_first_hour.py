"""What a newcomer meets in the first hour: a port someone else holds is one line, `ps` names the
processes, the serving lines give the page's address, and no command with no server prints raw gRPC."""

import socket
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, free_port


def _serve(repository, *flags, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "convserve", "serve", "--repository", str(repository), "--host", "127.0.0.1", *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "busy, door, flag, variable, shared",
    [
        ("--http-port", "HTTP", "--http-port", "CONVSERVE_HTTP_PORT", False),
        ("--grpc-port", "gRPC", "--grpc-port", "CONVSERVE_GRPC_PORT", False),
        ("--metrics-port", "metrics", "--metrics-port", "CONVSERVE_METRICS_PORT", False),
        # another convserve's front-ends hold theirs with SO_REUSEPORT: a second server must not join them
        ("--grpc-port", "gRPC", "--grpc-port", "CONVSERVE_GRPC_PORT", True),
        ("--http-port", "HTTP", "--http-port", "CONVSERVE_HTTP_PORT", True),
    ],
)
def test_a_port_in_use_is_one_line_naming_the_flag_that_moves_it(served_repository, busy, door, flag, variable, shared):
    with socket.socket() as holder:  # another program's socket, or another server's front-end's
        if shared:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = {"--http-port": free_port(), "--grpc-port": free_port(), "--metrics-port": free_port(), busy: taken}
        started = time.monotonic()
        run = _serve(served_repository, *(str(v) for pair in ports.items() for v in pair))
    assert run.returncode == 1
    assert run.stdout == "" and run.stderr == f"convserve: port {taken} ({door}) is in use; set {flag} or {variable}\n"
    assert time.monotonic() - started < 30  # said before any model loads


def _title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode().strip()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(p) for p in handle.read().split()]


def test_ps_names_the_supervisor_the_engine_and_each_front_end(served_repository):
    from .conftest import RunningServer

    server = RunningServer(served_repository, "--frontends", "2")
    try:
        # ready answers once front-end 0 listens; the serving lines come once every front-end does
        deadline = time.monotonic() + 60
        while "convserve: the page" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        supervisor = server.process.pid
        # multiprocessing's own resource tracker (its semaphores) keeps its Python command line
        titles = sorted(t for t in map(_title, _children(supervisor)) if "resource_tracker" not in t)
        assert _title(supervisor) == "convserve: supervisor"
        assert titles == ["convserve: engine", "convserve: front-end 0", "convserve: front-end 1"], titles
        # the serving lines: every door, the page's address; no warning on 127.0.0.1
        output = server.output()
        assert f"serving 1 model version(s) on gRPC 127.0.0.1:{server.port}, HTTP :{server.http_port}" in output
        assert f"convserve: the page: http://127.0.0.1:{server.http_port}/" in output
        assert "every interface" not in output
    finally:
        assert server.stop() == 0, server.output()


def test_serving_on_every_interface_with_no_token_says_so():
    from convserve.service.settings import Settings
    from convserve.service.supervisor import serving_lines

    lines = serving_lines(Settings(host="0.0.0.0", http_port=8000), 8001, 2, 1).splitlines()
    assert lines[0] == (
        "convserve: serving 1 model version(s) on gRPC 0.0.0.0:8001, HTTP :8000, metrics :8002"
        " (2 front-ends, one engine)"
    )
    assert lines[1] == "convserve: the page: http://127.0.0.1:8000/"
    assert "every interface with no token" in lines[2] and "--auth-token" in lines[2]
    with_token = Settings(host="0.0.0.0", http_port=8000, auth_token="s3cret")
    assert len(serving_lines(with_token, 8001, 1, 1).splitlines()) == 2


def test_health_with_no_server_is_one_plain_line():
    nobody = f"127.0.0.1:{free_port()}"
    run = subprocess.run(
        [sys.executable, "-m", "convserve", "health", "--url", nobody, "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert run.returncode == 1 and run.stderr == ""
    assert run.stdout.startswith(f"{nobody}: UNAVAILABLE: no server answers there") and run.stdout.count("\n") == 1
    assert "failed to connect to all addresses" not in run.stdout
